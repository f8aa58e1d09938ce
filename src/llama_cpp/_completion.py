"""llama-cpp-python's completion API on top of the native token loop: option building and the
OpenAI-style dicts (with logprobs) returned by :meth:`Llama.create_completion`."""

from __future__ import annotations

import time
import uuid
from collections.abc import Callable, Iterable, Iterator, Sequence
from dataclasses import dataclass, field

from llama_cpp import _core
from llama_cpp.errors import InvalidArgumentError
from llama_cpp.llama_types import CompletionLogprobs, CompletionUsage, CreateCompletionResponse, FinishReason


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
    id: str = field(default_factory=lambda: f"cmpl-{uuid.uuid4()}")
    created: int = field(default_factory=lambda: int(time.time()))

    def __post_init__(self) -> None:
        self._logprobs = LogprobsBuilder(self.piece)

    def chunk(
        self, text: str, reason: FinishReason | None, logprobs: CompletionLogprobs | None = None
    ) -> CreateCompletionResponse:
        return {
            "id": self.id,
            "object": "text_completion",
            "created": self.created,
            "model": self.model,
            "choices": [{"text": text, "index": 0, "logprobs": logprobs, "finish_reason": reason}],
        }

    def _prompt_logprobs(self, scored: Sequence[_core.TokenLogprob]) -> CompletionLogprobs:
        # The first prompt token has nothing before it to be scored against.
        entries: list[_core.TokenLogprob | None] = [None, *scored]
        return self._logprobs.build(entries, self.prompt_tokens)

    def response(self, result: _core.GenerationResult) -> CreateCompletionResponse:
        logprobs = None
        if self.logprobs:
            # Offsets count characters of the returned text: the echoed prompt comes first.
            logprobs = self._prompt_logprobs(result.prompt_logprobs) if self.echo else None
            generated = self._logprobs.build(result.logprobs, result.tokens)
            logprobs = generated if logprobs is None else _merge(logprobs, generated)
        usage: CompletionUsage = {
            "prompt_tokens": result.n_prompt,
            "completion_tokens": len(result.tokens),
            "total_tokens": result.n_prompt + len(result.tokens),
        }
        text = (self.prompt_text if self.echo else "") + result.text
        return {**self.chunk(text, finish_reason(result.finish_reason), logprobs), "usage": usage}

    def stream(self, token_stream: _core.TokenStream) -> Iterator[CreateCompletionResponse]:
        """Chunks as generated; the last one is empty and carries the finish reason."""
        try:
            yield from self.stream_chunks(token_stream, token_stream.next)
        finally:
            token_stream.close()

    def stream_chunks(
        self, token_stream: _core.TokenStream, next_chunk: Callable[[], _core.Chunk | None]
    ) -> Iterator[CreateCompletionResponse]:
        first = True
        while (piece := next_chunk()) is not None:
            if first and self.echo:
                prompt_logprobs = (
                    self._prompt_logprobs(token_stream.prompt_logprobs) if self.logprobs else None
                )
                yield self.chunk(self.prompt_text, None, prompt_logprobs)
            first = False
            logprobs = self._logprobs.build(piece.logprobs, piece.tokens) if self.logprobs else None
            if piece.text or piece.tokens:
                yield self.chunk(piece.text, None, logprobs)
        yield self.chunk("", finish_reason(token_stream.finish_reason))
