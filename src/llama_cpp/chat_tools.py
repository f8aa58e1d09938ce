"""Tool calls for chat formats that have none of their own.

llama.cpp's chat code knows the tool-call format of every template that describes tools (Qwen,
Llama 3.x, Mistral, GPT-OSS, ...), but a template without tools (Gemma, a model with no
template at all, llama-cpp-python's built-in formats) would simply ignore them. For those,
the answer is a JSON document, constrained by a grammar so that it always parses (the
"generic" format llama.cpp used before it had per-family parsers)::

    {"tool_calls": [{"name": "get_weather", "arguments": {"city": "Paris"}}]}
    {"response": "plain answer"}          (only when the model may answer without a tool)

The tools are described to the model in the system message; earlier tool calls and tool
results in the conversation are written as text the same way.
"""

from __future__ import annotations

import json
import uuid
from collections.abc import Mapping, Sequence
from typing import Any

from llama_cpp.chat_output import ContentDelta, Delta

Message = Mapping[str, Any]


def _function(tool: Mapping[str, Any]) -> Mapping[str, Any]:
    function: Mapping[str, Any] = tool["function"]
    return function


def tool_call_schema(tools: Sequence[Mapping[str, Any]], choice: str, parallel: bool) -> dict[str, Any]:
    """The JSON schema of an answer: tool calls (one, or several with ``parallel``), or, when
    ``choice`` is ``"auto"``, a plain ``{"response": ...}`` too."""
    calls = [
        {
            "type": "object",
            "properties": {
                "name": {"const": _function(tool)["name"]},
                "arguments": _function(tool).get("parameters") or {"type": "object"},
            },
            "required": ["name", "arguments"],
            "additionalProperties": False,
        }
        for tool in tools
    ]
    call = calls[0] if len(calls) == 1 else {"anyOf": calls}
    with_calls: dict[str, Any] = {
        "type": "object",
        "properties": {
            "tool_calls": {
                "type": "array",
                "items": call,
                "minItems": 1,
                **({} if parallel else {"maxItems": 1}),
            }
        },
        "required": ["tool_calls"],
        "additionalProperties": False,
    }
    if choice != "auto":
        return with_calls
    response = {
        "type": "object",
        "properties": {"response": {"type": "string"}},
        "required": ["response"],
        "additionalProperties": False,
    }
    return {"anyOf": [with_calls, response]}


def tool_instructions(tools: Sequence[Mapping[str, Any]], choice: str, parallel: bool) -> str:
    """What the system message tells the model about the tools and the answer's form."""
    described = [
        {
            "name": _function(tool)["name"],
            "description": _function(tool).get("description", ""),
            "parameters": _function(tool).get("parameters") or {"type": "object"},
        }
        for tool in tools
    ]
    lines = [
        "You can call these tools:",
        json.dumps(described, ensure_ascii=False, indent=2),
        "",
        "To call " + ("tools" if parallel else "a tool") + ', answer with JSON: {"tool_calls": '
        '[{"name": <tool name>, "arguments": <arguments object>}]}.',
    ]
    if choice == "auto":
        lines.append('To answer without a tool, answer with JSON: {"response": <your answer>}.')
    return "\n".join(lines)


def _as_text(content: object) -> str:
    if isinstance(content, str):
        return content
    if isinstance(content, Sequence):
        return "\n".join(str(part.get("text", "")) for part in content if isinstance(part, Mapping))
    return ""


def with_tools_described(
    messages: Sequence[Message], tools: Sequence[Mapping[str, Any]], choice: str, parallel: bool
) -> list[dict[str, Any]]:
    """``messages`` for a format without tools: the instructions in the system message,
    assistant tool calls as the JSON the model is asked to write, tool results as user text."""
    instructions = tool_instructions(tools, choice, parallel)
    out: list[dict[str, Any]] = []
    for message in messages:
        role = message["role"]
        if role == "tool":
            name = message.get("name") or message.get("tool_call_id") or "the tool"
            out.append({"role": "user", "content": f"Result of {name}:\n{_as_text(message.get('content'))}"})
        elif role == "assistant" and message.get("tool_calls"):
            calls = [
                {"name": call["function"]["name"], "arguments": _arguments(call["function"].get("arguments"))}
                for call in message["tool_calls"]
            ]
            out.append(
                {"role": "assistant", "content": json.dumps({"tool_calls": calls}, ensure_ascii=False)}
            )
        else:
            out.append({**message, "content": _as_text(message.get("content"))})
    out = _merge_consecutive_users(out)
    if out and out[0]["role"] in ("system", "developer"):
        out[0] = {"role": "system", "content": out[0]["content"] + "\n\n" + instructions}
    else:
        out.insert(0, {"role": "system", "content": instructions})
    return out


def _merge_consecutive_users(messages: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """One user message where tool results and a question follow each other (many templates
    insist that roles alternate)."""
    merged: list[dict[str, Any]] = []
    for message in messages:
        if merged and message["role"] == "user" and merged[-1]["role"] == "user":
            merged[-1] = {**merged[-1], "content": merged[-1]["content"] + "\n\n" + message["content"]}
        else:
            merged.append(message)
    return merged


def _arguments(arguments: object) -> object:
    if isinstance(arguments, str):
        try:
            return json.loads(arguments)
        except json.JSONDecodeError:
            return arguments
    return arguments


def _cut_response(text: str) -> str:
    """The answer of a ``{"response": ...`` that ended early, else the text as it is."""
    for ending in ('"}', '\\"}'):
        try:
            answer = json.loads(text + ending)
        except json.JSONDecodeError:
            continue
        response = answer.get("response") if isinstance(answer, dict) else None
        if isinstance(response, str):
            return response
    return text


class GenericToolParser:
    """Parses the JSON answer of :func:`tool_call_schema` into an OpenAI message. The
    answer only makes sense whole, so a stream delivers it when the generation ends."""

    def __init__(self) -> None:
        self._text = ""

    def parse(self, text: str, is_partial: bool = False) -> str:
        try:
            answer = json.loads(text)
        except json.JSONDecodeError:  # cut short by max_tokens
            return json.dumps({"role": "assistant", "content": _cut_response(text)})
        if not isinstance(answer, dict):
            return json.dumps({"role": "assistant", "content": text})
        if "response" in answer:
            return json.dumps({"role": "assistant", "content": str(answer["response"])})
        calls = [
            {
                "id": f"call_{uuid.uuid4().hex[:24]}",
                "type": "function",
                "function": {
                    "name": call["name"],
                    "arguments": json.dumps(call.get("arguments", {}), ensure_ascii=False),
                },
            }
            for call in answer.get("tool_calls") or []
        ]
        return json.dumps({"role": "assistant", "content": None, "tool_calls": calls})

    def update(self, delta: str, is_partial: bool = True) -> Sequence[Delta]:
        self._text += delta
        if is_partial:
            return []
        message = json.loads(self.parse(self._text))
        deltas: list[Delta] = []
        if message.get("content"):
            deltas.append(ContentDelta(message["content"]))
        deltas.extend(
            ContentDelta(
                "",
                tool_call_index=i,
                tool_call_id=call["id"],
                tool_call_name=call["function"]["name"],
                tool_call_arguments=call["function"]["arguments"],
            )
            for i, call in enumerate(message.get("tool_calls") or [])
        )
        return deltas
