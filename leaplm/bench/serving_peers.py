"""Peer backends of the serving benchmark (``serving.Backend``): llama.cpp's server and transformers' serving.

``make_peer_sweep(name, ...) -> serving.Sweep | str``: the peer's runs over the concurrency levels, or a
``"skipped: <why>"`` status when it cannot run here.

* ``llamacpp-server`` - llama.cpp's own ``llama-server`` on the same GGUF file, one server process per level
  (``LlamaServerProcess``: ``--parallel C --cont-batching -c C * (longest prompt + max tokens + 16) -t
  threads``, a free port on 127.0.0.1, waited for ``/health``), driven over HTTP by ``LlamaServerBackend``:
  one thread per request, ``POST /completion`` with ``prompt`` as token ids, ``stream``, ``n_predict``,
  greedy (``temperature 0``, ``top_k 1``), ``cache_prompt false``, ``return_tokens`` (the stream's ``tokens``
  are compared, never text). The server stops at its model's end-of-generation tokens; the client also
  ends a request at the first leaplm EOS id (kept) should one come first. The binary: ``--llama-server
  PATH``, else the newest ``~/.cache/leaplm/llama-server/<version>/llama-server`` that
  ``scripts/build-llama-server`` builds, else ``llama-server`` on ``PATH``.
* ``hf-serve`` - transformers' continuous batching (``model.init_continuous_batching()``: the
  ``ContinuousBatchingManager`` that ``transformers serve --continuous-batching`` runs requests on), in this
  process, on the same weights loaded the way ``peers.py`` loads them (a GGUF file dequantized, the target's
  dtype and device). ``HFServeBackend`` adds streaming requests and reads the manager's output queue. The
  ``transformers serve`` HTTP server itself needs fastapi/uvicorn/openai and downloads by hub id; the
  in-process manager needs neither. KV pages sized for ``C`` requests of the longest prompt + max tokens;
  block sharing (prefix caching) off, as for llama-server.
"""
from __future__ import annotations

import http.client
import itertools
import json
import os
import queue
import re
import shutil
import socket
import subprocess
import threading
import time
from pathlib import Path
from typing import Any, Callable
from urllib.parse import urlparse

from . import BenchError
from .serving import Delivery, Sweep, error_message, error_text

CTX_SLACK = 16                  # tokens of context per slot beyond prompt + max tokens
FINISH = {"eos": "stop", "word": "stop", "limit": "length"}


class PeerUnavailable(BenchError):
    """A peer that cannot run here; ``status`` is its row's ``"skipped: ..."`` text."""

    def __init__(self, status: str) -> None:
        super().__init__(status)
        self.status = status


# --------------------------------------------------------------------------- llama-server: the binary


def llama_server_cache() -> Path:
    return Path(os.environ.get("LEAPLM_CACHE", Path.home() / ".cache" / "leaplm")).expanduser() / "llama-server"


def _version_key(name: str) -> tuple:
    return tuple(int(p) if p.isdigit() else -1 for p in re.split(r"[.\-+]", name))


def find_llama_server(explicit: str | None = None) -> Path | None:
    """The ``llama-server`` binary to use (see the module docstring); None when there is none."""
    if explicit:
        path = Path(explicit).expanduser()
        if not (path.is_file() and os.access(path, os.X_OK)):
            raise BenchError(f"--llama-server {explicit!r} is not an executable file")
        return path
    cache = llama_server_cache()
    if cache.is_dir():
        built = [d / "llama-server" for d in cache.iterdir() if (d / "llama-server").is_file()]
        if built:
            return max(built, key=lambda p: _version_key(p.parent.name))
    found = shutil.which("llama-server")
    return Path(found) if found else None


def llama_server_version(binary: Path) -> str | None:
    """What ``llama-server --version`` prints (its build line), or the build's version.txt; None if neither."""
    try:
        out = subprocess.run([str(binary), "--version"], capture_output=True, text=True, timeout=30)
        text = " ".join(line.strip() for line in (out.stdout + out.stderr).splitlines()
                        if line.strip().startswith(("version", "built")))
        if text:
            return text
    except (OSError, subprocess.SubprocessError):
        pass
    info = binary.parent / "version.txt"
    return info.read_text().strip().replace("\n", "; ") if info.is_file() else None


def free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class ServerSubprocess:
    """A local HTTP server as a subprocess on a free 127.0.0.1 port; subclasses give ``command(port)`` and
    ``label`` (the name error messages use). ``start()`` waits until ``GET /health`` answers 200 - and, when
    ``ready_text`` is set, until that text is in the server's output too - (raises ``BenchError`` with the log's
    tail when the process exits or ``startup_timeout`` passes); ``stop()`` terminates it. The server's output
    goes to ``log_path`` (a temporary file when None); ``env``: its environment (None: this process's)."""

    label = "server"

    def __init__(self, log_path: Path | None = None, startup_timeout: float = 300.0, env: dict | None = None,
                 ready_text: str | None = None) -> None:
        self.log_path, self.startup_timeout, self.env, self.ready_text = log_path, startup_timeout, env, ready_text
        self.proc: subprocess.Popen | None = None
        self.port: int | None = None

    def command(self, port: int) -> list[str]:
        raise NotImplementedError

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    @property
    def pid(self) -> int | None:
        return self.proc.pid if self.proc is not None else None

    def _log_text(self) -> str:
        try:
            return Path(self._log.name).read_text(errors="replace")
        except (OSError, AttributeError):
            return ""

    def _log_tail(self, n: int = 15) -> str:
        return " | ".join(self._log_text().splitlines()[-n:])

    def start(self) -> "ServerSubprocess":
        import tempfile

        self.port = free_port()
        if self.log_path is not None:
            self.log_path.parent.mkdir(parents=True, exist_ok=True)
            self._log = open(self.log_path, "w")
        else:
            self._log = tempfile.NamedTemporaryFile("w", prefix=f"{self.label}-", suffix=".log", delete=False)
        self.proc = subprocess.Popen(self.command(self.port), stdout=self._log, stderr=subprocess.STDOUT,
                                     stdin=subprocess.DEVNULL, env=self.env)
        deadline = time.monotonic() + self.startup_timeout
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                tail = self._log_tail()
                self.stop()
                raise BenchError(f"{self.label} exited with code {self.proc.returncode} while starting: {tail}")
            if (self.ready_text is None or self.ready_text in self._log_text()) and self._healthy():
                return self
            time.sleep(0.1)
        self.stop()
        raise BenchError(f"{self.label} did not answer /health within {self.startup_timeout:g} s: {self._log_tail()}")

    def _healthy(self) -> bool:
        try:
            conn = http.client.HTTPConnection("127.0.0.1", self.port, timeout=2)
            conn.request("GET", "/health")
            ok = conn.getresponse().status == 200
            conn.close()
            return ok
        except (OSError, http.client.HTTPException):
            return False

    def stop(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(timeout=15)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()
        log = getattr(self, "_log", None)
        if log is not None and not log.closed:
            log.close()


class LlamaServerProcess(ServerSubprocess):
    """``llama-server`` as a subprocess (``ServerSubprocess``): ``--parallel``, ``-c``, threads as given."""

    label = "llama-server"

    def __init__(self, binary: Path, model: Path, parallel: int, ctx: int, threads: int,
                 log_path: Path | None = None, extra_args: tuple[str, ...] = (), startup_timeout: float = 300.0) -> None:
        super().__init__(log_path, startup_timeout)
        self.binary, self.model, self.parallel, self.ctx, self.threads = binary, model, parallel, ctx, threads
        self.extra_args = tuple(extra_args)

    def command(self, port: int) -> list[str]:
        return [str(self.binary), "-m", str(self.model), "--host", "127.0.0.1", "--port", str(port),
                "--parallel", str(self.parallel), "--cont-batching", "-c", str(self.ctx),
                "-t", str(self.threads), "-tb", str(self.threads), *self.extra_args]


# --------------------------------------------------------------------------- llama-server: the client


class LlamaServerBackend:
    """HTTP client of a llama.cpp server at ``base_url`` (``serving.Backend``): one thread per request streams
    ``POST /completion`` and puts deliveries, stamped with ``clock()`` as each event is parsed, on a queue that
    ``poll`` drains. ``stop_ids``: token ids that end a request on the client side too (kept in the output)."""

    def __init__(self, base_url: str, stop_ids=(), *, name: str = "llamacpp-server", pid: int | None = None,
                 info: dict | None = None, clock: Callable[[], float] = time.perf_counter,
                 timeout: float = 900.0) -> None:
        u = urlparse(base_url)
        self.host, self.port = u.hostname or "127.0.0.1", u.port or 80
        self.stop_ids = frozenset(int(t) for t in stop_ids)
        self.name, self.pid, self.info, self.clock, self.timeout = name, pid, dict(info or {}), clock, timeout
        self.events: queue.Queue[Delivery] = queue.Queue()
        self._ids = itertools.count()
        self._conns: dict[int, http.client.HTTPConnection] = {}
        self._aborted: set[int] = set()
        self._threads: dict[int, threading.Thread] = {}
        self._lock = threading.Lock()

    @staticmethod
    def request_body(prompt_ids: list[int], params) -> dict:
        return {"prompt": [int(t) for t in prompt_ids], "n_predict": int(params.max_tokens), "stream": True,
                "temperature": 0.0, "top_k": 1, "cache_prompt": False, "return_tokens": True, "seed": 0}

    def submit(self, prompt_ids: list[int], params) -> int:
        if not params.greedy:
            raise BenchError("the llama-server peer runs greedy decoding only")
        handle = next(self._ids)
        body = json.dumps(self.request_body(prompt_ids, params)).encode()
        t = threading.Thread(target=self._stream, args=(handle, body), daemon=True, name=f"llama-server-{handle}")
        with self._lock:
            self._threads[handle] = t
        t.start()
        return handle

    def _put(self, handle: int, tokens=(), finished: bool = False, reason: str | None = None,
             error: str | None = None) -> None:
        if handle not in self._aborted:
            self.events.put(Delivery(handle, self.clock(), list(tokens), finished or error is not None, reason, error))

    def _stream(self, handle: int, body: bytes) -> None:
        conn = http.client.HTTPConnection(self.host, self.port, timeout=self.timeout)
        with self._lock:
            self._conns[handle] = conn
        try:
            conn.request("POST", "/completion", body=body, headers={"Content-Type": "application/json"})
            resp = conn.getresponse()
            if resp.status != 200:
                text = resp.read(2000).decode(errors="replace")
                self._put(handle, error=f"HTTP {resp.status}: {error_message(text)}")
                return
            for raw in resp:
                line = raw.strip()
                if not line.startswith(b"data:"):
                    continue        # blank separators, ": ping" comments, event: lines
                payload = line[5:].strip()
                if payload == b"[DONE]":
                    break
                event = json.loads(payload)
                if "error" in event:
                    self._put(handle, error=f"server error: {error_message(event)}")
                    return
                tokens = [int(t) for t in event.get("tokens") or []]
                cut = next((i for i, t in enumerate(tokens) if t in self.stop_ids), None)
                if cut is not None:
                    self._put(handle, tokens[:cut + 1], True, "stop")
                    return
                if event.get("stop"):
                    self._put(handle, tokens, True, FINISH.get(event.get("stop_type"), event.get("stop_type")))
                    return
                if tokens:
                    self._put(handle, tokens)
            self._put(handle, error="the stream ended before the server reported the end of the request")
        except Exception as e:  # noqa: BLE001 - reported as this request's error (unless it was aborted)
            self._put(handle, error=error_text(e))
        finally:
            conn.close()
            with self._lock:
                self._conns.pop(handle, None)
                self._threads.pop(handle, None)

    def poll(self, timeout: float) -> list[Delivery]:
        try:
            events = [self.events.get(timeout=timeout)]
        except queue.Empty:
            return []
        while True:
            try:
                events.append(self.events.get_nowait())
            except queue.Empty:
                return events

    def abort(self, handle: int) -> None:
        self._aborted.add(handle)
        with self._lock:
            conn = self._conns.get(handle)
        if conn is not None:
            try:
                if conn.sock is not None:
                    conn.sock.shutdown(socket.SHUT_RDWR)   # the reader thread wakes up and ends
            except OSError:
                pass

    def stats(self) -> dict | None:
        return None

    def reset_cache(self) -> bool:
        return False

    def close(self) -> None:
        with self._lock:
            handles, threads = list(self._conns), list(self._threads.values())
        for h in handles:
            self.abort(h)
        for t in threads:
            t.join(timeout=10)


# --------------------------------------------------------------------------- transformers' continuous batching


def hf_kv_pages(concurrency: int, longest_prompt: int, max_tokens: int, page_size: int = 64) -> tuple[int, int]:
    """``(num_blocks, max_batch_tokens)`` of transformers' continuous batching for ``concurrency`` requests of
    ``longest_prompt + max_tokens`` tokens: one page of slack per request, 512 prefill tokens per batch."""
    per_request = -(-(longest_prompt + max_tokens + 1) // page_size) + 1
    return concurrency * per_request, 512 + concurrency


class HFServeBackend:
    """transformers' ``ContinuousBatchingManager`` in this process (``serving.Backend``), greedy. ``model``: a
    loaded ``PreTrainedModel``; KV pages for ``concurrency`` requests of ``longest_prompt + max_tokens``."""

    name = "hf-serve"

    def __init__(self, model, eos_token_ids, concurrency: int, max_tokens: int, longest_prompt: int,
                 clock: Callable[[], float] = time.perf_counter, page_size: int = 64) -> None:
        import transformers
        from transformers import GenerationConfig
        from transformers.generation.configuration_utils import ContinuousBatchingConfig

        self.clock, self.pid = clock, None
        self.eos = [int(t) for t in eos_token_ids]
        num_blocks, max_batch_tokens = hf_kv_pages(concurrency, longest_prompt, max_tokens, page_size)
        self.cb_config = ContinuousBatchingConfig(
            page_size=page_size, num_blocks=num_blocks, max_batch_tokens=max_batch_tokens,
            max_requests_per_batch=concurrency, allow_block_sharing=False)
        gen = GenerationConfig(max_new_tokens=max_tokens, do_sample=False, eos_token_id=self.eos or None,
                               pad_token_id=self.eos[0] if self.eos else 0)
        self.manager = model.init_continuous_batching(generation_config=gen,
                                                      continuous_batching_config=self.cb_config)
        self.manager.start()
        self.seen: dict[str, int] = {}
        self.info = {"engine": "transformers ContinuousBatchingManager (in-process)",
                     "version": transformers.__version__, "dtype": str(model.dtype), "device": str(model.device),
                     "attn_implementation": getattr(model.config, "_attn_implementation", None),
                     "page_size": page_size, "num_blocks": self.cb_config.num_blocks,
                     "max_batch_tokens": self.cb_config.max_batch_tokens, "block_sharing": False}

    def submit(self, prompt_ids: list[int], params) -> str:
        if not params.greedy:
            raise BenchError("the hf-serve peer runs greedy decoding only")
        rid = self.manager.add_request(list(prompt_ids), max_new_tokens=int(params.max_tokens), streaming=True,
                                       eos_token_id=self.eos or None)
        if rid is None:
            raise BenchError("transformers' manager refused the request (not running or not accepting requests)")
        self.seen[rid] = 0
        return rid

    def poll(self, timeout: float) -> list[Delivery]:
        events = []
        result = self.manager.get_result(timeout=timeout)
        while result is not None:
            events.append(self._delivery(result))
            result = self.manager.get_result(timeout=0)
        if not events and not self.manager.is_running():
            raise BenchError("transformers' generation thread stopped"
                             + (f": {self.manager.background_thread_status.fatal_error}"
                                if getattr(getattr(self.manager, "background_thread_status", None), "fatal_error", None)
                                else ""))
        return events

    def _delivery(self, result) -> Delivery:
        now = self.clock()
        rid = result.request_id
        tokens = list(result.generated_tokens)
        new = tokens[self.seen.get(rid, 0):]
        self.seen[rid] = len(tokens)
        done = result.is_finished()
        if result.error:
            return Delivery(rid, now, new, True, None, f"transformers: {result.error}"[:300])
        reason = None
        if done:
            reason = "stop" if tokens and tokens[-1] in self.eos else "length"
            self.seen.pop(rid, None)
        return Delivery(rid, now, new, done, reason)

    def abort(self, handle: str) -> None:
        self.manager.cancel_request(handle)
        self.seen.pop(handle, None)

    def stats(self) -> dict | None:
        return None

    def reset_cache(self) -> bool:
        return False

    def close(self) -> None:
        self.manager.stop(block=True, timeout=60)


# --------------------------------------------------------------------------- sweeps


def make_peer_sweep(name: str, *, model_path: Path, eos_token_ids, dtype, device, threads: int, max_tokens: int,
                    longest_prompt: int, llama_server: str | None = None, log_dir: Path | None = None) -> Sweep | str:
    """The ``serving.Sweep`` of peer ``name``, or its ``"skipped: ..."`` status."""
    if name == "llamacpp-server":
        return _llamacpp_sweep(model_path, eos_token_ids, threads, max_tokens, longest_prompt, llama_server, log_dir)
    if name == "hf-serve":
        return _hf_sweep(model_path, eos_token_ids, dtype, device, max_tokens, longest_prompt)
    raise BenchError(f"unknown serving peer {name!r}")


def _llamacpp_sweep(model_path, eos, threads, max_tokens, longest_prompt, explicit, log_dir) -> Sweep | str:
    if not (model_path.is_file() and model_path.suffix == ".gguf"):
        return "skipped: needs a GGUF file (--model NAME.gguf or a known GGUF model)"
    binary = find_llama_server(explicit)
    if binary is None:
        return ("skipped: llama-server not found: build it with scripts/build-llama-server, or pass "
                "--llama-server PATH")
    version = llama_server_version(binary)
    servers: dict[int, LlamaServerProcess] = {}

    def make(c: int) -> LlamaServerBackend:
        ctx = c * (longest_prompt + max_tokens + CTX_SLACK)
        log = log_dir / f"llama-server-c{c}.log" if log_dir is not None else None
        server = LlamaServerProcess(binary, model_path, c, ctx, threads, log).start()
        servers[c] = server
        info = {"engine": "llama.cpp llama-server", "binary": str(binary), "version": version,
                "command": server.command(server.port), "cache_prompt": False, "ctx_per_slot": ctx // c}
        return LlamaServerBackend(server.url, eos, pid=server.pid, info=info)

    def done(backend: LlamaServerBackend) -> None:
        backend.close()
        for c in list(servers):
            servers.pop(c).stop()

    return Sweep("llamacpp-server", "peer", make, done, lambda: [s.stop() for s in servers.values()])


def _hf_sweep(model_path, eos, dtype, device, max_tokens, longest_prompt) -> Sweep | str:
    import importlib.util

    if importlib.util.find_spec("transformers") is None:
        return "skipped: transformers is not installed"
    from transformers import GenerationMixin

    if not hasattr(GenerationMixin, "init_continuous_batching"):
        import transformers

        return (f"skipped: transformers {transformers.__version__} has no continuous batching "
                "(init_continuous_batching; transformers >= 4.56 has it)")
    if model_path.is_file() and importlib.util.find_spec("accelerate") is None:
        return "skipped: loading a GGUF file into transformers needs accelerate (pip install accelerate)"
    state: dict[str, Any] = {}

    def make(c: int) -> HFServeBackend:
        if "error" in state:
            raise state["error"]
        if "model" not in state:
            import transformers

            from .peers import _load_hf_model

            transformers.logging.set_verbosity_error()
            transformers.logging.disable_progress_bar()
            try:
                state["model"] = _load_hf_model(model_path, dtype, device)
            except Exception as e:  # noqa: BLE001 - every level reports it
                state["error"] = BenchError(f"loading the model into transformers failed: {error_text(e)}")
                raise state["error"] from None
        backend = HFServeBackend(state["model"], eos, c, max_tokens, longest_prompt)
        backend.info["gguf_dequantized"] = model_path.is_file()
        return backend

    def finish() -> None:
        state.clear()
        import gc

        gc.collect()

    return Sweep("hf-serve", "peer", make, lambda b: b.close(), finish)
