"""JSON schema to grammar (llama.cpp's converter) and response_format on the default model."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import jsonschema
import pytest

from llama_cpp import GrammarError, InvalidArgumentError, Llama, LlamaGrammar, UnsupportedSchemaError

PERSON: dict[str, Any] = {
    "$defs": {
        "address": {
            "type": "object",
            "properties": {
                "city": {"type": "string", "maxLength": 20},
                "zip": {"type": "string", "pattern": "^[0-9]{5}$"},
            },
            "required": ["city", "zip"],
            "additionalProperties": False,
        }
    },
    "type": "object",
    "properties": {
        "name": {"type": "string", "minLength": 1, "maxLength": 20},
        "age": {"type": "integer", "minimum": 0, "maximum": 120},
        "role": {"enum": ["admin", "user", "guest"]},
        "tags": {"type": "array", "items": {"type": "string", "maxLength": 10}, "minItems": 1, "maxItems": 3},
        "address": {"$ref": "#/$defs/address"},
        "nickname": {"anyOf": [{"type": "string", "maxLength": 10}, {"type": "null"}]},
    },
    "required": ["name", "age", "role", "tags", "address"],
    "additionalProperties": False,
}
MESSAGES = [{"role": "user", "content": "Describe a person as JSON."}]


@pytest.fixture(scope="module")
def chat_model(default_model_path: Path) -> Any:
    with Llama(default_model_path, n_ctx=2048, n_threads=2) as llm:
        yield llm


@pytest.mark.slow
@pytest.mark.parametrize("stream", [False, True])
def test_openai_json_schema_output_validates(chat_model: Llama, stream: bool) -> None:
    response_format = {
        "type": "json_schema",
        "json_schema": {"name": "person", "schema": PERSON, "strict": True},
    }
    for seed in (1, 2):
        if stream:
            chunks = chat_model.create_chat_completion(
                MESSAGES,
                response_format=response_format,
                temperature=0.8,
                seed=seed,
                max_tokens=300,
                stream=True,
            )
            text = "".join(c["choices"][0]["delta"].get("content", "") for c in chunks)
        else:
            response = chat_model.create_chat_completion(
                MESSAGES, response_format=response_format, temperature=0.8, seed=seed, max_tokens=300
            )
            assert response["choices"][0]["finish_reason"] == "stop"
            text = response["choices"][0]["message"]["content"] or ""
        jsonschema.validate(json.loads(text), PERSON)


@pytest.mark.slow
def test_llama_cpp_python_json_object_with_schema_and_consecutive_requests(chat_model: Llama) -> None:
    small = {"type": "object", "properties": {"ok": {"type": "boolean"}}, "required": ["ok"]}
    for schema in (PERSON, small, PERSON):  # each request gets a fresh grammar
        response = chat_model.create_chat_completion(
            MESSAGES,
            response_format={"type": "json_object", "schema": schema},
            temperature=0.7,
            seed=4,
            max_tokens=300,
        )
        jsonschema.validate(json.loads(response["choices"][0]["message"]["content"] or ""), schema)
    # Without a schema any object is allowed, so the model may ramble on to max_tokens; with
    # this seed it closes the object.
    plain = chat_model.create_chat_completion(
        MESSAGES, response_format={"type": "json_object"}, temperature=0.7, seed=3, max_tokens=600
    )
    assert plain["choices"][0]["finish_reason"] == "stop"
    assert isinstance(json.loads(plain["choices"][0]["message"]["content"] or ""), dict)


def test_from_json_schema_builds_llama_cpp_grammar() -> None:
    grammar = LlamaGrammar.from_json_schema(
        {"type": "object", "properties": {"n": {"type": "integer"}}, "required": ["n"]}
    )
    assert "root ::=" in grammar.grammar
    assert "integer" in grammar.grammar


@pytest.mark.parametrize(
    ("schema", "reason"),
    [('{"type": 5}', "#/type: 5 is not valid"), ("{not json", "not JSON")],
)
def test_invalid_schemas_raise(schema: str, reason: str) -> None:
    with pytest.raises(GrammarError, match=f"(?s)invalid JSON schema.*{reason}"):
        LlamaGrammar.from_json_schema(schema)


def test_bad_response_formats(tiny: Llama) -> None:
    with pytest.raises(InvalidArgumentError, match="response_format type must be"):
        tiny.create_chat_completion(MESSAGES, response_format={"type": "yaml"})
    with pytest.raises(InvalidArgumentError, match="needs"):
        tiny.create_chat_completion(MESSAGES, response_format={"type": "json_schema"})
    with pytest.raises(InvalidArgumentError, match="not both"):
        tiny.create_chat_completion(
            MESSAGES,
            response_format={"type": "json_object"},
            grammar=LlamaGrammar.from_string('root ::= "x"'),
        )


def test_tiny_model_follows_a_schema(tiny: Llama) -> None:
    schema = {"type": "object", "properties": {"k": {"enum": ["abc", "xyz"]}}, "required": ["k"]}
    response = tiny.create_chat_completion(
        [{"role": "user", "content": "a"}],
        response_format={"type": "json_object", "schema": schema},
        max_tokens=40,
    )
    jsonschema.validate(json.loads(response["choices"][0]["message"]["content"] or ""), schema)


def test_keywords_the_converter_ignores_are_enforced_or_refused() -> None:
    schema = {
        "type": "object",
        "properties": {
            "ratio": {"type": "number", "minimum": 0, "maximum": 1},
            "tags": {"type": "array", "items": {"type": "string"}, "uniqueItems": True},
            "code": {"type": "string", "pattern": "^[A-Z]+$", "maxLength": 3},
            "choice": {"enum": [{"not": "a schema, just data"}]},
            "count": {"type": "integer", "minimum": 0, "maximum": 9},
        },
    }
    LlamaGrammar.from_json_schema(schema)  # enforced (uniqueItems of strings: by validation)
    with pytest.raises(UnsupportedSchemaError) as caught:
        LlamaGrammar.from_json_schema({"properties": {"a": {"not": {"type": "string"}}}})
    assert caught.value.keywords == ("#/properties/a/not",)
