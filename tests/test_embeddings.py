"""Embeddings: pooling per the model or pooling_type, batching, truncation, numpy arrays, the OpenAI dict."""

from __future__ import annotations

import asyncio
import math
from pathlib import Path

import numpy as np
import numpy.typing as npt
import pytest

from llama_cpp import Cancellation, ClosedError, ContextOverflowError, GenerationCancelled, Llama, LlamaError
from llama_cpp.testing import BOS_ID, TinyModelSpec, byte_token

# The tiny model's final hidden state is the normalised one-hot vector of the current token.
PEAK = 1.0 / math.sqrt(1.0 / TinyModelSpec().n_embd + 1e-6)  # rms_norm with eps 1e-6
N_EMBD = TinyModelSpec().n_embd


def array(value: object) -> npt.NDArray[np.float32]:
    """``value`` as the float32 array embed returns, checked."""
    assert isinstance(value, np.ndarray)
    assert value.dtype == np.float32
    return value


def nonzero(vector: object) -> dict[int, float]:
    values = array(vector)
    assert values.ndim == 1
    return {int(i): float(values[i]) for i in np.flatnonzero(np.abs(values) > 1e-6)}


@pytest.mark.parametrize(
    ("pooling", "expected"),
    [
        (1, {BOS_ID: PEAK / 3, byte_token(ord("a")): PEAK / 3, byte_token(ord("b")): PEAK / 3}),  # mean
        (2, {BOS_ID: PEAK}),  # CLS: the first token
        (3, {byte_token(ord("b")): PEAK}),  # last
    ],
)
def test_pooled_embeddings_are_exact(tiny_model_path: Path, pooling: int, expected: dict[int, float]) -> None:
    with Llama(tiny_model_path, n_ctx=256, embedding=True, pooling_type=pooling) as llm:
        vector = array(llm.embed("ab", normalize=False))
        assert vector.shape == (N_EMBD,)
        got = nonzero(vector)
        assert got.keys() == expected.keys()
        for key, value in expected.items():
            assert got[key] == pytest.approx(value, rel=1e-5)
        normalized = array(llm.embed("ab", normalize=True))
        assert math.fsum(float(x) * float(x) for x in normalized) == pytest.approx(1.0, abs=1e-6)


def test_no_pooling_gives_a_vector_per_token(tiny_model_path: Path) -> None:
    with Llama(tiny_model_path, n_ctx=256, embedding=True, pooling_type=0) as llm:
        per_token = array(llm.embed("ab", normalize=False))
        assert per_token.shape == (3, N_EMBD)
        assert [nonzero(v).keys() for v in per_token] == [
            {BOS_ID},
            {byte_token(ord("a"))},
            {byte_token(ord("b"))},
        ]
        several = llm.embed(["ab", "xyz"], normalize=False)
        assert isinstance(several, list)
        assert [array(v).shape for v in several] == [(3, N_EMBD), (4, N_EMBD)]
        assert np.array_equal(several[0], per_token)


def test_several_inputs_give_one_array_that_owns_its_memory(tiny_model_path: Path) -> None:
    with Llama(tiny_model_path, n_ctx=256, embedding=True, pooling_type=3) as llm:
        vectors = array(llm.embed(["ab", "xyz", "q"], normalize=False))
        assert vectors.shape == (3, N_EMBD)
        assert vectors.flags.c_contiguous
        assert [nonzero(v).keys() for v in vectors] == [
            {byte_token(ord("b"))},
            {byte_token(ord("z"))},
            {byte_token(ord("q"))},
        ]
        vectors[0, 0] = 42.0  # writable, and no other result shares it
        assert array(llm.embed("ab", normalize=False))[0] == 0.0
    assert vectors[0, 0] == 42.0  # still valid once the model is closed
    assert nonzero(vectors[1]) == {byte_token(ord("z")): pytest.approx(PEAK, rel=1e-5)}


def test_results_do_not_depend_on_batching(tiny_model_path: Path) -> None:
    texts = ["ab", "A", "xyz", "hello world", "q"]
    with Llama(tiny_model_path, n_ctx=256, n_batch=16, embedding=True, pooling_type=1) as llm:
        together = array(llm.embed(texts))
        one_by_one = np.stack([array(llm.embed(text)) for text in texts])
    assert np.array_equal(together, one_by_one)


def test_long_inputs_are_truncated_or_refused(tiny_model_path: Path) -> None:
    with Llama(tiny_model_path, n_ctx=256, n_batch=8, embedding=True, pooling_type=3) as llm:
        # truncated to n_batch tokens: BOS + 7 letters, the last one is 'g'
        assert nonzero(llm.embed("abcdefghijk", normalize=False)).keys() == {byte_token(ord("g"))}
        with pytest.raises(ContextOverflowError, match="more than n_batch=8"):
            llm.embed("abcdefghijk", truncate=False)


def test_embeddings_need_an_embedding_context(tiny: Llama) -> None:
    with pytest.raises(LlamaError, match="embedding=True"):
        tiny.embed("a")


def test_pooling_type_is_read_under_the_context_lock(tiny_model_path: Path) -> None:
    llm = Llama(tiny_model_path, n_ctx=256, embedding=True, pooling_type=3)
    assert llm.context.pooling_type() == 3
    context = llm.context
    llm.close()
    with pytest.raises(ClosedError, match="the context is closed"):
        context.pooling_type()


def test_create_embedding_dict_and_async_twin(tiny_model_path: Path) -> None:
    with Llama(tiny_model_path, n_ctx=256, embedding=True, pooling_type=1) as llm:
        response = llm.create_embedding(["ab", "xyz"])
        assert response["object"] == "list"
        assert [d["index"] for d in response["data"]] == [0, 1]
        assert all(d["object"] == "embedding" for d in response["data"])
        assert response["usage"] == {"prompt_tokens": 7, "total_tokens": 7}  # BOS + 2, BOS + 3
        embedding = response["data"][0]["embedding"]
        assert type(embedding) is list
        assert all(type(x) is float for x in embedding)
        assert embedding == array(llm.embed("ab")).tolist()
        assert asyncio.run(llm.create_embedding_async(["ab", "xyz"])) == response


@pytest.mark.slow
def test_default_model_mean_pooling_matches_the_mean_of_token_vectors(default_model_path: Path) -> None:
    texts = ["The cat sat on the mat.", "Quantum chromodynamics", "猫が好きです"]
    with Llama(default_model_path, n_ctx=512, embedding=True, pooling_type=0, n_threads=2) as per_token:
        tokens = per_token.embed(texts, normalize=False)
        assert isinstance(tokens, list)
    with Llama(default_model_path, n_ctx=512, embedding=True, pooling_type=1, n_threads=2) as mean:
        pooled = array(mean.embed(texts, normalize=False))
        alone = [array(mean.embed(text, normalize=False)) for text in texts]
    assert pooled.shape == (3, array(tokens[0]).shape[1])
    for token_vectors, vector, single in zip(tokens, pooled, alone, strict=True):
        expected = array(token_vectors).astype(np.float64).mean(axis=0)
        np.testing.assert_allclose(vector, expected, rtol=1e-3, atol=1e-3)
        np.testing.assert_allclose(vector, single, rtol=1e-4, atol=1e-4)
    assert not np.array_equal(pooled[0], pooled[1])


def test_a_cancelled_embedding_raises_and_leaves_the_model_usable(tiny_model_path: Path) -> None:
    with Llama(tiny_model_path, n_ctx=256, embedding=True, pooling_type=3) as llm:
        cancellation = Cancellation()
        cancellation.cancel()
        with pytest.raises(GenerationCancelled, match="cancelled"):
            llm.create_embedding(["ab", "xyz"], cancellation=cancellation)
        assert nonzero(llm.embed("ab", normalize=False)).keys() == {byte_token(ord("b"))}
