"""Structured output inside the engine: pruning drafts to what a grammar accepts, the masks verification applies,
and the tree layout of a step's feed.

A constrained request carries a ``Constraint`` (``leaplm.constrain``): the grammar's cursor, always positioned
after the request's output tokens. In every step that reaches the end of a constrained request's tokens:

1. jump-forward (``params.jump_forward``): the tokens the grammar forces from the request's state were appended to
   its output without sampling when its last tokens were accepted (or when it was added), and are fed as pending
   tokens;
2. the draft is pruned to what the grammar accepts (``constrain_draft``: a chain is cut at its first rejected
   token; a tree loses every node whose root-to-node path is rejected) and a mask is computed for every verified
   feed position: the tokens allowed after the root, and after each node's path;
3. the masks set the disallowed *raw* logits to -inf before penalties and warpers, so greedy choice and
   speculative sampling only ever pick allowed tokens, and EOS only where the grammar may end;
4. the verdict's tokens are consumed one by one. The request finishes ``"stop"`` at EOS or a stop token, or when
   the grammar is complete and cannot go on; ``"length"`` at ``max_tokens``. With jump-forward the verdict is cut
   after the first token after which the grammar forces tokens (they are appended right after): exactly where
   one-token-a-step decoding jumps, so greedy output with speculation equals greedy output without it.
"""
from __future__ import annotations

import time
from typing import Sequence

from torch import Tensor

from ..constrain.base import Constraint
from ..speculative.drafters.base import Draft
from ..speculative.tree import chain_parents, path_to


def feed_parents(prefix: int, draft: Draft) -> list[int]:
    """Tree parents of feed indices ``1..`` for a row that feeds ``prefix`` (>= 1) pending tokens, a chain
    from the root (feed 0), and then ``draft``'s nodes hanging off the last pending token."""
    base = prefix - 1
    own = draft.parents if draft.is_tree else chain_parents(len(draft.tokens))
    return list(range(-1, base - 1)) + [base - 1 if p < 0 else base + p for p in own]


def constrain_draft(constraint: Constraint, draft: Draft, masks: Tensor, jump_forward: bool = True,
                    mask_times: list[float] | None = None) -> Draft:
    """Prune ``draft`` to what the grammar accepts and write the masks its verification needs.

    ``constraint`` is at the *root* state (after every output token); it is unchanged on return.
    ``masks``: int32 CPU ``[>= 1 + n, W]`` (``W = bitmask_width(V)``). On return row 0 is the mask at the
    root and row ``1 + j`` the mask after the root-to-node path of node ``j`` of the returned draft, so
    ``masks[: 1 + len(result.tokens)]`` lines up with the target's verification logits ``[1 + n', V]``.

    A node is dropped, with its subtree, when the grammar rejects its token after its parent's path, or
    when its parent is *terminal*: the grammar is complete there (only EOS could follow), or - with
    ``jump_forward`` - it forces tokens there (decoding jumps forward at that point, so nothing drafted
    below it can be used). A terminal node's own mask row is all-allowed: its verdict token is never used.
    With draft probabilities (``draft.probs [n, V]``) a dropped node also drops its later siblings:
    recursive rejection sampling must try siblings in the order they were drawn, a prefix of it is fine.
    A chain stays a chain, cut at its first rejected token. ``mask_times`` gets the seconds each mask took.
    """
    tokens = [int(t) for t in draft.tokens]
    n = len(tokens)
    parents = draft.parents if draft.is_tree else chain_parents(n)
    vocab = constraint.vocab_size
    index = [-1] * n            # node -> its index in the pruned draft (-1: dropped)
    terminal = [False] * n
    closed: set[int] = set()    # parents (-1: the root) whose remaining children are dropped (draft probs)
    kept_tokens: list[int] = []
    kept_parents: list[int] = []
    kept_nodes: list[int] = []
    path: list[int] = []        # nodes consumed beyond the root, root's child first

    def fill(row: Tensor) -> None:
        t = time.perf_counter()
        constraint.fill_mask(row)
        if mask_times is not None:
            mask_times.append(time.perf_counter() - t)

    fill(masks[0])
    try:
        for i, (token, parent) in enumerate(zip(tokens, parents)):
            if parent in closed or (parent >= 0 and (index[parent] < 0 or terminal[parent])):
                continue
            row = masks[0] if parent < 0 else masks[1 + index[parent]]
            if not (0 <= token < vocab and (int(row[token >> 5]) >> (token & 31)) & 1):
                if draft.probs is not None:
                    closed.add(parent)
                continue
            target = path_to(parents, parent) if parent >= 0 else []
            common = 0
            while common < min(len(path), len(target)) and path[common] == target[common]:
                common += 1
            if len(path) > common:
                constraint.rollback(len(path) - common)
                path = path[:common]
            if len(target) > common:
                constraint.advance([tokens[j] for j in target[common:]])
                path = target
            constraint.advance([token])
            path = target + [i]
            index[i] = len(kept_tokens)
            kept_tokens.append(token)
            kept_parents.append(-1 if parent < 0 else index[parent])
            kept_nodes.append(i)
            terminal[i] = constraint.is_finished() or (jump_forward and bool(constraint.forced()))
            if terminal[i]:
                masks[1 + index[i]].fill_(-1)
            else:
                fill(masks[1 + index[i]])
    finally:
        if path:
            constraint.rollback(len(path))
    if len(kept_tokens) == n:
        return draft
    if not kept_tokens:
        return Draft([])
    probs = draft.probs[kept_nodes] if draft.probs is not None else None
    return Draft(kept_tokens, probs, kept_parents if draft.is_tree else None)


def clear_ids(bitmask: Tensor, ids: Sequence[int]) -> None:
    """Disallow ``ids`` in every row of ``bitmask [N, W]`` that allows some other token (``ignore_eos``)."""
    if not ids:
        return
    before = bitmask.clone()
    for i in ids:
        bit = -(1 << 31) if i & 31 == 31 else 1 << (i & 31)
        bitmask[:, i >> 5] &= ~bit
    empty = ~bitmask.any(dim=-1)
    if bool(empty.any()):
        bitmask[empty] = before[empty]
