"""Tool calls end to end on the default model, whose GGUF has no chat template: the generic JSON
format (grammar-constrained, so a forced call always parses). llama.cpp's per-family formats
are rendered here with a Qwen3 template on Gemma's vocabulary; their parsers are tested on
golden outputs in test_chat_families.py (Gemma's weights do not write Qwen's tool calls)."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import jsonschema
import pytest

from llama_cpp import InvalidArgumentError, Llama

WEATHER: dict[str, Any] = {
    "type": "function",
    "function": {
        "name": "get_weather",
        "description": "Get the current weather in a city.",
        "parameters": {
            "type": "object",
            "properties": {
                "city": {"type": "string", "maxLength": 30},
                "unit": {"enum": ["celsius", "fahrenheit"]},
            },
            "required": ["city", "unit"],
            "additionalProperties": False,
        },
    },
}
TIME: dict[str, Any] = {
    "type": "function",
    "function": {
        "name": "get_time",
        "description": "Get the time in a time zone.",
        "parameters": {
            "type": "object",
            "properties": {"zone": {"type": "string", "maxLength": 30}},
            "required": ["zone"],
        },
    },
}
ASK = [{"role": "user", "content": "What is the weather in Paris?"}]


@pytest.fixture(scope="module")
def gemma(default_model_path: Path) -> Any:
    with Llama(default_model_path, n_ctx=2048, n_threads=2) as llm:
        yield llm


@pytest.fixture(scope="module")
def qwen_format(default_model_path: Path, llama_source_dir: Path) -> Any:
    template = (llama_source_dir / "models" / "templates" / "Qwen-Qwen3-0.6B.jinja").read_text()
    with Llama(default_model_path, n_ctx=2048, n_threads=2, chat_template=template) as llm:
        yield llm


def _check_call(call: Any, tool: dict[str, Any]) -> None:
    assert call["type"] == "function"
    assert call["id"].startswith("call_")
    assert call["function"]["name"] == tool["function"]["name"]
    jsonschema.validate(json.loads(call["function"]["arguments"]), tool["function"]["parameters"])


def _streamed_calls(chunks: list[Any]) -> list[dict[str, Any]]:
    """Tool calls put back together from their streamed deltas, as an OpenAI client does."""
    calls: dict[int, dict[str, Any]] = {}
    for chunk in chunks:
        for delta in chunk["choices"][0]["delta"].get("tool_calls", []):
            call = calls.setdefault(delta["index"], {"id": "", "type": "function", "function": {}})
            call["id"] = delta.get("id", call["id"])
            function = delta.get("function", {})
            if "name" in function:
                call["function"]["name"] = function["name"]
            call["function"]["arguments"] = call["function"].get("arguments", "") + function.get(
                "arguments", ""
            )
    return [calls[i] for i in sorted(calls)]


@pytest.mark.slow
@pytest.mark.parametrize("fixture", ["gemma"])
def test_a_forced_tool_call_always_parses(request: pytest.FixtureRequest, fixture: str) -> None:
    llm: Llama = request.getfixturevalue(fixture)
    for seed in (1, 2, 3):
        response = llm.create_chat_completion(
            ASK, tools=[WEATHER, TIME], tool_choice="required", temperature=0.9, seed=seed, max_tokens=80
        )
        choice = response["choices"][0]
        assert choice["finish_reason"] == "tool_calls"
        assert choice["message"]["content"] is None
        calls = choice["message"]["tool_calls"]
        assert len(calls) == 1
        _check_call(calls[0], WEATHER if calls[0]["function"]["name"] == "get_weather" else TIME)


@pytest.mark.slow
@pytest.mark.parametrize("fixture", ["gemma"])
@pytest.mark.parametrize(
    "choice",
    [{"type": "function", "function": {"name": "get_time"}}, "get_time"],
    ids=["function", "bare-name"],  # LangChain's bind_tools(tool_choice="name") sends the name alone
)
def test_a_named_function_is_the_one_called(
    request: pytest.FixtureRequest, fixture: str, choice: str | dict[str, Any]
) -> None:
    llm: Llama = request.getfixturevalue(fixture)
    response = llm.create_chat_completion(ASK, tools=[WEATHER, TIME], tool_choice=choice, max_tokens=80)
    calls = response["choices"][0]["message"]["tool_calls"]
    assert [c["function"]["name"] for c in calls] == ["get_time"]
    _check_call(calls[0], TIME)


@pytest.mark.slow
@pytest.mark.parametrize("fixture", ["gemma"])
def test_streamed_tool_calls_match_the_whole_answer(request: pytest.FixtureRequest, fixture: str) -> None:
    llm: Llama = request.getfixturevalue(fixture)
    kwargs: dict[str, Any] = {
        "tools": [WEATHER],
        "tool_choice": "required",
        "temperature": 0,
        "max_tokens": 80,
    }
    llm.reset()
    whole = llm.create_chat_completion(ASK, **kwargs)["choices"][0]["message"]["tool_calls"]
    llm.reset()
    chunks = list(llm.create_chat_completion(ASK, stream=True, **kwargs))
    assert chunks[0]["choices"][0]["delta"] == {"role": "assistant"}
    assert chunks[-1]["choices"][0]["finish_reason"] == "tool_calls"
    streamed = _streamed_calls(chunks)
    assert [c["function"] for c in streamed] == [c["function"] for c in whole]
    _check_call(streamed[0], WEATHER)


@pytest.mark.slow
def test_tool_choice_none_answers_in_text(gemma: Llama) -> None:
    response = gemma.create_chat_completion(ASK, tools=[WEATHER], tool_choice="none", max_tokens=8)
    message = response["choices"][0]["message"]
    assert "tool_calls" not in message
    assert isinstance(message["content"], str)
    assert response["choices"][0]["finish_reason"] in ("stop", "length")


@pytest.mark.slow
def test_a_conversation_with_tool_results_continues(gemma: Llama) -> None:
    first = gemma.create_chat_completion(ASK, tools=[WEATHER], tool_choice="required", max_tokens=80)
    call = first["choices"][0]["message"]["tool_calls"][0]
    messages: list[dict[str, Any]] = [
        *ASK,
        {"role": "assistant", "content": None, "tool_calls": [call]},
        {"role": "tool", "tool_call_id": call["id"], "content": '{"temperature": 21}'},
        {"role": "user", "content": "Thanks. Is that warm?"},
    ]
    rendered = gemma.chat_formatter()
    assert rendered is not None  # no template in the GGUF: llama-cpp-python's llama-2 format
    answer = gemma.create_chat_completion(messages, tools=[WEATHER], tool_choice="auto", max_tokens=24)
    message = answer["choices"][0]["message"]
    # "auto" lets the model answer in text or call again; either way the answer parses.
    assert (
        isinstance(message["content"], str) or message["tool_calls"][0]["function"]["name"] == "get_weather"
    )


def test_legacy_functions_are_tools(gemma: Llama) -> None:
    response = gemma.create_chat_completion(
        ASK,
        functions=[WEATHER["function"]],
        function_call={"name": "get_weather"},
        max_tokens=80,
    )
    calls = response["choices"][0]["message"]["tool_calls"]
    _check_call(calls[0], WEATHER)


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        ({"tools": [{"type": "function"}]}, r"tools\[0\] must be"),
        ({"tools": [{"type": "function", "function": {"description": "x"}}]}, "needs a name"),
        ({"tools": [WEATHER], "tool_choice": "sometimes"}, "tool_choice must be"),
        ({"tools": [WEATHER], "tool_choice": {"type": "function", "function": {"name": "nope"}}}, "'nope'"),
        ({"tool_choice": "required"}, "needs tools"),
        ({"tools": [WEATHER], "functions": [WEATHER["function"]]}, "not both"),
        (
            {"tools": [WEATHER], "tool_choice": "required", "response_format": {"type": "json_object"}},
            "tools",
        ),
    ],
)
def test_bad_tool_requests_are_typed(gemma: Llama, kwargs: dict[str, Any], message: str) -> None:
    with pytest.raises(InvalidArgumentError, match=message):
        gemma.create_chat_completion(ASK, max_tokens=4, **kwargs)


def test_bad_messages_for_a_template_are_typed(qwen_format: Llama) -> None:
    with pytest.raises(InvalidArgumentError, match="assistant message needs content or tool_calls"):
        qwen_format.create_chat_completion([{"role": "assistant"}], max_tokens=4)
    with pytest.raises(InvalidArgumentError, match="reasoning_format"):
        qwen_format.create_chat_completion(ASK, max_tokens=4, reasoning_format="sideways")


@pytest.mark.slow
def test_thinking_is_returned_apart_and_can_be_turned_off(qwen_format: Llama) -> None:
    off = qwen_format.render_chat(ASK, chat_template_kwargs={"enable_thinking": False})
    assert off.prompt.endswith("<|im_start|>assistant\n<think>\n\n</think>\n\n")
    on = qwen_format.render_chat(ASK)
    assert on.prompt.endswith("<|im_start|>assistant\n")
    assert on.supports_thinking
    # The grammar of a forced call under a real tool format: the call must come.
    required = qwen_format.render_chat(ASK, tools=[WEATHER], tool_choice="required")
    assert required.grammar is not None
    assert not required.grammar.lazy
    assert "<tool_call>" in required.grammar.grammar
    auto = qwen_format.render_chat(ASK, tools=[WEATHER], tool_choice="auto")
    assert auto.grammar is not None
    assert auto.grammar.lazy
    assert auto.grammar.trigger_patterns == ("<tool_call>\n",)
