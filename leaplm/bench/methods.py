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
Every drafter of ``leaplm.speculative.registry`` is a method under its name and each of its aliases
(``DrafterMethod``): its knobs are the drafter class's, its description the registry's.

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

from ..speculative import registry
from ..speculative.registry import knob_value
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
        knobs[key] = knob_value(val)
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


# --------------------------------------------------------------------------- the drafters (from the registry)
#
# Every method of ``leaplm.speculative.registry`` is a bench method under each of its spellings ("draft" and
# "draft_model" are one method) with the drafter class's knobs, except those the bench fills in: the draft
# model comes from --draft-model, and nothing downloads or draws a progress bar. One drafter per --methods
# entry and configuration for the whole run, bound to the target on first use: what it learns carries across
# requests, never between two entries (two spellings of one configuration would otherwise share a drafter
# that has already seen the sample).

_FILLED_KNOBS = ("model", "tokenizer", "download", "progress")   # set by the bench, not by --methods knobs


def _make_draft_model(cls, target: Target, knobs: dict):
    """``draft_model``: entries whose draft keeps its whole LM head share one loaded draft model (its weights;
    each drafter keeps its own caches and learnt state): four draft:* entries used to load four copies of the
    0.5B. A shrunk head (``draft_vocab``) loads its own. Returns the bound drafter."""
    weights_key = ("draft weights", knobs.get("quantization", "int8"))
    shared = target.cache.get(weights_key) if knobs.get("draft_vocab") is None else None
    drafter = cls(shared[0] if shared else target.draft_model_path, **knobs,
                  tokenizer=shared[1] if shared else None, download=False)
    drafter.bind(target.model, target.tokenizer)
    if knobs.get("draft_vocab") is None and not shared:
        target.cache[weights_key] = (drafter.model, drafter.tokenizer)
    return drafter


# drafters the bench builds its own way: registry name -> make(cls, target, knobs) -> a bound drafter
_MAKERS = {"draft_model": _make_draft_model}


class DrafterMethod:
    """The bench method of one registered drafter, ``(target, prompt_ids, params, **knobs) -> Generation``.
    Its signature (what ``MethodSpec.knob_names`` reads) is the drafter class's knobs minus ``_FILLED_KNOBS``,
    read from the class when first asked: listing the methods (``leaplm bench --help``) imports no drafter."""

    def __init__(self, info, spelling: str) -> None:
        self.info, self.spelling = info, spelling   # a registry.DrafterInfo; the name or alias registered

    def drafter_class(self) -> type:
        from ..speculative.drafters import DRAFTERS

        return DRAFTERS[self.info.name]

    @property
    def __signature__(self) -> inspect.Signature:
        fixed = [inspect.Parameter(n, inspect.Parameter.POSITIONAL_OR_KEYWORD) for n in ("target", "prompt_ids", "params")]
        knobs = [p.replace(kind=inspect.Parameter.KEYWORD_ONLY)
                 for name, p in inspect.signature(self.drafter_class()).parameters.items()
                 if name not in _FILLED_KNOBS and p.kind in (p.POSITIONAL_OR_KEYWORD, p.KEYWORD_ONLY)]
        return inspect.Signature(fixed + knobs)

    def __call__(self, target: Target, prompt_ids: list[int], params, **knobs) -> Generation:
        from ..speculative.registry import KNOBS, construct

        info, name = self.info, self.spelling
        if "model" in info.needs and target.draft_model_path is None:
            raise BenchError(f"method {name!r} needs {KNOBS['model'].flag}")
        for knob in (KNOBS[k] for k in info.needs if k != "model"):
            if knobs.get(knob.name) in ("", None):
                raise BenchError(f"method {name!r} needs {knob.what}: {name}:{knob.name}={knob.value} "
                                 f"({knob.cli_hint or knob.hint})")
        key = (target.contestant, info.cli_name) + tuple(sorted((k, repr(v)) for k, v in knobs.items()))
        if key not in target.cache:
            cls = self.drafter_class()
            maker = _MAKERS.get(info.name)
            if maker is not None:
                drafter = maker(cls, target, knobs)
            else:
                taken = inspect.signature(cls).parameters
                filled = {k: v for k, v in (("model", target.draft_model_path), ("download", False),
                                            ("progress", False)) if k in taken}
                drafter = construct(cls, info, {**knobs, **filled})
                drafter.bind(target.model, target.tokenizer)
            target.cache[key] = drafter
        return _run_engine(target, prompt_ids, params, target.cache[key])


def _register_drafters() -> None:
    unknown = set(_MAKERS) - set(registry.names())
    if unknown:
        raise RuntimeError(f"bench makers for drafters the registry does not have: {sorted(unknown)}")
    for info in registry.DRAFTERS:
        for spelling in info.spellings:
            alias = f" (= {info.name})" if spelling != info.name else ""
            register_method(spelling, DrafterMethod(info, spelling), lossless=True, description=info.description + alias)


_register_drafters()
