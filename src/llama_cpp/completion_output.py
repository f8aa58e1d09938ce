"""Completion answers as OpenAI dicts: a finished generation (or a native stream) turned into
llama-cpp-python's ``text_completion`` response or chunks, with logprobs and echo."""

from __future__ import annotations

import time
import uuid
from collections.abc import Callable, Iterable, Iterator, Sequence
from dataclasses import dataclass, field
from typing import Protocol

from llama_cpp import _core
from llama_cpp._options import finish_reason
from llama_cpp.llama_types import (
    CompletionChoice,
    CompletionLogprobs,
    CompletionUsage,
    CreateCompletionResponse,
    FinishReason,
)


@dataclass
class LogprobsBuilder:
    """Accumulates llama-cpp-python's ``logprobs`` dict: token texts, their character offsets
    in the returned text, their logprobs and the top alternatives (with the token itself)."""

    piece: Callable[[int], str]
    offset: int = 0

    def build(
        self, entries: Iterable[_core.TokenLogprob | None], tokens: Iterable[int]
    ) -> CompletionLogprobs:
        out: CompletionLogprobs = {"tokens": [], "text_offset": [], "token_logprobs": [], "top_logprobs": []}
        for entry, token in zip(entries, tokens, strict=True):
            text = self.piece(token)
            out["tokens"].append(text)
            out["text_offset"].append(self.offset)
            self.offset += len(text)
            if entry is None:
                out["token_logprobs"].append(None)
                out["top_logprobs"].append(None)
                continue
            top = {self.piece(alt): logprob for alt, logprob in entry.top}
            top[text] = entry.logprob
            out["token_logprobs"].append(entry.logprob)
            out["top_logprobs"].append(top)
        return out


def _merge(a: CompletionLogprobs, b: CompletionLogprobs) -> CompletionLogprobs:
    return {
        "tokens": a["tokens"] + b["tokens"],
        "text_offset": a["text_offset"] + b["text_offset"],
        "token_logprobs": a["token_logprobs"] + b["token_logprobs"],
        "top_logprobs": a["top_logprobs"] + b["top_logprobs"],
    }


class GenerationStream(Protocol):
    """A generation read chunk by chunk: what :meth:`LlamaPool.submit` returns, and what
    both native streams offer (:class:`_core.TokenStream` of one context,
    :class:`_core.EngineStream` of a pool's request).

    ``next()`` returns the next :class:`~llama_cpp.Chunk` (text, tokens, logprobs), or None
    at the end; ``cancel()`` (from any thread) makes it end with GenerationCancelled;
    ``close()`` stops it and lets go of its context or slot. The properties are read once it
    ended: ``finish_reason`` (``"stop"``, ``"length"``), ``stop_sequence`` (the stop string
    that ended it, or None), ``queue_seconds`` (a pool's request: how long it waited for a
    slot, None while it waits; always None for a context's stream), ``tokens``,
    ``n_prompt``, ``n_reused`` (prompt tokens served from the cache), ``prompt_logprobs``.
    """

    def next(self) -> _core.Chunk | None: ...
    def cancel(self) -> None: ...
    def close(self) -> None: ...
    @property
    def n_reused(self) -> int: ...
    @property
    def finish_reason(self) -> str | None: ...
    @property
    def stop_sequence(self) -> str | None: ...
    @property
    def queue_seconds(self) -> float | None: ...
    @property
    def tokens(self) -> list[int]: ...
    @property
    def n_prompt(self) -> int: ...
    @property
    def prompt_logprobs(self) -> list[_core.TokenLogprob]: ...


class Outcome(Protocol):
    """A finished generation: :class:`_core.GenerationResult`, or a stream read to its end."""

    @property
    def text(self) -> str: ...
    @property
    def tokens(self) -> list[int]: ...
    @property
    def finish_reason(self) -> str: ...
    @property
    def stop_sequence(self) -> str | None: ...
    @property
    def n_prompt(self) -> int: ...
    @property
    def n_reused(self) -> int: ...
    @property
    def logprobs(self) -> list[_core.TokenLogprob]: ...
    @property
    def prompt_logprobs(self) -> list[_core.TokenLogprob]: ...


@dataclass(frozen=True, slots=True)
class Collected:
    """A native stream read to its end (see :func:`collect`)."""

    text: str
    tokens: list[int]
    finish_reason: str
    stop_sequence: str | None
    n_prompt: int
    n_reused: int
    logprobs: list[_core.TokenLogprob]
    prompt_logprobs: list[_core.TokenLogprob]


def collect(stream: GenerationStream) -> Collected:
    """Read ``stream`` to its end (closing it, also on error) into one outcome."""
    text: list[str] = []
    logprobs: list[_core.TokenLogprob] = []
    try:
        while (chunk := stream.next()) is not None:
            text.append(chunk.text)
            logprobs += chunk.logprobs
    finally:
        stream.close()
    return Collected(
        text="".join(text),
        tokens=list(stream.tokens),
        finish_reason=stream.finish_reason or "stop",
        stop_sequence=stream.stop_sequence,
        n_prompt=stream.n_prompt,
        n_reused=stream.n_reused,
        logprobs=logprobs,
        prompt_logprobs=list(stream.prompt_logprobs),
    )


def usage(n_prompt: int, n_generated: int, n_cached: int) -> CompletionUsage:
    """OpenAI's ``usage``, with the prompt tokens served from the cache
    (``prompt_tokens_details.cached_tokens``)."""
    return {
        "prompt_tokens": n_prompt,
        "completion_tokens": n_generated,
        "total_tokens": n_prompt + n_generated,
        "prompt_tokens_details": {"cached_tokens": n_cached},
    }


@dataclass
class CompletionBuilder:
    """The dicts of one completion: id, time and model are shared by all chunks of a stream.

    ``prompt_tokens``/``prompt_text`` are echoed when ``echo`` is set; ``logprobs`` is set
    when they were asked for.
    """

    model: str
    piece: Callable[[int], str]
    echo: bool = False
    prompt_tokens: list[int] = field(default_factory=list)
    prompt_text: str = ""
    logprobs: bool = False
    #: Stream a last chunk with no choices and the usage (OpenAI's stream_options).
    include_usage: bool = False
    id: str = field(default_factory=lambda: f"cmpl-{uuid.uuid4()}")
    created: int = field(default_factory=lambda: int(time.time()))

    def __post_init__(self) -> None:
        self._logprobs = LogprobsBuilder(self.piece)

    def chunk(
        self,
        text: str,
        reason: FinishReason | None,
        logprobs: CompletionLogprobs | None = None,
        stop_sequence: str | None = None,
    ) -> CreateCompletionResponse:
        """One choice's dict; a finished one (``reason`` set) also has ``stop_reason``: the
        stop string that ended it, or None (vLLM's field)."""
        choice: CompletionChoice = {"text": text, "index": 0, "logprobs": logprobs, "finish_reason": reason}
        if reason is not None:
            choice["stop_reason"] = stop_sequence
        return {
            "id": self.id,
            "object": "text_completion",
            "created": self.created,
            "model": self.model,
            "choices": [choice],
        }

    def _prompt_logprobs(self, scored: Sequence[_core.TokenLogprob]) -> CompletionLogprobs:
        # The first prompt token has nothing before it to be scored against.
        entries: list[_core.TokenLogprob | None] = [None, *scored]
        return self._logprobs.build(entries, self.prompt_tokens)

    def response(self, result: Outcome) -> CreateCompletionResponse:
        logprobs = None
        if self.logprobs:
            # Offsets count characters of the returned text: the echoed prompt comes first.
            logprobs = self._prompt_logprobs(result.prompt_logprobs) if self.echo else None
            generated = self._logprobs.build(result.logprobs, result.tokens)
            logprobs = generated if logprobs is None else _merge(logprobs, generated)
        text = (self.prompt_text if self.echo else "") + result.text
        response = self.chunk(text, finish_reason(result.finish_reason), logprobs, result.stop_sequence)
        return {**response, "usage": usage(result.n_prompt, len(result.tokens), result.n_reused)}

    def stream(self, token_stream: GenerationStream) -> Iterator[CreateCompletionResponse]:
        """Chunks as generated; the last one is empty and carries the finish reason."""
        try:
            first = True
            while (piece := token_stream.next()) is not None:
                if first and self.echo:
                    prompt_logprobs = (
                        self._prompt_logprobs(token_stream.prompt_logprobs) if self.logprobs else None
                    )
                    yield self.chunk(self.prompt_text, None, prompt_logprobs)
                first = False
                logprobs = self._logprobs.build(piece.logprobs, piece.tokens) if self.logprobs else None
                if piece.text or piece.tokens:
                    yield self.chunk(piece.text, None, logprobs)
            if first and self.echo:  # nothing was generated: the prompt is still echoed
                prompt_logprobs = (
                    self._prompt_logprobs(token_stream.prompt_logprobs) if self.logprobs else None
                )
                yield self.chunk(self.prompt_text, None, prompt_logprobs)
            yield self.chunk("", finish_reason(token_stream.finish_reason), None, token_stream.stop_sequence)
            if self.include_usage:
                n_prompt, n_generated = token_stream.n_prompt, len(token_stream.tokens)
                yield {
                    "id": self.id,
                    "object": "text_completion",
                    "created": self.created,
                    "model": self.model,
                    "choices": [],
                    "usage": usage(n_prompt, n_generated, token_stream.n_reused),
                }
        finally:
            token_stream.close()
