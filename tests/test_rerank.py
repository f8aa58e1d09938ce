"""Reranking on a tiny BERT reranker (rank pooling) written by the suite, checked against numpy."""

from __future__ import annotations

import asyncio
import math
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import pytest

from llama_cpp import ContextOverflowError, InvalidArgumentError, Llama, LlamaError, RerankResult
from llama_cpp.testing import (
    BOS_ID,
    EOS_ID,
    SEP_ID,
    TinyRerankerSpec,
    tiny_reranker_scores,
    write_tiny_reranker,
)

TWO_LABELS = TinyRerankerSpec(labels=("relevant", "irrelevant"))
TEMPLATE = TinyRerankerSpec(rerank_template="<s>query: {query}</s>document: {document}</s>")
DOCUMENTS = ["a dog", "the cat", "cat cat", "no", "a cat"]


@pytest.fixture(scope="module")
def reranker_path(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return write_tiny_reranker(tmp_path_factory.mktemp("reranker") / "reranker.gguf")


@pytest.fixture
def reranker(reranker_path: Path) -> Iterator[Llama]:
    with Llama(reranker_path, n_ctx=256, n_batch=64, embedding=True, verbose=False) as llm:
        yield llm


def pair(llm: Llama, query: str, document: str) -> list[int]:
    """llama-server's pair without a rerank template: BOS query EOS SEP document EOS."""
    return [
        BOS_ID,
        *llm.tokenize(query, add_bos=False),
        EOS_ID,
        SEP_ID,
        *llm.tokenize(document, add_bos=False),
        EOS_ID,
    ]


def test_rank_pooling_gives_n_cls_out_values_per_input(tmp_path: Path) -> None:
    # Defect 3: embed copied n_embd floats from the n_cls_out that llama.cpp stores per
    # sequence with rank pooling (a heap over-read).
    path = write_tiny_reranker(tmp_path / "two-labels.gguf", TWO_LABELS)
    with Llama(path, n_ctx=256, embedding=True, verbose=False) as llm:
        assert llm.context.pooling_type() == 4  # the model's default
        tokens = pair(llm, "cat", "a cat")
        single = llm.embed(tokens)
        assert isinstance(single, np.ndarray)
        assert single.dtype == np.float32
        assert single.shape == (2,)
        assert single.tolist() == pytest.approx(tiny_reranker_scores(tokens, TWO_LABELS), rel=1e-5)
        inputs = [pair(llm, "cat", d) for d in DOCUMENTS]
        several = llm.embed(inputs)
        assert isinstance(several, np.ndarray)
        assert several.shape == (len(DOCUMENTS), 2)
        for row, tokens in zip(several, inputs, strict=True):
            assert row.tolist() == pytest.approx(tiny_reranker_scores(tokens, TWO_LABELS), rel=1e-5)


def test_pairs_are_formatted_as_llama_server_formats_them(reranker: Llama) -> None:
    inputs = reranker.context.rerank_inputs(b"cat", [b"a cat", b""])
    query = reranker.tokenize("cat", add_bos=False)
    assert inputs == [pair(reranker, "cat", "a cat"), [BOS_ID, *query, EOS_ID, SEP_ID, EOS_ID]]


def test_a_rerank_template_is_filled_in_once_with_special_tokens_parsed(tmp_path: Path) -> None:
    path = write_tiny_reranker(tmp_path / "templated.gguf", TEMPLATE)
    with Llama(path, n_ctx=256, embedding=True, verbose=False) as llm:
        (tokens,) = llm.context.rerank_inputs(b"{document}", [b"a cat"])
        text = "<s>query: {document}</s>document: a cat</s>"
        assert tokens == llm.tokenize(text, add_bos=False, special=True)
        assert tokens[0] == BOS_ID
        assert tokens.count(EOS_ID) == 2
        assert SEP_ID not in tokens
        (result,) = llm.rerank("{document}", ["a cat"])
        assert result.relevance_score == pytest.approx(tiny_reranker_scores(tokens, TEMPLATE)[0], rel=1e-5)


def test_scores_match_the_model_and_come_best_first(reranker: Llama) -> None:
    expected = [tiny_reranker_scores(pair(reranker, "cat", d))[0] for d in DOCUMENTS]
    results = reranker.rerank("cat", DOCUMENTS)
    assert all(isinstance(r, RerankResult) for r in results)
    assert [r.index for r in results] == sorted(range(len(DOCUMENTS)), key=lambda i: -expected[i])
    assert [r.document for r in results] == [DOCUMENTS[r.index] for r in results]
    for r in results:
        assert r.relevance_score == pytest.approx(expected[r.index], rel=1e-5)
    assert [r.document for r in results][:2] == ["cat cat", "a cat"]
    assert results[-1].document == "no"
    # Each pair is scored in its own sequence: alone or together, the same score.
    (alone,) = reranker.rerank("cat", ["a dog"])
    assert alone.relevance_score == next(r.relevance_score for r in results if r.index == 0)


def test_top_n_and_normalize(reranker: Llama) -> None:
    results = reranker.rerank("cat", DOCUMENTS)
    top = reranker.rerank("cat", DOCUMENTS, top_n=2)
    assert top == results[:2]
    assert reranker.rerank("cat", DOCUMENTS, top_n=50) == results
    normalized = reranker.rerank("cat", DOCUMENTS, normalize=True)
    assert [r.index for r in normalized] == [r.index for r in results]
    for raw, sigmoid in zip(results, normalized, strict=True):
        assert sigmoid.relevance_score == pytest.approx(
            1.0 / (1.0 + math.exp(-raw.relevance_score)), rel=1e-12
        )
        assert 0.0 < sigmoid.relevance_score < 1.0


def test_equal_scores_keep_the_documents_order(reranker: Llama) -> None:
    results = reranker.rerank("cat", ["dog", "a cat", "dog", "dog"])
    assert [r.index for r in results] == [1, 0, 2, 3]


def test_async_twin_agrees(reranker: Llama) -> None:
    assert asyncio.run(reranker.rerank_async("cat", DOCUMENTS, top_n=3)) == reranker.rerank(
        "cat", DOCUMENTS, top_n=3
    )


def test_bad_input_raises_typed_errors(reranker: Llama) -> None:
    with pytest.raises(InvalidArgumentError, match="at least one document"):
        reranker.rerank("cat", [])
    with pytest.raises(InvalidArgumentError, match="a list of strings, not a single string"):
        reranker.rerank("cat", "a cat")
    with pytest.raises(InvalidArgumentError, match=r"top_n must be >= 1, got 0"):
        reranker.rerank("cat", DOCUMENTS, top_n=0)
    with pytest.raises(ContextOverflowError, match="more than n_batch=64"):
        reranker.rerank("cat", ["x" * 100])


def test_a_model_that_is_not_a_reranker_is_refused(reranker_path: Path, tiny_model_path: Path) -> None:
    with (
        Llama(tiny_model_path, n_ctx=256, embedding=True, pooling_type=1, verbose=False) as llm,
        pytest.raises(LlamaError, match="pools with 'mean': load a reranker GGUF with embedding=True"),
    ):
        llm.rerank("cat", DOCUMENTS)
    with (
        Llama(reranker_path, n_ctx=256, verbose=False) as llm,
        pytest.raises(LlamaError, match="load the reranker with embedding=True"),
    ):
        llm.rerank("cat", DOCUMENTS)
