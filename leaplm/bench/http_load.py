"""``leaplm bench-serve``'s load client: ``C`` streaming chat requests in flight against an OpenAI-compatible
server on this machine (closed loop), and the metrics of one run.

``run_level(base_url, prompts, concurrency, n, ...) -> LevelResult`` (``run_level_sync`` wraps it in
``asyncio.run``): ``concurrency`` workers share one ``httpx`` ``AsyncClient``; each takes the next request
number ``i < n`` and streams ``POST {base_url}/v1/chat/completions`` with ``messages = prompts[i % len(prompts)]``,
``stream: true``, ``stream_options: {"include_usage": true}``, ``temperature: 0``, ``max_tokens`` and, when
given, ``model``; the moment a request ends the worker sends the next one, so ``concurrency`` requests are in
flight until ``n`` have finished. Bounds: a request still running ``request_timeout`` s after it was sent is
cancelled (its connection closed) and counted as an error; once ``level_timeout`` s have passed since the
first submission no request is sent any more, the ones in flight are cancelled as errors and the rest are
``not_submitted``. Only loopback URLs are accepted (``check_loopback``): this tool never loads another machine.

Each request's ``HttpRecord`` holds its submission time, every SSE chunk that carried text (client time at
reception, text), the ``finish_reason`` (and when it came), ``usage``, the ``leaplm`` stats chunk field when
the server sends one, and ``error``: ``HTTP <status>: <message>``, ``SSE error: <message>`` (an error chunk in
the stream), ``timed out after ...``, or the client exception. A response without error is *truncated* when
its stream ended without a ``finish_reason`` or without ``usage``.

``count_tokens(records, count)`` then sets each record's ``output_tokens`` (``usage.completion_tokens``; else
``count(text)`` with the model's tokenizer; else the number of text chunks) and its ``deliveries`` ``[(t, k)]``:
the tokens each text chunk carried. One token per chunk when the chunks are as many as the tokens (or one
fewer: an end-of-sequence token has no text); otherwise ``k`` is what the chunk adds to the tokenizer's count of
the text so far (at least 1). ``level_metrics(result)`` -> the row's numbers, with ``serving``'s definitions:

* ``output_tokens_per_s``: output tokens of the completed requests (no error, not truncated) / the run's wall
  time (first submission to last end); ``requests_per_s`` likewise;
* ``ttft_p50_s`` / ``ttft_p99_s``: submission -> first chunk with text, over the completed requests
  (``serving.ttfts``);
* ``itl_p50_s`` / ``itl_p99_s``: gaps between a request's consecutive text chunks, a chunk of ``k`` tokens
  counting as ``k`` gaps of ``gap / k`` (``serving.itl_gaps``), pooled over the completed requests;
* ``errors``, ``truncated``, ``completed``, ``not_submitted``, ``max_in_flight``, ``hit_time_bound``.

``rss_summary(sampler, t0, after_n, t1)`` -> the ``rss_*`` fields from an ``RssSampler`` series of the
server's process tree: at the run's start, after its first ``RSS_MARK`` (100) requests ended, at its end,
the peak in between, and ``rss_end_over_after_100``.
"""
from __future__ import annotations

import asyncio
import ipaddress
import json
import time
from dataclasses import dataclass, field
from typing import Callable
from urllib.parse import urlparse

from . import BenchError
from .serving import RssSampler, error_message, error_text, itl_gaps, percentile, ttfts

DEFAULT_MAX_TOKENS = 128
DEFAULT_REQUEST_TIMEOUT_S = 600.0
RSS_MARK = 100            # the "after the first N requests" RSS reference
CHAT_PATH = "/v1/chat/completions"


def httpx_module():
    """The ``httpx`` module (the package is called ``httpx2`` in some environments; same API)."""
    try:
        import httpx
    except ImportError:
        try:
            import httpx2 as httpx
        except ImportError:
            raise BenchError("bench-serve needs the httpx package: pip install httpx") from None
    return httpx


# --------------------------------------------------------------------------- loopback URLs


def check_loopback(url: str) -> str:
    """``url`` -> its base (``http://host:port``, no trailing ``/`` or ``/v1``); raises ``BenchError`` unless it
    is an http(s) URL whose host is ``localhost`` or a loopback address (127.0.0.0/8, ::1)."""
    u = urlparse(url.strip())
    if u.scheme not in ("http", "https") or not u.hostname:
        raise BenchError(f"--url {url!r} is not an http:// URL with a host, e.g. http://127.0.0.1:8000")
    host = u.hostname
    try:
        loopback = host == "localhost" or ipaddress.ip_address(host).is_loopback
    except ValueError:
        loopback = False
    if not loopback:
        raise BenchError(f"--url {url!r}: host {host!r} is not this machine; bench-serve only loads servers on "
                         "loopback (127.0.0.1, ::1 or localhost)")
    path = u.path.rstrip("/")
    if path.endswith("/v1"):
        path = path[:-3]
    return f"{u.scheme}://{u.netloc}{path}"


# --------------------------------------------------------------------------- one request


@dataclass
class HttpRecord:
    """One request of a run; times are the run's clock. ``index``: its number in the run (submission order);
    ``prompt``: the index of its messages in the prompt list."""
    index: int
    prompt: int
    submitted: float
    chunks: list[tuple[float, str]] = field(default_factory=list)    # (client time, text) of chunks with text
    finished: float | None = None
    finish_reason: str | None = None
    finish_t: float | None = None
    usage: dict | None = None
    leaplm: dict | None = None
    error: str | None = None
    done: bool = False                                             # the stream's `data: [DONE]` arrived
    output_tokens: int | None = None                               # set by count_tokens
    counted_by: str | None = None                                  # "usage" | "tokenizer" | "chunks"
    deliveries: list[tuple[float, int]] = field(default_factory=list)   # (client time, tokens) per text chunk

    @property
    def text(self) -> str:
        return "".join(t for _, t in self.chunks)

    @property
    def truncated(self) -> bool:
        return self.error is None and (self.finish_reason is None or self.usage is None)

    @property
    def ok(self) -> bool:
        return self.error is None and not self.truncated and self.finished is not None


def _apply_event(rec: HttpRecord, event: dict, now: float) -> None:
    """One parsed SSE ``data:`` object into ``rec`` (choice 0's text and finish, usage, leaplm stats, errors)."""
    if "error" in event:
        rec.error = f"SSE error: {error_message(event)}"
        return
    for choice in event.get("choices") or []:
        if choice.get("index", 0) != 0:
            continue
        content = (choice.get("delta") or {}).get("content")
        if content is None:
            content = choice.get("text")       # /v1/completions-shaped chunks
        if content:
            rec.chunks.append((now, content))
        if choice.get("finish_reason") is not None:
            rec.finish_reason, rec.finish_t = str(choice["finish_reason"]), now
    if isinstance(event.get("usage"), dict):
        rec.usage = event["usage"]
    if isinstance(event.get("leaplm"), dict):
        rec.leaplm = event["leaplm"]


async def stream_chat(client, url: str, body: dict, rec: HttpRecord, clock: Callable[[], float],
                      headers: dict | None = None) -> None:
    """Send one streaming request and fill ``rec`` as its chunks arrive (never raises but for cancellation)."""
    try:
        async with client.stream("POST", url, json=body, headers=headers) as resp:
            if resp.status_code != 200:
                raw = (await resp.aread())[:4000].decode(errors="replace")
                rec.error = f"HTTP {resp.status_code}: {error_message(raw)}"
                return
            async for line in resp.aiter_lines():
                if not line.startswith("data:"):
                    continue                      # blank separators, comments, event: lines
                now = clock()
                payload = line[5:].strip()
                if payload == "[DONE]":
                    rec.done = True
                    break
                try:
                    event = json.loads(payload)
                except ValueError:
                    rec.error = f"bad SSE data: {payload[:200]!r}"
                    return
                if isinstance(event, dict):
                    _apply_event(rec, event, now)
                if rec.error is not None:
                    return
    except asyncio.CancelledError:
        raise
    except Exception as e:  # noqa: BLE001 - one failed request is a result
        rec.error = error_text(e)
    finally:
        rec.finished = clock()


# --------------------------------------------------------------------------- the closed loop


@dataclass
class LevelResult:
    records: list[HttpRecord]     # the submitted requests, in submission order
    requested: int
    concurrency: int
    wall_s: float
    max_in_flight: int
    hit_time_bound: bool


def request_body(messages: list[dict], max_tokens: int, model: str | None, extra: dict | None = None) -> dict:
    body = {"messages": messages, "max_tokens": int(max_tokens), "temperature": 0.0, "stream": True,
            "stream_options": {"include_usage": True}}
    if model is not None:
        body["model"] = model
    return {**body, **(extra or {})}


async def run_level(base_url: str, prompts: list[list[dict]], concurrency: int, n: int, *,
                    max_tokens: int = DEFAULT_MAX_TOKENS, model: str | None = None,
                    request_timeout: float = DEFAULT_REQUEST_TIMEOUT_S, level_timeout: float | None = None,
                    api_key: str | None = None, extra_body: dict | None = None,
                    clock: Callable[[], float] = time.perf_counter,
                    on_finish: Callable[[HttpRecord], None] | None = None) -> LevelResult:
    """Run ``n`` requests with ``concurrency`` in flight (see the module docstring)."""
    if concurrency < 1 or n < 0:
        raise BenchError(f"concurrency must be >= 1 and requests >= 0, got {concurrency} and {n}")
    if not prompts:
        raise BenchError("no prompts to send")
    httpx = httpx_module()
    url = check_loopback(base_url) + CHAT_PATH
    headers = {"Authorization": f"Bearer {api_key}"} if api_key else None
    records: list[HttpRecord] = []
    state = {"next": 0, "in_flight": 0, "max": 0, "bound": False}
    started = clock()
    deadline = started + level_timeout if level_timeout is not None else None

    async def worker(client) -> None:
        while state["next"] < n:
            now = clock()
            if deadline is not None and now >= deadline:
                state["bound"] = True
                return
            i = state["next"]
            state["next"] += 1
            rec = HttpRecord(i, i % len(prompts), now)
            records.append(rec)
            state["in_flight"] += 1
            state["max"] = max(state["max"], state["in_flight"])
            limit = request_timeout if deadline is None else min(request_timeout, deadline - now)
            body = request_body(prompts[rec.prompt], max_tokens, model, extra_body)
            try:
                await asyncio.wait_for(stream_chat(client, url, body, rec, clock, headers), limit)
            except asyncio.TimeoutError:   # the builtin TimeoutError from Python 3.11 on
                rec.finished = clock()
                if limit < request_timeout:
                    state["bound"] = True
                    rec.error = f"cancelled: the run's time bound ({level_timeout:g} s) ran out"
                else:
                    rec.error = f"timed out after {request_timeout:g} s"
            state["in_flight"] -= 1
            if on_finish is not None:
                on_finish(rec)

    limits = httpx.Limits(max_connections=concurrency, max_keepalive_connections=concurrency)
    timeout = httpx.Timeout(request_timeout + 5.0, connect=30.0)
    async with httpx.AsyncClient(limits=limits, timeout=timeout, trust_env=False) as client:
        await asyncio.gather(*(worker(client) for _ in range(concurrency)))
    ends = [r.finished for r in records if r.finished is not None]
    wall = (max(ends) - started) if ends else 0.0
    return LevelResult(records, n, concurrency, wall, state["max"], state["bound"])


def run_level_sync(*args, **kwargs) -> LevelResult:
    """``run_level`` in a fresh event loop."""
    return asyncio.run(run_level(*args, **kwargs))


# --------------------------------------------------------------------------- tokens and metrics


def tokens_per_chunk(pieces: list[str], n_tokens: int | None, count: Callable[[str], int] | None) -> list[int]:
    """How many tokens each text chunk carried (see the module docstring)."""
    if n_tokens is None or count is None or n_tokens - len(pieces) <= 1:
        return [1] * len(pieces)
    ks, before, text = [], 0, ""
    for piece in pieces:
        text += piece
        now = count(text)
        ks.append(max(1, now - before))
        before = max(before, now)
    return ks


def count_tokens(records: list[HttpRecord], count: Callable[[str], int] | None = None) -> None:
    """Set ``output_tokens``, ``counted_by`` and ``deliveries`` of every record (see the module docstring)."""
    for r in records:
        completion = (r.usage or {}).get("completion_tokens")
        if isinstance(completion, int) and completion >= 0:
            r.output_tokens, r.counted_by = completion, "usage"
        elif count is not None:
            r.output_tokens, r.counted_by = count(r.text), "tokenizer"
        else:
            r.output_tokens, r.counted_by = len(r.chunks), "chunks"
        ks = tokens_per_chunk([t for _, t in r.chunks], r.output_tokens, count)
        r.deliveries = [(t, k) for (t, _), k in zip(r.chunks, ks)]


LEVEL_METRICS = ("requests", "submitted", "completed", "errors", "truncated", "not_submitted", "output_tokens",
                 "wall_s", "output_tokens_per_s", "requests_per_s", "ttft_p50_s", "ttft_p99_s", "itl_p50_s",
                 "itl_p99_s", "max_in_flight", "hit_time_bound")


def level_metrics(result: LevelResult) -> dict:
    """The numbers of one run (``LEVEL_METRICS``), after ``count_tokens``."""
    recs = result.records
    ok = [r for r in recs if r.ok]
    out = sum(r.output_tokens or 0 for r in ok)
    t, g = ttfts(recs), itl_gaps(recs)
    wall = result.wall_s
    return {
        "requests": result.requested, "submitted": len(recs), "completed": len(ok),
        "errors": sum(r.error is not None for r in recs), "truncated": sum(r.truncated for r in recs),
        "not_submitted": result.requested - len(recs), "output_tokens": out, "wall_s": wall,
        "output_tokens_per_s": out / wall if wall > 0 else None,
        "requests_per_s": len(ok) / wall if wall > 0 else None,
        "ttft_p50_s": percentile(t, 50), "ttft_p99_s": percentile(t, 99),
        "itl_p50_s": percentile(g, 50), "itl_p99_s": percentile(g, 99),
        "max_in_flight": result.max_in_flight, "hit_time_bound": result.hit_time_bound,
    }


def leaplm_stats(records: list[HttpRecord]) -> dict | None:
    """Means of the numeric ``leaplm`` stats fields over the completed requests that carry them; None if none."""
    sums: dict[str, list[float]] = {}
    for r in records:
        if r.ok and r.leaplm:
            for k, v in r.leaplm.items():
                if isinstance(v, (int, float)) and not isinstance(v, bool):
                    sums.setdefault(k, []).append(float(v))
    return {f"mean_{k}": sum(v) / len(v) for k, v in sums.items()} or None


def record_json(r: HttpRecord) -> dict:
    """One line of ``requests.jsonl``: times relative to the submission."""
    rel = (lambda t: None if t is None else t - r.submitted)  # noqa: E731
    return {"index": r.index, "prompt": r.prompt, "submitted": r.submitted,
            "ttft_s": rel(r.chunks[0][0]) if r.chunks else None, "end_s": rel(r.finished), "finish_reason": r.finish_reason, "finish_s": rel(r.finish_t),
            "usage": r.usage, "leaplm": r.leaplm, "error": r.error, "truncated": r.truncated, "done": r.done,
            "output_tokens": r.output_tokens, "counted_by": r.counted_by,
            "deliveries": [[rel(t), k] for t, k in r.deliveries], "text": r.text}


# --------------------------------------------------------------------------- server RSS


RSS_FIELDS = ("rss_start_mb", "rss_after_100_mb", "rss_end_mb", "rss_peak_mb", "rss_end_over_after_100")


def rss_summary(series: list[tuple[float, int]], t0: float, t_mark: float | None, t1: float) -> dict:
    """The ``RSS_FIELDS`` of a run from ``series`` (``(time, bytes)`` samples in time order): the last sample at
    or before ``t0`` (else the first one), the first sample at or after ``t_mark`` (the ``RSS_MARK``-th request's
    end; None: fewer requests), the first at or after ``t1`` (else the last), the peak within [t0, t1]."""
    mb = 2.0 ** 20
    none = dict.fromkeys(RSS_FIELDS)
    if not series:
        return none
    before = [v for t, v in series if t <= t0]
    start = before[-1] if before else series[0][1]
    mark = next((v for t, v in series if t >= t_mark), None) if t_mark is not None else None
    end = next((v for t, v in series if t >= t1), series[-1][1])
    inside = [v for t, v in series if t0 <= t <= t1] + [start, end]
    return {"rss_start_mb": start / mb, "rss_after_100_mb": mark / mb if mark is not None else None,
            "rss_end_mb": end / mb, "rss_peak_mb": max(inside) / mb,
            "rss_end_over_after_100": end / mark if mark else None}


def rss_sampler(pid: int | None, interval: float = 0.2) -> RssSampler | None:
    """A started ``RssSampler`` of ``pid`` and its descendants, keeping its series; None without a pid."""
    if pid is None:
        return None
    return RssSampler(pid, interval, tree=True, keep_series=True).start()
