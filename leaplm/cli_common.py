"""The CLI pieces that ``leaplm generate|chat|profile`` (``leaplm.cli``) and the sub-commands that load a model
the same way (``leaplm eval``, ``leaplm bench``) share: the model flags and their checks, ``--device``,
output folders, and the speculative spec built from ``--spec`` and its flags.

Light on purpose: the CLI builds its parser (``leaplm --help``) without torch, so this module imports only
the standard library, ``errors`` and the drafter registry (``leaplm.speculative.registry``, which imports no
drafter); what needs torch or the model files is imported where a check runs.
"""
from __future__ import annotations

import argparse
import re
import sys
from pathlib import Path

from .errors import InvalidParamsError, ModelNotFoundError
from .speculative import registry


def check_device(value: str | None, flag: str = "--device") -> None:
    """Raise ``InvalidParamsError`` naming ``flag`` unless ``value`` is None or a device leaplm can run on here
    (``leaplm.llm.parse_device``: cpu, or a CUDA device this torch sees)."""
    from .llm import parse_device

    if value is None:
        return
    try:
        parse_device(value)
    except InvalidParamsError as e:
        raise InvalidParamsError(f"{flag}: {e}") from None


def prepare_out_dir(path: str | Path, flag: str = "--out") -> Path:
    """Create the output folder ``path`` (with its parents) and check that a file can be written in it, so a
    bad ``--out`` fails before the work instead of after; raises ``InvalidParamsError`` naming ``flag``."""
    import tempfile

    out = Path(path).expanduser()
    try:
        out.mkdir(parents=True, exist_ok=True)
        with tempfile.TemporaryFile(dir=out):
            pass
    except OSError as e:
        raise InvalidParamsError(f"{flag} {str(path)!r}: cannot create the folder or write in it: {e.strerror or e}") from None
    return out


def check_model_name(flag: str, value: str) -> None:
    """A model argument that cannot resolve — not a path, not a known name, not shaped like a hub id —
    fails here, before anything is loaded (a known name or hub id is fetched later, when the load needs it)."""
    from . import hub

    if Path(value).expanduser().exists() or value in hub.KNOWN_MODELS:
        return
    if re.fullmatch(r"[A-Za-z0-9][\w.-]*/[\w.-]+", value) and not value.endswith((".gguf", ".json")):
        return  # a hub id (hub.resolve's rule): only the download can tell
    raise ModelNotFoundError(f"{flag}: model path {value!r} does not exist, and it is not a known model name "
                             f"({', '.join(hub.KNOWN_MODELS)})")


def info(msg: str) -> None:
    """A ``[leaplm]`` status line on stderr (stdout stays for results)."""
    print(f"[leaplm] {msg}", file=sys.stderr, flush=True)


def at_least(flag: str, value, low: int) -> None:
    """``InvalidParamsError`` naming ``flag`` when ``value`` is given and below ``low``."""
    if value is not None and value < low:
        raise InvalidParamsError(f"{flag} must be >= {low}, got {value}")


def _owners(knob: str) -> str:
    """``"draft or rasd"``: the CLI names of the methods a knob's flag is for."""
    return " or ".join(info.cli_name for info in registry.taking(knob))


def add_model_args(p: argparse.ArgumentParser) -> None:
    """``--model``, ``--dtype``, ``--device``, ``--max-model-len``, ``--quantization``, ``--compile``, and
    ``--spec`` (every registered method and alias) with the flags of its knobs and ``--num-draft``."""
    knobs = registry.KNOBS
    implied = registry.needing_only(["model"]).cli_name
    p.add_argument("--model", "-m", default=None,
                   help="known name (see `leaplm models`), .gguf file, HF folder or hub id; default: smollm2-135m-instruct")
    p.add_argument("--dtype", default=None, help="auto (default: float32 on CPU, bfloat16 on CUDA) | float32 | bfloat16 | float16")
    p.add_argument("--device", default=None, help="cpu | cuda | cuda:N (default: cuda when available)")
    p.add_argument("--max-model-len", type=int, default=None,
                   help="cap on prompt + generated tokens, >= 2 (default: the model's context window)")
    p.add_argument("--quantization", "-q", default="auto",
                   help="auto (default: int8 for a low-bit GGUF file on CPU, else float) | none (float weights, "
                        "the exact checkpoint) | int8: per-channel int8 weights (leaplm's VNNI kernel or fbgemm, CPU), several times faster, lossy | "
                        "int4: 4-bit groups of 32 (as GGUF Q4_1; leaplm's C++ kernel, CPU), half int8's bytes, lossier")
    p.add_argument("--compile", action="store_true",
                   help="torch.compile the decode step (about a minute at every load for SmolLM2 int8 on 2 cores; faster decoding of small models on CPU)")
    p.add_argument("--spec", default=None, choices=registry.spellings(), metavar="METHOD",
                   help=f"lossless speculative decoding method: {registry.cli_help()} "
                        f"(default: none; {knobs['model'].flag} implies {implied})")
    p.add_argument(knobs["model"].flag, default=None,
                   help=f"draft model for --spec {_owners('model')}: known name, .gguf or HF folder with the target's tokenizer")
    p.add_argument(knobs["corpus"].flag, default=None,
                   help=f"for --spec {_owners('corpus')}: {knobs['corpus'].cli_hint} to draft from (REST datastore)")
    p.add_argument(knobs["path"].flag, default=None, metavar="DIR",
                   help=f"for --spec {_owners('path')}: {knobs['path'].cli_hint}")
    p.add_argument(knobs["tree_top_k"].flag, type=int, default=None, metavar="TOP_K",
                   help=f"for --spec {_owners('tree_top_k')}: draft a token tree branching into the draft's TOP_K best tokens")
    p.add_argument("--num-draft", type=int, default=None,
                   help="most draft tokens (tree nodes) per step, >= 1 (default: the method's own; docs/usage.md)")
    p.add_argument("--typical-acceptance", action="store_true",
                   help="for --spec medusa: Medusa's typical acceptance for sampled requests (LOSSY: the output is no "
                        "longer distributed as the model's sampling; docs/trained-drafters.md)")
    p.add_argument("--kv-cache-memory", default=None, metavar="SIZE",
                   help="memory of the paged KV pool shared by all requests, e.g. 2GiB, 500MB or bytes (default: a "
                        "quarter of the free memory, at most what --max-num-seqs full-length requests need)")
    p.add_argument("--max-num-seqs", type=int, default=None,
                   help="most requests decoding together (continuous batching; default 32)")
    p.add_argument("--kv-policy", default=None, metavar="POLICY",
                   help="KV-cache compression, LOSSY (docs/long-context.md): snapkv[:ratio=0.25|budget=N] keeps the "
                        "prompt tokens attention points at; streaming_llm[:sinks=4,window=1020] keeps attention sinks "
                        "+ a recent window (bounded memory, output past the context window); default: keep every token")


_UNITS = {"": 1, "b": 1, "k": 10 ** 3, "kb": 10 ** 3, "kib": 2 ** 10, "m": 10 ** 6, "mb": 10 ** 6, "mib": 2 ** 20,
          "g": 10 ** 9, "gb": 10 ** 9, "gib": 2 ** 30}


def parse_size(flag: str, text: str | None) -> int | None:
    """``"2GiB"``, ``"500MB"``, ``"1.5g"``, ``"1048576"`` -> bytes (None stays None); ``InvalidParamsError`` naming the
    flag otherwise."""
    if text is None:
        return None
    import re

    m = re.fullmatch(r"\s*([0-9]+(?:\.[0-9]+)?)\s*([a-zA-Z]*)\s*", str(text))
    unit = m.group(2).lower() if m else None
    if m is None or unit not in _UNITS or float(m.group(1)) * _UNITS[unit] < 1:
        raise InvalidParamsError(f"{flag}: {text!r} is not a size; give bytes or a number with a unit such as 500MB, "
                                 "2GiB (units: B, KB, KiB, MB, MiB, GB, GiB)")
    return int(float(m.group(1)) * _UNITS[unit])


def speculative_spec(args) -> dict | None:
    """The ``speculative=`` spec that ``--spec`` and its flags describe (None: no speculation), or
    ``InvalidParamsError`` for a flag combination that cannot work: a method without a flag it needs, a flag
    for another method, ``--num-draft`` without a method. ``--draft-model`` alone implies the draft model."""
    num_draft = getattr(args, "num_draft", None)
    method = getattr(args, "spec", None)
    if method is None and getattr(args, registry.KNOBS["model"].dest, None):
        method = registry.needing_only(["model"]).cli_name
    if method is None:
        if num_draft is not None:
            raise InvalidParamsError(f"--num-draft needs --spec (or {registry.KNOBS['model'].flag})")
        if getattr(args, "typical_acceptance", False):
            raise InvalidParamsError("--typical-acceptance needs --spec medusa")
        return None
    info = registry.lookup(method)
    spec: dict = {"method": info.name}
    for knob in registry.KNOBS.values():   # the knobs with flags of their own: --draft-model, --corpus, --tree
        value = getattr(args, knob.dest, None)
        given = value is not None and value != ""
        if knob.name in info.needs and not given:
            needed = knob.value + (f" ({knob.cli_hint})" if knob.cli_hint else "")
            raise InvalidParamsError(f"--spec {method} needs {knob.flag} {needed}")
        if given:
            if not info.takes(knob.name):
                raise InvalidParamsError(f"{knob.flag} is only used by --spec {_owners(knob.name)}, not --spec {method}")
            spec[knob.name] = value
    if num_draft is not None:
        spec["num_draft"] = num_draft
    if getattr(args, "typical_acceptance", False):
        if info.name != "medusa":
            raise InvalidParamsError(f"--typical-acceptance is only used by --spec medusa, not --spec {method}")
        spec["typical"] = True
    return spec


def check_model_args(args, quantization: bool = True) -> None:
    """Everything ``add_model_args`` takes that can be checked without loading the model (``--quantization``
    too unless ``quantization=False``, for a command that takes a list of modes there)."""
    from .quant import check_quantization

    speculative_spec(args)   # flag combinations first
    check_device(args.device)
    if quantization:
        check_quantization(args.quantization)
    at_least("--max-model-len", args.max_model_len, 2)   # a prompt token and a generated one
    at_least("--num-draft", getattr(args, "num_draft", None), 1)
    at_least("--max-num-seqs", getattr(args, "max_num_seqs", None), 1)
    parse_size("--kv-cache-memory", getattr(args, "kv_cache_memory", None))
    at_least("--tree", getattr(args, "tree", None), 1)
    if args.model is not None:
        check_model_name("--model", args.model)
    if getattr(args, "draft_model", None):
        check_model_name("--draft-model", args.draft_model)
    corpus = getattr(args, "corpus", None)
    if corpus and not Path(corpus).expanduser().exists():
        raise InvalidParamsError(f"--corpus: {corpus!r} does not exist (give a text file or a folder of text files)")


__all__ = ["add_model_args", "at_least", "check_device", "check_model_args", "check_model_name",
           "parse_size", "prepare_out_dir", "speculative_spec"]
