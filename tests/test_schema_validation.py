"""Every structured answer validated: a completed answer that breaks its schema raises
SchemaValidationError (whole, streamed, async, on a pool, over HTTP), a schema the grammar
cannot enforce is refused before anything is generated, and a JSON schema's grammar is
always json_schema.schema_to_grammar's."""

from __future__ import annotations

import asyncio
import json
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import jsonschema
import pytest

from llama_cpp import Llama, LlamaPool
from llama_cpp.errors import GrammarError, InvalidArgumentError, SchemaValidationError, UnsupportedSchemaError
from llama_cpp.json_schema import schema_to_grammar
from llama_cpp.server import ServerSettings
from llama_cpp.structured import AnswerCheck, schema_validator
from server_harness import KEY, Server, events, serve

# uniqueItems on free strings: a grammar cannot enforce it, so validation is the only check;
# greedy, the default model repeats one string (checked by the tests that use it).
REPEATS: dict[str, Any] = {
    "type": "array",
    "items": {"type": "string", "maxLength": 8},
    "uniqueItems": True,
    "minItems": 3,
    "maxItems": 5,
}
REPEAT_ASK = [{"role": "user", "content": "List the word apple five times as a JSON array"}]
# Distinct items that can only be "y": every completed answer repeats one, whatever the
# model picks (the server's answers depend on its prompt cache, which the tests share).
PIGEONHOLE: dict[str, Any] = {
    "type": "array",
    "items": {"type": "string", "pattern": "^y$"},
    "uniqueItems": True,
    "minItems": 2,
    "maxItems": 3,
}
# A keyword no grammar enforces: refused before generating.
NOT_SCHEMA: dict[str, Any] = {
    "type": "object",
    "properties": {"v": {"not": {"type": "string"}}},
    "required": ["v"],
}
ASK = [{"role": "user", "content": "Give a value as JSON."}]
COLOR: dict[str, Any] = {
    "type": "object",
    "properties": {"color": {"enum": ["red", "green", "blue"]}},
    "required": ["color"],
    "additionalProperties": False,
}


def _format(schema: dict[str, Any]) -> dict[str, Any]:
    return {"type": "json_schema", "json_schema": {"name": "answer", "schema": schema, "strict": True}}


@pytest.fixture(scope="module")
def gemma_chat(default_model_path: Path) -> Iterator[Llama]:
    with Llama(default_model_path, n_ctx=512, n_threads=2) as llm:
        yield llm


@pytest.fixture(scope="module")
def gemma_pool(default_model_path: Path) -> Iterator[LlamaPool]:
    with LlamaPool(default_model_path, pool_size=2, n_ctx=512, n_threads=2) as pool:
        yield pool


def _assert_repeats(error: SchemaValidationError) -> None:
    assert "non-unique elements" in error.reason
    items = json.loads(error.answer)
    assert 3 <= len(items) <= 5
    assert len(set(items)) < len(items)
    assert str(error).startswith("the answer does not validate: at '/': ")


# -- the library: whole, streamed, async, pool -------------------------------------------------


def test_an_invalid_answer_raises_instead_of_returning(gemma_chat: Llama) -> None:
    with pytest.raises(SchemaValidationError) as caught:
        gemma_chat.create_chat_completion(
            REPEAT_ASK, response_format=_format(REPEATS), temperature=0, max_tokens=60
        )
    _assert_repeats(caught.value)


def test_a_stream_raises_at_its_end_in_place_of_the_finish_reason(gemma_chat: Llama) -> None:
    seen: list[Any] = []
    stream = gemma_chat.create_chat_completion(
        REPEAT_ASK, response_format=_format(REPEATS), temperature=0, max_tokens=60, stream=True
    )
    with pytest.raises(SchemaValidationError) as caught:
        seen.extend(stream)
    _assert_repeats(caught.value)
    text = "".join(c["choices"][0]["delta"].get("content", "") for c in seen)
    assert text == caught.value.answer  # every content chunk was passed on
    assert all(c["choices"][0]["finish_reason"] is None for c in seen)


def test_a_truncated_answer_is_not_judged(gemma_chat: Llama) -> None:
    answer = gemma_chat.create_chat_completion(
        REPEAT_ASK, response_format=_format(REPEATS), temperature=0, max_tokens=6
    )
    assert answer["choices"][0]["finish_reason"] == "length"


def test_a_valid_answer_is_returned_whole_and_streamed(gemma_chat: Llama) -> None:
    whole = gemma_chat.create_chat_completion(
        ASK, response_format=_format(COLOR), temperature=0, max_tokens=30
    )
    assert whole["choices"][0]["finish_reason"] == "stop"
    content = whole["choices"][0]["message"]["content"] or ""
    jsonschema.validate(json.loads(content), COLOR)
    chunks = list(
        gemma_chat.create_chat_completion(
            ASK, response_format=_format(COLOR), temperature=0, max_tokens=30, stream=True
        )
    )
    assert "".join(c["choices"][0]["delta"].get("content", "") for c in chunks) == content
    assert chunks[-1]["choices"][0]["finish_reason"] == "stop"


def test_pool_and_async_validate_too(gemma_pool: LlamaPool) -> None:
    with pytest.raises(SchemaValidationError) as caught:
        gemma_pool.create_chat_completion(
            REPEAT_ASK, response_format=_format(REPEATS), temperature=0, max_tokens=60
        )
    _assert_repeats(caught.value)

    async def streamed() -> list[Any]:
        stream = await gemma_pool.create_chat_completion_async(
            REPEAT_ASK, response_format=_format(REPEATS), temperature=0, max_tokens=60, stream=True
        )
        return [chunk async for chunk in stream]

    with pytest.raises(SchemaValidationError) as caught:
        asyncio.run(streamed())
    _assert_repeats(caught.value)


def test_an_unsupported_schema_is_refused_before_the_pool_queues_it(gemma_pool: LlamaPool) -> None:
    before = gemma_pool.stats()
    with pytest.raises(UnsupportedSchemaError) as caught:
        gemma_pool.create_chat_completion(ASK, response_format=_format(NOT_SCHEMA), max_tokens=20)
    assert caught.value.keywords == ("#/properties/v/not",)
    with pytest.raises(UnsupportedSchemaError):
        gemma_pool.create_chat_completion(ASK, response_format=_format(NOT_SCHEMA), stream=True)
    after = gemma_pool.stats()
    assert (after.n_prompt_evaluated, after.n_generated, after.n_decode_calls) == (
        before.n_prompt_evaluated,
        before.n_generated,
        before.n_decode_calls,
    )


# -- what is checked, and when ---------------------------------------------------------------


def test_the_grammar_is_schema_to_grammars(gemma_chat: Llama) -> None:
    rendered = gemma_chat.render_chat(ASK, json_schema=COLOR)
    assert rendered.grammar is not None
    assert rendered.grammar.grammar == schema_to_grammar(COLOR)
    assert rendered.grammar.root == "root"


def test_invalid_schemas_are_refused_before_generating(tiny: Llama) -> None:
    reason = r"invalid JSON schema \(response_format\): 5.5 is not of type 'integer'"
    with pytest.raises(GrammarError, match=reason):
        tiny.create_chat_completion(ASK, response_format=_format({"type": "object", "minProperties": 5.5}))
    tool = {"type": "function", "function": {"name": "f", "parameters": {"type": "nope"}}}
    with pytest.raises(InvalidArgumentError, match=r"tools\[0\]\.function\.parameters"):
        tiny.create_chat_completion(ASK, tools=[tool])


def test_json_object_answers_must_be_objects() -> None:
    check = AnswerCheck.build({"type": "object"}, [])
    assert check is not None
    check.check({"role": "assistant", "content": '{"a": 1}'}, "stop")
    with pytest.raises(SchemaValidationError, match="is not of type 'object'"):
        check.check({"role": "assistant", "content": "[1]"}, "stop")
    with pytest.raises(SchemaValidationError, match="not JSON"):
        check.check({"role": "assistant", "content": '{"a": '}, "stop")
    check.check({"role": "assistant", "content": '{"a": '}, "length")  # cut: not judged


def test_tool_call_arguments_are_checked_against_their_tool() -> None:
    tools = [
        {
            "type": "function",
            "function": {
                "name": "get_weather",
                "parameters": {
                    "type": "object",
                    "properties": {"city": {"type": "string"}},
                    "required": ["city"],
                },
            },
        }
    ]
    check = AnswerCheck.build(None, tools)
    assert check is not None

    def call(name: str, arguments: str) -> Any:
        return {
            "role": "assistant",
            "content": None,
            "tool_calls": [
                {"id": "1", "type": "function", "function": {"name": name, "arguments": arguments}}
            ],
        }

    check.check(call("get_weather", '{"city": "Paris"}'), "tool_calls")
    with pytest.raises(SchemaValidationError, match="'city' is a required property"):
        check.check(call("get_weather", "{}"), "tool_calls")
    with pytest.raises(SchemaValidationError, match="no tool of that name"):
        check.check(call("get_time", "{}"), "tool_calls")


def test_the_draft_is_the_schemas_own() -> None:
    draft7 = {"$schema": "http://json-schema.org/draft-07/schema#", "items": [{"type": "integer"}]}
    assert type(schema_validator(draft7)) is jsonschema.Draft7Validator
    assert type(schema_validator({"type": "integer"})) is jsonschema.Draft202012Validator
    # Formats are asserted, not annotations only.
    assert not schema_validator({"format": "ipv4"}).is_valid("300.1.1.1")


# -- the server --------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def server(default_model_path: Path) -> Iterator[Server]:
    settings = ServerSettings(
        model=default_model_path, alias="gemma", parallel=1, ctx_size=512, n_threads=2, api_keys=[KEY]
    )
    with serve(settings) as client:
        yield client


def test_server_refuses_an_unsupported_schema_with_400(server: Server) -> None:
    body = {"model": "gemma", "messages": ASK, "response_format": _format(NOT_SCHEMA), "max_tokens": 10}
    for stream in (False, True):
        reply = server.http.post("/v1/chat/completions", json={**body, "stream": stream})
        assert reply.status_code == 400
        error = reply.json()["error"]
        assert (error["type"], error["param"], error["code"]) == (
            "invalid_request_error",
            "response_format",
            "unsupported_schema",
        )
        assert "#/properties/v/not" in error["message"]
    responses = {
        "model": "gemma",
        "input": "Give a value.",
        "text": {"format": {"type": "json_schema", "name": "v", "schema": NOT_SCHEMA, "strict": True}},
    }
    reply = server.http.post("/v1/responses", json=responses)
    assert reply.status_code == 400
    assert (reply.json()["error"]["param"], reply.json()["error"]["code"]) == (
        "text.format",
        "unsupported_schema",
    )


def test_server_answers_an_invalid_answer_with_422_or_an_error_event(server: Server) -> None:
    body = {
        "model": "gemma",
        "messages": REPEAT_ASK,
        "response_format": _format(PIGEONHOLE),
        "max_tokens": 60,
        "temperature": 0,
    }
    reply = server.http.post("/v1/chat/completions", json=body)
    assert reply.status_code == 422
    error = reply.json()["error"]
    assert (error["type"], error["param"], error["code"]) == (
        "invalid_request_error",
        None,
        "schema_validation_failed",
    )
    assert "non-unique elements" in error["message"]
    with server.http.stream("POST", "/v1/chat/completions", json={**body, "stream": True}) as streamed:
        assert streamed.status_code == 200
        received = list(events(streamed.iter_lines()))
    assert received[-1]["error"]["code"] == "schema_validation_failed"
    assert all(e["choices"][0]["finish_reason"] is None for e in received[:-1] if e.get("choices"))


def test_a_thinking_template_keeps_its_reasoning_ahead_of_the_json(
    tiny_model_path: Path, llama_source_dir: Path
) -> None:
    template = (llama_source_dir / "models" / "templates" / "Qwen-Qwen3-0.6B.jinja").read_text()
    schema_gbnf = schema_to_grammar(COLOR)
    with Llama(tiny_model_path, n_ctx=256, chat_template=template) as llm:
        thinking = llm.render_chat(ASK, json_schema=COLOR).grammar
        assert thinking is not None  # LlamaGrammar checked it with llama.cpp's parser
        assert thinking.root == "x-llama-cpp-answer"
        assert thinking.grammar.startswith(schema_gbnf.rstrip("\n") + "\n")
        rule = thinking.grammar.splitlines()[-1]
        assert rule.startswith('x-llama-cpp-answer ::= ( [ \\t\\n]* "<think>" ( [^<] | "<" [^/] |')
        assert rule.endswith('"</think>" [ \\t\\n]* )? root')
        plain = llm.render_chat(ASK, json_schema=COLOR, chat_template_kwargs={"enable_thinking": False})
        assert plain.grammar is not None
        assert (plain.grammar.grammar, plain.grammar.root) == (schema_gbnf, "root")
