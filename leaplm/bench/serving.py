"""``leaplm bench --concurrency``: a closed-loop serving benchmark, leaplm's engine and peer servers alike.

For each backend (a leaplm method on the continuous-batching engine, or a peer: ``llamacpp-server``,
``hf-serve``; see ``serving_peers``) and each concurrency ``C`` (ascending), ``run_closed_loop`` keeps ``C``
requests in flight: it submits the next prompt the moment one finishes, until ``n`` requests have finished.
Every backend gets the same prompts in the same order (``serving_prompts``) and greedy decoding.

The backend interface (``Backend``) is what makes one client loop drive them all::

    handle = backend.submit(prompt_ids, params)   # starts a request; raising = that request failed
    events = backend.poll(timeout)                # -> list[Delivery]: token deliveries, with the client's
                                                  #    clock at reception, and finishes / per-request errors
    backend.abort(handle); backend.close()
    backend.stats() -> dict | None                # engine counters (leaplm: prefix cache, KV blocks)
    backend.reset_cache() -> bool                 # forget cached prefixes before a timed run (True: done)
    backend.pid                                   # the process doing the generation (RSS is sampled there)

Metrics of one run (``run_metrics``; all times from the loop's clock, ``time.perf_counter`` by default):

* ``output_tokens_per_s`` - output tokens of the requests that finished without error / the loop's wall
  time (first submission to last finish);
* ``ttft_p50_s`` / ``ttft_p99_s`` - submission -> first token delivery, over the requests without error;
* ``itl_p50_s`` / ``itl_p99_s`` - inter-token latency: for each delivery after a request's first, the gap to
  its previous delivery; a delivery of ``n`` tokens counts as ``n`` gaps of ``gap / n``; pooled over the
  requests without error. Percentiles interpolate linearly between ranks (numpy's default, ``percentile``);
* ``errors`` - requests that failed (submit raised, the backend reported an error, or a poll raised: then
  every request in flight failed), each finished at once so the loop goes on;
* ``exact_match_vs_alone`` - fraction of the requests without error whose token ids equal the same
  backend's output for that prompt at concurrency 1 (``exact_match``); the concurrency-1 run covers every
  prompt any level uses. None when concurrency 1 is not in the sweep.
* ``peak_rss_mb`` - the largest RSS of ``backend.pid`` sampled every 20 ms during the timed loop
  (``RssSampler``): the in-process backends' whole process, the server process for ``llamacpp-server``;
* ``prefix_cache_hit_rate`` - leaplm: prompt blocks found in the prefix cache / looked up, during this run
  (the engine's ``prefix_cache_hits`` / ``prefix_cache_queries`` deltas; its cumulative
  ``prefix_cache_hit_rate`` when those counters are missing); peers: None.

``run_serving(cfg) -> dict`` runs the sweep and returns the ``results.json`` content (``serving_report`` writes
it, ``report.md`` and ``requests.jsonl``, and prints the table). A backend that cannot run gets rows with ``status`` ``"skipped: ..."`` or
``"failed: ..."``, never no row.
"""
from __future__ import annotations

import json
import math
import os
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Protocol

from . import BenchError
from ..speculative.registry import knob_value

SCHEMA = "leaplm-bench-serving/1"
SERVING_PEERS = ("llamacpp-server", "hf-serve")
DEFAULT_REQUEST_TIMEOUT_S = 900.0
ROW_METRICS = ("requests", "completed", "errors", "output_tokens", "wall_s", "output_tokens_per_s", "ttft_p50_s",
               "ttft_p99_s", "itl_p50_s", "itl_p99_s", "peak_rss_mb", "prefix_cache_hit_rate",
               "exact_match_vs_alone", "exact_match_compared", "max_in_flight", "long_prompt_tokens",
               "long_prompt_ttft_s", "itl_p99_growth_s")


# --------------------------------------------------------------------------- the backend interface


@dataclass
class Delivery:
    """What ``Backend.poll`` reports for one request: new tokens (possibly none), received at client time ``t``;
    ``finished`` ends the request (``finish_reason`` from the backend, or ``error`` set when it failed)."""
    handle: Any
    t: float
    token_ids: list[int] = field(default_factory=list)
    finished: bool = False
    finish_reason: str | None = None
    error: str | None = None


class Backend(Protocol):
    name: str
    info: dict
    pid: int | None

    def submit(self, prompt_ids: list[int], params) -> Any: ...
    def poll(self, timeout: float) -> list[Delivery]: ...
    def abort(self, handle: Any) -> None: ...
    def stats(self) -> dict | None: ...
    def reset_cache(self) -> bool: ...
    def close(self) -> None: ...


def error_text(e: BaseException) -> str:
    text = str(e).strip().splitlines()[0] if str(e).strip() else ""
    return f"{type(e).__name__}: {text}"[:300]


def error_message(body: str | dict) -> str:
    """What a server's error body says, at most 300 characters: ``error.message`` of an OpenAI- or llama.cpp-style
    body (JSON text or its parsed object), else its ``error`` value, else the body itself."""
    obj = body
    if isinstance(body, str):
        try:
            obj = json.loads(body)
        except ValueError:
            return body.strip()[:300]
        if not isinstance(obj, dict):
            return body.strip()[:300]
    err = obj.get("error") if isinstance(obj, dict) else None
    if isinstance(err, dict):
        return str(err.get("message") or err)[:300]
    return str(err or body)[:300]


# --------------------------------------------------------------------------- the closed loop


@dataclass
class RequestRecord:
    """One request of a run. ``index``: its prompt's position in the prompt list (also its submission order)."""
    index: int
    prompt_tokens: int
    submitted: float
    deliveries: list[tuple[float, int]] = field(default_factory=list)   # (client time, tokens delivered)
    token_ids: list[int] = field(default_factory=list)
    finished: float | None = None
    finish_reason: str | None = None
    error: str | None = None

    @property
    def ok(self) -> bool:
        return self.error is None and self.finished is not None


@dataclass
class LoopResult:
    records: list[RequestRecord]      # in prompt order
    wall_s: float
    max_in_flight: int
    concurrency: int
    extra: RequestRecord | None = None   # the injected request (``inject``), kept out of ``records``


def run_closed_loop(backend: Backend, prompts: list[list[int]], concurrency: int, params, *,
                    clock: Callable[[], float] = time.perf_counter, poll_timeout: float = 0.05,
                    request_timeout: float | None = DEFAULT_REQUEST_TIMEOUT_S,
                    on_finish: Callable[[RequestRecord], None] | None = None,
                    inject: tuple[int, list[int]] | None = None) -> LoopResult:
    """Run ``prompts`` (all of them, in order) through ``backend`` with ``concurrency`` requests in flight.

    Never more than ``concurrency`` requests are in flight; after each poll the finished requests' places are
    refilled with the next prompts at once. A request still unfinished ``request_timeout`` seconds after its
    submission is aborted and counted as an error. Returns every request's record, in prompt order.

    ``inject=(k, prompt)``: right after the ``k``-th submission, one more request with ``prompt`` arrives on top of
    the ``concurrency`` in flight (e.g. a 4,000-token prompt mid-run); its record is ``LoopResult.extra``, outside
    ``records`` and their metrics."""
    if concurrency < 1:
        raise BenchError(f"concurrency must be >= 1, got {concurrency}")
    pending = list(range(len(prompts)))[::-1]          # popped from the end: prompt order
    in_flight: dict[Any, RequestRecord] = {}
    records: dict[int, RequestRecord] = {}
    max_in_flight = 0
    submitted = 0
    extra: RequestRecord | None = None

    def finish(rec: RequestRecord, t: float, reason: str | None = None, error: str | None = None) -> None:
        rec.finished, rec.finish_reason = t, reason
        if error is not None:
            rec.error = error
        if on_finish is not None:
            on_finish(rec)

    started = clock()
    while pending or in_flight:
        while pending and len(in_flight) - (extra is not None and extra.finished is None) < concurrency:
            i = pending.pop()
            rec = records[i] = RequestRecord(i, len(prompts[i]), clock())
            try:
                handle = backend.submit(list(prompts[i]), params)
            except Exception as e:  # noqa: BLE001 - one failed request is a result
                finish(rec, clock(), error=error_text(e))
                continue
            in_flight[handle] = rec
            submitted += 1
            if inject is not None and extra is None and submitted >= inject[0]:
                extra = RequestRecord(-1, len(inject[1]), clock())
                try:
                    in_flight[backend.submit(list(inject[1]), params)] = extra
                except Exception as e:  # noqa: BLE001
                    finish(extra, clock(), error=error_text(e))
            max_in_flight = max(max_in_flight, len(in_flight))
        if not in_flight:
            continue
        try:
            events = backend.poll(poll_timeout)
        except Exception as e:  # noqa: BLE001 - the backend broke: every request in flight failed
            now, msg = clock(), error_text(e)
            for handle, rec in list(in_flight.items()):
                _abort(backend, handle)
                finish(rec, now, error=f"poll failed: {msg}")
            in_flight.clear()
            continue
        for ev in events:
            rec = in_flight.get(ev.handle)
            if rec is None:      # a warm-up leftover or an aborted request
                continue
            if ev.token_ids:
                rec.deliveries.append((ev.t, len(ev.token_ids)))
                rec.token_ids.extend(int(t) for t in ev.token_ids)
            if ev.error is not None or ev.finished:
                del in_flight[ev.handle]
                finish(rec, ev.t, ev.finish_reason, ev.error)
        if request_timeout is not None:
            now = clock()
            for handle, rec in list(in_flight.items()):
                if now - rec.submitted > request_timeout:
                    _abort(backend, handle)
                    del in_flight[handle]
                    finish(rec, now, error=f"timed out after {request_timeout:g} s")
    wall = clock() - started
    return LoopResult([records[i] for i in sorted(records)], wall, max_in_flight, concurrency, extra)


def _abort(backend: Backend, handle: Any) -> None:
    try:
        backend.abort(handle)
    except Exception:  # noqa: BLE001 - best effort
        pass


# --------------------------------------------------------------------------- metrics


def percentile(values: list[float], q: float) -> float | None:
    """The ``q``-th percentile (0..100) with linear interpolation between closest ranks (numpy's default);
    None for no values."""
    xs = sorted(values)
    if not xs:
        return None
    pos = (len(xs) - 1) * q / 100.0
    lo = math.floor(pos)
    hi = min(lo + 1, len(xs) - 1)
    return xs[lo] + (xs[hi] - xs[lo]) * (pos - lo)


def ttfts(records: list[RequestRecord]) -> list[float]:
    return [r.deliveries[0][0] - r.submitted for r in records if r.ok and r.deliveries]


def itl_gaps(records: list[RequestRecord]) -> list[float]:
    """Inter-token gaps of the requests without error (see the module docstring)."""
    gaps: list[float] = []
    for r in records:
        if not r.ok:
            continue
        for (t0, _), (t1, n) in zip(r.deliveries, r.deliveries[1:]):
            gaps.extend([(t1 - t0) / n] * n)
    return gaps


def exact_match(records: list[RequestRecord], reference: dict[int, list[int]] | None) -> tuple[float | None, int]:
    """``(fraction, compared)``: of the requests without error that have a reference output (by prompt index),
    the fraction whose token ids equal it exactly; ``(None, 0)`` when none can be compared."""
    if reference is None:
        return None, 0
    compared = [r for r in records if r.ok and r.index in reference]
    if not compared:
        return None, 0
    return sum(r.token_ids == reference[r.index] for r in compared) / len(compared), len(compared)


def run_metrics(result: LoopResult, reference: dict[int, list[int]] | None = None) -> dict:
    ok = [r for r in result.records if r.ok]
    out_tokens = sum(len(r.token_ids) for r in ok)
    t, g = ttfts(result.records), itl_gaps(result.records)
    em, compared = exact_match(result.records, reference)
    return {
        "requests": len(result.records), "completed": len(ok), "errors": len(result.records) - len(ok),
        "output_tokens": out_tokens, "wall_s": result.wall_s,
        "output_tokens_per_s": out_tokens / result.wall_s if result.wall_s > 0 else None,
        "ttft_p50_s": percentile(t, 50), "ttft_p99_s": percentile(t, 99),
        "itl_p50_s": percentile(g, 50), "itl_p99_s": percentile(g, 99),
        "exact_match_vs_alone": em, "exact_match_compared": compared, "max_in_flight": result.max_in_flight,
        "long_prompt_tokens": result.extra.prompt_tokens if result.extra is not None else None,
        "long_prompt_ttft_s": (result.extra.deliveries[0][0] - result.extra.submitted
                               if result.extra is not None and result.extra.ok and result.extra.deliveries else None),
        "itl_p99_growth_s": None,
    }


class RssSampler:
    """Samples the RSS of process ``pid`` (None: this process) every ``interval`` s in a thread, from ``start()``
    to ``stop()``; ``peak_mb`` is the largest sample (None when nothing could be read).

    ``tree=True``: the RSS of ``pid`` plus all its descendants (a server whose model runs in a child process,
    e.g. ``transformers serve``; pages shared between them count once per process; needs psutil, else ``pid``
    alone). ``keep_series=True``: every sample is kept in ``series`` as ``(clock(), bytes)``. ``sample()`` takes
    one sample now (also kept) and returns it in bytes."""

    def __init__(self, pid: int | None = None, interval: float = 0.02, *, tree: bool = False,
                 keep_series: bool = False, clock: Callable[[], float] = time.perf_counter) -> None:
        self.pid = pid if pid is not None else os.getpid()
        self.interval, self.tree, self.keep_series, self.clock = interval, tree, keep_series, clock
        self.peak: int | None = None
        self.series: list[tuple[float, int]] = []
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None

    def _read_one(self, pid: int) -> int | None:
        try:
            with open(f"/proc/{pid}/statm") as f:
                return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")
        except (OSError, ValueError, IndexError):
            try:
                import psutil

                return psutil.Process(pid).memory_info().rss
            except Exception:  # noqa: BLE001
                return None

    def _read(self) -> int | None:
        rss = self._read_one(self.pid)
        if rss is None or not self.tree:
            return rss
        try:
            import psutil

            children = [c.pid for c in psutil.Process(self.pid).children(recursive=True)]
        except Exception:  # noqa: BLE001 - no psutil, or the process is gone: the process alone
            return rss
        return rss + sum(r for r in map(self._read_one, children) if r is not None)

    def sample(self) -> int | None:
        rss = self._read()
        if rss is not None:
            if self.peak is None or rss > self.peak:
                self.peak = rss
            if self.keep_series:
                self.series.append((self.clock(), rss))
        return rss

    def _run(self) -> None:
        while not self._stop.wait(self.interval):
            self.sample()

    def start(self) -> "RssSampler":
        self.sample()
        self._thread = threading.Thread(target=self._run, daemon=True, name="rss-sampler")
        self._thread.start()
        return self

    def stop(self) -> float | None:
        self._stop.set()
        if self._thread is not None:
            self._thread.join()
        self.sample()
        return self.peak_mb

    @property
    def peak_mb(self) -> float | None:
        return self.peak / 2**20 if self.peak is not None else None


# --------------------------------------------------------------------------- leaplm's engine


class LeapLMBackend:
    """leaplm in-process: ``engine.add_request`` per submit, one ``engine.step()`` per poll, deliveries stamped
    with ``clock()`` right after the step returns. ``speculative``: None (plain decoding) or what
    ``add_request(speculative=...)`` takes."""

    def __init__(self, engine, speculative=None, name: str = "vanilla", clock: Callable[[], float] = time.perf_counter,
                 info: dict | None = None) -> None:
        missing = [m for m in ("add_request", "step", "abort", "has_unfinished") if not hasattr(engine, m)]
        if missing:
            raise BenchError(f"leaplm's engine ({type(engine).__name__}) has no {', '.join(missing)}: the "
                             "continuous-batching engine (leaplm.engine.LLMEngine) is needed for --concurrency")
        self.engine, self.speculative, self.name, self.clock = engine, speculative, name, clock
        self.info = dict(info or {})
        self.pid = None
        self.live: set[int] = set()

    def submit(self, prompt_ids: list[int], params) -> int:
        rid = self.engine.add_request(prompt_ids, params, speculative=self.speculative)
        self.live.add(rid)
        return rid

    def poll(self, timeout: float) -> list[Delivery]:
        if not self.engine.has_unfinished():
            now = self.clock()
            lost = [Delivery(rid, now, error="the engine reports no unfinished request but this one never finished")
                    for rid in sorted(self.live)]
            self.live.clear()
            return lost
        outs = self.engine.step()
        now = self.clock()
        events = []
        for o in outs:
            if o.request_id not in self.live:
                continue
            done = o.finish_reason is not None
            events.append(Delivery(o.request_id, now, list(o.new_token_ids), done, o.finish_reason))
            if done:
                self.live.discard(o.request_id)
                release = getattr(self.engine, "release", None)
                if release is not None:
                    release(o.request_id)
        return events

    def abort(self, handle: int) -> None:
        self.live.discard(handle)
        self.engine.abort(handle)

    def stats(self) -> dict | None:
        stats = getattr(self.engine, "stats", None)
        return dict(stats()) if stats is not None else None

    def reset_cache(self) -> bool:
        for owner in (self.engine, getattr(self.engine, "blocks", None)):
            reset = getattr(owner, "reset_prefix_cache", None)
            if reset is not None:
                reset()
                return True
        return False

    def close(self) -> None:
        for rid in list(self.live):
            self.abort(rid)


def prefix_hit_rate(before: dict | None, after: dict | None) -> float | None:
    """This run's prefix-cache hit rate from the engine's counters before/after it (see the module docstring)."""
    if not after:
        return None
    keys = ("prefix_cache_hits", "prefix_cache_queries")
    if before and all(isinstance(before.get(k), (int, float)) and isinstance(after.get(k), (int, float)) for k in keys):
        queries = after["prefix_cache_queries"] - before["prefix_cache_queries"]
        return (after["prefix_cache_hits"] - before["prefix_cache_hits"]) / queries if queries > 0 else 0.0
    rate = after.get("prefix_cache_hit_rate")
    return float(rate) if isinstance(rate, (int, float)) else None


# --------------------------------------------------------------------------- the sweep


@dataclass
class ServingConfig:
    workload: str
    concurrency: list[int]
    model: str | None = None
    draft_model: str | None = None
    limit: int | None = None
    requests: int | None = None
    max_tokens: int = 256
    methods: str | None = None
    peers: str | None = None
    threads: int | None = None
    warmup: int = 1
    dtype: str | None = None
    quantization: str | None = None
    device: str | None = None
    compile: bool = False
    llama_server: str | None = None
    request_timeout: float = DEFAULT_REQUEST_TIMEOUT_S
    out: Path | None = None
    command: list[str] = field(default_factory=list)
    progress: bool = True
    long_prompt: int | None = None     # tokens of a prompt arriving mid-run at each level > 1 (extra "+long" rows)


def parse_concurrency(text: str | int | list) -> list[int]:
    """``"1,4,16"`` -> ``[1, 4, 16]`` (sorted, unique); each level an integer >= 1."""
    items = text if isinstance(text, list) else str(text).split(",")
    levels = []
    for item in items:
        item = str(item).strip()
        if not item:
            continue
        try:
            value = int(item)
        except ValueError:
            raise BenchError(f"--concurrency: {item!r} is not an integer (give e.g. 1,4,16,64)") from None
        if value < 1:
            raise BenchError(f"--concurrency: every level must be >= 1, got {value}")
        levels.append(value)
    if not levels:
        raise BenchError("--concurrency needs at least one level, e.g. 1,4,16,64")
    return sorted(set(levels))


def parse_serving_peers(text: str | None) -> list[str]:
    names = list(dict.fromkeys(t.strip() for t in (text or "").split(",") if t.strip()))
    bad = [n for n in names if n not in SERVING_PEERS]
    if bad:
        raise BenchError(f"unknown serving peer {bad[0]!r} for --concurrency; known: {', '.join(SERVING_PEERS)}")
    return names


def parse_serving_methods(text: str | None, draft_model: str | None = None) -> list[tuple[str, Any]]:
    """``--methods`` -> ``[(label, speculative)]``, ``vanilla`` (speculative None) first. An entry is a drafter
    name with optional knobs, ``name:k=v[:k=v]``, passed to ``add_request`` as ``{"method": name, **knobs}``
    (the name alone without knobs); draft-model methods get ``model=--draft-model``."""
    out: list[tuple[str, Any]] = [("vanilla", None)]
    for entry in (t.strip() for t in (text or "").split(",")):
        if not entry or entry == "vanilla" or entry in (label for label, _ in out):
            continue
        name, *parts = entry.split(":")
        knobs = {}
        for part in parts:
            key, eq, value = part.partition("=")
            if not eq or not key:
                raise BenchError(f"method knob {part!r} in {entry!r} must be name=value")
            knobs[key] = knob_value(value)
        if name in ("draft", "draft_model", "rasd") and "model" not in knobs:
            if draft_model is None:
                raise BenchError(f"method {name!r} needs --draft-model")
            knobs["model"] = draft_model
        out.append((entry, {"method": name, **knobs} if knobs else name))
    return out


def requests_for(concurrency: int, requests: int | None, n_prompts: int) -> int:
    """Requests of one level: ``--requests`` when given, else ``2 * concurrency``; at most ``n_prompts``."""
    return min(requests if requests is not None else 2 * concurrency, n_prompts)


def interleave_categories(samples: list) -> list:
    """``samples`` reordered one of each category in turn (categories in order of first appearance, each
    category's samples in their order), so that the first ``n`` mix the categories."""
    by_cat: dict[str, list] = {}
    for s in samples:
        by_cat.setdefault(s.category, []).append(s)
    order = []
    for i in range(max((len(v) for v in by_cat.values()), default=0)):
        order += [v[i] for v in by_cat.values() if i < len(v)]
    return order


def serving_prompts(target, workload, max_tokens: int) -> tuple[list[list[int]], list[str]]:
    """Token ids of the workload's prompts (first turn, the model's chat template as ``runner.render_prompt``),
    in a fixed order that interleaves the categories (one of each in turn, each in file order), so the first
    ``n`` requests mix the categories; prompts the context window cannot hold with ``max_tokens`` are left out.
    Returns ``(prompts, sample ids)``."""
    from .runner import render_prompt

    prompts, ids = [], []
    window = target.engine.max_model_len
    for s in interleave_categories(workload.samples):
        p = render_prompt(target, s, 0, [])
        if 0 < len(p) and len(p) + max_tokens <= window:
            prompts.append(p)
            ids.append(f"{s.category}/{s.id}")
    if not prompts:
        raise BenchError(f"no prompt of workload {workload.name!r} fits the context window ({window} tokens) with "
                         f"--max-tokens {max_tokens}")
    return prompts, ids


def empty_row(name: str, kind: str, concurrency: int, status: str, info: dict | None = None) -> dict:
    return {"method": name, "kind": kind, "concurrency": concurrency, "status": status,
            **{k: None for k in ROW_METRICS}, "error_messages": [], "info": dict(info or {})}


@dataclass
class Sweep:
    """One backend's runs over the concurrency levels. ``make(c)`` returns the backend for level ``c``
    (it may return the same object each time); ``done(backend)`` is called after each level's run."""
    name: str
    kind: str                                    # "method" | "peer"
    make: Callable[[int], Backend]
    done: Callable[[Backend], None] = lambda b: None
    finish: Callable[[], None] = lambda: None


def run_sweep(sweep: Sweep, prompts: list[list[int]], levels: list[int], n_requests: Callable[[int], int], params, *,
              warmup: int = 1, request_timeout: float | None = DEFAULT_REQUEST_TIMEOUT_S,
              clock: Callable[[], float] = time.perf_counter, log: Callable[[str], None] | None = None,
              records_out: list[dict] | None = None, long_prompt: list[int] | None = None) -> list[dict]:
    """The rows of one backend, one per level (ascending). The level-1 run covers the prompts of every level
    (it is the exact-match reference). A level whose backend cannot be made gets a ``failed: ...`` row.

    ``long_prompt``: at every level above 1, a second run of the same requests into which that prompt arrives
    after half of them were submitted (``run_closed_loop``'s ``inject``); its row is named ``"NAME +long"`` and
    has ``long_prompt_ttft_s`` and ``itl_p99_growth_s`` (its ITL p99 minus the plain run's)."""
    rows: list[dict] = []
    reference: dict[int, list[int]] | None = None
    most = max(n_requests(c) for c in levels)
    try:
        for c in levels:
            n = most if c == 1 else n_requests(c)
            try:
                backend = sweep.make(c)
            except Exception as e:  # noqa: BLE001
                rows.append(empty_row(sweep.name, sweep.kind, c, _status(e)))
                if log:
                    log(f"{sweep.name} C={c}: {rows[-1]['status']}")
                continue
            try:
                row = _run_level(sweep, backend, prompts[:n], c, params, reference, warmup, request_timeout, clock,
                                 records_out)
            finally:
                sweep.done(backend)
            if c == 1 and row["status"] == "ok":   # the reference itself: every request equals its alone output
                reference = row.pop("_outputs")
                row["exact_match_vs_alone"], row["exact_match_compared"] = (1.0, len(reference)) if reference else (None, 0)
            row.pop("_outputs", None)
            rows.append(row)
            if log:
                _log_row(log, sweep.name, c, row)
            if long_prompt is not None and c > 1 and row["status"] == "ok":
                backend = sweep.make(c)
                try:
                    extra = _run_level(sweep, backend, prompts[:n], c, params, reference, 0, request_timeout, clock,
                                       records_out, inject=(max(1, n // 2), long_prompt), label=f"{sweep.name} +long")
                finally:
                    sweep.done(backend)
                extra.pop("_outputs", None)
                if extra["itl_p99_s"] is not None and row["itl_p99_s"] is not None:
                    extra["itl_p99_growth_s"] = extra["itl_p99_s"] - row["itl_p99_s"]
                rows.append(extra)
                if log:
                    _log_row(log, extra["method"], c, extra)
    finally:
        sweep.finish()
    return rows


def _log_row(log: Callable[[str], None], name: str, c: int, row: dict) -> None:
    log(f"{name} C={c}: {fmt_num(row.get('output_tokens_per_s'), '{:.1f}')} tok/s, TTFT p50 "
        f"{fmt_num(row.get('ttft_p50_s'), '{:.3f}')} s, ITL p50 {fmt_num(row.get('itl_p50_s'), '{:.4f}')} s, "
        f"ITL p99 {fmt_num(row.get('itl_p99_s'), '{:.4f}')} s, {row.get('errors')} errors, exact "
        f"{fmt_num(row.get('exact_match_vs_alone'), '{:.2f}')}"
        + (f", long prompt TTFT {fmt_num(row.get('long_prompt_ttft_s'), '{:.3f}')} s" if row.get("long_prompt_tokens") else ""))


def _status(e: BaseException) -> str:
    return e.status if isinstance(getattr(e, "status", None), str) else f"failed: {error_text(e)}"


def _run_level(sweep: Sweep, backend: Backend, prompts, c, params, reference, warmup, request_timeout, clock,
               records_out, inject: tuple[int, list[int]] | None = None, label: str | None = None) -> dict:
    info = dict(getattr(backend, "info", {}) or {})
    name = label or sweep.name
    try:
        if warmup > 0:   # untimed: the first prompt(s) alone
            run_closed_loop(backend, prompts[:warmup], 1, params, clock=clock, request_timeout=request_timeout)
        info["prefix_cache_reset"] = backend.reset_cache()
        before = backend.stats()
        sampler = RssSampler(backend.pid).start()
        try:
            result = run_closed_loop(backend, prompts, c, params, clock=clock, request_timeout=request_timeout,
                                     inject=inject)
        finally:
            peak = sampler.stop()
        after = backend.stats()
    except Exception as e:  # noqa: BLE001 - the run itself broke (not one request)
        return empty_row(sweep.name, sweep.kind, c, f"failed: {error_text(e)}", info)
    row = {"method": name, "kind": sweep.kind, "concurrency": c, "status": "ok", **run_metrics(result, reference),
           "peak_rss_mb": peak, "prefix_cache_hit_rate": prefix_hit_rate(before, after) if sweep.kind == "method" else None,
           "error_messages": sorted({r.error for r in result.records if r.error})[:5], "info": info}
    if after and sweep.kind == "method":
        row["engine_stats"] = after
    row = {k: row[k] for k in ("method", "kind", "concurrency", "status", *ROW_METRICS, "error_messages", "info",
                                *(["engine_stats"] if "engine_stats" in row else []))}
    row["_outputs"] = {r.index: r.token_ids for r in result.records if r.ok}
    if records_out is not None:
        for r in result.records:
            records_out.append({"method": name, "concurrency": c, "index": r.index, "prompt_tokens": r.prompt_tokens,
                                "submitted": r.submitted, "finished": r.finished, "finish_reason": r.finish_reason,
                                "ttft_s": r.deliveries[0][0] - r.submitted if r.deliveries else None,
                                "deliveries": [[t - r.submitted, n] for t, n in r.deliveries],
                                "token_ids": r.token_ids, "error": r.error})
    return row


def fmt_num(v, pattern: str) -> str:
    """``pattern.format(v)``, or an em dash for None / not finite."""
    return "—" if v is None or (isinstance(v, float) and not math.isfinite(v)) else pattern.format(v)
