"""save_state / load_state, in memory and to files."""

from __future__ import annotations

from pathlib import Path

import pytest

from llama_cpp import ContextOverflowError, Llama, LlamaError, LlamaState, SamplingParams
from llama_cpp.testing import byte_token

GREEDY = SamplingParams.greedy()


def test_state_round_trip_restores_tokens_and_kv(tiny: Llama) -> None:
    tiny.complete("xyz", max_tokens=3, sampling=GREEDY)  # KV: BOS x y z a b
    state = tiny.save_state()
    assert isinstance(state.data, bytes)
    assert state.n_tokens == 6 == len(state.input_ids)
    assert state.llama_state_size == len(state.data) > 0

    tiny.complete("A", max_tokens=20, sampling=GREEDY)
    assert tiny.n_tokens != 6
    tiny.load_state(state)
    assert tiny.n_tokens == 6
    assert tiny.context.tokens() == list(state.tokens)
    # llama.cpp's state has no logits: stale ones must not be served.
    with pytest.raises(LlamaError, match="no logits"):
        tiny.context.logits()
    # The restored cache serves as a prefix: only the new token is evaluated.
    resumed = tiny.complete([*state.tokens, byte_token(ord("c"))], max_tokens=2, sampling=GREEDY)
    assert resumed.cached_tokens == 6
    assert resumed.text == "de"


def test_state_file_round_trip(tiny: Llama, tmp_path: Path) -> None:
    tiny.complete("hello", max_tokens=2, sampling=GREEDY)
    expected = tiny.context.tokens()
    path = tmp_path / "session.bin"
    tiny.save_state_file(path)
    tiny.reset()
    tiny.load_state_file(path)
    assert tiny.context.tokens() == expected
    assert tiny.n_tokens == len(expected)


def test_damaged_state_raises_and_leaves_an_empty_usable_cache(tiny: Llama) -> None:
    tiny.complete("abc", max_tokens=2, sampling=GREEDY)
    state = tiny.save_state()
    damaged = LlamaState(
        model_path=state.model_path, n_ctx=state.n_ctx, tokens=state.tokens, data=state.data[:40]
    )
    with pytest.raises(LlamaError, match="the state could not be loaded"):
        tiny.load_state(damaged)
    assert tiny.n_tokens == 0
    assert tiny.generate("A", max_tokens=50, sampling=GREEDY) == "é😀世界"


def test_state_with_wrong_tokens_is_refused(tiny: Llama) -> None:
    tiny.complete("abc", max_tokens=2, sampling=GREEDY)
    state = tiny.save_state()
    lying = LlamaState(
        model_path=state.model_path, n_ctx=state.n_ctx, tokens=state.tokens[:-1], data=state.data
    )
    with pytest.raises(LlamaError, match="does not match the tokens"):
        tiny.load_state(lying)


def test_state_larger_than_the_window_is_refused(tiny_model_path: Path) -> None:
    with Llama(tiny_model_path, n_ctx=512) as big:
        big.eval(big.tokenize("z" * 400))
        state = big.save_state()
    with Llama(tiny_model_path, n_ctx=256) as small, pytest.raises(ContextOverflowError):
        small.load_state(state)


def test_missing_state_file_raises(tiny: Llama, tmp_path: Path) -> None:
    with pytest.raises(LlamaError, match="could not load the state"):
        tiny.load_state_file(tmp_path / "missing.bin")


@pytest.mark.slow
def test_state_on_the_default_model_resumes_the_same_greedy_text(gemma: Llama) -> None:
    prompt = "The three primary colors are"
    gemma.reset()
    reference = gemma.complete(prompt, max_tokens=24, sampling=GREEDY)
    gemma.reset()
    gemma.eval(gemma.tokenize(prompt))
    state = gemma.save_state()
    gemma.complete("Something else entirely", max_tokens=4, sampling=GREEDY)
    gemma.load_state(state)
    resumed = gemma.complete(prompt, max_tokens=24, sampling=GREEDY)
    assert resumed.cached_tokens == len(state.tokens) - 1
    assert resumed.tokens == reference.tokens
