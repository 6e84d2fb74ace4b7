"""REST (He et al., 2023, "REST: Retrieval-Based Speculative Decoding"): draft from a datastore of text.
The context's longest suffix (``max_match`` down to ``min_match`` tokens) that occurs in the datastore
is looked up, up to ``max_occurrences`` of its occurrences are taken with the ``depth`` tokens that
follow each, and the continuations are merged into a trie whose nodes count how many occurrences
pass through them. The draft is the ``k`` heaviest nodes (a node only with its parent: best-first
with a heap), a **token tree** in the contract of ``base.py``: ``Draft(tokens, parents=...)``, nodes
in pick order (``parents[i] < i``, ``-1`` under the context's last token, siblings distinct). When
the picked nodes form one path the draft is a plain chain (``parents=None``); ``tree=False`` always
drafts the chain of the heaviest child at each step. Deterministic (one-hot q, ``probs=None``), so
lossless under greedy and under sampling; every node is verified.

Datastore (``Datastore``): documents (token-id sequences) concatenated into one int32 array, each
followed by its own separator ``-(d + 1)`` (negative, so never equal to a token id, and distinct, so
no match and no continuation spans two documents). Index: the suffix array of that array, built by
prefix doubling in numpy (Manber-Myers ranks, only still-tied suffixes re-sorted each round as in
Larsson-Sadakane; about 1 s per million tokens on one core), 12 bytes per token with the array and
the byte keys. Lookup: binary search over the suffix array (``bisect`` on big-endian byte keys, so a
comparison is one ``memcmp``); as an occurrence of a suffix implies one of every shorter suffix, the
longest matching length is itself found by binary search: O(log(max_match) * log(N) * max_match).
When a suffix occurs more than ``max_occurrences`` times, occurrences are taken at an even stride
over its suffix-array range; the range is sorted by what follows, so the sample keeps the
continuations' proportions.

Corpus (``corpus``): a text file, a folder (searched recursively for text files: ``_TEXT_SUFFIXES``;
hidden entries skipped), a list of those, token-id lists (one per document), or a ``Datastore``
(shared between drafters). A file is one document; a ``.jsonl`` file has one per line (the string
values of each JSON record, joined by newlines). Paths are checked when the drafter is built; text
is tokenized with the target's tokenizer in ``bind(target_model, target_tokenizer)`` (no special
tokens; a rich progress bar on stderr for large corpora), token ids are indexed at once. ``bind``
refuses token ids beyond the target's vocabulary.

Own context (``include_context=True``): the request's prompt + output is searched too, as prompt
lookup does: of the ``_CTX_CHAIN`` latest earlier occurrences of its last ``min_match`` tokens (a dict
gram -> latest end plus a per-position link to the previous end, extended incrementally: O(1) per new
token), the ``_CTX_CANDIDATES`` that agree with the context furthest back (up to ``max_match``
tokens), then the most recent; a copy that runs into the end of the context continues periodically
(LZ77-style), so loops are drafted. They outweigh the datastore in the trie: the best one (prompt
lookup's pick) outweighs everything else together, so its path is picked first and the draft holds
prompt lookup's first ``min(depth, k)`` tokens; the others each outweigh all datastore occurrences.

Knobs: ``num_draft`` (node budget, default 24; the target's verify pass is ``1 + nodes`` wide, cheap
on a GPU, not on a CPU: lower it there), ``max_match`` (16) / ``min_match`` (2), ``max_occurrences``
(64), ``depth`` (10, the longest path), ``tree`` (True), ``include_context`` (True), ``progress`` (True).
Ties between equally heavy nodes go to the node created first (the own context's, then suffix-array
order).
``continuations(row, context)`` returns the weighted continuations the trie is built from (``rasd``
prunes and fuses them with a draft model's tree).

Shapes: ``propose(row, context, k) -> Draft``: ``len(tokens) <= k``, ``parents`` ``[len(tokens)]``
or None. ``Datastore.lookup(context, ...) -> (match_len, continuations)``, each continuation a list
of at most ``depth`` token ids.
"""
from __future__ import annotations

import heapq
import json
import os
from bisect import bisect_left, bisect_right
from pathlib import Path
from typing import Iterable, Sequence

import numpy as np

from ...errors import InvalidParamsError
from .base import Draft, Drafter, int_knob

_TEXT_SUFFIXES = frozenset({
    ".txt", ".md", ".markdown", ".rst", ".tex", ".json", ".jsonl", ".csv", ".tsv", ".html", ".htm", ".xml",
    ".yaml", ".yml", ".toml", ".ini", ".cfg", ".py", ".pyi", ".ipynb", ".c", ".h", ".cc", ".cpp", ".hpp",
    ".cu", ".java", ".kt", ".scala", ".go", ".rs", ".js", ".jsx", ".ts", ".tsx", ".rb", ".php", ".swift",
    ".cs", ".sh", ".bash", ".sql", ".r", ".lua", ".pl", ".hs", ".ml", ".css", ".scss", ".vue", ".jl",
})
_CTX_CANDIDATES = 4       # occurrences of the context's own last gram used per proposal
_CTX_CHAIN = 16           # how many of them are examined (most recent first)
_PROGRESS_BYTES = 4 << 20  # show a progress bar from this much text ...
_PROGRESS_TOKENS = 2_000_000  # ... or this many tokens to index
_TOKENIZE_BATCH = 1 << 20  # characters of text per tokenizer call


# ---------------------------------------------------------------------- suffix array
def suffix_array(tokens: Sequence[int] | np.ndarray) -> np.ndarray:
    """Start positions of the suffixes of ``tokens`` in lexicographic order (a shorter suffix first
    when it is a prefix of a longer one), int64 ``[len(tokens)]``.

    Prefix doubling: ``rank[p]`` is the suffix-array slot where the group of suffixes sharing
    ``p``'s first ``h`` tokens starts; a round sorts each group of ``h``-ties by the rank ``h``
    positions later, giving the order on ``2h`` tokens. Suffixes alone in their group are final and
    leave the work set, so a round costs O(m log m) for the m suffixes still tied.
    """
    a = np.asarray(tokens)
    n = len(a)
    if n == 0:
        return np.zeros(0, dtype=np.int64)
    sa = np.argsort(a, kind="stable").astype(np.int64)
    rank = np.empty(n, dtype=np.int64)
    keys = a[sa]
    rank[sa] = _group_heads(np.arange(n, dtype=np.int64), np.flatnonzero(keys[1:] != keys[:-1]) + 1, n)
    active = np.flatnonzero(_tied(keys))  # slots of suffixes still tied with a neighbour, ascending
    h = 1
    while active.size and h < n:
        pos = sa[active]
        nxt = pos + h
        second = np.where(nxt < n, rank[np.minimum(nxt, n - 1)], -1)
        key = rank[pos] * (n + 1) + (second + 1)   # < (n + 1) ** 2: fits int64 for n < 3e9
        order = np.argsort(key, kind="stable")
        pos, key = pos[order], key[order]
        starts = np.flatnonzero(key[1:] != key[:-1]) + 1
        sa[active] = pos
        rank[pos] = _group_heads(active, starts, active.size)
        active = active[_tied(key)]
        h *= 2
    return sa


def _group_heads(slots: np.ndarray, starts: np.ndarray, m: int) -> np.ndarray:
    """For ``m`` sorted items in ``slots`` whose groups begin at indices ``starts`` (0 implied): each
    item's group-start slot."""
    first = np.zeros(m, dtype=bool)
    first[0] = True
    first[starts] = True
    return np.maximum.accumulate(np.where(first, slots, slots[0]))


def _tied(sorted_keys: np.ndarray) -> np.ndarray:
    """Mask of the items of a sorted key array that equal a neighbour."""
    same = sorted_keys[1:] == sorted_keys[:-1]
    tied = np.zeros(len(sorted_keys), dtype=bool)
    tied[1:] |= same
    tied[:-1] |= same
    return tied


class Datastore:
    """Token-id documents and the suffix array over them (see the module docstring)."""

    def __init__(self, documents: Iterable[Sequence[int]], progress: bool = True) -> None:
        parts: list[np.ndarray] = []
        for d, doc in enumerate(documents):
            if d >= 2 ** 31 - 1:
                raise InvalidParamsError("retrieval corpus has too many documents (2**31 - 1 at most)")
            arr = np.asarray(doc.tolist() if hasattr(doc, "tolist") and not isinstance(doc, np.ndarray) else doc)
            if arr.size == 0:
                arr = arr.reshape(0).astype(np.int64)
            if arr.ndim != 1 or (arr.size and not np.issubdtype(arr.dtype, np.integer)):
                raise InvalidParamsError(f"retrieval corpus document {d} is not a list of token ids")
            if arr.size and (arr.min() < 0 or arr.max() >= 2 ** 31):
                raise InvalidParamsError(f"retrieval corpus document {d} holds a token id outside [0, 2**31): "
                                         f"{int(arr.min()) if arr.min() < 0 else int(arr.max())}")
            parts.append(arr.astype(np.int32))
            parts.append(np.array([-(d + 1)], dtype=np.int32))
        self.num_documents = len(parts) // 2
        self.tokens = np.concatenate(parts) if parts else np.zeros(0, dtype=np.int32)
        self.num_tokens = len(self.tokens) - self.num_documents   # separators not counted
        self.max_token = int(self.tokens.max()) if self.num_tokens else -1
        with _Progress(progress and len(self.tokens) >= _PROGRESS_TOKENS) as bar:
            bar.stage(f"indexing {self.num_tokens:,} tokens", None)
            sa = suffix_array(self.tokens)
        self.suffix_array = sa.astype(np.int32) if len(sa) < 2 ** 31 else sa
        # big-endian, offset by 2**31: bytes order == numeric order, separators first
        self._keys = (self.tokens.astype(np.int64) + 2 ** 31).astype(">u4").tobytes()

    def __len__(self) -> int:
        return self.num_tokens

    def _range(self, pattern: Sequence[int]) -> tuple[int, int]:
        """Suffix-array slots ``[lo, hi)`` of the suffixes starting with ``pattern``."""
        q = (np.asarray(pattern, dtype=np.int64) + 2 ** 31).astype(">u4").tobytes()
        width, keys = len(q), self._keys

        def key(p):
            p = 4 * int(p)
            return keys[p: p + width]

        lo = bisect_left(self.suffix_array, q, key=key)
        return lo, bisect_right(self.suffix_array, q, lo=lo, key=key)

    def count(self, pattern: Sequence[int]) -> int:
        """How many times ``pattern`` occurs (never across a document boundary)."""
        if not len(pattern):
            return self.num_tokens
        lo, hi = self._range(pattern)
        return hi - lo

    def occurrences(self, pattern: Sequence[int]) -> np.ndarray:
        """Start positions (in ``tokens``) of every occurrence of a non-empty ``pattern``, ascending."""
        lo, hi = self._range(pattern)
        return np.sort(self.suffix_array[lo:hi])

    def lookup(self, context: Sequence[int], max_match: int = 16, min_match: int = 2, max_occurrences: int = 64,
               depth: int = 10) -> tuple[int, list[list[int]]]:
        """The longest suffix of ``context`` (``min_match``..``max_match`` tokens) that occurs with at least
        one token after it: ``(its length, continuations)``; ``(0, [])`` when none does. Continuations:
        the (up to ``depth``) tokens after each of at most ``max_occurrences`` occurrences, in suffix-array
        order (so sorted), each non-empty and within its document."""
        n = len(context)
        top = min(max_match, n)
        if top < min_match or not self.num_tokens:
            return 0, []
        ctx = list(context[n - top:])
        if self.count(ctx[top - min_match:]) == 0:
            return 0, []
        lo, hi = min_match, top          # ctx[-lo:] occurs; find the longest length that does
        while lo < hi:
            mid = (lo + hi + 1) // 2
            if self.count(ctx[top - mid:]):
                lo = mid
            else:
                hi = mid - 1
        for m in range(lo, min_match - 1, -1):  # only goes below lo when every match ends its document
            conts = self._continuations(ctx[top - m:], max_occurrences, depth)
            if conts:
                return m, conts
        return 0, []

    def _continuations(self, pattern: list[int], max_occurrences: int, depth: int) -> list[list[int]]:
        lo, hi = self._range(pattern)
        count = hi - lo
        if count <= 0:
            return []
        if count > max_occurrences:
            slots = lo + (np.arange(max_occurrences, dtype=np.int64) * count) // max_occurrences
        else:
            slots = np.arange(lo, hi)
        starts = self.suffix_array[slots] + len(pattern)
        cols = np.minimum(starts[:, None] + np.arange(depth), len(self.tokens) - 1)  # the last is a separator
        vals = self.tokens[cols]
        lengths = np.logical_and.accumulate(vals >= 0, axis=1).sum(axis=1)
        return [row[:m] for row, m in zip(vals.tolist(), lengths.tolist()) if m]


# ---------------------------------------------------------------------- corpus files
def _corpus_files(paths: Sequence[str | os.PathLike]) -> list[Path]:
    files: list[Path] = []
    for raw in paths:
        p = Path(raw).expanduser()
        if not p.exists():
            raise InvalidParamsError(f"retrieval corpus path {str(p)!r} does not exist (corpus takes text files, "
                                     "folders of them, or token-id lists)")
        if p.is_file():
            files.append(p)
            continue
        found = sorted(f for f in p.rglob("*") if f.suffix.lower() in _TEXT_SUFFIXES and f.is_file()
                       and not any(part.startswith(".") for part in f.relative_to(p).parts))
        if not found:
            raise InvalidParamsError(f"retrieval corpus folder {str(p)!r} holds no text files (looked for "
                                     f"{', '.join(sorted(_TEXT_SUFFIXES))})")
        files.extend(found)
    return files


def _json_strings(value) -> list[str]:
    if isinstance(value, str):
        return [value]
    if isinstance(value, dict):
        value = list(value.values())
    if isinstance(value, list):
        return [s for v in value for s in _json_strings(v)]
    return []


def _size(path: Path) -> int:
    try:
        return path.stat().st_size
    except OSError:   # gone since the drafter was built: _documents names it
        return 0


def _documents(path: Path) -> list[str]:
    try:
        text = path.read_text(encoding="utf-8", errors="replace")
    except OSError as e:
        raise InvalidParamsError(f"cannot read retrieval corpus file {str(path)!r}: {e}") from None
    if path.suffix.lower() != ".jsonl":
        return [text]
    docs = []
    for line in text.splitlines():
        if line.strip():
            try:
                docs.append("\n".join(_json_strings(json.loads(line))))
            except ValueError:
                docs.append(line)
    return docs


def _tokenize(files: list[Path], tokenizer, progress: bool) -> list[list[int]]:
    """Every document of ``files``, tokenized without special tokens (batched through a fast HF
    tokenizer when the wrapper exposes one)."""
    hf = getattr(tokenizer, "hf", None)   # leaplm's Tokenizer: encode(add_special_tokens=False) == hf.encode(...)
    batch_encode = hf if getattr(hf, "is_fast", False) else None
    sizes = [_size(f) for f in files]
    out: list[list[int]] = []
    with _Progress(progress and sum(sizes) >= _PROGRESS_BYTES) as bar:
        bar.stage("tokenizing the retrieval corpus", sum(sizes))
        pending: list[str] = []
        size = 0

        def flush():
            if batch_encode is not None and len(pending) > 1:
                encoded = batch_encode(pending, add_special_tokens=False, verbose=False)["input_ids"]
                out.extend(list(ids) for ids in encoded)
            else:
                out.extend(list(tokenizer.encode(t, add_special_tokens=False)) for t in pending)
            pending.clear()

        for f, nbytes in zip(files, sizes):
            for doc in _documents(f):
                pending.append(doc)
                size += len(doc)
                if size >= _TOKENIZE_BATCH:
                    flush()
                    size = 0
            bar.advance(nbytes)
        flush()
    return out


class _Progress:
    """A transient rich progress bar on stderr, or nothing when disabled."""

    def __init__(self, enabled: bool) -> None:
        self.enabled, self.bar, self.task = enabled, None, None

    def __enter__(self) -> "_Progress":
        if self.enabled:
            from rich.console import Console
            from rich.progress import BarColumn, Progress, SpinnerColumn, TextColumn, TimeElapsedColumn

            self.bar = Progress(SpinnerColumn(), TextColumn("{task.description}"), BarColumn(), TimeElapsedColumn(),
                                transient=True, console=Console(stderr=True))
            self.bar.start()
        return self

    def stage(self, description: str, total: int | None) -> None:
        if self.bar is not None:
            self.task = self.bar.add_task(description, total=total)

    def advance(self, n: int) -> None:
        if self.bar is not None and self.task is not None:
            self.bar.advance(self.task, n)

    def __exit__(self, *exc) -> None:
        if self.bar is not None:
            self.bar.stop()


# ---------------------------------------------------------------------- the drafter
class _Row:
    """A row's own context: its tokens, and hash chains over its ``min_match``-grams."""

    __slots__ = ("tokens", "head", "prev")

    def __init__(self) -> None:
        self.tokens: list[int] = []
        self.head: dict[tuple[int, ...], int] = {}  # gram -> latest end (exclusive) with a token after it
        self.prev: list[int] = []                   # prev[e]: previous end of the gram ending at e, or -1


class Retrieval(Drafter):
    name = "retrieval"

    def __init__(self, corpus, num_draft: int = 24, max_match: int = 16, min_match: int = 2,
                 max_occurrences: int = 64, depth: int = 10, tree: bool = True, include_context: bool = True,
                 progress: bool = True) -> None:
        self.num_draft = int_knob("retrieval", "num_draft", num_draft, 1)
        self.max_match = int_knob("retrieval", "max_match", max_match, 1)
        self.min_match = int_knob("retrieval", "min_match", min_match, 1)
        if self.min_match > self.max_match:
            raise InvalidParamsError(f"retrieval needs 1 <= min_match <= max_match, got {min_match}, {max_match}")
        self.max_occurrences = int_knob("retrieval", "max_occurrences", max_occurrences, 1)
        self.depth = int_knob("retrieval", "depth", depth, 1)
        self.tree, self.include_context, self.progress = bool(tree), bool(include_context), bool(progress)
        self.datastore: Datastore | None = None
        self.files: list[Path] = []          # a text corpus, tokenized by bind()
        self._tokenizer = None
        self._rows: dict[int, _Row] = {}
        if isinstance(corpus, Datastore):
            self.datastore = corpus
        elif isinstance(corpus, (str, os.PathLike)):
            self.files = _corpus_files([corpus])
        elif isinstance(corpus, (list, tuple)) and corpus:
            if all(isinstance(c, (str, os.PathLike)) for c in corpus):
                self.files = _corpus_files(corpus)
            elif all(not isinstance(c, (str, os.PathLike, bytes, dict)) and hasattr(c, "__len__") for c in corpus):
                self.datastore = Datastore(corpus, progress=self.progress)
            else:
                raise InvalidParamsError("retrieval corpus must be paths or token-id lists, not a mix (or a flat "
                                         "list of ids: wrap one document as [ids])")
        else:
            raise InvalidParamsError(f"retrieval corpus must be a path, a list of paths, a non-empty list of "
                                     f"token-id lists or a Datastore, got {type(corpus).__name__}"
                                     + (" (empty)" if isinstance(corpus, (list, tuple)) else ""))

    # ------------------------------------------------------------------ set-up
    def bind(self, target_model, target_tokenizer=None) -> None:
        """Tokenize a text corpus with the target's tokenizer and index it; check the vocabulary."""
        if self.files and (self.datastore is None or target_tokenizer is not self._tokenizer):
            if target_tokenizer is None:
                raise InvalidParamsError(
                    f"the retrieval corpus is text ({_describe(self.files)}): it needs the target's tokenizer "
                    "(bind(target_model, target_tokenizer)), or give the corpus as token-id lists")
            self.datastore = Datastore(_tokenize(self.files, target_tokenizer, self.progress), progress=self.progress)
            self._tokenizer = target_tokenizer
        vocab = getattr(getattr(target_model, "config", None), "vocab_size", None)
        if isinstance(vocab, int) and self.datastore is not None and self.datastore.max_token >= vocab:
            raise InvalidParamsError(f"the retrieval corpus holds token id {self.datastore.max_token}, beyond the "
                                     f"target's vocabulary ({vocab} tokens): was it tokenized for another model?")

    def reset(self, row: int) -> None:
        self._rows.pop(row, None)

    # ------------------------------------------------------------------ drafting
    def propose(self, row: int, context: Sequence[int], k: int) -> Draft:
        k = min(k, self.num_draft)
        if k < 1:
            self._check_indexed()
            return Draft([])
        weighted = self.continuations(row, context)
        if not weighted:
            return Draft([])
        return _select(weighted, k, self.tree)

    def continuations(self, row: int, context: Sequence[int]) -> list[tuple[list[int], int]]:
        """What the trie is built from: ``(continuation, weight)`` pairs, the own context's first (see the
        module docstring), then one per datastore occurrence with weight 1. Drafters that build on this
        one (RASD) call it directly."""
        self._check_indexed()
        weighted: list[tuple[list[int], int]] = []
        if self.include_context:
            own = self._own_continuations(row, context)
            if own:
                cap = self.max_occurrences + 1            # outweighs every datastore occurrence together
                weighted = [(own[0], cap * len(own))] + [(c, cap) for c in own[1:]]
        _, found = self.datastore.lookup(context, self.max_match, self.min_match, self.max_occurrences, self.depth)
        weighted.extend((c, 1) for c in found)
        return weighted

    def _check_indexed(self) -> None:
        if self.datastore is None:
            raise InvalidParamsError(f"the retrieval corpus ({_describe(self.files)}) is not indexed yet: call "
                                     "bind(target_model, target_tokenizer) first")

    def _own_continuations(self, row: int, context: Sequence[int]) -> list[list[int]]:
        """Continuations (up to ``depth``) of the best earlier occurrences of the context's last gram."""
        st = self._extend(row, context)
        tokens, n, g = st.tokens, len(st.tokens), self.min_match
        if n <= g:
            return []
        end = st.head.get(tuple(tokens[n - g:]), -1)
        found: list[tuple[int, int, int]] = []
        for _ in range(_CTX_CHAIN):
            if end < 0:
                break
            agree, limit = g, min(self.max_match, end)
            while agree < limit and tokens[end - 1 - agree] == tokens[n - 1 - agree]:
                agree += 1
            found.append((-agree, -end, end))
            end = st.prev[end]
        found.sort()
        out = []
        for _, _, end in found[:_CTX_CANDIDATES]:
            period = n - end
            out.append([tokens[end + (i % period)] for i in range(self.depth)])
        return out

    def _extend(self, row: int, context: Sequence[int]) -> _Row:
        st = self._rows.get(row)
        if st is not None and not _extends(st.tokens, context, self.min_match):
            st = None
        if st is None:
            st = self._rows[row] = _Row()
        tokens, head, prev, g = st.tokens, st.head, st.prev, self.min_match
        m = len(tokens)
        for t in context[m:]:
            if m >= g:  # the gram ending at m now has a token after it
                key = tuple(tokens[m - g: m])
                prev.append(head.get(key, -1))
                head[key] = m
            else:
                prev.append(-1)
            tokens.append(int(t))
            m += 1
        return st


def _extends(seen: list[int], context: Sequence[int], g: int) -> bool:
    """Whether ``context`` continues ``seen`` (checks the first, middle and last ``g`` tokens: O(g))."""
    n = len(seen)
    if n == 0:
        return True
    if len(context) < n or context[0] != seen[0] or context[n // 2] != seen[n // 2]:
        return False
    tail = max(0, n - g)
    return list(context[tail:n]) == seen[tail:]


def _select(weighted: list[tuple[list[int], int]], k: int, tree: bool) -> Draft:
    """Merge weighted continuations into a trie and pick its ``k`` heaviest nodes, a node only after
    its parent (ties: the node created first); ``tree=False``: the heaviest child at each step."""
    tok, parent, count, children = [-1], [-1], [0], [{}]
    for cont, w in weighted:
        node = 0
        for t in cont:
            child = children[node].get(t)
            if child is None:
                child = len(tok)
                tok.append(t)
                parent.append(node)
                count.append(0)
                children.append({})
                children[node][t] = child
            count[child] += w
            node = child
    out_tokens: list[int] = []
    parents: list[int] = []
    if not tree:
        node = 0
        while children[node] and len(out_tokens) < k:
            node = min(children[node].values(), key=lambda c: (-count[c], c))
            out_tokens.append(tok[node])
        return Draft(out_tokens)
    index = {0: -1}
    heap = [(-count[c], c) for c in children[0].values()]
    heapq.heapify(heap)
    while heap and len(out_tokens) < k:
        _, node = heapq.heappop(heap)
        index[node] = len(out_tokens)
        parents.append(index[parent[node]])
        out_tokens.append(tok[node])
        for c in children[node].values():
            heapq.heappush(heap, (-count[c], c))
    if all(p == i - 1 for i, p in enumerate(parents)):
        return Draft(out_tokens)
    return Draft(out_tokens, parents=parents)


def _describe(files: list[Path]) -> str:
    return f"{str(files[0])!r}" + (f" and {len(files) - 1} more files" if len(files) > 1 else "")
