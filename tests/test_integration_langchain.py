"""LangChain's llama.cpp classes (langchain-community's ``LlamaCpp`` and ``ChatLlamaCpp``, the
real PyPI package) run unchanged on this package.

Exact text comes from the tiny successor model (greedy "a" -> "bcdef..."); tool calls and
structured output run on the default model and are checked for structure only: a forced
call is grammar-constrained here, so it always parses, whatever a 270M model makes of it.
"""

from __future__ import annotations

import warnings
from collections.abc import Iterator
from pathlib import Path
from typing import Any, Literal, TypeVar

import pytest
from langchain_community.chat_models import ChatLlamaCpp
from langchain_community.llms import LlamaCpp
from langchain_core.messages import AIMessage, AIMessageChunk
from pydantic import BaseModel, Field

from llama_cpp import Llama

# Keywords LangChain passes to Llama() on every construction that llama-cpp-python accepts
# and this package does not use: each gives one "no effect here" warning.
LANGCHAIN_IGNORED = ["n_parts", "f16_kv", "logits_all", "last_n_tokens_size", "lora_base"]
IGNORED_WARNINGS = sorted(
    f"Llama() ignores the keyword argument {name!r} (no effect here)" for name in LANGCHAIN_IGNORED
)

# Renders the messages' text alone, so that the tiny model continues the user's letters.
CONTENT_ONLY_TEMPLATE = "{% for message in messages %}{{ message['content'] }}{% endfor %}"


class GetWeather(BaseModel):
    """Get the current weather in a city."""

    city: str = Field(max_length=20, description="The city")
    unit: Literal["celsius", "fahrenheit"]


class Person(BaseModel):
    """A person."""

    name: str = Field(max_length=20)
    age: int


T = TypeVar("T")


def _build(factory: type[T], **kwargs: Any) -> T:
    """``factory(**kwargs)``, checking that the only warnings are the expected ones."""
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        made = factory(**kwargs)
    assert sorted(str(w.message) for w in caught) == IGNORED_WARNINGS
    return made


@pytest.fixture
def tiny_llm(tiny_model_path: Path) -> Iterator[LlamaCpp]:
    llm = _build(
        LlamaCpp,
        model_path=str(tiny_model_path),
        temperature=0.0,
        max_tokens=5,
        streaming=False,
        verbose=False,
    )
    yield llm
    llm.client.close()


@pytest.fixture
def tiny_chat(tiny_model_path: Path) -> Iterator[ChatLlamaCpp]:
    chat = _build(
        ChatLlamaCpp,
        model_path=str(tiny_model_path),
        temperature=0.0,
        max_tokens=5,
        verbose=False,
        model_kwargs={"chat_template": CONTENT_ONLY_TEMPLATE},
    )
    yield chat
    chat.client.close()


@pytest.fixture(scope="module")
def gemma_chat(default_model_path: Path) -> Iterator[ChatLlamaCpp]:
    chat = _build(
        ChatLlamaCpp,
        model_path=str(default_model_path),
        temperature=0.0,
        max_tokens=96,
        n_ctx=2048,
        n_batch=512,
        n_threads=2,
        # LangChain's defaults (10000.0, 1.0) would override Gemma 3's RoPE base; 0: the model's.
        rope_freq_base=0.0,
        rope_freq_scale=0.0,
        verbose=False,
    )
    assert (chat.client.context_params.rope_freq_base, chat.client.context_params.rope_freq_scale) == (
        0.0,
        0.0,
    )
    yield chat
    chat.client.close()


def test_llamacpp_holds_our_llama(tiny_llm: LlamaCpp) -> None:
    assert isinstance(tiny_llm.client, Llama)
    assert tiny_llm.client.n_ctx() == 512  # LangChain's default n_ctx


def test_llamacpp_invoke(tiny_llm: LlamaCpp) -> None:
    assert tiny_llm.invoke("a") == "bcdef"
    assert tiny_llm.invoke("a", stop=["e"]) == "bcd"


def test_llamacpp_invoke_through_its_stream(tiny_llm: LlamaCpp) -> None:
    tiny_llm.streaming = True  # LangChain's default: _call collects _stream's chunks
    assert tiny_llm.invoke("a") == "bcdef"


def test_llamacpp_stream(tiny_llm: LlamaCpp) -> None:
    # One chunk per token, then the chunk that carries finish_reason (no text).
    assert list(tiny_llm.stream("a")) == ["b", "c", "d", "e", "f", ""]


@pytest.mark.parametrize("source", ["grammar", "grammar_path"])
def test_llamacpp_grammar(tiny_model_path: Path, tmp_path: Path, source: str) -> None:
    grammar = 'root ::= "x" "y"'
    if source == "grammar_path":
        (tmp_path / "xy.gbnf").write_text(grammar)
        grammar_kwargs: dict[str, Any] = {"grammar_path": str(tmp_path / "xy.gbnf")}
    else:
        grammar_kwargs = {"grammar": grammar}
    llm = _build(
        LlamaCpp,
        model_path=str(tiny_model_path),
        temperature=0.0,
        max_tokens=5,
        streaming=False,
        verbose=False,
        **grammar_kwargs,
    )
    with llm.client:
        assert llm.invoke("a") == "xy"


def test_llamacpp_counts_tokens(tiny_llm: LlamaCpp) -> None:
    assert tiny_llm.get_num_tokens("abc") == 4  # BOS and one token per byte


def test_chat_invoke(tiny_chat: ChatLlamaCpp) -> None:
    message = tiny_chat.invoke("a")  # streamed by default, then put together
    assert isinstance(message, AIMessage)
    assert message.content == "bcdef"
    assert message.response_metadata["finish_reason"] == "length"
    tiny_chat.streaming = False
    message = tiny_chat.invoke("a")
    assert message.content == "bcdef"
    assert message.response_metadata["finish_reason"] == "length"
    assert message.usage_metadata is None  # LangChain keeps usage in llm_output only


def test_chat_stream(tiny_chat: ChatLlamaCpp) -> None:
    chunks = list(tiny_chat.stream("a"))
    assert all(isinstance(c, AIMessageChunk) for c in chunks)
    # Our chunks (the role delta, a delta per token, the finish_reason delta), then the empty
    # chunk with which LangChain itself marks the end.
    assert [c.content for c in chunks] == ["", "b", "c", "d", "e", "f", "", ""]
    assert chunks[-2].response_metadata == {"finish_reason": "length"}
    assert chunks[-1].chunk_position == "last"


def _check_weather_call(message: AIMessage) -> None:
    assert isinstance(message, AIMessage)
    assert message.invalid_tool_calls == []
    assert [call["name"] for call in message.tool_calls] == ["GetWeather"]
    GetWeather.model_validate(message.tool_calls[0]["args"])
    assert message.response_metadata["finish_reason"] == "tool_calls"


@pytest.mark.slow
@pytest.mark.parametrize(
    "tool_choice",
    [{"type": "function", "function": {"name": "GetWeather"}}, "GetWeather", True],
    ids=["function", "name", "true"],
)
def test_chat_bind_tools_forced_call(
    gemma_chat: ChatLlamaCpp, tool_choice: dict[str, Any] | str | bool
) -> None:
    bound = gemma_chat.bind_tools([GetWeather], tool_choice=tool_choice)
    _check_weather_call(bound.invoke("What is the weather like in Paris?"))


@pytest.mark.slow
def test_chat_bind_tools_auto_streams(gemma_chat: ChatLlamaCpp) -> None:
    # Without tool_choice, ChatLlamaCpp streams with the tools offered (llama.cpp's "auto").
    bound = gemma_chat.bind_tools([GetWeather])
    message = bound.invoke("Say hello.")
    assert isinstance(message, AIMessage)
    assert message.invalid_tool_calls == []
    assert message.response_metadata["finish_reason"] in ("stop", "tool_calls")
    for call in message.tool_calls:
        assert call["name"] == "GetWeather"
        GetWeather.model_validate(call["args"])


@pytest.mark.slow
def test_chat_structured_output_pydantic(gemma_chat: ChatLlamaCpp) -> None:
    structured = gemma_chat.with_structured_output(Person)
    person = structured.invoke("Describe Ada Lovelace.")
    assert isinstance(person, Person)


@pytest.mark.slow
def test_chat_structured_output_json_schema(gemma_chat: ChatLlamaCpp) -> None:
    schema = {
        "title": "person",
        "description": "A person.",
        "type": "object",
        "properties": {"name": {"type": "string", "maxLength": 20}, "age": {"type": "integer"}},
        "required": ["name", "age"],
    }
    structured = gemma_chat.with_structured_output(schema, include_raw=True)
    result = structured.invoke("Describe Ada Lovelace.")
    assert isinstance(result, dict)
    assert result["parsing_error"] is None
    parsed = result["parsed"]
    assert isinstance(parsed, dict)
    assert sorted(parsed) == ["age", "name"]
    assert isinstance(parsed["name"], str)
    assert len(parsed["name"]) <= 20
    assert isinstance(parsed["age"], int)
    assert [call["name"] for call in result["raw"].tool_calls] == ["person"]
