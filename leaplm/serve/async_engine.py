"""``AsyncLLM``: an ``LLM``'s engine stepped in one background thread, its requests streamed to asyncio tasks.

    alm = AsyncLLM(llm).start()
    group = await alm.submit([(prompt_ids, SamplingParams(...))], speculative="recycling")   # raises for bad input
    async for delta in group:           # Delta(index, text, token_ids, logprobs, finish_reason, usage, stats, error)
        ...
    alm.abort(group)                    # e.g. the client went away: aborted within one engine step
    alm.finished(group)                 # done with it (it no longer counts against the queue limit)
    alm.shutdown()                      # aborts what is left and joins the thread

The engine is not thread-safe, so every call on it (add, abort, step, release) runs on the engine thread: the
event loop posts commands to an inbox that the thread drains before each step, and the thread hands each request's
deltas back with ``loop.call_soon_threadsafe``. Text (incremental detokenization, stop strings) is made on the
engine thread with ``LLM``'s own ``TextTracker`` and ``take_output``, so a request's text and token ids are the ones
``LLM.generate`` gives. The thread sleeps on the inbox while nothing is running.

If a step raises (a bug, or a grammar that allows no token), every request then in flight ends with an ``error``
delta and is aborted; the engine and the server go on.
"""
from __future__ import annotations

import asyncio
import concurrent.futures
import logging
import queue
import threading
from dataclasses import dataclass, field
from typing import Any, Callable, Sequence

from ..errors import LeapLMError
from ..llm import LLM, TextTracker, request_metrics
from ..sampling import SamplingParams

log = logging.getLogger("leaplm.serve")


class QueueFullError(LeapLMError):
    """More requests in flight than the server takes (running + waiting): answered 429 with ``Retry-After``."""


class ShuttingDownError(LeapLMError):
    """The server is stopping (SIGTERM): new requests are answered 503."""


@dataclass
class Delta:
    """What one request (choice ``index`` of its group) gained in a step. ``logprobs`` is parallel to ``token_ids``
    (when asked for). The last delta of a request has ``finish_reason``, ``usage`` ({prompt_tokens,
    completion_tokens}) and ``stats`` (``request_stats``), or ``error`` (a message) when it failed."""
    index: int = 0
    text: str = ""
    token_ids: list[int] = field(default_factory=list)
    logprobs: list | None = None
    finish_reason: str | None = None
    usage: dict | None = None
    stats: dict | None = None
    error: str | None = None

    @property
    def final(self) -> bool:
        return self.finish_reason is not None or self.error is not None


_ABORTED = Delta(error="aborted")


class RequestGroup:
    """The requests of one HTTP request (``n`` choices of each prompt), their deltas merged in arrival order;
    iterate with ``async for`` (ends once every request gave its final delta, or the group was aborted)."""

    def __init__(self, loop: asyncio.AbstractEventLoop, size: int, method: str | None) -> None:
        self.loop = loop
        self.queue: asyncio.Queue[Delta] = asyncio.Queue()
        self.size = size
        self.request_ids: list[int] = []
        self.method = method
        self.left = size
        self.aborted = False
        self.counted_out = False

    @property
    def done(self) -> bool:
        return self.left == 0 or self.aborted

    def put(self, delta: Delta) -> None:   # engine thread
        try:
            self.loop.call_soon_threadsafe(self.queue.put_nowait, delta)
        except RuntimeError:   # the event loop is closed (the HTTP server stopped): nobody is listening
            pass

    def __aiter__(self):
        return self

    async def __anext__(self) -> Delta:
        if self.done:
            raise StopAsyncIteration
        delta = await self.queue.get()
        if delta is _ABORTED:
            raise StopAsyncIteration
        if delta.final:
            self.left -= 1
        return delta


@dataclass
class _Live:
    group: RequestGroup
    index: int
    tracker: TextTracker
    sent: int = 0     # output tokens already delivered


def request_stats(r, method: str | None) -> dict:
    """The ``leaplm`` stats of a finished engine request (from ``request_metrics``): speculation counters, decode
    speed, time to first token, prefix-cache hits."""
    m = request_metrics(r)
    return {"speculative": method, "drafted": m["drafted"], "accepted": m["accepted"],
            "target_passes": m["target_passes"], "mean_accepted_tokens": m["mean_accepted_tokens"],
            "tokens_per_s": m["decode_tokens_per_s"], "ttft_s": m["ttft_s"],
            "cached_prompt_tokens": m["cached_prompt_tokens"], "preemptions": m["preemptions"]}


class AsyncLLM:
    """See the module docstring. ``max_queue``: most requests waiting beyond ``llm.max_num_seqs`` running ones
    (more: ``QueueFullError``). ``stats``: ``engine.stats()`` after the last step or command (metrics read it)."""

    def __init__(self, llm: LLM, max_queue: int = 256) -> None:
        self.llm = llm
        self.engine = llm.engine
        self.max_in_flight = llm.max_num_seqs + max_queue
        self._inbox: queue.SimpleQueue = queue.SimpleQueue()
        self._live: dict[int, _Live] = {}
        self._in_flight = 0          # submitted and not yet finished (event-loop side count)
        self._stopping = threading.Event()
        self._thread = threading.Thread(target=self._run, name="leaplm-engine", daemon=True)
        self.stats: dict = self.engine.stats()
        self.draining = False        # set when a shutdown began: new requests are refused
        self.step_errors = 0

    # ------------------------------------------------------------------ event-loop side
    def start(self) -> "AsyncLLM":
        """Step the engine in a background thread (in-process use and tests; ``leaplm serve`` uses ``run``)."""
        self._thread.start()
        return self

    def run(self, stop_when: Callable[[], bool] | None = None) -> None:
        """Step the engine in the calling thread until ``shutdown``. ``leaplm serve`` calls this from the main
        thread, the one that loaded the model, with the HTTP server in another thread: torch's OpenMP thread pool
        belongs to the first thread that used it, and a second thread running the same parallel ops gets about half
        the speed on this 2-core CPU (measured: 85 vs 45 tokens/s for SmolLM2 int8 at batch 1). ``stop_when()``,
        checked while idle (at least every 0.5 s), also ends it."""
        self._run(stop_when)

    @property
    def in_flight(self) -> int:
        return self._in_flight

    async def submit(self, jobs: Sequence[tuple[Sequence[int], SamplingParams]], speculative: Any = None,
                     method: str | None = None) -> RequestGroup:
        """Queue one request per ``(prompt_ids, params)`` job (choice ``i`` = job ``i``), all or none; returns their
        group once the engine took them. Raises what ``LLMEngine.add_request`` raises for bad input (nothing is
        then queued) and ``QueueFullError``. ``speculative``: as ``LLM.drafter_for``; ``method``: its name (stats)."""
        if self._stopping.is_set() or self.draining:
            raise ShuttingDownError("the server is shutting down; retry on another replica or later")
        if self._in_flight + len(jobs) > self.max_in_flight:
            raise QueueFullError(f"{self._in_flight} requests are in flight and this one adds {len(jobs)}; the server "
                                 f"queues at most {self.max_in_flight}: retry later")
        group = RequestGroup(asyncio.get_running_loop(), len(jobs), method)
        done: concurrent.futures.Future = concurrent.futures.Future()
        self._in_flight += len(jobs)
        self._inbox.put(("add", ([(list(ids), p) for ids, p in jobs], speculative, group), done))
        try:
            group.request_ids = await asyncio.wrap_future(done)
        except BaseException:
            self._in_flight -= len(jobs)
            raise
        return group

    def finished(self, group: RequestGroup) -> None:
        """The caller is done with ``group`` (finished, failed or aborted): it no longer counts as in flight."""
        if not group.counted_out:
            group.counted_out = True
            self._in_flight -= group.size

    def abort(self, group: RequestGroup) -> None:
        """Abort ``group``'s requests (no-op once finished); their KV blocks are freed within one engine step, and
        iterating the group ends."""
        if group.done:
            return
        group.aborted = True
        for rid in group.request_ids:
            self._inbox.put(("abort", rid, None))
        group.queue.put_nowait(_ABORTED)

    def drain(self) -> None:
        """Refuse new requests from now on (a shutdown began); the running ones go on."""
        self.draining = True

    def abort_all(self, message: str) -> None:
        """End every request in flight with an ``error`` delta ``message`` (thread-safe; the end of a graceful
        shutdown's grace period), so their responses finish cleanly instead of being cut."""
        self._inbox.put(("fail_all", message, None))

    def shutdown(self, timeout: float = 10.0) -> None:
        """Stop the engine thread; requests still in flight end with an ``error`` delta."""
        self._stopping.set()
        self._inbox.put(("wake", None, None))
        if self._thread.is_alive() and self._thread is not threading.current_thread():
            self._thread.join(timeout)

    # ------------------------------------------------------------------ engine thread
    def _run(self, stop_when: Callable[[], bool] | None = None) -> None:
        engine = self.engine
        while not self._stopping.is_set():
            busy = engine.has_unfinished()
            if not busy and stop_when is not None and stop_when():
                break
            if self._drain(block=not busy):
                self.stats = engine.stats()   # adds and aborts change the counts even when no step follows
            if self._stopping.is_set() or not engine.has_unfinished():
                continue
            try:
                outputs = engine.step()
            except Exception as e:   # keep serving: fail what was in flight
                self.step_errors += 1
                log.exception("engine step failed; aborting %d requests", len(self._live))
                self._fail_all(f"generation failed: {type(e).__name__}: {e}")
                continue
            for out in outputs:
                self._deliver(out)
            self.stats = engine.stats()
        self._fail_all("the server is shutting down", pending=True)

    def _drain(self, block: bool) -> bool:
        """Run the inbox's commands (waiting up to 0.5 s for one when ``block``); whether any ran."""
        try:
            item = self._inbox.get(timeout=0.5) if block else self._inbox.get_nowait()
        except queue.Empty:
            return False
        while True:
            self._command(*item)
            try:
                item = self._inbox.get_nowait()
            except queue.Empty:
                return True

    def _command(self, kind: str, arg, done: concurrent.futures.Future | None) -> None:
        engine = self.engine
        if kind == "add":
            jobs, speculative, group = arg
            added: list[int] = []
            try:
                drafter = self.llm.drafter_for(speculative)
                for prompt_ids, params in jobs:
                    added.append(engine.add_request(prompt_ids, params, speculative=drafter))
            except BaseException as e:
                for rid in added:
                    engine.abort(rid)
                    engine.release(rid)
                done.set_exception(e)
                return
            for i, (rid, (prompt_ids, params)) in enumerate(zip(added, jobs)):
                self._live[rid] = _Live(group, i, TextTracker(self.llm.tokenizer, params, prompt_ids))
            done.set_result(added)
        elif kind == "fail_all":
            self._fail_all(arg)
        elif kind == "abort":
            if arg in self._live:
                del self._live[arg]
                engine.abort(arg)
                engine.release(arg)

    def _deliver(self, out) -> None:
        live = self._live.get(out.request_id)
        if live is None:
            return
        engine = self.engine
        self.llm.take_output(out, live.tracker)
        r = engine.get_request(out.request_id)
        final = out.finish_reason is not None
        upto = len(r.output_ids)
        delta = Delta(index=live.index, text=live.tracker.take_visible(final=final), token_ids=r.output_ids[live.sent: upto],
                      logprobs=r.logprobs[live.sent: upto] if r.logprobs is not None else None)
        live.sent = upto
        if final:
            delta.finish_reason = r.finish_reason or out.finish_reason
            delta.usage = {"prompt_tokens": len(r.prompt_ids), "completion_tokens": len(r.output_ids)}
            delta.stats = request_stats(r, live.group.method)
            del self._live[out.request_id]
            engine.release(out.request_id)
        if delta.token_ids or delta.text or final:
            live.group.put(delta)

    def _fail_all(self, message: str, pending: bool = False) -> None:
        """End every live request with an ``error`` delta; ``pending``: also refuse the adds still in the inbox."""
        for rid, live in list(self._live.items()):
            live.group.put(Delta(index=live.index, error=message))
            self.engine.abort(rid)
            self.engine.release(rid)
        self._live.clear()
        while pending:   # commands nobody will run: fail their futures
            try:
                kind, arg, done = self._inbox.get_nowait()
            except queue.Empty:
                break
            if kind == "add" and done is not None and not done.done():
                done.set_exception(QueueFullError(message))
