"""The llguidance backend: JSON schema / JSON object / regex / Lark (or GBNF) grammar -> per-sequence masks.

``compile_constraint(tokenizer, json_schema=..., regex=..., grammar=..., json_object=...)`` -> ``LLGuidanceGrammar``
(a ``CompiledConstraint``), cached per (tokenizer, vocab size, kind, text, whitespace mode); ``.new()`` ->
``LLGuidanceConstraint`` (a ``Constraint``: see ``leaplm.constrain.base`` for the contract and tensor shapes) -
a ``deep_copy`` of a compiled template matcher, microseconds.

* ``tokenizer`` is a ``leaplm.tokenizer.Tokenizer`` (a transformers *fast* tokenizer in ``.hf``; GGUF models
  get one rebuilt by transformers). Its llguidance ``LLTokenizer`` is built once (~0.4 s for a 49k vocabulary)
  with the model's EOS ids (``tokenizer.eos_token_ids``: all of them are allowed where the grammar may end) and
  cached for the life of the tokenizer. ``vocab_size`` is the model's logits width ``V`` (default
  ``tokenizer.vocab_size``); ids past the tokenizer's vocabulary (embedding padding) are never allowed.
* JSON schemas are compiled strictly (llguidance ``lenient: false``, forced even over a schema's ``x-guidance``):
  a keyword llguidance does not implement, an unknown ``format``, an unresolvable ``$ref``, a regex ``pattern``
  with look-around, an unsatisfiable schema ... raise ``InvalidConstraintError`` naming it, before generation.
  Output JSON is compact with ``", "`` / ``": "`` separators and no other whitespace (``whitespace_flexible=False``;
  ``True`` gives llguidance's default of any JSON whitespace, which lets small models loop on blanks).
  Properties come in the schema's order.
* ``regex`` must match the whole output (Rust ``regex`` syntax, no look-around/back-references).
* ``grammar`` is llguidance's Lark dialect (docs/syntax.md in guidance-ai/llguidance; ``%json {...}`` embeds a
  schema) or a llama.cpp GBNF grammar (converted with ``llguidance.gbnf_to_lark``).
* Compiling runs in a helper thread (llguidance drops the GIL) under llguidance's default resource limits
  (lexer fuel, grammar size, Earley items per step) and a wall-clock ``timeout_s``; failures (errors and
  time-outs) are cached too, so a bad schema sent again fails at once. The first mask is computed while
  compiling, so ``new()`` starts warm.
* ``fill_bitmasks(constraints, into [B, W])`` fills a batch of rows in llguidance's native thread pool.
"""
from __future__ import annotations

import json
import threading
import time
import weakref
from collections import OrderedDict
from typing import Any, Sequence

import llguidance
import torch
from llguidance import LLMatcher, LLParserLimits, LLTokenizer
from torch import Tensor

from ..errors import ConstraintError, InvalidConstraintError, UnsupportedModelError
from .base import bitmask_width, unpack_bitmask

DEFAULT_TIMEOUT_S = 10.0
CACHE_SIZE = 128          # compiled grammars kept per tokenizer (LRU)
_ITEM_SEP, _KEY_SEP = ", ", ": "

_LOCK = threading.RLock()
_ENTRIES: "weakref.WeakKeyDictionary[Any, _Entry]" = weakref.WeakKeyDictionary()
_EXECUTOR: "llguidance.LLExecutor | None" = None


class _Entry:
    """What is cached per leaplm Tokenizer: its LLTokenizers (per vocab size) and compiled grammars (LRU)."""

    def __init__(self) -> None:
        self.lltok: dict[int, LLTokenizer] = {}
        self.grammars: OrderedDict[tuple, "LLGuidanceGrammar | InvalidConstraintError"] = OrderedDict()


def _entry(tokenizer: Any) -> _Entry:
    with _LOCK:
        e = _ENTRIES.get(tokenizer)
        if e is None:
            e = _ENTRIES[tokenizer] = _Entry()
        return e


def llguidance_tokenizer(tokenizer: Any, vocab_size: int | None = None) -> LLTokenizer:
    """The (cached) ``LLTokenizer`` of a leaplm ``Tokenizer`` for a model with ``vocab_size`` logits.

    Its ``vocab_size`` is ``max(vocab_size, len(tokenizer.hf))``; its EOS ids are ``tokenizer.eos_token_ids``.
    """
    import llguidance.hf

    v = int(vocab_size or tokenizer.vocab_size)
    e = _entry(tokenizer)
    with _LOCK:
        ll = e.lltok.get(v)
        if ll is None:
            eos = sorted(int(i) for i in tokenizer.eos_token_ids)
            try:
                ll = llguidance.hf.from_tokenizer(tokenizer.hf, n_vocab=max(v, len(tokenizer.hf)),
                                                  eos_token=eos or None)
            except Exception as ex:  # noqa: BLE001 - ValueError (slow tokenizer) or a Rust-side error
                raise UnsupportedModelError(
                    f"structured output needs a fast (Rust) tokenizer that llguidance can read; the tokenizer of "
                    f"{getattr(tokenizer, 'source', None) or 'this model'} is not one: {type(ex).__name__}: {ex}"
                ) from None
            e.lltok[v] = ll
        return ll


def _reason(msg: str) -> str:
    """llguidance's error text without its debugging tail."""
    return msg.replace("<non-verbose/>", "").strip()


class LLGuidanceGrammar:
    """A compiled constraint (``CompiledConstraint``): immutable, shared; ``new()`` makes per-sequence cursors."""

    def __init__(self, kind: str, source: str, template: LLMatcher, lltok: LLTokenizer, vocab_size: int,
                 compile_s: float) -> None:
        self.kind, self.source, self.vocab_size, self.compile_s = kind, source, vocab_size, compile_s
        self.lltokenizer = lltok
        self.eos_ids: frozenset[int] = frozenset(int(t) for t in lltok.eos_tokens)
        self.warnings: list[str] = list(template.get_grammar_warnings())
        self._template = template
        self._lock = threading.Lock()

    def new(self) -> "LLGuidanceConstraint":
        with self._lock:
            m = self._template.deep_copy()
        return LLGuidanceConstraint(self, m)

    def __repr__(self) -> str:
        src = self.source if len(self.source) <= 60 else self.source[:57] + "..."
        return f"LLGuidanceGrammar({self.kind}, {src!r}, V={self.vocab_size}, compiled in {self.compile_s:.3f}s)"


class LLGuidanceConstraint:
    """One sequence's position in an ``LLGuidanceGrammar`` (the ``Constraint`` protocol; see base.py).

    EOS is handled here, never fed to the matcher: llguidance 1.9 accepts an EOS in a state that cannot be
    extended without recording it, so a later ``rollback`` would undo one token too many. An EOS is allowed
    exactly where the matcher is accepting (its masks set the EOS bits there too); after it nothing is allowed
    (the mask then has only the EOS bits, so a masked row is never all ``-inf``) and it counts as one token
    for ``num_tokens`` / ``rollback``.
    """

    def __init__(self, grammar: LLGuidanceGrammar, matcher: LLMatcher, num_tokens: int = 0,
                 ended: bool = False) -> None:
        self.grammar = grammar
        self.vocab_size = grammar.vocab_size
        self._m = matcher
        self._n = num_tokens
        self._ended = ended                # an EOS was consumed (it is the last of the _n tokens)
        self._eos = grammar.eos_ids
        self._w = bitmask_width(grammar.vocab_size)
        self._llw = bitmask_width(grammar.lltokenizer.vocab_size)   # >= self._w
        self._row: Tensor | None = None    # int32 [W] scratch
        self._wide: Tensor | None = None   # int32 [llW] scratch (only when the tokenizer is wider than V)

    # ------------------------------------------------------------------ state
    @property
    def num_tokens(self) -> int:
        return self._n

    @property
    def matcher(self) -> LLMatcher:
        """The underlying ``llguidance.LLMatcher`` (for batch helpers; do not consume through it)."""
        return self._m

    def can_stop(self) -> bool:
        return not self._ended and self._m.is_accepting()

    def is_finished(self) -> bool:
        return self._ended or self._m.is_stopped()

    def error(self) -> str | None:
        """llguidance's error message if the matcher hit an error (it then allows only EOS), else None."""
        return _reason(self._m.get_error()) if self._m.is_error() else None

    def _raise_if_error(self, what: str) -> None:
        if self._m.is_error():
            raise ConstraintError(f"the {self.grammar.kind} constraint failed while {what}: "
                                  f"{_reason(self._m.get_error())}")

    # ------------------------------------------------------------------ masks
    def _scratch_row(self) -> Tensor:
        if self._row is None:
            self._row = torch.empty(self._w, dtype=torch.int32)
        return self._row

    def _fill_words(self, row: Tensor) -> None:
        """Write the mask into ``row`` (int32 [W], CPU, contiguous)."""
        if self._ended:
            row.zero_()
            for t in self._eos:
                if t < self.vocab_size:
                    row[t >> 5] |= _bit(t & 31)
            return
        if self._llw == self._w:
            self._m.unsafe_compute_mask_ptr(row.data_ptr(), self._w * 4)
        else:  # the tokenizer has more ids than the model's logits (rare): compute wide, keep the first W words
            if self._wide is None:
                self._wide = torch.empty(self._llw, dtype=torch.int32)
            self._m.unsafe_compute_mask_ptr(self._wide.data_ptr(), self._llw * 4)
            row.copy_(self._wide[:self._w])
            if tail := self.vocab_size % 32:
                row[-1] &= (1 << tail) - 1
        self._raise_if_error("computing the next-token mask")

    def fill_mask(self, into: Tensor) -> None:
        if into.dtype == torch.int32 and into.shape == (self._w,):
            if into.device.type == "cpu" and into.is_contiguous():
                self._fill_words(into)
                return
            s = self._scratch_row()
            self._fill_words(s)
            into.copy_(s)
            return
        if into.dtype == torch.bool and into.shape == (self.vocab_size,):
            s = self._scratch_row()
            self._fill_words(s)
            into.copy_(unpack_bitmask(s.to(into.device), self.vocab_size))
            return
        raise ValueError(f"fill_mask needs an int32 [{self._w}] bitmask or a bool [{self.vocab_size}] tensor, "
                         f"got {into.dtype} {tuple(into.shape)}")

    def bitmask(self) -> Tensor:
        """The next-token mask as a new int32 ``[W]`` CPU bitmask."""
        out = torch.empty(self._w, dtype=torch.int32)
        self._fill_words(out)
        return out

    def mask(self, device: torch.device | str | None = None) -> Tensor:
        bits = self.bitmask()
        return unpack_bitmask(bits if device is None else bits.to(device), self.vocab_size)

    def allowed_ids(self) -> list[int]:
        return self.mask().nonzero().view(-1).tolist()

    def fill_draft_masks(self, draft: Sequence[int], into: Tensor) -> int:
        k = len(draft)
        if (into.dtype != torch.int32 or into.device.type != "cpu" or into.dim() != 2 or into.shape[0] < k + 1
                or into.shape[1] != self._w or not into.is_contiguous()):
            raise ValueError(f"fill_draft_masks needs a contiguous CPU int32 [>= {k + 1}, {self._w}] tensor, "
                             f"got {into.dtype} {tuple(into.shape)} on {into.device}")
        toks = [int(t) for t in draft]
        n = self.validate(toks)
        done = 0
        try:
            for i in range(n + 1):
                self._fill_words(into[i])
                if i < n:
                    self.advance(toks[i:i + 1])
                    done += 1
        finally:
            if done:
                self.rollback(done)
        if k > n:
            into[n + 1:k + 1] = into[n]
        return n

    # ------------------------------------------------------------------ tokens
    def validate(self, tokens: Sequence[int]) -> int:
        if self._ended:
            return 0
        toks = [int(t) for t in tokens]
        j = next((i for i, t in enumerate(toks) if t in self._eos), len(toks))
        n = self._m.validate_tokens(toks[:j]) if j else 0
        if n < j or j == len(toks):
            return n
        if j == 0:   # an EOS first: allowed where the grammar is complete
            return int(self._m.is_accepting())
        if not self._m.consume_tokens(toks[:j]):
            self._raise_if_error("validating tokens")
        accepting = self._m.is_accepting()
        self._m.rollback(j)
        return j + int(accepting)

    def _not_allowed(self, toks: list[int], n: int) -> ConstraintError:
        text = self.grammar.lltokenizer.dbg_tokens([toks[n]]) if toks[n] < self.grammar.lltokenizer.vocab_size else ""
        why = (" (EOS was already consumed)" if self._ended else
               " (the grammar is complete: only EOS may follow)" if self._m.is_stopped() else
               " (the grammar is not complete: EOS is not allowed yet)" if toks[n] in self._eos else "")
        return ConstraintError(f"token {toks[n]} {text} (position {n} of {len(toks)} advanced) is not allowed by the "
                               f"{self.grammar.kind} constraint after {self._n + n} tokens{why}")

    def advance(self, tokens: Sequence[int]) -> None:
        toks = [int(t) for t in tokens]
        if not toks:
            return
        if self._ended:
            raise self._not_allowed(toks, 0)
        j = next((i for i, t in enumerate(toks) if t in self._eos), len(toks))
        n = self._m.try_consume_tokens(toks[:j]) if j else 0
        if n < j:
            if n and not self._m.is_error():
                self._m.rollback(n)
            self._raise_if_error(f"consuming token {toks[n]}")
            raise self._not_allowed(toks, n)
        if j < len(toks):   # an EOS: must be allowed here and be the last token
            if not self._m.is_accepting() or j + 1 < len(toks):
                err = self._not_allowed(toks, j if not self._m.is_accepting() else j + 1)
                if j:
                    self._m.rollback(j)
                raise err
            self._ended = True
        self._n += len(toks)

    def rollback(self, n: int) -> None:
        if not 0 <= n <= self._n:
            raise ValueError(f"cannot roll back {n} tokens: {self._n} consumed")
        if not n:
            return
        m = n - 1 if self._ended else n
        if m and not self._m.rollback(m):
            self._raise_if_error(f"rolling back {n} tokens")
            raise ConstraintError(f"llguidance refused to roll back {n} tokens")
        self._ended = False
        self._n -= n

    def forced(self) -> list[int]:
        return [] if self._ended else list(self._m.compute_ff_tokens())

    def copy(self) -> "LLGuidanceConstraint":
        return LLGuidanceConstraint(self.grammar, self._m.deep_copy(), self._n, self._ended)

    def __repr__(self) -> str:
        return (f"LLGuidanceConstraint({self.grammar.kind}, tokens={self._n}, can_stop={self.can_stop()}, "
                f"finished={self.is_finished()})")


def _bit(i: int) -> int:
    """Bit ``i`` (0..31) of an int32 word, as a Python int that fits int32."""
    return -(1 << 31) if i == 31 else 1 << i


def fill_bitmasks(constraints: Sequence["LLGuidanceConstraint | None"], into: Tensor) -> None:
    """Row ``b`` of ``into`` (contiguous CPU int32 ``[>= B, W]``) = ``constraints[b]``'s next-token mask; rows of
    ``None`` (unconstrained sequences) are set to all-allowed. The rows are computed in llguidance's thread pool."""
    global _EXECUTOR
    if into.dtype != torch.int32 or into.device.type != "cpu" or into.dim() != 2 or not into.is_contiguous():
        raise ValueError(f"fill_bitmasks needs a contiguous CPU int32 [B, W] tensor, got {into.dtype} "
                         f"{tuple(into.shape)} on {into.device}")
    native, rest = [], []
    for b, c in enumerate(constraints):
        if c is None:
            into[b] = -1
        elif c._llw == c._w == into.shape[1] and not c._ended:
            native.append((c.matcher, b))
        else:
            rest.append((c, b))
    if native:
        if _EXECUTOR is None:
            with _LOCK:
                _EXECUTOR = _EXECUTOR or llguidance.LLExecutor()
        _EXECUTOR.unsafe_compute_mask_ptr(native, into.data_ptr(), into.shape[1] * 4, into.shape[0])
        for b, c in enumerate(constraints):
            if c is not None:
                c._raise_if_error("computing the next-token mask")
    for c, b in rest:
        c.fill_mask(into[b])


# ---------------------------------------------------------------------- compiling
def _compile_in_thread(lltok: LLTokenizer, grammar: str, timeout_s: float) -> tuple[LLMatcher, float] | None:
    """Build the matcher (and its first mask) in a daemon thread; None if it ran past ``timeout_s``.

    A timed-out build keeps running in the background until llguidance's own fuel limits stop it."""
    box: list = []

    def work() -> None:
        t0 = time.perf_counter()
        try:
            m = LLMatcher(lltok, grammar, log_level=0, limits=LLParserLimits(verbose_errors=False))
            if not m.is_error():
                m.compute_bitmask()  # warm the lexer for the first step; may hit a step limit -> error state
            box.append((m, time.perf_counter() - t0))
        except BaseException as ex:  # noqa: BLE001 - reported in the caller's thread
            box.append(ex)

    th = threading.Thread(target=work, name="leaplm-grammar-compile", daemon=True)
    th.start()
    th.join(timeout_s)
    if not box:
        return None
    if isinstance(box[0], BaseException):
        raise box[0]
    return box[0]


_PREFIX = {
    "json_schema": "cannot use this JSON schema for structured output",
    "json_object": "cannot build the JSON-object constraint",
    "regex": "invalid regex for structured output",
    "grammar": "invalid grammar for structured output",
}


def _llg_grammar(kind: str, text: str, whitespace_flexible: bool) -> str:
    if kind in ("json_schema", "json_object"):
        defaults: dict = {"whitespace_flexible": True} if whitespace_flexible else {
            "whitespace_flexible": False, "item_separator": _ITEM_SEP, "key_separator": _KEY_SEP}
        return LLMatcher.grammar_from_json_schema(text, defaults=defaults, overrides={"lenient": False})
    if kind == "regex":
        return LLMatcher.grammar_from_regex(text)
    from llguidance.gbnf_to_lark import any_to_lark

    try:
        lark = any_to_lark(text)
    except Exception as ex:  # noqa: BLE001 - the GBNF converter raises plain exceptions
        raise ValueError(f"not valid Lark, and not convertible from GBNF: {ex}") from None   # callers add the prefix
    return LLMatcher.grammar_from_lark(lark)


def _source(json_schema: Any, regex: str | None, grammar: str | None, json_object: bool) -> tuple[str, str]:
    """The one constraint asked for -> (kind, its text); raises ``InvalidConstraintError`` for none or several,
    a schema that is not JSON / not an object or boolean / ``false``, a regex or grammar that is not a string."""
    given = [k for k, v in (("json_schema", json_schema is not None), ("regex", regex is not None),
                            ("grammar", grammar is not None), ("json_object", bool(json_object))) if v]
    if len(given) != 1:
        raise InvalidConstraintError("give exactly one of json_schema, regex, grammar, json_object=True"
                                     + (f" (got {', '.join(given)})" if given else ""))
    kind = given[0]
    if kind == "json_schema":
        if isinstance(json_schema, (str, bytes)):
            try:
                json_schema = json.loads(json_schema)
            except ValueError as ex:
                raise InvalidConstraintError(f"{_PREFIX[kind]}: the schema is not valid JSON: {ex}") from None
        if json_schema is False:
            raise InvalidConstraintError(f"{_PREFIX[kind]}: Unsatisfiable schema: schema is false (matches nothing)")
        if json_schema is True:
            json_schema = {}
        if not isinstance(json_schema, dict):
            raise InvalidConstraintError(f"{_PREFIX[kind]}: a schema must be a JSON object or a boolean, "
                                         f"got {type(json_schema).__name__}")
        try:
            text = json.dumps(json_schema, ensure_ascii=False)
        except (TypeError, ValueError) as ex:
            raise InvalidConstraintError(f"{_PREFIX[kind]}: the schema is not JSON-serializable: {ex}") from None
    elif kind == "json_object":
        text = '{"type": "object"}'
    else:
        text = regex if kind == "regex" else grammar
        if not isinstance(text, str):
            raise InvalidConstraintError(f"{kind} must be a string, got {type(text).__name__}")
    return kind, text


def check_constraint(json_schema: Any = None, regex: str | None = None, grammar: str | None = None,
                     json_object: bool = False, *, whitespace_flexible: bool = False) -> None:
    """Raise ``InvalidConstraintError`` (the same message ``compile_constraint`` gives) for a constraint that is
    wrong whatever the tokenizer: not exactly one kind, a schema that is not JSON or uses a keyword llguidance does
    not implement, a regex or grammar that does not parse. Needs no tokenizer or model (milliseconds), so a caller
    can check before a slow model load; passing does not promise that ``compile_constraint`` succeeds (resource
    limits, the time limit and the tokenizer are checked only there)."""
    kind, text = _source(json_schema, regex, grammar, json_object)
    try:
        llg = _llg_grammar(kind, text, whitespace_flexible)
    except ValueError as ex:
        raise InvalidConstraintError(f"{_PREFIX[kind]}: {ex}") from None
    error = LLMatcher.validate_grammar(llg, None)
    if error:
        reason = _reason(error)
        hint = (" (llguidance does not implement these JSON-schema keywords; remove them)"
                if "Unimplemented keys" in reason else "")
        raise InvalidConstraintError(f"{_PREFIX[kind]}: {reason}{hint}")


def compile_constraint(tokenizer: Any, json_schema: Any = None, regex: str | None = None, grammar: str | None = None,
                       json_object: bool = False, *, vocab_size: int | None = None,
                       whitespace_flexible: bool = False, timeout_s: float = DEFAULT_TIMEOUT_S) -> LLGuidanceGrammar:
    """Compile exactly one of ``json_schema`` (dict, bool or JSON text), ``regex``, ``grammar`` (Lark or GBNF) or
    ``json_object=True`` (any JSON object) for ``tokenizer`` and a model with ``vocab_size`` logits.

    Raises ``InvalidConstraintError`` (bad or unsupported input, unsatisfiable, over the limits or ``timeout_s``),
    ``UnsupportedModelError`` (a tokenizer llguidance cannot read)."""
    kind, text = _source(json_schema, regex, grammar, json_object)
    if not timeout_s > 0:
        raise InvalidConstraintError(f"timeout_s must be > 0, got {timeout_s!r}")
    v = int(vocab_size or tokenizer.vocab_size)
    key = (v, kind, text, bool(whitespace_flexible))

    e = _entry(tokenizer)
    with _LOCK:
        hit = e.grammars.get(key)
        if hit is not None:
            e.grammars.move_to_end(key)
    if hit is not None:
        if isinstance(hit, InvalidConstraintError):
            raise InvalidConstraintError(str(hit))
        return hit

    lltok = llguidance_tokenizer(tokenizer, v)
    result: LLGuidanceGrammar | InvalidConstraintError
    try:
        llg = _llg_grammar(kind, text, whitespace_flexible)
    except ValueError as ex:
        result = InvalidConstraintError(f"{_PREFIX[kind]}: {ex}")
    else:
        built = _compile_in_thread(lltok, llg, timeout_s)
        if built is None:
            result = InvalidConstraintError(f"{_PREFIX[kind]}: compiling it took longer than {timeout_s:g} s; "
                                            "simplify it (fewer alternatives, smaller repetition counts)")
        elif built[0].is_error():
            reason = _reason(built[0].get_error())
            hint = (" (llguidance does not implement these JSON-schema keywords; remove them)"
                    if "Unimplemented keys" in reason else "")
            result = InvalidConstraintError(f"{_PREFIX[kind]}: {reason}{hint}")
        else:
            result = LLGuidanceGrammar(kind, text, built[0], lltok, v, built[1])
    with _LOCK:
        e.grammars[key] = result
        while len(e.grammars) > CACHE_SIZE:
            e.grammars.popitem(last=False)
    if isinstance(result, InvalidConstraintError):
        raise InvalidConstraintError(str(result))
    return result


def clear_cache() -> None:
    """Forget every cached LLTokenizer and compiled grammar."""
    with _LOCK:
        _ENTRIES.clear()
