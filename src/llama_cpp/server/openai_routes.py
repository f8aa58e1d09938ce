"""OpenAI's routes: ``/v1/models``, ``/v1/chat/completions``, ``/v1/completions``,
``/v1/embeddings``, as Server-Sent Events when streamed.

A stream is ``data: {json}\\n\\n`` per chunk and ``data: [DONE]\\n\\n`` last. An error raised
before the first chunk (a bad value, a full queue) is an ordinary JSON error answer; one that
happens mid-stream is sent as ``data: {"error": {...}}`` before ``[DONE]``. A client that
disconnects cancels its generation: Starlette cancels the response's task, which leaves the
``async for`` over the pool's stream, which cancels the request in C++ and frees its slot.
"""

from __future__ import annotations

import base64
import json
import logging
import time
from collections.abc import AsyncIterator
from typing import Any

import numpy as np
from fastapi import APIRouter
from fastapi.responses import JSONResponse, Response, StreamingResponse

from llama_cpp.errors import LlamaError
from llama_cpp.server.errors import APIError, from_library_error
from llama_cpp.server.protocols import SSEResponse
from llama_cpp.server.schemas import ChatCompletionRequest, CompletionRequest, EmbeddingRequest
from llama_cpp.server.service import Service

__all__ = ["openai_router", "sse"]

_log = logging.getLogger("llama_cpp.server")


async def _events(chunks: AsyncIterator[dict[str, Any]], done: bool) -> AsyncIterator[bytes]:
    try:
        async for chunk in chunks:
            yield b"data: " + json.dumps(chunk, ensure_ascii=False).encode("utf-8") + b"\n\n"
    except (LlamaError, TypeError, APIError) as error:
        api = error if isinstance(error, APIError) else from_library_error(error)
        yield b"data: " + json.dumps(api.body()).encode("utf-8") + b"\n\n"
    except Exception:
        _log.exception("a stream failed")
        body = APIError(500, "internal error", "server_error", code="internal_error").body()
        yield b"data: " + json.dumps(body).encode("utf-8") + b"\n\n"
    finally:
        await chunks.aclose()  # type: ignore[attr-defined]  # an async generator
    if done:
        yield b"data: [DONE]\n\n"


def sse(chunks: AsyncIterator[dict[str, Any]], *, done: bool = True) -> StreamingResponse:
    """A Server-Sent Events answer of ``chunks``, ending with ``data: [DONE]`` (unless
    ``done`` is False: llama-server's own routes send none); ``chunks`` (an async generator)
    is closed when the answer ends, completed or not."""
    return SSEResponse(_events(chunks, done), chunks)


def _answer(result: dict[str, Any] | AsyncIterator[dict[str, Any]]) -> Response:
    if isinstance(result, dict):
        return JSONResponse(result)
    return sse(result)


def openai_router(service: Service) -> APIRouter:
    """The OpenAI routes over ``service``."""
    router = APIRouter(tags=["OpenAI"])

    @router.get("/v1/models")
    async def list_models() -> dict[str, Any]:
        """The configured model aliases (loaded or not)."""
        created = int(time.time())
        loaded = service.registry.loaded()
        data = [
            {"id": alias, "object": "model", "created": created, "owned_by": "llama-cpp-nanobind",
             "loaded": alias in loaded}
            for alias in service.registry.table
        ]  # fmt: skip
        return {"object": "list", "data": data}

    @router.get("/v1/models/{model}")
    async def retrieve_model(model: str) -> dict[str, Any]:
        """One configured alias (404 ``model_not_found`` otherwise)."""
        alias = service.registry.resolve(model)
        return {"id": alias, "object": "model", "created": int(time.time()), "owned_by": "llama-cpp-nanobind",
                "loaded": alias in service.registry.loaded()}  # fmt: skip

    @router.post("/v1/chat/completions")
    async def chat_completions(body: ChatCompletionRequest) -> Response:
        """OpenAI's chat completions, on the pool's continuous batching."""
        param = "max_completion_tokens" if body.max_completion_tokens is not None else "max_tokens"
        keywords = body.keywords()
        service.check_max_tokens(keywords.get("max_tokens"), param)
        keywords["n"] = body.n
        return _answer(await service.chat(body.model, body.messages, keywords, body.stream))

    @router.post("/v1/completions")
    async def completions(body: CompletionRequest) -> Response:
        """OpenAI's (legacy) text completions; ``suffix`` fills in the middle."""
        result = await service.completion(body.model, body.prompts(), body.keywords(), body.n, body.stream)
        return _answer(result)

    @router.post("/v1/embeddings")
    async def embeddings(body: EmbeddingRequest) -> dict[str, Any]:
        """Embeddings from an embedding context over the model's weights."""
        if body.dimensions is not None:
            raise APIError(400, "dimensions is not supported by this server", param="dimensions")
        if isinstance(body.input, list) and not body.input:
            raise APIError(400, "input must not be empty", param="input")
        answer = await service.embedding(body.model, body.input)
        if any(item["embedding"] and isinstance(item["embedding"][0], list) for item in answer["data"]):
            raise APIError(
                400,
                "this model's embeddings are per token (pooling type none), which OpenAI's API cannot "
                "carry: serve it with a pooling type (options: {pooling_type: 1} for mean)",
                param="model",
                code="pooling_not_supported",
            )
        if body.encoding_format == "base64":
            answer["data"] = [
                {**item, "embedding": base64.b64encode(np.asarray(item["embedding"], np.float32).tobytes())
                 .decode("ascii")}
                for item in answer["data"]
            ]  # fmt: skip
        return answer

    return router
