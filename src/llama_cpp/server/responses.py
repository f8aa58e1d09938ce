"""OpenAI's Responses API (``POST /v1/responses``) over a
:data:`~llama_cpp.server.chat_call.ChatCall`.

Three pure translations, each testable with plain dicts: :func:`chat_request` (a Responses
request to OpenAI chat messages and ``create_chat_completion`` keywords),
:func:`response_object` (a ``chat.completion`` to a Response) and :class:`EventStream`
(``chat.completion.chunk`` dicts to the Responses stream events, each with its
``sequence_number``). :func:`responses_router` wires them to the route. The server keeps no
state: ``previous_response_id``, ``conversation``, ``store: true`` and ``background`` are
answered with a 400.
"""

from __future__ import annotations

import time
from collections.abc import AsyncIterator, Iterator, Mapping
from typing import Any

from fastapi import APIRouter
from fastapi.responses import StreamingResponse
from pydantic import Field

from llama_cpp.errors import GrammarError
from llama_cpp.server.chat_call import ChatCall, CountTokens
from llama_cpp.server.errors import APIError, from_library_error
from llama_cpp.server.protocols import Lenient, SSEResponse, new_id, protocol_route, sse_event, text_of

__all__ = ["EventStream", "ResponsesRequest", "chat_request", "response_object", "responses_router"]

#: Fields that need state the server does not keep, and why the answer is a 400.
_STATEFUL = {
    "previous_response_id": "previous_response_id is not supported: the server stores no responses; "
    "send the whole conversation in input",
    "conversation": "conversation is not supported: the server stores no conversations; "
    "send the whole conversation in input",
    "background": "background responses are not supported: the server stores no responses",
}
_ROLES = ("user", "assistant", "system", "developer")


class ResponsesRequest(Lenient):
    """The body of ``POST /v1/responses`` (fields not listed are ignored)."""

    model: str | None = None
    input: str | list[dict[str, Any]] = Field(
        description="A string, or items: messages, function_call, function_call_output"
    )
    instructions: str | None = None
    tools: list[dict[str, Any]] | None = None
    tool_choice: str | dict[str, Any] | None = None
    parallel_tool_calls: bool | None = None
    text: dict[str, Any] | None = Field(None, description="{'format': {'type': 'json_schema', ...}}")
    max_output_tokens: int | None = None
    temperature: float | None = None
    top_p: float | None = None
    reasoning: dict[str, Any] | None = None
    stream: bool = False
    store: bool | None = Field(None, description="Only false: the server stores no responses")
    previous_response_id: str | None = Field(None, description="Not supported (a 400)")
    conversation: str | dict[str, Any] | None = Field(None, description="Not supported (a 400)")
    background: bool | None = Field(None, description="Not supported (a 400)")
    metadata: dict[str, str] | None = None


def _fail(message: str, param: str | None = None) -> APIError:
    return APIError(400, message, param=param)


def chat_messages(request: Mapping[str, Any]) -> list[dict[str, Any]]:
    """The OpenAI chat messages of a Responses request.

    ``instructions`` becomes a system message; a string ``input`` one user message. Items:
    messages (``type`` ``message`` or none; content a string or ``input_text`` /
    ``output_text`` parts), ``function_call`` (a tool call of an assistant message;
    consecutive calls share one) and ``function_call_output`` (a ``tool`` message).
    ``reasoning`` items are dropped (a model's earlier reasoning is not shown to it again).

    Raises:
        APIError: (400) an empty input, an image or file part (the model is text-only), an
            ``item_reference`` (needs stored items) or an unknown item.
    """
    messages: list[dict[str, Any]] = []
    if request.get("instructions"):
        messages.append({"role": "system", "content": request["instructions"]})
    given = request.get("input")
    if isinstance(given, str):
        return [*messages, {"role": "user", "content": given}]
    if not isinstance(given, list) or not given:
        raise _fail("input must be a string or a non-empty list of items", "input")
    for i, item in enumerate(given):
        where = f"input[{i}]"
        kind = item.get("type", "message") if isinstance(item, Mapping) else None
        if kind == "message":
            role = item.get("role")
            if role not in _ROLES:
                raise _fail(f"{where}.role must be one of {', '.join(_ROLES)}, got {role!r}", "input")
            messages.append(
                {"role": role, "content": text_of(item.get("content"), f"{where}.content", APIError)}
            )
        elif kind == "function_call":
            call = {
                "id": item.get("call_id") or item.get("id") or new_id("call"),
                "type": "function",
                "function": {"name": item.get("name"), "arguments": item.get("arguments") or "{}"},
            }
            last = messages[-1] if messages else None
            if last is not None and last["role"] == "assistant" and "tool_calls" in last:
                last["tool_calls"].append(call)
            elif last is not None and last["role"] == "assistant":
                last["tool_calls"] = [call]
            else:
                messages.append({"role": "assistant", "content": "", "tool_calls": [call]})
        elif kind == "function_call_output":
            output = text_of(item.get("output", ""), f"{where}.output", APIError)
            messages.append({"role": "tool", "tool_call_id": str(item.get("call_id", "")), "content": output})
        elif kind == "reasoning":
            continue
        elif kind == "item_reference":
            raise _fail(f"{where}: item_reference is not supported: the server stores no items", "input")
        else:
            raise _fail(f"{where}: unsupported input item type {kind!r}", "input")
    return messages


def _tools(request: Mapping[str, Any]) -> dict[str, Any]:
    """``tools``, ``tool_choice`` and ``parallel_tool_calls`` as chat keywords."""
    keywords: dict[str, Any] = {}
    tools = request.get("tools")
    if tools:
        converted = []
        for i, tool in enumerate(tools):
            if tool.get("type") != "function":
                raise _fail(
                    f"tools[{i}]: only function tools are supported, got {tool.get('type')!r}", "tools"
                )
            function = {"name": tool.get("name"), "parameters": tool.get("parameters") or {"type": "object"}}
            if tool.get("description"):
                function["description"] = tool["description"]
            converted.append({"type": "function", "function": function})
        keywords["tools"] = converted
    choice = request.get("tool_choice")
    if isinstance(choice, str):
        if choice not in ("auto", "none", "required"):
            raise _fail(
                f"tool_choice must be auto, none, required or a function, got {choice!r}", "tool_choice"
            )
        keywords["tool_choice"] = choice
    elif choice is not None:
        if choice.get("type") != "function" or not isinstance(choice.get("name"), str):
            raise _fail(
                "tool_choice must be {'type': 'function', 'name': ...}, got " + repr(choice), "tool_choice"
            )
        keywords["tool_choice"] = {"type": "function", "function": {"name": choice["name"]}}
    if request.get("parallel_tool_calls") is not None:
        keywords["parallel_tool_calls"] = request["parallel_tool_calls"]
    return keywords


def _response_format(text: Mapping[str, Any] | None) -> dict[str, Any] | None:
    """``text.format`` as ``response_format``: ``json_schema`` (name, schema, strict at its
    top level, as the Responses API puts them), ``json_object``, ``text`` (None)."""
    form = (text or {}).get("format")
    if form is None or form.get("type") == "text":
        return None
    if form.get("type") == "json_object":
        return {"type": "json_object"}
    if form.get("type") == "json_schema":
        if not isinstance(form.get("schema"), Mapping):
            raise _fail("text.format json_schema needs a 'schema' object", "text.format")
        spec = {"name": form.get("name", "response"), "schema": form["schema"], "strict": form.get("strict")}
        return {"type": "json_schema", "json_schema": spec}
    raise _fail(
        f"text.format type must be text, json_object or json_schema, got {form.get('type')!r}", "text.format"
    )


def chat_request(request: Mapping[str, Any]) -> tuple[list[dict[str, Any]], dict[str, Any]]:
    """A Responses request as ``(messages, keywords)`` for ``create_chat_completion``.

    ``max_output_tokens`` (``max_tokens``), ``temperature``, ``top_p``, ``tools`` (function
    tools: ``name`` / ``description`` / ``parameters`` at their top level), ``tool_choice``
    (a string or ``{"type": "function", "name"}``), ``parallel_tool_calls``, ``text.format``
    (``response_format``) and ``reasoning.effort`` (``reasoning_effort``).

    Raises:
        APIError: (400) ``previous_response_id``, ``conversation``, ``background`` or
            ``store: true`` (the server keeps no state); a tool that is not a function;
            an unknown ``tool_choice`` or ``text.format``; or as :func:`chat_messages`.
    """
    for field, message in _STATEFUL.items():
        if request.get(field):
            raise _fail(message, field)
    if request.get("store"):
        raise _fail(
            "store: true is not supported: the server stores no responses; send store: false", "store"
        )
    keywords: dict[str, Any] = {}
    limit = request.get("max_output_tokens")
    if limit is not None:
        if isinstance(limit, bool) or not isinstance(limit, int) or limit < 1:
            raise _fail(f"max_output_tokens must be a positive integer, got {limit!r}", "max_output_tokens")
        keywords["max_tokens"] = limit
    for name in ("temperature", "top_p"):
        if request.get(name) is not None:
            keywords[name] = request[name]
    keywords |= _tools(request)
    response_format = _response_format(request.get("text"))
    if response_format is not None:
        keywords["response_format"] = response_format
    effort = (request.get("reasoning") or {}).get("effort")
    if effort is not None:
        keywords["reasoning_effort"] = effort
    return chat_messages(request), keywords


# -- the answer -------------------------------------------------------------------------------


def _usage(usage: Mapping[str, Any] | None) -> dict[str, Any]:
    usage = usage or {}
    prompt, generated = int(usage.get("prompt_tokens") or 0), int(usage.get("completion_tokens") or 0)
    cached = int((usage.get("prompt_tokens_details") or {}).get("cached_tokens") or 0)
    return {
        "input_tokens": prompt,
        "input_tokens_details": {"cached_tokens": cached, "cache_write_tokens": 0},
        "output_tokens": generated,
        "output_tokens_details": {"reasoning_tokens": 0},
        "total_tokens": prompt + generated,
    }


def _reasoning_item(item_id: str, text: str, status: str) -> dict[str, Any]:
    return {
        "type": "reasoning",
        "id": item_id,
        "summary": [],
        "content": [{"type": "reasoning_text", "text": text}],
        "status": status,
    }


def _text_part(text: str) -> dict[str, Any]:
    return {"type": "output_text", "text": text, "annotations": [], "logprobs": []}


def _message_item(item_id: str, parts: list[dict[str, Any]], status: str) -> dict[str, Any]:
    return {"type": "message", "id": item_id, "role": "assistant", "status": status, "content": parts}


def _call_item(item_id: str, call_id: str, name: str, arguments: str, status: str) -> dict[str, Any]:
    return {
        "type": "function_call",
        "id": item_id,
        "call_id": call_id,
        "name": name,
        "arguments": arguments,
        "status": status,
    }


class _Shell:
    """The fields of a Response that echo the request, shared by the whole and the streamed."""

    def __init__(self, request: Mapping[str, Any], model: str) -> None:
        self.id = new_id("resp")
        self.created_at = int(time.time())
        self.request = request
        self.model = model

    def response(
        self,
        status: str,
        output: list[dict[str, Any]],
        usage: dict[str, Any] | None,
        incomplete: bool = False,
    ) -> dict[str, Any]:
        request = self.request
        return {
            "id": self.id,
            "object": "response",
            "created_at": self.created_at,
            "status": status,
            "error": None,
            "incomplete_details": {"reason": "max_output_tokens"} if incomplete else None,
            "instructions": request.get("instructions"),
            "max_output_tokens": request.get("max_output_tokens"),
            "model": self.model,
            "output": output,
            "parallel_tool_calls": bool(request.get("parallel_tool_calls", False)),
            "previous_response_id": None,
            "reasoning": request.get("reasoning"),
            "store": False,
            "temperature": request.get("temperature"),
            "text": request.get("text") or {"format": {"type": "text"}},
            "tool_choice": request.get("tool_choice", "auto"),
            "tools": request.get("tools") or [],
            "top_p": request.get("top_p"),
            "truncation": "disabled",
            "usage": usage,
            "metadata": request.get("metadata") or {},
        }


def response_object(
    completion: Mapping[str, Any], request: Mapping[str, Any], model: str | None = None
) -> dict[str, Any]:
    """A ``chat.completion`` dict as a Response (``object: response``).

    Output items in order: ``reasoning`` (the reasoning text), ``message`` (one
    ``output_text`` part), ``function_call`` for each tool call (``call_id``: the call's id).
    ``status``: ``incomplete`` with ``incomplete_details.reason = "max_output_tokens"`` when
    the answer was cut by the limit, else ``completed``. The request's settings are echoed.
    """
    shell = _Shell(request, model or completion.get("model", ""))
    choice = completion["choices"][0]
    message = choice["message"]
    incomplete = choice.get("finish_reason") == "length"
    status = "incomplete" if incomplete else "completed"
    output: list[dict[str, Any]] = []
    if message.get("reasoning_content"):
        output.append(_reasoning_item(new_id("rs"), message["reasoning_content"], status))
    calls = message.get("tool_calls") or []
    if message.get("content") or not calls:
        output.append(_message_item(new_id("msg"), [_text_part(message.get("content") or "")], status))
    for call in calls:
        function = call["function"]
        call_id = call.get("id") or new_id("call")
        output.append(
            _call_item(new_id("fc"), call_id, function["name"], function.get("arguments", ""), status)
        )
    return shell.response(status, output, _usage(completion.get("usage")), incomplete)


class EventStream:
    """Turns ``chat.completion.chunk`` dicts into the Responses stream events.

    :meth:`start` (or the first chunk): ``response.created`` and ``response.in_progress``.
    :meth:`feed`: an output item opens when the kind of delta changes
    (``response.output_item.added``; for a message also ``response.content_part.added``),
    then its deltas (``response.reasoning_text.delta``, ``response.output_text.delta``,
    ``response.function_call_arguments.delta``); the previous item closes first (its
    ``.done`` events and ``response.output_item.done``). :meth:`finish`: the last item
    closes, then ``response.completed`` (or ``response.incomplete``) with the whole Response
    and its usage. Every event carries the next ``sequence_number``.
    """

    def __init__(self, request: Mapping[str, Any], model: str) -> None:
        self._shell = _Shell(request, model)
        self._sequence = 0
        self._output: list[dict[str, Any]] = []
        self._open: str | None = None  # reasoning, message, or call:<index>
        self._item: dict[str, Any] = {}
        self._text: list[str] = []
        self._incomplete = False
        self._usage: dict[str, Any] | None = None
        self._started = False

    def _event(self, kind: str, **fields: Any) -> dict[str, Any]:
        event = {"type": kind, "sequence_number": self._sequence, **fields}
        self._sequence += 1
        return event

    def start(self, model: str = "") -> Iterator[dict[str, Any]]:
        """The opening events (once); ``model`` names it if the request did not."""
        if self._started:
            return
        self._started = True
        self._shell.model = self._shell.model or model
        response = self._shell.response("in_progress", [], None)
        yield self._event("response.created", response=response)
        yield self._event("response.in_progress", response=response)

    def _begin(self, kind: str, item: dict[str, Any]) -> Iterator[dict[str, Any]]:
        yield from self._close()
        self._open, self._item, self._text = kind, item, []
        index = len(self._output)
        yield self._event("response.output_item.added", output_index=index, item=item)
        if item["type"] == "message":
            yield self._event(
                "response.content_part.added",
                item_id=item["id"],
                output_index=index,
                content_index=0,
                part=_text_part(""),
            )

    def _close(self) -> Iterator[dict[str, Any]]:
        if self._open is None:
            return
        item, text, index = self._item, "".join(self._text), len(self._output)
        status = "incomplete" if self._incomplete else "completed"
        ids = {"item_id": item["id"], "output_index": index}
        if item["type"] == "reasoning":
            item = _reasoning_item(item["id"], text, status)
            yield self._event("response.reasoning_text.done", **ids, content_index=0, text=text)
        elif item["type"] == "message":
            part = _text_part(text)
            item = _message_item(item["id"], [part], status)
            yield self._event("response.output_text.done", **ids, content_index=0, text=text, logprobs=[])
            yield self._event("response.content_part.done", **ids, content_index=0, part=part)
        else:
            item = _call_item(item["id"], item["call_id"], item["name"], text, status)
            yield self._event(
                "response.function_call_arguments.done", **ids, name=item["name"], arguments=text
            )
        yield self._event("response.output_item.done", output_index=index, item=item)
        self._output.append(item)
        self._open = None

    def feed(self, chunk: Mapping[str, Any]) -> Iterator[dict[str, Any]]:
        yield from self.start(str(chunk.get("model") or ""))
        if chunk.get("usage"):
            self._usage = _usage(chunk["usage"])
        for choice in chunk.get("choices") or []:
            delta = choice.get("delta") or {}
            if delta.get("reasoning_content"):
                if self._open != "reasoning":
                    yield from self._begin("reasoning", _reasoning_item(new_id("rs"), "", "in_progress"))
                yield from self._piece("response.reasoning_text.delta", delta["reasoning_content"], True)
            if delta.get("content"):
                if self._open != "message":
                    yield from self._begin("message", _message_item(new_id("msg"), [], "in_progress"))
                yield from self._piece("response.output_text.delta", delta["content"], True, logprobs=[])
            for call in delta.get("tool_calls") or []:
                kind = f"call:{call.get('index', 0)}"
                function = call.get("function") or {}
                if self._open != kind:
                    call_id = call.get("id") or new_id("call")
                    item = _call_item(new_id("fc"), call_id, function.get("name", ""), "", "in_progress")
                    yield from self._begin(kind, item)
                if function.get("arguments"):
                    yield from self._piece(
                        "response.function_call_arguments.delta", function["arguments"], False
                    )
            if choice.get("finish_reason") == "length":
                self._incomplete = True

    def _piece(self, kind: str, text: str, has_part: bool, **fields: Any) -> Iterator[dict[str, Any]]:
        self._text.append(text)
        ids: dict[str, Any] = {"item_id": self._item["id"], "output_index": len(self._output)}
        if has_part:
            ids["content_index"] = 0
        yield self._event(kind, **ids, delta=text, **fields)

    def finish(self) -> Iterator[dict[str, Any]]:
        yield from self.start()
        if self._open is None and not self._output:  # an empty answer is an empty message
            yield from self._begin("message", _message_item(new_id("msg"), [], "in_progress"))
        yield from self._close()
        status = "incomplete" if self._incomplete else "completed"
        response = self._shell.response(status, self._output, self._usage, self._incomplete)
        yield self._event(f"response.{status}", response=response)

    def failed(self, error: APIError) -> dict[str, Any]:
        """The ``error`` event of a failure after the stream started."""
        return self._event("error", code=error.code, message=error.message, param=error.param)


async def _sse(
    chunks: AsyncIterator[Mapping[str, Any]], request: Mapping[str, Any], model: str
) -> AsyncIterator[str]:
    stream = EventStream(request, model)
    try:
        async for chunk in chunks:
            for event in stream.feed(chunk):
                yield sse_event(event)
    except Exception as failure:  # the status was sent: the client reads an error event
        error = failure if isinstance(failure, APIError) else from_library_error(failure, "text.format")
        yield sse_event(stream.failed(error))
        return
    for event in stream.finish():
        yield sse_event(event)


def responses_router(chat: ChatCall, count_tokens: CountTokens) -> APIRouter:
    """``POST /v1/responses`` (streamed with ``"stream": true``) over ``chat``.

    Errors are OpenAI's :class:`APIError` bodies (a body that fails
    :class:`ResponsesRequest` included: a 400, not a 422); a failure after a stream started
    is an ``error`` event. ``count_tokens`` is taken for symmetry with the Anthropic router
    (the Responses API's ``input_tokens`` endpoint is not served).
    """
    del count_tokens
    router = APIRouter(route_class=protocol_route(APIError), tags=["responses"])

    @router.post("/v1/responses", response_model=None)
    async def responses(body: ResponsesRequest) -> dict[str, Any] | StreamingResponse:
        request = body.model_dump(exclude_none=True)
        messages, keywords = chat_request(request)
        if body.stream:
            keywords["stream_options"] = {"include_usage": True}
        try:
            answer = await chat(body.model, messages, keywords, body.stream)
        except GrammarError as error:  # the schema is text.format's here, not response_format's
            raise from_library_error(error, "text.format") from error
        model = body.model or ""
        if isinstance(answer, dict):
            return response_object(answer, request, model or None)
        return SSEResponse(_sse(answer, request, model), answer)

    return router
