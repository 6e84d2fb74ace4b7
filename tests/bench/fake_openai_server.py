"""A stand-in for an OpenAI-compatible streaming server (stdlib only) for the ``bench-serve`` tests.

``serve(port=0) -> (server, thread)`` starts it in a thread. Run as a script (``python fake_openai_server.py
--port P [other flags ignored]``) it is a fake server *binary* (``llama-server``, ``leaplm serve``); with
``--ready-after S`` it prints ``leaplm serve: ready on http://127.0.0.1:P (model fake)`` S seconds after
``/health`` starts answering.

Endpoints: ``GET /health``, ``GET /v1/models`` (one model, ``fake-model``) and ``POST /v1/chat/completions``
streamed as SSE with chunked transfer encoding (keep-alive). What a request gets is scripted by its last
message's content, a JSON object (anything else: the defaults)::

    {"first": 0.0,      # seconds before the first text chunk
     "gap": 0.0,        # seconds between text chunks
     "tokens": 3,       # tokens generated (capped by max_tokens); chunk i's text is "w<i> " per token
     "per_chunk": 1,    # tokens per text chunk
     "role_chunk": false,   # first a chunk with {"role": "assistant", "content": ""} and no text
     "mode": "ok"}      # ok | http500 | sse_error (after the first chunk) | no_finish | no_usage | hang
                        # (hang: sleeps "hang" seconds, default 5, before the first text chunk)

The usage chunk has ``completion_tokens = tokens`` and a ``leaplm`` field ``{"tokens_per_s": 1.0}``.
``server.bodies`` keeps every chat body; ``server.max_active`` the most chat requests served at once.
"""
from __future__ import annotations

import json
import sys
import threading
import time
from http.server import ThreadingHTTPServer
from pathlib import Path

sys.path.insert(0, str(Path(__file__).parent))
import fake_llama_server  # noqa: E402


def script_of(body: dict) -> dict:
    try:
        script = json.loads(body["messages"][-1]["content"])
    except (ValueError, KeyError, IndexError, TypeError):
        script = {}
    return script if isinstance(script, dict) else {}


class Handler(fake_llama_server.Handler):
    """``fake_llama_server``'s handler (``/health``, JSON replies, quiet) with the OpenAI routes."""

    def do_GET(self) -> None:
        if self.path == "/v1/models":
            self._json(200, {"object": "list", "data": [{"id": "fake-model", "object": "model"}]})
        else:
            super().do_GET()

    def do_POST(self) -> None:
        body = json.loads(self.rfile.read(int(self.headers["Content-Length"])))
        if self.path != "/v1/chat/completions":
            self._json(404, {"error": {"message": "not found"}})
            return
        srv = self.server
        with srv.lock:
            srv.bodies.append(body)
            srv.active += 1
            srv.max_active = max(srv.max_active, srv.active)
        try:
            self._chat(body, script_of(body))
        finally:
            with srv.lock:
                srv.active -= 1

    def _chat(self, body: dict, s: dict) -> None:
        mode = s.get("mode", "ok")
        if mode == "http500":
            self._json(500, {"error": {"message": "planted failure", "type": "server_error", "param": None,
                                       "code": None}})
            return
        self.send_response(200)
        self.send_header("Content-Type", "text/event-stream")
        self.send_header("Transfer-Encoding", "chunked")
        self.end_headers()
        base = {"id": "chatcmpl-1", "object": "chat.completion.chunk", "created": 0, "model": "fake-model"}
        n = min(int(s.get("tokens", 3)), int(body.get("max_tokens", 16)))
        k = int(s.get("per_chunk", 1))
        if s.get("role_chunk"):
            self._event({**base, "choices": [{"index": 0, "delta": {"role": "assistant", "content": ""},
                                              "finish_reason": None}]})
        if mode == "hang":
            time.sleep(float(s.get("hang", 5.0)))
        time.sleep(float(s.get("first", 0.0)))
        sent = 0
        while sent < n:
            m = min(k, n - sent)
            text = "".join(f"w{sent + j} " for j in range(m))
            self._event({**base, "choices": [{"index": 0, "delta": {"content": text}, "finish_reason": None}]})
            sent += m
            if mode == "sse_error":
                self._event({"error": {"message": "planted stream failure", "type": "server_error"}})
                break
            if sent < n:
                time.sleep(float(s.get("gap", 0.0)))
        if mode not in ("no_finish", "sse_error"):
            self._event({**base, "choices": [{"index": 0, "delta": {}, "finish_reason": "length"}]})
        if mode not in ("no_usage", "sse_error"):
            self._event({**base, "choices": [], "usage": {"prompt_tokens": 5, "completion_tokens": n,
                                                          "total_tokens": 5 + n},
                         "leaplm": {"tokens_per_s": 1.0}})
        self._write(b"data: [DONE]\n\n")
        self.wfile.write(b"0\r\n\r\n")
        self.wfile.flush()

    def _write(self, data: bytes) -> None:
        self.wfile.write(f"{len(data):x}\r\n".encode() + data + b"\r\n")
        self.wfile.flush()

    def _event(self, obj: dict) -> None:
        self._write(b"data: " + json.dumps(obj).encode() + b"\n\n")


class Server(ThreadingHTTPServer):
    daemon_threads = True
    request_queue_size = 128      # many clients connecting at once: no SYN retries (1 s each) from a full backlog

    def handle_error(self, request, client_address) -> None:  # a client that went away: not a test failure
        pass


def serve(port: int = 0):
    server = Server(("127.0.0.1", port), Handler)
    server.bodies, server.active, server.max_active, server.lock = [], 0, 0, threading.Lock()
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    return server, thread


def _ready_line(port: int, argv: list[str]) -> None:
    if "--ready-after" in argv:
        time.sleep(float(argv[argv.index("--ready-after") + 1]))
        print(f"leaplm serve: ready on http://127.0.0.1:{port} (model fake)", flush=True)


if __name__ == "__main__":
    fake_llama_server.run_as_binary(serve, "openai server", sys.argv[1:], _ready_line)
