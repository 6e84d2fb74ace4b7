"""CopySpec: copies from the current context and from earlier requests; exact greedy output in the engine."""
from __future__ import annotations

import random

import pytest
import torch

from leaplm.engine import Engine
from leaplm.errors import InvalidParamsError
from leaplm.models.load import build_model
from leaplm.sampling import SamplingParams
from leaplm.speculative.drafters.copyspec import CopySpec

from .cases import greedy_equals_vanilla_on_ragged_batch
from .cases import run as _run


def test_copies_the_latest_earlier_continuation_in_the_context():
    d = CopySpec(num_draft=4, gamma=3)
    assert d.name == "copyspec" and d.num_draft == 4
    assert d.propose(0, [5, 6, 7, 8, 9, 1, 5, 6, 7], 4).tokens == [8, 9, 1, 5]
    assert d.propose(0, [5, 6, 7, 8, 9, 1, 5, 6, 7, 8], 2).tokens == [9, 1]     # k respected
    assert d.propose(0, [5, 6, 7, 8, 9, 1, 5, 6, 7, 8, 4], 4).tokens == []    # (7, 8, 4) never seen
    d.reset(0)
    # (1, 2, 3) occurs twice before the end, both with the same lead-in and room to copy: the latest wins
    assert d.propose(0, [1, 2, 3, 4, 1, 2, 3, 5, 9, 1, 2, 3], 4).tokens == [5, 9, 1, 2]
    assert d.propose(1, [4, 4], 4).tokens == []                               # shorter than gamma
    assert d.propose(1, [4, 4, 4], 0).tokens == []                             # k = 0


def test_a_loop_is_copied_past_the_end_of_the_context():
    d = CopySpec(num_draft=6, gamma=3)
    # (2, 1, 2) last occurred two tokens back: the text repeats with period 2
    assert d.propose(0, [7, 1, 2, 1, 2, 1, 2], 6).tokens == [1, 2, 1, 2, 1, 2]
    assert d.propose(1, [9, 9, 9, 9], 3).tokens == [9, 9, 9]


def test_copies_from_an_earlier_request_after_reset():
    d = CopySpec(num_draft=8, gamma=3)
    first = [20, 21, 22, 23, 24, 25, 26, 27, 28, 29]
    assert d.propose(0, first, 8).tokens == []
    assert d.store_size == 0
    d.reset(0)                                           # the request leaves: its text goes to the store
    assert d.store_size == len(first)
    assert d.propose(0, [3, 22, 23, 24], 8).tokens == [25, 26, 27, 28, 29]  # stops where that request ended
    assert d.propose(1, [4, 5, 26, 27, 28], 3).tokens == [29]               # any row can copy from it


def test_a_new_context_on_the_row_stores_the_old_one_without_reset():
    d = CopySpec(num_draft=4, gamma=2)
    d.propose(0, [1, 2, 3, 4, 5, 6], 4)
    assert d.propose(0, [9, 8, 3, 4], 4).tokens == [5, 6]  # not an extension: the old context was stored
    assert d.store_size == 6


def test_a_copy_never_runs_into_the_next_stored_request():
    d = CopySpec(num_draft=8, gamma=2)
    for ctx in ([1, 2, 3, 4, 5], [6, 7, 8, 9]):
        d.propose(0, ctx, 8)
        d.reset(0)
    assert d.propose(0, [0, 3, 4], 8).tokens == [5]


def test_longest_continuation_wins_and_a_tie_goes_to_the_current_context():
    d = CopySpec(num_draft=8, gamma=3)
    d.propose(0, [1, 2, 3, 40, 41, 42, 43, 44], 8)
    d.reset(0)
    ctx = [1, 2, 3, 50, 1, 2, 3]  # context: 4 tokens follow (1, 2, 3); store: 5 follow it
    assert d.propose(0, ctx, 5).tokens == [40, 41, 42, 43, 44]
    assert d.propose(0, ctx, 4).tokens == [50, 1, 2, 3]
    assert d.propose(0, ctx, 3).tokens == [50, 1, 2]


def test_the_occurrence_whose_lead_in_agrees_longest_wins():
    d = CopySpec(num_draft=4, gamma=2)
    # (2, 3) ends at 3 (lead-in 1, 2, 3 as now) and at 7 (lead-in 9, 2, 3): the older one agrees longer
    assert d.propose(9, [1, 2, 3, 4, 9, 2, 3, 5, 1, 2, 3], 4).tokens == [4, 9, 2, 3]  # row 9 is never stored
    for ctx in ([7, 8, 1, 2, 30, 31, 32], [9, 1, 2, 40, 41]):
        d.propose(0, ctx, 4)
        d.reset(0)
    assert d.propose(0, [5, 7, 8, 1, 2], 4).tokens == [30, 31, 32]  # older request, longer lead-in
    assert d.propose(1, [5, 9, 1, 2], 4).tokens == [40, 41]
    assert d.propose(2, [5, 6, 1, 2], 4).tokens == [30, 31, 32]      # equal lead-ins: longer continuation
    assert d.propose(3, [5, 6, 1, 2], 2).tokens == [40, 41]          # ... equal up to k: the latest


def test_the_latest_stored_occurrence_wins():
    d = CopySpec(num_draft=4, gamma=2)
    for ctx in ([1, 2, 10, 11, 12], [1, 2, 20, 21, 22], [5, 6, 7]):
        d.propose(0, ctx, 4)
        d.reset(0)
    assert d.propose(0, [9, 1, 2], 4).tokens == [20, 21, 22]


def test_the_store_bound_is_enforced_oldest_first():
    d = CopySpec(num_draft=4, gamma=2, max_store_tokens=10)
    for ctx in ([1, 2, 3, 4, 5, 6], [11, 12, 13, 14, 15, 16, 17, 18]):
        d.propose(0, ctx, 4)
        d.reset(0)
    assert d.store_size == 10                              # 1, 2, 3, 4 were evicted
    assert d.propose(1, [0, 1, 2], 4).tokens == []
    assert d.propose(2, [0, 3, 4], 4).tokens == []         # the gram's first token is gone
    assert d.propose(3, [0, 11, 12], 4).tokens == [13, 14, 15, 16]
    assert len(d._store_head) <= d.store_size

    rnd = random.Random(0)
    d = CopySpec(gamma=3, max_store_tokens=500)
    for _ in range(60):
        d.propose(0, [rnd.randrange(40) for _ in range(rnd.randrange(1, 90))], 4)
        d.reset(0)
        assert d.store_size <= 500 and len(d._ring) == len(d._links) <= 500 and len(d._store_head) <= 500
    tail = [rnd.randrange(1000, 2000) for _ in range(30)]
    d.propose(0, tail, 4)
    d.reset(0)
    assert d.propose(0, tail[5:8], 4).tokens == tail[8:12]  # the newest text is always kept

    off = CopySpec(max_store_tokens=0)
    off.propose(0, [1, 2, 3, 4, 5], 4)
    off.reset(0)
    assert off.store_size == 0 and off.propose(0, [1, 2, 3], 4).tokens == []


class _Reference:
    """CopySpec's documented rule by brute force: scan every occurrence, no hashes, no index."""

    def __init__(self, gamma, cap):
        self.g, self.cap = gamma, cap
        self.store: list[tuple[int, int]] = []  # (token, request id) of the newest `cap` stored tokens
        self.seen: dict[int, list[int]] = {}
        self.requests = 0

    def reset(self, row):
        ctx = self.seen.pop(row, [])
        if self.cap and len(ctx) > self.g:
            self.requests += 1
            self.store = (self.store + [(t, self.requests) for t in ctx])[-self.cap:]

    def propose(self, row, ctx, k):
        if row in self.seen and ctx[: len(self.seen[row])] != self.seen[row]:
            self.reset(row)
        self.seen[row] = list(ctx)
        g, n = self.g, len(ctx)
        if k < 1 or n < g:
            return []
        best, pick = (0, 0), None

        def agree(lead):  # tokens before the occurrence's end, newest first
            a = 0
            while a < min(64, n, len(lead)) and lead[-1 - a] == ctx[n - 1 - a]:
                a += 1
            return a

        ends = [e for e in range(n - 1, g - 1, -1) if ctx[e - g: e] == ctx[n - g:]][:16]
        for e in ends:
            score = (agree(ctx[:e]), min(n - e, k))
            if score > best:
                best, pick = score, e
        toks = [t for t, _ in self.store]
        ends = [e for e in range(len(toks) - 1, g - 1, -1) if toks[e - g: e] == ctx[n - g:]
                and self.store[e - g][1] == self.store[e][1]][:16]
        for e in ends:
            rid = self.store[e][1]
            start = next(i for i, (_, r) in enumerate(self.store) if r == rid)
            stop = max(i for i, (_, r) in enumerate(self.store) if r == rid) + 1
            score = (agree(toks[start:e]), min(stop - e, k))
            if score > best:
                best, pick = score, toks[e: e + score[1]]
        if pick is None or isinstance(pick, list):
            return pick or []
        out = []
        for i in range(k):  # the overlapping copy of a context match
            out.append(ctx[pick + i] if pick + i < n else out[pick + i - n])
        return out


@pytest.mark.parametrize("gamma, cap", [(1, 40), (2, 25), (3, 200), (3, 0)])
def test_matches_a_brute_force_reference_on_random_sessions(gamma, cap):
    rnd = random.Random(gamma * 1000 + cap)
    d, ref = CopySpec(num_draft=6, gamma=gamma, max_store_tokens=cap), _Reference(gamma, cap)
    contexts: dict[int, list[int]] = {}
    for step in range(1500):
        row = rnd.randrange(3)
        if row not in contexts or rnd.random() < 0.04:
            if row in contexts and rnd.random() < 0.5:
                d.reset(row)
                ref.reset(row)
            contexts[row] = [100 + step] + [rnd.randrange(4) for _ in range(rnd.randrange(0, 12))]
        ctx = contexts[row]
        ctx += [rnd.randrange(4) for _ in range(rnd.randrange(0, 4))]  # what the engine committed
        k = rnd.randrange(0, 7)
        assert d.propose(row, ctx, k).tokens == ref.propose(row, list(ctx), k), (step, row)
        if rnd.random() < 0.5:  # sometimes the model follows the draft, as after an acceptance
            ctx += d.propose(row, ctx, k).tokens[: rnd.randrange(0, 4)]
            assert d.propose(row, ctx, k).tokens == ref.propose(row, list(ctx), k), (step, row)
    assert d.store_size == len(ref.store) <= cap


@pytest.mark.parametrize("knobs, message", [
    ({"num_draft": 0}, "num_draft must be an integer >= 1, got 0"),
    ({"num_draft": 2.5}, "num_draft must be an integer"),
    ({"gamma": 0}, "gamma must be an integer >= 1, got 0"),
    ({"gamma": True}, "gamma must be an integer"),
    ({"gamma": 65}, "gamma must be <= 64"),
    ({"max_store_tokens": -1}, "max_store_tokens must be an integer >= 0 \\(0 disables the store\\), got -1"),
    ({"max_store_tokens": 3, "gamma": 3}, r"max_store_tokens must be 0 \(no store\) or > gamma=3"),
])
def test_bad_knobs_are_refused(knobs, message):
    with pytest.raises(InvalidParamsError, match=message):
        CopySpec(**knobs)


@pytest.mark.parametrize("name", ["llama-gqa-untied", "gemma3"])
def test_greedy_copyspec_equals_vanilla_on_ragged_batches(name, tiny_model_dir):
    _, spec = greedy_equals_vanilla_on_ragged_batch(tiny_model_dir(name)[0], CopySpec(num_draft=5))
    assert sum(r.accepted for r in spec) > 0


def test_a_second_request_copies_the_first_and_stays_exact(tiny_model_dir):
    folder, _ = tiny_model_dir("llama-gqa-untied")
    engine = Engine(build_model(folder))  # no eos: every row runs to max_tokens
    gen = torch.Generator().manual_seed(11)
    first, other = (torch.randint(3, 128, (12,), generator=gen).tolist() for _ in range(2))
    p = SamplingParams(temperature=0, max_tokens=40)
    drafter, no_store = CopySpec(num_draft=8), CopySpec(num_draft=8, max_store_tokens=0)
    for prompts in ([first, other], [other[:5], first]):   # `first` comes back, on another row
        vanilla = _run(engine, prompts, [p, p])
        spec = _run(engine, prompts, [p, p], drafter)
        alone = _run(engine, prompts, [p, p], no_store)
        assert [r.output_ids for r in spec] == [r.output_ids for r in vanilla]
        assert [r.output_ids for r in alone] == [r.output_ids for r in vanilla]
    assert drafter.store_size > 0
    # the repeated request copied its earlier answer: fewer target passes than without the store
    assert spec[1].output_ids == vanilla[1].output_ids
    assert spec[1].target_passes < alone[1].target_passes
    assert spec[1].target_passes <= 10 and spec[1].accepted >= 30  # 40 tokens; ~9 per pass once aligned


def test_penalties_inside_copied_drafts(tiny_model_dir):
    folder, _ = tiny_model_dir("llama-gqa-untied")
    engine = Engine(build_model(folder))
    prompt = [7, 8, 9, 10] * 6
    p = SamplingParams(temperature=0, max_tokens=20, repetition_penalty=1.3)
    drafter = CopySpec(num_draft=4)
    vanilla = _run(engine, [prompt], [p])[0]
    for _ in range(2):  # the second run also sees the first in the store
        assert _run(engine, [prompt], [p], drafter)[0].output_ids == vanilla.output_ids
