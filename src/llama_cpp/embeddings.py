"""Embeddings: :meth:`Llama.embed`, :meth:`Llama.create_embedding` and its async twin."""

from __future__ import annotations

from collections.abc import Sequence
from typing import cast

from llama_cpp import _async, _core
from llama_cpp.llama_base import LlamaBase
from llama_cpp.llama_types import CreateEmbeddingResponse


class EmbeddingMixin(LlamaBase):
    """Embedding vectors of texts or token lists (a context created with ``embedding=True``)."""

    def _embedding_inputs(
        self, input: str | Sequence[str] | Sequence[int] | Sequence[Sequence[int]]
    ) -> tuple[bool, list[list[int]]]:
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
        input: str | Sequence[str] | Sequence[int] | Sequence[Sequence[int]],
        normalize: bool,
        truncate: bool,
        cancellation: _core.Cancellation | None = None,
    ) -> tuple[bool, list[list[list[float]]], int]:
        single, tokens = self._embedding_inputs(input)
        vectors = self.context.embed(tokens, normalize, truncate, cancellation)
        return single, vectors, sum(min(len(t), self.context.n_batch()) for t in tokens)

    def embed(
        self,
        input: str | Sequence[str] | Sequence[int] | Sequence[Sequence[int]],
        normalize: bool = False,
        truncate: bool = True,
    ) -> list[float] | list[list[float]] | list[list[list[float]]]:
        """Embeddings of a text (or token list), or of each of several.

        With a pooling type (mean, CLS, last, rank; the model's by default) each input gives
        one vector; with ``pooling_type=0`` (none) each gives a vector per token. Inputs are
        batched together; each is computed in its own sequence, so results do not depend on
        the batching.

        Args:
            input: A string or token list, or a list of them.
            normalize: Scale each vector to unit L2 norm (off by default, as in llama-cpp-python).
            truncate: Cut inputs longer than ``n_batch`` (otherwise ContextOverflowError).

        Raises:
            LlamaError: The model was not created with ``embedding=True``.
        """
        single, vectors, _ = self._embed(input, normalize, truncate)
        pooled = [v[0] if self.context.pooling_type() != 0 else v for v in vectors]
        return pooled[0] if single else pooled  # type: ignore[return-value]

    def create_embedding(
        self,
        input: str | Sequence[str] | Sequence[int] | Sequence[Sequence[int]],
        model: str | None = None,
        *,
        cancellation: _core.Cancellation | None = None,
    ) -> CreateEmbeddingResponse:
        """OpenAI's embeddings response for ``input`` (vectors as :meth:`embed` gives them).

        ``cancellation`` lets another thread stop it (between batches, or inside a decode); it
        then raises :class:`GenerationCancelled`.
        """
        _, vectors, n_tokens = self._embed(input, False, True, cancellation)
        pooled = self.context.pooling_type() != 0
        return {
            "object": "list",
            "data": [
                {"object": "embedding", "embedding": v[0] if pooled else v, "index": i}
                for i, v in enumerate(vectors)
            ],
            "model": model or self.model_path,
            "usage": {"prompt_tokens": n_tokens, "total_tokens": n_tokens},
        }

    async def create_embedding_async(
        self, input: str | Sequence[str] | Sequence[int] | Sequence[Sequence[int]], model: str | None = None
    ) -> CreateEmbeddingResponse:
        """:meth:`create_embedding` off the event loop; cancelling the task stops it."""
        cancellation = _core.Cancellation()
        return await _async.run(
            lambda: self.create_embedding(input, model, cancellation=cancellation), cancellation
        )
