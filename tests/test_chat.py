"""create_chat_completion: templates (Jinja, sandboxed), built-in formats, the chat dicts."""

from __future__ import annotations

import asyncio
import json
from pathlib import Path
from typing import Any

import pytest

from conftest import FrontEnd, TokenGate
from llama_cpp import InvalidArgumentError, Llama
from llama_cpp.chat_formats import format_chatml, format_llama2
from llama_cpp.testing import EOS_ID

# Renders only the contents after BOS: the tiny model then continues the last character.
CONCAT = "{{ bos_token }}{% for m in messages %}{{ m['content'] }}{% endfor %}"
USER_XY = [{"role": "user", "content": "xy"}]


@pytest.fixture
def chat(tiny_model_path: Path) -> Llama:
    return Llama(tiny_model_path, n_ctx=256, chat_template=CONCAT)


def test_a_jinja_template_renders_the_prompt(chat: Llama) -> None:
    response = chat.create_chat_completion(USER_XY, max_tokens=3, temperature=0)
    assert response["object"] == "chat.completion"
    assert response["id"].startswith("chatcmpl-")
    assert response["choices"][0]["message"] == {"role": "assistant", "content": "zab"}
    assert response["choices"][0]["finish_reason"] == "length"
    assert response["usage"]["prompt_tokens"] == 3  # <s> parsed as the BOS token, no second BOS
    assert chat.chat_templates().source() == CONCAT


def test_generation_ends_at_the_end_of_turn(chat: Llama) -> None:
    response = chat.create_chat_completion([{"role": "user", "content": "B"}], max_tokens=20, temperature=0)
    assert response["choices"][0]["message"]["content"] == "!"
    assert response["choices"][0]["finish_reason"] == "stop"


def test_streamed_chunks(chat: Llama) -> None:
    chunks = list(chat.create_chat_completion(USER_XY, max_tokens=3, temperature=0, stream=True))
    assert all(c["object"] == "chat.completion.chunk" for c in chunks)
    assert chunks[0]["choices"][0]["delta"] == {"role": "assistant"}
    assert "".join(c["choices"][0]["delta"].get("content", "") for c in chunks) == "zab"
    assert chunks[-1]["choices"][0]["delta"] == {}
    assert chunks[-1]["choices"][0]["finish_reason"] == "length"
    assert len({c["id"] for c in chunks}) == 1


def test_async_twin_agrees(chat: Llama) -> None:
    sync = chat.create_chat_completion(USER_XY, max_tokens=3, temperature=0)
    response = asyncio.run(chat.create_chat_completion_async(USER_XY, max_tokens=3, temperature=0))
    assert isinstance(response, dict)
    assert response["choices"] == sync["choices"]


def test_chat_logprobs(chat: Llama) -> None:
    response = chat.create_chat_completion(
        USER_XY, max_tokens=2, temperature=0, logprobs=True, top_logprobs=2
    )
    logprobs = response["choices"][0]["logprobs"]
    assert logprobs is not None
    assert logprobs["content"] is not None
    assert [entry["token"] for entry in logprobs["content"]] == ["z", "a"]
    assert all(entry["logprob"] is not None and entry["logprob"] > -0.01 for entry in logprobs["content"])


def test_template_errors_are_typed(tiny_model_path: Path) -> None:
    rejecting = "{{ raise_exception('roles must alternate') }}"
    with (
        Llama(tiny_model_path, n_ctx=256, chat_template=rejecting) as llm,
        pytest.raises(InvalidArgumentError, match="roles must alternate"),
    ):
        llm.create_chat_completion(USER_XY)
    with (
        Llama(tiny_model_path, n_ctx=256, chat_template="{% for %}") as llm,
        pytest.raises(InvalidArgumentError, match="invalid chat template"),
    ):
        llm.create_chat_completion(USER_XY)


def test_templates_cannot_reach_python_objects(tiny_model_path: Path) -> None:
    # llama.cpp's Jinja engine has no Python objects to escape to.
    escape = "{{ ''.__class__.__mro__[1].__subclasses__() }}"
    with (
        Llama(tiny_model_path, n_ctx=256, chat_template=escape) as llm,
        pytest.raises(InvalidArgumentError, match="Callee is not a function"),
    ):
        llm.create_chat_completion(USER_XY)


@pytest.mark.parametrize(
    ("messages", "message"),
    [
        ([], "messages is empty"),
        ([{"content": "x"}], "must be a dict with a 'role'"),
        ([{"role": "x"}], "unknown role"),
    ],
)
def test_bad_messages(chat: Llama, messages: list[dict[str, str]], message: str) -> None:
    with pytest.raises(InvalidArgumentError, match=message):
        chat.create_chat_completion(messages)


def test_tools_on_a_template_without_tools_get_the_generic_json_format(tiny_model_path: Path) -> None:
    tool = {
        "type": "function",
        "function": {
            "name": "f",
            "parameters": {"type": "object", "properties": {"x": {"enum": ["a", "b"]}}, "required": ["x"]},
        },
    }
    with Llama(tiny_model_path, n_ctx=2048, chat_template=CONCAT) as llm:
        response = llm.create_chat_completion(USER_XY, tools=[tool], tool_choice="required", temperature=0)
    # The tiny model writes whatever the grammar leaves it: a call with valid arguments.
    calls = response["choices"][0]["message"]["tool_calls"]
    assert [c["function"]["name"] for c in calls] == ["f"]
    assert json.loads(calls[0]["function"]["arguments"])["x"] in ("a", "b")
    assert response["choices"][0]["finish_reason"] == "tool_calls"


def test_builtin_formats() -> None:
    messages = [
        {"role": "system", "content": "Be brief."},
        {"role": "user", "content": "Hi"},
        {"role": "assistant", "content": "Hello"},
        {"role": "user", "content": "Bye"},
    ]
    assert format_llama2(messages).prompt == (
        "[INST] <<SYS>>\nBe brief.\n<</SYS>> Hi [/INST]Hello </s><s>[INST]Bye  [/INST]"
    )
    chatml = format_chatml(messages)
    assert chatml.prompt == (
        "<|im_start|>system\nBe brief.<|im_end|>\n<|im_start|>user\nHi<|im_end|>\n"
        "<|im_start|>assistant\nHello<|im_end|>\n<|im_start|>user\nBye<|im_end|>\n<|im_start|>assistant\n"
    )
    assert chatml.stop == ["<|im_end|>"]


def test_chat_format_by_name(tiny_model_path: Path) -> None:
    with Llama(tiny_model_path, n_ctx=256, chat_format="chatml") as llm:
        assert llm.chat_formatter() is format_chatml
    with (
        Llama(tiny_model_path, n_ctx=256, chat_format="nope") as llm,
        pytest.raises(InvalidArgumentError, match="unknown chat_format 'nope'"),
    ):
        llm.create_chat_completion(USER_XY)


def test_chat_template_kwargs_reach_the_template(tiny_model_path: Path) -> None:
    template = "{{ bos_token }}{% if shout %}XY{% else %}xy{% endif %}"
    with Llama(tiny_model_path, n_ctx=256, chat_template=template) as llm:
        quiet = llm.create_chat_completion(USER_XY, max_tokens=2, temperature=0)
        loud = llm.create_chat_completion(
            USER_XY, max_tokens=2, temperature=0, chat_template_kwargs={"shout": True}
        )
    assert quiet["choices"][0]["message"]["content"] == "za"
    assert loud["choices"][0]["message"]["content"] != "za"  # the prompt ended in 'Y'


def test_an_unknown_keyword_is_a_type_error_on_both_front_ends(front: FrontEnd) -> None:
    # A misspelled sampling keyword must not pass as a template variable (the request would
    # run with default sampling); template variables go in chat_template_kwargs.
    with pytest.raises(TypeError, match=r"unexpected keyword arguments \['temprature', 'top_pp'\]"):
        front.create_chat_completion(USER_XY, temprature=0.0, top_pp=0.1)
    with pytest.raises(TypeError, match=r"unexpected keyword arguments \['logprob'\]"):
        front.create_completion("a", logprob=2)
    with pytest.raises(TypeError, match="echo"):
        front.create_chat_completion(USER_XY, echo=True)  # a completion keyword, not a chat one
    with pytest.raises(InvalidArgumentError, match="grammar must be a LlamaGrammar, got str"):
        front.create_chat_completion(USER_XY, grammar='root ::= "x"')
    with pytest.raises(InvalidArgumentError, match="grammar must be a LlamaGrammar, got str"):
        front.create_completion("a", grammar='root ::= "x"')


def test_malformed_tools_raise_a_typed_error(front: FrontEnd) -> None:
    with pytest.raises(InvalidArgumentError, match=r"tools\[0\] must be .* got 'f'"):
        front.create_chat_completion(USER_XY, tools=["f"])
    with pytest.raises(InvalidArgumentError, match="tools must be a list"):
        front.create_chat_completion(USER_XY, tools={"type": "function"})
    with pytest.raises(InvalidArgumentError, match=r"tools\[0\].function needs a name"):
        front.create_chat_completion(USER_XY, tools=[{"type": "function", "function": {}}])


@pytest.mark.timeout(60)
def test_cancelling_an_async_chat_stops_the_generation(tiny_model_path: Path) -> None:
    # The answer would fill the 32k context; it is held at its 3rd token until the task is
    # cancelled, so the cancellation always reaches a running generation.
    with Llama(tiny_model_path, n_ctx=32768, chat_template=CONCAT) as llm, TokenGate(at=3) as gate:

        async def main() -> None:
            task = asyncio.create_task(
                llm.create_chat_completion_async(
                    [{"role": "user", "content": "a"}],
                    max_tokens=None,
                    temperature=0,
                    logits_processor=gate.logits_processor,
                )
            )
            await gate.reached_async()
            task.cancel()
            with pytest.raises(asyncio.CancelledError):
                await task
            gate.open()

        asyncio.run(main())
        response = llm.create_chat_completion(USER_XY, max_tokens=2, temperature=0)
        assert response["choices"][0]["message"]["content"] == "za"
        # The C++ loop saw the flag at its next token: nothing was sampled after the cancel.
        assert gate.calls == 3


def test_stream_options_include_usage_on_both_front_ends(front: FrontEnd) -> None:
    options = {"include_usage": True}
    chunks = list(
        front.create_completion("a", max_tokens=3, temperature=0, stream=True, stream_options=options)
    )
    assert [c["choices"][0]["text"] for c in chunks[:-1]] == ["b", "c", "d", ""]
    assert all("usage" not in c for c in chunks[:-1])
    assert chunks[-1]["choices"] == []
    assert chunks[-1]["usage"] == {
        "prompt_tokens": 2,  # BOS a
        "completion_tokens": 3,
        "total_tokens": 5,
        "prompt_tokens_details": {"cached_tokens": 0},
    }
    chat = list(
        front.create_chat_completion(
            USER_XY, max_tokens=2, temperature=0, stream=True, stream_options=options
        )
    )
    assert chat[-1]["choices"] == []
    usage = chat[-1].get("usage")
    whole = front.create_chat_completion(USER_XY, max_tokens=2, temperature=0)["usage"]
    assert usage is not None
    assert (usage["prompt_tokens"], usage["completion_tokens"]) == (
        whole["prompt_tokens"],
        whole["completion_tokens"],
    )
    assert usage["prompt_tokens"] > 0
    assert all("usage" not in c for c in chat[:-1])
    with pytest.raises(InvalidArgumentError, match="stream_options must be a dict"):
        front.create_completion("a", stream=True, stream_options=True)


def test_chat_values_are_checked_on_every_rendering_path(front: FrontEnd) -> None:
    # The tiny model has no template: llama-cpp-python's Python "llama-2" format renders it,
    # which llama.cpp's template checks never see.
    bad: list[dict[str, Any]] = [
        {"reasoning_format": "bogus"},
        {"parallel_tool_calls": "yes"},
        {"chat_template_kwargs": {"enable_thinking": "no"}},
        {"response_format": "json_object"},
        {"tool_choice": 5},
        {"tfs_z": 0.5},
    ]
    for keywords in bad:
        with pytest.raises(InvalidArgumentError):
            front.create_chat_completion(USER_XY, max_tokens=1, **keywords)
    # llama-cpp-python passes tfs_z=1.0 (off) by default: accepted.
    front.create_completion("a", max_tokens=1, tfs_z=1.0)


def test_content_parts_are_text_on_every_rendering_path(front: FrontEnd) -> None:
    parts = [{"role": "user", "content": [{"type": "text", "text": "x"}, {"type": "text", "text": "y"}]}]
    joined = front.create_chat_completion(parts, max_tokens=3, temperature=0)
    plain = front.create_chat_completion(USER_XY, max_tokens=3, temperature=0)
    assert joined["choices"][0]["message"] == plain["choices"][0]["message"]
    assert joined["usage"]["prompt_tokens"] == plain["usage"]["prompt_tokens"]
    image = [{"role": "user", "content": [{"type": "image_url", "image_url": {"url": "data:,"}}]}]
    with pytest.raises(InvalidArgumentError, match="text only"):
        front.create_chat_completion(image, max_tokens=1)


def test_an_echoed_prompt_streams_even_when_nothing_is_generated(front: FrontEnd) -> None:
    # End of generation as the first token: no generated piece, the prompt is still echoed.
    keywords: dict[str, Any] = {
        "echo": True,
        "max_tokens": 5,
        "temperature": 0,
        "logit_bias": {EOS_ID: 1000.0},
    }
    whole = front.create_completion("AB", **keywords)["choices"][0]["text"]
    streamed = "".join(
        c["choices"][0]["text"] for c in front.create_completion("AB", stream=True, **keywords)
    )
    assert whole == streamed == "AB"
