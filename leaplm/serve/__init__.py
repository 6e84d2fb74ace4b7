"""``leaplm serve``: an OpenAI-compatible HTTP server on the continuous-batching engine.

- ``protocol.py``: the request bodies (pydantic) and their ``SamplingParams``;
- ``async_engine.py``: ``AsyncLLM``, the engine stepped in a background thread, requests streamed to asyncio;
- ``app.py``: the FastAPI routes, errors in OpenAI's shape, API key, body limit, SSE;
- ``metrics.py``: Prometheus metrics;
- ``launch.py``: uvicorn, the ready line, graceful shutdown;
- ``static/index.html``: the chat page served at ``/``.
"""
from __future__ import annotations

__all__ = ["create_app", "ServeConfig", "run"]


def __getattr__(name):   # FastAPI is imported only when the server is used
    if name in __all__:
        from . import launch

        return getattr(launch, name)
    raise AttributeError(name)
