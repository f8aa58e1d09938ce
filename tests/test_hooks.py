"""logits_processor / stopping_criteria: llama-cpp-python's per-token Python hooks."""

from __future__ import annotations

from collections.abc import Callable

import numpy as np
import numpy.typing as npt
import pytest

from llama_cpp import Llama, LogitsProcessorList, StoppingCriteriaList
from llama_cpp.testing import byte_token

Processor = Callable[[npt.NDArray[np.intc], npt.NDArray[np.single]], npt.NDArray[np.single]]


def ban(token: int) -> Processor:
    def processor(input_ids: npt.NDArray[np.intc], scores: npt.NDArray[np.single]) -> npt.NDArray[np.single]:
        scores[token] = -np.inf
        return scores

    return processor


def test_a_logits_processor_changes_the_next_token(tiny: Llama) -> None:
    # After 'a' the model says 'b'; banning 'b' leaves every other token tied at 0, the lowest
    # id wins: <unk>, which detokenizes to nothing; ban the control tokens too.
    processors = LogitsProcessorList([ban(byte_token(ord("b"))), ban(0), ban(1), ban(2)])
    response = tiny.create_completion("a", max_tokens=1, temperature=0, logits_processor=processors)
    assert response["choices"][0]["text"] == "\x00"  # byte token 0x00, the next lowest id


def test_a_processor_sees_the_prompt_and_generated_ids(tiny: Llama) -> None:
    seen: list[list[int]] = []

    def record(input_ids: npt.NDArray[np.intc], scores: npt.NDArray[np.single]) -> npt.NDArray[np.single]:
        seen.append(input_ids.tolist())
        assert scores.shape == (tiny.n_vocab(),)
        return scores

    tiny.create_completion("ab", max_tokens=3, temperature=0, logits_processor=record)
    prompt = tiny.tokenize("ab")
    assert seen == [
        prompt,
        [*prompt, byte_token(ord("c"))],
        [*prompt, byte_token(ord("c")), byte_token(ord("d"))],
    ]


def test_stopping_criteria_end_the_generation(tiny: Llama) -> None:
    def after_e(input_ids: npt.NDArray[np.intc], logits: npt.NDArray[np.single]) -> bool:
        return int(input_ids[-1]) == byte_token(ord("e"))

    response = tiny.create_completion(
        "a", max_tokens=20, temperature=0, stopping_criteria=StoppingCriteriaList([after_e])
    )
    assert response["choices"][0]["text"] == "bcde"
    assert response["choices"][0]["finish_reason"] == "stop"


def test_an_exception_in_a_hook_propagates_and_the_model_stays_usable(tiny: Llama) -> None:
    def broken(input_ids: npt.NDArray[np.intc], scores: npt.NDArray[np.single]) -> npt.NDArray[np.single]:
        raise KeyError("boom")

    with pytest.raises(KeyError, match="boom"):
        tiny.create_completion("a", max_tokens=3, logits_processor=broken)
    response = tiny.create_completion("a", max_tokens=3, temperature=0)
    assert response["choices"][0]["text"] == "bcd"


def test_hooks_in_a_stream(tiny: Llama) -> None:
    def after_d(input_ids: npt.NDArray[np.intc], logits: npt.NDArray[np.single]) -> bool:
        return int(input_ids[-1]) == byte_token(ord("d"))

    chunks = list(
        tiny.create_completion("a", max_tokens=20, temperature=0, stream=True, stopping_criteria=after_d)
    )
    assert "".join(c["choices"][0]["text"] for c in chunks) == "bcd"
