"""The goodput controller: drafts are free at small batches, priced out of full ones, and follow acceptance."""
from __future__ import annotations

from types import SimpleNamespace

from leaplm.engine.goodput import GoodputController


def _requests(n: int, drafter) -> list:
    return [SimpleNamespace(request_id=i, drafter=drafter) for i in range(n)]


def _fit(ctrl: GoodputController, a: float, b: float) -> None:
    for n in (1, 4, 9, 16, 33, 64, 2, 40):
        ctrl.observe_pass(n, a + b * n)


def _learn(ctrl: GoodputController, reqs, accepted: int, drafted: int = 4, times: int = 20) -> None:
    for _ in range(times):
        for r in reqs:
            ctrl.observe_verdict(r, drafted, accepted, 0.0)


def test_the_pass_cost_is_fitted_from_pass_timings():
    ctrl = GoodputController(decay=1.0)
    _fit(ctrl, 0.02, 0.001)
    a, b = ctrl.pass_cost()
    assert abs(a - 0.02) < 1e-9 and abs(b - 0.001) < 1e-9


def test_before_any_measurement_every_request_drafts_its_cap_within_the_budget():
    ctrl = GoodputController()
    assert ctrl.budgets(_requests(3, object()), [4, 4, 4], 3, 3, 10) == [4, 4, 2]


def test_a_lone_request_keeps_its_drafters_length():
    ctrl = GoodputController()
    _fit(ctrl, 0.002, 0.002)                  # compute-bound: a batch would draft nothing
    _learn(ctrl, _requests(1, object()), accepted=0)
    assert ctrl.budgets(_requests(1, object()), [5], 1, 1, 10) == [5]


def test_drafting_is_taken_when_a_pass_is_memory_bound_and_refused_when_compute_bound():
    drafter = object()
    cheap, costly = GoodputController(), GoodputController()
    _fit(cheap, 0.030, 0.00005)        # 30 ms a pass, 0.05 ms a token: weights streaming dominates
    _fit(costly, 0.002, 0.002)         # 2 ms a token: compute-bound
    for ctrl in (cheap, costly):
        _learn(ctrl, _requests(16, drafter), accepted=1)   # alpha ~ 0.5
    reqs = _requests(16, drafter)
    assert all(k >= 3 for k in cheap.budgets(reqs, [6] * 16, 16, 16, 200))   # 0.5 ** 6 is not worth even 0.05 ms
    assert sum(costly.budgets(reqs, [6] * 16, 16, 16, 200)) == 0


def test_requests_that_accept_more_get_the_drafts():
    drafter = object()
    ctrl = GoodputController()
    _fit(ctrl, 0.010, 0.0015)
    good, bad = SimpleNamespace(request_id=1, drafter=drafter), SimpleNamespace(request_id=2, drafter=drafter)
    _learn(ctrl, [good], accepted=4)            # every draft token accepted
    _learn(ctrl, [bad], accepted=0)             # none
    out = ctrl.budgets([bad, good], [6, 6], 8, 8, 12)
    assert out[0] == 0 and out[1] > 0


def test_a_slow_drafter_drafts_less():
    fast, slow = object(), object()
    ctrl = GoodputController()
    _fit(ctrl, 0.010, 0.0002)
    rf, rs = SimpleNamespace(request_id=1, drafter=fast), SimpleNamespace(request_id=2, drafter=slow)
    for _ in range(20):
        ctrl.observe_verdict(rf, 4, 2, 0.0001)
        ctrl.observe_verdict(rs, 4, 2, 0.08)     # 80 ms a proposal: more than the passes it could save
    out = ctrl.budgets([rf, rs], [6, 6], 2, 2, 12)
    assert out[0] > 0 and out[1] == 0
