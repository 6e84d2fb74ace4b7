"""SamplingParams and the pure functions that turn logits into the distribution tokens are drawn from.

The one definition of "the target's distribution" used everywhere (vanilla sampling now,
speculative verification later): ``processed_logits`` applies, in this order,
1. repetition penalty (tokens of prompt + output; logit > 0 divided, else multiplied),
2. presence and frequency penalties (output tokens only; OpenAI semantics),
3. temperature, 4. top-k, 5. top-p, 6. min-p  (the order of transformers' warpers),
masking removed tokens with -inf. ``temperature == 0`` means greedy: the argmax of the penalized
logits. Shapes: logits ``[N, V]`` (N positions of one request, all with the same history).

Structured output (``json_schema`` / ``regex`` / ``grammar`` / ``json_object``) comes *before* step 1:
the engine sets the logits of tokens the grammar does not allow to -inf on the raw logits
(``leaplm.constrain.apply_bitmask_``), so every step above only ever sees, and picks among, allowed
tokens (penalties and warpers keep -inf at -inf).
"""
from __future__ import annotations

import math
import numbers
from dataclasses import dataclass, field
from typing import Sequence

import torch
from torch import Tensor

from .errors import InvalidParamsError

MIN_TEMPERATURE = 1e-5      # the smallest temperature > 0 accepted (SamplingParams.validate)
MAX_SEED = 2 ** 64 - 1      # torch.Generator.manual_seed's range (negative seeds alias it modulo 2**64)
MAX_LOGPROBS = 20           # most alternatives per token ``logprobs`` may ask for (OpenAI's cap)


@dataclass
class SamplingParams:
    """Per-request decoding options (names as vLLM's ``SamplingParams``).

    ``max_tokens`` defaults to 256 (vLLM: 16) so a plain call gives a useful answer. Every field is checked
    when the object is made (``validate``: ``InvalidParamsError`` naming the field and its rule).

    Structured output (at most one of these; see docs/structured-output.md):

    * ``json_schema`` - a JSON Schema (dict, bool or JSON text): the output is one JSON instance of it;
    * ``regex`` - the whole output matches this regular expression (Rust ``regex`` syntax);
    * ``grammar`` - a Lark grammar (llguidance's dialect) or a llama.cpp GBNF grammar;
    * ``json_object=True`` - any JSON object.

    It is compiled before generation starts (an unsupported schema feature, a bad regex or grammar
    raises ``InvalidConstraintError`` naming it); EOS is allowed only where the grammar may end, and a
    row whose grammar is complete and cannot go on finishes with ``"stop"``. ``jump_forward`` (default
    on): where the grammar allows exactly one continuation, its tokens are appended without being
    sampled (the model still reads them). They are the grammar's canonical tokenization of that text,
    which can differ from the tokens the model would have picked; turn it off to let the model choose.

    ``logprobs=k`` records, for every output token, its log-probability and the ``k`` likeliest tokens'
    (``RequestOutput.logprobs``): log-softmax of the model's raw logits at that position, after the grammar mask
    and before penalties, temperature and top-k/top-p/min-p (vLLM's default, ``raw_logprobs``). Speculative
    decoding gives the same numbers: an accepted draft token is scored by the verification pass's logits.
    A token forced by jump-forward has log-probability 0 (it is the only one the grammar allows there).

    ``prompt_logprobs=k`` does the same for the prompt (``RequestOutput.prompt_logprobs``: None for the first token,
    then each token's log-probability given the ones before it, as the model computed it while prefilling — under the
    request's KV policy, if any: this is how perplexity under a policy is measured). The prompt is then computed
    in full, never taken from the prefix cache.
    """

    temperature: float = 1.0
    top_p: float = 1.0
    top_k: int = 0                      # 0 or -1: off
    min_p: float = 0.0
    repetition_penalty: float = 1.0
    presence_penalty: float = 0.0
    frequency_penalty: float = 0.0
    seed: int | None = None
    max_tokens: int = 256
    stop: list[str] | str | None = None
    stop_token_ids: list[int] = field(default_factory=list)
    ignore_eos: bool = False
    include_stop_str_in_output: bool = False
    skip_special_tokens: bool = True
    json_schema: dict | bool | str | None = None
    regex: str | None = None
    grammar: str | None = None
    json_object: bool = False
    jump_forward: bool = True
    logprobs: int | None = None         # None: none; k >= 0: each output token's log-probability and the k likeliest
    prompt_logprobs: int | None = None  # None: none; k >= 0: each prompt token's log-probability and the k likeliest
    kv_policy: str | dict | None = None  # KV compression for this request ("snapkv:ratio=0.25", "none"); None: the
    #                                      model's default (LLM(kv_policy=...)); see docs/long-context.md

    def __post_init__(self) -> None:
        self.validate()

    def validate(self) -> None:
        """Check every field, raising ``InvalidParamsError`` naming the first bad one; normalizes ``stop`` to a
        list of non-empty strings (a lone string becomes ``[s]``, ``""`` entries are dropped) and integer
        fields given as numpy integers to ``int``. Rules beyond the table in docs/usage.md:

        * integer fields (``top_k``, ``max_tokens``, ``seed``, ``stop_token_ids``) refuse ``bool``;
        * ``seed`` is None or in ``[0, 2**64 - 1]``: the range of a torch generator's seed (torch also takes
          negative seeds, as aliases modulo 2**64; leaplm refuses them so one stream has one seed);
        * ``temperature`` is 0 (greedy) or at least ``MIN_TEMPERATURE`` (1e-5): a smaller one draws the argmax
          but for near-ties, and below ~1e-37 ``logits / temperature`` overflows float32 into NaN probabilities
          (``torch.multinomial`` then raises) — it is refused, never silently turned into greedy decoding.
        """
        def bad(name: str, value, rule: str) -> InvalidParamsError:
            return InvalidParamsError(f"invalid sampling parameter {name}={value!r}: {rule}")

        if isinstance(self.stop, str):
            self.stop = [self.stop]
        if self.stop is None:
            self.stop = []
        if not isinstance(self.stop, (list, tuple)) or not all(isinstance(s, str) for s in self.stop):
            raise bad("stop", self.stop, "must be a string or a list of strings")
        self.stop = [s for s in self.stop if s]
        if self.stop_token_ids is None:
            self.stop_token_ids = []
        if (not isinstance(self.stop_token_ids, (list, tuple))
                or any(not _is_int(t) or t < 0 for t in self.stop_token_ids)):
            raise bad("stop_token_ids", self.stop_token_ids, "must be a list of non-negative integers")
        self.stop_token_ids = [int(t) for t in self.stop_token_ids]
        if not _finite(self.temperature) or self.temperature < 0:
            raise bad("temperature", self.temperature, "must be a number >= 0 (0 = greedy)")
        if 0 < self.temperature < MIN_TEMPERATURE:
            raise bad("temperature", self.temperature,
                      f"must be 0 (greedy) or at least {MIN_TEMPERATURE:g}; a smaller one is greedy in effect (the "
                      "argmax but for near-ties) and overflows float32 near 1e-37: use temperature=0 for greedy")
        if not _finite(self.top_p) or not 0 < self.top_p <= 1:
            raise bad("top_p", self.top_p, "must be in (0, 1]")
        if not _is_int(self.top_k) or self.top_k < -1:
            raise bad("top_k", self.top_k, "must be an integer >= 1, or 0 / -1 for no limit")
        self.top_k = int(self.top_k)
        if not _finite(self.min_p) or not 0 <= self.min_p <= 1:
            raise bad("min_p", self.min_p, "must be in [0, 1]")
        if not _finite(self.repetition_penalty) or self.repetition_penalty <= 0:
            raise bad("repetition_penalty", self.repetition_penalty, "must be > 0 (1 = off)")
        for name in ("presence_penalty", "frequency_penalty"):
            value = getattr(self, name)
            if not _finite(value) or not -2 <= value <= 2:
                raise bad(name, value, "must be in [-2, 2]")
        if not _is_int(self.max_tokens) or self.max_tokens < 1:
            raise bad("max_tokens", self.max_tokens, "must be an integer >= 1")
        self.max_tokens = int(self.max_tokens)
        if self.seed is not None:
            if not _is_int(self.seed) or not 0 <= self.seed <= MAX_SEED:
                raise bad("seed", self.seed, "must be None or an integer in [0, 2**64 - 1]")
            self.seed = int(self.seed)
        if self.prompt_logprobs is not None:
            if not _is_int(self.prompt_logprobs) or not 0 <= self.prompt_logprobs <= MAX_LOGPROBS:
                raise bad("prompt_logprobs", self.prompt_logprobs, f"must be None or an integer in [0, {MAX_LOGPROBS}]")
            self.prompt_logprobs = int(self.prompt_logprobs)
        if self.kv_policy is not None:
            from .cache.policies import parse_kv_policy

            parse_kv_policy(self.kv_policy)   # raises InvalidParamsError naming the method, knob or value
        if self.logprobs is not None:
            if not _is_int(self.logprobs) or not 0 <= self.logprobs <= MAX_LOGPROBS:
                raise bad("logprobs", self.logprobs, f"must be None or an integer in [0, {MAX_LOGPROBS}]")
            self.logprobs = int(self.logprobs)
        given = [k for k in CONSTRAINT_KINDS if getattr(self, k) not in (None, False) or
                 (k == "json_schema" and self.json_schema is False)]
        if len(given) > 1:
            raise InvalidParamsError(f"give at most one of json_schema, regex, grammar, json_object=True "
                                     f"(got {', '.join(given)})")
        if self.json_schema is not None and not isinstance(self.json_schema, (dict, bool, str)):
            raise bad("json_schema", type(self.json_schema).__name__, "must be a dict, a bool or JSON text")
        for name in ("regex", "grammar"):
            value = getattr(self, name)
            if value is not None and not isinstance(value, str):
                raise bad(name, type(value).__name__, "must be a string")
        for name in ("json_object", "jump_forward", "ignore_eos", "include_stop_str_in_output", "skip_special_tokens"):
            if not isinstance(getattr(self, name), bool):
                raise bad(name, getattr(self, name), "must be True or False")

    @property
    def greedy(self) -> bool:
        return self.temperature == 0

    @property
    def constraint(self) -> dict | None:
        """The structured-output request as ``compile_constraint`` keyword arguments, or None."""
        if self.json_object:
            return {"json_object": True}
        for kind in ("json_schema", "regex", "grammar"):
            value = getattr(self, kind)
            if value is not None:
                return {kind: value}
        return None

    @property
    def uses_penalties(self) -> bool:
        return self.repetition_penalty != 1 or self.presence_penalty != 0 or self.frequency_penalty != 0


CONSTRAINT_KINDS = ("json_schema", "regex", "grammar", "json_object")


def _finite(x) -> bool:
    return isinstance(x, numbers.Real) and not isinstance(x, bool) and math.isfinite(x)


def _is_int(x) -> bool:
    return isinstance(x, numbers.Integral) and not isinstance(x, bool)


class TokenHistory:
    """What penalties need about one request: prompt tokens seen, output token counts. ``[V]`` each."""

    def __init__(self, vocab_size: int, prompt: Sequence[int], device) -> None:
        self.in_prompt = torch.zeros(vocab_size, dtype=torch.bool, device=device)
        if len(prompt):
            self.in_prompt[torch.as_tensor(list(prompt), device=device).clamp_(0, vocab_size - 1)] = True
        self.counts = torch.zeros(vocab_size, dtype=torch.int32, device=device)

    def add(self, tokens: Sequence[int]) -> None:
        for t in tokens:
            if 0 <= t < self.counts.shape[0]:
                self.counts[t] += 1


def apply_penalties(logits: Tensor, params: SamplingParams, history: TokenHistory) -> Tensor:
    """Penalized copy of ``logits [N, V]`` (all N rows share ``history``)."""
    if not params.uses_penalties:
        return logits
    logits = logits.clone()
    counts = history.counts[: logits.shape[-1]]
    if params.repetition_penalty != 1:
        seen = history.in_prompt[: logits.shape[-1]] | (counts > 0)
        penalized = torch.where(logits > 0, logits / params.repetition_penalty, logits * params.repetition_penalty)
        logits = torch.where(seen, penalized, logits)
    if params.frequency_penalty:
        logits -= params.frequency_penalty * counts.to(logits.dtype)
    if params.presence_penalty:
        logits -= params.presence_penalty * (counts > 0).to(logits.dtype)
    return logits


def warp(logits: Tensor, params: SamplingParams) -> Tensor:
    """Temperature, top-k, top-p, min-p on ``logits [N, V]`` -> logits with -inf where removed."""
    logits = logits / params.temperature
    vocab = logits.shape[-1]
    if 0 < params.top_k < vocab:
        kth = torch.topk(logits, params.top_k, dim=-1).values[..., -1:]
        logits = logits.masked_fill(logits < kth, -math.inf)
    if params.top_p < 1:
        sorted_logits, order = torch.sort(logits, dim=-1, descending=False)
        cumulative = sorted_logits.softmax(-1).cumsum(-1)
        remove_sorted = cumulative <= 1 - params.top_p
        remove_sorted[..., -1] = False  # always keep the most likely token
        remove = remove_sorted.scatter(-1, order, remove_sorted)
        logits = logits.masked_fill(remove, -math.inf)
    if params.min_p > 0:
        probs = logits.softmax(-1)
        threshold = params.min_p * probs.max(-1, keepdim=True).values
        logits = logits.masked_fill(probs < threshold, -math.inf)
    return logits


def processed_logits(logits: Tensor, params: SamplingParams, history: TokenHistory | None) -> Tensor:
    """Penalties then (unless greedy) warping. ``[N, V]`` -> ``[N, V]`` float32."""
    logits = logits.float()
    if history is not None:
        logits = apply_penalties(logits, params, history)
    if params.greedy:
        return logits
    return warp(logits, params)


def probabilities(logits: Tensor, params: SamplingParams, history: TokenHistory | None) -> Tensor:
    """The distribution a token is drawn from, ``[N, V]``; one-hot at the argmax when greedy."""
    processed = processed_logits(logits, params, history)
    if params.greedy:
        return torch.nn.functional.one_hot(processed.argmax(-1), processed.shape[-1]).float()
    return processed.softmax(-1)


def sample(logits: Tensor, params: SamplingParams, history: TokenHistory | None,
           generator: torch.Generator | None) -> Tensor:
    """Draw one token per row of ``logits [N, V]`` -> ``[N]`` int64."""
    processed = processed_logits(logits, params, history)
    if params.greedy:
        return processed.argmax(-1)
    probs = processed.softmax(-1)
    return torch.multinomial(probs, 1, generator=generator).squeeze(-1)


def top_ids(logits: Tensor, k: int) -> Tensor:
    """Indices of the ``k`` largest logits of each row, ``[N, V]`` -> ``[N, k]`` int64, largest first.

    Ties go to the smaller index, so ``top_ids(x, 1)[:, 0]`` is ``x.argmax(-1)`` exactly (its first maximum).
    float32 CPU logits take leaplm's native one-pass kernel when the native ops are loaded (a compiled or
    int8/int4 model loads them; ~10x torch's ``argmax`` and ``topk`` on a 49k vocabulary), anything else
    ``torch.topk`` (``torch.argmax`` for ``k = 1``).
    """
    if logits.device.type == "cpu" and logits.dtype == torch.float32 and 1 <= k <= min(64, logits.shape[-1]):
        from . import native

        if native.available():
            return torch.ops.leaplm_native.row_topk(logits, k)
    if k == 1:
        return logits.argmax(-1, keepdim=True)
    return logits.topk(k, dim=-1).indices


def make_generator(seed: int | None, device) -> torch.Generator:
    """A per-request generator: seeded for reproducibility, else from fresh OS entropy.

    ``seed`` is taken modulo 2**64 (torch's seed range), so a seed derived from a request's seed (the draft
    model's ``seed + 1``) never overflows: ``2**64 - 1`` + 1 seeds like 0."""
    gen = torch.Generator(device=device)
    if seed is None:
        gen.seed()
    else:
        gen.manual_seed(int(seed) % (MAX_SEED + 1))
    return gen
