"""The OpenAI-compatible HTTP server (FastAPI) in front of an `EngineProtocol` engine.

    app = create_app(engine, adapter_roots=["adapters/"], api_key="sk-...")
    uvicorn.run(app, host="127.0.0.1", port=8000)

Endpoints: ``/v1/completions``, ``/v1/chat/completions`` (stream and non-stream),
``/v1/models``, ``/v1/adapters`` (every adapter's status, failed ones included),
``/v1/load_lora_adapter``, ``/v1/unload_lora_adapter``, ``/tokenize``, ``/detokenize``,
``/version``, ``/health``, ``/metrics``. Completions take ``logprobs`` + ``echo``, chat
``logprobs`` + ``top_logprobs`` (`adapterkit.serve.logprobs` has the wire shapes).
The request's ``model`` field names an adapter, or the base model (no adapter).
Every error uses OpenAI's error JSON shape (see `adapterkit.serve.api`). See docs/serving.md.

Client disconnects: a streamed or non-streamed generation whose client goes away is aborted
(`engine.abort`), which frees its KV pages; other requests are untouched.
"""
from __future__ import annotations

import asyncio
import hmac
import json
import logging
import os
import time
from collections.abc import AsyncIterator, Awaitable, Callable, Mapping, Sequence
from contextlib import asynccontextmanager
from dataclasses import dataclass, field, replace
from functools import partial
from pathlib import Path
from typing import Any

import anyio
from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse, PlainTextResponse, Response, StreamingResponse
from starlette.exceptions import HTTPException as StarletteHTTPException
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from adapterkit.errors import AdapterNotFoundError, ConfigError, did_you_mean
from adapterkit.serve import api
from adapterkit.serve.api import APIError, engine_error, resolve_adapter_path, validation_error
from adapterkit.serve.ft_api import FineTuning, make_router
from adapterkit.serve.logprobs import LogprobFormatter
from adapterkit.serve.metrics import CONTENT_TYPE, ServerMetrics
from adapterkit.serve.types import EngineProtocol, GenerationChunk, GenerationRequest, SamplingParams

log = logging.getLogger("adapterkit.serve")


# ----------------------------------------------------------------------------- ASGI plumbing
_COUNTED = ("/v1/completions", "/v1/chat/completions")
_KEYED = ("/tokenize", "/detokenize")  # behind the API key too, besides /v1/*
DEFAULT_MAX_BODY_BYTES = 4 * 2**20  # far above any prompt a 128K-token context can take


class ErrorJSON(JSONResponse):
    """An error body, ASCII-escaped: a message quoting client input must always encode (a lone
    surrogate in it would make the UTF-8 encoding of a plain JSONResponse fail)."""

    def render(self, content: Any) -> bytes:
        return json.dumps(content, separators=(",", ":")).encode("ascii")


class _BodyLimit:
    """Pure ASGI middleware: a request body over `limit` bytes gets 413 ``request_too_large``.

    Checked from ``Content-Length`` before any byte is read, and while reading a body without
    one (chunked): the 413 goes out as soon as the count passes the limit, before the rest
    arrives. The body (at most `limit` bytes) is read here and replayed to the app, which would
    buffer it whole anyway; later ``receive`` calls (disconnect watching) go to the client.
    """

    def __init__(self, app: ASGIApp, limit: int, per_path: Mapping[str, tuple[int, str]] | None = None) -> None:
        # per_path: path -> (limit, the flag that sets it), e.g. uploads under --max-file-bytes
        self.app, self.limit, self.per_path = app, limit, dict(per_path or {})

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        limit, flag = self.per_path.get(scope["path"], (self.limit, "--max-body-bytes"))
        for k, v in scope.get("headers", []):
            if k == b"content-length" and v.isdigit() and int(v) > limit:
                await self._refuse(scope, receive, send, limit, flag)
                return
        parts: list[bytes] = []
        total = 0
        while True:
            message = await receive()
            if message["type"] == "http.disconnect":
                return  # the client left before sending its body: nobody to answer
            body = message.get("body", b"")
            total += len(body)
            if total > limit:
                await self._refuse(scope, receive, send, limit, flag)
                return
            parts.append(body)
            if not message.get("more_body", False):
                break
        replayed = False

        async def replay() -> Message:
            nonlocal replayed
            if replayed:
                return await receive()
            replayed = True
            return {"type": "http.request", "body": b"".join(parts), "more_body": False}

        await self.app(scope, replay, send)

    async def _refuse(self, scope: Scope, receive: Receive, send: Send, limit: int, flag: str) -> None:
        err = APIError(413, f"The request body is larger than this server's limit of {limit} bytes "
                       f"({flag}).", code="request_too_large")
        # the unread rest of the body cannot be skipped cheaply: close the connection after this
        await ErrorJSON(err.body(), status_code=413, headers={"Connection": "close"})(scope, receive, send)


class _AuthAndCount:
    """Pure ASGI middleware: bearer-key check on /v1/* and a request counter per status.

    Pure ASGI rather than BaseHTTPMiddleware: the latter wraps streaming bodies and hides
    client disconnects from the endpoint.
    """

    def __init__(self, app: ASGIApp, api_key: str | None, metrics: ServerMetrics) -> None:
        self.app, self.api_key, self.metrics = app, api_key, metrics

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http" or not (scope["path"].startswith("/v1/") or scope["path"] in _KEYED):
            await self.app(scope, receive, send)
            return
        path = scope["path"]
        if self.api_key is not None and not self._authorized(scope):
            err = APIError(401, "Invalid or missing API key: send 'Authorization: Bearer <key>'.",
                           code="invalid_api_key")
            await ErrorJSON(err.body(), status_code=401)(scope, receive, send)
            if path in _COUNTED:  # fixed label set: arbitrary paths must not grow the registry
                self.metrics.requests.labels(endpoint=path, status="401").inc()
            return
        status = {"code": 500}

        async def send_wrapper(message: Message) -> None:
            if message["type"] == "http.response.start":
                status["code"] = message["status"]
            await send(message)

        try:
            await self.app(scope, receive, send_wrapper)
        finally:
            if path in _COUNTED:
                self.metrics.requests.labels(endpoint=path, status=str(status["code"])).inc()

    def _authorized(self, scope: Scope) -> bool:
        assert self.api_key is not None
        for k, v in scope.get("headers", []):
            if k == b"authorization":
                scheme, _, token = v.decode("latin-1").partition(" ")
                return scheme.lower() == "bearer" and hmac.compare_digest(token.strip(), self.api_key)
        return False


class SSEResponse(StreamingResponse):
    """Server-sent events from an async iterator of ``data:`` payloads.

    Always watches for ``http.disconnect`` while streaming and always closes the iterator
    (its ``finally`` aborts the engine request), whether the stream ended, failed or the
    client went away.
    """

    media_type = "text/event-stream"

    def __init__(self, events: AsyncIterator[str]) -> None:
        super().__init__(events, status_code=200, media_type=self.media_type,
                         headers={"Cache-Control": "no-cache", "X-Accel-Buffering": "no"})
        self.events = events

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        async def stream() -> None:
            try:
                await send({"type": "http.response.start", "status": self.status_code, "headers": self.raw_headers})
                async for data in self.events:
                    await send({"type": "http.response.body", "body": f"data: {data}\n\n".encode(),
                                "more_body": True})
                await send({"type": "http.response.body", "body": b"", "more_body": False})
            except OSError:
                pass  # the socket is gone: same as a disconnect

        async def disconnect() -> None:
            while (await receive())["type"] != "http.disconnect":
                pass

        try:
            async with anyio.create_task_group() as tg:
                async def run(fn: Callable[[], Awaitable[None]]) -> None:
                    await fn()
                    tg.cancel_scope.cancel()  # whichever ends first ends the other

                tg.start_soon(run, stream)
                await run(disconnect)
        finally:
            aclose = getattr(self.events, "aclose", None)
            if aclose is not None:
                with anyio.CancelScope(shield=True):
                    await aclose()


# ----------------------------------------------------------------------------- the server
@dataclass
class _Generation:
    """Bookkeeping of one generation for usage and metrics."""

    arrival: float = field(default_factory=time.perf_counter)
    first_token: float | None = None
    last_token: float | None = None
    prompt_tokens: int = 0
    completion_tokens: int = 0
    finish_reason: str | None = None


class Server:
    """The state behind one app: engine, adapter roots, per-name locks, metrics, and the
    adapters that failed to register at start (name -> (path, reason))."""

    def __init__(self, engine: EngineProtocol, adapter_roots: Sequence[str | os.PathLike[str]] = (),
                 api_key: str | None = None, served_model_name: str | None = None,
                 unload_timeout: float | None = 600.0,
                 startup_failures: Mapping[str, tuple[str, str]] | None = None) -> None:
        self.engine = engine
        self.failed: dict[str, tuple[str, str]] = dict(startup_failures or {})
        self.unloading: set[str] = set()
        self.roots = [Path(os.path.realpath(r)) for r in adapter_roots]
        self.api_key = api_key
        self.model_name = served_model_name or engine.model_name
        self.unload_timeout = unload_timeout
        self.metrics = ServerMetrics(engine)
        # One lock per adapter name: load/unload of the same name run one at a time; other
        # names proceed in parallel. Created lazily; the event loop is single-threaded.
        self._locks: dict[str, tuple[asyncio.Lock, list[int]]] = {}  # name -> (lock, [users])

    # ---- models
    def base_names(self) -> set[str]:
        return {self.model_name, self.engine.model_name}

    async def adapter_names(self) -> list[str]:
        """Registered adapter names. In a worker thread: the engine's lock can be held for a
        whole forward step, and the event loop must keep streaming meanwhile."""
        infos = await anyio.to_thread.run_sync(self.engine.list_adapters)
        return [a.name for a in infos]

    def resolve_model(self, model: str) -> str | None:
        """The adapter for a request's ``model`` (None = base).

        Not checked against the registry here: the engine refuses an unknown adapter at
        submit (AdapterNotFoundError -> `not_found`), which also covers an adapter unloaded
        between a check and the submit, and keeps the hot path off the engine's lock.
        """
        return None if model in self.base_names() else model

    async def not_found(self, model: str) -> APIError:
        """404 for an unknown ``model``, listing the closest valid names (or, for an adapter
        that failed to register at start, why)."""
        if model in self.failed:
            path, reason = self.failed[model]
            return APIError(404, f"The model {model!r} does not exist: the adapter at {path} failed to load at "
                            f"start: {reason}", param="model", code="model_not_found")
        names = [self.model_name, *await self.adapter_names()]
        return APIError(404, f"The model {model!r} does not exist: it is neither the base model "
                        f"{self.model_name!r} nor a registered adapter." + did_you_mean(model, names),
                        param="model", code="model_not_found")

    def chat_prompt(self, body: api.ChatCompletionRequest | api.TokenizeRequest, check_len: bool = True) -> list[int]:
        """Token ids of the chat template applied to the messages (generation prompt appended).

        Tokenized by the template itself (not text then encode) so special tokens the template
        writes (BOS, role markers) are not doubled by the tokenizer's own BOS. `check_len`: 400
        when no room is left for output (off for ``/tokenize``, which only counts).
        """
        tok = self.engine.tokenizer
        if tok is None or not getattr(tok, "chat_template", None):
            raise APIError(400, "The base model's tokenizer has no chat template; use /v1/completions.",
                           param="messages", code="no_chat_template")
        msgs = [{"role": m.role, "content": m.text()} for m in body.messages or ()]
        try:
            ids: Any = tok.apply_chat_template(msgs, tokenize=True, add_generation_prompt=body.add_generation_prompt)
        except Exception as exc:  # jinja errors, e.g. a template that refuses a role order
            raise APIError(400, f"messages: the chat template rejected the messages: {exc}",
                           param="messages", code="invalid_value") from None
        if hasattr(ids, "keys"):  # transformers may return a BatchEncoding
            ids = ids["input_ids"]
        ids = list(ids)
        if ids and isinstance(ids[0], list):
            ids = ids[0]
        limit = self.engine.config.max_model_len
        if check_len and len(ids) >= limit:
            raise APIError(400, f"messages: the prompt is {len(ids)} tokens but the model's context is {limit} "
                           "tokens (max_model_len), leaving no room for output.", param="messages",
                           code="context_length_exceeded")
        return [int(t) for t in ids]

    @asynccontextmanager
    async def name_lock(self, name: str) -> AsyncIterator[None]:
        """Hold the lock of adapter `name`; the entry is dropped when nobody holds or awaits it,
        so names from failed loads do not accumulate."""
        entry = self._locks.setdefault(name, (asyncio.Lock(), [0]))
        entry[1][0] += 1
        try:
            async with entry[0]:
                yield
        finally:
            entry[1][0] -= 1
            if entry[1][0] == 0:
                del self._locks[name]

    # ---- generation
    def sampling(self, req: api.SamplingFields, max_tokens: int) -> SamplingParams:
        logprobs, prompt_logprobs = req.logprob_counts()
        try:
            return SamplingParams(
                logprobs=logprobs, prompt_logprobs=prompt_logprobs,
                max_tokens=max_tokens, temperature=req.temperature, top_p=req.top_p,
                top_k=max(req.top_k, 0),  # OpenAI/vLLM use -1 for "off", the engine 0
                seed=req.seed, stop=tuple(req.stop_list()), ignore_eos=req.ignore_eos, min_tokens=req.min_tokens,
                presence_penalty=req.presence_penalty, frequency_penalty=req.frequency_penalty,
                repetition_penalty=req.repetition_penalty,
            )
        except ConfigError as exc:
            raise engine_error(exc) from None

    async def start(self, greq: GenerationRequest, gen: _Generation, prompt_param: str,
                    max_tokens_param: str = "max_tokens") -> tuple[AsyncIterator[GenerationChunk], GenerationChunk]:
        """Submit and wait for the first chunk, so submit errors become HTTP statuses."""
        stream = self.engine.generate(greq)
        try:
            first = await stream.__anext__()
        except StopAsyncIteration:
            raise APIError(500, "the engine ended the stream without output", type="server_error") from None
        except BaseException as exc:
            await _close(stream)
            if isinstance(exc, AdapterNotFoundError) and greq.adapter is not None:
                raise await self.not_found(greq.adapter) from None
            if isinstance(exc, Exception):
                raise engine_error(exc, prompt_param=prompt_param, max_tokens_param=max_tokens_param) from None
            raise
        self._account(gen, first)
        return stream, first

    async def start_all(self, greqs: Sequence[GenerationRequest], gens: Sequence[_Generation], prompt_param: str,
                        max_tokens_param: str = "max_tokens"
                        ) -> list[tuple[AsyncIterator[GenerationChunk], GenerationChunk]]:
        """`start` for each choice at once (their prefills share engine steps); if any fails,
        the others are aborted and its error is raised."""
        if len(greqs) == 1:
            return [await self.start(greqs[0], gens[0], prompt_param, max_tokens_param)]
        got = await asyncio.gather(*(self.start(g, gen, prompt_param, max_tokens_param)
                                     for g, gen in zip(greqs, gens)), return_exceptions=True)
        failed = [r for r in got if isinstance(r, BaseException)]
        if failed:
            for g, r in zip(greqs, got):
                if not isinstance(r, BaseException):
                    self.engine.abort(g.request_id)
                    await _close(r[0])
            raise failed[0]
        return got  # type: ignore[return-value]

    @staticmethod
    def _account(gen: _Generation, chunk: GenerationChunk) -> None:
        if chunk.token_ids:
            t = time.perf_counter()
            gen.first_token = gen.first_token or t
            gen.last_token = t
        gen.prompt_tokens = chunk.usage.prompt_tokens
        gen.completion_tokens = chunk.usage.completion_tokens
        gen.finish_reason = chunk.finish_reason

    async def chunks(self, stream: AsyncIterator[GenerationChunk], first: GenerationChunk, greq: GenerationRequest,
                     gen: _Generation) -> AsyncIterator[GenerationChunk]:
        """All chunks (the first included); on early exit (disconnect) the request is aborted."""
        try:
            yield first
            if first.finished:
                return
            async for chunk in stream:
                self._account(gen, chunk)
                yield chunk
                if chunk.finished:
                    return
        finally:
            if gen.finish_reason is None:
                # client gone or task cancelled: free the sequence's KV pages now
                self.engine.abort(greq.request_id)
            await _close(stream)
            self.metrics.observe_request(
                arrival=gen.arrival, first_token=gen.first_token, last_token=gen.last_token,
                prompt_tokens=gen.prompt_tokens, completion_tokens=gen.completion_tokens,
                finish_reason=gen.finish_reason,
            )


async def _close(stream: AsyncIterator[Any]) -> None:
    aclose = getattr(stream, "aclose", None)
    if aclose is not None:
        try:
            await aclose()
        except Exception:  # closing must never mask the real outcome
            log.debug("error closing engine stream", exc_info=True)


async def _until_disconnect(request: Request, work: Awaitable[Any]) -> Any:
    """Run `work`; if the client disconnects first, cancel it (its finally aborts the request)."""
    task = asyncio.ensure_future(work)

    async def watch() -> None:
        while (await request.receive())["type"] != "http.disconnect":
            pass

    watcher = asyncio.ensure_future(watch())
    try:
        await asyncio.wait({task, watcher}, return_when=asyncio.FIRST_COMPLETED)
    finally:
        watcher.cancel()
    if not task.done():
        task.cancel()
        with anyio.CancelScope(shield=True):
            await asyncio.gather(task, return_exceptions=True)
        raise APIError(499, "client disconnected", code="client_closed_request")
    return task.result()


def create_app(engine: EngineProtocol, *, adapter_roots: Sequence[str | os.PathLike[str]] = (),
               api_key: str | None = None, served_model_name: str | None = None,
               unload_timeout: float | None = 600.0, shutdown_engine: bool = False,
               max_body_bytes: int | None = DEFAULT_MAX_BODY_BYTES,
               startup_failures: Mapping[str, tuple[str, str]] | None = None,
               fine_tuning: FineTuning | None = None) -> FastAPI:
    """Build the FastAPI app around a running engine.

    Args:
        engine: an `EngineProtocol` implementation (already started).
        adapter_roots: directories ``/v1/load_lora_adapter`` may load from (nothing else).
        api_key: if set, /v1/* needs ``Authorization: Bearer <api_key>`` (/health, /metrics stay open).
        served_model_name: the base model's name in ``model`` / ``/v1/models`` (default engine.model_name).
        unload_timeout: seconds an unload waits for the adapter's requests before giving up (503).
        shutdown_engine: call ``engine.shutdown()`` when the app stops (the CLI owns its engine).
        max_body_bytes: larger request bodies get 413 (None: no limit).
        startup_failures: adapters that failed to register before the app was built, as
            name -> (path, reason); listed by ``/v1/adapters`` and named in 404s.
        fine_tuning: the fine-tuning API's state (`adapterkit.serve.ft_api`); None: its routes
            answer 400 saying to start with ``--enable-fine-tuning``. Started (jobs left running
            by a previous server resumed) when the app starts, closed when it stops.

    Raises:
        ConfigError: `max_body_bytes` is not None and not a positive int.
    """
    if max_body_bytes is not None and (isinstance(max_body_bytes, bool) or not isinstance(max_body_bytes, int)
                                       or max_body_bytes < 1):
        raise ConfigError(f"max_body_bytes: must be None or an int >= 1, got {max_body_bytes!r}")
    srv = Server(engine, adapter_roots, api_key, served_model_name, unload_timeout, startup_failures)
    ft = fine_tuning or FineTuning(None, engine, srv.model_name)

    @asynccontextmanager
    async def lifespan(_: FastAPI) -> AsyncIterator[None]:
        await anyio.to_thread.run_sync(ft.start)
        try:
            yield
        finally:
            ft.close()
        if shutdown_engine:
            engine.shutdown()

    app = FastAPI(title="adapterkit", lifespan=lifespan)
    app.state.server = srv
    if max_body_bytes is not None:  # added first = inside the auth check: no key, nothing is read
        upload = max(max_body_bytes, ft.max_file_bytes + 2**16)  # + room for the multipart framing
        app.add_middleware(_BodyLimit, limit=max_body_bytes, per_path={"/v1/files": (upload, "--max-file-bytes")})
    app.add_middleware(_AuthAndCount, api_key=api_key, metrics=srv.metrics)
    _add_routes(app, srv)
    app.include_router(make_router(ft))

    @app.exception_handler(APIError)
    async def _api_error(_: Request, exc: APIError) -> JSONResponse:
        return ErrorJSON(exc.body(), status_code=exc.status)

    @app.exception_handler(RequestValidationError)
    async def _invalid(_: Request, exc: RequestValidationError) -> JSONResponse:
        err = validation_error(exc)
        return ErrorJSON(err.body(), status_code=err.status)

    @app.exception_handler(StarletteHTTPException)
    async def _http(_: Request, exc: StarletteHTTPException) -> JSONResponse:
        if exc.status_code == 400:  # FastAPI's only 400: "There was an error parsing the body"
            err = api.unparseable_body()
            return ErrorJSON(err.body(), status_code=400)
        kind = "not_found_error" if exc.status_code == 404 else "invalid_request_error"
        code = {404: "not_found", 405: "method_not_allowed"}.get(exc.status_code)
        return ErrorJSON(api.error_body(str(exc.detail), kind, code=code), status_code=exc.status_code,
                         headers=getattr(exc, "headers", None))

    @app.exception_handler(Exception)
    async def _internal(_: Request, exc: Exception) -> JSONResponse:
        err = engine_error(exc)
        return ErrorJSON(err.body(), status_code=err.status)

    return app


def _decode(tokenizer: Any | None, ids: list[int]) -> str:
    """Token ids as text ("" without a tokenizer; ids outside the vocabulary are refused later,
    by the engine, with a 400 naming ``prompt``)."""
    if tokenizer is None:
        return ""
    try:
        return tokenizer.decode(ids)
    except Exception:  # noqa: BLE001 - e.g. an id beyond the vocabulary: the engine names it
        return ""


def _usage(gen: _Generation) -> dict[str, int]:
    return api.usage(gen.prompt_tokens, gen.completion_tokens)


# stream=true answers server-sent events instead of JSON
_GENERATION_RESPONSES: dict[int | str, dict[str, Any]] = {
    200: {"content": {"application/json": {}, "text/event-stream": {"schema": {"type": "string"}}}},
    **api.error_responses(400, 401, 404, 413, 429, 500),
}


def _add_routes(app: FastAPI, srv: Server) -> None:
    """Register every endpoint on `app` (all closures over `srv`)."""
    engine = srv.engine

    @app.get("/health")
    async def health() -> dict[str, str]:
        return {"status": "ok"}

    @app.get("/metrics", response_class=PlainTextResponse)
    async def metrics() -> Response:
        # engine.stats() takes the engine's lock: off the event loop
        return Response(await anyio.to_thread.run_sync(srv.metrics.render), media_type=CONTENT_TYPE)

    @app.get("/v1/models", responses=api.error_responses(401))
    async def models() -> dict[str, Any]:
        data = [api.model_card(srv.model_name, "adapterkit", srv.model_name, None)]
        infos = await anyio.to_thread.run_sync(engine.list_adapters)
        data += [api.model_card(a.name, "adapterkit", a.source, srv.model_name) for a in infos]
        return {"object": "list", "data": data}

    @app.get("/v1/adapters", responses=api.error_responses(401))
    async def adapters() -> dict[str, Any]:
        """Every adapter the server knows: ``ready`` (registered), ``unloading`` (an unload is
        waiting for its requests) or ``failed`` (did not register at start; ``error`` says why)."""
        infos = await anyio.to_thread.run_sync(engine.list_adapters)
        data = [{"name": a.name, "status": "unloading" if a.name in srv.unloading else "ready", "path": a.source,
                 "method": a.method, "rank": a.rank, "loaded": a.loaded, "running_requests": a.running_requests}
                for a in infos]
        data += [{"name": n, "status": "failed", "path": p, "error": why} for n, (p, why) in sorted(srv.failed.items())]
        return {"object": "list", "data": data}

    async def run(request: Request, body: api.SamplingFields, greq_kwargs: dict[str, Any], max_tokens: int,
                  prompt_param: str, chat: bool, max_tokens_param: str | None, echo: str | None = None) -> Response:
        """Generate the ``n`` choices of one request. `max_tokens_param`: the field the client set
        max_tokens with (prompt + it must fit the context: 400 otherwise), None if it used the
        default. `echo`: the prompt text to return in front of each output (completions ``echo``)."""
        adapter = srv.resolve_model(body.model)
        params = srv.sampling(body, max_tokens)
        try:
            # n independent sequences; with a seed, choice i samples with seed + i (as vLLM)
            greqs = [GenerationRequest(adapter=adapter, strict_max_tokens=max_tokens_param is not None,
                                       params=params if params.seed is None or i == 0 else
                                       replace(params, seed=(params.seed + i) % 2**64), **greq_kwargs)
                     for i in range(body.n)]
        except ConfigError as exc:
            raise engine_error(exc, prompt_param=prompt_param) from None
        gens = [_Generation() for _ in greqs]
        # watched too: a client that leaves while its request is still queued is aborted now
        started = await _until_disconnect(
            request, srv.start_all(greqs, gens, prompt_param, max_tokens_param or "max_tokens"))
        rid = api.new_id("chatcmpl" if chat else "cmpl")
        streams = [srv.chunks(stream, first, g, gen) for (stream, first), g, gen in zip(started, greqs, gens)]
        shapers = []
        for g in greqs:
            fmt = None
            if body.logprob_counts()[0] is not None:
                # with echo the prompt's own tokens come first; otherwise they are the decoding context
                fmt = LogprobFormatter(engine.tokenizer, () if echo is not None else g.prompt_token_ids or ())
            shapers.append(api.ChoiceShaper(fmt, chat, echo))

        def use() -> dict[str, int]:  # the prompt once, the completions summed (as vLLM)
            return api.usage(gens[0].prompt_tokens, sum(g.completion_tokens for g in gens))

        if body.stream:
            return SSEResponse(api.sse_events(api.merge_choices(streams), rid, body, use, chat, shapers))

        async def collect() -> list[list[GenerationChunk]]:
            out: list[list[GenerationChunk]] = [[] for _ in streams]
            async for i, c in api.merge_choices(streams):
                out[i].append(c)
            return out

        outs = await _until_disconnect(request, collect())
        choices = []
        for i, (out, shaper) in enumerate(zip(outs, shapers)):
            last = out[-1]
            if last.finish_reason == "error":
                raise APIError(500, last.error or "generation failed", type="server_error", code="engine_error")
            for c in out:
                shaper.feed(c)
            # decoding every token string costs a few ms per hundred tokens: off the event loop
            text, lps = await anyio.to_thread.run_sync(shaper.take) if shaper.fmt is not None else shaper.take()
            choice = api.chat_choice if chat else api.completion_choice
            choices.append(choice(i, text, last.finish_reason, lps))
        if chat:
            return JSONResponse(api.chat_body(rid, body.model, choices, use()))
        return JSONResponse(api.completion_body(rid, body.model, choices, use()))

    @app.post("/v1/completions", responses=_GENERATION_RESPONSES)
    async def completions(body: api.CompletionRequest, request: Request) -> Response:
        prompt = body.prompt
        kwargs = {"prompt": prompt} if isinstance(prompt, str) else {"prompt_token_ids": list(prompt)}
        # the default (16) is capped to the room the prompt leaves; an explicit value must fit
        explicit = body.max_tokens is not None and "max_tokens" in body.model_fields_set
        echo = None
        if body.echo:  # the prompt as sent; token ids read back through the tokenizer
            echo = prompt if isinstance(prompt, str) else _decode(engine.tokenizer, list(prompt))
        return await run(request, body, kwargs, 16 if body.max_tokens is None else body.max_tokens, "prompt",
                         chat=False, max_tokens_param="max_tokens" if explicit else None, echo=echo)

    @app.post("/v1/chat/completions", responses=_GENERATION_RESPONSES)
    async def chat_completions(body: api.ChatCompletionRequest, request: Request) -> Response:
        adapter = srv.resolve_model(body.model)
        if adapter is not None and adapter not in await srv.adapter_names():
            raise await srv.not_found(adapter)  # 404 before any template work (the engine re-checks)
        ids = srv.chat_prompt(body)
        max_tokens = body.max_new_tokens() or max(1, engine.config.max_model_len - len(ids))
        field = None if body.max_new_tokens() is None else \
            "max_completion_tokens" if body.max_completion_tokens is not None else "max_tokens"
        return await run(request, body, {"prompt_token_ids": ids}, max_tokens, "messages", chat=True,
                         max_tokens_param=field)

    async def check_model(model: str | None) -> None:
        """404 unless `model` is None, the base or a registered adapter."""
        if model is not None and model not in srv.base_names() and model not in await srv.adapter_names():
            raise await srv.not_found(model)

    def tokenizer() -> Any:
        if engine.tokenizer is None:
            raise APIError(400, "this server's model has no tokenizer", code="no_tokenizer")
        return engine.tokenizer

    @app.post("/tokenize", responses=api.error_responses(400, 401, 404, 413))
    async def tokenize(body: api.TokenizeRequest) -> dict[str, Any]:
        """vLLM's tokenize: ``{"count", "max_model_len", "tokens", "token_strs"}``."""
        await check_model(body.model)
        tok = tokenizer()
        if body.messages is not None:
            ids = srv.chat_prompt(body, check_len=False)
        else:
            try:
                ids = [int(t) for t in tok.encode(body.prompt, add_special_tokens=body.add_special_tokens)]
            except (TypeError, ValueError) as exc:
                raise APIError(400, f"prompt: the tokenizer cannot encode it ({exc})", param="prompt",
                               code="invalid_value") from None
        strs = tok.convert_ids_to_tokens(ids) if body.return_token_strs else None
        return {"count": len(ids), "max_model_len": engine.config.max_model_len, "tokens": ids, "token_strs": strs}

    @app.post("/detokenize", responses=api.error_responses(400, 401, 404, 413))
    async def detokenize(body: api.DetokenizeRequest) -> dict[str, Any]:
        """vLLM's detokenize: ``{"prompt": text}``."""
        await check_model(body.model)
        tok = tokenizer()
        vocab = engine.runner.vocab_size if hasattr(engine, "runner") else len(tok)
        bad = [t for t in body.tokens if t >= vocab]
        if bad:
            raise APIError(400, f"tokens: id {bad[0]} is outside the vocabulary [0, {vocab})", param="tokens",
                           code="invalid_value")
        return {"prompt": tok.decode(body.tokens)}

    @app.get("/version")
    async def version() -> dict[str, str]:
        """The adapterkit version (open, like /health)."""
        from adapterkit import __version__

        return {"version": __version__}

    @app.post("/v1/load_lora_adapter", responses=api.error_responses(400, 401, 409, 413))
    async def load_lora_adapter(body: api.LoadLoraRequest) -> dict[str, Any]:
        name = body.lora_name
        if name in srv.base_names():  # the character set is checked by the schema (api.ADAPTER_NAME_RULE)
            raise APIError(400, f"lora_name {name!r} is the base model's name; pick another",
                           param="lora_name", code="invalid_value")
        path = resolve_adapter_path(body.lora_path, srv.roots)
        async with srv.name_lock(name):
            try:
                info = await anyio.to_thread.run_sync(engine.register_adapter, name, str(path))
            except Exception as exc:
                raise engine_error(exc, param="lora_path") from None
        srv.failed.pop(name, None)  # a start-up failure of this name is history now
        log.info("loaded adapter %r from %s (rank %d)", name, path, info.rank)
        return {"status": "ok", "message": f"Success: LoRA adapter '{name}' added successfully.",
                "adapter": {"name": info.name, "path": info.source, "rank": info.rank, "method": info.method}}

    @app.post("/v1/unload_lora_adapter", responses=api.error_responses(400, 401, 404, 413, 503))
    async def unload_lora_adapter(body: api.UnloadLoraRequest) -> dict[str, Any]:
        name = body.lora_name
        async with srv.name_lock(name):
            names = await srv.adapter_names()
            if name not in names:
                raise APIError(404, f"No adapter named {name!r} is loaded." + did_you_mean(name, names),
                               param="lora_name", code="model_not_found")
            # Waits for the adapter's queued and running requests (new ones get 404 meanwhile).
            fn = partial(engine.unregister_adapter, name, wait=True, timeout=srv.unload_timeout)
            srv.unloading.add(name)
            try:
                await anyio.to_thread.run_sync(fn)
            except Exception as exc:
                err = engine_error(exc, param="lora_name")
                err.param = "lora_name"  # also for a 404 from a race with another unloader
                raise err from None
            finally:
                srv.unloading.discard(name)
        log.info("unloaded adapter %r", name)
        return {"status": "ok", "message": f"Success: LoRA adapter '{name}' removed successfully."}


__all__ = ["SSEResponse", "Server", "create_app"]
