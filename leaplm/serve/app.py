"""The FastAPI app of ``leaplm serve``: OpenAI's routes on an ``AsyncLLM``.

    app = create_app(llm, ServeConfig(served_model_name="smollm2", api_key="..."))

Routes: ``POST /v1/chat/completions``, ``POST /v1/completions`` (``stream`` true/false; SSE in OpenAI's chunk format
ending with ``data: [DONE]``), ``GET /v1/models``, ``GET /v1/leaplm/info`` (the chat page's method list),
``GET /health``, ``GET /metrics``, ``GET /`` (the chat page, ``static/index.html``).

Every error is OpenAI's shape ``{"error": {"message", "type", "param", "code"}}``: 400 for bad input (types, values,
a prompt longer than the context, a schema that does not compile), 401 without the API key, 404 for an unknown model
or route, 413 for a body over ``max_body_bytes``, 429 with ``Retry-After`` when the queue is full, 503 while
shutting down. A client that disconnects aborts its request (and frees its KV blocks) within one engine step.
"""
from __future__ import annotations

import asyncio
import hmac
import json
import logging
import time
import uuid
from contextlib import asynccontextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, AsyncIterator

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import HTMLResponse, JSONResponse, Response, StreamingResponse
from starlette.concurrency import run_in_threadpool
from starlette.exceptions import HTTPException as StarletteHTTPException

from ..errors import InvalidParamsError, LeapLMError, PromptTooLongError
from ..llm import LLM
from ..speculative import registry
from .async_engine import AsyncLLM, Delta, QueueFullError, RequestGroup, ShuttingDownError
from .metrics import CONTENT_TYPE_LATEST, Metrics
from .protocol import ChatCompletionRequest, CompletionRequest, speculative_spec

log = logging.getLogger("leaplm.serve")
STATIC = Path(__file__).parent / "static"


@dataclass
class ServeConfig:
    """The server's settings (``leaplm serve`` flags).

    ``speculative``: the method name of the LLM's own drafter (``--spec``), reported and used when a request names
    none. ``max_queue``: requests waiting beyond the running ones before 429. ``max_body_bytes``: request body cap
    (413). ``template_timeout_s``: the chat template's time bound (a request whose messages take longer to render is
    refused). ``default_max_tokens``: ``max_tokens`` when a request gives none (None: what is left of the context)."""
    served_model_name: str
    api_key: str | None = None
    speculative: str | None = None
    max_queue: int = 256
    max_body_bytes: int = 4 * 2 ** 20
    allowed_origins: list[str] = field(default_factory=list)
    template_timeout_s: float = 5.0
    default_max_tokens: int | None = None


class APIError(Exception):
    def __init__(self, status: int, message: str, type_: str = "invalid_request_error", param: str | None = None,
                 code: str | None = None, headers: dict | None = None) -> None:
        super().__init__(message)
        self.status, self.message, self.type, self.param, self.code, self.headers = (status, message, type_, param,
                                                                                      code, headers)


def error_body(message: str, type_: str, param: str | None = None, code: str | None = None) -> dict:
    return {"error": {"message": message, "type": type_, "param": param, "code": code}}


def error_response(e: APIError) -> JSONResponse:
    return JSONResponse(error_body(e.message, e.type, e.param, e.code), status_code=e.status, headers=e.headers)


def api_error(e: BaseException) -> APIError:
    """The HTTP answer to an exception raised while taking a request."""
    if isinstance(e, APIError):
        return e
    if isinstance(e, QueueFullError):
        return APIError(429, str(e), "rate_limit_error", code="queue_full", headers={"Retry-After": "1"})
    if isinstance(e, ShuttingDownError):
        return APIError(503, str(e), "service_unavailable", code="shutting_down", headers={"Retry-After": "5"})
    if isinstance(e, PromptTooLongError):
        return APIError(400, str(e), param="messages", code="context_length_exceeded")
    if isinstance(e, LeapLMError):   # bad params, a grammar that does not compile, a model without a chat template
        return APIError(400, str(e))
    log.exception("unexpected error while taking a request")
    return APIError(500, f"internal error: {type(e).__name__}", "server_error")


def validation_error(errors: list[dict]) -> APIError:
    """A 400 naming the first problem pydantic found (``messages.0.role: ...``) and how many more there are."""
    first = errors[0] if errors else {}
    if first.get("type") == "json_invalid":
        at = next((p for p in first.get("loc", ()) if isinstance(p, int)), None)
        why = (first.get("ctx") or {}).get("error", "")
        return APIError(400, f"the request body is not valid JSON{f' ({why})' if why else ''}"
                             f"{f' at character {at}' if at is not None else ''}")
    loc = [str(p) for p in first.get("loc", ()) if p != "body"]
    where = ".".join(loc)
    msg = str(first.get("msg", "invalid request")).removeprefix("Value error, ")
    if first.get("type") == "missing":
        msg = "this field is required"
    message = f"{where or 'body'}: {msg}"
    if len(errors) > 1:
        message += f" (and {len(errors) - 1} more problem{'s' if len(errors) > 2 else ''})"
    return APIError(400, message, param=where or None)


class BodyLimit:
    """ASGI middleware: a request body over ``limit`` bytes is answered 413 (Content-Length, or counted)."""

    def __init__(self, app, limit: int) -> None:
        self.app, self.limit = app, limit

    async def __call__(self, scope, receive, send):
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        length = dict(scope.get("headers") or []).get(b"content-length")
        too_big = APIError(413, f"the request body is larger than {self.limit} bytes", code="request_too_large")
        if length is not None and length.isdigit() and int(length) > self.limit:
            return await error_response(too_big)(scope, receive, send)
        seen = 0

        async def limited():
            nonlocal seen
            message = await receive()
            if message["type"] == "http.request":
                seen += len(message.get("body", b""))
                if seen > self.limit:
                    raise _BodyTooLarge()
            return message

        try:
            await self.app(scope, limited, send)
        except _BodyTooLarge:
            await error_response(too_big)(scope, receive, send)


class _BodyTooLarge(Exception):
    pass


def create_app(llm: LLM, config: ServeConfig, alm: AsyncLLM | None = None, engine_thread: bool = True) -> FastAPI:
    """The app serving ``llm``. ``engine_thread``: its engine thread starts with the app (lifespan); False: the
    caller runs ``app.state.leaplm.alm.run()`` in a thread of its own (``launch.run``: the main thread). Either way
    the engine stops when the app does."""
    state = _State(llm, config, alm)

    @asynccontextmanager
    async def lifespan(app: FastAPI):
        if engine_thread:
            state.alm.start()
        try:
            yield
        finally:
            state.alm.shutdown()

    app = FastAPI(title="leaplm", version="1", lifespan=lifespan,
                  description="OpenAI-compatible text generation with lossless speculative decoding")
    app.state.leaplm = state
    if config.allowed_origins:
        from fastapi.middleware.cors import CORSMiddleware

        app.add_middleware(CORSMiddleware, allow_origins=config.allowed_origins, allow_methods=["GET", "POST"],
                           allow_headers=["Authorization", "Content-Type"])
    app.add_middleware(BodyLimit, limit=config.max_body_bytes)

    @app.middleware("http")
    async def auth(request: Request, call_next):
        if config.api_key and request.url.path.startswith("/v1"):
            given = request.headers.get("authorization", "")
            expected = f"Bearer {config.api_key}"
            if not hmac.compare_digest(given.encode(), expected.encode()):
                return error_response(APIError(401, "invalid or missing API key: send 'Authorization: Bearer KEY'",
                                               "authentication_error", code="invalid_api_key"))
        return await call_next(request)

    @app.exception_handler(RequestValidationError)
    async def invalid(request: Request, exc: RequestValidationError):
        return error_response(validation_error(exc.errors()))

    @app.exception_handler(StarletteHTTPException)
    async def http_error(request: Request, exc: StarletteHTTPException):
        kind = "not_found_error" if exc.status_code == 404 else "invalid_request_error"
        return error_response(APIError(exc.status_code, str(exc.detail), kind))

    @app.exception_handler(APIError)
    async def api_error_handler(request: Request, exc: APIError):
        return error_response(exc)

    @app.exception_handler(Exception)
    async def unexpected(request: Request, exc: Exception):
        return error_response(api_error(exc))

    @app.get("/health")
    async def health():
        return {"status": "ok"}

    @app.get("/", response_class=HTMLResponse, include_in_schema=False)
    async def chat_page():
        page = STATIC / "index.html"
        if not page.exists():
            raise APIError(404, "the chat page is not installed", "not_found_error")
        return HTMLResponse(page.read_text())

    @app.get("/metrics", include_in_schema=False)
    async def metrics():
        return Response(state.metrics.render(), media_type=CONTENT_TYPE_LATEST)

    @app.get("/v1/models")
    async def models():
        return {"object": "list", "data": [state.model_card()]}

    @app.get("/v1/models/{model_id:path}")
    async def model(model_id: str):
        state.check_model(model_id)
        return state.model_card()

    @app.get("/v1/leaplm/info")
    async def info():
        return state.info()

    @app.post("/v1/chat/completions")
    async def chat_completions(body: ChatCompletionRequest, request: Request):
        return await state.complete(body, request, chat=True)

    @app.post("/v1/completions")
    async def completions(body: CompletionRequest, request: Request):
        return await state.complete(body, request, chat=False)

    return app


class _State:
    def __init__(self, llm: LLM, config: ServeConfig, alm: AsyncLLM | None) -> None:
        self.llm, self.config = llm, config
        self.alm = alm if alm is not None else AsyncLLM(llm, max_queue=config.max_queue)
        self.metrics = Metrics(lambda: self.alm.stats)
        self.created = int(time.time())
        self._token_text: dict[int, str] = {}

    # ------------------------------------------------------------------ small routes
    def model_card(self) -> dict:
        return {"id": self.config.served_model_name, "object": "model", "created": self.created,
                "owned_by": "leaplm", "max_model_len": self.llm.engine.max_model_len}

    def check_model(self, name: str | None) -> None:
        if name is not None and name != self.config.served_model_name:
            raise APIError(404, f"model {name!r} does not exist; this server serves {self.config.served_model_name!r}",
                           "not_found_error", param="model", code="model_not_found")

    def info(self) -> dict:
        methods = [info.name for info in registry.DRAFTERS if not info.needs]
        if self.config.speculative and self.config.speculative not in methods:
            methods.append(self.config.speculative)
        return {"model": self.config.served_model_name, "speculative_methods": methods,
                "speculative_default": self.config.speculative, "max_model_len": self.llm.engine.max_model_len,
                "quantization": self.llm.quantization, "max_num_seqs": self.llm.max_num_seqs,
                "kv_cache_memory": self.llm.engine.kv_cache_memory, "kv_reserved": self.llm.engine.pool.reserved}

    # ------------------------------------------------------------------ completions
    def speculative(self, value) -> tuple[Any, str | None]:
        """(what ``AsyncLLM.submit`` takes, the method name for stats) for a request's ``leaplm.speculative``."""
        value = speculative_spec(value)
        if value is None:
            return None, self.config.speculative
        if value == "none":
            return "none", None
        info = registry.lookup(value["method"] if isinstance(value, dict) else value)
        if info.needs:   # a draft model or a corpus: only the one the server loaded (a request never loads files)
            if info.name == self.config.speculative and not isinstance(value, dict):
                return None, info.name
            raise InvalidParamsError(f"leaplm.speculative: {info.name} needs {' and '.join(info.needs)}, which a "
                                     f"request cannot load; start the server with --spec {info.cli_name} and its flags")
        return value, info.name

    async def prompts(self, body, chat: bool) -> list[list[int]]:
        llm = self.llm
        if chat:
            conversation = body.conversation()
            try:
                ids = await asyncio.wait_for(run_in_threadpool(llm.chat_prompt, conversation),
                                             self.config.template_timeout_s)
            except asyncio.TimeoutError:
                raise APIError(400, f"rendering the chat template took longer than {self.config.template_timeout_s:g} s",
                               param="messages") from None
            return [ids]
        out = []
        for p in body.prompts():
            ids = await run_in_threadpool(llm.encode, p) if isinstance(p, str) else list(p)
            out.append(ids)
        return out

    async def complete(self, body, request: Request, chat: bool):
        self.check_model(body.model)
        received = time.perf_counter()
        try:
            default = self.config.default_max_tokens
            params = [body.params(default if default is not None else 2 ** 31 - 1, i) for i in range(max(1, body.n))]   # params() checks n
            speculative, method = self.speculative(body.speculative)
            prompts = await self.prompts(body, chat)
            if params[0].constraint is not None:   # compile (cached) off the event loop and the engine thread
                await run_in_threadpool(self.llm.compile_constraint, params[0])
            jobs = [(ids, p) for ids in prompts for p in params]
            group = await self.alm.submit(jobs, speculative, method)
        except Exception as e:   # (a cancelled request is not rejected: CancelledError passes)
            self.metrics.finished("rejected")
            raise api_error(e) from None
        prompt_tokens = sum(len(ids) for ids in prompts)
        self.metrics.prompt.inc(prompt_tokens)
        rid = ("chatcmpl-" if chat else "cmpl-") + uuid.uuid4().hex
        out = _Output(self, rid, body, chat, prompt_tokens=prompt_tokens, received=received)
        if body.stream:
            return StreamingResponse(self._sse(group, out, request), media_type="text/event-stream",
                                     headers={"Cache-Control": "no-cache", "X-Accel-Buffering": "no"})
        watcher = asyncio.create_task(self._watch(request, group))
        try:
            async for delta in group:
                out.take(delta)
        finally:
            watcher.cancel()
            self._close(group, out)
        if out.error is not None:
            if self.alm.draining:
                raise APIError(503, out.error, "service_unavailable", code="shutting_down")
            raise APIError(500, out.error, "server_error")
        if group.aborted:
            return Response(status_code=499)
        return out.response()

    async def _watch(self, request: Request, group: RequestGroup) -> None:
        """Abort ``group`` when the client disconnects (uvicorn reports it on ``receive``)."""
        try:
            while True:
                message = await request.receive()
                if message["type"] == "http.disconnect":
                    if not group.done:
                        self.alm.abort(group)
                    return
        except asyncio.CancelledError:
            pass
        except Exception:   # noqa: BLE001 - nothing left to read: treat as gone
            if not group.done:
                self.alm.abort(group)

    def _close(self, group: RequestGroup, out: "_Output") -> None:
        if not group.done:
            self.alm.abort(group)
        self.alm.finished(group)
        status = "error" if out.error else "aborted" if group.aborted else "ok"
        for stats in out.stats.values():
            self.metrics.finished(status, stats)
        if not out.stats:
            self.metrics.finished(status)

    async def _sse(self, group: RequestGroup, out: "_Output", request: Request) -> AsyncIterator[str]:
        watcher = asyncio.create_task(self._watch(request, group))
        try:
            for chunk in out.first_chunks():
                yield sse_event(chunk)
            async for delta in group:
                for chunk in out.take(delta):
                    yield sse_event(chunk)
            if out.error is not None:
                yield sse_event(error_body(out.error, "server_error"))
            elif out.body.include_usage:
                yield sse_event(out.usage_chunk())
            yield "data: [DONE]\n\n"
        finally:
            watcher.cancel()
            self._close(group, out)

    # ------------------------------------------------------------------ token text (logprobs)
    def token_text(self, token: int) -> str:
        text = self._token_text.get(token)
        if text is None:
            text = self._token_text[token] = self.llm.tokenizer.decode([token], skip_special_tokens=False)
        return text


def sse_event(obj: dict) -> str:
    return f"data: {json.dumps(obj, ensure_ascii=False, allow_nan=False)}\n\n"


def _finite(x: float) -> float:
    return x if x > -9999.0 else -9999.0   # JSON has no -inf (vLLM's convention)


class _Output:
    """One HTTP request's choices as they are built: text, logprobs, finish reasons, usage and stats."""

    def __init__(self, state: _State, rid: str, body, chat: bool, prompt_tokens: int,
                 received: float) -> None:
        self.state, self.id, self.body, self.chat = state, rid, body, chat
        self.created = int(time.time())
        self.model = state.config.served_model_name
        self.prompt_tokens = prompt_tokens
        self.received = received
        self.texts: dict[int, list[str]] = {}
        self.logprobs: dict[int, list] = {}
        self.finish: dict[int, str] = {}
        self.completion_tokens: dict[int, int] = {}
        self.stats: dict[int, dict] = {}
        self.last: dict[int, float] = {}
        self.text_offset: dict[int, int] = {}
        self.error: str | None = None
        self.want_logprobs = (body.logprobs if chat else body.logprobs is not None)

    # -- per delta
    def take(self, d: Delta) -> list[dict]:
        """Record ``d``; returns the stream chunks it makes (none for an error: ``_State._sse`` sends it last)."""
        if d.error is not None:
            self.error = self.error or d.error
            return []
        i = d.index
        now = time.perf_counter()
        metrics = self.state.metrics
        if d.token_ids:
            if i not in self.last:
                metrics.ttft.observe(now - self.received)
                metrics.tokens(len(d.token_ids), None)
            else:
                metrics.tokens(len(d.token_ids), now - self.last[i])
            self.last[i] = now
        self.texts.setdefault(i, []).append(d.text)
        lp = self._logprobs(i, d) if self.want_logprobs and d.logprobs else None
        if lp is not None:
            self.logprobs.setdefault(i, []).append(lp)
        if d.finish_reason is not None:
            self.finish[i] = d.finish_reason
            self.completion_tokens[i] = d.usage["completion_tokens"]
            self.stats[i] = d.stats
        chunks = []
        if d.text or lp is not None:
            chunks.append(self._chunk(i, d.text, lp, None))
        if d.finish_reason is not None:
            chunks.append(self._chunk(i, "", None, d.finish_reason))
        return chunks

    def _logprobs(self, i: int, d: Delta):
        text = self.state.token_text
        if self.chat:
            return [{"token": text(t), "logprob": _finite(lp.logprob), "bytes": list(text(t).encode()),
                     "top_logprobs": [{"token": text(a), "logprob": _finite(v), "bytes": list(text(a).encode())}
                                      for a, v in lp.top]}
                    for t, lp in zip(d.token_ids, d.logprobs)]
        tokens, offsets = [], []
        for t in d.token_ids:
            offsets.append(self.text_offset.get(i, 0))
            tokens.append(text(t))
            self.text_offset[i] = offsets[-1] + len(tokens[-1])
        return {"tokens": tokens, "token_logprobs": [_finite(lp.logprob) for lp in d.logprobs],
                "top_logprobs": [{text(a): _finite(v) for a, v in lp.top} for lp in d.logprobs],
                "text_offset": offsets}

    # -- chunks
    def _base(self, obj: str) -> dict:
        return {"id": self.id, "object": obj, "created": self.created, "model": self.model}

    def first_chunks(self) -> list[dict]:
        """Chat streams open each choice with its role (OpenAI's first chunk)."""
        if not self.chat:
            return []
        return [{**self._base("chat.completion.chunk"),
                 "choices": [{"index": i, "delta": {"role": "assistant", "content": ""}, "logprobs": None,
                              "finish_reason": None}]} for i in range(self.body.n)]

    def _chunk(self, i: int, text: str, lp, finish: str | None) -> dict:
        if self.chat:
            choice = {"index": i, "delta": {"content": text} if text or finish is None else {},
                      "logprobs": {"content": lp} if lp is not None else None, "finish_reason": finish}
            return {**self._base("chat.completion.chunk"), "choices": [choice]}
        return {**self._base("text_completion"),
                "choices": [{"index": i, "text": text, "logprobs": lp, "finish_reason": finish}]}

    def usage(self) -> dict:
        done = sum(self.completion_tokens.values())
        return {"prompt_tokens": self.prompt_tokens, "completion_tokens": done, "total_tokens": self.prompt_tokens + done}

    def leaplm(self) -> list[dict]:
        return [self.stats[i] for i in sorted(self.stats)]

    def usage_chunk(self) -> dict:
        chunk = {**self._base("chat.completion.chunk" if self.chat else "text_completion"), "choices": [],
                 "usage": self.usage()}
        stats = self.leaplm()
        chunk["leaplm"] = stats[0] if len(stats) == 1 else stats
        return chunk

    # -- whole response
    def response(self) -> dict:
        choices = []
        for i in sorted(self.finish):
            text = "".join(self.texts.get(i, []))
            if self.chat:
                lp = ({"content": [e for part in self.logprobs.get(i, []) for e in part]} if self.want_logprobs
                      else None)
                choices.append({"index": i, "message": {"role": "assistant", "content": text}, "logprobs": lp,
                                "finish_reason": self.finish[i]})
            else:
                lp = None
                if self.want_logprobs:
                    parts = self.logprobs.get(i, [])
                    lp = {k: [x for part in parts for x in part[k]] for k in
                          ("tokens", "token_logprobs", "top_logprobs", "text_offset")}
                choices.append({"index": i, "text": text, "logprobs": lp, "finish_reason": self.finish[i]})
        kind = "chat.completion" if self.chat else "text_completion"
        return {**self._base(kind), "choices": choices, "usage": self.usage(), "leaplm": self.leaplm()}
