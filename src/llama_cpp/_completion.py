"""llama-cpp-python's completion API on top of the native token loop: ``create_completion``
(and its async twin) and the OpenAI-style dicts, with logprobs, that it returns."""

from __future__ import annotations

import time
import uuid
from collections.abc import AsyncIterator, Callable, Iterable, Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any, Literal, Protocol, overload

from llama_cpp import _async, _core, fim, hooks
from llama_cpp._options import finish_reason, generate_options
from llama_cpp.grammar import LlamaGrammar
from llama_cpp.hooks import LogitsProcessor, StoppingCriteria
from llama_cpp.llama_base import LlamaBase
from llama_cpp.llama_types import CompletionLogprobs, CompletionUsage, CreateCompletionResponse, FinishReason


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


class NativeStream(Protocol):
    """What both native streams offer: :class:`_core.TokenStream` (one context) and
    :class:`_core.EngineStream` (a pool's request)."""

    def next(self) -> _core.Chunk | None: ...
    def close(self) -> None: ...
    @property
    def finish_reason(self) -> str | None: ...
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
    def n_prompt(self) -> int: ...
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
    n_prompt: int
    logprobs: list[_core.TokenLogprob]
    prompt_logprobs: list[_core.TokenLogprob]


def collect(stream: NativeStream) -> Collected:
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
        n_prompt=stream.n_prompt,
        logprobs=logprobs,
        prompt_logprobs=list(stream.prompt_logprobs),
    )


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

    def response(self, result: Outcome) -> CreateCompletionResponse:
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

    def stream(self, token_stream: NativeStream) -> Iterator[CreateCompletionResponse]:
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
            yield self.chunk("", finish_reason(token_stream.finish_reason))
        finally:
            token_stream.close()


#: create_completion's keywords that are not sampling settings: completion_request's own.
REQUEST_KEYWORDS = frozenset(
    {"suffix", "max_tokens", "logprobs", "echo", "stop", "model", "logits_processor", "stopping_criteria"}
)


def completion_request(
    llm: LlamaBase,
    prompt: str | bytes | Sequence[int],
    *,
    cancellation: _core.Cancellation,
    suffix: str | None = None,
    max_tokens: int | None = 16,
    logprobs: int | None = None,
    echo: bool = False,
    stop: str | Sequence[str] | None = None,
    model: str | None = None,
    logits_processor: LogitsProcessor | Sequence[LogitsProcessor] | None = None,
    stopping_criteria: StoppingCriteria | Sequence[StoppingCriteria] | None = None,
    preserved_tokens: Sequence[int] = (),
) -> tuple[list[int], _core.GenerateOptions, CompletionBuilder]:
    """The prompt tokens, native options and response builder of one ``create_completion``
    call, for :class:`Llama` and :class:`LlamaPool` alike (``llm`` tokenizes). With ``suffix``
    the prompt is the fill-in-the-middle prompt of :mod:`llama_cpp.fim`.

    Raises:
        InvalidArgumentError: ``logprobs`` is negative; ``suffix`` with a model that has no
            FIM tokens, or with ``echo`` and ``logprobs`` together.
    """
    if suffix is None:
        prompt_tokens = llm._prompt_tokens(prompt)
        prompt_text = llm.detokenize(prompt_tokens).decode("utf-8", errors="replace") if echo else ""
    else:
        prompt_tokens, prompt_text = fim.infill_request(
            llm.model, prompt, suffix, echo=echo, logprobs=logprobs
        )
    builder = CompletionBuilder(
        model=model or llm.model_path,
        piece=llm._piece,
        echo=echo,
        prompt_tokens=prompt_tokens,
        prompt_text=prompt_text,
        logprobs=logprobs is not None,
    )
    options = generate_options(
        max_tokens, stop, logprobs=logprobs, prompt_logprobs=echo, cancellation=cancellation
    )
    options.preserved_tokens = list(preserved_tokens)
    hooks.install(options, logits_processor, stopping_criteria)
    return prompt_tokens, options, builder


class CompletionMixin(LlamaBase):
    """llama-cpp-python's ``create_completion`` / ``__call__`` and the async twin."""

    # -- llama-cpp-python's completion API ------------------------------------------------

    @overload
    def create_completion(
        self,
        prompt: str | Sequence[int],
        suffix: str | None = ...,
        max_tokens: int | None = ...,
        temperature: float = ...,
        top_p: float = ...,
        min_p: float = ...,
        typical_p: float = ...,
        logprobs: int | None = ...,
        echo: bool = ...,
        stop: str | Sequence[str] | None = ...,
        frequency_penalty: float = ...,
        presence_penalty: float = ...,
        repeat_penalty: float = ...,
        top_k: int = ...,
        stream: Literal[False] = False,
        seed: int | None = ...,
        mirostat_mode: int = ...,
        mirostat_tau: float = ...,
        mirostat_eta: float = ...,
        model: str | None = ...,
        logit_bias: Mapping[int, float] | None = ...,
        grammar: LlamaGrammar | None = ...,
        logits_processor: LogitsProcessor | Sequence[LogitsProcessor] | None = ...,
        stopping_criteria: StoppingCriteria | Sequence[StoppingCriteria] | None = ...,
        dry_multiplier: float = ...,
        dry_base: float = ...,
        dry_allowed_length: int = ...,
        dry_penalty_last_n: int = ...,
        dry_sequence_breakers: Sequence[str] = ...,
        xtc_probability: float = ...,
        xtc_threshold: float = ...,
        top_n_sigma: float = ...,
    ) -> CreateCompletionResponse: ...

    @overload
    def create_completion(
        self,
        prompt: str | Sequence[int],
        suffix: str | None = ...,
        max_tokens: int | None = ...,
        temperature: float = ...,
        top_p: float = ...,
        min_p: float = ...,
        typical_p: float = ...,
        logprobs: int | None = ...,
        echo: bool = ...,
        stop: str | Sequence[str] | None = ...,
        frequency_penalty: float = ...,
        presence_penalty: float = ...,
        repeat_penalty: float = ...,
        top_k: int = ...,
        *,
        stream: Literal[True],
        seed: int | None = ...,
        mirostat_mode: int = ...,
        mirostat_tau: float = ...,
        mirostat_eta: float = ...,
        model: str | None = ...,
        logit_bias: Mapping[int, float] | None = ...,
        grammar: LlamaGrammar | None = ...,
        logits_processor: LogitsProcessor | Sequence[LogitsProcessor] | None = ...,
        stopping_criteria: StoppingCriteria | Sequence[StoppingCriteria] | None = ...,
        dry_multiplier: float = ...,
        dry_base: float = ...,
        dry_allowed_length: int = ...,
        dry_penalty_last_n: int = ...,
        dry_sequence_breakers: Sequence[str] = ...,
        xtc_probability: float = ...,
        xtc_threshold: float = ...,
        top_n_sigma: float = ...,
    ) -> Iterator[CreateCompletionResponse]: ...

    def create_completion(  # noqa: PLR0917 - llama-cpp-python passes these positionally too
        self,
        prompt: str | Sequence[int],
        suffix: str | None = None,
        max_tokens: int | None = 16,
        temperature: float = 0.8,
        top_p: float = 0.95,
        min_p: float = 0.05,
        typical_p: float = 1.0,
        logprobs: int | None = None,
        echo: bool = False,
        stop: str | Sequence[str] | None = None,
        frequency_penalty: float = 0.0,
        presence_penalty: float = 0.0,
        repeat_penalty: float = 1.0,
        top_k: int = 40,
        stream: bool = False,
        seed: int | None = None,
        mirostat_mode: int = 0,
        mirostat_tau: float = 5.0,
        mirostat_eta: float = 0.1,
        model: str | None = None,
        logit_bias: Mapping[int, float] | None = None,
        grammar: LlamaGrammar | None = None,
        logits_processor: LogitsProcessor | Sequence[LogitsProcessor] | None = None,
        stopping_criteria: StoppingCriteria | Sequence[StoppingCriteria] | None = None,
        dry_multiplier: float = 0.0,
        dry_base: float = 1.75,
        dry_allowed_length: int = 2,
        dry_penalty_last_n: int = 64,
        dry_sequence_breakers: Sequence[str] = ("\n", ":", '"', "*"),
        xtc_probability: float = 0.0,
        xtc_threshold: float = 0.1,
        top_n_sigma: float = -1.0,
    ) -> CreateCompletionResponse | Iterator[CreateCompletionResponse]:
        """Complete ``prompt``, returning llama-cpp-python's (OpenAI's) completion dict.

        Arguments and defaults are llama-cpp-python's. With ``stream=True`` an iterator of
        chunk dicts is returned instead; the last chunk carries ``finish_reason``.
        ``logprobs=k`` adds, per token, the log-softmax of the model's raw logits and the k most
        likely alternatives; with ``echo=True`` the prompt's tokens are scored too.
        ``logits_processor`` / ``stopping_criteria`` are per-token Python hooks (the slow path,
        see :mod:`llama_cpp.hooks`). ``suffix`` asks a model with fill-in-the-middle tokens
        for the text between ``prompt`` and ``suffix`` (:func:`llama_cpp.fim.fim_prompt`);
        ``echo`` then returns the prompt and that text.

        Raises:
            ContextOverflowError: The prompt does not fit in the context window.
            InvalidArgumentError: A sampling value is out of range; ``suffix`` with a model
                without FIM tokens, or with both ``echo`` and ``logprobs``.
        """
        return self._create_completion(
            prompt,
            stream=stream,
            cancellation=_core.Cancellation(),
            suffix=suffix,
            max_tokens=max_tokens,
            logprobs=logprobs,
            echo=echo,
            stop=stop,
            model=model,
            temperature=temperature,
            top_p=top_p,
            min_p=min_p,
            typical_p=typical_p,
            frequency_penalty=frequency_penalty,
            presence_penalty=presence_penalty,
            repeat_penalty=repeat_penalty,
            top_k=top_k,
            seed=seed,
            mirostat_mode=mirostat_mode,
            mirostat_tau=mirostat_tau,
            mirostat_eta=mirostat_eta,
            dry_multiplier=dry_multiplier,
            dry_base=dry_base,
            dry_allowed_length=dry_allowed_length,
            dry_penalty_last_n=dry_penalty_last_n,
            dry_sequence_breakers=tuple(dry_sequence_breakers),
            xtc_probability=xtc_probability,
            xtc_threshold=xtc_threshold,
            top_n_sigma=top_n_sigma,
            logit_bias=dict(logit_bias or {}),
            grammar=grammar,
            logits_processor=logits_processor,
            stopping_criteria=stopping_criteria,
        )

    __call__ = create_completion

    def _create_completion(
        self,
        prompt: str | Sequence[int],
        *,
        stream: bool,
        cancellation: _core.Cancellation,
        preserved_tokens: Sequence[int] = (),
        **kwargs: Any,
    ) -> CreateCompletionResponse | Iterator[CreateCompletionResponse]:
        """``kwargs``: :func:`completion_request`'s keywords, the rest are sampling settings."""
        request = {key: kwargs.pop(key) for key in REQUEST_KEYWORDS if key in kwargs}
        prompt_tokens, options, builder = completion_request(
            self, prompt, cancellation=cancellation, preserved_tokens=preserved_tokens, **request
        )
        sampling = kwargs
        config = self._sampling(None, sampling)
        if stream:
            return builder.stream(self._token_stream(prompt_tokens, config, options))
        return builder.response(self.context.generate(prompt_tokens, config, options))

    @overload
    async def create_completion_async(
        self, prompt: str | Sequence[int], *, stream: Literal[False] = False, **kwargs: Any
    ) -> CreateCompletionResponse: ...

    @overload
    async def create_completion_async(
        self, prompt: str | Sequence[int], *, stream: Literal[True], **kwargs: Any
    ) -> AsyncIterator[CreateCompletionResponse]: ...

    async def create_completion_async(
        self, prompt: str | Sequence[int], *, stream: bool = False, **kwargs: Any
    ) -> CreateCompletionResponse | AsyncIterator[CreateCompletionResponse]:
        """:meth:`create_completion` off the event loop (same keyword arguments).

        With ``stream=True`` it returns an async iterator of chunks (``async for chunk in
        await llm.create_completion_async(..., stream=True)``). Cancelling the task, or
        leaving the ``async for`` early, stops the generation in C++.
        """
        cancellation = _core.Cancellation()
        if stream:
            chunks = self._create_completion(prompt, stream=True, cancellation=cancellation, **kwargs)
            assert not isinstance(chunks, dict)
            return _async.iterate(chunks, cancellation)

        def call() -> CreateCompletionResponse:
            response = self._create_completion(prompt, stream=False, cancellation=cancellation, **kwargs)
            assert isinstance(response, dict)
            return response

        return await _async.run(call, cancellation)
