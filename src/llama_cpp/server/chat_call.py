"""The one call that the protocol translators (Anthropic Messages, OpenAI Responses) make.

The app provides a :data:`ChatCall`: it picks the model by alias, checks limits, runs
``LlamaPool.create_chat_completion_async`` and records metrics. A translator turns its own
request into OpenAI chat messages and ``create_chat_completion`` keywords, calls it, and turns
the ``chat.completion`` dict (or the stream of ``chat.completion.chunk`` dicts) back into its
own protocol. Errors are :class:`~llama_cpp.server.errors.APIError` (already shaped for
HTTP) or the library's typed errors.
"""

from __future__ import annotations

from collections.abc import AsyncIterator, Awaitable, Callable
from typing import Any, Protocol

__all__ = ["ChatCall", "CountTokens"]


class ChatCall(Protocol):
    """``await chat(model, messages, keywords, stream)``.

    Args:
        model: The alias the client asked for (None: the server's default model).
        messages: OpenAI chat messages.
        keywords: :meth:`Llama.create_chat_completion` keywords (``max_tokens``, ``tools``,
            ``tool_choice``, ``response_format``, ``temperature``, ``stop``, ...;
            ``stream_options`` with ``stream``).
        stream: Stream the answer.

    Returns:
        The ``chat.completion`` dict, or with ``stream`` an async iterator of
        ``chat.completion.chunk`` dicts (the role in the first delta that carries content; the
        finish reason last; with ``stream_options={"include_usage": True}`` a last chunk with
        no choices and the usage).
    """

    def __call__(
        self, model: str | None, messages: list[dict[str, Any]], keywords: dict[str, Any], stream: bool
    ) -> Awaitable[dict[str, Any] | AsyncIterator[dict[str, Any]]]: ...


#: ``await count(model, messages, keywords)``: the prompt tokens of a chat request as the
#: model's template renders it (Anthropic's ``/v1/messages/count_tokens``).
CountTokens = Callable[[str | None, list[dict[str, Any]], dict[str, Any]], Awaitable[int]]
