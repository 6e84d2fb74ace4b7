"""``leaplm serve`` through the official ``openai`` client (sync and async), on the real SmolLM2.

Greedy answers must equal ``LLM.generate`` of the same prompt in this process (same weights, same kernels): the
server adds nothing and loses nothing. Streams must join to the non-streamed text.
"""
from __future__ import annotations

import asyncio
import json
import os

import pytest

openai = pytest.importorskip("openai")
jsonschema = pytest.importorskip("jsonschema")

from leaplm import LLM, SamplingParams  # noqa: E402

pytestmark = pytest.mark.real

QUESTION = [{"role": "user", "content": "Name three colors of the rainbow."}]


@pytest.fixture(scope="module")
def ref(smollm_gguf):
    return LLM(str(smollm_gguf))


@pytest.fixture(scope="module")
def client(server):
    return openai.OpenAI(base_url=server.url + "/v1", api_key="unused", max_retries=0, timeout=120)


@pytest.fixture(scope="module")
def model(client):
    return client.models.list().data[0].id


def greedy_chat(ref: LLM, messages, max_tokens: int, **kw):
    return ref.chat(messages, SamplingParams(temperature=0, max_tokens=max_tokens, **kw), use_tqdm=False)[0]


def test_models_and_info(client, server, model):
    models = client.models.list().data
    assert [m.id for m in models] == [model] and model == "SmolLM2-135M-Instruct.Q4_1"
    assert client.models.retrieve(model).id == model
    import urllib.request

    info = json.load(urllib.request.urlopen(server.url + "/v1/leaplm/info"))
    assert "prompt_lookup" in info["speculative_methods"] and info["model"] == model


def test_chat_greedy_equals_llm_generate_stream_or_not(client, model, ref):
    want = greedy_chat(ref, QUESTION, 40)
    got = client.chat.completions.create(model=model, messages=QUESTION, max_tokens=40, temperature=0)
    assert got.choices[0].message.content == want.text
    assert got.choices[0].finish_reason == want.finish_reason
    assert got.usage.completion_tokens == len(want.token_ids)
    assert got.usage.prompt_tokens == len(want.prompt_token_ids)
    pieces, finish, usage, roles = [], None, None, []
    for chunk in client.chat.completions.create(model=model, messages=QUESTION, max_tokens=40, temperature=0,
                                                stream=True, stream_options={"include_usage": True}):
        if chunk.usage is not None:
            usage = chunk.usage
        for c in chunk.choices:
            roles.append(c.delta.role)
            pieces.append(c.delta.content or "")
            finish = c.finish_reason or finish
    assert "".join(pieces) == want.text and finish == want.finish_reason
    assert roles[0] == "assistant" and len([p for p in pieces if p]) > 5   # streamed in pieces, not one block
    assert usage.completion_tokens == len(want.token_ids)


def test_completions_text_ids_and_list_of_prompts(client, model, ref):
    prompts = ["The capital of France is", "def add(a, b):"]
    want = ref.generate(prompts, SamplingParams(temperature=0, max_tokens=12), use_tqdm=False)
    got = client.completions.create(model=model, prompt=prompts, max_tokens=12, temperature=0)
    assert [c.text for c in sorted(got.choices, key=lambda c: c.index)] == [w.text for w in want]
    ids = ref.encode(prompts[1])
    by_ids = client.completions.create(model=model, prompt=ids, max_tokens=12, temperature=0)
    assert by_ids.choices[0].text == want[1].text
    streamed = "".join(c.choices[0].text for c in client.completions.create(
        model=model, prompt=prompts[0], max_tokens=12, temperature=0, stream=True) if c.choices)
    assert streamed == want[0].text


def test_n_choices_seeded_sampling_repeats(client, model):
    kw = dict(model=model, messages=QUESTION, max_tokens=16, temperature=1.0, n=2, seed=7)
    a = client.chat.completions.create(**kw)
    b = client.chat.completions.create(**kw)
    assert len(a.choices) == 2 and sorted(c.index for c in a.choices) == [0, 1]
    assert [c.message.content for c in a.choices] == [c.message.content for c in b.choices]
    assert a.choices[0].message.content != a.choices[1].message.content   # choice i samples with seed + i


def test_logprobs_chat_and_completions(client, model, ref):
    want = greedy_chat(ref, QUESTION, 10, logprobs=3)
    got = client.chat.completions.create(model=model, messages=QUESTION, max_tokens=10, temperature=0,
                                         logprobs=True, top_logprobs=3)
    content = got.choices[0].logprobs.content
    assert len(content) == len(want.token_ids) == got.usage.completion_tokens
    for entry, lp in zip(content, want.logprobs):
        assert entry.logprob == pytest.approx(lp.logprob, abs=1e-5)
        assert len(entry.top_logprobs) == 3 and entry.top_logprobs[0].logprob == pytest.approx(entry.logprob, abs=1e-5)
    assert "".join(e.token for e in content) == got.choices[0].message.content
    comp = client.completions.create(model=model, prompt="The capital of France is", max_tokens=5, temperature=0,
                                     logprobs=2)
    lp = comp.choices[0].logprobs
    assert len(lp.tokens) == len(lp.token_logprobs) == len(lp.top_logprobs) == 5
    assert "".join(lp.tokens) == comp.choices[0].text and lp.text_offset[0] == 0


def test_stop_strings_end_the_text(client, model, ref):
    full = greedy_chat(ref, QUESTION, 40).text
    stop = full.split()[3]   # a word in the middle of the answer
    want = greedy_chat(ref, QUESTION, 40, stop=[stop])
    got = client.chat.completions.create(model=model, messages=QUESTION, max_tokens=40, temperature=0, stop=[stop])
    assert got.choices[0].message.content == want.text and stop not in want.text
    assert got.choices[0].finish_reason == "stop"
    assert got.usage.completion_tokens == len(want.token_ids)


def test_json_schema_output_parses_and_validates(client, model):
    schema = {"type": "object", "properties": {"name": {"type": "string", "maxLength": 20},
                                               "age": {"type": "integer", "minimum": 0, "maximum": 120}},
              "required": ["name", "age"], "additionalProperties": False}
    got = client.chat.completions.create(
        model=model, messages=[{"role": "user", "content": "Invent a person. Answer in JSON."}], max_tokens=60,
        temperature=0, response_format={"type": "json_schema", "json_schema": {"name": "person", "schema": schema}})
    assert got.choices[0].finish_reason == "stop"
    jsonschema.validate(json.loads(got.choices[0].message.content), schema)
    obj = client.chat.completions.create(model=model, messages=QUESTION, max_tokens=60, temperature=0,
                                         response_format={"type": "json_object"})
    assert isinstance(json.loads(obj.choices[0].message.content), dict)


def test_speculation_per_request_is_lossless_and_reports_stats(client, model, ref):
    messages = [{"role": "user", "content": "Repeat exactly: the quick brown fox jumps over the lazy dog. "
                                            "the quick brown fox jumps over the lazy dog."}]
    want = greedy_chat(ref, messages, 48)
    for method in ("prompt_lookup", {"method": "recycling"}, "none"):
        got = client.chat.completions.create(model=model, messages=messages, max_tokens=48, temperature=0,
                                             extra_body={"leaplm": {"speculative": method}})
        assert got.choices[0].message.content == want.text, method
        stats = got.model_extra["leaplm"][0]
        if method == "none":
            assert stats["speculative"] is None and stats["drafted"] == 0
        else:
            assert stats["speculative"] in ("prompt_lookup", "recycling") and stats["drafted"] > 0
    assert stats["target_passes"] == got.usage.completion_tokens   # "none": one token per pass
    lookup = client.chat.completions.create(model=model, messages=messages, max_tokens=48, temperature=0,
                                            extra_body={"leaplm": {"speculative": "prompt_lookup"}})
    s = lookup.model_extra["leaplm"][0]
    assert s["accepted"] > 0 and s["mean_accepted_tokens"] > 1


def test_async_client_concurrent_streams_each_exact(server, model, ref):
    questions = [[{"role": "user", "content": f"Count from {i} to {i + 5}."}] for i in range(8)]
    want = [greedy_chat(ref, q, 24).text for q in questions]

    async def one(client, q):
        text = []
        stream = await client.chat.completions.create(model=model, messages=q, max_tokens=24, temperature=0,
                                                      stream=True)
        async for chunk in stream:
            for c in chunk.choices:
                text.append(c.delta.content or "")
        return "".join(text)

    async def main():
        client = openai.AsyncOpenAI(base_url=server.url + "/v1", api_key="unused", max_retries=0, timeout=120)
        try:
            return await asyncio.gather(*[one(client, q) for q in questions])
        finally:
            await client.close()

    assert asyncio.run(main()) == want


def test_metrics_after_requests(server, client, model):
    client.chat.completions.create(model=model, messages=QUESTION, max_tokens=4, temperature=0,
                                   extra_body={"leaplm": {"speculative": "prompt_lookup"}})
    import urllib.request

    text = urllib.request.urlopen(server.url + "/metrics").read().decode()
    for name in ("leaplm_requests_running", "leaplm_requests_waiting", 'leaplm_requests_total{status="ok"}',
                 "leaplm_generated_tokens_total", "leaplm_kv_blocks_used", "leaplm_kv_blocks_total",
                 "leaplm_prefix_cache_hit_rate", "leaplm_ttft_seconds_bucket", "leaplm_itl_seconds_bucket",
                 'leaplm_spec_accepted_tokens_total{method="prompt_lookup"}',
                 'leaplm_spec_drafted_tokens_total{method="prompt_lookup"}'):
        assert name in text, name
    generated = [line for line in text.splitlines() if line.startswith("leaplm_generated_tokens_total ")]
    assert float(generated[0].split()[1]) > 0


def test_the_kv_pool_is_reserved_at_start(server):
    """``leaplm serve`` makes its whole KV pool resident at start (--reserve-kv-memory, on by default): the
    process's resident memory already holds the pool before any request needs it."""
    import json
    import urllib.request

    info = json.loads(urllib.request.urlopen(server.url + "/v1/leaplm/info").read())
    assert info["kv_reserved"] is True
    assert 0.9 * 2 ** 30 <= info["kv_cache_memory"] <= 2 ** 30      # the fixture's --kv-cache-memory 1GiB
    with open(f"/proc/{server.proc.pid}/statm") as f:
        rss = int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")
    assert rss >= info["kv_cache_memory"], f"server RSS {rss} is below its reserved KV pool"
