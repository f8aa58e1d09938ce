"""The results of the native generation API and of the pool: small frozen values."""

from __future__ import annotations

from dataclasses import dataclass

from llama_cpp import _core
from llama_cpp._options import finish_reason
from llama_cpp.completion_output import Outcome
from llama_cpp.llama_types import FinishReason

__all__ = ["Completion", "Perf", "PoolStats"]


@dataclass(frozen=True, slots=True)
class Completion:
    """The outcome of :meth:`Llama.complete`.

    Attributes:
        text: The generated text, without the stop string or end-of-generation token.
        tokens: The generated token ids (including those that formed a stop string).
        finish_reason: ``"stop"`` (end of generation or a stop string) or ``"length"``
            (``max_tokens`` reached, or the context window is full).
        stop_sequence: The stop string that ended the generation, or None (the end of
            generation token, a stop hook, or a limit ended it).
        prompt_tokens: Number of prompt tokens.
        cached_tokens: Prompt tokens reused from the previous call instead of evaluated.
    """

    text: str
    tokens: list[int]
    finish_reason: FinishReason
    prompt_tokens: int
    cached_tokens: int
    stop_sequence: str | None = None

    @classmethod
    def from_outcome(cls, outcome: Outcome) -> Completion:
        """The completion of a finished generation (of either front end)."""
        return cls(
            text=outcome.text,
            tokens=list(outcome.tokens),
            finish_reason=finish_reason(outcome.finish_reason),
            prompt_tokens=outcome.n_prompt,
            cached_tokens=outcome.n_reused,
            stop_sequence=outcome.stop_sequence,
        )


@dataclass(frozen=True, slots=True)
class Perf:
    """Timings of a context, as llama.cpp measures them.

    Attributes:
        load_ms: Model load time.
        prompt_tokens: Prompt tokens evaluated (batched).
        prompt_ms: Time spent on them.
        eval_tokens: Tokens decoded one at a time (generation).
        eval_ms: Time spent on them.
    """

    load_ms: float
    prompt_tokens: int
    prompt_ms: float
    eval_tokens: int
    eval_ms: float

    @property
    def prompt_tokens_per_second(self) -> float:
        return self.prompt_tokens / self.prompt_ms * 1000.0 if self.prompt_ms > 0 else 0.0

    @property
    def eval_tokens_per_second(self) -> float:
        return self.eval_tokens / self.eval_ms * 1000.0 if self.eval_ms > 0 else 0.0


@dataclass(frozen=True, slots=True)
class PoolStats:
    """What a :class:`~llama_cpp.LlamaPool` is doing, and counters since it started.

    Attributes:
        n_slots: Sequences decoded concurrently (``pool_size``).
        n_busy: Requests holding a slot.
        n_waiting: Requests queued for a slot.
        n_decode_calls: ``llama_decode`` calls made.
        n_prompt_evaluated: Prompt tokens decoded.
        n_prompt_reused: Prompt tokens served from cached prefixes instead.
        n_generated: Tokens sampled.
        n_cached_tokens: Tokens the sequences hold in the KV cache now (a prefix that
            several sequences share counts once for each).
        queue_time_buckets: How long admitted requests waited for a slot: ``(upper bound in
            seconds, requests that waited at most that long)``, cumulative, ``inf`` last
            (a Prometheus histogram's buckets).
        queue_time_sum: Seconds that admitted requests waited for a slot, in all.
    """

    n_slots: int
    n_busy: int
    n_waiting: int
    n_decode_calls: int
    n_prompt_evaluated: int
    n_prompt_reused: int
    n_generated: int
    n_cached_tokens: int
    queue_time_buckets: tuple[tuple[float, int], ...]
    queue_time_sum: float

    @classmethod
    def from_native(cls, stats: _core.EngineStats) -> PoolStats:
        return cls(
            n_slots=stats.n_slots,
            n_busy=stats.n_busy,
            n_waiting=stats.n_waiting,
            n_decode_calls=stats.n_decode_calls,
            n_prompt_evaluated=stats.n_prompt_evaluated,
            n_prompt_reused=stats.n_prompt_reused,
            n_generated=stats.n_generated,
            n_cached_tokens=stats.n_cached_tokens,
            queue_time_buckets=tuple(stats.queue_time_buckets),
            queue_time_sum=stats.queue_time_sum,
        )
