"""Builders of the OpenAI-style completion dicts returned by :meth:`Llama.create_completion`."""

from __future__ import annotations

import time
import uuid
from collections.abc import Iterator
from dataclasses import dataclass, field

from llama_cpp import _core
from llama_cpp.llama_types import CompletionUsage, CreateCompletionResponse, FinishReason


def finish_reason(reason: str | None) -> FinishReason:
    """The OpenAI finish reason of a native one ('stop' or 'length')."""
    return "length" if reason == "length" else "stop"


@dataclass(frozen=True)
class CompletionBuilder:
    """The id, time and model name shared by a response and all chunks of one stream."""

    model: str
    id: str = field(default_factory=lambda: f"cmpl-{uuid.uuid4()}")
    created: int = field(default_factory=lambda: int(time.time()))

    def chunk(self, text: str, reason: FinishReason | None) -> CreateCompletionResponse:
        return {
            "id": self.id,
            "object": "text_completion",
            "created": self.created,
            "model": self.model,
            "choices": [{"text": text, "index": 0, "logprobs": None, "finish_reason": reason}],
        }

    def response(self, text: str, result: _core.GenerationResult) -> CreateCompletionResponse:
        completion_tokens = len(result.tokens)
        usage: CompletionUsage = {
            "prompt_tokens": result.n_prompt,
            "completion_tokens": completion_tokens,
            "total_tokens": result.n_prompt + completion_tokens,
        }
        return {**self.chunk(text, finish_reason(result.finish_reason)), "usage": usage}

    def stream(self, prefix: str, token_stream: _core.TokenStream) -> Iterator[CreateCompletionResponse]:
        """Chunks of text as generated; the last one is empty and carries the finish reason."""
        try:
            if prefix:
                yield self.chunk(prefix, None)
            while (piece := token_stream.next()) is not None:
                if piece.text:
                    yield self.chunk(piece.text, None)
            yield self.chunk("", finish_reason(token_stream.finish_reason))
        finally:
            token_stream.close()
