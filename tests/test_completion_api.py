"""llama-cpp-python's create_completion / __call__ dict API."""

from __future__ import annotations

import pytest

from conftest import FrontEnd
from llama_cpp import InvalidArgumentError, Llama, SamplingParams


def test_create_completion_dict_shape(tiny: Llama) -> None:
    response = tiny.create_completion("A", max_tokens=100, temperature=0)
    assert isinstance(response, dict)
    assert response["object"] == "text_completion"
    assert response["id"].startswith("cmpl-")
    assert isinstance(response["created"], int)
    assert response["model"] == tiny.model_path
    assert response["choices"] == [
        {"text": "é😀世界", "index": 0, "logprobs": None, "finish_reason": "stop", "stop_reason": None}
    ]
    assert response["usage"] == {
        "prompt_tokens": 2,
        "completion_tokens": 12,
        "total_tokens": 14,
        "prompt_tokens_details": {"cached_tokens": 0},
    }


def test_call_is_create_completion_with_stop_and_length(tiny: Llama) -> None:
    response = tiny("a", max_tokens=4, temperature=0)
    assert isinstance(response, dict)
    assert response["choices"][0]["text"] == "bcde"
    assert response["choices"][0]["finish_reason"] == "length"
    stopped = tiny("a", max_tokens=40, temperature=0, stop="f")
    assert isinstance(stopped, dict)
    assert stopped["choices"][0]["text"] == "bcde"
    assert stopped["choices"][0]["finish_reason"] == "stop"
    assert stopped["choices"][0]["stop_reason"] == "f"


def test_streamed_chunks_concatenate_to_the_text(tiny: Llama) -> None:
    chunks = list(tiny.create_completion("A", max_tokens=100, temperature=0, stream=True))
    texts = [c["choices"][0]["text"] for c in chunks]
    assert "".join(texts) == "é😀世界"
    assert [c["choices"][0]["finish_reason"] for c in chunks] == [None, None, None, None, "stop"]
    assert len({c["id"] for c in chunks}) == 1
    assert all("usage" not in c for c in chunks)


def test_echo_prepends_the_prompt(tiny: Llama) -> None:
    response = tiny.create_completion("xy", max_tokens=2, temperature=0, echo=True)
    assert isinstance(response, dict)
    assert response["choices"][0]["text"] == "xyza"


def test_token_prompt(tiny: Llama) -> None:
    tokens = tiny.tokenize("a")
    response = tiny.create_completion(tokens, max_tokens=3, temperature=0)
    assert isinstance(response, dict)
    assert response["choices"][0]["text"] == "bcd"


def test_suffix_needs_a_model_with_fim_tokens(tiny: Llama) -> None:
    # The tiny model has none (tests/test_fim.py writes one that has them).
    with pytest.raises(InvalidArgumentError, match="this model has no FIM_PRE, FIM_SUF, FIM_MID token"):
        tiny.create_completion("a", suffix="b")


def test_the_stop_string_that_ended_a_generation_is_reported(front: FrontEnd) -> None:
    """``stop_reason`` (vLLM's field) in completion choices, streamed or not, and
    ``Completion.stop_sequence``: the stop string, or None when something else ended it.
    (Chat choices: tests/test_server_protocols.py, through the Anthropic API.)"""
    assert (
        front.complete("a", max_tokens=20, sampling=SamplingParams.greedy(), stop=["xx", "ef"]).stop_sequence
        == "ef"
    )
    response = front.create_completion("a", max_tokens=20, temperature=0, stop=["de"])
    assert isinstance(response, dict)
    assert (response["choices"][0]["text"], response["choices"][0].get("stop_reason")) == ("bc", "de")
    chunks = list(front.create_completion("a", max_tokens=20, temperature=0, stop=["de"], stream=True))
    assert "".join(c["choices"][0]["text"] for c in chunks) == "bc"
    assert [c["choices"][0].get("stop_reason", "absent") for c in chunks] == ["absent"] * (
        len(chunks) - 1
    ) + ["de"]
    limited = front.create_completion("a", max_tokens=2, temperature=0, stop=["de"])
    assert isinstance(limited, dict)
    assert limited["choices"][0]["stop_reason"] is None
