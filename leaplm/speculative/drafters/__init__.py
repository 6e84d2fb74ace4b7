"""Drafters, one per file. ``make_drafter(spec)`` builds one from a name or ``{"method": name, **knobs}``."""
from __future__ import annotations

from typing import Any

from ...errors import InvalidParamsError
from .aded import ADED
from .base import Draft, Drafter
from .copyspec import CopySpec
from .draft_model import DraftModel
from .lookahead import Lookahead
from .prompt_lookup import PromptLookup
from .rasd import RASD
from .recycling import TokenRecycling
from .retrieval import Retrieval

DRAFTERS = {"prompt_lookup": PromptLookup, "copyspec": CopySpec, "draft_model": DraftModel,
            "recycling": TokenRecycling, "retrieval": Retrieval, "aded": ADED,
            "lookahead": Lookahead}
ALIASES = {"pld": "prompt_lookup", "draft": "draft_model", "token_recycling": "recycling", "lade": "lookahead"}

DRAFTERS["rasd"] = RASD   # draft model + retrieval, fused (needs model and corpus)


def make_drafter(spec: str | dict[str, Any] | Drafter | None) -> Drafter | None:
    if spec is None or isinstance(spec, Drafter):
        return spec
    knobs = dict(spec) if isinstance(spec, dict) else {"method": spec}
    method = knobs.pop("method", None)
    method = ALIASES.get(method, method)
    if method == "draft_model" and "model" not in knobs:
        raise InvalidParamsError("draft_model needs a draft model: {'method': 'draft_model', 'model': NAME_OR_PATH} "
                                 "(CLI: --draft-model)")
    if method == "retrieval" and "corpus" not in knobs:
        raise InvalidParamsError("retrieval needs a corpus to draft from: {'method': 'retrieval', 'corpus': PATH} "
                                 "(a text file, a folder of text files, or token id lists; CLI: --corpus)")
    if method == "rasd" and ("model" not in knobs or "corpus" not in knobs):
        missing = " and ".join(n for n in ("model", "corpus") if n not in knobs)
        raise InvalidParamsError(f"rasd needs a draft model and a corpus ({missing} missing): {{'method': 'rasd', "
                                 "'model': NAME_OR_PATH, 'corpus': PATH} (CLI: --draft-model and --corpus)")
    if method not in DRAFTERS:
        raise InvalidParamsError(f"unknown speculative method {method!r}; available: {', '.join(DRAFTERS)}")
    try:
        return DRAFTERS[method](**knobs)
    except TypeError as e:
        raise InvalidParamsError(f"bad options for {method}: {e}") from None


__all__ = ["ADED", "CopySpec", "Draft", "Drafter", "DraftModel", "Lookahead", "PromptLookup", "Retrieval", "TokenRecycling", "make_drafter", "DRAFTERS"]
__all__ += ["RASD"]
