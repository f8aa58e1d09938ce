"""``create_app(settings)``: the server as a FastAPI app, to run or to mount in your own.

Nothing lives in module globals: the app's :class:`~llama_cpp.server.service.Service`
(settings, model registry, metrics) is on ``app.state.service``. The lifespan starts loading
the default model in a worker thread and returns at once, so the server answers while it
loads (``GET /health``: 503 ``{"status": "loading"}``, then 200); on shutdown it closes every
pool, which cancels what still runs.

Errors are OpenAI bodies ``{"error": {"message", "type", "param", "code"}}``. A malformed or
invalid body is 400 ``invalid_request_error`` naming the field in ``param`` (OpenAI's status,
where FastAPI would answer 422); an unexpected exception is logged and answered 500.

The Anthropic Messages (``/v1/messages``) and OpenAI Responses (``/v1/responses``) routes are
mounted when their modules (``llama_cpp.server.anthropic``, ``llama_cpp.server.responses``)
are installed; without them the app serves the rest.
"""

from __future__ import annotations

import asyncio
import contextlib
import importlib
import logging
import os
from collections.abc import AsyncIterator, Callable
from typing import Any, cast

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse, Response
from starlette.exceptions import HTTPException as StarletteHTTPException

from llama_cpp.errors import ClosedError, ExpertStatsUnavailableError, LlamaError, WorkerLostError
from llama_cpp.experts import POLICIES
from llama_cpp.isolated import IsolatedPool
from llama_cpp.placement import MemoryBreakdown
from llama_cpp.pool import LlamaPool
from llama_cpp.server.chat_call import ChatCall, CountTokens
from llama_cpp.server.errors import APIError, from_library_error
from llama_cpp.server.llama_routes import llama_router
from llama_cpp.server.metrics import Metrics
from llama_cpp.server.middleware import ServerMiddleware
from llama_cpp.server.openai_routes import openai_router
from llama_cpp.server.registry import ModelRegistry, Reranker
from llama_cpp.server.schemas import DetokenizeRequest, ModelRequest, TemplateRequest, TokenizeRequest
from llama_cpp.server.service import Service
from llama_cpp.server.settings import ServerSettings

__all__ = ["chat_call", "count_tokens", "create_app"]

_log = logging.getLogger("llama_cpp.server")

#: The protocol translators mounted when importable: (module, router factory).
TRANSLATORS = (
    ("llama_cpp.server.anthropic", "anthropic_router"),
    ("llama_cpp.server.responses", "responses_router"),
)


def chat_call(app: FastAPI) -> ChatCall:
    """The app's :data:`~llama_cpp.server.chat_call.ChatCall` (model by alias, limits, metrics)."""
    return cast(Service, app.state.service).chat


def count_tokens(app: FastAPI) -> CountTokens:
    """The app's :data:`~llama_cpp.server.chat_call.CountTokens`."""
    return cast(Service, app.state.service).count_tokens


def _error_response(error: APIError) -> JSONResponse:
    return JSONResponse(error.body(), status_code=error.status, headers=error.headers)


def _validation_error(error: RequestValidationError) -> APIError:
    first = error.errors()[0] if error.errors() else {}
    loc = [str(part) for part in first.get("loc", ()) if part != "body"]
    if first.get("type") == "json_invalid":
        return APIError(400, f"The body is not valid JSON: {first.get('msg', '')}", code="invalid_json")
    param = ".".join(loc) or None
    return APIError(400, f"{param or 'body'}: {first.get('msg', 'invalid value')}", param=param,
                    code="invalid_value")  # fmt: skip


def _memory_breakdowns(registry: ModelRegistry) -> dict[str, MemoryBreakdown]:
    """``memory_breakdown()`` of every resident model (one closed meanwhile is left out)."""
    out: dict[str, MemoryBreakdown] = {}
    for alias, model in registry.loaded().items():
        front = model.llm if isinstance(model, Reranker) else model
        with contextlib.suppress(ClosedError, WorkerLostError):  # closed, or an isolated one reloading
            out[alias] = front.memory_breakdown()
    return out


def _rss_bytes() -> int | None:
    try:
        with open("/proc/self/statm") as statm:
            return int(statm.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")
    except (OSError, ValueError):
        return None


def create_app(settings: ServerSettings) -> FastAPI:
    """The server for ``settings``, as an ASGI app (run it, or mount it in your own).

    Raises:
        SettingsError: The API key file cannot be read.
    """
    registry = ModelRegistry(settings)
    metrics = Metrics(registry.pools)
    service = Service(settings, registry, metrics)
    ready = asyncio.Event()
    loading: dict[str, BaseException] = {}

    @contextlib.asynccontextmanager
    async def lifespan(app: FastAPI) -> AsyncIterator[None]:
        async def load_default() -> None:
            try:
                if registry.default is not None:
                    await registry.load(registry.default)
            except Exception as error:
                _log.exception("loading the default model failed")
                loading["error"] = error
            ready.set()

        task = asyncio.create_task(load_default())
        try:
            yield
        finally:
            task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await task
            await registry.close()

    app = FastAPI(title="llama-cpp-nanobind", summary="OpenAI-compatible llama.cpp server", lifespan=lifespan)
    app.state.service = service

    def record(endpoint: str, status: int) -> None:
        metrics.requests.labels(endpoint, str(status)).inc()

    app.add_middleware(
        ServerMiddleware, keys=settings.accepted_keys(), max_body_bytes=settings.max_body_bytes, record=record
    )

    @app.exception_handler(APIError)
    async def api_error(request: Request, error: APIError) -> JSONResponse:
        return _error_response(error)

    @app.exception_handler(LlamaError)
    async def library_error(request: Request, error: LlamaError) -> JSONResponse:
        api = from_library_error(error)
        if api.status >= 500:
            _log.error("library error on %s: %s", request.url.path, error)
        return _error_response(api)

    @app.exception_handler(RequestValidationError)
    async def invalid(request: Request, error: RequestValidationError) -> JSONResponse:
        return _error_response(_validation_error(error))

    @app.exception_handler(StarletteHTTPException)
    async def http_error(request: Request, error: StarletteHTTPException) -> JSONResponse:
        # Starlette's own: an unknown route (404), a wrong method (405), a body that is not
        # JSON or nests too deeply to parse (400). OpenAI's body instead of {"detail": ...}.
        if error.status_code == 404:
            kind = "not_found_error"
        else:
            kind = "invalid_request_error" if error.status_code < 500 else "server_error"
        api = APIError(error.status_code, str(error.detail), kind, headers=dict(error.headers or {}) or None)
        return _error_response(api)

    @app.exception_handler(Exception)
    async def unexpected(request: Request, error: Exception) -> JSONResponse:
        _log.exception("unexpected error on %s", request.url.path)
        return _error_response(APIError(500, "internal error", "server_error", code="internal_error"))

    app.include_router(openai_router(service))
    app.include_router(llama_router(service))
    _mount_translators(app, service)

    @app.get("/health", tags=["Server"])
    async def health() -> Response:
        """503 ``{"status": "loading"}`` until the default model is loaded, then 200."""
        if not ready.is_set():
            return JSONResponse({"status": "loading"}, status_code=503)
        if "error" in loading:
            return JSONResponse({"status": "error", "error": str(loading["error"])}, status_code=503)
        return JSONResponse({"status": "ok"})

    @app.get("/metrics", tags=["Server"])
    async def prometheus() -> Response:
        """Prometheus text: requests, tokens, latencies, and each loaded model's slots."""
        # Off the loop: reading an isolated pool's stats is a round trip to its process.
        text = await asyncio.to_thread(metrics.render)
        return Response(text, media_type="text/plain; version=0.0.4; charset=utf-8")

    @app.post("/models/load", tags=["Server"])
    async def load_model(body: ModelRequest) -> dict[str, Any]:
        """Load a configured alias (idempotent)."""
        alias = await registry.load(body.model)
        return {"model": alias, "loaded": True}

    @app.post("/models/unload", tags=["Server"])
    async def unload_model(body: ModelRequest) -> dict[str, Any]:
        """Unload a configured alias; its running requests fail."""
        was_loaded = await registry.unload(body.model)
        return {"model": registry.resolve(body.model), "loaded": False, "was_loaded": was_loaded}

    @app.post("/tokenize", tags=["llama.cpp"])
    async def tokenize(body: TokenizeRequest) -> dict[str, Any]:
        """The token ids of ``content`` (``add_special``: BOS where the model asks)."""
        async with registry.lease(body.model) as (_, pool):
            tokens = await asyncio.to_thread(
                pool.tokenize, body.content, body.add_special, body.parse_special
            )
        return {"tokens": tokens}

    @app.post("/detokenize", tags=["llama.cpp"])
    async def detokenize(body: DetokenizeRequest) -> dict[str, Any]:
        """The text of ``tokens``."""
        async with registry.lease(body.model) as (_, pool):
            n_vocab = pool.n_vocab()
            bad = next((t for t in body.tokens if not 0 <= t < n_vocab), None)
            if bad is not None:
                raise APIError(400, f"token {bad} is not in the vocabulary", param="tokens")
            data = await asyncio.to_thread(pool.detokenize, body.tokens)
        return {"content": data.decode("utf-8", errors="replace")}

    @app.post("/apply-template", tags=["llama.cpp"])
    async def apply_template(body: TemplateRequest) -> dict[str, Any]:
        """The prompt the model's chat template makes of ``messages``."""
        async with registry.lease(body.model) as (_, pool):
            rendered = await asyncio.to_thread(
                lambda: pool.render_chat(
                    body.messages, tools=body.tools, chat_template_kwargs=body.chat_template_kwargs
                )
            )
        return {"prompt": rendered.prompt}

    @app.get("/api/v1/memory", tags=["Server"])
    async def memory() -> dict[str, Any]:
        """The process's resident memory, and llama.cpp's accounting of each resident model:
        ``per_model[alias][device]`` and their sum ``devices[device]``, each
        ``{"model", "context", "compute"}`` in bytes."""
        per_model = await asyncio.to_thread(_memory_breakdowns, registry)
        devices: dict[str, dict[str, int]] = {}
        for breakdown in per_model.values():
            for device, use in breakdown.items():
                total = devices.setdefault(device, {"model": 0, "context": 0, "compute": 0})
                for kind, size in use.items():
                    total[kind] += size
        return {
            "rss_bytes": _rss_bytes(),
            "models": sorted(per_model),
            "devices": devices,
            "per_model": per_model,
        }

    @app.get("/api/v1/expert-stats", tags=["Server"])
    async def expert_stats(
        reset: bool = False, simulate: str = "static-hot", capacity: int | None = None
    ) -> dict[str, Any]:
        """Expert-routing statistics of each loaded model, by alias: those of a MoE model
        loaded with ``profile_experts`` (``--profile-experts``, or the alias's ``options``),
        an explicit ``{"available": false, "reason": ...}`` for the others.

        ``reset=true`` starts the counts again, atomically with the reading: every routed
        token is in this answer or in a later one. ``simulate``: the cache policies to
        simulate, comma-separated among ``lru``, ``lfu`` and ``static-hot`` (default:
        ``static-hot`` alone, computed from the counts; empty: none). ``lru`` and ``lfu``
        replay the whole trace in Python, seconds of CPU for a long one: ask for them when
        needed. ``capacity``: the simulated caches' experts per layer (default:
        ``n_expert_used``)."""
        policies = tuple(p.strip() for p in simulate.split(",") if p.strip())
        unknown = [p for p in policies if p not in POLICIES]
        if unknown:
            raise APIError(
                400, f"simulate: {unknown[0]!r} is not a policy (lru, lfu, static-hot)", param="simulate"
            )
        if capacity is not None and capacity < 1:
            raise APIError(400, f"capacity must be >= 1, got {capacity}", param="capacity")
        models = {
            alias: await asyncio.to_thread(_expert_stats, pool, reset, policies, capacity)
            for alias, pool in registry.pools().items()
        }
        answer: dict[str, Any] = {"available": any(m["available"] for m in models.values()), "models": models}
        if not models:
            answer["reason"] = "no model is loaded"
        return answer

    return app


def _expert_stats(
    pool: LlamaPool | IsolatedPool, reset: bool, policies: tuple[str, ...], capacity: int | None
) -> dict[str, Any]:
    """One pool's entry of /api/v1/expert-stats (in a worker thread: the cache simulations
    may replay the trace)."""
    try:
        stats = pool.expert_stats(reset=reset)
    except ExpertStatsUnavailableError as error:
        return {"available": False, "reason": str(error)}
    return {"available": True, **stats.to_dict(cache_capacity=capacity, simulate=policies)}


def _mount_translators(app: FastAPI, service: Service) -> None:
    """Mount the Anthropic and Responses routers whose modules exist (skipped otherwise)."""
    for module_name, factory_name in TRANSLATORS:
        try:
            module = importlib.import_module(module_name)
        except ModuleNotFoundError as error:
            if error.name != module_name:
                raise
            _log.debug("%s is not installed: its routes are not served", module_name)
            continue
        factory: Callable[[ChatCall, CountTokens], Any] = getattr(module, factory_name)
        app.include_router(factory(service.chat, service.count_tokens))
