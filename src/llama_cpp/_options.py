"""Native options of one generation, shared by every generation API."""

from __future__ import annotations

from collections.abc import Sequence

from llama_cpp import _core
from llama_cpp.errors import InvalidArgumentError
from llama_cpp.llama_types import FinishReason


def generate_options(
    max_tokens: int | None,
    stop: str | Sequence[str] | None,
    *,
    logprobs: int | None = None,
    prompt_logprobs: bool = False,
    cancellation: _core.Cancellation | None = None,
) -> _core.GenerateOptions:
    """The native options of one generation.

    Raises:
        InvalidArgumentError: ``logprobs`` is negative.
    """
    options = _core.GenerateOptions()
    options.max_tokens = 0 if max_tokens is None or max_tokens <= 0 else max_tokens
    options.stop = [stop] if isinstance(stop, str) else [s for s in stop or () if s]
    if logprobs is not None:
        if logprobs < 0:
            raise InvalidArgumentError(f"logprobs must be >= 0 (top alternatives per token), got {logprobs}")
        options.n_probs = logprobs
        options.prompt_logprobs = prompt_logprobs
    if cancellation is not None:
        options.cancellation = cancellation
    return options


def finish_reason(reason: str | None) -> FinishReason:
    """The OpenAI finish reason of a native one ('stop' or 'length')."""
    return "length" if reason == "length" else "stop"
