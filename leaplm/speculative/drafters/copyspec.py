"""CopySpec (Dumitru et al., 2025, "CopySpec: Accelerating LLMs with Speculative Copy-and-Paste
Without Compromising Quality"): when the context's last ``gamma`` tokens occurred before, propose the
block of tokens that followed that occurrence. Searched in the row's current context *and* in a
bounded store of what earlier requests served by this drafter instance contained (earlier chat turns,
earlier prompts and answers of a session), so a request that repeats text from an earlier one copies
it. Deterministic (q is one-hot), so lossless under greedy and under sampling.

Index: a polynomial rolling hash (mod the Mersenne prime 2**61 - 1) over the last ``gamma`` tokens,
updated in O(1) per new token. Hash chains as in zlib: a dict hash -> end position (exclusive) of the
latest occurrence of that gamma-gram that has at least one token after it, plus, per position, the
end of the previous occurrence with the same hash. One dict + chain per row (its current context,
extended incrementally as the context grows) and one for the shared store. Candidates are checked
token by token, so a hash collision never yields a draft.

Store: a ring buffer of at most ``max_store_tokens`` token ids and their chain links (oldest evicted
first, O(1) per token; the dict entry of a gram whose first token is evicted is dropped with it, and a
chain walk stops at the first evicted link). A row's context goes to the store when the row is
reset (a new request takes it) or when a call's context no longer extends the one seen before on
that row. Requests are kept as separate segments: a copy never runs from the
end of one request into the next. Only what the drafter saw is stored (the context of the row's last
``propose``; a request that never reached a proposal stores nothing).

Choice of candidate, per proposal: up to ``_MAX_CHAIN`` (16) occurrences of the last gamma-gram are
walked in each place, most recent first (current context, then store), and the one that wins is
1. the one whose *preceding* text agrees with the context for the most tokens (counted up to
   ``_MAX_AGREE`` = 64; the classic longest-match rule: a copy whose lead-in matches more of what
   the model just wrote is more likely to go on matching — this is what lets a repeated request find
   the aligned spot in its earlier answer rather than the latest, unrelated use of a common 3-gram);
2. then the one with the most tokens really following it (capped at ``k``);
3. then the current context over the store, then the most recent.
The cost is bounded per proposal (at most 32 candidates x 64 compares), not per token.
A current-context copy that runs into the end of the context continues as an overlapping copy
(LZ77-style: the text repeats with period ``len(context) - end``), so a loop is drafted up to ``k``.

Extension check: a call's context counts as extending the row's previous one when it is at least as
long and agrees on its first token, middle token and last ``gamma`` tokens (O(gamma), not a scan).
A mistaken "extends" only makes drafts worse, never the output: every draft is verified.

Knobs: ``num_draft`` (default 10), ``gamma`` (default 3), ``max_store_tokens`` (default 1_000_000;
0 disables the cross-request store). Defaults:

* ``gamma = 3``, the paper's setting: a 3-token match is specific enough that false drafts are rare
  (on SmolLM2, PLD lost speed when it fell back to 1-grams, docs/benchmarks.md) yet short enough to
  catch short re-quotes.
* ``num_draft = 10``: copy hits are long verbatim runs (re-quoted code, a repeated answer), so more
  than PLD's 8 pays; but the verify pass is ``1 + max draft`` wide for the whole batch, and on CPU —
  a first-class target — a small model's pass turns compute-bound somewhere in the 10..20 range, and
  a copy that diverges early wastes the rest of the width. Raise it on GPUs, where a 17-wide pass of a
  small batch costs about what a 1-wide one does.
* ``max_store_tokens = 1_000_000``: a long working session of chats and documents. Measured cost:
  ~140 bytes per stored token when all grams are distinct (~140 MB at the default, less on real text
  where grams repeat) and ~2 us of CPU per token seen (row index + store), negligible next to a
  target pass. Lower it where memory is tight.

Privacy note: the store is shared by every request this instance serves. Outputs never depend on it
(drafts are verified), but latency can show whether a text was seen before; use one instance per
tenant, or ``max_store_tokens=0``, where that matters.
"""
from __future__ import annotations

from array import array
from bisect import bisect_right
from typing import Sequence

from ...errors import InvalidParamsError
from .base import Draft, Drafter, int_knob

_P = (1 << 61) - 1        # Mersenne prime modulus of the rolling hash
_B = 1_000_003            # base (> any vocabulary size, so distinct grams of one token never collide)
_MAX_GAMMA = 64
_MAX_CHAIN = 16           # occurrences examined per place (context, store) per proposal
_MAX_AGREE = 64           # how far back an occurrence's lead-in is compared with the context


class _Row:
    """One row's current context: own copy of the tokens, gram heads and chain, hash of the last gram."""

    __slots__ = ("tokens", "head", "prev", "h")

    def __init__(self) -> None:
        self.tokens: list[int] = []
        self.head: dict[int, int] = {}   # hash -> latest end (exclusive) with a token after it
        self.prev: list[int] = []        # prev[e]: previous end with the same hash as the gram ending at e, or -1
        self.h = 0                       # hash of tokens[-gamma:] (of all tokens while fewer than gamma)


class CopySpec(Drafter):
    name = "copyspec"

    def __init__(self, num_draft: int = 10, gamma: int = 3, max_store_tokens: int = 1_000_000) -> None:
        self.num_draft = int_knob("copyspec", "num_draft", num_draft, 1)
        self.gamma = int_knob("copyspec", "gamma", gamma, 1)
        if self.gamma > _MAX_GAMMA:
            raise InvalidParamsError(f"copyspec gamma must be <= {_MAX_GAMMA} (the match length, in tokens), "
                                     f"got {gamma}")
        self.max_store_tokens = int_knob("copyspec", "max_store_tokens", max_store_tokens, 0, " (0 disables the store)")
        if 0 < self.max_store_tokens <= self.gamma:
            raise InvalidParamsError(
                f"copyspec max_store_tokens must be 0 (no store) or > gamma={self.gamma} (room for one match "
                f"and a token to copy), got {max_store_tokens}")
        self._out = pow(_B, self.gamma - 1, _P)  # weight of the token leaving the window
        self._rows: dict[int, _Row] = {}
        # store: absolute position p lives at slot p % cap while p >= _total - cap
        self._ring = array("q")          # token at p
        self._links = array("q")         # chain link of the gram ending at p (as _Row.prev)
        self._total = 0
        self._store_head: dict[int, int] = {}
        self._seg_ends: list[int] = []   # absolute end of each stored request, increasing
        self._seg_head = 0               # _seg_ends[:_seg_head] are fully evicted

    # ------------------------------------------------------------------ hashing
    def _push(self, h: int, filled: int, incoming: int, outgoing: int) -> int:
        """Hash after appending ``incoming`` to a window holding ``filled`` tokens (``outgoing`` leaves if full)."""
        if filled >= self.gamma:
            h -= outgoing * self._out
        return (h * _B + incoming) % _P

    def _hash(self, gram: Sequence[int]) -> int:
        h = 0
        for t in gram:
            h = (h * _B + t) % _P
        return h

    # ------------------------------------------------------------------ current context
    def _extends(self, seen: list[int], context: Sequence[int]) -> bool:
        n = len(seen)
        if n == 0:
            return True
        if len(context) < n or context[0] != seen[0] or context[n // 2] != seen[n // 2]:
            return False
        tail = max(0, n - self.gamma)
        return list(context[tail:n]) == seen[tail:]

    def _extend(self, row: int, context: Sequence[int]) -> _Row:
        st = self._rows.get(row)
        if st is not None and not self._extends(st.tokens, context):
            self._flush(row)
            st = None
        if st is None:
            st = self._rows[row] = _Row()
        tokens, head, prev, g = st.tokens, st.head, st.prev, self.gamma
        m, h = len(tokens), st.h
        for t in context[m:]:
            if m >= g:  # the gram ending at m now has a token after it
                prev.append(head.get(h, -1))
                head[h] = m
            else:
                prev.append(-1)
            h = self._push(h, m, t, tokens[m - g] if m >= g else 0)
            tokens.append(t)
            m += 1
        st.h = h
        return st

    # ------------------------------------------------------------------ store
    @property
    def store_size(self) -> int:
        """Tokens held by the cross-request store (never more than ``max_store_tokens``)."""
        return min(self._total, self.max_store_tokens)

    def _flush(self, row: int) -> None:
        st = self._rows.pop(row, None)
        if st is not None and self.max_store_tokens and len(st.tokens) > self.gamma:
            self._store(st.tokens)

    def _store(self, tokens: list[int]) -> None:
        cap, g, ring, links, head = self.max_store_tokens, self.gamma, self._ring, self._links, self._store_head
        tokens = tokens[-cap:]
        base = self._total
        h = 0
        for j, t in enumerate(tokens):
            p = base + j
            link = -1
            if j >= g:  # the gram ending at p (exclusive) is followed by tokens[j]
                link = head.get(h, -1)
                head[h] = p
            if p >= cap:
                self._evict(p - cap)
                ring[p % cap], links[p % cap] = t, link
            else:
                ring.append(t)
                links.append(link)
            h = self._push(h, j, t, tokens[j - g] if j >= g else 0)
        self._total = base + len(tokens)
        self._seg_ends.append(self._total)
        live = self._total - cap
        while self._seg_ends[self._seg_head] <= live:
            self._seg_head += 1
        if self._seg_head > 64 and self._seg_head * 2 > len(self._seg_ends):
            del self._seg_ends[: self._seg_head]
            self._seg_head = 0

    def _evict(self, q: int) -> None:
        """Position ``q`` is about to be overwritten: drop the gram starting there if it heads its chain."""
        cap, g = self.max_store_tokens, self.gamma
        h = self._hash([self._ring[(q + i) % cap] for i in range(g)])
        if self._store_head.get(h) == q + g:
            del self._store_head[h]

    # ------------------------------------------------------------------ drafting
    def propose(self, row: int, context: Sequence[int], k: int) -> Draft:
        st = self._extend(row, context)
        tokens, g = st.tokens, self.gamma
        n = len(tokens)
        if k < 1 or n < g:
            return Draft([])
        reach = min(_MAX_AGREE, n)
        best = (0, 0)  # (agreement, continuation)
        pick = None
        e = st.head.get(st.h, -1)
        for _ in range(_MAX_CHAIN):  # current context, most recent first
            if e < g:
                break
            agree = 0
            while agree < reach and agree < e and tokens[e - 1 - agree] == tokens[n - 1 - agree]:
                agree += 1
            score = (agree, min(n - e, k))
            if agree >= g and score > best:  # agreeing on the whole gram also rules out hash collisions
                best, pick = score, ("context", e, 0)
            e = st.prev[e]
        cap = self.max_store_tokens
        e = self._store_head.get(st.h, -1) if cap else -1
        live = self._total - cap
        ring = self._ring
        for _ in range(_MAX_CHAIN):  # then the store, most recent first
            if e < 0 or e - g < live:
                break
            i = bisect_right(self._seg_ends, e - 1, lo=self._seg_head)
            start = max(live, self._seg_ends[i - 1] if i > 0 else 0)
            agree, lead = 0, min(reach, e - start)
            while agree < lead and ring[(e - 1 - agree) % cap] == tokens[n - 1 - agree]:
                agree += 1
            score = (agree, min(self._seg_ends[i] - e, k))
            if agree >= g and score > best:
                best, pick = score, ("store", e, score[1])
            e = self._links[e % cap]
        if pick is None:
            return Draft([])
        where, e, length = pick
        if where == "store":
            return Draft([ring[p % cap] for p in range(e, e + length)])
        out: list[int] = []
        for i in range(k):  # overlapping copy: past the context's end, copy what was just copied
            src = e + i
            out.append(tokens[src] if src < n else out[src - n])
        return Draft(out)

    def reset(self, row: int) -> None:
        """The row's context goes to the shared store (later requests may copy from it); the row restarts."""
        self._flush(row)
