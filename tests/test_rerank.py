"""A tiny BERT reranker (rank pooling) written by the suite, checked against numpy."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

from llama_cpp import Llama
from llama_cpp.testing import (
    BOS_ID,
    EOS_ID,
    SEP_ID,
    TinyRerankerSpec,
    tiny_reranker_scores,
    write_tiny_reranker,
)

TWO_LABELS = TinyRerankerSpec(labels=("relevant", "irrelevant"))
DOCUMENTS = ["a dog", "the cat", "cat cat", "no", "a cat"]


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
