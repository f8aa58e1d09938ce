"""HTTP errors as OpenAI's error bodies: ``{"error": {"message", "type", "param", "code"}}``.

Every route raises :class:`APIError` (or lets a typed library error through, which
:func:`from_library_error` maps); the app's exception handlers turn both into a JSON body
with the right status, never a 500 for bad input.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from llama_cpp.errors import (
    ClosedError,
    ContextOverflowError,
    GenerationCancelled,
    GrammarError,
    InvalidArgumentError,
    LlamaError,
    PoolBusyError,
    WorkerLostError,
)

__all__ = ["APIError", "from_library_error"]


@dataclass
class APIError(Exception):
    """An error answered with ``status`` and OpenAI's body.

    Attributes:
        status: The HTTP status (400, 401, 404, 413, 422, 429, 503, ...).
        message: What went wrong, for a person.
        type: OpenAI's error type (``invalid_request_error``, ``authentication_error``,
            ``not_found_error``, ``rate_limit_error``, ``server_error``, ...).
        param: The request field at fault, if one is.
        code: A machine-readable code (``model_not_found``, ``context_length_exceeded``, ...).
        headers: Extra response headers (``Retry-After`` with 429, ...).
    """

    status: int
    message: str
    type: str = "invalid_request_error"
    param: str | None = None
    code: str | None = None
    headers: dict[str, str] | None = None

    def __post_init__(self) -> None:
        super().__init__(self.message)

    def body(self) -> dict[str, Any]:
        return {"error": {"message": self.message, "type": self.type, "param": self.param, "code": self.code}}


#: The library's typed errors, most specific first: status, OpenAI type, param, code.
_MAPPING: tuple[tuple[type[Exception], int, str, str | None, str], ...] = (
    (PoolBusyError, 429, "rate_limit_error", None, "queue_full"),
    (ContextOverflowError, 400, "invalid_request_error", "messages", "context_length_exceeded"),
    (GrammarError, 400, "invalid_request_error", "response_format", "invalid_grammar"),
    (InvalidArgumentError, 400, "invalid_request_error", None, "invalid_value"),
    (TypeError, 400, "invalid_request_error", None, "invalid_value"),  # an unknown keyword
    (WorkerLostError, 503, "server_error", None, "worker_lost"),
    (ClosedError, 503, "server_error", None, "unavailable"),
    (GenerationCancelled, 503, "server_error", None, "unavailable"),
    (LlamaError, 500, "server_error", None, "internal_error"),
)


def from_library_error(error: Exception) -> APIError:
    """The HTTP answer to a typed error of the library (or TypeError for an unknown keyword)."""
    for kind, status, type_, param, code in _MAPPING:
        if isinstance(error, kind):
            headers = {"Retry-After": "1"} if status == 429 else None
            return APIError(status, str(error), type_, param, code, headers)
    return APIError(500, "internal error", "server_error", code="internal_error")
