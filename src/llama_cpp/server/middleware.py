"""The app's ASGI middleware: request ids, API keys, body size, request metrics.

Plain ASGI (not Starlette's ``BaseHTTPMiddleware``), so that streamed answers pass through
untouched and a client's disconnect reaches the route at once.
"""

from __future__ import annotations

import json
import secrets
from collections.abc import Callable, Collection
from typing import Any

from starlette.types import ASGIApp, Message, Receive, Scope, Send

from llama_cpp.server.errors import APIError

__all__ = ["ServerMiddleware"]

#: Paths answered without an API key.
OPEN_PATHS = frozenset({"/health"})


class ServerMiddleware:
    """Echo (or make) ``X-Request-Id``; check API keys; cap the body; count requests.

    Args:
        app: The wrapped application.
        keys: Accepted API keys (empty: no authentication).
        max_body_bytes: Largest request body (413 above).
        record: ``record(endpoint, status)`` after each answer (metrics).
    """

    def __init__(
        self,
        app: ASGIApp,
        *,
        keys: Collection[str],
        max_body_bytes: int,
        record: Callable[[str, int], None],
    ) -> None:
        self.app = app
        self.keys = frozenset(keys)
        self.max_body_bytes = max_body_bytes
        self.record = record

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        headers = {k.decode("latin-1").lower(): v.decode("latin-1") for k, v in scope["headers"]}
        request_id = headers.get("x-request-id") or secrets.token_hex(16)
        status = 500

        async def send_with_id(message: Message) -> None:
            nonlocal status
            if message["type"] == "http.response.start":
                status = message["status"]
                extra = (b"x-request-id", request_id.encode("latin-1"))
                message = {**message, "headers": [*message.get("headers", []), extra]}
            await send(message)

        try:
            error = self._refuse(scope["path"], headers)
            if error is not None:
                await _send_error(send_with_id, error)
                return
            await self.app(scope, self._capped(receive), send_with_id)
        finally:
            # The router leaves the matched route in the scope: its path template is the
            # endpoint (unmatched paths are "other", so that scans cannot blow up the labels).
            route = scope.get("route")
            self.record(getattr(route, "path", None) or "other", status)

    def _refuse(self, path: str, headers: dict[str, str]) -> APIError | None:
        if self.keys and path not in OPEN_PATHS:
            bearer = headers.get("authorization", "")
            given = bearer[7:].strip() if bearer[:7].lower() == "bearer " else headers.get("x-api-key")
            if not given or not any(secrets.compare_digest(given, k) for k in self.keys):
                return APIError(
                    401, "Invalid or missing API key (Authorization: Bearer KEY or x-api-key: KEY)",
                    "authentication_error", code="invalid_api_key",
                )  # fmt: skip
        length = headers.get("content-length")
        if length is not None and length.isdigit() and int(length) > self.max_body_bytes:
            return _too_large(self.max_body_bytes)
        return None

    def _capped(self, receive: Receive) -> Receive:
        seen = 0

        async def capped() -> Message:
            nonlocal seen
            message = await receive()
            if message["type"] == "http.request":
                seen += len(message.get("body", b""))
                if seen > self.max_body_bytes:
                    raise _too_large(self.max_body_bytes)  # the app's handler answers 413
            return message

        return capped


def _too_large(limit: int) -> APIError:
    return APIError(413, f"The request body is larger than {limit} bytes", code="request_too_large")


async def _send_error(send: Callable[[Message], Any], error: APIError) -> None:
    body = json.dumps(error.body()).encode("utf-8")
    headers = [(b"content-type", b"application/json"), (b"content-length", str(len(body)).encode())]
    if error.status == 401:
        headers.append((b"www-authenticate", b"Bearer"))
    await send({"type": "http.response.start", "status": error.status, "headers": headers})
    await send({"type": "http.response.body", "body": body})
