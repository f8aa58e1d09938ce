"""What the protocol translators (Anthropic Messages, OpenAI Responses) share.

Server-sent events framed as both SDKs read them, prefixed ids, the lenient base of the
request models (unknown fields ignored, as the real APIs do), and the route class that
answers a body that fails validation with a 400 in the protocol's own error shape instead
of FastAPI's 422.
"""

from __future__ import annotations

import json
import uuid
from collections.abc import AsyncIterator, Callable, Coroutine, Iterable, Mapping
from typing import Any

from fastapi import Request, Response
from fastapi.exceptions import RequestValidationError
from fastapi.responses import StreamingResponse
from fastapi.routing import APIRoute
from pydantic import BaseModel, ConfigDict
from starlette.types import Receive, Scope, Send

from llama_cpp.errors import LlamaError
from llama_cpp.server.errors import APIError, from_library_error

__all__ = ["Lenient", "new_id", "protocol_route", "sse_event", "text_of"]


class Lenient(BaseModel):
    """A request model that ignores fields it does not know (clients send many)."""

    model_config = ConfigDict(extra="ignore")


def new_id(prefix: str) -> str:
    """A fresh id in the protocol's style: ``msg_...``, ``resp_...``, ``toolu_...``."""
    return f"{prefix}_{uuid.uuid4().hex}"


def sse_event(event: Mapping[str, Any]) -> str:
    """One server-sent event named by the event's ``type``: ``event: NAME\\ndata: JSON\\n\\n``."""
    return f"event: {event['type']}\ndata: {json.dumps(event, ensure_ascii=False)}\n\n"


def text_of(content: object, where: str, error: type[APIError]) -> str:
    """The text of a content field: a string, or a list of text parts (Anthropic ``text``,
    Responses ``input_text`` / ``output_text``) joined by newlines.

    Raises:
        APIError: (of class ``error``) a part that is not text; an image says the model is
            text-only.
    """
    if isinstance(content, str):
        return content
    if not isinstance(content, list):
        raise error(400, f"{where} must be a string or a list of content parts", param=where)
    texts: list[str] = []
    for i, part in enumerate(content):
        kind = part.get("type") if isinstance(part, Mapping) else None
        if kind in ("text", "input_text", "output_text") and isinstance(part.get("text"), str):
            texts.append(part["text"])
        elif kind in ("image", "input_image", "document", "input_file"):
            raise error(
                400, f"{where}[{i}]: {kind} content is not supported: the model is text-only", param=where
            )
        else:
            raise error(400, f"{where}[{i}]: unsupported content part {kind!r}", param=where)
    return "\n".join(texts)


def protocol_route(error: type[APIError]) -> type[APIRoute]:
    """A route class whose endpoints answer every failure as ``error`` (an APIError class).

    A body that fails the request model becomes a 400 ``invalid_request_error`` (the real
    APIs answer 400, and each SDK maps it to its BadRequestError); an :class:`APIError` or
    a typed library error (:func:`from_library_error`) is re-raised as ``error``, so that the
    app's APIError handler writes ``error.body()``: the protocol's shape on its own routes.
    """

    class ProtocolRoute(APIRoute):
        def get_route_handler(self) -> Callable[[Request], Coroutine[Any, Any, Response]]:
            handler = super().get_route_handler()

            async def handle(request: Request) -> Response:
                try:
                    return await handler(request)
                except RequestValidationError as invalid:
                    raise error(400, _validation_message(invalid.errors())) from invalid
                except APIError as failure:
                    if isinstance(failure, error):
                        raise
                    raise _as(error, failure) from failure
                except LlamaError as failure:
                    raise _as(error, from_library_error(failure)) from failure

            return handle

    return ProtocolRoute


def _as(error: type[APIError], failure: APIError) -> APIError:
    return error(failure.status, failure.message, failure.type, failure.param, failure.code, failure.headers)


def _validation_message(errors: Iterable[Any]) -> str:
    """pydantic's errors as one line: ``body.messages.0.role: Input should be ...``."""
    parts = []
    for detail in errors:
        location = ".".join(str(p) for p in detail.get("loc", ()))
        parts.append(f"{location}: {detail.get('msg', 'invalid')}")
    return "; ".join(parts) or "invalid request body"


class SSEResponse(StreamingResponse):
    """A protocol's Server-Sent Events over a chat stream (``answer``), which is closed however
    the response ends: completed, failed, or a client gone (before the first event too, when
    the events' generator never started and its own ``finally`` would not run). Closing the
    chat stream stops the generation at once."""

    def __init__(self, events: AsyncIterator[str] | AsyncIterator[bytes], answer: object) -> None:
        headers = {"Cache-Control": "no-cache", "X-Accel-Buffering": "no"}
        super().__init__(events, media_type="text/event-stream", headers=headers)
        self._answer = answer

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        try:
            await super().__call__(scope, receive, send)
        finally:
            close = getattr(self._answer, "aclose", None)
            if close is not None:
                await close()  # idempotent
