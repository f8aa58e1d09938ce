"""Chat answers as OpenAI dicts: a completion's text parsed by the chat format into content,
``reasoning_content`` and ``tool_calls``, whole or as streamed deltas."""

from __future__ import annotations

import json
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from typing import Any, Protocol, cast

from llama_cpp import _core
from llama_cpp.llama_types import (
    ChatCompletionChunk,
    ChatCompletionDelta,
    ChatCompletionFunctionCallDelta,
    ChatCompletionLogprobs,
    ChatCompletionMessage,
    ChatCompletionMessageToolCall,
    ChatCompletionTokenLogprob,
    ChatCompletionToolCallDelta,
    ChatCompletionTopLogprob,
    ChatFinishReason,
    CompletionLogprobs,
    CreateChatCompletionResponse,
    CreateCompletionResponse,
)


@dataclass(frozen=True, slots=True)
class ContentDelta:
    """A change of a streamed message made in Python: the fields of :class:`_core.ChatDelta`."""

    content: str
    reasoning_content: str = ""
    tool_call_index: int = -1  # -1: no tool call changed
    tool_call_id: str = ""
    tool_call_name: str = ""
    tool_call_arguments: str = ""


#: One change of a streamed message: llama.cpp's parser's, or one made in Python.
Delta = _core.ChatDelta | ContentDelta


class OutputParser(Protocol):
    """Turns generated text into a message: llama.cpp's ChatParser, or :class:`PlainText`."""

    def parse(self, text: str, is_partial: bool = False) -> str: ...
    def update(self, delta: str, is_partial: bool = True) -> Sequence[Delta]: ...


class PlainText:
    """The parser of formats without structure (llama-cpp-python's built-in formats): all
    text is content."""

    def parse(self, text: str, is_partial: bool = False) -> str:
        return json.dumps({"role": "assistant", "content": text})

    def update(self, delta: str, is_partial: bool = True) -> Sequence[Delta]:
        return [ContentDelta(delta)] if delta else []


def message_from_json(text: str) -> ChatCompletionMessage:
    """llama.cpp's parsed message as OpenAI's: content None when there are only tool calls,
    ``reasoning_content`` and ``tool_calls`` only when not empty."""
    parsed: dict[str, Any] = json.loads(text)
    tool_calls: list[ChatCompletionMessageToolCall] = [
        {
            "id": call.get("id") or "",
            "type": "function",
            "function": {"name": call["function"]["name"], "arguments": call["function"]["arguments"]},
        }
        for call in parsed.get("tool_calls") or []
    ]
    content = parsed.get("content")
    message: ChatCompletionMessage = {
        "role": "assistant",
        "content": content if isinstance(content, str) and (content or not tool_calls) else None,
    }
    if parsed.get("reasoning_content"):
        message["reasoning_content"] = parsed["reasoning_content"]
    if tool_calls:
        message["tool_calls"] = tool_calls
    return message


def chat_finish_reason(reason: str | None, has_tool_calls: bool) -> ChatFinishReason | None:
    """OpenAI's finish reason: ``"tool_calls"`` when a finished answer called tools."""
    if reason == "stop" and has_tool_calls:
        return "tool_calls"
    return cast(ChatFinishReason | None, reason)


def chat_logprobs(logprobs: CompletionLogprobs | None) -> ChatCompletionLogprobs | None:
    if logprobs is None:
        return None
    content: list[ChatCompletionTokenLogprob] = []
    for token, logprob, top in zip(
        logprobs["tokens"], logprobs["token_logprobs"], logprobs["top_logprobs"], strict=True
    ):
        alternatives: list[ChatCompletionTopLogprob] = [
            {"token": t, "bytes": None, "logprob": v} for t, v in (top or {}).items()
        ]
        content.append({"token": token, "bytes": None, "logprob": logprob, "top_logprobs": alternatives})
    return {"content": content, "refusal": None}


def chat_response(completion: CreateCompletionResponse, parser: OutputParser) -> CreateChatCompletionResponse:
    """A chat.completion dict from a text completion, its text parsed by the chat format."""
    choice = completion["choices"][0]
    message = message_from_json(parser.parse(choice["text"], False))
    return {
        "id": "chat" + completion["id"],
        "object": "chat.completion",
        "created": completion["created"],
        "model": completion["model"],
        "choices": [
            {
                "index": 0,
                "message": message,
                "logprobs": chat_logprobs(choice["logprobs"]),
                "finish_reason": chat_finish_reason(choice["finish_reason"], "tool_calls" in message),
                "stop_reason": choice.get("stop_reason"),
            }
        ],
        "usage": completion["usage"],
    }


def _merge_deltas(deltas: Sequence[Delta]) -> ChatCompletionDelta:
    """One OpenAI delta from the message's changes: text concatenated, tool calls in order."""
    delta: ChatCompletionDelta = {}
    content = "".join(d.content for d in deltas)
    reasoning = "".join(d.reasoning_content for d in deltas)
    if reasoning:
        delta["reasoning_content"] = reasoning
    if content:
        delta["content"] = content
    calls: list[ChatCompletionToolCallDelta] = []
    for d in deltas:
        if d.tool_call_index < 0:
            continue
        call: ChatCompletionToolCallDelta = {"index": d.tool_call_index}
        if d.tool_call_id:
            call["id"] = d.tool_call_id
            call["type"] = "function"
        function: ChatCompletionFunctionCallDelta = {}
        if d.tool_call_name:
            function["name"] = d.tool_call_name
        if d.tool_call_arguments or d.tool_call_name:
            function["arguments"] = d.tool_call_arguments
        call["function"] = function
        calls.append(call)
    if calls:
        delta["tool_calls"] = calls
    return delta


def chat_chunks(
    chunks: Iterator[CreateCompletionResponse], parser: OutputParser
) -> Iterator[ChatCompletionChunk]:
    """chat.completion.chunk dicts: the role first, then the parsed message's deltas
    (content, reasoning_content, tool_calls) as the text streams, the finish reason last."""
    called_tools = False
    for i, chunk in enumerate(chunks):
        base: dict[str, Any] = {
            "id": "chat" + chunk["id"],
            "object": "chat.completion.chunk",
            "model": chunk["model"],
            "created": chunk["created"],
        }
        if not chunk["choices"]:  # stream_options' usage chunk
            yield cast(ChatCompletionChunk, {**base, "choices": [], "usage": chunk.get("usage")})
            continue
        choice = chunk["choices"][0]
        if i == 0:
            yield cast(
                ChatCompletionChunk,
                {
                    **base,
                    "choices": [
                        {"index": 0, "delta": {"role": "assistant"}, "logprobs": None, "finish_reason": None}
                    ],
                },
            )
        final = choice["finish_reason"] is not None
        delta = _merge_deltas(parser.update(choice["text"], not final))
        called_tools = called_tools or "tool_calls" in delta
        logprobs = chat_logprobs(choice["logprobs"])
        if delta or logprobs:
            yield cast(
                ChatCompletionChunk,
                {
                    **base,
                    "choices": [{"index": 0, "delta": delta, "logprobs": logprobs, "finish_reason": None}],
                },
            )
        if final:
            reason = chat_finish_reason(choice["finish_reason"], called_tools)
            last = {
                "index": 0,
                "delta": {},
                "logprobs": None,
                "finish_reason": reason,
                "stop_reason": choice.get("stop_reason"),
            }
            yield cast(ChatCompletionChunk, {**base, "choices": [last]})
