"""The scheduler's rules on hand-made requests: token budget, decode-first order, chunked prefill, FCFS
admission, preemption of the newest request wherever its item sits in the step."""
from __future__ import annotations

from leaplm.engine.kv_pool import BlockManager
from leaplm.engine.request import Request, Status
from leaplm.engine.scheduler import Scheduler
from leaplm.sampling import SamplingParams


def _request(rid: int, prompt_len: int, arrival: float) -> Request:
    return Request(rid, list(range(3, 3 + prompt_len)), SamplingParams(temperature=0), frozenset(), 100, None, None,
                   arrival=arrival)


def _scheduler(blocks: int, **kw) -> Scheduler:
    kw = {"max_num_seqs": 4, "max_num_batched_tokens": 20, "prefill_chunk": 8} | kw
    return Scheduler(BlockManager(blocks, 4), **kw)


def test_decodes_first_then_chunks_then_admissions_within_the_budget():
    s = _scheduler(64)
    old, new = _request(0, 30, 0.0), _request(1, 5, 1.0)
    for r in (old, new):
        s.add(r)
    first = s.schedule()
    assert [(it.request.request_id, it.take) for it in first] == [(0, 8), (1, 5)]   # chunk of 8, then all of 5
    for it in first:   # as the engine commits them
        it.request.num_computed += it.take
    new.output_ids.append(9)
    new.tokens.append(9)
    second = s.schedule()
    # the decoding request first (1 token), then the rest of the budget to the long prompt (8 at most)
    assert [(it.request.request_id, it.take) for it in second] == [(1, 1), (0, 8)]


def test_admission_is_first_come_first_served_up_to_max_num_seqs():
    s = _scheduler(64, max_num_seqs=2, max_num_batched_tokens=40)
    reqs = [_request(i, 4, float(i)) for i in range(4)]
    for r in reqs:
        s.add(r)
    items = s.schedule()
    assert [it.request.request_id for it in items] == [0, 1]
    assert [r.request_id for r in s.waiting] == [2, 3]


def test_the_newest_request_is_preempted_even_when_its_item_comes_first():
    """The newest request decodes, so its item comes before two older requests' prefill chunks. When the first
    chunk finds no free block, the newest gives its blocks back; the next chunk still has to find its own blocks
    (dropping an earlier item must not skip a later one) - here it cannot, so that request preempts itself."""
    s = _scheduler(7, max_num_batched_tokens=20, prefill_chunk=8)   # 7 blocks of 4 slots
    a, c, b = _request(0, 30, 0.0), _request(1, 30, 1.0), _request(2, 4, 2.0)
    for r in (a, c, b):
        s.add(r)
    first = s.schedule()
    assert [(it.request.request_id, it.take) for it in first] == [(0, 8), (1, 8), (2, 4)]
    for it in first:
        it.request.num_computed += it.take
    b.output_ids.append(9)
    b.tokens.append(9)
    items = s.schedule()   # b decodes (a 2nd block); a's chunk needs 2 more blocks: b goes; c's then finds 1 free
    for it in items:
        assert len(it.request.block_table) * 4 >= it.request.num_computed + it.take, it.request.request_id
    assert [(it.request.request_id, it.take) for it in items] == [(0, 8)]
    assert b.status is Status.WAITING and c.status is Status.WAITING and not b.block_table and not c.block_table
    assert s.preemptions == 2 and [r.request_id for r in s.waiting] == [1, 2]
