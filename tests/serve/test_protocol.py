"""Request bodies -> SamplingParams (no server, no model)."""
from __future__ import annotations

import pytest

pytest.importorskip("fastapi")

from leaplm.errors import InvalidParamsError  # noqa: E402
from leaplm.serve.protocol import ChatCompletionRequest, CompletionRequest  # noqa: E402

USER = [{"role": "user", "content": "hi"}]


def test_chat_fields_map_to_sampling_params():
    body = ChatCompletionRequest(messages=USER, max_tokens=9, max_completion_tokens=7, temperature=0.5, top_p=0.9,
                                 top_k=5, min_p=0.1, seed=3, n=2, stop="END", presence_penalty=0.5,
                                 logprobs=True, top_logprobs=4, repetition_penalty=1.1)
    p0, p1 = body.params(100, 0), body.params(100, 1)
    assert (p0.max_tokens, p0.temperature, p0.top_p, p0.top_k, p0.min_p) == (7, 0.5, 0.9, 5, 0.1)
    assert (p0.seed, p1.seed) == (3, 4)            # choice i samples with seed + i
    assert p0.stop == ["END"] and p0.logprobs == 4 and p0.presence_penalty == 0.5 and p0.repetition_penalty == 1.1
    plain = ChatCompletionRequest(messages=USER).params(100)
    assert (plain.max_tokens, plain.temperature, plain.logprobs, plain.seed) == (100, 1.0, None, None)
    assert ChatCompletionRequest(messages=USER, logprobs=True).params(100).logprobs == 0


def test_structured_output_fields():
    schema = {"type": "object"}
    body = ChatCompletionRequest(messages=USER, response_format={"type": "json_schema",
                                                                 "json_schema": {"name": "x", "schema": schema}})
    assert body.params(10).json_schema == schema
    assert ChatCompletionRequest(messages=USER, response_format={"type": "json_object"}).params(10).json_object
    assert ChatCompletionRequest(messages=USER, response_format={"type": "text"}).params(10).constraint is None
    assert ChatCompletionRequest(messages=USER, leaplm={"regex": "a+"}).params(10).regex == "a+"
    with pytest.raises(InvalidParamsError, match="one of"):
        ChatCompletionRequest(messages=USER, response_format={"type": "json_object"},
                              leaplm={"grammar": "start: 'a'"}).params(10)


def test_values_are_checked_with_the_field_named():
    for kw, name in ((dict(max_tokens=0), "max_tokens"), (dict(n=17), "n"), (dict(temperature=-1), "temperature"),
                     (dict(logprobs=True, top_logprobs=21), "top_logprobs"), (dict(seed=-1), "seed"),
                     (dict(stop=list("abcde")), "stop")):
        with pytest.raises(InvalidParamsError, match=name):
            ChatCompletionRequest(messages=USER, **kw).params(10)


def test_messages_and_prompts():
    body = ChatCompletionRequest(messages=[{"role": "developer", "content": "be brief"},
                                           {"role": "user", "content": [{"type": "text", "text": "a"},
                                                                        {"type": "text", "text": "b"}]}])
    assert body.conversation() == [{"role": "system", "content": "be brief"}, {"role": "user", "content": "ab"}]
    with pytest.raises(InvalidParamsError, match="image_url"):
        ChatCompletionRequest(messages=[{"role": "user", "content": [{"type": "image_url"}]}]).conversation()
    assert CompletionRequest(prompt="x").prompts() == ["x"]
    assert CompletionRequest(prompt=[1, 2]).prompts() == [[1, 2]]
    assert CompletionRequest(prompt=[[1], [2, 3]]).prompts() == [[1], [2, 3]]
    assert CompletionRequest(prompt=["a", "b"]).prompts() == ["a", "b"]
    with pytest.raises(InvalidParamsError, match="empty"):
        CompletionRequest(prompt=[[1], []]).prompts()


def test_kv_policy_per_request():
    assert ChatCompletionRequest(messages=USER, leaplm={"kv_policy": "snapkv:ratio=0.5"}).params(10).kv_policy == \
        "snapkv:ratio=0.5"
    assert CompletionRequest(prompt="x", leaplm={"kv_policy": "none"}).params(10).kv_policy == "none"
    assert ChatCompletionRequest(messages=USER).params(10).kv_policy is None
    with pytest.raises(InvalidParamsError, match="unknown kv_policy"):
        ChatCompletionRequest(messages=USER, leaplm={"kv_policy": "h2o2"}).params(10)
