"""Anthropic's Messages API (``POST /v1/messages``, ``/v1/messages/count_tokens``) over a
:data:`~llama_cpp.server.chat_call.ChatCall`.

Three pure translations, each testable with plain dicts: :func:`chat_request` (a Messages
request to OpenAI chat messages and ``create_chat_completion`` keywords),
:func:`message_response` (a ``chat.completion`` to a Message) and :class:`EventStream`
(``chat.completion.chunk`` dicts to Anthropic's stream events, in the order the
``anthropic`` SDK's ``messages.stream()`` accumulates them). :func:`anthropic_router` wires
them to routes. Errors on these routes are :class:`AnthropicAPIError`, whose
:meth:`~AnthropicAPIError.body` is Anthropic's ``{"type": "error", "error": {...}}``.
"""

from __future__ import annotations

import json
from collections.abc import AsyncIterator, Iterator, Mapping
from typing import Any, Literal

from fastapi import APIRouter
from fastapi.responses import StreamingResponse
from pydantic import Field

from llama_cpp.server.chat_call import ChatCall, CountTokens
from llama_cpp.server.errors import APIError, from_library_error
from llama_cpp.server.protocols import Lenient, SSEResponse, new_id, protocol_route, sse_event, text_of

__all__ = [
    "AnthropicAPIError",
    "EventStream",
    "MessagesRequest",
    "anthropic_router",
    "chat_request",
    "message_response",
]

#: OpenAI finish reasons as Anthropic stop reasons; a choice that a stop string ended (its
#: ``stop_reason``) is ``stop_sequence``.
_STOP_REASONS = {"stop": "end_turn", "length": "max_tokens", "tool_calls": "tool_use"}


def _stop(choice: Mapping[str, Any]) -> tuple[str, str | None]:
    """Anthropic's ``stop_reason`` and ``stop_sequence`` of a finished OpenAI choice."""
    sequence = choice.get("stop_reason")
    if isinstance(sequence, str):
        return "stop_sequence", sequence
    return _STOP_REASONS.get(choice.get("finish_reason") or "stop", "end_turn"), None


#: OpenAI error types as Anthropic's.
_ERROR_TYPES = {"server_error": "api_error", "rate_limit_error": "rate_limit_error"}


class AnthropicAPIError(APIError):
    """An :class:`APIError` answered in Anthropic's shape; the app's APIError handler writes
    :meth:`body` with :attr:`status` as for any APIError."""

    def body(self) -> dict[str, Any]:
        kind = _ERROR_TYPES.get(self.type, self.type)
        return {"type": "error", "error": {"type": kind, "message": self.message}}


# -- the request ------------------------------------------------------------------------------


class AnthropicMessage(Lenient):
    role: Literal["user", "assistant"]
    content: str | list[dict[str, Any]] = Field(
        description="A string, or blocks: text, tool_use, tool_result, thinking (images: 400)"
    )


class AnthropicTool(Lenient):
    name: str
    description: str | None = None
    input_schema: dict[str, Any] = Field(default_factory=lambda: {"type": "object"})


class MessagesRequest(Lenient):
    """The body of ``POST /v1/messages`` (fields not listed are ignored)."""

    model: str | None = None
    messages: list[AnthropicMessage]
    max_tokens: int | None = Field(None, description="Required (a missing value is a 400)")
    system: str | list[dict[str, Any]] | None = None
    stop_sequences: list[str] | None = None
    temperature: float | None = None
    top_p: float | None = None
    top_k: int | None = None
    tools: list[AnthropicTool] | None = None
    tool_choice: dict[str, Any] | None = None
    thinking: dict[str, Any] | None = None
    stream: bool = False
    metadata: dict[str, Any] | None = None


class CountTokensRequest(Lenient):
    """The body of ``POST /v1/messages/count_tokens``: a Messages request without its limits."""

    model: str | None = None
    messages: list[AnthropicMessage]
    system: str | list[dict[str, Any]] | None = None
    tools: list[AnthropicTool] | None = None
    tool_choice: dict[str, Any] | None = None
    thinking: dict[str, Any] | None = None


def _fail(message: str, param: str | None = None) -> AnthropicAPIError:
    return AnthropicAPIError(400, message, param=param)


def chat_messages(request: Mapping[str, Any]) -> list[dict[str, Any]]:
    """The OpenAI chat messages of a Messages request.

    ``system`` becomes a system message. A user message's ``tool_result`` blocks become
    ``tool`` messages (ahead of its text, as Anthropic requires them first); an assistant
    message's ``tool_use`` blocks become its ``tool_calls`` (input as JSON arguments), its
    ``thinking`` blocks its ``reasoning_content``. Text blocks are joined by newlines.

    Raises:
        AnthropicAPIError: (400) no messages, an image or document block (the model is
            text-only), or a block of an unknown type.
    """
    messages: list[dict[str, Any]] = []
    system = request.get("system")
    if system:
        messages.append({"role": "system", "content": text_of(system, "system", AnthropicAPIError)})
    given = request.get("messages")
    if not isinstance(given, list) or not given:
        raise _fail("messages must be a non-empty list", "messages")
    for i, message in enumerate(given):
        role, content = message.get("role"), message.get("content")
        where = f"messages[{i}].content"
        if role not in ("user", "assistant"):
            raise _fail(f"messages[{i}].role must be 'user' or 'assistant', got {role!r}", "messages")
        if isinstance(content, str):
            messages.append({"role": role, "content": content})
        elif role == "user":
            messages += _user_messages(content, where)
        else:
            messages.append(_assistant_message(content, where))
    return messages


def _blocks(content: object, where: str) -> list[Mapping[str, Any]]:
    if not isinstance(content, list) or not all(isinstance(b, Mapping) for b in content):
        raise _fail(f"{where} must be a string or a list of content blocks", "messages")
    return content


def _user_messages(content: object, where: str) -> list[dict[str, Any]]:
    results: list[dict[str, Any]] = []
    texts: list[Mapping[str, Any]] = []
    for j, block in enumerate(_blocks(content, where)):
        if block.get("type") == "tool_result":
            result = block.get("content", "")
            text = text_of(result, f"{where}[{j}].content", AnthropicAPIError)
            results.append(
                {"role": "tool", "tool_call_id": str(block.get("tool_use_id", "")), "content": text}
            )
        else:
            texts.append(block)
    if texts or not results:
        results.append({"role": "user", "content": text_of(texts, where, AnthropicAPIError)})
    return results


def _assistant_message(content: object, where: str) -> dict[str, Any]:
    texts: list[Mapping[str, Any]] = []
    reasoning: list[str] = []
    calls: list[dict[str, Any]] = []
    for j, block in enumerate(_blocks(content, where)):
        kind = block.get("type")
        if kind == "tool_use":
            arguments = json.dumps(block.get("input") or {}, ensure_ascii=False)
            function = {"name": block.get("name"), "arguments": arguments}
            calls.append({"id": block.get("id") or new_id("toolu"), "type": "function", "function": function})
        elif kind == "thinking":
            reasoning.append(str(block.get("thinking", "")))
        elif kind == "redacted_thinking":
            continue  # encrypted by Anthropic: nothing a local model can read
        elif kind == "text":
            texts.append(block)
        else:
            text_of([block], f"{where}[{j}]", AnthropicAPIError)  # raises the right 400
    message: dict[str, Any] = {"role": "assistant", "content": text_of(texts, where, AnthropicAPIError)}
    if reasoning:
        message["reasoning_content"] = "\n".join(reasoning)
    if calls:
        message["tool_calls"] = calls
    return message


def _tools(request: Mapping[str, Any]) -> dict[str, Any]:
    """``tools``, ``tool_choice`` and ``thinking`` as chat keywords."""
    keywords: dict[str, Any] = {}
    tools = request.get("tools")
    if tools:
        keywords["tools"] = [
            {
                "type": "function",
                "function": {
                    "name": tool.get("name"),
                    "description": tool.get("description") or "",
                    "parameters": tool.get("input_schema") or {"type": "object"},
                },
            }
            for tool in tools
        ]
    choice = request.get("tool_choice")
    if choice is not None:
        kind = choice.get("type")
        if kind == "tool":
            if not isinstance(choice.get("name"), str):
                raise _fail("tool_choice {'type': 'tool'} needs a 'name'", "tool_choice")
            keywords["tool_choice"] = {"type": "function", "function": {"name": choice["name"]}}
        elif kind in ("auto", "any", "none"):
            keywords["tool_choice"] = "required" if kind == "any" else kind
        else:
            raise _fail(f"tool_choice type must be auto, any, tool or none, got {kind!r}", "tool_choice")
        if choice.get("disable_parallel_tool_use") is False:
            keywords["parallel_tool_calls"] = True
    thinking = request.get("thinking")
    if thinking is not None:
        kind = thinking.get("type")
        if kind not in ("enabled", "disabled"):
            raise _fail(f"thinking type must be enabled or disabled, got {kind!r}", "thinking")
        keywords["chat_template_kwargs"] = {"enable_thinking": kind == "enabled"}
    return keywords


def chat_request(request: Mapping[str, Any]) -> tuple[list[dict[str, Any]], dict[str, Any]]:
    """A Messages request as ``(messages, keywords)`` for ``create_chat_completion``.

    ``max_tokens`` (required), ``stop_sequences`` (``stop``), ``temperature``, ``top_p``,
    ``top_k``, ``tools`` (``input_schema`` as the function's ``parameters``), ``tool_choice``
    (``auto`` / ``any``: required / ``tool``: that function / ``none``;
    ``disable_parallel_tool_use: false`` allows several calls, which are otherwise one) and
    ``thinking`` (``chat_template_kwargs={"enable_thinking": ...}``; ``budget_tokens`` is
    not enforced). ``model``, ``stream`` and ``metadata`` are not keywords.

    Raises:
        AnthropicAPIError: (400) a missing or non-positive ``max_tokens``, or as
            :func:`chat_messages`.
    """
    max_tokens = request.get("max_tokens")
    if max_tokens is None:
        raise _fail("max_tokens: Field required", "max_tokens")
    if isinstance(max_tokens, bool) or not isinstance(max_tokens, int) or max_tokens < 1:
        raise _fail(f"max_tokens must be a positive integer, got {max_tokens!r}", "max_tokens")
    keywords: dict[str, Any] = {"max_tokens": max_tokens}
    if request.get("stop_sequences"):
        keywords["stop"] = list(request["stop_sequences"])
    for name in ("temperature", "top_p", "top_k"):
        if request.get(name) is not None:
            keywords[name] = request[name]
    keywords |= _tools(request)
    return chat_messages(request), keywords


def count_request(request: Mapping[str, Any]) -> tuple[list[dict[str, Any]], dict[str, Any]]:
    """A count_tokens request as ``(messages, keywords)`` (no ``max_tokens`` needed)."""
    return chat_messages(request), _tools(request)


# -- the answer -------------------------------------------------------------------------------


def _tool_input(arguments: str) -> dict[str, Any]:
    """A call's JSON arguments as a ``tool_use`` input (``{}`` if cut short by max_tokens)."""
    try:
        parsed = json.loads(arguments or "{}")
    except json.JSONDecodeError:
        return {}
    return parsed if isinstance(parsed, dict) else {}


def _usage(usage: Mapping[str, Any] | None) -> dict[str, int]:
    """OpenAI usage as Anthropic's: ``input_tokens`` counts the prompt tokens that were not
    read from the cache, ``cache_read_input_tokens`` those that were (as Anthropic's total
    input is their sum)."""
    usage = usage or {}
    cached = int((usage.get("prompt_tokens_details") or {}).get("cached_tokens") or 0)
    return {
        "input_tokens": int(usage.get("prompt_tokens") or 0) - cached,
        "output_tokens": int(usage.get("completion_tokens") or 0),
        "cache_creation_input_tokens": 0,
        "cache_read_input_tokens": cached,
    }


def message_response(completion: Mapping[str, Any], model: str | None = None) -> dict[str, Any]:
    """A ``chat.completion`` dict as Anthropic's Message.

    Content blocks in order: ``thinking`` (the reasoning), ``text``, ``tool_use`` (its JSON
    arguments parsed to ``input``; the call's id, or a new ``toolu_`` id); one empty text
    block when the answer is empty. ``stop_reason``: ``end_turn``, ``max_tokens``,
    ``tool_use`` (see :data:`_STOP_REASONS`) or ``stop_sequence`` (with the string in
    ``stop_sequence``). ``model``: the name the client asked for, else the completion's.
    """
    choice = completion["choices"][0]
    stop_reason, stop_sequence = _stop(choice)
    message = choice["message"]
    content: list[dict[str, Any]] = []
    if message.get("reasoning_content"):
        content.append({"type": "thinking", "thinking": message["reasoning_content"], "signature": ""})
    if message.get("content"):
        content.append({"type": "text", "text": message["content"]})
    for call in message.get("tool_calls") or []:
        content.append(
            {
                "type": "tool_use",
                "id": call.get("id") or new_id("toolu"),
                "name": call["function"]["name"],
                "input": _tool_input(call["function"].get("arguments", "")),
            }
        )
    if not content:
        content.append({"type": "text", "text": ""})
    return {
        "id": new_id("msg"),
        "type": "message",
        "role": "assistant",
        "model": model or completion.get("model", ""),
        "content": content,
        "stop_reason": stop_reason,
        "stop_sequence": stop_sequence,
        "usage": _usage(completion.get("usage")),
    }


class EventStream:
    """Turns ``chat.completion.chunk`` dicts into Anthropic's stream events.

    :meth:`start` (or the first chunk) gives ``message_start`` and a ``ping``; :meth:`feed`
    each chunk's events: a content block is started (``content_block_start``) when the kind of delta changes
    (``thinking_delta``, ``text_delta``, ``input_json_delta`` for each tool call) and the
    previous one stopped (``content_block_stop``); :meth:`finish` stops the last block and
    gives ``message_delta`` (``stop_reason``, usage: the stream's last chunk when the chat was
    asked ``stream_options={"include_usage": True}``) and ``message_stop``.
    """

    def __init__(self, model: str) -> None:
        self.id = new_id("msg")
        self.model = model
        self._index = -1  # the open block, -1 before the first
        self._open: str | None = None  # its kind: thinking, text, or tool:<call index>
        self._stop_reason = "end_turn"
        self._stop_sequence: str | None = None
        self._usage: dict[str, int] = _usage(None)
        self._started = False

    def start(self, model: str = "") -> Iterator[dict[str, Any]]:
        """The opening events (once); ``model`` names the message if the request did not."""
        if self._started:
            return
        self._started = True
        self.model = self.model or model
        yield {
            "type": "message_start",
            "message": {
                "id": self.id,
                "type": "message",
                "role": "assistant",
                "model": self.model,
                "content": [],
                "stop_reason": None,
                "stop_sequence": None,
                "usage": self._usage,
            },
        }
        yield {"type": "ping"}

    def _begin(self, kind: str, block: dict[str, Any]) -> Iterator[dict[str, Any]]:
        yield from self._close()
        self._index += 1
        self._open = kind
        yield {"type": "content_block_start", "index": self._index, "content_block": block}

    def _close(self) -> Iterator[dict[str, Any]]:
        if self._open is not None:
            yield {"type": "content_block_stop", "index": self._index}
            self._open = None

    def _delta(self, delta: dict[str, Any]) -> dict[str, Any]:
        return {"type": "content_block_delta", "index": self._index, "delta": delta}

    def feed(self, chunk: Mapping[str, Any]) -> Iterator[dict[str, Any]]:
        yield from self.start(str(chunk.get("model") or ""))
        if chunk.get("usage"):
            self._usage = _usage(chunk["usage"])
        for choice in chunk.get("choices") or []:
            delta = choice.get("delta") or {}
            if delta.get("reasoning_content"):
                if self._open != "thinking":
                    yield from self._begin("thinking", {"type": "thinking", "thinking": "", "signature": ""})
                yield self._delta({"type": "thinking_delta", "thinking": delta["reasoning_content"]})
            if delta.get("content"):
                if self._open != "text":
                    yield from self._begin("text", {"type": "text", "text": ""})
                yield self._delta({"type": "text_delta", "text": delta["content"]})
            for call in delta.get("tool_calls") or []:
                kind = f"tool:{call.get('index', 0)}"
                function = call.get("function") or {}
                if self._open != kind:
                    block = {
                        "type": "tool_use",
                        "id": call.get("id") or new_id("toolu"),
                        "name": function.get("name", ""),
                        "input": {},
                    }
                    yield from self._begin(kind, block)
                if function.get("arguments"):
                    yield self._delta({"type": "input_json_delta", "partial_json": function["arguments"]})
            if choice.get("finish_reason"):
                self._stop_reason, self._stop_sequence = _stop(choice)

    def finish(self) -> Iterator[dict[str, Any]]:
        yield from self.start()
        if self._index < 0:  # an empty answer still has its text block, as message_response
            yield from self._begin("text", {"type": "text", "text": ""})
        yield from self._close()
        yield {
            "type": "message_delta",
            "delta": {"stop_reason": self._stop_reason, "stop_sequence": self._stop_sequence},
            "usage": self._usage,
        }
        yield {"type": "message_stop"}


async def _sse(chunks: AsyncIterator[Mapping[str, Any]], model: str) -> AsyncIterator[str]:
    """The SSE text of a chat stream; a failure mid-stream (the status is sent) becomes
    Anthropic's ``error`` event."""
    stream = EventStream(model)
    try:
        async for chunk in chunks:
            for event in stream.feed(chunk):
                yield sse_event(event)
    except Exception as failure:  # the status was sent: the client reads an error event
        error = failure if isinstance(failure, APIError) else from_library_error(failure)
        yield sse_event(AnthropicAPIError(error.status, error.message, error.type).body())
        return
    for event in stream.finish():
        yield sse_event(event)


def anthropic_router(chat: ChatCall, count_tokens: CountTokens) -> APIRouter:
    """``POST /v1/messages`` (streamed with ``"stream": true``) and
    ``POST /v1/messages/count_tokens`` over ``chat`` and ``count_tokens``.

    Every error on these routes is an :class:`AnthropicAPIError` (a body that fails
    :class:`MessagesRequest` included: a 400, not a 422); a failure after a stream started
    is an ``error`` event.
    """
    router = APIRouter(route_class=protocol_route(AnthropicAPIError), tags=["anthropic"])

    @router.post("/v1/messages", response_model=None)
    async def messages(body: MessagesRequest) -> dict[str, Any] | StreamingResponse:
        request = body.model_dump(exclude_none=True)
        chat_messages_, keywords = chat_request(request)
        if body.stream:
            keywords["stream_options"] = {"include_usage": True}
        answer = await chat(body.model, chat_messages_, keywords, body.stream)
        if isinstance(answer, dict):
            return message_response(answer, body.model)
        return SSEResponse(_sse(answer, body.model or ""), answer)

    @router.post("/v1/messages/count_tokens")
    async def count(body: CountTokensRequest) -> dict[str, int]:
        chat_messages_, keywords = count_request(body.model_dump(exclude_none=True))
        return {"input_tokens": await count_tokens(body.model, chat_messages_, keywords)}

    return router
