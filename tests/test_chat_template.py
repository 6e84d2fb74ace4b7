"""Chat prompts are the model's chat template rendered by transformers with the assistant generation
prompt: ``LLM.chat_prompt`` / ``chat`` / ``stream_chat`` on tiny models carrying ChatML, Llama-3 and
Gemma-style templates, and leaplm's tokenizer of the real SmolLM2 GGUF against its metadata's template."""
from __future__ import annotations

import shutil

import pytest

from leaplm import LLM, SamplingParams

from .engine_helpers import save_char_tokenizer

# template -> the assistant header its generation prompt appends
TEMPLATES = {
    "chatml": ("{% for m in messages %}<|im_start|>{{ m['role'] }}\n{{ m['content'] }}<|im_end|>\n{% endfor %}"
               "{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}", "<|im_start|>assistant\n"),
    "llama3": ("{{ bos_token }}{% for m in messages %}<|start_header_id|>{{ m['role'] }}<|end_header_id|>\n\n"
               "{{ m['content'] | trim }}<|eot_id|>{% endfor %}"
               "{% if add_generation_prompt %}<|start_header_id|>assistant<|end_header_id|>\n\n{% endif %}",
               "<|start_header_id|>assistant<|end_header_id|>\n\n"),
    "gemma": ("{{ bos_token }}{% for m in messages %}{% set role = 'model' if m['role'] == 'assistant' else 'user' %}"
              "<start_of_turn>{{ role }}\n{{ m['content'] | trim }}<end_of_turn>\n{% endfor %}"
              "{% if add_generation_prompt %}<start_of_turn>model\n{% endif %}", "<start_of_turn>model\n"),
}

CONVERSATIONS = {
    "system+user": [{"role": "system", "content": "You are terse."}, {"role": "user", "content": "Name a colour."}],
    "multi-turn": [{"role": "system", "content": "You are terse."}, {"role": "user", "content": "Name a colour."},
                   {"role": "assistant", "content": "Blue."}, {"role": "user", "content": "Another one?"}],
}


def _ids(rendered) -> list[int]:
    """``apply_chat_template(tokenize=True)``'s ids (transformers 5 returns a BatchEncoding)."""
    return list(rendered["input_ids"] if hasattr(rendered, "keys") else rendered)


@pytest.fixture(scope="module", params=TEMPLATES, ids=TEMPLATES.keys())
def templated(request, tiny_model_dir, tmp_path_factory):
    """(LLM on a tiny model whose tokenizer carries the template, transformers' tokenizer of it, header)."""
    from transformers import AutoTokenizer

    template, header = TEMPLATES[request.param]
    folder = tmp_path_factory.mktemp(f"chat-{request.param}") / "model"
    shutil.copytree(tiny_model_dir("llama-gqa-untied")[0], folder)
    save_char_tokenizer(folder, chat_template=template)
    return LLM(str(folder)), AutoTokenizer.from_pretrained(str(folder), local_files_only=True), header


@pytest.mark.parametrize("messages", CONVERSATIONS.values(), ids=CONVERSATIONS.keys())
def test_chat_prompt_is_the_template_with_the_generation_prompt(templated, messages):
    llm, reference, header = templated
    ids = llm.chat_prompt(messages)
    assert ids == _ids(reference.apply_chat_template(messages, add_generation_prompt=True, tokenize=True))
    without = _ids(reference.apply_chat_template(messages, add_generation_prompt=False, tokenize=True))
    assert ids[: len(without)] == without
    assert llm.tokenizer.decode(ids[len(without):], skip_special_tokens=False) == header


def test_chat_and_stream_chat_generate_from_the_chat_prompt(templated):
    llm, _, _ = templated
    params = SamplingParams(temperature=0, max_tokens=3, ignore_eos=True)
    conversations = list(CONVERSATIONS.values())
    outs = llm.chat(conversations, params, use_tqdm=False)
    assert [o.prompt_token_ids for o in outs] == [llm.chat_prompt(c) for c in conversations]
    assert llm.chat(conversations[1], params, use_tqdm=False)[0].token_ids == outs[1].token_ids
    text = "".join(llm.stream_chat(conversations[0], params))
    assert llm.last_output.prompt_token_ids == outs[0].prompt_token_ids and text == outs[0].text
    assert llm.last_output.token_ids == outs[0].token_ids


@pytest.mark.real
def test_smollm2_gguf_chat_prompt_is_its_metadata_template_rendered_by_transformers(smollm_gguf):
    """leaplm's tokenizer of the GGUF takes the chat template from the file's metadata, and its chat prompt
    is that template as transformers renders and tokenizes it, ending with the assistant header."""
    from leaplm.tokenizer import Tokenizer, gguf_tokenizer_metadata

    template = gguf_tokenizer_metadata(smollm_gguf)["tokenizer.chat_template"]
    tok = Tokenizer.from_path(smollm_gguf)
    assert tok.hf.chat_template == template
    header = tok.hf.encode("<|im_start|>assistant\n", add_special_tokens=False)
    for messages in [*CONVERSATIONS.values(), [{"role": "user", "content": "Hi"}]]:   # the last: default system
        ids = tok.apply_chat_template(messages)
        assert ids == _ids(tok.hf.apply_chat_template(messages, chat_template=template, add_generation_prompt=True,
                                                      tokenize=True))
        assert ids[-len(header):] == header and tok.render_chat(messages).endswith("<|im_end|>\n<|im_start|>assistant\n")
