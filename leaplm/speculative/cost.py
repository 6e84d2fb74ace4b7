"""What a verification pass costs as the draft grows, measured on the machine the model runs on.

``time_tree_pass(model, nodes, context)`` times the target's tree pass over ``1 + n`` tokens (``n``
draft nodes as a random tree after a ``context``-token prompt; ``n = 0`` is the plain decode step)
and returns milliseconds per pass for each ``n``; the sizes are timed interleaved, round after round, so
drift on a shared machine moves all of them alike. ``relative_cost(model, max_nodes)`` interpolates a
few of those timings into ``cost[n] = time(n) / time(0)`` for ``n = 0..max_nodes``, cached on the model
object; drafters that size their tree by expected gain per unit of time use it.

A node's cost grows with the context: every node attends over it, so on a CPU a node in a 1,500-token
conversation costs a good deal more than one after 256 tokens (SmolLM2 int8, this repo's 2-core CPU:
measured by ``leaplm profile --verify-curve --context``). ``pass_cost(model, max_nodes)`` measures the
table at a short and a long context and ``PassCost.at(context_len)`` interpolates between them
(linearly: attention is linear in the context), so drafters size a tree for the context they draft in.
"""
from __future__ import annotations

import time
from typing import Sequence

import torch

from ..cache.kv import KVCache
from .tree import ancestor_matrix, depths


def _random_tree(n: int, gen: torch.Generator) -> list[int]:
    """A bushy tree: each node hangs under a random earlier node or the root (shape barely changes cost)."""
    return [int(torch.randint(-1, i, (1,), generator=gen)) if i else -1 for i in range(n)]


def time_tree_pass(model, nodes: Sequence[int], context: int = 512, repeats: int = 5) -> list[float]:
    """Median milliseconds of one target pass verifying ``n`` tree nodes, for each ``n`` in ``nodes``."""
    cfg, device = model.config, model.device
    context = min(context, cfg.max_position_embeddings - 1 - max(nodes))
    gen = torch.Generator().manual_seed(0)
    cache = KVCache.for_model(cfg, 1, context + 1 + max(nodes), model.dtype, device)
    prompt = torch.randint(0, cfg.vocab_size, (1, context), generator=gen).to(device)
    model(prompt, torch.arange(context, device=device)[None], cache, kv_len=context, contiguous_start=0,
          logit_index=torch.tensor([[context - 1]], device=device))
    cache.commit(0, context)
    passes = []
    for n in nodes:
        parents = _random_tree(n, gen)
        feed = torch.randint(0, cfg.vocab_size, (1, 1 + n), generator=gen).to(device)
        positions = torch.tensor([[context] + [context + d for d in depths(parents)]], device=device)
        mask = ancestor_matrix(parents)[None].to(device)

        def one(n=n, feed=feed, positions=positions, mask=mask) -> None:
            if n == 0:
                model(feed, positions, cache, kv_len=context + 1, contiguous_start=context)
            else:
                model(feed, positions, cache, kv_len=context + 1 + n, tree=([context], mask))
            if device.type == "cuda":
                torch.cuda.synchronize()

        passes.append(one)
    # Warm-up: two untimed rounds over every size. The first passes of each size after loading run slow
    # (fresh buffers, page faults): timed alone, a plain step once measured slower than a 2-node pass.
    for _ in range(2):
        for one in passes:
            one()
    # Interleaved: every round times each size once (alternating direction), so a machine whose speed
    # drifts over the measurement (a shared CPU) shifts all sizes alike instead of skewing the ratios.
    times: list[list[float]] = [[] for _ in nodes]
    for r in range(repeats):
        order = range(len(nodes)) if r % 2 == 0 else reversed(range(len(nodes)))
        for i in order:
            t = time.perf_counter()
            passes[i]()
            times[i].append(time.perf_counter() - t)
    return [1000 * sorted(ts)[len(ts) // 2] for ts in times]


class PrefixChooser:
    """``best_prefix`` one node at a time: ``add(accept)`` for each node in draft order, ``best_n`` the
    choice so far, ``since_best`` how many nodes were added since it last moved (a caller growing a draft
    best-first can stop once that is large: later nodes are ever less likely to pay). The first ``keep``
    nodes are kept whatever they cost (a part of the draft decided otherwise)."""

    def __init__(self, cost: Sequence[float], keep: int = 0) -> None:
        self.cost, self.keep = cost, keep
        self.n, self.gain, self.best_rate, self.best_n = 0, 1.0, 1.0, 0

    def add(self, accept: float) -> None:
        self.n += 1
        self.gain += accept
        if self.n <= self.keep or self.gain / self.cost[self.n] > self.best_rate:
            self.best_rate, self.best_n = self.gain / self.cost[self.n], self.n

    @property
    def since_best(self) -> int:
        return self.n - self.best_n


def best_prefix(accepts: Sequence[float], cost: Sequence[float], keep: int = 0) -> int:
    """How many of a draft's nodes to keep: the ``n >= keep`` maximising expected tokens per unit of pass
    time, ``(1 + sum(accepts[:n])) / cost[n]`` (``accepts[i]``: the chance node ``i`` is accepted, nodes in
    an order where every prefix is a draft; ``cost[0] = 1``); 0 when no prefix beats a plain step."""
    chooser = PrefixChooser(cost, keep)
    for accept in accepts:
        chooser.add(accept)
    return chooser.best_n


def relative_cost(model, max_nodes: int, context: int = 256) -> list[float]:
    """``cost[n]`` = pass time with ``n`` nodes / pass time with none, ``n = 0..max_nodes`` (measured at a
    few sizes, linearly interpolated, non-decreasing; cached per model and ``max_nodes``)."""
    cache = model.__dict__.setdefault("_leaplm_pass_cost", {})
    if (max_nodes, context) in cache:
        return cache[(max_nodes, context)]
    probe = sorted({0, 1, 2, 4, 8, 16, 32, 64, max_nodes} & set(range(max_nodes + 1)))
    ms = time_tree_pass(model, probe, context=context, repeats=7)
    rel = [m / ms[0] for m in ms]
    cost = []
    for n in range(max_nodes + 1):
        j = next(i for i, p in enumerate(probe) if p >= n)
        if probe[j] == n:
            c = rel[j]
        else:
            a, b = probe[j - 1], probe[j]
            c = rel[j - 1] + (rel[j] - rel[j - 1]) * (n - a) / (b - a)
        cost.append(max(c, cost[-1]) if cost else 1.0)
    cache[(max_nodes, context)] = cost
    return cost


class PassCost:
    """``cost[n]`` for ``n = 0..max_nodes`` at any context length, from tables measured at two lengths:
    linear in the context between and beyond them (a node's attention is linear in it), never below 1
    and non-decreasing in ``n``; one list per 64-token bucket of context, cached."""

    def __init__(self, short: Sequence[float], long: Sequence[float], short_context: int, long_context: int) -> None:
        self.short, self.long = list(short), list(long)
        self.short_context, self.long_context = short_context, long_context
        self._at: dict[int, list[float]] = {}

    def at(self, context_len: int) -> list[float]:
        bucket = max(0, int(context_len)) // 64
        if bucket not in self._at:
            span = self.long_context - self.short_context
            w = (bucket * 64 + 32 - self.short_context) / span if span > 0 else 0.0
            cost = []
            for s, l in zip(self.short, self.long):
                c = max(1.0, s + (l - s) * w)
                cost.append(max(c, cost[-1]) if cost else 1.0)
            self._at[bucket] = cost
        return self._at[bucket]


DEFAULT_NODE_COST = 0.05   # per node, relative to a plain step, for a drafter never bound to its target


def drafter_cost(max_nodes: int, node_cost: float | None) -> PassCost:
    """A cost-sized drafter's table before binding: ``1 + node_cost * n`` at every context (the given
    ``node_cost``, else ``DEFAULT_NODE_COST``); ``bind`` replaces it by ``pass_cost`` when none was given."""
    per_node = DEFAULT_NODE_COST if node_cost is None else node_cost
    linear = [1.0 + per_node * n for n in range(max_nodes + 1)]
    return PassCost(linear, linear, 0, 0)


def pass_cost(model, max_nodes: int, short_context: int = 256, long_context: int = 1024) -> PassCost:
    """``PassCost`` from ``relative_cost`` at two context lengths (the long one clipped to the model's
    positions; a model too short for both gets one table at every length). About two seconds, cached."""
    limit = model.config.max_position_embeddings - 1 - max_nodes
    long_context = min(long_context, limit)
    short_context = min(short_context, long_context)
    short = relative_cost(model, max_nodes, context=short_context)
    if long_context <= short_context:
        return PassCost(short, short, short_context, short_context)
    return PassCost(short, relative_cost(model, max_nodes, context=long_context), short_context, long_context)
