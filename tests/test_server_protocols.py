"""The Anthropic Messages and OpenAI Responses translators: unit tests on fixed dicts (events
checked against the official SDKs' own types and accumulator), then the two routers served
by uvicorn over a real LlamaPool and driven by the official ``anthropic`` and ``openai``
clients."""

from __future__ import annotations

import json
import socket
import threading
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import anthropic
import httpx
import jsonschema
import openai
import pytest
import uvicorn
from anthropic.lib.streaming._messages import accumulate_event
from anthropic.types import Message, RawMessageStreamEvent
from fastapi import FastAPI, Request
from fastapi.responses import JSONResponse
from openai.types.responses import Response, ResponseStreamEvent
from pydantic import TypeAdapter

from llama_cpp import Llama, LlamaPool
from llama_cpp.server import anthropic as messages_api
from llama_cpp.server import responses as responses_api
from llama_cpp.server.anthropic import AnthropicAPIError, anthropic_router
from llama_cpp.server.errors import APIError
from llama_cpp.server.responses import responses_router

USAGE = {
    "prompt_tokens": 12,
    "completion_tokens": 5,
    "total_tokens": 17,
    "prompt_tokens_details": {"cached_tokens": 4},
}
WEATHER_SCHEMA = {"type": "object", "properties": {"city": {"type": "string"}}, "required": ["city"]}


def completion(message: dict[str, Any], finish_reason: str) -> dict[str, Any]:
    return {
        "id": "chatcmpl-1",
        "object": "chat.completion",
        "created": 1,
        "model": "gemma",
        "choices": [{"index": 0, "message": message, "logprobs": None, "finish_reason": finish_reason}],
        "usage": USAGE,
    }


def chunk(delta: dict[str, Any] | None, finish_reason: str | None = None) -> dict[str, Any]:
    base = {"id": "chatcmpl-1", "object": "chat.completion.chunk", "created": 1, "model": "gemma"}
    if delta is None:
        return {**base, "choices": [], "usage": USAGE}
    return {
        **base,
        "choices": [{"index": 0, "delta": delta, "logprobs": None, "finish_reason": finish_reason}],
    }


#: A stream with every kind of delta: reasoning, text, two tool calls, the finish, the usage.
CHUNKS = [
    chunk({"role": "assistant", "reasoning_content": "Think"}),
    chunk({"reasoning_content": "ing."}),
    chunk({"content": "Hello"}),
    chunk({"content": " there"}),
    chunk(
        {
            "tool_calls": [
                {"index": 0, "id": "c1", "type": "function", "function": {"name": "f", "arguments": ""}}
            ]
        }
    ),
    chunk({"tool_calls": [{"index": 0, "function": {"arguments": '{"city": '}}]}),
    chunk({"tool_calls": [{"index": 0, "function": {"arguments": '"Paris"}'}}]}),
    chunk(
        {
            "tool_calls": [
                {"index": 1, "id": "c2", "type": "function", "function": {"name": "g", "arguments": "{}"}}
            ]
        }
    ),
    chunk({}, "tool_calls"),
    chunk(None),
]


# -- Anthropic: the request ---------------------------------------------------------------------


def test_anthropic_request_translates_every_field() -> None:
    request = {
        "model": "m",
        "max_tokens": 32,
        "system": [{"type": "text", "text": "Be brief."}, {"type": "text", "text": "Be kind."}],
        "messages": [
            {"role": "user", "content": "Weather in Paris?"},
            {
                "role": "assistant",
                "content": [
                    {"type": "thinking", "thinking": "Use the tool.", "signature": "s"},
                    {"type": "text", "text": "Checking."},
                    {"type": "tool_use", "id": "toolu_1", "name": "get_weather", "input": {"city": "Paris"}},
                ],
            },
            {
                "role": "user",
                "content": [
                    {
                        "type": "tool_result",
                        "tool_use_id": "toolu_1",
                        "content": [{"type": "text", "text": "Sunny"}],
                    },
                    {"type": "text", "text": "And tomorrow?"},
                ],
            },
        ],
        "stop_sequences": ["END"],
        "temperature": 0.5,
        "top_p": 0.9,
        "top_k": 40,
        "tools": [{"name": "get_weather", "description": "Weather.", "input_schema": WEATHER_SCHEMA}],
        "tool_choice": {"type": "tool", "name": "get_weather"},
        "thinking": {"type": "enabled", "budget_tokens": 1024},
        "metadata": {"user_id": "u"},
    }
    messages, keywords = messages_api.chat_request(request)
    assert messages == [
        {"role": "system", "content": "Be brief.\nBe kind."},
        {"role": "user", "content": "Weather in Paris?"},
        {
            "role": "assistant",
            "content": "Checking.",
            "reasoning_content": "Use the tool.",
            "tool_calls": [
                {
                    "id": "toolu_1",
                    "type": "function",
                    "function": {"name": "get_weather", "arguments": '{"city": "Paris"}'},
                }
            ],
        },
        {"role": "tool", "tool_call_id": "toolu_1", "content": "Sunny"},
        {"role": "user", "content": "And tomorrow?"},
    ]
    assert keywords == {
        "max_tokens": 32,
        "stop": ["END"],
        "temperature": 0.5,
        "top_p": 0.9,
        "top_k": 40,
        "tools": [
            {
                "type": "function",
                "function": {"name": "get_weather", "description": "Weather.", "parameters": WEATHER_SCHEMA},
            }
        ],
        "tool_choice": {"type": "function", "function": {"name": "get_weather"}},
        "chat_template_kwargs": {"enable_thinking": True},
    }


@pytest.mark.parametrize(
    ("choice", "expected"),
    [
        ({"type": "auto"}, {"tool_choice": "auto"}),
        ({"type": "any"}, {"tool_choice": "required"}),
        ({"type": "none"}, {"tool_choice": "none"}),
        (
            {"type": "any", "disable_parallel_tool_use": False},
            {"tool_choice": "required", "parallel_tool_calls": True},
        ),
    ],
)
def test_anthropic_tool_choice(choice: dict[str, Any], expected: dict[str, Any]) -> None:
    _, keywords = messages_api.chat_request(
        {"max_tokens": 1, "messages": [{"role": "user", "content": "x"}], "tool_choice": choice}
    )
    assert keywords == {"max_tokens": 1, **expected}


@pytest.mark.parametrize(
    ("request_", "message"),
    [
        ({"messages": [{"role": "user", "content": "x"}]}, "max_tokens: Field required"),
        ({"max_tokens": 0, "messages": [{"role": "user", "content": "x"}]}, "max_tokens must be a positive"),
        ({"max_tokens": 1, "messages": []}, "messages must be a non-empty list"),
        (
            {
                "max_tokens": 1,
                "messages": [{"role": "user", "content": [{"type": "image", "source": {"type": "base64"}}]}],
            },
            r"messages\[0\].content\[0\]: image content is not supported: the model is text-only",
        ),
        (
            {"max_tokens": 1, "messages": [{"role": "user", "content": [{"type": "audio"}]}]},
            "unsupported content part 'audio'",
        ),
        (
            {
                "max_tokens": 1,
                "messages": [{"role": "user", "content": "x"}],
                "tool_choice": {"type": "tool"},
            },
            "needs a 'name'",
        ),
        (
            {"max_tokens": 1, "messages": [{"role": "user", "content": "x"}], "thinking": {"type": "maybe"}},
            "thinking type must be enabled or disabled",
        ),
    ],
)
def test_anthropic_bad_requests_are_400(request_: dict[str, Any], message: str) -> None:
    with pytest.raises(AnthropicAPIError, match=message) as raised:
        messages_api.chat_request(request_)
    assert raised.value.status == 400
    assert raised.value.body() == {
        "type": "error",
        "error": {"type": "invalid_request_error", "message": raised.value.message},
    }


def test_anthropic_error_types_are_anthropic_names() -> None:
    assert AnthropicAPIError(503, "loading", "server_error").body()["error"]["type"] == "api_error"
    assert AnthropicAPIError(429, "full", "rate_limit_error").body()["error"]["type"] == "rate_limit_error"


# -- Anthropic: the answer ----------------------------------------------------------------------


def test_anthropic_message_from_a_completion() -> None:
    message = {
        "role": "assistant",
        "content": "Here.",
        "reasoning_content": "Hmm.",
        "tool_calls": [
            {"id": "call_9", "type": "function", "function": {"name": "f", "arguments": '{"a": 1}'}}
        ],
    }
    answer = messages_api.message_response(completion(message, "tool_calls"), "alias")
    Message.model_validate(answer)
    assert answer["id"].startswith("msg_")
    assert {k: v for k, v in answer.items() if k != "id"} == {
        "type": "message",
        "role": "assistant",
        "model": "alias",
        "content": [
            {"type": "thinking", "thinking": "Hmm.", "signature": ""},
            {"type": "text", "text": "Here."},
            {"type": "tool_use", "id": "call_9", "name": "f", "input": {"a": 1}},
        ],
        "stop_reason": "tool_use",
        "stop_sequence": None,
        "usage": {
            "input_tokens": 8,
            "output_tokens": 5,
            "cache_creation_input_tokens": 0,
            "cache_read_input_tokens": 4,
        },
    }


@pytest.mark.parametrize(("finish", "stop"), [("stop", "end_turn"), ("length", "max_tokens")])
def test_anthropic_stop_reasons_and_empty_answer(finish: str, stop: str) -> None:
    answer = messages_api.message_response(completion({"role": "assistant", "content": None}, finish))
    assert answer["stop_reason"] == stop
    assert answer["content"] == [{"type": "text", "text": ""}]
    assert answer["model"] == "gemma"


def anthropic_events(chunks: list[dict[str, Any]]) -> list[dict[str, Any]]:
    stream = messages_api.EventStream("alias")
    events = [e for c in chunks for e in stream.feed(c)]
    return events + list(stream.finish())


def test_anthropic_stream_events_in_order_and_accumulated_by_the_sdk() -> None:
    events = anthropic_events(CHUNKS)
    adapter: TypeAdapter[Any] = TypeAdapter(RawMessageStreamEvent)
    snapshot, buffers = None, dict[int, bytes]()
    for event in events:
        if event["type"] != "ping":
            snapshot = accumulate_event(
                event=adapter.validate_python(event), current_snapshot=snapshot, json_bufs=buffers
            )
    assert [(e["type"], e.get("index"), e.get("delta", {}).get("type")) for e in events] == [
        ("message_start", None, None),
        ("ping", None, None),
        ("content_block_start", 0, None),
        ("content_block_delta", 0, "thinking_delta"),
        ("content_block_delta", 0, "thinking_delta"),
        ("content_block_stop", 0, None),
        ("content_block_start", 1, None),
        ("content_block_delta", 1, "text_delta"),
        ("content_block_delta", 1, "text_delta"),
        ("content_block_stop", 1, None),
        ("content_block_start", 2, None),
        ("content_block_delta", 2, "input_json_delta"),
        ("content_block_delta", 2, "input_json_delta"),
        ("content_block_stop", 2, None),
        ("content_block_start", 3, None),
        ("content_block_delta", 3, "input_json_delta"),
        ("content_block_stop", 3, None),
        ("message_delta", None, None),
        ("message_stop", None, None),
    ]
    assert snapshot is not None
    final = snapshot.model_dump(exclude_none=True)
    assert final["content"] == [
        {"type": "thinking", "thinking": "Thinking.", "signature": ""},
        {"type": "text", "text": "Hello there"},
        {"type": "tool_use", "id": "c1", "name": "f", "input": {"city": "Paris"}},
        {"type": "tool_use", "id": "c2", "name": "g", "input": {}},
    ]
    assert final["stop_reason"] == "tool_use"
    assert final["model"] == "alias"
    assert final["usage"] == {
        "input_tokens": 8,
        "output_tokens": 5,
        "cache_creation_input_tokens": 0,
        "cache_read_input_tokens": 4,
    }


def test_anthropic_stream_of_an_empty_answer_has_one_text_block() -> None:
    events = anthropic_events([chunk({}, "length")])
    assert [e["type"] for e in events] == [
        "message_start",
        "ping",
        "content_block_start",
        "content_block_stop",
        "message_delta",
        "message_stop",
    ]
    assert events[4]["delta"]["stop_reason"] == "max_tokens"
    assert events[0]["message"]["model"] == "alias"


# -- Responses: the request ---------------------------------------------------------------------


def test_responses_request_translates_every_field() -> None:
    schema = {"type": "object", "properties": {"n": {"type": "integer"}}, "required": ["n"]}
    request = {
        "model": "m",
        "instructions": "Be brief.",
        "input": [
            {"role": "user", "content": [{"type": "input_text", "text": "Weather?"}]},
            {
                "type": "message",
                "role": "assistant",
                "content": [{"type": "output_text", "text": "Checking."}],
            },
            {
                "type": "function_call",
                "call_id": "call_1",
                "name": "get_weather",
                "arguments": '{"city":"Paris"}',
            },
            {
                "type": "function_call",
                "call_id": "call_2",
                "name": "get_weather",
                "arguments": '{"city":"Rome"}',
            },
            {"type": "reasoning", "id": "rs_1", "summary": []},
            {"type": "function_call_output", "call_id": "call_1", "output": "Sunny"},
            {"type": "function_call_output", "call_id": "call_2", "output": "Rainy"},
        ],
        "tools": [
            {"type": "function", "name": "get_weather", "description": "W.", "parameters": WEATHER_SCHEMA}
        ],
        "tool_choice": {"type": "function", "name": "get_weather"},
        "parallel_tool_calls": True,
        "text": {"format": {"type": "json_schema", "name": "n", "schema": schema, "strict": True}},
        "max_output_tokens": 64,
        "temperature": 0.3,
        "top_p": 0.8,
        "reasoning": {"effort": "low"},
        "store": False,
    }
    messages, keywords = responses_api.chat_request(request)
    assert messages == [
        {"role": "system", "content": "Be brief."},
        {"role": "user", "content": "Weather?"},
        {
            "role": "assistant",
            "content": "Checking.",
            "tool_calls": [
                {
                    "id": "call_1",
                    "type": "function",
                    "function": {"name": "get_weather", "arguments": '{"city":"Paris"}'},
                },
                {
                    "id": "call_2",
                    "type": "function",
                    "function": {"name": "get_weather", "arguments": '{"city":"Rome"}'},
                },
            ],
        },
        {"role": "tool", "tool_call_id": "call_1", "content": "Sunny"},
        {"role": "tool", "tool_call_id": "call_2", "content": "Rainy"},
    ]
    assert keywords == {
        "max_tokens": 64,
        "temperature": 0.3,
        "top_p": 0.8,
        "tools": [
            {
                "type": "function",
                "function": {"name": "get_weather", "parameters": WEATHER_SCHEMA, "description": "W."},
            }
        ],
        "tool_choice": {"type": "function", "function": {"name": "get_weather"}},
        "parallel_tool_calls": True,
        "response_format": {
            "type": "json_schema",
            "json_schema": {"name": "n", "schema": schema, "strict": True},
        },
        "reasoning_effort": "low",
    }


def test_responses_string_input_and_formats() -> None:
    messages, keywords = responses_api.chat_request(
        {"input": "Hi", "text": {"format": {"type": "json_object"}}}
    )
    assert messages == [{"role": "user", "content": "Hi"}]
    assert keywords == {"response_format": {"type": "json_object"}}
    assert responses_api.chat_request({"input": "Hi", "text": {"format": {"type": "text"}}})[1] == {}


@pytest.mark.parametrize(
    ("request_", "message"),
    [
        ({"input": "x", "previous_response_id": "resp_1"}, "previous_response_id is not supported"),
        ({"input": "x", "store": True}, "store: true is not supported"),
        ({"input": "x", "conversation": "conv_1"}, "conversation is not supported"),
        ({"input": "x", "background": True}, "background responses are not supported"),
        ({"input": []}, "input must be a string or a non-empty list"),
        ({"input": [{"type": "item_reference", "id": "msg_1"}]}, "item_reference is not supported"),
        (
            {"input": [{"role": "user", "content": [{"type": "input_image", "image_url": "x"}]}]},
            r"input\[0\].content\[0\]: input_image content is not supported: the model is text-only",
        ),
        ({"input": "x", "tools": [{"type": "web_search"}]}, "only function tools are supported"),
        ({"input": "x", "tool_choice": "sometimes"}, "tool_choice must be auto, none, required"),
        ({"input": "x", "text": {"format": {"type": "json_schema"}}}, "needs a 'schema' object"),
        ({"input": "x", "max_output_tokens": 0}, "max_output_tokens must be a positive integer"),
    ],
)
def test_responses_bad_requests_are_400(request_: dict[str, Any], message: str) -> None:
    with pytest.raises(APIError, match=message) as raised:
        responses_api.chat_request(request_)
    assert raised.value.status == 400
    assert raised.value.body()["error"]["type"] == "invalid_request_error"


# -- Responses: the answer ----------------------------------------------------------------------


def test_response_object_from_a_completion() -> None:
    message = {
        "role": "assistant",
        "content": "Here.",
        "reasoning_content": "Hmm.",
        "tool_calls": [
            {"id": "call_9", "type": "function", "function": {"name": "f", "arguments": '{"a": 1}'}}
        ],
    }
    request = {"input": "x", "instructions": "Be brief.", "temperature": 0.5}
    answer = responses_api.response_object(completion(message, "tool_calls"), request)
    parsed = Response.model_validate(answer)
    assert parsed.output_text == "Here."
    assert answer["id"].startswith("resp_")
    assert (answer["object"], answer["status"], answer["incomplete_details"]) == (
        "response",
        "completed",
        None,
    )
    assert (answer["model"], answer["instructions"], answer["temperature"]) == ("gemma", "Be brief.", 0.5)
    assert [item["type"] for item in answer["output"]] == ["reasoning", "message", "function_call"]
    assert answer["output"][0]["content"] == [{"type": "reasoning_text", "text": "Hmm."}]
    call = answer["output"][2]
    assert (call["call_id"], call["name"], call["arguments"], call["status"]) == (
        "call_9",
        "f",
        '{"a": 1}',
        "completed",
    )
    assert answer["usage"] == {
        "input_tokens": 12,
        "input_tokens_details": {"cached_tokens": 4, "cache_write_tokens": 0},
        "output_tokens": 5,
        "output_tokens_details": {"reasoning_tokens": 0},
        "total_tokens": 17,
    }


def test_response_cut_by_the_limit_is_incomplete() -> None:
    answer = responses_api.response_object(completion({"role": "assistant", "content": "Par"}, "length"), {})
    assert (answer["status"], answer["incomplete_details"]) == ("incomplete", {"reason": "max_output_tokens"})
    assert answer["output"][0]["status"] == "incomplete"


def test_responses_stream_events_in_order_with_sequence_numbers() -> None:
    stream = responses_api.EventStream({"input": "x"}, "alias")
    events = [e for c in CHUNKS for e in stream.feed(c)] + list(stream.finish())
    adapter: TypeAdapter[Any] = TypeAdapter(ResponseStreamEvent)
    for event in events:
        adapter.validate_python(event)
    assert [e["sequence_number"] for e in events] == list(range(len(events)))
    assert [(e["type"], e.get("output_index")) for e in events] == [
        ("response.created", None),
        ("response.in_progress", None),
        ("response.output_item.added", 0),
        ("response.reasoning_text.delta", 0),
        ("response.reasoning_text.delta", 0),
        ("response.reasoning_text.done", 0),
        ("response.output_item.done", 0),
        ("response.output_item.added", 1),
        ("response.content_part.added", 1),
        ("response.output_text.delta", 1),
        ("response.output_text.delta", 1),
        ("response.output_text.done", 1),
        ("response.content_part.done", 1),
        ("response.output_item.done", 1),
        ("response.output_item.added", 2),
        ("response.function_call_arguments.delta", 2),
        ("response.function_call_arguments.delta", 2),
        ("response.function_call_arguments.done", 2),
        ("response.output_item.done", 2),
        ("response.output_item.added", 3),
        ("response.function_call_arguments.delta", 3),
        ("response.function_call_arguments.done", 3),
        ("response.output_item.done", 3),
        ("response.completed", None),
    ]
    final = Response.model_validate(events[-1]["response"])
    assert final.output_text == "Hello there"
    assert final.model == "alias"
    assert final.usage is not None
    assert final.usage.total_tokens == 17
    calls = [(i.call_id, i.name, i.arguments) for i in final.output if i.type == "function_call"]
    assert calls == [("c1", "f", '{"city": "Paris"}'), ("c2", "g", "{}")]


# -- end to end: the routers on uvicorn, the official clients -----------------------------------

PROMPT: Any = [{"role": "user", "content": "Name a color."}]  # the SDKs' TypedDicts, loosely
#: Gemma's turn format. The default model's GGUF carries no chat template, and under the
#: library's fallback (llama-cpp-python's "llama-2" format) it ends its turn at once: an
#: empty answer would not show that text reaches the client.
GEMMA_TEMPLATE = (
    "{{ bos_token }}{% for message in messages %}"
    "{% if message['role'] == 'assistant' %}{% set role = 'model' %}"
    "{% else %}{% set role = 'user' %}{% endif %}"
    "<start_of_turn>{{ role }}\n{{ (message['content'] or '') | trim }}<end_of_turn>\n{% endfor %}"
    "{% if add_generation_prompt %}<start_of_turn>model\n{% endif %}"
)
WEATHER_TOOL: Any = {
    "name": "get_weather",
    "description": "The weather in a city.",
    "input_schema": WEATHER_SCHEMA,
}
FUNCTION_TOOL: Any = {
    "type": "function",
    "name": "get_weather",
    "parameters": WEATHER_SCHEMA,
    "strict": False,
}
CITY: Any = {
    "type": "object",
    "properties": {
        "city": {"type": "string", "maxLength": 12},
        "population": {"type": "integer", "maximum": 99},
    },
    "required": ["city", "population"],
    "additionalProperties": False,
}


@pytest.fixture(scope="module")
def server(default_model_path: Path) -> Iterator[str]:
    """The two routers and an APIError handler, served by uvicorn on a socket bound to
    127.0.0.1 port 0 (its port read back), over a LlamaPool of two slots."""
    options: dict[str, Any] = {"chat_template": GEMMA_TEMPLATE, "verbose": False}
    pool = LlamaPool(default_model_path, pool_size=2, n_ctx=1024, n_batch=256, n_threads=2, **options)
    vocab = Llama(default_model_path, vocab_only=True, **options)

    async def chat(
        model: str | None, messages: list[dict[str, Any]], keywords: dict[str, Any], stream: bool
    ) -> Any:
        if stream:
            return await pool.create_chat_completion_async(messages, stream=True, **keywords)
        return await pool.create_chat_completion_async(messages, **keywords)

    async def count_tokens(
        model: str | None, messages: list[dict[str, Any]], keywords: dict[str, Any]
    ) -> int:
        rendered = vocab.render_chat(
            messages,
            tools=keywords.get("tools"),
            tool_choice=keywords.get("tool_choice"),
            chat_template_kwargs=keywords.get("chat_template_kwargs"),
        )
        return len(vocab.tokenize(rendered.prompt, add_bos=True, special=True))

    app = FastAPI()
    app.include_router(anthropic_router(chat, count_tokens))
    app.include_router(responses_router(chat, count_tokens))

    @app.exception_handler(APIError)
    async def api_error(request: Request, error: APIError) -> JSONResponse:
        return JSONResponse(error.body(), status_code=error.status, headers=error.headers)

    sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    sock.bind(("127.0.0.1", 0))
    port = sock.getsockname()[1]
    server = uvicorn.Server(uvicorn.Config(app, log_level="warning", lifespan="off"))
    thread = threading.Thread(target=server.run, kwargs={"sockets": [sock]}, daemon=True)
    thread.start()
    try:
        for _ in range(500):  # retried until the server says it started, as a request would be
            if server.started or not thread.is_alive():
                break
            threading.Event().wait(0.01)
        assert server.started, "uvicorn did not start"
        yield f"http://127.0.0.1:{port}"
    finally:
        server.should_exit = True
        thread.join(timeout=30)
        sock.close()
        pool.close()
        vocab.close()


@pytest.fixture(scope="module")
def claude(server: str) -> Iterator[anthropic.Anthropic]:
    with anthropic.Anthropic(base_url=server, api_key="local", max_retries=0) as client:
        yield client


@pytest.fixture(scope="module")
def oai(server: str) -> Iterator[openai.OpenAI]:
    with openai.OpenAI(base_url=server + "/v1", api_key="local", max_retries=0) as client:
        yield client


def test_anthropic_messages_create(claude: anthropic.Anthropic) -> None:
    message = claude.messages.create(
        model="gemma", max_tokens=8, messages=PROMPT, extra_body={"temperature": 0}
    )
    assert message.id.startswith("msg_")
    assert (message.type, message.role, message.model) == ("message", "assistant", "gemma")
    assert message.content[0].type == "text"
    assert message.content[0].text
    assert message.stop_reason in ("end_turn", "max_tokens")
    assert 1 <= message.usage.output_tokens <= 8
    counted = claude.messages.count_tokens(model="gemma", messages=PROMPT)
    assert counted.input_tokens == message.usage.input_tokens + (message.usage.cache_read_input_tokens or 0)


def test_anthropic_stop_sequence_is_reported(claude: anthropic.Anthropic) -> None:
    free = claude.messages.create(model="gemma", max_tokens=8, messages=PROMPT, extra_body={"temperature": 0})
    assert free.content[0].type == "text"
    words = free.content[0].text.split()
    assert len(words) >= 2, free.content[0].text
    stop = words[1]  # the answer's second word: it ends the answer before that word
    message = claude.messages.create(
        model="gemma", max_tokens=8, messages=PROMPT, stop_sequences=[stop], extra_body={"temperature": 0}
    )
    assert (message.stop_reason, message.stop_sequence) == ("stop_sequence", stop)
    with claude.messages.stream(
        model="gemma", max_tokens=8, messages=PROMPT, stop_sequences=[stop], extra_body={"temperature": 0}
    ) as stream:
        final = stream.get_final_message()
    assert (final.stop_reason, final.stop_sequence) == ("stop_sequence", stop)
    streamed, created = final.content[0], message.content[0]
    assert streamed.type == "text"
    assert created.type == "text"
    assert streamed.text == created.text
    assert stop not in streamed.text


def test_anthropic_messages_stream(claude: anthropic.Anthropic) -> None:
    with claude.messages.stream(
        model="gemma", max_tokens=8, messages=PROMPT, extra_body={"temperature": 0}
    ) as stream:
        text = "".join(stream.text_stream)
        final = stream.get_final_message()
    assert text
    assert final.content[0].type == "text"
    assert final.content[0].text == text
    assert final.stop_reason in ("end_turn", "max_tokens")
    assert 1 <= final.usage.output_tokens <= 8
    assert final.usage.input_tokens + (final.usage.cache_read_input_tokens or 0) > 5


def test_anthropic_forced_tool_call(claude: anthropic.Anthropic) -> None:
    message = claude.messages.create(
        model="gemma",
        max_tokens=60,
        messages=[{"role": "user", "content": "What is the weather in Paris?"}],
        tools=[WEATHER_TOOL],
        tool_choice={"type": "tool", "name": "get_weather"},
        extra_body={"temperature": 0},
    )
    calls = [block for block in message.content if block.type == "tool_use"]
    assert message.stop_reason == "tool_use"
    assert calls
    assert calls[0].name == "get_weather"
    assert calls[0].id
    jsonschema.validate(calls[0].input, WEATHER_SCHEMA)


def test_anthropic_bad_requests(claude: anthropic.Anthropic, server: str) -> None:
    image: Any = {
        "type": "image",
        "source": {"type": "base64", "media_type": "image/png", "data": "iVBORw0KGgo="},
    }
    with pytest.raises(anthropic.BadRequestError) as raised:
        claude.messages.create(model="gemma", max_tokens=8, messages=[{"role": "user", "content": [image]}])
    assert raised.value.body == {
        "type": "error",
        "error": {
            "type": "invalid_request_error",
            "message": "messages[0].content[0]: image content is not supported: the model is text-only",
        },
    }
    # A body that fails the request model: Anthropic's 400, not FastAPI's 422.
    answer = httpx.post(server + "/v1/messages", json={"max_tokens": 8, "messages": [{"role": "robot"}]})
    assert answer.status_code == 400
    assert answer.json()["type"] == "error"
    assert "messages.0.role" in answer.json()["error"]["message"]
    missing = httpx.post(server + "/v1/messages", json={"messages": PROMPT})
    assert (missing.status_code, missing.json()["error"]["message"]) == (400, "max_tokens: Field required")


def test_responses_create(oai: openai.OpenAI) -> None:
    response = oai.responses.create(model="gemma", input="Name a color.", max_output_tokens=8, temperature=0)
    assert response.id.startswith("resp_")
    assert response.object == "response"
    assert response.status in ("completed", "incomplete")
    assert response.output_text
    assert response.usage is not None
    assert 1 <= response.usage.output_tokens <= 8
    assert response.usage.total_tokens == response.usage.input_tokens + response.usage.output_tokens


def test_responses_json_schema(oai: openai.OpenAI) -> None:
    response = oai.responses.create(
        model="gemma",
        instructions="Answer in JSON.",
        input=[{"role": "user", "content": [{"type": "input_text", "text": "Describe a small city."}]}],
        text={"format": {"type": "json_schema", "name": "city", "schema": CITY, "strict": True}},
        max_output_tokens=60,
        temperature=0,
    )
    assert response.status == "completed"
    jsonschema.validate(json.loads(response.output_text), CITY)


def test_responses_forced_function_call(oai: openai.OpenAI) -> None:
    response = oai.responses.create(
        model="gemma",
        input="What is the weather in Paris?",
        tools=[FUNCTION_TOOL],
        tool_choice={"type": "function", "name": "get_weather"},
        max_output_tokens=60,
        temperature=0,
    )
    calls = [item for item in response.output if item.type == "function_call"]
    assert calls
    assert calls[0].name == "get_weather"
    assert calls[0].call_id
    jsonschema.validate(json.loads(calls[0].arguments), WEATHER_SCHEMA)


def test_responses_stream(oai: openai.OpenAI) -> None:
    events = list(
        oai.responses.create(model="gemma", input="Name a color.", max_output_tokens=8, stream=True)
    )
    kinds = [event.type for event in events]
    assert kinds[:2] == ["response.created", "response.in_progress"]
    assert kinds[-1] in ("response.completed", "response.incomplete")
    assert [event.sequence_number for event in events] == list(range(len(events)))
    deltas = "".join(event.delta for event in events if event.type == "response.output_text.delta")
    done = [event for event in events if event.type == "response.output_text.done"]
    assert deltas
    assert [event.text for event in done] == [deltas]
    final = events[-1]
    assert final.type in ("response.completed", "response.incomplete")
    assert final.response.output_text == deltas
    assert final.response.usage is not None
    assert 1 <= final.response.usage.output_tokens <= 8


def test_responses_bad_requests(oai: openai.OpenAI, server: str) -> None:
    with pytest.raises(openai.BadRequestError) as raised:
        oai.responses.create(model="gemma", input="Hi", previous_response_id="resp_123")
    assert raised.value.body == {
        "message": "previous_response_id is not supported: the server stores no responses; "
        "send the whole conversation in input",
        "type": "invalid_request_error",
        "param": "previous_response_id",
        "code": None,
    }
    answer = httpx.post(server + "/v1/responses", json={"model": "gemma"})
    assert answer.status_code == 400
    assert answer.json()["error"]["type"] == "invalid_request_error"
    assert "input" in answer.json()["error"]["message"]
