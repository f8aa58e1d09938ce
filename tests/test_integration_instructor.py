"""instructor, unchanged, over our Llama: its documented llama-cpp-python recipe
(``instructor.patch(create=llm.create_chat_completion_openai_v1, mode=Mode.JSON_SCHEMA)``),
and the ``openai`` types that ``create_chat_completion_openai_v1`` returns."""

from __future__ import annotations

import sys
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import instructor
import pytest
from openai.types.chat import ChatCompletion, ChatCompletionChunk
from pydantic import BaseModel, Field

from llama_cpp import InvalidArgumentError, Llama

# Renders only the contents after BOS: the tiny model then continues the last character.
CONCAT = "{{ bos_token }}{% for m in messages %}{{ m['content'] }}{% endfor %}"
EXTRACT = [{"role": "user", "content": "Extract `Jason is 30 years old`"}]


class UserDetail(BaseModel):
    name: str = Field(max_length=8)
    age: int


@pytest.fixture
def tiny_chat(tiny_model_path: Path) -> Iterator[Llama]:
    with Llama(tiny_model_path, n_ctx=1024, verbose=False) as llm:
        yield llm


def test_openai_v1_returns_openai_chat_completion(tiny_model_path: Path) -> None:
    with Llama(tiny_model_path, n_ctx=256, chat_template=CONCAT) as llm:
        response = llm.create_chat_completion_openai_v1(
            [{"role": "user", "content": "xy"}], max_tokens=3, temperature=0
        )
    assert isinstance(response, ChatCompletion)
    assert response.object == "chat.completion"
    assert response.choices[0].message.role == "assistant"
    assert response.choices[0].message.content == "zab"
    assert response.choices[0].finish_reason == "length"
    assert response.usage is not None
    assert (response.usage.prompt_tokens, response.usage.completion_tokens) == (3, 3)


def test_openai_v1_streams_openai_chunks(tiny_model_path: Path) -> None:
    with Llama(tiny_model_path, n_ctx=256, chat_template=CONCAT) as llm:
        chunks = list(
            llm.create_chat_completion_openai_v1(
                messages=[{"role": "user", "content": "xy"}], max_tokens=3, temperature=0, stream=True
            )
        )
    assert all(isinstance(chunk, ChatCompletionChunk) for chunk in chunks)
    assert chunks[0].choices[0].delta.role == "assistant"
    assert "".join(chunk.choices[0].delta.content or "" for chunk in chunks) == "zab"
    assert [chunk.choices[0].finish_reason for chunk in chunks][-1] == "length"


def test_leaving_an_openai_v1_stream_early_frees_the_model(tiny_model_path: Path) -> None:
    with Llama(tiny_model_path, n_ctx=256, chat_template=CONCAT) as llm:
        stream = llm.create_chat_completion_openai_v1(
            messages=[{"role": "user", "content": "xy"}], max_tokens=50, temperature=0, stream=True
        )
        next(stream)
        stream.close()  # type: ignore[attr-defined]
        # The context is free again at once: the next call does not wait for the stream.
        again = llm.create_chat_completion_openai_v1([{"role": "user", "content": "xy"}], max_tokens=3)
        assert isinstance(again, ChatCompletion)


def test_openai_v1_rejects_a_stream_flag_that_is_not_a_bool(tiny_chat: Llama) -> None:
    with pytest.raises(InvalidArgumentError, match=r"^stream must be a bool, got 'yes'$"):
        tiny_chat.create_chat_completion_openai_v1(EXTRACT, stream="yes")  # type: ignore[call-overload]


def test_openai_v1_without_openai_raises_import_error(
    tiny_chat: Llama, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setitem(sys.modules, "openai.types.chat", None)
    with pytest.raises(ImportError, match=r"needs the openai package: pip install openai$"):
        tiny_chat.create_chat_completion_openai_v1(EXTRACT)


def test_instructor_patch_recipe_extracts_a_pydantic_model(tiny_chat: Llama) -> None:
    # The schema grammar holds the tiny model (which prefers the lowest allowed token id when
    # nothing else is likely) to a valid document: "" and -1 (the integer rule's first token).
    create = instructor.patch(
        create=tiny_chat.create_chat_completion_openai_v1, mode=instructor.Mode.JSON_SCHEMA
    )
    user = create(messages=EXTRACT, response_model=UserDetail, max_tokens=400, temperature=0)
    assert isinstance(user, UserDetail)
    assert user.model_dump() == {"name": "", "age": -1}  # == would compare instructor's private raw response


def test_instructor_patch_recipe_streams_partial_models(tiny_chat: Llama) -> None:
    create = instructor.patch(
        create=tiny_chat.create_chat_completion_openai_v1, mode=instructor.Mode.JSON_SCHEMA
    )
    partials: list[Any] = list(
        create(
            messages=EXTRACT,
            response_model=instructor.Partial[UserDetail],
            max_tokens=400,
            temperature=0,
            stream=True,
        )
    )
    states: list[tuple[str | None, int | None]] = []
    for partial in partials:
        state = (partial.name, partial.age)
        if not states or states[-1] != state:
            states.append(state)
    assert states == [(None, None), ("", None), ("", -1)]


@pytest.mark.slow
def test_instructor_patch_recipe_on_the_default_model(gemma: Llama) -> None:
    # The default model is weak: the answer's content is not asserted, only that the schema
    # grammar made it an instance that validates.
    create = instructor.patch(create=gemma.create_chat_completion_openai_v1, mode=instructor.Mode.JSON_SCHEMA)
    user = create(messages=EXTRACT, response_model=UserDetail, max_tokens=64, seed=1)
    assert isinstance(user, UserDetail)
    assert len(user.name) <= 8  # maxLength, enforced by the grammar
