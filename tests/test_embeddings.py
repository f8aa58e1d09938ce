"""Embeddings: pooling per the model or pooling_type, batching, truncation, the OpenAI dict."""

from __future__ import annotations

import asyncio
import math
from pathlib import Path
from typing import cast

import pytest

from llama_cpp import Cancellation, ContextOverflowError, GenerationCancelled, Llama, LlamaError
from llama_cpp.testing import BOS_ID, TinyModelSpec, byte_token

# The tiny model's final hidden state is the normalised one-hot vector of the current token.
PEAK = 1.0 / math.sqrt(1.0 / TinyModelSpec().n_embd + 1e-6)  # rms_norm with eps 1e-6


def nonzero(vector: object) -> dict[int, float]:
    return {i: x for i, x in enumerate(cast(list[float], vector)) if abs(x) > 1e-6}


def vectors(value: object) -> list[list[float]]:
    return cast(list[list[float]], value)


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
        vector = llm.embed("ab", normalize=False)
        assert isinstance(vector, list)
        got = nonzero(vector)
        assert got.keys() == expected.keys()
        for key, value in expected.items():
            assert got[key] == pytest.approx(value, rel=1e-5)
        normalized = llm.embed("ab", normalize=True)
        assert math.fsum(x * x for x in cast(list[float], normalized)) == pytest.approx(1.0, abs=1e-6)


def test_no_pooling_gives_a_vector_per_token(tiny_model_path: Path) -> None:
    with Llama(tiny_model_path, n_ctx=256, embedding=True, pooling_type=0) as llm:
        per_token = llm.embed("ab", normalize=False)
        assert [nonzero(v).keys() for v in vectors(per_token)] == [
            {BOS_ID},
            {byte_token(ord("a"))},
            {byte_token(ord("b"))},
        ]


def test_results_do_not_depend_on_batching(tiny_model_path: Path) -> None:
    texts = ["ab", "A", "xyz", "hello world", "q"]
    with Llama(tiny_model_path, n_ctx=256, n_batch=16, embedding=True, pooling_type=1) as llm:
        together = llm.embed(texts)
        one_by_one = [llm.embed(text) for text in texts]
    assert together == one_by_one


def test_long_inputs_are_truncated_or_refused(tiny_model_path: Path) -> None:
    with Llama(tiny_model_path, n_ctx=256, n_batch=8, embedding=True, pooling_type=3) as llm:
        # truncated to n_batch tokens: BOS + 7 letters, the last one is 'g'
        assert nonzero(llm.embed("abcdefghijk", normalize=False)).keys() == {byte_token(ord("g"))}
        with pytest.raises(ContextOverflowError, match="more than n_batch=8"):
            llm.embed("abcdefghijk", truncate=False)


def test_embeddings_need_an_embedding_context(tiny: Llama) -> None:
    with pytest.raises(LlamaError, match="embedding=True"):
        tiny.embed("a")


def test_create_embedding_dict_and_async_twin(tiny_model_path: Path) -> None:
    with Llama(tiny_model_path, n_ctx=256, embedding=True, pooling_type=1) as llm:
        response = llm.create_embedding(["ab", "xyz"])
        assert response["object"] == "list"
        assert [d["index"] for d in response["data"]] == [0, 1]
        assert all(d["object"] == "embedding" for d in response["data"])
        assert response["usage"] == {"prompt_tokens": 7, "total_tokens": 7}  # BOS + 2, BOS + 3
        assert response["data"][0]["embedding"] == llm.embed("ab")
        assert asyncio.run(llm.create_embedding_async(["ab", "xyz"])) == response


@pytest.mark.slow
def test_default_model_mean_pooling_matches_the_mean_of_token_vectors(default_model_path: Path) -> None:
    texts = ["The cat sat on the mat.", "Quantum chromodynamics", "猫が好きです"]
    with Llama(default_model_path, n_ctx=512, embedding=True, pooling_type=0, n_threads=2) as per_token:
        tokens = cast(list[list[list[float]]], per_token.embed(texts, normalize=False))
    with Llama(default_model_path, n_ctx=512, embedding=True, pooling_type=1, n_threads=2) as mean:
        pooled = vectors(mean.embed(texts, normalize=False))
        alone = [mean.embed(text, normalize=False) for text in texts]
    for token_vectors, vector, single in zip(tokens, pooled, alone, strict=True):
        expected = [math.fsum(column) / len(token_vectors) for column in zip(*token_vectors, strict=True)]
        assert vector == pytest.approx(expected, rel=1e-3, abs=1e-3)
        assert vector == pytest.approx(single, rel=1e-4, abs=1e-4)
    assert pooled[0] != pooled[1]


def test_a_cancelled_embedding_raises_and_leaves_the_model_usable(tiny_model_path: Path) -> None:
    with Llama(tiny_model_path, n_ctx=256, embedding=True, pooling_type=3) as llm:
        cancellation = Cancellation()
        cancellation.cancel()
        with pytest.raises(GenerationCancelled, match="cancelled"):
            llm.create_embedding(["ab", "xyz"], cancellation=cancellation)
        assert nonzero(llm.embed("ab", normalize=False)).keys() == {byte_token(ord("b"))}
