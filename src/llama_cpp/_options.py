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
        InvalidArgumentError: ``max_tokens`` or ``logprobs`` is not an int, ``logprobs`` is
            negative, a stop is not a str or has no UTF-8 form (a lone surrogate).
    """
    options = _core.GenerateOptions()
    max_tokens = _int_or_none("max_tokens", max_tokens)
    # Past int32, a limit is no limit: no context window holds that many tokens.
    options.max_tokens = 0 if max_tokens is None or not 0 < max_tokens < _INT32_END else max_tokens
    options.stop = _stops(stop)
    logprobs = _int_or_none("logprobs", logprobs)
    if logprobs is not None:
        if logprobs < 0:
            raise InvalidArgumentError(f"logprobs must be >= 0 (top alternatives per token), got {logprobs}")
        options.n_probs = min(logprobs, _INT32_END - 1)  # llama.cpp caps it at the vocabulary
        options.prompt_logprobs = prompt_logprobs
    if cancellation is not None:
        options.cancellation = cancellation
    return options


_INT32_END = 2**31


def _int_or_none(name: str, value: object) -> int | None:
    if value is None:
        return None
    if isinstance(value, bool) or not isinstance(value, int):
        raise InvalidArgumentError(f"{name} must be an int or None, got {value!r}")
    return value


def utf8(text: str, what: str) -> bytes:
    """``text`` as UTF-8; InvalidArgumentError naming ``what`` if it has no UTF-8 form (a lone
    surrogate), as the tokenizer, the stop strings and the templates need it."""
    try:
        return text.encode("utf-8")
    except UnicodeEncodeError as e:
        raise InvalidArgumentError(f"{what} has no UTF-8 form ({e.reason})") from None


def _stops(stop: object) -> list[str]:
    """The non-empty stop strings of ``stop`` (a str, a sequence of str, or None)."""
    stops = [stop] if isinstance(stop, str) else stop if stop is not None else []
    if not isinstance(stops, Sequence) or not all(isinstance(s, str) for s in stops):
        raise InvalidArgumentError(f"stop must be a str or a list of str, got {stop!r}")
    for s in stops:
        utf8(s, f"stop {s!r}")
    return [s for s in stops if s]


def finish_reason(reason: str | None) -> FinishReason:
    """The OpenAI finish reason of a native one ('stop' or 'length')."""
    return "length" if reason == "length" else "stop"
