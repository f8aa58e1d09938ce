"""Embeddings and reranking: the component behind :meth:`Llama.embed`,
:meth:`Llama.create_embedding` and :meth:`Llama.rerank`.

Vectors cross from C++ as float32 numpy arrays that own their memory (no Python lists of
floats); only the OpenAI-style :meth:`Llama.create_embedding` turns them into lists, because
its response is JSON.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import TypeAlias, cast

import numpy as np
import numpy.typing as npt

from llama_cpp import _core
from llama_cpp.errors import InvalidArgumentError, LlamaError
from llama_cpp.llama_types import CreateEmbeddingResponse

__all__ = ["Embedder", "RerankResult"]

EmbeddingInput: TypeAlias = str | Sequence[str] | Sequence[int] | Sequence[Sequence[int]]
FloatArray: TypeAlias = npt.NDArray[np.float32]

POOLING_NONE = 0
POOLING_RANK = 4
_POOLING_NAMES = {POOLING_NONE: "none", 1: "mean", 2: "CLS", 3: "last", POOLING_RANK: "rank"}


@dataclass(frozen=True, slots=True)
class RerankResult:
    """One document's place in :meth:`Llama.rerank` (llama-server's ``/v1/rerank`` result).

    Attributes:
        index: Position of the document in the list passed in.
        relevance_score: The reranker's score (higher is more relevant): its raw output, or
            the logistic sigmoid of it with ``normalize=True``.
        document: The document's text.
    """

    index: int
    relevance_score: float
    document: str


class Embedder:
    """Embedding vectors and reranking scores from a context created with ``embedding=True``.

    Args:
        context: Returns the context (raising once it is closed).
        model: The model, for tokenizing.
        embedding: Whether the context was created for embeddings.
        name: The ``model`` field of OpenAI responses, unless a call names one.
    """

    def __init__(
        self, context: Callable[[], _core.Context], model: _core.Model, embedding: bool, name: str
    ) -> None:
        self._context = context
        self._model = model
        self._embedding = embedding
        self._name = name

    @property
    def context(self) -> _core.Context:
        return self._context()

    def tokenize(self, text: str) -> list[int]:
        return self._model.tokenize(text.encode("utf-8"), True, False)

    def _embedding_inputs(self, input: EmbeddingInput) -> tuple[bool, list[list[int]]]:
        """Whether ``input`` is a single input, and the token lists of all inputs."""
        if isinstance(input, str):
            return True, [self.tokenize(input)]
        items: list[object] = list(input)
        if items and all(isinstance(t, int) for t in items):
            return True, [cast(list[int], items)]
        return False, [
            self.tokenize(i) if isinstance(i, str) else list(cast(Sequence[int], i)) for i in items
        ]

    def _embed(
        self,
        input: EmbeddingInput,
        normalize: bool,
        truncate: bool,
        cancellation: _core.Cancellation | None = None,
    ) -> tuple[bool, FloatArray | list[FloatArray], int]:
        single, tokens = self._embedding_inputs(input)
        vectors = self.context.embed(tokens, normalize, truncate, cancellation)
        return single, vectors, sum(min(len(t), self.context.n_batch()) for t in tokens)

    def embed(
        self, input: EmbeddingInput, normalize: bool = False, truncate: bool = True
    ) -> FloatArray | list[FloatArray]:
        """Embeddings of a text (or token list), or of each of several, as float32 arrays.

        With a pooling type (mean, CLS, last; the model's by default) a single input gives
        an ``(n_embd,)`` array and a list of inputs an ``(n_inputs, n_embd)`` array. With
        ``pooling_type=0`` (none) an input gives an ``(n_tokens, n_embd)`` array, and a list
        of inputs a list of them. With rank pooling (a reranker) the width is the number of
        classifier outputs instead of ``n_embd`` (see :meth:`rerank`). Inputs are batched
        together; each is computed in its own sequence, so results do not depend on the
        batching. The arrays own their memory.

        Args:
            input: A string or token list, or a list of them.
            normalize: Scale each vector to unit L2 norm (off by default, as in llama-cpp-python).
            truncate: Cut inputs longer than ``n_batch`` (otherwise ContextOverflowError).

        Raises:
            LlamaError: The model was not created with ``embedding=True``.
            ContextOverflowError: An input is longer than ``n_batch`` and ``truncate`` is False.
        """
        single, vectors, _ = self._embed(input, normalize, truncate)
        if single:
            return vectors[0]
        return vectors

    def create_embedding(
        self,
        input: EmbeddingInput,
        model: str | None = None,
        *,
        cancellation: _core.Cancellation | None = None,
    ) -> CreateEmbeddingResponse:
        """OpenAI's embeddings response for ``input``: the vectors of :meth:`embed` as lists.

        ``cancellation`` lets another thread stop it (between batches, or inside a decode); it
        then raises :class:`GenerationCancelled`.
        """
        _, vectors, n_tokens = self._embed(input, False, True, cancellation)
        return {
            "object": "list",
            "data": [
                {"object": "embedding", "embedding": v.tolist(), "index": i} for i, v in enumerate(vectors)
            ],
            "model": model or self._name,
            "usage": {"prompt_tokens": n_tokens, "total_tokens": n_tokens},
        }

    def rerank(
        self,
        query: str,
        documents: Sequence[str],
        *,
        top_n: int | None = None,
        normalize: bool = False,
        cancellation: _core.Cancellation | None = None,
    ) -> list[RerankResult]:
        """Score each document's relevance to ``query`` with a reranker, best first.

        The semantics of llama-server's ``/v1/rerank``: each query/document pair is formatted
        as llama-server formats it (the model's ``rerank`` template if it has one, otherwise
        BOS query EOS SEP document EOS), scored in its own sequence, and its score is the
        first classifier output. Needs a reranker GGUF loaded with ``embedding=True``; its
        pooling type is then rank (``pooling_type=4``), the model's default.

        Args:
            query: The query.
            documents: The texts to rank.
            top_n: Return only the best ``top_n`` (default: all).
            normalize: Map the raw scores through the logistic sigmoid into (0, 1), as
                text-embeddings-inference and sentence-transformers' CrossEncoder report a
                single-label reranker's scores (llama-server returns them raw).
            cancellation: Lets another thread stop the scoring (GenerationCancelled).

        Returns:
            One :class:`RerankResult` per document (``top_n`` at most), highest score first;
            equal scores keep the documents' order.

        Raises:
            InvalidArgumentError: No documents, or ``top_n`` < 1.
            LlamaError: The model was not created with ``embedding=True``, or its pooling type
                is not rank (it is not a reranker).
            ContextOverflowError: A formatted pair is longer than ``n_batch``.
        """
        if isinstance(documents, str | bytes):
            raise InvalidArgumentError("documents must be a list of strings, not a single string")
        texts = list(documents)
        if not texts:
            raise InvalidArgumentError("rerank needs at least one document")
        if top_n is not None and top_n < 1:
            raise InvalidArgumentError(f"top_n must be >= 1, got {top_n}")
        if not self._embedding:
            raise LlamaError("reranking needs embeddings: load the reranker with embedding=True")
        pooling = self.context.pooling_type()
        if pooling != POOLING_RANK:
            raise LlamaError(
                f"reranking needs a reranker (pooling type rank), but this context pools with "
                f"'{_POOLING_NAMES.get(pooling, pooling)}': load a reranker GGUF with embedding=True"
            )
        inputs = self.context.rerank_inputs(query.encode("utf-8"), [t.encode("utf-8") for t in texts])
        outputs = self.context.embed(inputs, False, False, cancellation)
        scores = cast(FloatArray, outputs)[:, 0].astype(np.float64)
        if normalize:
            scores = 1.0 / (1.0 + np.exp(-scores))
        order = np.argsort(-scores, kind="stable")[:top_n]
        return [RerankResult(int(i), float(scores[i]), texts[i]) for i in order]
