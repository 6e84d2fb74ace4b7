"""Lookahead decoding (Fu et al. 2024, "Break the Sequential Dependency of LLM Inference Using Lookahead
Decoding"): Jacobi iteration over a window of guessed future tokens, run inside the verification pass,
harvests n-grams that later verification passes check.

Per row, every target pass carries two branches in one token tree (``parents``, see ``speculative/tree.py``):

- **Lookahead branch** (Jacobi): a window of ``W = window`` guesses ``g_0 .. g_{W-1}`` for the positions
  ``L .. L + W - 1`` right after the context (``L = len(context)``: the context ends with the pending
  token, at ``L - 1``). They are fed as one chain hanging off the root (depths 1..W). The engine hands
  the target's argmax after every fed token to ``observe``: the one after the root, ``y_0``, is the true
  next token (greedy); the one after ``g_i``, ``y_{i+1}``, is the Jacobi update of position ``L + i + 1``
  (the target's next token given the guessed prefix). ``y_0 .. y_W`` is the next level of the Jacobi
  trajectory. At the next ``propose`` the context has grown by ``s >= 1`` (the engine committed the
  accepted tokens and the target's own token): the new window is ``y_s .. y_W`` (the updates for the
  positions still ahead), padded at its end with ``s - 1`` fresh guesses. Positions are tracked as
  absolute token positions, so whatever was committed (the lookahead chain itself, a verification
  candidate or nothing) the surviving guesses stay at their positions.
- **Verification branch**: the n-gram pool (below) maps a token to up to ``G = max_candidates`` n-grams
  starting with it; those starting with the context's last token give up to G candidate
  continuations of ``N - 1`` tokens (``N = ngram``), most recent first. They are merged into a trie
  under the root (shared prefixes share nodes; siblings are distinct).

The tree is the trie (placed first: it has priority on the node budget ``min(k, num_draft)``) and then
the lookahead chain. A guess that equals an existing node under the same parent reuses that node (the
chain runs through the trie until it diverges), so siblings stay distinct and the chain still feeds
exactly ``g_0 .. g_i`` before ``g_i``; what it shares costs no budget. When the budget runs out the
chain is cut (its unfed guesses wait for the next pass). Any node may be accepted, lookahead nodes
included (a converged Jacobi window is accepted as it stands).

N-gram harvesting (as the paper's 2-D window, whose columns are diagonals in position): the fed
windows of the last ``N - 1`` passes (this one's included) are the *levels* (tokens at absolute
positions), and the current pass's outputs are the newest level. An n-gram is read along the diagonal: level ``j``'s token
at position ``p``, level ``j + 1``'s at ``p + 1``, ..., the outputs' at ``p + N - 1`` (each token on the
diagonal was produced by the target reading its predecessor on it, as a guess or as an output). Every
pass adds up to ``W`` such n-grams once ``N - 1`` levels exist (after ``N - 2`` warm-up passes). With
``context_ngrams`` the committed context's own n-grams (prompt and output, ingested as the context
grows) are added too, so text that repeats the prompt is caught from the first step.

Pool (state shared by all rows and requests, so a later request starts warm): ``pool[first token]`` is
an LRU of at most G distinct tails (the ``N - 1`` tokens after it); re-adding a tail makes it the most
recent. At most ``pool_size`` n-grams in all: past it the least recently updated first token loses
its oldest tail. Per row only the window, the ``N - 2`` previous levels and the last draft are kept
(``reset`` forgets them, not the pool).

Fresh guesses (the first window of a request, padding after a shift): the continuation the pool
knows for the preceding guess (most recent tail), else a token drawn at random from the context
(the paper initialises the window with random prompt tokens); the draw is seeded by ``seed``, the
context length and its last token, so drafts depend only on the context and the drafter's state.

Differences from the paper: one chain per pass. The paper feeds its whole 2-D window (``N - 1`` levels of
``W`` tokens) every pass under a custom attention mask in which a token's position is not its depth in a
tree; this engine cannot express that (a node's position derives from its depth). Feeding only the newest level as a
chain is plain Jacobi iteration over the window (each update sees the whole guessed prefix rather than
one token per earlier level), and the older levels are kept as history, so the n-grams are still
collected along the same diagonals. Verification is the engine's: greedy follows the target's argmax
down the tree; sampling uses recursive rejection over siblings. Drafts are deterministic given the
context and the drafter's state (one-hot q, ``probs=None``), so both are lossless.

Shapes: ``propose(row, context, k) -> Draft`` with ``len(tokens) <= min(k, num_draft)``, ``parents``
(``-1`` under the context's last token, ``parents[i] < i``) or None when the nodes form one chain.
``observe_topk = 1``: ``observe(row, fed, topk [len(fed), 1])``, ``fed`` = the pending token(s) then
every draft node in order; a pass whose fed nodes are not this drafter's last draft (a grammar pruned
it) updates nothing, and the window simply advances unchanged.

Knobs (CPU-sane defaults; the reference implementation's GPU defaults are ``W = 7, N = 5, G = 7``, and
the paper goes wider for 7B+ models on GPUs):

- ``window=4`` (W): guesses fed per pass (lookahead nodes).
- ``ngram=4`` (N): n-gram size; verification candidates are ``N - 1`` tokens deep; ``N - 1`` levels kept.
- ``max_candidates=3`` (G): n-grams kept per first token and verified per pass (0: pure Jacobi).
- ``num_draft=16``: node budget per pass (trie <= G * (N - 1) = 9 nodes, + W = 13 by default).
- ``pool_size=65536``: most n-grams kept in all (about 0.4 kB each: under 30 MB at the cap).
- ``context_ngrams=True``: also pool the committed context's n-grams.
- ``seed=0``: fresh-guess draws.

On a CPU a verification pass costs more per node than on a GPU (SmolLM2-135M: about 4x a one-token
pass at 64 nodes, so roughly 1.5x at the default's at most 13): the defaults keep the tree small (on
SmolLM2 on three chat prompts a pass fed about 6.4 nodes on average: nearly the full window plus about 3
candidate nodes). Raise ``window``, ``max_candidates`` and ``num_draft`` together on a GPU, where a
wide pass costs about what a narrow one does.
"""
from __future__ import annotations

import random
from collections import OrderedDict, deque
from dataclasses import dataclass, field
from typing import Sequence

from torch import Tensor

from ...errors import InvalidParamsError
from .base import Draft, Drafter, int_knob


@dataclass
class _Level:
    """Tokens at absolute positions ``start, start + 1, ...``."""
    start: int
    tokens: list[int]

    def at(self, position: int) -> int | None:
        i = position - self.start
        return self.tokens[i] if 0 <= i < len(self.tokens) else None


@dataclass
class _Row:
    start: int = -1                  # len(context) at the last propose: the position of guesses[0]
    root: int = -1                   # context[start - 1]: the token the last draft hangs off
    guesses: list[int] = field(default_factory=list)   # current guesses for positions start, start + 1, ...
    levels: deque = field(default_factory=deque)        # earlier fed windows (_Level), oldest first
    tokens: list[int] | None = None  # the last draft's nodes (None: no pass outstanding)
    chain: list[int] = field(default_factory=list)      # node index of each fed guess g_0, g_1, ...
    counted: int = 0                 # context tokens whose n-grams are in the pool
    last_token: int = -1             # context[counted - 1], to notice a foreign context


class Lookahead(Drafter):
    name = "lookahead"
    observe_topk = 1

    def __init__(self, window: int = 4, ngram: int = 4, max_candidates: int = 3, num_draft: int = 16,
                 pool_size: int = 65536, context_ngrams: bool = True, seed: int = 0) -> None:
        self.window = int_knob("lookahead", "window", window, 1)
        self.ngram = int_knob("lookahead", "ngram", ngram, 2)
        self.max_candidates = int_knob("lookahead", "max_candidates", max_candidates, 0)
        self.num_draft = int_knob("lookahead", "num_draft", num_draft, 1)
        self.pool_size = int_knob("lookahead", "pool_size", pool_size, 1)
        self.seed = int_knob("lookahead", "seed", seed, 0)
        context_ngrams = {"true": True, "false": False}.get(context_ngrams, context_ngrams)
        if not isinstance(context_ngrams, bool):
            raise InvalidParamsError(f"lookahead context_ngrams must be true or false, got {context_ngrams!r}")
        self.context_ngrams = context_ngrams
        # first token -> its tails (N - 1 tokens), least recent first; first tokens least recently updated first
        self.pool: OrderedDict[int, OrderedDict[tuple[int, ...], None]] = OrderedDict()
        self.pool_count = 0
        self._rows: dict[int, _Row] = {}

    # ------------------------------------------------------------------ the n-gram pool
    def add_ngram(self, gram: Sequence[int]) -> None:
        """Pool an n-gram (its first token keys it; re-adding makes it the most recent)."""
        if self.max_candidates == 0:
            return
        key, tail = int(gram[0]), tuple(int(t) for t in gram[1:])
        tails = self.pool.get(key)
        if tails is None:
            tails = self.pool[key] = OrderedDict()
        else:
            self.pool.move_to_end(key)
        if tail in tails:
            tails.move_to_end(tail)
            return
        tails[tail] = None
        self.pool_count += 1
        if len(tails) > self.max_candidates:
            tails.popitem(last=False)
            self.pool_count -= 1
        while self.pool_count > self.pool_size:
            oldest, old_tails = next(iter(self.pool.items()))
            old_tails.popitem(last=False)
            self.pool_count -= 1
            if not old_tails:
                del self.pool[oldest]

    def candidates(self, token: int) -> list[tuple[int, ...]]:
        """The pooled tails after ``token``, most recent first (at most ``max_candidates``)."""
        tails = self.pool.get(int(token))
        return list(reversed(tails)) if tails else []

    def _ingest(self, st: _Row, context: Sequence[int]) -> None:
        """Pool the n-grams of the context that end at tokens not ingested yet."""
        n = len(context)
        if st.counted > n or (st.counted and int(context[st.counted - 1]) != st.last_token):
            st.counted = 0                    # not the context we were following: a new one
        if self.context_ngrams:
            for end in range(max(st.counted, self.ngram), n + 1):
                self.add_ngram(context[end - self.ngram: end])
        if n:
            st.counted, st.last_token = n, int(context[n - 1])

    def harvest(self, levels: Sequence[_Level], outputs: _Level) -> int:
        """Pool the n-grams along the diagonals of ``levels`` (``N - 1`` fed windows, oldest first) and the
        newest ``outputs``: level j's token at position p + j for every p of the oldest level. Returns how
        many were complete (every level holds its position)."""
        chain = list(levels) + [outputs]
        if len(chain) != self.ngram:
            return 0
        found = 0
        first = chain[0]
        for p in range(first.start, first.start + len(first.tokens)):
            gram = [level.at(p + j) for j, level in enumerate(chain)]
            if None not in gram:
                self.add_ngram(gram)
                found += 1
        return found

    # ------------------------------------------------------------------ the Jacobi window
    def _fresh(self, context: Sequence[int], prev: int, n: int, rng: random.Random) -> list[int]:
        """``n`` new guesses after ``prev``: the pool's most recent continuation, else random context tokens."""
        out: list[int] = []
        while len(out) < n:
            tails = self.candidates(prev)
            if tails:
                out.extend(tails[0][: n - len(out)])
            else:
                out.append(int(context[rng.randrange(len(context))]))
            prev = out[-1]
        return out

    def _advance(self, st: _Row, context: Sequence[int]) -> None:
        """Move the row's guesses to the positions after ``context`` (see the module docstring)."""
        n = len(context)
        rng = random.Random((self.seed * 1_000_003 + n) * 1_000_003 + int(context[-1]))
        follows = st.start > 0 and n >= st.start and int(context[st.start - 1]) == st.root
        if not follows:                       # a new request (or a foreign context): a fresh window
            st.levels.clear()
            st.guesses = self._fresh(context, int(context[-1]), self.window, rng)
        else:
            kept = st.guesses[n - st.start:][: self.window]
            prev = kept[-1] if kept else int(context[-1])
            st.guesses = kept + self._fresh(context, prev, self.window - len(kept), rng)
        st.start, st.root = n, int(context[-1])

    # ------------------------------------------------------------------ drafting
    def propose(self, row: int, context: Sequence[int], k: int) -> Draft:
        st = self._rows.get(row)
        if st is None:
            st = self._rows[row] = _Row()
        st.tokens, st.chain = None, []
        if not context:
            return Draft([])
        self._ingest(st, context)
        self._advance(st, context)
        k = min(k, self.num_draft)
        tokens: list[int] = []
        parents: list[int] = []
        node_of: dict[tuple[int, int], int] = {}      # (parent, token) -> node: siblings stay distinct

        def node(parent: int, token: int) -> int | None:
            found = node_of.get((parent, token))
            if found is None and len(tokens) < k:
                found = node_of[(parent, token)] = len(tokens)
                tokens.append(token)
                parents.append(parent)
            return found

        for tail in self.candidates(context[-1])[: self.max_candidates]:   # verification branch (trie)
            parent = -1
            for token in tail:
                parent = node(parent, token)
                if parent is None:
                    break
        parent = -1
        for guess in st.guesses:                                            # lookahead branch (chain)
            parent = node(parent, guess)
            if parent is None:
                break
            st.chain.append(parent)
        st.tokens = tokens
        if not tokens:
            return Draft([])
        if parents == list(range(-1, len(tokens) - 1)):
            return Draft(tokens)
        return Draft(tokens, parents=parents)

    def observe(self, row: int, fed: Sequence[int], topk: Tensor) -> None:
        st = self._rows.get(row)
        if st is None or st.tokens is None:
            return                                    # a prefill, or no draft of ours outstanding
        n = len(st.tokens)
        fed = [int(t) for t in fed]
        if len(fed) < n + 1 or fed[len(fed) - n:] != st.tokens or fed[len(fed) - n - 1] != st.root:
            st.tokens = None                          # the engine fed something else (a grammar pruned it)
            return
        best = topk[len(fed) - n - 1:, 0].tolist()    # argmax after the root, then after every node
        outputs = [int(best[0])] + [int(best[1 + i]) for i in st.chain]   # y_0 .. y_len(chain)
        fed_window = _Level(st.start, [st.tokens[i] for i in st.chain])
        if fed_window.tokens:
            if len(st.levels) >= self.ngram - 2:
                levels = list(st.levels)[len(st.levels) - (self.ngram - 2):] + [fed_window]
                self.harvest(levels, _Level(st.start, outputs))
            st.levels.append(fed_window)
            while len(st.levels) > max(self.ngram - 2, 0):
                st.levels.popleft()
        # the Jacobi update: outputs for the fed positions (and one past them), unfed guesses stay
        st.guesses = outputs + st.guesses[len(outputs):]
        st.tokens = None

    def reset(self, row: int) -> None:
        self._rows.pop(row, None)
