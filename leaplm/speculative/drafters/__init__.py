"""Drafters, one per file. ``make_drafter(spec)`` builds one from a name or ``{"method": name, **knobs}``.

The methods, their aliases and required knobs are registered once, in ``leaplm.speculative.registry`` (which
imports no torch, for the CLI); this package binds each registered name to its class (``DRAFTERS``, keyed by
the classes' ``name``; a class without an entry, or an entry without a class, fails at import).
"""
from __future__ import annotations

from typing import Any

from .. import registry
from .aded import ADED
from .base import Draft, Drafter
from .copyspec import CopySpec
from .draft_model import DraftModel
from .eagle import Eagle
from .kangaroo import Kangaroo
from .lookahead import Lookahead
from .medusa import Medusa
from .prompt_lookup import PromptLookup
from .rasd import RASD
from .recycling import TokenRecycling
from .retrieval import Retrieval

# canonical name -> class, in registry order
DRAFTERS: dict[str, type[Drafter]] = registry.bind_classes(
    (PromptLookup, CopySpec, TokenRecycling, ADED, Lookahead, Retrieval, DraftModel, RASD, Eagle, Medusa, Kangaroo))
# alias -> canonical name (derived from the registry; kept for callers of the old table)
ALIASES: dict[str, str] = {alias: info.name for info in registry.DRAFTERS for alias in info.aliases}


def make_drafter(spec: str | dict[str, Any] | Drafter | None) -> Drafter | None:
    """A drafter from a method name or alias, or ``{"method": name, **knobs}``; a ``Drafter`` or None passes
    through. ``InvalidParamsError`` names an unknown method (listing every one), a missing required knob (with
    the spec to write and the CLI flag), or a knob the class does not take."""
    if spec is None or isinstance(spec, Drafter):
        return spec
    info, knobs = registry.split_spec(spec)
    return registry.construct(DRAFTERS[info.name], info, knobs)


__all__ = ["ADED", "ALIASES", "CopySpec", "Draft", "Drafter", "DraftModel", "DRAFTERS", "Eagle", "Kangaroo", "Lookahead", "Medusa",
           "PromptLookup",
           "RASD", "Retrieval", "TokenRecycling", "make_drafter"]
