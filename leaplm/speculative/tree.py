"""Token trees: structure helpers, the tree attention pattern, and the accepted-path layout.

A draft tree of ``n`` nodes is ``tokens [n]`` + ``parents [n]`` (``parents[i] < i``, ``-1`` = a child of
the root). The engine feeds ``1 + n`` tokens in one pass: the *root* (the row's pending token, feed
index 0) then node ``i`` at feed index ``1 + i``. Feed index ``f`` of a row whose committed length is
``L`` is written into KV slot ``L + f`` (scratch slots) and sits at position ``L + depth(f)``
(``depth(root) = 0``), so a node's rotary position is what it would have in a chain.

Attention: feed ``f`` sees every committed slot ``< L`` and the feed slots of its ancestors and itself
(``ancestor_matrix``). After verification the accepted path (root, then nodes at depth 1..a) is
compacted: the node at depth ``d`` moves from slot ``L + 1 + i`` to slot ``L + d`` (``compaction``);
every other node's slot becomes garbage past the committed length.

A chain is the tree with ``parents = [-1, 0, 1, ...]``: its feed slots and positions coincide and no
compaction is needed.
"""
from __future__ import annotations

from typing import Sequence

import torch
from torch import Tensor


def chain_parents(n: int) -> list[int]:
    return list(range(-1, n - 1))


def check_tree(tokens: Sequence[int], parents: Sequence[int]) -> None:
    """Raise ValueError unless ``parents`` is a topologically ordered forest with distinct siblings."""
    if len(tokens) != len(parents):
        raise ValueError(f"{len(tokens)} draft tokens but {len(parents)} parents")
    seen: set[tuple[int, int]] = set()
    for i, (token, parent) in enumerate(zip(tokens, parents)):
        if not -1 <= parent < i:
            raise ValueError(f"node {i} has parent {parent}: parents must be -1 (root) or an earlier node")
        if (parent, token) in seen:
            raise ValueError(f"node {i} repeats token {token} among the children of {parent}")
        seen.add((parent, token))


def depths(parents: Sequence[int]) -> list[int]:
    """Depth of every node (children of the root have depth 1)."""
    out: list[int] = []
    for p in parents:
        out.append(1 if p < 0 else out[p] + 1)
    return out


def children(parents: Sequence[int]) -> list[list[int]]:
    """``children[f]`` for every feed index (0 = root): the child *node* indices, in draft order."""
    out: list[list[int]] = [[] for _ in range(len(parents) + 1)]
    for i, p in enumerate(parents):
        out[p + 1].append(i)
    return out


def path_to(parents: Sequence[int], node: int) -> list[int]:
    """Node indices from the root's child down to ``node`` (inclusive)."""
    path = []
    while node >= 0:
        path.append(node)
        node = parents[node]
    return path[::-1]


def ancestor_matrix(parents: Sequence[int], width: int | None = None) -> Tensor:
    """``[W, W]`` bool over feed indices: ``m[f, g]`` iff feed ``g`` is ``f`` or an ancestor of ``f``.

    ``width`` (>= 1 + n) pads with rows that see only the root and themselves (padding queries of a
    batch whose rows drafted fewer nodes; their outputs are never used).
    """
    n = len(parents)
    width = width or n + 1
    m = torch.eye(width, dtype=torch.bool)
    m[:, 0] = True
    for i, p in enumerate(parents):
        m[1 + i, : n + 1] |= m[p + 1, : n + 1]
    return m


def compaction(path: Sequence[int]) -> list[tuple[int, int]]:
    """Slot moves for an accepted path of node indices: ``(from_feed, to_feed)`` pairs, shallow first.

    The node at depth ``d`` (feed ``1 + path[d-1]``) moves to feed slot ``d``. Sources only lie deeper
    in the feed than destinations, so applying the moves in order never overwrites a pending source.
    """
    return [(1 + node, d) for d, node in enumerate(path, start=1) if 1 + node != d]
