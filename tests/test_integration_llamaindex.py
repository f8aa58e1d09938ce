"""LlamaIndex's llama.cpp LLM (``llama_index.llms.llama_cpp.LlamaCPP`` from the PyPI package
llama-index-llms-llama-cpp, installed without its llama-cpp-python requirement) runs unchanged
on this package: complete, stream_complete, chat and stream_chat, on the tiny successor model
(greedy "a" -> "bcdef...", so the text is exact)."""

from __future__ import annotations

from collections.abc import Iterator
from importlib.metadata import PackageNotFoundError, version
from pathlib import Path

import pytest
from llama_index.core.base.llms.types import ChatMessage, MessageRole
from llama_index.llms.llama_cpp import LlamaCPP

from llama_cpp import Llama


@pytest.fixture
def llm(tiny_model_path: Path) -> Iterator[LlamaCPP]:
    made = LlamaCPP(
        model_path=str(tiny_model_path),
        temperature=0.0,
        max_new_tokens=5,
        context_window=256,
        model_kwargs={"n_batch": 64},
        verbose=False,
    )
    yield made
    made._model.close()


def test_llama_cpp_python_is_not_installed() -> None:
    # It would provide `llama_cpp` too; the integration must run on this package alone.
    with pytest.raises(PackageNotFoundError):
        version("llama-cpp-python")


def test_metadata_reads_our_context_params(llm: LlamaCPP) -> None:
    assert isinstance(llm._model, Llama)
    assert llm.context_window == 256  # from Llama.n_ctx()
    assert llm.metadata.context_window == 256  # from Llama.context_params.n_ctx
    assert llm.metadata.num_output == 5


def test_complete(llm: LlamaCPP) -> None:
    response = llm.complete("a")
    assert response.text == "bcdef"
    assert response.raw["choices"][0]["finish_reason"] == "length"


def test_stream_complete(llm: LlamaCPP) -> None:
    responses = list(llm.stream_complete("a"))
    # One response per token, then the chunk that carries finish_reason (no text).
    assert [r.delta for r in responses] == ["b", "c", "d", "e", "f", ""]
    assert [r.text for r in responses] == ["b", "bc", "bcd", "bcde", "bcdef", "bcdef"]


def test_chat(llm: LlamaCPP) -> None:
    # LlamaIndex's generic prompt ends with "assistant: "; the tiny model follows a space with 'a'.
    response = llm.chat([ChatMessage(role=MessageRole.USER, content="x")])
    assert response.message.role == MessageRole.ASSISTANT
    assert response.message.content == "abcde"


def test_stream_chat(llm: LlamaCPP) -> None:
    responses = list(llm.stream_chat([ChatMessage(role=MessageRole.USER, content="x")]))
    assert [r.delta for r in responses] == ["a", "b", "c", "d", "e", ""]
    assert responses[-1].message.content == "abcde"
