"""Embeddings: :meth:`Llama.embed`, :meth:`Llama.create_embedding` and its async twin.

Vectors cross from C++ as float32 numpy arrays that own their memory (no Python lists of
floats); only the OpenAI-style :meth:`Llama.create_embedding` turns them into lists, because
its response is JSON.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import TypeAlias, cast

import numpy as np
import numpy.typing as npt

from llama_cpp import _async, _core
from llama_cpp.llama_base import LlamaBase
from llama_cpp.llama_types import CreateEmbeddingResponse

__all__ = ["EmbeddingMixin"]

EmbeddingInput: TypeAlias = str | Sequence[str] | Sequence[int] | Sequence[Sequence[int]]
FloatArray: TypeAlias = npt.NDArray[np.float32]


class EmbeddingMixin(LlamaBase):
    """Embedding vectors of texts or token lists (a context created with ``embedding=True``)."""

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
        classifier outputs instead of ``n_embd``. Inputs are batched
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
            "model": model or self.model_path,
            "usage": {"prompt_tokens": n_tokens, "total_tokens": n_tokens},
        }

    async def create_embedding_async(
        self, input: EmbeddingInput, model: str | None = None
    ) -> CreateEmbeddingResponse:
        """:meth:`create_embedding` off the event loop; cancelling the task stops it."""
        cancellation = _core.Cancellation()
        return await _async.run(
            lambda: self.create_embedding(input, model, cancellation=cancellation), cancellation
        )
