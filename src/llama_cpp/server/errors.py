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
    SchemaValidationError,
    UnsupportedSchemaError,
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
#: A structured answer that breaks its schema is a 422, not a 500: the model answered, but
#: the schema asks for what only validation enforces, and a retry with the same settings
#: gives the same answer (OpenAI's client retries 5xx on its own, not 422). Its ``param`` is
#: None: the answer broke either the response format's schema or a tool's parameters.
_MAPPING: tuple[tuple[type[Exception], int, str, str | None, str], ...] = (
    (PoolBusyError, 429, "rate_limit_error", None, "queue_full"),
    (ContextOverflowError, 400, "invalid_request_error", "messages", "context_length_exceeded"),
    (UnsupportedSchemaError, 400, "invalid_request_error", "response_format", "unsupported_schema"),
    (SchemaValidationError, 422, "invalid_request_error", None, "schema_validation_failed"),
    (GrammarError, 400, "invalid_request_error", "response_format", "invalid_grammar"),
    (InvalidArgumentError, 400, "invalid_request_error", None, "invalid_value"),
    (TypeError, 400, "invalid_request_error", None, "invalid_value"),  # an unknown keyword
    (WorkerLostError, 503, "server_error", None, "worker_lost"),
    (ClosedError, 503, "server_error", None, "unavailable"),
    (GenerationCancelled, 503, "server_error", None, "unavailable"),
    (LlamaError, 500, "server_error", None, "internal_error"),
)


def from_library_error(error: Exception, schema_param: str = "response_format") -> APIError:
    """The HTTP answer to a typed error of the library (or TypeError for an unknown keyword).

    Args:
        error: The library's error.
        schema_param: The request field that holds the JSON schema, the ``param`` of a
            schema's errors (``text.format`` on the Responses API).
    """
    for kind, status, type_, param, code in _MAPPING:
        if isinstance(error, kind):
            headers = {"Retry-After": "1"} if status == 429 else None
            field = schema_param if param == "response_format" else param
            return APIError(status, str(error), type_, field, code, headers)
    return APIError(500, "internal error", "server_error", code="internal_error")
