"""The goodput controller: how many draft tokens each speculating request gets in a step, so that speculation
never lowers throughput.

Why: at batch 1 a pass costs about the same for 1 or 8 tokens (the weights are streamed once either way), so
drafting is nearly free and every accepted token is a gain. As the batch grows the pass becomes compute-bound: each
extra token costs almost as much as a whole decode row, and a draft token that is rejected costs a full token of
compute for nothing. The controller prices both sides with measured numbers:

- **cost**: a pass of ``n`` tokens takes ``a + b * n`` seconds, fitted online (exponentially weighted least squares
  over the runner's passes), so each draft token costs ``b``; a request's first draft token also pays for its
  drafter's call (seconds per ``propose``, measured per drafter: most drafters' time is per call, not per token);
- **gain**: a request's draft token at depth ``j`` is accepted with probability ``alpha ** j``, where ``alpha`` is the
  request's acceptance rate (successes / (successes + failures): the geometric model's estimate, a failure being a
  step whose draft was cut short), started from its drafter's rate over all requests so far.

Draft tokens are then handed out greedily by expected gain per step (the next token of the request with the best
``alpha ** (k + 1)`` first) while the step's expected tokens per second still rise: a token of gain ``g`` is taken
when ``(T + g) / (t + c) > T / t`` for the step's expected tokens ``T``, time ``t`` and the token's cost ``c``. Each
request's drafter ``num_draft`` (and the tokens it may still generate) caps its share; ``budget`` caps the sum.
A step with a single decoding request keeps the drafter's own length: the controller is about sharing a pass, and
at batch 1 each drafter already sizes its draft by its own cost model.
"""
from __future__ import annotations

from dataclasses import dataclass

from .request import Request


@dataclass
class _Rate:
    success: float = 1.0   # prior: alpha = 0.5 until measured
    failure: float = 1.0

    @property
    def alpha(self) -> float:
        return self.success / (self.success + self.failure)


class GoodputController:
    def __init__(self, decay: float = 0.97, min_alpha: float = 0.05) -> None:
        self.decay = decay
        self.min_alpha = min_alpha
        # weighted sums for the fit t = a + b n
        self._w = self._n = self._t = self._nn = self._nt = 0.0
        self._drafters: dict[int, _Rate] = {}          # id(drafter) -> rate over its requests
        self._requests: dict[int, _Rate] = {}          # request id -> its own rate
        self._call_cost: dict[int, float] = {}         # id(drafter) -> seconds per propose call

    # ------------------------------------------------------------------ measurements
    def observe_pass(self, tokens: int, seconds: float) -> None:
        d = self.decay
        self._w = d * self._w + 1
        self._n = d * self._n + tokens
        self._t = d * self._t + seconds
        self._nn = d * self._nn + tokens * tokens
        self._nt = d * self._nt + tokens * seconds

    def pass_cost(self) -> tuple[float, float]:
        """``(a, b)``: seconds of a pass of ``n`` tokens ~ ``a + b * n`` (``b`` >= 0; before any spread of sizes was
        seen, ``b = 0``: drafting looks free, which is what a small batch measures)."""
        if self._w == 0:
            return 0.0, 0.0
        mean_n, mean_t = self._n / self._w, self._t / self._w
        var = self._nn / self._w - mean_n * mean_n
        if var <= 1e-9:
            return mean_t, 0.0
        b = max(0.0, (self._nt / self._w - mean_n * mean_t) / var)
        return max(0.0, mean_t - b * mean_n), b

    def observe_verdict(self, r: Request, drafted: int, accepted: int, draft_seconds: float) -> None:
        if drafted <= 0 or r.drafter is None:
            return
        failed = 1.0 if accepted < drafted else 0.0
        key = id(r.drafter)
        for rate in (self._requests.setdefault(r.request_id, self._start_rate(key)),
                     self._drafters.setdefault(key, _Rate())):
            rate.success += accepted
            rate.failure += failed
        old = self._call_cost.get(key)
        self._call_cost[key] = draft_seconds if old is None else 0.9 * old + 0.1 * draft_seconds

    def _start_rate(self, key: int) -> _Rate:
        shared = self._drafters.get(key)
        if shared is None:
            return _Rate()
        scale = 4.0 / (shared.success + shared.failure)   # the drafter's rate, worth 4 observations
        return _Rate(shared.success * scale, shared.failure * scale)

    def forget(self, request_id: int) -> None:
        self._requests.pop(request_id, None)

    def alpha(self, r: Request) -> float:
        rate = self._requests.get(r.request_id)
        if rate is None:
            rate = self._start_rate(id(r.drafter))
        return max(self.min_alpha, min(0.99, rate.alpha))

    # ------------------------------------------------------------------ the step's drafts
    def budgets(self, requests: list[Request], caps: list[int], step_tokens: int, step_yield: int,
                budget: int) -> list[int]:
        """Draft tokens for each of ``requests`` (speculating, decoding this step), each at most ``caps[i]``, all
        together at most ``budget``. Without drafts the step feeds ``step_tokens`` tokens and yields ``step_yield``
        (one per request that reaches the end of its tokens)."""
        out = [0] * len(requests)
        a, b = self.pass_cost()
        if (a == 0.0 and b == 0.0) or step_yield <= 1:   # nothing measured yet, or batch 1: the drafters' own lengths
            left = budget
            for i, cap in enumerate(caps):
                out[i] = max(0, min(cap, left))
                left -= out[i]
            return out
        alphas = [self.alpha(r) for r in requests]
        call = [self._call_cost.get(id(r.drafter), 0.0) for r in requests]
        costs = [b + c for c in call]    # the first token pays for the call; later ones cost b each
        gains = list(alphas)             # the next draft token's chance of being accepted, per request
        expected = float(max(1, step_yield))
        seconds = a + b * step_tokens
        for _ in range(max(0, budget)):
            best, best_ratio = -1, -1.0
            for i in range(len(requests)):
                if out[i] < caps[i]:
                    ratio = gains[i] / costs[i] if costs[i] > 0 else float("inf")
                    if ratio > best_ratio:
                        best, best_ratio = i, ratio
            # take it when the step's tokens per second rise: (T + g) / (t + c) > T / t  <=>  g t > T c
            if best < 0 or gains[best] * seconds <= expected * costs[best]:
                break
            out[best] += 1
            expected += gains[best]
            seconds += costs[best]
            gains[best] *= alphas[best]
            costs[best] = b
        return out
