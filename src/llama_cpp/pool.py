"""`LlamaPool`: many concurrent requests on one copy of the weights (continuous batching).

One model, one llama.cpp context holding ``pool_size`` sequences, and a scheduler thread in
C++ (:class:`llama_cpp._core.Engine`) that decodes the next token of every running request
in one batch, together with prompt chunks of newly admitted ones, as llama-server does.
Each request has its own sequence decoder, the one :class:`Llama` runs (sampler chain with
seed, grammar and penalties, stop strings, token limit, logprobs, Python hooks), and its own
LoRA adapters: requests with different adapter sets are decoded in different batches.
Requests beyond the slots wait in a bounded queue; a full queue raises :class:`PoolBusyError`.
A prompt that starts like a cached or running sequence copies that prefix instead of
evaluating it again, so a shared system prompt is evaluated once.

Memory: the weights once, plus ``pool_size`` sequences of ``n_ctx`` tokens of KV cache
(``n_ctx`` is per sequence), plus one batch's compute buffers.

The API is async (``await pool.generate(...)``); every method has a synchronous twin named
``*_sync`` that may be called from any number of threads at once.
"""

from __future__ import annotations

import asyncio
import math
import os
import threading
from collections.abc import AsyncIterator, Callable, Iterator, Mapping, Sequence
from dataclasses import replace
from typing import Any, Self, TypeVar

from llama_cpp import _async, _core
from llama_cpp._completion import REQUEST_KEYWORDS, CompletionBuilder, collect, completion_request
from llama_cpp._core import LoraAdapter
from llama_cpp._options import generate_options
from llama_cpp.chat_output import OutputParser, chat_chunks, chat_response
from llama_cpp.config import DEFAULTS, LlamaConfig
from llama_cpp.errors import InvalidArgumentError, PoolBusyError
from llama_cpp.llama import Llama
from llama_cpp.llama_types import (
    ChatCompletionChunk,
    CreateChatCompletionResponse,
    CreateCompletionResponse,
    CreateEmbeddingResponse,
)
from llama_cpp.params import SamplingParams

__all__ = ["LlamaPool", "PoolBusyError"]

T = TypeVar("T")
Prompt = str | bytes | Sequence[int]
Messages = Sequence[Mapping[str, Any]]

# create_completion's keywords on the pool: completion_request's, the sampling settings, lora.
Lora = Mapping[LoraAdapter, float]
# llama-cpp-python's create_completion names its SamplingParams fields the same way.
_SAMPLING_FIELDS = frozenset(SamplingParams.__dataclass_fields__)
_COMPLETION_KEYWORDS = REQUEST_KEYWORDS | _SAMPLING_FIELDS | {"lora"}


class LlamaPool:
    """Serve concurrent requests from one model with continuous batching.

    Args:
        model_path: Path to a GGUF file.
        pool_size: Requests decoded concurrently (sequences of the shared context).
        max_queue: Requests that may wait for a free sequence; one more raises
            :class:`PoolBusyError` (batch methods wait for room instead).
        config: The model and context settings as a :class:`LlamaConfig`.
        **llama_kwargs: :class:`Llama`'s keyword arguments. ``n_ctx`` is the window of each
            sequence (0: the model's window, shared by all); ``n_batch`` (>= ``pool_size``)
            caps the tokens decoded per step; ``lora_path`` loads an adapter that every
            request runs with unless it names its own (see :meth:`load_lora`).

    Raises:
        ModelLoadError: The file is missing or not a loadable GGUF model.
        InvalidArgumentError: An argument is out of range.
    """

    def __init__(
        self,
        model_path: str | os.PathLike[str],
        pool_size: int = 4,
        *,
        max_queue: int = 64,
        config: LlamaConfig | None = None,
        **llama_kwargs: Any,
    ) -> None:
        if config is None:
            config = LlamaConfig(**llama_kwargs)
        elif llama_kwargs:
            config = replace(config, **{k: v for k, v in llama_kwargs.items() if v != DEFAULTS.get(k)})
        if config.embedding or config.vocab_only:
            raise InvalidArgumentError("a LlamaPool generates text: embedding/vocab_only are not accepted")
        self.model_path = os.fspath(model_path)
        self.pool_size = pool_size
        self._embedder: Llama | None = None
        self._embedder_lock = threading.Lock()
        self._model = _core.Model(self.model_path, config.model_options())
        try:
            # Tokenization and chat templates: the same model, no context of its own.
            self._llm = Llama.sharing(self._model, self.model_path, replace(config, vocab_only=True))
            context = config.context_options()
            context.n_ctx = config.n_ctx * pool_size
            options = _core.EngineOptions()
            options.n_slots = pool_size
            options.max_queue = max_queue
            self._engine = _core.Engine(self._model, context, options)
            self._loras: dict[LoraAdapter, float] = {}
            self._loras_lock = threading.Lock()
            if config.lora_path is not None:
                self.load_lora(config.lora_path, config.lora_scale)
        except BaseException:
            self.close()
            raise
        self._config = config

    # -- lifecycle ------------------------------------------------------------------------

    def close(self) -> None:
        """Stop the scheduler, fail unfinished requests with :class:`ClosedError`, free the
        context and the weights. Idempotent."""
        if hasattr(self, "_engine"):
            self._engine.close()
        with self._embedder_lock:
            if self._embedder is not None:
                self._embedder.close()
        if hasattr(self, "_llm"):
            self._llm.close()  # drops its chat templates' reference to the model
        self._model.close()

    def __enter__(self) -> Self:
        return self

    def __exit__(self, *exc_info: object) -> None:
        self.close()

    async def __aenter__(self) -> Self:
        return self

    async def __aexit__(self, *exc_info: object) -> None:
        await asyncio.to_thread(self.close)

    def __repr__(self) -> str:
        return f"LlamaPool({self.model_path!r}, pool_size={self.pool_size})"

    def stats(self) -> _core.EngineStats:
        """Slots in use, queued requests, and counters of decoded and reused tokens."""
        return self._engine.stats()

    @property
    def n_ctx(self) -> int:
        """The window of each sequence, in tokens."""
        return self._engine.n_ctx_seq

    @property
    def llama(self) -> Llama:
        """A :class:`Llama` over the pool's model for tokenizing and chat formatting (it has
        no context: it cannot generate)."""
        return self._llm

    # -- LoRA -----------------------------------------------------------------------------

    def load_lora(self, path: str | os.PathLike[str], scale: float = 1.0) -> LoraAdapter:
        """Load the LoRA adapter at ``path`` and run every request with it at ``scale`` (unless
        the request names its own adapters with ``lora={adapter: scale, ...}``).

        Requests already running keep the adapters they started with. A cached prefix is
        only reused by a request with the same adapters and scales.

        Raises:
            ModelLoadError: The file is missing or is not a LoRA adapter of this model.
            InvalidArgumentError: ``scale`` is not finite.
        """
        _check_lora_scale(scale)
        adapter = _core.LoraAdapter(self._model, os.fspath(path))
        with self._loras_lock:
            self._loras[adapter] = scale
        return adapter

    def set_lora_scale(self, adapter: LoraAdapter, scale: float) -> None:
        """Change the scale of a default adapter (InvalidArgumentError if it is not one, or
        if ``scale`` is not finite)."""
        _check_lora_scale(scale)
        with self._loras_lock:
            if adapter not in self._loras:
                raise InvalidArgumentError(f"{adapter!r} is not applied to this pool")
            self._loras[adapter] = scale

    def remove_lora(self, adapter: LoraAdapter) -> None:
        """Stop running new requests with ``adapter`` (InvalidArgumentError if not applied)."""
        with self._loras_lock:
            if self._loras.pop(adapter, None) is None:
                raise InvalidArgumentError(f"{adapter!r} is not applied to this pool")

    def clear_lora(self) -> None:
        """Run new requests with the base model alone."""
        with self._loras_lock:
            self._loras.clear()

    @property
    def loras(self) -> dict[LoraAdapter, float]:
        """The adapters new requests run with by default, and their scales."""
        with self._loras_lock:
            return dict(self._loras)

    def _lora_list(self, lora: Lora | None) -> list[tuple[LoraAdapter, float]]:
        return list((self.loras if lora is None else lora).items())

    # -- the native core ------------------------------------------------------------------

    def submit(
        self,
        prompt: Prompt,
        *,
        max_tokens: int | None = 256,
        sampling: SamplingParams | None = None,
        stop: str | Sequence[str] | None = None,
        cancellation: _core.Cancellation | None = None,
        wait: bool = False,
        lora: Lora | None = None,
    ) -> _core.EngineStream:
        """Queue a generation and return its native stream (see :meth:`generate_stream_sync`).

        Args:
            wait: Block while the queue is full instead of raising :class:`PoolBusyError`.
            lora: The LoRA adapters (of this pool's model) and scales to run with; None: the
                pool's defaults (:attr:`loras`), ``{}``: none.

        Raises:
            PoolBusyError: Every slot is busy and the queue is full.
            ContextOverflowError: The prompt is longer than a sequence's window.
            InvalidArgumentError: A sampling value or token id is out of range.
            ClosedError: The pool is closed.
        """
        options = generate_options(max_tokens, stop, cancellation=cancellation)
        return self._submit(
            self._llm._prompt_tokens(prompt), self._llm._sampling(sampling), options, wait, lora
        )

    def _submit(
        self,
        tokens: list[int],
        sampling: _core.SamplerConfig,
        options: _core.GenerateOptions,
        wait: bool,
        lora: Lora | None = None,
    ) -> _core.EngineStream:
        return self._engine.submit(tokens, sampling, options, wait, self._lora_list(lora))

    def generate_sync(
        self,
        prompt: Prompt,
        *,
        max_tokens: int | None = 256,
        sampling: SamplingParams | None = None,
        stop: str | Sequence[str] | None = None,
        cancellation: _core.Cancellation | None = None,
    ) -> str:
        """The generated text of ``prompt``; blocks this thread only (see :meth:`submit`)."""
        stream = self.submit(
            prompt, max_tokens=max_tokens, sampling=sampling, stop=stop, cancellation=cancellation
        )
        return "".join(_texts(stream))

    def generate_stream_sync(
        self,
        prompt: Prompt,
        *,
        max_tokens: int | None = 256,
        sampling: SamplingParams | None = None,
        stop: str | Sequence[str] | None = None,
        cancellation: _core.Cancellation | None = None,
    ) -> Iterator[str]:
        """Text as it is generated (whole UTF-8 characters). Leaving the iteration early
        cancels the request and frees its slot."""
        stream = self.submit(
            prompt, max_tokens=max_tokens, sampling=sampling, stop=stop, cancellation=cancellation
        )
        return _texts(stream)

    def generate_batch_sync(
        self,
        prompts: Sequence[Prompt],
        *,
        max_tokens: int | None = 256,
        sampling: SamplingParams | None = None,
        stop: str | Sequence[str] | None = None,
    ) -> list[str]:
        """The texts of ``prompts``, generated concurrently; waits for queue room as needed."""
        options = generate_options(max_tokens, stop)
        config = self._llm._sampling(sampling)
        streams = [self._submit(self._llm._prompt_tokens(p), config, options, True) for p in prompts]
        return ["".join(_texts(s)) for s in streams]

    def warmup_sync(self) -> None:
        """Run one short generation, so that the first request does not pay for setup."""
        self.generate_sync([max(self._llm.token_bos(), 0)], max_tokens=1, sampling=SamplingParams.greedy())

    # -- completion and chat dicts --------------------------------------------------------

    def _completion(
        self,
        prompt: Prompt | list[int],
        kwargs: Mapping[str, Any],
        cancellation: _core.Cancellation,
        wait: bool,
        preserved_tokens: Sequence[int] = (),
    ) -> tuple[CompletionBuilder, _core.EngineStream]:
        unknown = set(kwargs) - _COMPLETION_KEYWORDS
        if unknown:
            raise TypeError(f"LlamaPool.create_completion got unexpected keyword arguments {sorted(unknown)}")
        request = {key: kwargs[key] for key in REQUEST_KEYWORDS if key in kwargs}
        overrides = {k: v for k, v in kwargs.items() if k in _SAMPLING_FIELDS}
        if overrides.get("logit_bias") is None:
            overrides.pop("logit_bias", None)
        tokens, options, builder = completion_request(
            self._llm, prompt, cancellation=cancellation, preserved_tokens=preserved_tokens, **request
        )
        stream = self._submit(tokens, self._llm._sampling(None, overrides), options, wait, kwargs.get("lora"))
        return builder, stream

    def create_completion_sync(
        self,
        prompt: Prompt,
        *,
        stream: bool = False,
        cancellation: _core.Cancellation | None = None,
        **kwargs: Any,
    ) -> CreateCompletionResponse | Iterator[CreateCompletionResponse]:
        """llama-cpp-python's ``create_completion`` (its keywords and defaults) on the pool.

        Keywords: ``max_tokens``, ``stop``, ``model``, ``logprobs``, ``echo``,
        ``logits_processor`` / ``stopping_criteria`` (Python hooks: the slow path, run on the
        scheduler thread), the sampling settings (``temperature``, ``top_p``, ``top_k``,
        ``min_p``, ``typical_p``, penalties, ``seed``, ``mirostat_*``, ``logit_bias``,
        ``grammar``) and ``lora`` (see :meth:`submit`). An unknown keyword raises TypeError.
        """
        return self._create_completion(prompt, stream, cancellation or _core.Cancellation(), kwargs, False)

    def _create_completion(
        self,
        prompt: Prompt,
        stream: bool,
        cancellation: _core.Cancellation,
        kwargs: Mapping[str, Any],
        wait: bool,
        *,
        preserved_tokens: Sequence[int] = (),
    ) -> CreateCompletionResponse | Iterator[CreateCompletionResponse]:
        builder, native = self._completion(prompt, kwargs, cancellation, wait, preserved_tokens)
        if stream:
            return builder.stream(native)
        return builder.response(collect(native))

    def _chat_prompt(
        self, messages: Messages, kwargs: dict[str, Any]
    ) -> tuple[list[int], dict[str, Any], list[int], OutputParser]:
        """The prompt tokens of ``messages``, the completion keywords of the request, the
        special tokens kept as text and the parser of the answer, prepared as
        :meth:`Llama.create_chat_completion` prepares them (tools and JSON included)."""
        chat_keys = ("tools", "tool_choice", "functions", "function_call", "response_format", "grammar")
        chat_args = {k: kwargs.pop(k) for k in chat_keys if k in kwargs}
        if kwargs.pop("logprobs", None):  # OpenAI's chat shape: a flag and a count
            kwargs["logprobs"] = kwargs.pop("top_logprobs", None) or 0
        kwargs.pop("top_logprobs", None)
        if kwargs.get("echo"):
            raise InvalidArgumentError("echo is a completion option, not a chat one")
        for key in ("parallel_tool_calls", "reasoning_format", "chat_template_kwargs"):
            if key in kwargs:
                chat_args[key] = kwargs.pop(key)
        template_kwargs = {k: kwargs.pop(k) for k in list(kwargs) if k not in _COMPLETION_KEYWORDS}
        chat = self._llm.prepare_chat(messages, **chat_args, **template_kwargs)
        stop = kwargs.get("stop")
        kwargs["stop"] = ([stop] if isinstance(stop, str) else list(stop or [])) + chat.stop
        kwargs["grammar"] = chat.grammar
        kwargs.setdefault("temperature", 0.2)  # llama-cpp-python's chat default
        kwargs.setdefault("max_tokens", None)
        return chat.prompt, kwargs, chat.preserved_tokens, chat.parser

    def create_chat_completion_sync(
        self,
        messages: Messages,
        *,
        stream: bool = False,
        cancellation: _core.Cancellation | None = None,
        **kwargs: Any,
    ) -> CreateChatCompletionResponse | Iterator[ChatCompletionChunk]:
        """llama-cpp-python's ``create_chat_completion`` on the pool: ``response_format``,
        tool calls, ``logprobs`` + ``top_logprobs``, ``logits_processor`` and ``lora`` included.
        Other keywords go to the chat template."""
        return self._create_chat(messages, stream, cancellation or _core.Cancellation(), dict(kwargs), False)

    def _create_chat(
        self,
        messages: Messages,
        stream: bool,
        cancellation: _core.Cancellation,
        kwargs: dict[str, Any],
        wait: bool,
    ) -> CreateChatCompletionResponse | Iterator[ChatCompletionChunk]:
        tokens, kwargs, preserved, parser = self._chat_prompt(messages, kwargs)
        completion = self._create_completion(
            tokens, stream, cancellation, kwargs, wait, preserved_tokens=preserved
        )
        if isinstance(completion, dict):
            return chat_response(completion, parser)
        return chat_chunks(completion, parser)

    def create_chat_completion_batch_sync(
        self, conversations: Sequence[Messages], **kwargs: Any
    ) -> list[CreateChatCompletionResponse]:
        """The answers to several conversations, generated concurrently."""
        prepared = [self._chat_prompt(c, dict(kwargs)) for c in conversations]
        streams = [
            (self._completion(tokens, settings, _core.Cancellation(), True, preserved), parser)
            for tokens, settings, preserved, parser in prepared
        ]
        return [
            chat_response(builder.response(collect(native)), parser) for (builder, native), parser in streams
        ]

    def create_embedding_sync(
        self,
        input: str | Sequence[str] | Sequence[int] | Sequence[Sequence[int]],
        model: str | None = None,
        *,
        cancellation: _core.Cancellation | None = None,
    ) -> CreateEmbeddingResponse:
        """OpenAI's embeddings response, from an embedding context over the pool's weights
        (created on first use; its calls run one at a time)."""
        with self._embedder_lock:
            if self._embedder is None:
                config = replace(self._config, embedding=True)
                self._embedder = Llama.sharing(self._model, self.model_path, config)
            embedder = self._embedder
        return embedder.create_embedding(input, model, cancellation=cancellation)

    # -- async ----------------------------------------------------------------------------

    async def generate(
        self,
        prompt: Prompt,
        *,
        max_tokens: int | None = 256,
        sampling: SamplingParams | None = None,
        stop: str | Sequence[str] | None = None,
    ) -> str:
        """:meth:`generate_sync` off the event loop; cancelling the task frees the slot."""
        return await _run(
            lambda c: self.generate_sync(
                prompt, max_tokens=max_tokens, sampling=sampling, stop=stop, cancellation=c
            )
        )

    def generate_stream(
        self,
        prompt: Prompt,
        *,
        max_tokens: int | None = 256,
        sampling: SamplingParams | None = None,
        stop: str | Sequence[str] | None = None,
    ) -> AsyncIterator[str]:
        """An async iterator of text pieces; leaving it early cancels the request. Raises
        :class:`PoolBusyError` at once when the queue is full."""
        cancellation = _core.Cancellation()
        pieces = self.generate_stream_sync(
            prompt, max_tokens=max_tokens, sampling=sampling, stop=stop, cancellation=cancellation
        )
        return _async.iterate(pieces, cancellation)

    async def generate_batch(
        self,
        prompts: Sequence[Prompt],
        *,
        max_tokens: int | None = 256,
        sampling: SamplingParams | None = None,
        stop: str | Sequence[str] | None = None,
    ) -> list[str]:
        """:meth:`generate_batch_sync` off the event loop."""
        return await asyncio.to_thread(
            self.generate_batch_sync, prompts, max_tokens=max_tokens, sampling=sampling, stop=stop
        )

    async def create_completion(
        self, prompt: Prompt, *, stream: bool = False, **kwargs: Any
    ) -> CreateCompletionResponse | AsyncIterator[CreateCompletionResponse]:
        """:meth:`create_completion_sync` off the event loop; with ``stream=True`` an async
        iterator of chunks. Cancelling the task or leaving the iteration frees the slot."""
        if stream:
            cancellation = _core.Cancellation()
            chunks = self._create_completion(prompt, True, cancellation, kwargs, False)
            assert not isinstance(chunks, dict)
            return _async.iterate(chunks, cancellation)

        def call(c: _core.Cancellation) -> CreateCompletionResponse:
            response = self._create_completion(prompt, False, c, kwargs, False)
            assert isinstance(response, dict)
            return response

        return await _run(call)

    async def create_chat_completion(
        self, messages: Messages, *, stream: bool = False, **kwargs: Any
    ) -> CreateChatCompletionResponse | AsyncIterator[ChatCompletionChunk]:
        """:meth:`create_chat_completion_sync` off the event loop (``stream=True``: an async
        iterator of chunks)."""
        if stream:
            cancellation = _core.Cancellation()
            chunks = self._create_chat(messages, True, cancellation, dict(kwargs), False)
            assert not isinstance(chunks, dict)
            return _async.iterate(chunks, cancellation)

        def call(c: _core.Cancellation) -> CreateChatCompletionResponse:
            response = self._create_chat(messages, False, c, dict(kwargs), False)
            assert isinstance(response, dict)
            return response

        return await _run(call)

    async def create_chat_completion_batch(
        self, conversations: Sequence[Messages], **kwargs: Any
    ) -> list[CreateChatCompletionResponse]:
        """:meth:`create_chat_completion_batch_sync` off the event loop."""
        return await asyncio.to_thread(self.create_chat_completion_batch_sync, conversations, **kwargs)

    async def create_embedding(
        self, input: str | Sequence[str] | Sequence[int] | Sequence[Sequence[int]], model: str | None = None
    ) -> CreateEmbeddingResponse:
        """:meth:`create_embedding_sync` off the event loop; cancelling the task stops it."""
        return await _run(lambda c: self.create_embedding_sync(input, model, cancellation=c))

    async def warmup(self) -> None:
        """:meth:`warmup_sync` off the event loop."""
        await asyncio.to_thread(self.warmup_sync)


async def _run(call: Callable[[_core.Cancellation], T]) -> T:
    """``call(cancellation)`` in a worker thread; cancelling the await cancels the request."""
    cancellation = _core.Cancellation()
    return await _async.run(lambda: call(cancellation), cancellation)


def _texts(stream: _core.EngineStream) -> Iterator[str]:
    """The text pieces of ``stream``; closing the iterator early cancels the request."""
    try:
        while (chunk := stream.next()) is not None:
            if chunk.text:
                yield chunk.text
    finally:
        stream.close()


def _check_lora_scale(scale: float) -> None:
    if not math.isfinite(scale):
        raise InvalidArgumentError(f"the LoRA scale must be finite, got {scale}")
