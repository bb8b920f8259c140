"""create_app(settings): the FastAPI application. Its lifespan loads the model on a background thread (so /health
answers at once and /ready turns 200 when the engine loop runs), then starts the engine thread and stops it on
shutdown. Around the routes: CORS (when configured), metrics, API-key check, the drain (503 once a graceful shutdown
has begun, see server/main.py) and a request-body size limit."""

from __future__ import annotations

import asyncio
import hashlib
import hmac
import logging
import re
import threading
import time
from collections.abc import AsyncIterator, Callable
from contextlib import asynccontextmanager
from importlib.metadata import PackageNotFoundError, version
from typing import Any, TypeVar

from fastapi import FastAPI
from fastapi.middleware.cors import CORSMiddleware
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from famserve.engine.build import LoadedModel, load_model, requested_fam
from famserve.engine.config import EngineConfig
from famserve.engine.engine import AsyncEngine, LLMEngine
from famserve.engine.errors import FamserveError
from famserve.engine.structured import GrammarCompiler

from .errors import AUTHENTICATION, INVALID_REQUEST, SERVER_ERROR, PayloadTooLargeError, error_json, \
    register_exception_handlers
from .generation import GenerationService
from .metrics import Metrics, MetricsMiddleware
from .routes import chat, completions, health, models, playground, responses, sessions, tokenize
from .sessions import SessionLimits, SessionManager
from .store import open_store
from .settings import Settings

log = logging.getLogger(__name__)
T = TypeVar("T")
# Answered without an API key: orchestrator probes, and the static playground page (it asks the user for a key);
# /metrics too when settings.metrics_open.
OPEN_PATHS = frozenset({"/health", "/ready"}) | playground.PATHS
METRICS_PATH = "/metrics"
UPLOAD_PATHS = re.compile(r"/v1/sessions/(import|[^/]+/append)")

try:
    __version__ = version("famserve")
except PackageNotFoundError:  # running from a source tree that is not installed
    __version__ = "0.0.0"


def create_app(settings: Settings, loaded_model: LoadedModel | None = None,
               on_load_error: Callable[[], None] | None = None) -> FastAPI:
    """The app for `settings`. With `loaded_model` it serves that model instead of loading settings.model;
    `on_load_error` is called if loading fails (famserve serve uses it to exit)."""
    api_keys = settings.all_api_keys()
    open_paths = OPEN_PATHS | ({METRICS_PATH} if settings.metrics_open else set())
    app = FastAPI(title="famserve", version=__version__, lifespan=_lifespan(settings, loaded_model, on_load_error),
                  description="OpenAI-compatible server for long-context streaming models (TransformerFAM).")
    app.state.settings = settings
    app.state.service = None  # a GenerationService once the model is loaded
    app.state.load_error = None  # why loading failed, if it did
    app.state.started_at = int(time.time())
    app.state.drain = Drain()  # begun by the server on SIGTERM
    app.state.metrics = Metrics(lambda: app.state.service.engine.engine.stats if app.state.service else None,
                                lambda: app.state.sessions.stats() if app.state.sessions else None)
    register_exception_handlers(app)
    app.state.sessions = None  # a SessionManager once the model is loaded
    routers = [module.router for module in (completions, chat, models, tokenize, health, sessions, responses,
                                            playground)]
    for router in routers:
        app.include_router(router)
    paths = {getattr(route, "path", None) for router in [app.router, *routers] for route in router.routes} - {None}
    # Starlette wraps in reverse: the last added runs first (CORS, metrics, API key, drain, body limit, routes).
    app.add_middleware(BodyLimitMiddleware, max_body_bytes=settings.max_body_bytes,
                       max_upload_bytes=settings.max_upload_bytes)
    app.add_middleware(DrainMiddleware, drain=app.state.drain)
    if api_keys:
        app.add_middleware(APIKeyMiddleware, api_keys=api_keys, open_paths=open_paths)
        _document_bearer_auth(app, open_paths)
    app.add_middleware(MetricsMiddleware, metrics=app.state.metrics, known_paths=paths)
    if settings.cors_origins:
        app.add_middleware(CORSMiddleware, allow_origins=settings.cors_origins, allow_methods=["*"],
                           allow_headers=["*"])
    return app


def engine_config(settings: Settings) -> EngineConfig:
    return EngineConfig(device=settings.device, dtype=settings.dtype, max_running=settings.max_running,
                        max_waiting=settings.max_waiting, prefill_chunk_tokens=settings.prefill_budget_tokens,
                        state_memory_bytes=settings.state_memory_bytes, cuda_graphs=settings.cuda_graphs,
                        quantize=settings.quantize)


def load_model_from_settings(settings: Settings) -> LoadedModel:
    fam, unset = requested_fam(settings.block_size, settings.memory_blocks, settings.sink_tokens,
                               settings.fam_after_window, fam_length=settings.fam_length,
                               full_context_tokens=settings.full_context_tokens)
    return load_model(settings.model, fam, settings.mode, engine_config(settings), settings.fam_adapter, unset)


def _lifespan(settings: Settings, loaded_model: LoadedModel | None,
              on_load_error: Callable[[], None] | None) -> Callable[[FastAPI], Any]:
    @asynccontextmanager
    async def lifespan(app: FastAPI) -> AsyncIterator[None]:
        starting = asyncio.create_task(_start_engine(app, settings, loaded_model, on_load_error))
        try:
            yield
        finally:
            starting.cancel()
            if app.state.sessions is not None:
                await app.state.sessions.flush()  # restarts then replay nothing
            if app.state.service is not None:
                await asyncio.to_thread(app.state.service.engine.shutdown)

    return lifespan


async def _start_engine(app: FastAPI, settings: Settings, loaded: LoadedModel | None,
                        on_load_error: Callable[[], None] | None) -> None:
    try:
        if loaded is None:
            log.info("loading %s (/health answers meanwhile; /ready says 503 until the engine runs)", settings.model)
            loaded = await _in_daemon_thread(load_model_from_settings, settings)
        eos = set(loaded.tokenizer.eos_token_ids) | set(loaded.model.config.eos_token_ids)
        grammar = GrammarCompiler(loaded.tokenizer, loaded.model.config.vocab_size)  # structured output
        engine = AsyncEngine(LLMEngine.from_config(loaded.model, sorted(eos), engine_config(settings), grammar))
        engine.start()
        store = open_store(settings.session_store or str(settings.state_dir))
        app.state.sessions = SessionManager(store, engine, loaded.model, loaded.tokenizer,
                                            settings.served_model_name or loaded.model_id,
                                            SessionLimits(settings.session_memory_bytes,
                                                          settings.snapshot_every_tokens))
        app.state.service = GenerationService(engine, loaded, eos, settings, app.state.metrics)
        log.info("ready: serving %s as %r, attention mode %s, FAM adapter %s", loaded.model_id,
                 app.state.service.model_name, app.state.service.mode, settings.fam_adapter or "none")
    except Exception as exc:
        app.state.load_error = f"{type(exc).__name__}: {exc}"
        if isinstance(exc, (FamserveError, ValueError, OSError)):
            log.error("cannot load the model: %s", exc)
        else:
            log.exception("cannot load the model")
        if on_load_error is not None:
            on_load_error()


async def _in_daemon_thread(fn: Callable[..., T], *args: Any) -> T:
    """Run fn on a daemon thread (unlike asyncio.to_thread, a shutdown during a long load does not wait for it)."""
    loop = asyncio.get_running_loop()
    future: asyncio.Future[T] = loop.create_future()

    def settle(setter: Callable[[Any], None], value: Any) -> None:
        if not future.done():
            setter(value)

    def run() -> None:
        try:
            result = fn(*args)
        except BaseException as exc:  # handed to the awaiting coroutine
            outcome: tuple[Callable[[Any], None], Any] = (future.set_exception, exc)
        else:
            outcome = (future.set_result, result)
        if not loop.is_closed():
            loop.call_soon_threadsafe(settle, *outcome)

    threading.Thread(target=run, name="famserve-load", daemon=True).start()
    return await future


class BodyLimitMiddleware:
    """413 for a body over the limit: at once when Content-Length says so, else as soon as the streamed body
    passes it (the route's body parsing then fails with PayloadTooLargeError, answered by errors.py). Session
    uploads (append, import) are streamed into the engine, not held, so they get the larger max_upload_bytes."""

    def __init__(self, app: ASGIApp, max_body_bytes: int, max_upload_bytes: int) -> None:
        self.app = app
        self.max_body_bytes = max_body_bytes
        self.max_upload_bytes = max_upload_bytes

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        limit = self.max_upload_bytes if UPLOAD_PATHS.fullmatch(scope["path"]) else self.max_body_bytes
        declared = dict(scope["headers"]).get(b"content-length", b"")
        if declared.isdigit() and int(declared) > limit:
            await self._reject(scope, receive, send, limit)
            return
        received = 0

        async def counting_receive() -> Message:
            nonlocal received
            message = await receive()
            if message["type"] == "http.request":
                received += len(message.get("body", b""))
                if received > limit:
                    raise PayloadTooLargeError(limit)
            return message

        await self.app(scope, counting_receive, send)

    @staticmethod
    async def _reject(scope: Scope, receive: Receive, send: Send, limit: int) -> None:
        error = PayloadTooLargeError(limit)
        response = error_json(413, error.detail, INVALID_REQUEST, code="request_too_large",
                              headers={"Connection": "close"})
        await response(scope, receive, send)


class Drain:
    """A graceful shutdown as the app sees it: once begun, new requests are refused; `in_flight` counts the requests
    still being answered (a stream until its last event), which the server waits for before it stops."""

    def __init__(self) -> None:
        self.draining = False
        self.in_flight = 0

    def begin(self) -> None:
        self.draining = True


class DrainMiddleware:
    """While draining: 503 `shutting_down` (Connection: close) for every request but /health and /metrics, /ready
    included, so routers and orchestrators send no more. Counts the requests it lets through."""

    UNCOUNTED_PATHS = frozenset({"/health", METRICS_PATH})

    def __init__(self, app: ASGIApp, drain: Drain) -> None:
        self.app = app
        self.drain = drain

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http" or scope["path"] in self.UNCOUNTED_PATHS:
            await self.app(scope, receive, send)
            return
        if self.drain.draining:
            response = error_json(503, "the server is shutting down; retry the request", SERVER_ERROR,
                                  code="shutting_down", headers={"Connection": "close", "Retry-After": "1"})
            await response(scope, receive, send)
            return
        self.drain.in_flight += 1
        try:
            await self.app(scope, receive, send)
        finally:
            self.drain.in_flight -= 1


class APIKeyMiddleware:
    """401 unless `Authorization: Bearer <key>` carries one of the keys (compared in constant time); `open_paths`
    (the probes, the playground page, /metrics if configured) need none. Keys are never logged."""

    def __init__(self, app: ASGIApp, api_keys: list[str], open_paths: frozenset[str]) -> None:
        self.app = app
        self.open_paths = open_paths
        self._digests = [hashlib.sha256(key.encode()).digest() for key in api_keys]

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http" or scope["path"] in self.open_paths:
            await self.app(scope, receive, send)
            return
        header = dict(scope["headers"]).get(b"authorization", b"").decode("latin-1")
        scheme, _, token = header.partition(" ")
        if scheme.lower() != "bearer" or not token.strip():
            await self._reject(scope, receive, send, "missing API key: send the header Authorization: Bearer <key>",
                               "missing_api_key")
        elif not self._accepts(token.strip()):
            await self._reject(scope, receive, send, "invalid API key", "invalid_api_key")
        else:
            await self.app(scope, receive, send)

    def _accepts(self, key: str) -> bool:
        digest = hashlib.sha256(key.encode()).digest()
        matched = False
        for known in self._digests:  # every key is compared, so the time does not tell which one matched
            matched |= hmac.compare_digest(digest, known)
        return matched

    @staticmethod
    async def _reject(scope: Scope, receive: Receive, send: Send, message: str, code: str) -> None:
        response = error_json(401, message, AUTHENTICATION, code=code, headers={"WWW-Authenticate": "Bearer"})
        await response(scope, receive, send)


def _document_bearer_auth(app: FastAPI, open_paths: frozenset[str]) -> None:
    """Say in /openapi.json that every route but the open ones needs a bearer token."""
    build = app.openapi

    def openapi() -> dict[str, Any]:
        if app.openapi_schema is None:
            schema = build()
            schema.setdefault("components", {})["securitySchemes"] = {"bearer": {"type": "http", "scheme": "bearer"}}
            schema["security"] = [{"bearer": []}]
            for path in open_paths:
                for operation in schema["paths"].get(path, {}).values():
                    operation["security"] = []
            app.openapi_schema = schema
        return app.openapi_schema

    app.openapi = openapi  # type: ignore[method-assign]
