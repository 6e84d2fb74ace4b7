"""A stand-in for llama.cpp's ``llama-server`` (stdlib only) for the serving-bench tests.

``serve(port=0) -> (server, thread)`` starts it in a thread; run as a script (``python fake_llama_server.py
--port P [llama-server flags]``) it is a fake *binary* that ``LlamaServerProcess`` can start; ``--version``
prints a version line. Endpoints: ``GET /health`` and streaming ``POST /completion``: for prompt ids ``p`` it
generates ``(p[-1] + k + 1) % 1000`` for ``k < n_predict``, one SSE event per token (``tokens`` holds the id),
then a final ``stop`` event (``stop_type`` ``limit``). Prompts that start with ``ERROR_ID`` get HTTP 500.
Bodies received are kept in ``server.bodies``.
"""
from __future__ import annotations

import json
import sys
import threading
import time
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

ERROR_ID = 666


def tokens_for(prompt: list[int], n: int) -> list[int]:
    return [(prompt[-1] + k + 1) % 1000 for k in range(n)]


class Handler(BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"

    def log_message(self, *args) -> None:  # quiet
        pass

    def do_GET(self) -> None:
        if self.path == "/health":
            self._json(200, {"status": "ok"})
        else:
            self._json(404, {"error": {"message": "not found"}})

    def do_POST(self) -> None:
        body = json.loads(self.rfile.read(int(self.headers["Content-Length"])))
        self.server.bodies.append(body)
        prompt = body["prompt"]
        if prompt[0] == ERROR_ID:
            self._json(500, {"error": {"code": 500, "message": "planted failure", "type": "server_error"}})
            return
        self.send_response(200)
        self.send_header("Content-Type", "text/event-stream")
        self.send_header("Connection", "close")
        self.end_headers()
        self.close_connection = True
        for t in tokens_for(prompt, body["n_predict"]):
            self._event({"content": "x", "tokens": [t], "stop": False})
            time.sleep(self.server.delay)
        self.wfile.write(b": ping\n\n")
        self._event({"content": "", "tokens": [], "stop": True, "stop_type": "limit", "tokens_evaluated": len(prompt)})

    def _event(self, obj: dict) -> None:
        self.wfile.write(b"data: " + json.dumps(obj).encode() + b"\n\n")
        self.wfile.flush()

    def _json(self, status: int, obj: dict) -> None:
        data = json.dumps(obj).encode()
        self.send_response(status)
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(data)))
        self.end_headers()
        self.wfile.write(data)


def serve(port: int = 0, delay: float = 0.001):
    server = ThreadingHTTPServer(("127.0.0.1", port), Handler)
    server.daemon_threads = True
    server.bodies = []
    server.delay = delay
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    return server, thread


def run_as_binary(serve, name: str, argv: list[str], after_start=lambda port, argv: None) -> None:
    """What a fake server binary does: ``--version`` prints a version line; else ``serve(port)`` on ``--port P``
    (its arguments printed first), ``after_start(port, argv)``, then serve until killed."""
    if "--version" in argv:
        print("version: 1 (fake)\nbuilt with test")
        sys.exit(0)
    port = int(argv[argv.index("--port") + 1])
    print(f"fake {name} args:", " ".join(argv), flush=True)
    server, thread = serve(port)
    after_start(port, argv)
    thread.join()


if __name__ == "__main__":
    run_as_binary(serve, "llama-server", sys.argv[1:])
