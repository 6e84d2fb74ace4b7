"""``leaplm serve``: load the model, then run the app under uvicorn until SIGINT/SIGTERM.

Prints one line on stdout when the socket is listening: ``leaplm serve: ready on http://HOST:PORT (model NAME)``.
SIGTERM (or Ctrl-C): uvicorn stops accepting connections and new requests get 503; in-flight requests may finish
for up to ``graceful_s`` seconds, then those still running end with an error event (streams) or a 503 (the others),
their responses complete, the engine stops and the process exits 0.
"""
from __future__ import annotations

import signal
import threading

from .app import ServeConfig, create_app

READY = "leaplm serve: ready on"


def run(llm, config: ServeConfig, host: str = "127.0.0.1", port: int = 8000, log_level: str = "warning",
        graceful_s: float = 30.0) -> int:
    """Serve until SIGINT/SIGTERM; returns the exit status (0 after a graceful stop, 1 when the server could not
    start, e.g. the port is taken). The engine steps in this (the main) thread, uvicorn runs in another: see
    ``AsyncLLM.run`` for why."""
    import uvicorn

    app = create_app(llm, config, engine_thread=False)
    alm = app.state.leaplm.alm

    class Server(uvicorn.Server):
        async def startup(self, sockets=None) -> None:
            await super().startup(sockets)
            if self.started:
                shown = f"[{host}]" if ":" in host else host
                print(f"{READY} http://{shown}:{port} (model {config.served_model_name})", flush=True)

    server = Server(uvicorn.Config(app, host=host, port=port, log_level=log_level, access_log=False,
                                   timeout_graceful_shutdown=graceful_s + 10, lifespan="on"))

    def on_signal(sig, frame) -> None:
        if not server.should_exit:   # the first signal: refuse new requests, give running ones graceful_s
            alm.drain()
            timer = threading.Timer(graceful_s, alm.abort_all,
                                    args=(f"the server is shutting down: aborted after {graceful_s:g} s",))
            timer.daemon = True
            timer.start()
        server.handle_exit(sig, frame)   # uvicorn's own: stop accepting, drain connections (a second Ctrl-C: now)

    http = threading.Thread(target=server.run, name="leaplm-http", daemon=True)
    previous = {sig: signal.signal(sig, on_signal) for sig in (signal.SIGINT, signal.SIGTERM)}
    http.start()
    try:
        alm.run(stop_when=lambda: not http.is_alive())   # until the app's shutdown stops it (or uvicorn died)
    finally:
        for sig, handler in previous.items():
            signal.signal(sig, handler)
    http.join(graceful_s + 20)
    return 0 if server.started else 1


__all__ = ["READY", "ServeConfig", "create_app", "run"]
