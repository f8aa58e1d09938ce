"""logits_processor / stopping_criteria: llama-cpp-python's per-token Python hooks, on both
front ends (a Llama, and a LlamaPool whose scheduler thread runs them)."""

from __future__ import annotations

import gc
import threading
from collections.abc import Callable
from pathlib import Path

import numpy as np
import numpy.typing as npt
import pytest

from conftest import FrontEnd, completion_text
from llama_cpp import (
    ClosedError,
    ContextBusyError,
    InvalidArgumentError,
    Llama,
    LlamaPool,
    LogitsProcessorList,
    StoppingCriteriaList,
)
from llama_cpp.testing import byte_token

Processor = Callable[[npt.NDArray[np.intc], npt.NDArray[np.single]], npt.NDArray[np.single]]


def ban(token: int) -> Processor:
    def processor(input_ids: npt.NDArray[np.intc], scores: npt.NDArray[np.single]) -> npt.NDArray[np.single]:
        scores[token] = -np.inf
        return scores

    return processor


def test_a_logits_processor_changes_the_next_token(front: FrontEnd) -> None:
    # After 'a' the model says 'b'; banning 'b' leaves every other token tied at 0, the lowest
    # id wins: <unk>, which detokenizes to nothing; ban the control tokens too.
    processors = LogitsProcessorList([ban(byte_token(ord("b"))), ban(0), ban(1), ban(2)])
    assert completion_text(front, "a", max_tokens=1, temperature=0, logits_processor=processors) == "\x00"


def test_a_processor_may_return_a_new_array(front: FrontEnd) -> None:
    def shift(input_ids: npt.NDArray[np.intc], scores: npt.NDArray[np.single]) -> npt.NDArray[np.single]:
        return np.roll(scores, 1)  # float32, a new array: the successor of the successor wins

    assert completion_text(front, "a", max_tokens=2, temperature=0, logits_processor=shift) == "ce"


def test_a_processor_returning_the_wrong_shape_raises_a_typed_error(front: FrontEnd) -> None:
    def short(input_ids: npt.NDArray[np.intc], scores: npt.NDArray[np.single]) -> npt.NDArray[np.single]:
        return scores[:10]

    with pytest.raises(InvalidArgumentError, match=r"a logits processor must return 261 float32 scores"):
        completion_text(front, "a", max_tokens=2, temperature=0, logits_processor=short)
    assert completion_text(front, "a", max_tokens=3, temperature=0) == "bcd"


def test_a_processor_sees_the_prompt_and_generated_ids(front: FrontEnd) -> None:
    seen: list[list[int]] = []

    def record(input_ids: npt.NDArray[np.intc], scores: npt.NDArray[np.single]) -> npt.NDArray[np.single]:
        seen.append(input_ids.tolist())
        assert scores.shape == (front.n_vocab(),)
        assert scores.dtype == np.float32
        assert input_ids.dtype == np.int32
        return scores

    front.create_completion("ab", max_tokens=3, temperature=0, logits_processor=record)
    prompt = front.tokenize("ab")
    assert seen == [
        prompt,
        [*prompt, byte_token(ord("c"))],
        [*prompt, byte_token(ord("c")), byte_token(ord("d"))],
    ]


def test_arrays_kept_by_a_hook_stay_valid_and_unchanged(front: FrontEnd) -> None:
    # Regression: hooks used to get memoryviews over the token vector and llama.cpp's logits,
    # which later steps reallocated and overwrote.
    kept: list[tuple[npt.NDArray[np.intc], npt.NDArray[np.single], list[int], list[float]]] = []

    def keep(input_ids: npt.NDArray[np.intc], scores: npt.NDArray[np.single]) -> npt.NDArray[np.single]:
        kept.append((input_ids, scores, input_ids.tolist(), scores.tolist()))
        return scores

    front.create_completion("a" * 40, max_tokens=30, temperature=0, logits_processor=keep)
    front.create_completion("zzz", max_tokens=5, temperature=0)  # more decodes, other logits
    gc.collect()
    assert len(kept) == 30
    for input_ids, scores, ids_then, scores_then in kept:
        assert input_ids.tolist() == ids_then
        assert scores.tolist() == scores_then


def test_stopping_criteria_end_the_generation(front: FrontEnd) -> None:
    def after_e(input_ids: npt.NDArray[np.intc], logits: npt.NDArray[np.single]) -> bool:
        return int(input_ids[-1]) == byte_token(ord("e"))

    response = front.create_completion(
        "a", max_tokens=20, temperature=0, stopping_criteria=StoppingCriteriaList([after_e])
    )
    assert response["choices"][0]["text"] == "bcde"
    assert response["choices"][0]["finish_reason"] == "stop"


def test_an_exception_in_a_hook_propagates_and_the_model_stays_usable(front: FrontEnd) -> None:
    def broken(input_ids: npt.NDArray[np.intc], scores: npt.NDArray[np.single]) -> npt.NDArray[np.single]:
        raise KeyError("boom")

    with pytest.raises(KeyError, match="boom"):
        front.create_completion("a", max_tokens=3, logits_processor=broken)
    assert completion_text(front, "a", max_tokens=3, temperature=0) == "bcd"


def test_hooks_in_a_stream(front: FrontEnd) -> None:
    def after_d(input_ids: npt.NDArray[np.intc], logits: npt.NDArray[np.single]) -> bool:
        return int(input_ids[-1]) == byte_token(ord("d"))

    chunks = list(
        front.create_completion("a", max_tokens=20, temperature=0, stream=True, stopping_criteria=after_d)
    )
    assert "".join(c["choices"][0]["text"] for c in chunks) == "bcd"


@pytest.mark.timeout(30)
def test_a_hook_may_read_from_its_model(tiny: Llama) -> None:
    # Regression: the token loop held the context's (non-recursive) mutex while the hook ran,
    # so this deadlocked.
    seen: list[tuple[int, int, int]] = []

    def probe(input_ids: npt.NDArray[np.intc], scores: npt.NDArray[np.single]) -> npt.NDArray[np.single]:
        seen.append((tiny.n_ctx(), tiny.n_tokens, len(tiny.tokenize("xy"))))
        return scores

    assert (
        tiny.create_completion("ab", max_tokens=3, temperature=0, logits_processor=probe)["choices"][0][
            "text"
        ]
        == "cde"
    )
    assert seen == [(256, 3, 3), (256, 4, 3), (256, 5, 3)]


@pytest.mark.timeout(30)
def test_a_hook_cannot_start_another_generation_on_its_model(tiny: Llama) -> None:
    def nested(input_ids: npt.NDArray[np.intc], scores: npt.NDArray[np.single]) -> npt.NDArray[np.single]:
        tiny.generate("x", max_tokens=1)
        return scores

    with pytest.raises(ContextBusyError, match="a hook may only read from it"):
        tiny.create_completion("a", max_tokens=2, temperature=0, logits_processor=nested)
    assert tiny.generate("a", max_tokens=3) != ""


@pytest.mark.timeout(30)
def test_a_hook_may_close_its_model(tiny: Llama) -> None:
    def close(input_ids: npt.NDArray[np.intc], scores: npt.NDArray[np.single]) -> npt.NDArray[np.single]:
        tiny.close()
        return scores

    with pytest.raises(ClosedError, match="the generation was aborted because the context is closing"):
        tiny.create_completion("a", max_tokens=5, temperature=0, logits_processor=close)
    with pytest.raises(ClosedError):
        tiny.generate("a", max_tokens=1)


@pytest.mark.timeout(30)
def test_a_pool_hook_may_read_the_pool_and_close_it(tiny_model_path: Path) -> None:
    with LlamaPool(tiny_model_path, pool_size=2, n_ctx=128, n_batch=64, verbose=False) as pool:
        busy: list[int] = []

        def probe(input_ids: npt.NDArray[np.intc], scores: npt.NDArray[np.single]) -> npt.NDArray[np.single]:
            busy.append(pool.stats().n_busy)
            return scores

        pool.create_completion("a", max_tokens=2, temperature=0, logits_processor=probe)
        assert busy == [1, 1]

        closed = threading.Event()

        def close(input_ids: npt.NDArray[np.intc], scores: npt.NDArray[np.single]) -> npt.NDArray[np.single]:
            pool.close()  # from the scheduler thread itself
            closed.set()
            return scores

        with pytest.raises(ClosedError):
            pool.create_completion("a", max_tokens=5, temperature=0, logits_processor=close)
        assert closed.is_set()
        with pytest.raises(ClosedError):
            pool.submit("a")
