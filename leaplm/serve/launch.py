"""``leaplm serve``: load the model, then run the app under uvicorn until SIGINT/SIGTERM.

Prints one line on stdout when the socket is listening: ``leaplm serve: ready on http://HOST:PORT (model NAME)``.
SIGTERM (or Ctrl-C): uvicorn stops accepting connections and new requests get 503; in-flight requests may finish
for up to ``graceful_s`` seconds, then those still running end with an error event (streams) or a 500 (the others),
their responses complete, the engine thread stops and the process exits 0.
"""
from __future__ import annotations

import signal
import threading

from .app import ServeConfig, create_app

READY = "leaplm serve: ready on"


def run(llm, config: ServeConfig, host: str = "127.0.0.1", port: int = 8000, log_level: str = "warning",
        graceful_s: float = 30.0) -> int:
    import uvicorn

    app = create_app(llm, config)
    alm = app.state.leaplm.alm

    class Server(uvicorn.Server):
        async def startup(self, sockets=None) -> None:
            await super().startup(sockets)
            if self.started:
                shown = f"[{host}]" if ":" in host else host
                print(f"{READY} http://{shown}:{port} (model {config.served_model_name})", flush=True)

        def handle_exit(self, sig, frame) -> None:
            if not self.should_exit:   # the first signal: refuse new requests, give running ones graceful_s
                alm.drain()
                timer = threading.Timer(graceful_s, alm.abort_all,
                                        args=(f"the server is shutting down: aborted after {graceful_s:g} s",))
                timer.daemon = True
                timer.start()
            super().handle_exit(sig, frame)
            if sig == signal.SIGTERM:   # a graceful stop is the expected end: exit 0, not "killed by SIGTERM"
                self._captured_signals = [s for s in self._captured_signals if s != signal.SIGTERM]

    server = Server(uvicorn.Config(app, host=host, port=port, log_level=log_level, access_log=False,
                                   timeout_graceful_shutdown=graceful_s + 10, lifespan="on"))
    server.run()
    return 0 if server.started else 1


__all__ = ["READY", "ServeConfig", "create_app", "run"]
