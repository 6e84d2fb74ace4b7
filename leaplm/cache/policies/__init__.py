"""KV policies: compression and eviction of a request's keys and values (one method per file, ``base.py`` has the
contract). ``parse_kv_policy("snapkv:ratio=0.25")`` -> a ``KVPolicy``; ``None``, ``"none"`` or ``"full"``: keep
everything (None returned).

Specs: ``name`` or ``name:knob=value,knob=value`` (values parsed as int, float, true/false, else text), or a dict
``{"method": name, **knobs}``.
"""
from __future__ import annotations

from typing import Any, Mapping

from ...errors import InvalidParamsError
from ...speculative.registry import knob_value
from .base import KVAccess, KVPolicy
from .knorm import Knorm
from .snapkv import SnapKV
from .streaming_llm import StreamingLLM

POLICIES: dict[str, type[KVPolicy]] = {cls.name: cls for cls in (StreamingLLM, SnapKV, Knorm)}
FULL = ("none", "full")

__all__ = ["KVAccess", "KVPolicy", "Knorm", "POLICIES", "SnapKV", "StreamingLLM", "parse_kv_policy"]


def parse_kv_policy(spec: "str | Mapping[str, Any] | KVPolicy | None") -> KVPolicy | None:
    """A policy from its spec (see the module docstring); raises ``InvalidParamsError`` naming an unknown method or
    knob, or a bad value."""
    if spec is None or isinstance(spec, KVPolicy):
        return spec
    if isinstance(spec, Mapping):
        knobs = dict(spec)
        name = knobs.pop("method", knobs.pop("name", None))
    elif isinstance(spec, str):
        name, _, rest = spec.strip().partition(":")
        knobs = {}
        for item in filter(None, (part.strip() for part in rest.split(","))):
            key, eq, value = item.partition("=")
            if not eq or not key.strip():
                raise InvalidParamsError(f"kv_policy {spec!r}: knobs are written key=value, got {item!r}")
            knobs[key.strip()] = knob_value(value.strip())
    else:
        raise InvalidParamsError(f"kv_policy must be a string like 'snapkv:ratio=0.25', a dict or None; got "
                                 f"{type(spec).__name__}")
    name = str(name or "").strip().lower().replace("-", "_")
    if name in FULL and not knobs:
        return None
    cls = POLICIES.get(name)
    if cls is None:
        raise InvalidParamsError(f"unknown kv_policy {name!r}; available: {', '.join(sorted(POLICIES))} "
                                 f"(or 'none')")
    try:
        return cls(**knobs)
    except InvalidParamsError as e:
        raise InvalidParamsError(f"invalid kv_policy {spec!r}: {e}") from None
    except TypeError:
        import inspect

        allowed = [p for p in inspect.signature(cls.__init__).parameters if p != "self"]
        bad = [k for k in knobs if k not in allowed]
        raise InvalidParamsError(f"kv_policy {name}: unknown knob(s) {', '.join(bad)}; it takes "
                                 f"{', '.join(allowed)}") from None
