"""Prometheus metrics of ``leaplm serve`` (``GET /metrics``), in a registry of their own (one per app).

Gauges read the engine's last step (``AsyncLLM.stats``) when scraped; counters and histograms are updated by the
routes as requests finish and tokens arrive. Names:

- ``leaplm_requests_running`` / ``leaplm_requests_waiting``: the engine's scheduler right now;
- ``leaplm_requests_total{status}``: finished requests, ``status`` one of ok, error, aborted, rejected;
- ``leaplm_generated_tokens_total`` and ``leaplm_prompt_tokens_total``;
- ``leaplm_kv_blocks_used`` / ``leaplm_kv_blocks_total`` / ``leaplm_kv_blocks_touched`` (ever written: resident) and
  ``leaplm_prefix_cache_hit_rate``;
- ``leaplm_ttft_seconds`` (request received -> first token) and ``leaplm_itl_seconds`` (gap between tokens; a
  delivery of k tokens is k gaps of gap/k) histograms;
- ``leaplm_spec_drafted_tokens_total{method}`` / ``leaplm_spec_accepted_tokens_total{method}``.
"""
from __future__ import annotations

from typing import Callable

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, generate_latest
from prometheus_client import CONTENT_TYPE_LATEST  # noqa: F401  (re-exported for the route)

_LATENCY_BUCKETS = (0.001, 0.0025, 0.005, 0.01, 0.02, 0.04, 0.08, 0.15, 0.3, 0.6, 1.2, 2.5, 5.0, 10.0, 30.0, 60.0)


class Metrics:
    def __init__(self, stats: Callable[[], dict]) -> None:
        self.registry = r = CollectorRegistry()
        self._stats = stats
        self.running = Gauge("leaplm_requests_running", "requests holding KV blocks and decoding", registry=r)
        self.waiting = Gauge("leaplm_requests_waiting", "requests queued for admission (or preempted)", registry=r)
        self.kv_used = Gauge("leaplm_kv_blocks_used", "KV blocks held by requests", registry=r)
        self.kv_total = Gauge("leaplm_kv_blocks_total", "KV blocks in the pool", registry=r)
        self.kv_touched = Gauge("leaplm_kv_blocks_touched", "KV blocks ever written (the pool's resident part)",
                                registry=r)
        self.hit_rate = Gauge("leaplm_prefix_cache_hit_rate", "prompt blocks found in the prefix cache / looked up",
                              registry=r)
        for gauge, key in ((self.running, "running"), (self.waiting, "waiting"), (self.kv_used, "kv_blocks_used"),
                           (self.kv_total, "kv_blocks_total"), (self.kv_touched, "kv_blocks_touched"),
                           (self.hit_rate, "prefix_cache_hit_rate")):
            gauge.set_function(lambda key=key: float(self._stats().get(key) or 0.0))
        self.requests = Counter("leaplm_requests", "finished requests by status", ["status"], registry=r)
        self.generated = Counter("leaplm_generated_tokens", "output tokens generated", registry=r)
        self.prompt = Counter("leaplm_prompt_tokens", "prompt tokens received", registry=r)
        self.ttft = Histogram("leaplm_ttft_seconds", "request received -> first token", buckets=_LATENCY_BUCKETS,
                              registry=r)
        self.itl = Histogram("leaplm_itl_seconds", "gap between a request's tokens", buckets=_LATENCY_BUCKETS,
                             registry=r)
        self.drafted = Counter("leaplm_spec_drafted_tokens", "draft tokens proposed", ["method"], registry=r)
        self.accepted = Counter("leaplm_spec_accepted_tokens", "draft tokens accepted", ["method"], registry=r)

    def tokens(self, n: int, gap_s: float | None) -> None:
        """``n`` tokens delivered, ``gap_s`` after the request's previous delivery (None: its first)."""
        self.generated.inc(n)
        if gap_s is not None and n:
            for _ in range(n):
                self.itl.observe(gap_s / n)

    def finished(self, status: str, stats: dict | None = None) -> None:
        self.requests.labels(status=status).inc()
        if stats and stats.get("speculative"):
            method = str(stats["speculative"])
            self.drafted.labels(method=method).inc(stats.get("drafted") or 0)
            self.accepted.labels(method=method).inc(stats.get("accepted") or 0)

    def render(self) -> bytes:
        return generate_latest(self.registry)
