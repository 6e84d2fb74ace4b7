"""The drafter registry: every speculative method's name, aliases, required knobs and one-line description,
in one table (``DRAFTERS``). Everything that names methods derives from it: ``make_drafter``
(``leaplm.speculative.drafters``), the CLI's ``--spec`` choices and help (``leaplm.cli_common``), the bench's
``--methods`` (``leaplm.bench.methods``) and staged drafting's inner drafters (``drafters.staged``).

This module imports no torch and no drafter, so the CLI can build its parser (``leaplm --help``) without
loading them. The classes are bound by ``leaplm.speculative.drafters``, which imports every drafter and
checks at import that its classes' ``name`` attributes are exactly the names registered here.

``DrafterInfo``: ``name`` (the canonical method: a drafter class's ``name``), ``aliases`` (other spellings,
each accepted wherever a method is), ``needs`` (knobs without a default: a spec without them is refused
before any class is built), ``options`` (optional knobs the CLI sets with a flag of its own, e.g.
``tree_top_k`` from ``--tree``), ``description`` (one line), ``cli`` (the spelling the CLI shows; default
``name``). ``KNOBS``: the knobs that have a CLI flag (``needs`` and ``options`` name only these).
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Iterable, Mapping

from ..errors import InvalidParamsError


@dataclass(frozen=True)
class Knob:
    """A drafter knob that the CLI sets with its own flag. ``value``: the placeholder shown in messages;
    ``what``: the noun of a "needs" message (required knobs); ``hint``: what a value may be (library);
    ``cli_hint``: the same for the flag."""

    name: str
    flag: str
    value: str
    what: str = ""
    hint: str = ""
    cli_hint: str = ""

    @property
    def dest(self) -> str:
        """The flag's argparse attribute (``--draft-model`` -> ``draft_model``)."""
        return self.flag.lstrip("-").replace("-", "_")


KNOBS: dict[str, Knob] = {k.name: k for k in (
    Knob("model", "--draft-model", "NAME_OR_PATH", what="a draft model"),
    Knob("corpus", "--corpus", "PATH", what="a corpus",
         hint="the text to draft from: a text file, a folder of text files, or token id lists",
         cli_hint="a text file or a folder of text files"),
    Knob("tree_top_k", "--tree", "TOP_K"),
    Knob("path", "--draft-head", "DIR", what="a trained draft head",
         hint="a folder made by leaplm train-drafter", cli_hint="a folder made by leaplm train-drafter"),
)}


@dataclass(frozen=True)
class DrafterInfo:
    name: str
    description: str
    aliases: tuple[str, ...] = ()
    needs: tuple[str, ...] = ()
    options: tuple[str, ...] = ()
    cli: str | None = None

    @property
    def spellings(self) -> tuple[str, ...]:
        """Every accepted spelling: the name, then the aliases."""
        return (self.name, *self.aliases)

    @property
    def cli_name(self) -> str:
        return self.cli or self.name

    def takes(self, knob: str) -> bool:
        """Whether the CLI flag of ``knob`` applies to this method (a required or an optional knob)."""
        return knob in self.needs or knob in self.options


DRAFTERS: tuple[DrafterInfo, ...] = (
    DrafterInfo("prompt_lookup", "n-gram drafts copied from the prompt and output (PLD), 2..3-grams",
                aliases=("pld",)),
    DrafterInfo("copyspec", "CopySpec: copy the continuation of the last 3-gram from the context or earlier "
                            "requests"),
    DrafterInfo("recycling", "Token Recycling: a token tree from the target's own top-k candidates of earlier "
                             "passes, a prompt-lookup chain first when there is one",
                aliases=("token_recycling",)),
    DrafterInfo("aded", "ADED: a token tree from tri-gram statistics of the outputs, adapting while decoding"),
    DrafterInfo("lookahead", "Lookahead decoding: a Jacobi window in the verification pass harvests n-grams, "
                             "verified as a trie", aliases=("lade",)),
    DrafterInfo("retrieval", "REST: a token tree of continuations found in a datastore (a corpus) and the context",
                needs=("corpus",)),
    DrafterInfo("draft_model", "a smaller model with the target's tokenizer drafts (int8 by default, adaptive "
                               "length; --tree: a token tree)",
                aliases=("draft",), needs=("model",), options=("tree_top_k",), cli="draft"),
    DrafterInfo("rasd", "RASD: the draft model's tree fused with a retrieval tree pruned by the draft's top-k",
                needs=("model", "corpus"), options=("tree_top_k",)),
    DrafterInfo("eagle", "EAGLE: a trained one-layer head over the target's own features drafts a dynamic token "
                         "tree (EAGLE-2); train one with leaplm train-drafter", needs=("path",)),
    DrafterInfo("medusa", "Medusa: trained residual heads on the target's last hidden state guess the next tokens "
                          "at once, a token tree of their top-k; train them with leaplm train-drafter",
                needs=("path",)),
    DrafterInfo("kangaroo", "Kangaroo: the target's own first layers plus a trained adapter draft a chain, stopping "
                            "when unsure (self-speculative); train it with leaplm train-drafter", needs=("path",)),
)


def _index(infos: Iterable[DrafterInfo]) -> dict[str, DrafterInfo]:
    index: dict[str, DrafterInfo] = {}
    for info in infos:
        unknown = [k for k in (*info.needs, *info.options) if k not in KNOBS]
        if unknown:
            raise ValueError(f"drafter {info.name!r} names knob {unknown[0]!r}, which has no entry in KNOBS")
        for spelling in info.spellings:
            if spelling in index:
                raise ValueError(f"drafter spelling {spelling!r} is registered twice "
                                 f"({index[spelling].name} and {info.name})")
            index[spelling] = info
    return index


_BY_SPELLING = _index(DRAFTERS)


def names() -> list[str]:
    """The canonical method names, in registry order."""
    return [info.name for info in DRAFTERS]


def spellings() -> list[str]:
    """Every accepted spelling (names and aliases), in registry order."""
    return list(_BY_SPELLING)


def resolve(method: Any) -> DrafterInfo | None:
    """The entry that ``method`` spells (a name or an alias), or None."""
    return _BY_SPELLING.get(method) if isinstance(method, str) else None


def available() -> str:
    """``"prompt_lookup (pld), copyspec, ..."``: the names with their aliases, for error messages."""
    return ", ".join(info.name + (f" ({', '.join(info.aliases)})" if info.aliases else "") for info in DRAFTERS)


def lookup(method: Any) -> DrafterInfo:
    """The entry that ``method`` spells; ``InvalidParamsError`` listing every method otherwise."""
    info = resolve(method)
    if info is None:
        if method is None:
            raise InvalidParamsError(f"a speculative spec needs a 'method'; available: {available()}")
        raise InvalidParamsError(f"unknown speculative method {method!r}; available: {available()}")
    return info


def taking(knob: str) -> list[DrafterInfo]:
    """The methods that take ``knob`` (``KNOBS``' flag applies to them), in registry order."""
    return [info for info in DRAFTERS if info.takes(knob)]


def needing_only(knobs: Iterable[str]) -> DrafterInfo:
    """The one method whose required knobs are exactly ``knobs`` (``--draft-model`` alone implies it)."""
    want = set(knobs)
    found = [info for info in DRAFTERS if set(info.needs) == want]
    if len(found) != 1:
        raise LookupError(f"{len(found)} drafters need exactly {sorted(want)}, not one")
    return found[0]


def split_spec(spec: str | Mapping[str, Any]) -> tuple[DrafterInfo, dict[str, Any]]:
    """A method name or ``{"method": name, **knobs}`` -> (its entry, the knobs). ``InvalidParamsError`` for
    an unknown method, or one whose required knobs are missing: the message names the method, each missing
    knob, the spec to write and the CLI flags."""
    knobs = dict(spec) if isinstance(spec, Mapping) else {"method": spec}
    info = lookup(knobs.pop("method", None))
    missing = [k for k in info.needs if k not in knobs]
    if missing:
        needed = [KNOBS[k] for k in info.needs]
        which = f" ({' and '.join(missing)} missing)" if len(needed) > 1 else ""
        example = ", ".join([f"'method': {info.name!r}"] + [f"{k.name!r}: {k.value}" for k in needed])
        notes = [k.hint for k in needed if k.hint] + [f"CLI: {' and '.join(k.flag for k in needed)}"]
        raise InvalidParamsError(f"{info.name} needs {' and '.join(k.what for k in needed)}{which}: "
                                 f"{{{example}}} ({'; '.join(notes)})")
    return info, knobs


def knob_value(text: str):
    """A knob's value written in a spec (``name:knob=value``): ``true``/``false``, an int, a float, else the text.
    Drafter specs (``leaplm bench --methods``) and KV policy specs (``cache/policies``) read values this way."""
    low = text.lower()
    if low in ("true", "false"):
        return low == "true"
    for cast in (int, float):
        try:
            return cast(text)
        except ValueError:
            pass
    return text


def construct(cls, info: DrafterInfo, knobs: Mapping[str, Any]):
    """``cls(**knobs)``, a knob the class does not take named in an ``InvalidParamsError``."""
    try:
        return cls(**knobs)
    except TypeError as e:
        raise InvalidParamsError(f"bad options for {info.name}: {e}") from None


def bind_classes(classes: Iterable[type]) -> dict[str, type]:
    """``{name: class}`` for the drafter classes (keyed by their ``name`` attribute), checked to be exactly the
    registered methods: a class without an entry here, or an entry without a class, is a ``RuntimeError``."""
    bound = {cls.name: cls for cls in classes}
    unregistered = sorted(set(bound) - set(names()))
    classless = [n for n in names() if n not in bound]
    if unregistered or classless:
        raise RuntimeError(f"drafter classes and leaplm.speculative.registry disagree: classes without an entry "
                           f"{unregistered}, entries without a class {classless}")
    return {name: bound[name] for name in names()}


def cli_help() -> str:
    """The ``--spec`` methods for the CLI's help: each CLI name, its other spellings and what it needs."""
    parts = []
    for info in DRAFTERS:
        other = [s for s in info.spellings if s != info.cli_name]
        needs = [KNOBS[k].flag for k in info.needs]
        parts.append(info.cli_name + (f" (= {', '.join(other)})" if other else "")
                     + (f" [needs {' and '.join(needs)}]" if needs else ""))
    return "; ".join(parts)


__all__ = ["DRAFTERS", "KNOBS", "DrafterInfo", "Knob", "available", "bind_classes", "cli_help", "construct",
           "lookup", "names", "needing_only", "resolve", "spellings", "split_spec", "taking"]
