"""The OpenAI request bodies ``leaplm serve`` takes (pydantic models) and their translation to ``SamplingParams``.

Field names and meanings follow OpenAI's API (``/v1/chat/completions``, ``/v1/completions``) plus vLLM's extras
(``top_k``, ``min_p``, ``repetition_penalty``, ``ignore_eos``) and leaplm's own ``"leaplm"`` object (a client passes
it with ``extra_body``)::

    {"leaplm": {"speculative": "recycling" | {"method": "prompt_lookup", "num_draft": 8} | "none",
                "regex": "...", "grammar": "...", "kv_policy": "snapkv:ratio=0.25" | "none"}}

Types are checked by pydantic (a wrong type is a 400 naming the field); values by ``SamplingParams.validate``
(also a 400 naming the field and its rule). Unknown fields are ignored, as OpenAI's and vLLM's servers do.
"""
from __future__ import annotations

import json
from typing import Any, Literal, Union

from pydantic import BaseModel, ConfigDict, Field, StrictBool, StrictInt, model_validator

from ..errors import InvalidParamsError
from ..sampling import MAX_LOGPROBS, SamplingParams

MAX_N = 16                  # most choices per request (``n``)
MAX_COMPLETION_LOGPROBS = 5  # completions ``logprobs`` (OpenAI's cap)
MAX_STOP = 4                # most stop strings (OpenAI's cap)
MAX_PROMPTS = 64            # most prompts in one /v1/completions request


class _Body(BaseModel):
    model_config = ConfigDict(extra="ignore")


class TextPart(_Body):
    type: str
    text: str | None = None


class Message(_Body):
    role: Literal["system", "developer", "user", "assistant", "tool"]
    content: Union[str, list[TextPart], None] = None
    name: str | None = None

    def text(self) -> str:
        """The message's text: a string, or its text parts joined; other part kinds are refused."""
        if self.content is None:
            return ""
        if isinstance(self.content, str):
            return self.content
        out = []
        for i, part in enumerate(self.content):
            if part.type != "text" or part.text is None:
                raise InvalidParamsError(f"messages: content part {i} has type {part.type!r}; leaplm serves text "
                                         "models and takes only {'type': 'text', 'text': ...} parts")
            out.append(part.text)
        return "".join(out)


class StreamOptions(_Body):
    include_usage: StrictBool = False


class JsonSchemaFormat(_Body):
    name: str | None = None
    schema_: Union[dict, bool, None] = Field(default=None, alias="schema")
    strict: bool | None = None


class ResponseFormat(_Body):
    type: Literal["text", "json_object", "json_schema"]
    json_schema: JsonSchemaFormat | None = None


class LeapLMOptions(_Body):
    speculative: Union[str, dict, None] = None
    regex: str | None = None
    grammar: str | None = None
    jump_forward: StrictBool | None = None
    kv_policy: Union[str, dict, None] = None   # "snapkv:ratio=0.25", "none": this request's KV policy


class _Sampling(_Body):
    """The fields both routes share."""
    model: str | None = None
    max_tokens: StrictInt | None = None
    temperature: float | None = None
    top_p: float | None = None
    n: StrictInt = 1
    stream: StrictBool = False
    stream_options: StreamOptions | None = None
    stop: Union[str, list[str], None] = None
    seed: StrictInt | None = None
    presence_penalty: float | None = None
    frequency_penalty: float | None = None
    user: str | None = None
    top_k: StrictInt | None = None
    min_p: float | None = None
    repetition_penalty: float | None = None
    ignore_eos: StrictBool = False
    stop_token_ids: list[StrictInt] | None = None
    skip_special_tokens: StrictBool = True
    include_stop_str_in_output: StrictBool = False
    response_format: ResponseFormat | None = None
    leaplm: LeapLMOptions | None = None

    def sampling_params(self, max_tokens: int | None, logprobs: int | None, default_max_tokens: int,
                        choice: int = 0) -> SamplingParams:
        """``SamplingParams`` for choice ``choice`` (of ``n``): choice ``i`` samples with ``seed + i`` so that the
        choices of one seeded request differ yet repeat. Raises ``InvalidParamsError`` naming a bad field."""
        if self.n < 1 or self.n > MAX_N:
            raise InvalidParamsError(f"n must be an integer in [1, {MAX_N}], got {self.n}")
        if max_tokens is not None and max_tokens < 1:
            raise InvalidParamsError(f"max_tokens must be >= 1, got {max_tokens}")
        if isinstance(self.stop, list) and len(self.stop) > MAX_STOP:
            raise InvalidParamsError(f"stop: at most {MAX_STOP} stop strings, got {len(self.stop)}")
        kw: dict[str, Any] = dict(
            max_tokens=max_tokens if max_tokens is not None else default_max_tokens,
            temperature=1.0 if self.temperature is None else self.temperature,
            top_p=1.0 if self.top_p is None else self.top_p,
            top_k=self.top_k or 0, min_p=self.min_p or 0.0,
            repetition_penalty=1.0 if self.repetition_penalty is None else self.repetition_penalty,
            presence_penalty=self.presence_penalty or 0.0, frequency_penalty=self.frequency_penalty or 0.0,
            seed=None if self.seed is None else self.seed + choice if self.seed < 0 else (self.seed + choice) % 2 ** 64,
            stop=self.stop, stop_token_ids=list(self.stop_token_ids or []), ignore_eos=self.ignore_eos,
            skip_special_tokens=self.skip_special_tokens, include_stop_str_in_output=self.include_stop_str_in_output,
            logprobs=logprobs)
        kw.update(self._constraint())
        if self.leaplm is not None and self.leaplm.kv_policy is not None:
            kw["kv_policy"] = self.leaplm.kv_policy
        return SamplingParams(**kw)

    def _constraint(self) -> dict:
        out: dict[str, Any] = {}
        fmt = self.response_format
        if fmt is not None and fmt.type == "json_object":
            out["json_object"] = True
        elif fmt is not None and fmt.type == "json_schema":
            if fmt.json_schema is None or fmt.json_schema.schema_ is None:
                raise InvalidParamsError("response_format: type json_schema needs json_schema.schema")
            out["json_schema"] = fmt.json_schema.schema_
        opts = self.leaplm
        if opts is not None:
            for kind in ("regex", "grammar"):
                value = getattr(opts, kind)
                if value is not None:
                    if out:
                        raise InvalidParamsError(f"give one of response_format, leaplm.regex, leaplm.grammar "
                                                 f"(got {', '.join([*out, kind])})")
                    out[kind] = value
            if opts.jump_forward is not None:
                out["jump_forward"] = opts.jump_forward
        return out

    @property
    def speculative(self):
        return None if self.leaplm is None else self.leaplm.speculative

    @property
    def include_usage(self) -> bool:
        return bool(self.stream_options and self.stream_options.include_usage)


class ChatCompletionRequest(_Sampling):
    messages: list[Message]
    max_completion_tokens: StrictInt | None = None
    logprobs: StrictBool = False
    top_logprobs: StrictInt | None = None

    @model_validator(mode="after")
    def _check(self) -> "ChatCompletionRequest":
        if not self.messages:
            raise ValueError("messages must hold at least one message")
        return self

    def params(self, default_max_tokens: int, choice: int = 0) -> SamplingParams:
        if self.top_logprobs is not None and not 0 <= self.top_logprobs <= MAX_LOGPROBS:
            raise InvalidParamsError(f"top_logprobs must be an integer in [0, {MAX_LOGPROBS}], got {self.top_logprobs}")
        if self.top_logprobs and not self.logprobs:
            raise InvalidParamsError("top_logprobs needs logprobs: true")
        max_tokens = self.max_completion_tokens if self.max_completion_tokens is not None else self.max_tokens
        logprobs = (self.top_logprobs or 0) if self.logprobs else None
        return self.sampling_params(max_tokens, logprobs, default_max_tokens, choice)

    def conversation(self) -> list[dict]:
        """The messages as the chat template takes them (``developer`` is OpenAI's newer name for ``system``)."""
        return [{"role": "system" if m.role == "developer" else m.role, "content": m.text()} for m in self.messages]


class CompletionRequest(_Sampling):
    prompt: Union[str, list[str], list[StrictInt], list[list[StrictInt]]]
    logprobs: StrictInt | None = None
    echo: StrictBool = False
    suffix: str | None = None

    def params(self, default_max_tokens: int, choice: int = 0) -> SamplingParams:
        if self.logprobs is not None and not 0 <= self.logprobs <= MAX_COMPLETION_LOGPROBS:
            raise InvalidParamsError(f"logprobs must be an integer in [0, {MAX_COMPLETION_LOGPROBS}], got {self.logprobs}")
        if self.echo:
            raise InvalidParamsError("echo is not supported")
        if self.suffix:
            raise InvalidParamsError("suffix is not supported (no fill-in-the-middle)")
        return self.sampling_params(self.max_tokens, self.logprobs, default_max_tokens, choice)

    def prompts(self) -> list[str | list[int]]:
        """The prompts, each a string or a list of token ids."""
        p = self.prompt
        if isinstance(p, str):
            out: list = [p]
        elif p and all(isinstance(x, int) for x in p):
            out = [list(p)]
        else:
            out = list(p)
        if not out:
            raise InvalidParamsError("prompt is empty")
        if len(out) > MAX_PROMPTS:
            raise InvalidParamsError(f"prompt: at most {MAX_PROMPTS} prompts in one request, got {len(out)}")
        for one in out:
            if len(one) == 0:
                raise InvalidParamsError("prompt: an empty prompt (give at least one character or token)")
        return out


def speculative_spec(value) -> str | dict | None:
    """A request's ``leaplm.speculative`` value, checked for shape: a method name, ``"none"``, or a dict with a
    ``"method"`` string; dicts must be JSON-sized (a few knobs)."""
    if value is None or isinstance(value, str):
        return value
    if not isinstance(value.get("method"), str):
        raise InvalidParamsError('leaplm.speculative: a dict needs "method" (a method name)')
    if len(json.dumps(value)) > 4096:
        raise InvalidParamsError("leaplm.speculative: too large")
    return value
