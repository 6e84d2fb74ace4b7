"""The public API on the real SmolLM2 GGUF: generation equals transformers, streaming, stops, errors."""
from __future__ import annotations

import pytest
import torch

from leaplm import LLM, SamplingParams
from leaplm.errors import InvalidParamsError, ModelNotFoundError, PromptTooLongError

from .engine_helpers import Oracle

pytestmark = pytest.mark.real

PROMPTS = [
    "The capital of France is",
    "def fibonacci(n):\n    \"\"\"Return the n-th Fibonacci number.\"\"\"\n",
    "List three colours of the rainbow:\n1.",
    "Once upon a time, in a small village by the sea,",
]


@pytest.fixture(scope="module")
def llm(smollm_gguf):
    return LLM(str(smollm_gguf), quantization=None)   # float weights: the checkpoint transformers runs


@pytest.fixture(scope="module")
def int8_llm(smollm_gguf):
    return LLM(str(smollm_gguf), max_model_len=128)   # quantization "auto"


def test_a_low_bit_gguf_loads_int8_by_default(int8_llm):
    assert int8_llm.quantization == "int8" and int8_llm.model.quantization == "int8"
    out = int8_llm.generate(["The capital of France is"], SamplingParams(temperature=0, max_tokens=6))[0]
    assert len(out.token_ids) == 6 and out.finish_reason == "length"


def test_partly_wrong_drafts_give_exactly_int8_vanilla(int8_llm):
    """KV rollback and tree compaction in a real generation: drafts that are the greedy answer with one
    wrong token (accepting 0..k tokens, in turn), as chains and as trees behind a decoy branch."""
    prompt = int8_llm.chat_prompt([{"role": "user", "content": "Write a short poem about the sea."}])
    params = SamplingParams(temperature=0, max_tokens=32, ignore_eos=True)
    vanilla = int8_llm.generate([prompt], params, use_tqdm=False)[0].token_ids
    for tree in (False, True):
        oracle = Oracle([prompt + vanilla], tree=tree, vocab_size=int8_llm.config.vocab_size)
        out = int8_llm.generate([prompt], params, use_tqdm=False, speculative=oracle)[0]
        assert out.token_ids == vanilla, tree
        assert 0 < out.metrics["accepted"] < out.metrics["drafted"], out.metrics


@pytest.fixture(scope="module")
def hf_model(smollm_gguf):
    from transformers import AutoModelForCausalLM, GgufConfig

    return AutoModelForCausalLM.from_pretrained(smollm_gguf.parent, gguf_file=smollm_gguf.name, dtype=torch.float32,
                                                quantization_config=GgufConfig(dequantize=True)).eval()


def test_greedy_equals_transformers_on_several_prompts(llm, hf_model):
    params = SamplingParams(temperature=0, max_tokens=40)
    outs = llm.generate(PROMPTS, params, use_tqdm=False)
    eos = sorted(llm.tokenizer.eos_token_ids)
    for prompt, out in zip(PROMPTS, outs):
        ids = torch.tensor([out.prompt_token_ids])
        with torch.no_grad():
            ref = hf_model.generate(ids, max_new_tokens=40, do_sample=False, eos_token_id=eos, pad_token_id=eos[0])
        assert out.token_ids == ref[0, ids.shape[1]:].tolist(), prompt
        assert out.text == llm.tokenizer.decode(out.token_ids)


def test_chat_prompts_with_the_template_and_stops_at_eos(llm):
    """The prompt is the GGUF's chat template rendered by transformers with the assistant generation
    prompt; SmolLM2's greedy answer to this one ends with <|im_end|> well before max_tokens."""
    from leaplm.tokenizer import gguf_tokenizer_metadata

    messages = [{"role": "system", "content": "You are a friendly assistant."}, {"role": "user", "content": "Say hello."}]
    template = gguf_tokenizer_metadata(llm.model_path)["tokenizer.chat_template"]
    expected = llm.tokenizer.hf.apply_chat_template(messages, chat_template=template, add_generation_prompt=True,
                                                    tokenize=True)
    out = llm.chat(messages, SamplingParams(temperature=0, max_tokens=64), use_tqdm=False)[0]
    assert out.prompt_token_ids == list(expected["input_ids"] if hasattr(expected, "keys") else expected)
    header = llm.tokenizer.hf.encode("<|im_start|>assistant\n", add_special_tokens=False)
    assert out.prompt_token_ids[-len(header):] == header
    assert out.finish_reason == "stop" and out.token_ids[-1] == llm.tokenizer.hf.convert_tokens_to_ids("<|im_end|>")
    assert len(out.token_ids) < 64 and out.text.strip()


def test_stream_concatenates_to_the_generated_text(llm):
    params = SamplingParams(temperature=0, max_tokens=30)
    pieces = list(llm.stream("Emoji and accents: café 🚀 naïve 世界. Continue:", params))
    assert "".join(pieces) == llm.last_output.text
    assert all("\ufffd" not in p for p in pieces)
    assert llm.last_output.token_ids == llm.generate("Emoji and accents: café 🚀 naïve 世界. Continue:", params,
                                                     use_tqdm=False)[0].token_ids


def test_stop_string_cuts_text_and_finishes(llm):
    full = llm.generate(PROMPTS[2], SamplingParams(temperature=0, max_tokens=30), use_tqdm=False)[0]
    stop = " " + full.text.split()[3]  # a word from the middle of the greedy answer
    cut = full.text[: full.text.index(stop)]
    params = SamplingParams(temperature=0, max_tokens=30, stop=[stop, "never-appears"])
    out = llm.generate(PROMPTS[2], params, use_tqdm=False)[0]
    assert out.finish_reason == "stop" and out.text == cut
    assert len(out.token_ids) < len(full.token_ids)
    assert "".join(llm.stream(PROMPTS[2], params)) == cut
    kept = llm.generate(PROMPTS[2], SamplingParams(temperature=0, max_tokens=30, stop=[stop],
                                                   include_stop_str_in_output=True), use_tqdm=False)[0]
    assert kept.text == cut + stop


def test_max_tokens_and_stop_token_ids(llm):
    out = llm.generate(PROMPTS[0], SamplingParams(temperature=0, max_tokens=5), use_tqdm=False)[0]
    assert len(out.token_ids) == 5 and out.finish_reason == "length"
    target = out.token_ids[2]
    stopped = llm.generate(PROMPTS[0], SamplingParams(temperature=0, max_tokens=5, stop_token_ids=[target]),
                           use_tqdm=False)[0]
    assert stopped.token_ids == out.token_ids[: out.token_ids.index(target) + 1] and stopped.finish_reason == "stop"


def test_seeded_sampling_reproducible_and_batch_independent(llm):
    params = SamplingParams(temperature=0.9, top_p=0.95, seed=7, max_tokens=20)
    a = llm.generate(PROMPTS[:2], params, use_tqdm=False)
    b = llm.generate(PROMPTS[1], params, use_tqdm=False)
    assert a[1].token_ids == b[0].token_ids
    assert a[0].token_ids == llm.generate(PROMPTS[0], params, use_tqdm=False)[0].token_ids


def test_token_id_prompts_and_vllm_style_outputs(llm):
    ids = llm.tokenizer.encode(PROMPTS[0])
    out = llm.generate([ids], SamplingParams(temperature=0, max_tokens=8), use_tqdm=False)[0]
    assert out.prompt_token_ids == ids and out.outputs[0].text == out.text
    assert out.metrics["output_tokens"] == 8 and out.metrics["target_passes"] == 8


def test_bad_input_messages(llm, tmp_path):
    with pytest.raises(PromptTooLongError, match="context window"):
        llm.generate([[5] * (llm.engine.max_model_len + 1)], use_tqdm=False)
    with pytest.raises(InvalidParamsError, match="empty"):
        llm.generate([[]], use_tqdm=False)
    with pytest.raises(InvalidParamsError, match="top_p"):
        llm.generate("hi", SamplingParams(top_p=0))  # raised when building the params
    with pytest.raises(ModelNotFoundError, match="does-not-exist"):
        LLM(str(tmp_path / "does-not-exist.gguf"))


def test_array_prompts_and_stop_string_on_the_last_token(llm):
    import numpy as np

    ids = llm.tokenizer.encode(PROMPTS[0])
    expected = llm.generate([ids], SamplingParams(temperature=0, max_tokens=6), use_tqdm=False)[0]
    for prompt in (torch.tensor(ids), np.array(ids), [np.int64(t) for t in ids]):
        out = llm.generate(prompt, SamplingParams(temperature=0, max_tokens=6), use_tqdm=False)
        assert len(out) == 1 and out[0].token_ids == expected.token_ids
    # the last allowed token completes a stop string: "stop", not "length" (" Paris.\n\nThe answer")
    stop = llm.tokenizer.decode(expected.token_ids[-1:]).strip()
    assert stop and stop not in llm.tokenizer.decode(expected.token_ids[:-1]), expected.text
    out = llm.generate([ids], SamplingParams(temperature=0, max_tokens=6, stop=[stop]), use_tqdm=False)[0]
    assert out.finish_reason == "stop" and out.token_ids == expected.token_ids
    assert out.text == expected.text[: expected.text.index(stop)]
