"""leaplm decoding methods under test, by name, and the loaded target they run on.

A method is ``fn(target, prompt_ids, params, **knobs) -> Generation``: generate for ONE prompt (batch 1)
with the target model and return the new token ids, the time to first token and the number of
target forward passes. The runner times the call (wall clock) itself. Register with::

    @register_method("prompt_lookup", lossless=True, description="n-gram drafts from the prompt")
    def prompt_lookup(target, prompt_ids, params, k: int = 10, n: int = 3) -> Generation: ...

and select on the command line with ``--methods prompt_lookup:k=8:n=2`` (knobs ``name=value`` after
the name, separated by ``:``; values parsed as int, float, true/false, else string). The label in the
results is the text as given, so one method can run with several knob settings side by side.
``lossless=True`` claims greedy output identical to ``vanilla``: the report marks it NOT EXACT when not.

``vanilla`` (plain autoregressive decoding with leaplm's engine) always runs first and is the reference.

``load_target(model_path, ...)`` loads the model once: through ``LLM`` (tokenizer, chat template) when
the folder/file has a tokenizer, else - only for token-id workloads - the model and ``Engine`` alone,
with EOS ids from ``config.json`` / ``generation_config.json``.
"""
from __future__ import annotations

import inspect
import json
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable

from . import BenchError

# --------------------------------------------------------------------------- results of one generation


@dataclass
class Generation:
    token_ids: list[int]
    ttft_s: float | None = None            # first token's arrival after the call started (prefill)
    target_passes: int | None = None       # target model forward passes (None: not counted, e.g. peers)
    finish_reason: str | None = None
    # leaplm methods: first_tokens (tokens that arrived with the first); constrained runs also forced_tokens,
    # pruned_draft_tokens, constraint_s, mask_times (seconds per next-token mask), compile_s (the grammar's)
    extra: dict = field(default_factory=dict)


# --------------------------------------------------------------------------- the loaded target


@dataclass
class Target:
    """What every method runs on. ``tokenizer``/``llm`` are None for a model folder without tokenizer."""

    model_path: Path
    model: Any
    engine: Any
    tokenizer: Any | None
    llm: Any | None
    eos_token_ids: list[int]
    device: Any
    dtype: Any
    draft_model_path: Path | None = None
    cache: dict = field(default_factory=dict)   # methods keep loaded extras here (e.g. a draft model)
    contestant: str = ""   # the --methods entry running now: learnt drafter state is kept per entry

    @property
    def has_chat_template(self) -> bool:
        return self.tokenizer is not None and bool(getattr(self.tokenizer.hf, "chat_template", None))

    @property
    def pad_token_id(self) -> int:
        pad = getattr(self.tokenizer.hf, "pad_token_id", None) if self.tokenizer is not None else None
        return int(pad) if pad is not None else (self.eos_token_ids[0] if self.eos_token_ids else 0)


def _config_eos_ids(folder: Path) -> list[int]:
    ids: list[int] = []
    for name in ("config.json", "generation_config.json"):
        f = folder / name
        if f.is_file():
            val = json.loads(f.read_text()).get("eos_token_id")
            ids += [val] if isinstance(val, int) else [int(v) for v in (val or [])]
    return sorted(set(ids))


def load_target(model_path: Path, *, dtype=None, device=None, need_tokenizer: bool = True,
                draft_model_path: Path | None = None, quantization: str | None = None, compile: bool = False) -> Target:
    """Load the target once (see module docstring). Raises the loader's ``LeapLMError`` on bad input."""
    from ..errors import ModelNotFoundError
    from ..llm import LLM

    try:
        llm = LLM(str(model_path), dtype=dtype, device=device, max_batch_size=1, download=False,
                  quantization=quantization, compile=compile)
    except ModelNotFoundError as e:
        # The path exists (already resolved): a missing tokenizer is the only ModelNotFoundError left
        # that the model-only path can get around, and only for token-id workloads.
        if need_tokenizer or not model_path.is_dir() or "tokenizer" not in str(e):
            raise
        return _load_without_tokenizer(model_path, dtype, device, draft_model_path, quantization, compile)
    eos = sorted(llm.tokenizer.eos_token_ids)
    return Target(Path(llm.model_path), llm.model, llm.engine, llm.tokenizer, llm, eos, llm.device, llm.dtype,
                  draft_model_path)


def _load_without_tokenizer(folder: Path, dtype, device, draft_model_path, quantization=None, compile=False) -> Target:
    import torch

    from ..engine import Engine
    from ..llm import parse_dtype
    from ..models.load import build_model

    dev = torch.device(device or ("cuda" if torch.cuda.is_available() else "cpu"))
    dt = parse_dtype(dtype, dev)
    model = build_model(folder, dtype=dt, device=dev, quantization=quantization)
    if compile:
        model.compile()
    eos = _config_eos_ids(folder)
    return Target(folder, model, Engine(model, eos), None, None, eos, dev, dt, draft_model_path)


# --------------------------------------------------------------------------- registry

MethodFn = Callable[..., Generation]


@dataclass(frozen=True)
class MethodSpec:
    name: str
    fn: MethodFn
    lossless: bool = True
    description: str = ""

    def knob_names(self) -> list[str] | None:
        """Accepted knob names (None: any, the function takes ``**knobs``)."""
        params = list(inspect.signature(self.fn).parameters.values())[3:]
        if any(p.kind is p.VAR_KEYWORD for p in params):
            return None
        return [p.name for p in params if p.kind in (p.KEYWORD_ONLY, p.POSITIONAL_OR_KEYWORD)]


METHODS: dict[str, MethodSpec] = {}


def register_method(name: str, fn: MethodFn | None = None, *, lossless: bool = True, description: str = ""):
    """Add a method to ``METHODS`` (usable as a decorator). Re-registering a name replaces it."""
    def add(f: MethodFn) -> MethodFn:
        METHODS[name] = MethodSpec(name, f, lossless, description)
        return f

    return add(fn) if fn is not None else add


@dataclass
class MethodRun:
    """One ``--methods`` entry: the method plus its knobs."""

    label: str
    spec: MethodSpec
    knobs: dict

    def __call__(self, target: Target, prompt_ids: list[int], params, label: str | None = None) -> Generation:
        target.contestant = self.label if label is None else label   # whose drafter state this call uses
        return self.spec.fn(target, prompt_ids, params, **self.knobs)


def _value(text: str):
    low = text.lower()
    if low in ("true", "false"):
        return low == "true"
    for cast in (int, float):
        try:
            return cast(text)
        except ValueError:
            pass
    return text


def parse_method(text: str) -> MethodRun:
    name, *pieces = text.strip().split(":")
    if name not in METHODS:
        raise BenchError(f"unknown method {name!r}; known methods: {', '.join(sorted(METHODS))}")
    spec = METHODS[name]
    knobs = {}
    for piece in pieces:
        key, eq, val = piece.partition("=")
        if not eq or not key:
            raise BenchError(f"bad knob {piece!r} in method {text!r}: write name:key=value[:key=value...]")
        knobs[key] = _value(val)
    allowed = spec.knob_names()
    if allowed is not None:
        bad = [k for k in knobs if k not in allowed]
        if bad:
            raise BenchError(f"method {name!r} has no knob {bad[0]!r}; its knobs: {', '.join(allowed) or 'none'}")
    return MethodRun(text.strip(), spec, knobs)


def parse_methods(text: str | None) -> list[MethodRun]:
    """``"m1,m2:k=v"`` -> runs, ``vanilla`` first (added when absent), duplicates removed."""
    entries = [t.strip() for t in (text or "").split(",") if t.strip()]
    runs = [parse_method("vanilla")]
    for entry in entries:
        run = parse_method(entry)
        if run.label not in [r.label for r in runs]:
            runs.append(run)
    return runs


# --------------------------------------------------------------------------- vanilla


def _run_engine(target: Target, prompt_ids: list[int], params, drafter=None) -> Generation:
    started = time.perf_counter()
    batch = target.engine.start([prompt_ids], [params], drafter)
    first = 0   # tokens that arrived with the first one (prefill; jump-forward can add several)
    while not batch.done and not first:
        first = sum(len(o.new_token_ids) for o in batch.step())
    row = batch.run()[0]
    ttft = row.first_token_at - started if row.first_token_at is not None else None
    extra: dict = {"first_tokens": first}
    if row.constraint is not None:
        extra |= {"forced_tokens": row.forced_tokens, "pruned_draft_tokens": row.pruned, "constraint_s": row.constraint_s,
                 "mask_times": list(row.mask_times),
                 "compile_s": getattr(getattr(row.constraint, "grammar", None), "compile_s", None)}
    return Generation(list(row.output_ids), ttft, row.target_passes, row.finish_reason, extra)


@register_method("vanilla", lossless=True, description="plain autoregressive decoding (the reference)")
def vanilla(target: Target, prompt_ids: list[int], params) -> Generation:
    return _run_engine(target, prompt_ids, params)


@register_method("prompt_lookup", lossless=True, description="n-gram drafts from the prompt and output (PLD), 2..3-grams")
def prompt_lookup(target: Target, prompt_ids: list[int], params, num_draft: int = 8, max_ngram: int = 3,
                  min_ngram: int = 2) -> Generation:
    from ..speculative.drafters import PromptLookup

    return _run_engine(target, prompt_ids, params, PromptLookup(num_draft, max_ngram, min_ngram))


@register_method("copyspec", lossless=True,
                 description="CopySpec: copy the continuation of the last 3-gram from the context or earlier requests")
def copyspec(target: Target, prompt_ids: list[int], params, num_draft: int = 10, gamma: int = 3,
             max_store_tokens: int = 1_000_000) -> Generation:
    from ..speculative.drafters import CopySpec

    key = (target.contestant, "copyspec", num_draft, gamma, max_store_tokens)  # one store across the run's requests
    if key not in target.cache:
        target.cache[key] = CopySpec(num_draft, gamma, max_store_tokens)
    return _run_engine(target, prompt_ids, params, target.cache[key])


def _bound_drafter(target: Target, key: tuple, make):
    """One drafter per ``--methods`` entry and configuration for the whole run (its learnt state carries
    across requests, never between two entries: two spellings of one configuration would otherwise share
    a drafter that has already seen the sample), bound to the target on first use."""
    key = (target.contestant,) + key
    if key not in target.cache:
        drafter = make()
        drafter.bind(target.model, getattr(target, "tokenizer", None))
        target.cache[key] = drafter
    return target.cache[key]


@register_method("recycling", lossless=True,
                 description="Token Recycling: a token tree from the target's own top-k candidates of earlier passes, "
                             "a prompt-lookup chain first when there is one (lookup=false: the tree alone; "
                             "context=1:prompt=false:lookup=false: the paper's one-token matrix alone)")
def recycling(target: Target, prompt_ids: list[int], params, num_draft: int = 24, top_k: int = 8,
              max_depth: int = 8, node_cost: float | None = None, lookup: bool | str = "first", context: int = 4,
              prompt: bool | None = None) -> Generation:
    from ..speculative.drafters import TokenRecycling

    key = ("recycling", num_draft, top_k, max_depth, node_cost, lookup, context, prompt)   # one matrix per run
    drafter = _bound_drafter(target, key, lambda: TokenRecycling(num_draft, top_k, max_depth, node_cost=node_cost,
                                                                lookup=lookup, context=context, prompt=prompt))
    return _run_engine(target, prompt_ids, params, drafter)


@register_method("aded", lossless=True,
                 description="ADED: a token tree from tri-gram statistics of the outputs, adapting while decoding")
def aded(target: Target, prompt_ids: list[int], params, num_draft: int = 24, max_depth: int = 8,
         exploration: float = 0.1, node_cost: float | None = None) -> Generation:
    from ..speculative.drafters import ADED

    drafter = _bound_drafter(target, ("aded", num_draft, max_depth, exploration, node_cost),  # statistics per run
                             lambda: ADED(num_draft=num_draft, max_depth=max_depth, exploration=exploration,
                                          node_cost=node_cost))
    return _run_engine(target, prompt_ids, params, drafter)


@register_method("lookahead", lossless=True,
                 description="Lookahead decoding: a Jacobi window in the verification pass harvests n-grams, verified as a trie")
def lookahead(target: Target, prompt_ids: list[int], params, window: int = 4, ngram: int = 4,
              max_candidates: int = 3, num_draft: int = 16, pool_size: int = 65536,
              context_ngrams: bool = True, seed: int = 0) -> Generation:
    from ..speculative.drafters import Lookahead

    key = ("lookahead", window, ngram, max_candidates, num_draft, pool_size, context_ngrams, seed)  # one pool per run
    drafter = _bound_drafter(target, key, lambda: Lookahead(window=window, ngram=ngram, max_candidates=max_candidates,
                                                            num_draft=num_draft, pool_size=pool_size,
                                                            context_ngrams=context_ngrams, seed=seed))
    return _run_engine(target, prompt_ids, params, drafter)


@register_method("retrieval", lossless=True,
                 description="REST: a token tree of continuations found in a datastore (corpus=PATH) and the context")
def retrieval(target: Target, prompt_ids: list[int], params, corpus: str = "", num_draft: int = 24,
              max_occurrences: int = 64, depth: int = 10, tree: bool = True) -> Generation:
    from ..speculative.drafters import Retrieval

    if not corpus:
        raise BenchError("method 'retrieval' needs a datastore: retrieval:corpus=PATH (a text file or folder)")
    drafter = _bound_drafter(target, ("retrieval", corpus, num_draft, max_occurrences, depth, tree),
                             lambda: Retrieval(corpus=corpus, num_draft=num_draft, max_occurrences=max_occurrences,
                                               depth=depth, tree=tree, progress=False))
    return _run_engine(target, prompt_ids, params, drafter)


@register_method("rasd", lossless=True,
                 description="RASD: the draft model's tree (--draft-model) fused with a retrieval tree (corpus=PATH) "
                             "pruned by the draft's top-k")
def rasd(target: Target, prompt_ids: list[int], params, corpus: str = "", num_draft: int = 16, prune_top_k: int = 8,
         prune_min_prob: float = 0.0, draft_length: int = 6, confidence: float = 0.4, adaptive: bool = True,
         quantization: str = "int8", tree_top_k: int = 2, tree_min_prob: float = 0.05, max_occurrences: int = 64,
         depth: int = 10) -> Generation:
    from ..speculative.drafters import RASD

    if target.draft_model_path is None:
        raise BenchError("method 'rasd' needs --draft-model")
    if not corpus:
        raise BenchError("method 'rasd' needs a datastore: rasd:corpus=PATH (a text file or folder)")
    key = ("rasd", corpus, num_draft, prune_top_k, prune_min_prob, draft_length, confidence, adaptive, quantization,
           tree_top_k, tree_min_prob, max_occurrences, depth)
    drafter = _bound_drafter(target, key, lambda: RASD(
        target.draft_model_path, corpus, num_draft=num_draft, prune_top_k=prune_top_k, prune_min_prob=prune_min_prob,
        draft_length=draft_length, confidence=confidence, adaptive=adaptive,
        quantization=None if quantization == "none" else quantization, tree_top_k=tree_top_k,
        tree_min_prob=tree_min_prob, max_occurrences=max_occurrences, depth=depth, download=False, progress=False))
    return _run_engine(target, prompt_ids, params, drafter)


@register_method("draft", lossless=True,
                 description="a smaller model of the same family drafts (--draft-model; int8 by default, adaptive length)")
def draft(target: Target, prompt_ids: list[int], params, num_draft: int = 6, confidence: float = 0.4,
          adaptive: bool = True, quantization: str = "int8", lookup: bool = False,
          draft_vocab: int | None = None, tree_top_k: int = 0, tree_extra: int = 6,
          tree_min_prob: float = 0.05, tree_width: int = 1, node_cost: float | None = None,
          staged: bool | str = True) -> Generation:
    from ..speculative.drafters import DraftModel

    if target.draft_model_path is None:
        raise BenchError("method 'draft' needs --draft-model")
    key = (target.contestant, "draft", num_draft, confidence, adaptive, quantization, lookup, draft_vocab, tree_top_k,
           tree_extra, tree_min_prob, tree_width, node_cost, staged)
    if key not in target.cache:
        quant = None if quantization == "none" else quantization
        # Entries whose draft keeps its whole LM head share one loaded draft model (its weights; each drafter
        # keeps its own caches and learnt state): four draft:* entries used to load four copies of the 0.5B.
        weights_key = ("draft weights", quant)
        shared = target.cache.get(weights_key) if draft_vocab is None else None
        drafter = DraftModel(shared[0] if shared else target.draft_model_path, num_draft=num_draft,
                             confidence=confidence, adaptive=adaptive, quantization=quant, lookup=lookup,
                             draft_vocab=draft_vocab, tree_top_k=tree_top_k, tree_extra=tree_extra,
                             tree_min_prob=tree_min_prob, tree_width=tree_width, node_cost=node_cost, staged=staged,
                             tokenizer=shared[1] if shared else None, download=False)
        drafter.bind(target.model, target.tokenizer)
        if draft_vocab is None and not shared:
            target.cache[weights_key] = (drafter.model, drafter.tokenizer)
        target.cache[key] = drafter
    return _run_engine(target, prompt_ids, params, target.cache[key])
