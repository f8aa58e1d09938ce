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

Requests are prepared and their answers built by the same
:class:`~llama_cpp.request.RequestBuilder` as :class:`Llama`'s: the keywords, defaults and
answers are the same; the pool adds ``lora=`` per request.

Memory: the weights once, plus ``pool_size`` sequences of ``n_ctx`` tokens of KV cache
(``n_ctx`` is per sequence), plus one batch's compute buffers.

The API is :class:`Llama`'s: synchronous methods, which any number of threads may call at
once, and their async twins named ``*_async``.
"""

from __future__ import annotations

import math
import os
import threading
from collections.abc import Mapping, Sequence
from dataclasses import replace
from typing import Any, Self

from llama_cpp import _async, _core, experts
from llama_cpp._core import LoraAdapter
from llama_cpp.completion_output import GenerationStream, collect
from llama_cpp.config import LlamaConfig, resolve_config
from llama_cpp.errors import InvalidArgumentError, PoolBusyError
from llama_cpp.experts import ExpertStats
from llama_cpp.frontend import FrontEnd, text_pieces
from llama_cpp.llama import Llama
from llama_cpp.llama_types import (
    CreateChatCompletionResponse,
    CreateEmbeddingResponse,
)
from llama_cpp.params import SamplingParams
from llama_cpp.placement import FitPlan, MemoryBreakdown, prepare_load
from llama_cpp.request import Prompt, Request, RequestBuilder
from llama_cpp.results import PoolStats

__all__ = ["LlamaPool", "PoolBusyError"]

Messages = Sequence[Mapping[str, Any]]
#: LoRA adapters of the pool's model and their scales.
Lora = Mapping[LoraAdapter, float]


class LlamaPool(FrontEnd):
    """Serve concurrent requests from one model with continuous batching.

    Args:
        model_path: Path to a GGUF file.
        pool_size: Requests decoded concurrently (sequences of the shared context).
        max_queue: Requests that may wait for a free sequence; one more raises
            :class:`PoolBusyError` (batch methods wait for room instead).
        config: The model and context settings as a :class:`LlamaConfig`.
        **options: :class:`Llama`'s keyword arguments (set over ``config``). ``n_ctx`` is
            the window of each sequence (0: the model's window, shared by all; with ``fit``,
            up to the model's window each, as much as fits); ``n_batch``
            (>= ``pool_size``) caps the tokens decoded per step; ``lora_path`` loads an
            adapter that every request runs with unless it names its own (see
            :meth:`load_lora`). The placement options (``tensor_overrides``, ``cpu_moe``,
            ``n_cpu_moe``, ``fit``, ``numa``) are :class:`Llama`'s; ``fit`` sizes the context
            of all ``pool_size`` sequences together (``n_ctx=0``: chosen per sequence);
            ``profile_experts`` counts expert routing over all requests (:meth:`expert_stats`).
            Each sequence has its own stream of KV cells (llama-server's layout with ``-np``;
            llama.cpp rounds a stream up to a multiple of 256 cells, which ``n_ctx()`` reports):
            a token attends over its own sequence only, and a cached prefix lent by another
            sequence is a copy of its stream (made when it saves 16 tokens or more);
            ``kv_unified=True`` gives them one pool of cells instead, where a shared prefix is
            held once but every token attends over all sequences' cells (slower decoding with
            several running; prompts of different lengths arriving together are prefilled in
            one pass, where streams take one pass per distinct length).

    Raises:
        TypeError: An unknown keyword argument.
        ModelLoadError: The file is missing or not a loadable GGUF model.
        InvalidArgumentError: An argument is out of range, an invalid ``tensor_overrides``
            regex or unknown device, or a second, different ``numa`` strategy.
    """

    _RUN_KEYWORDS = frozenset({"lora"})

    def __init__(
        self,
        model_path: str | os.PathLike[str],
        pool_size: int = 4,
        *,
        max_queue: int = 64,
        config: LlamaConfig | None = None,
        **options: Any,
    ) -> None:
        config = resolve_config("LlamaPool", config, options)
        if config.embedding or config.vocab_only:
            raise InvalidArgumentError("a LlamaPool generates text: embedding/vocab_only are not accepted")
        config, plan = prepare_load(os.fspath(model_path), config, n_seq=pool_size)
        #: What ``fit=True`` chose (None without it); ``config`` holds the chosen values.
        self.fit_plan: FitPlan | None = plan
        self.model_path = os.fspath(model_path)
        self.pool_size = pool_size
        self.config = config
        self._embedder: Llama | None = None
        self._embedder_lock = threading.Lock()
        self._loras: dict[LoraAdapter, float] = {}
        self._loras_lock = threading.Lock()
        self._model = _core.Model(self.model_path, config.model_options())
        self._requests = RequestBuilder(self._model, config, self.model_path)
        try:
            context = config.context_options()
            context.n_ctx = config.n_ctx * pool_size
            options_ = _core.EngineOptions()
            options_.n_slots = pool_size
            options_.max_queue = max_queue
            self._engine = _core.Engine(self._model, context, options_)
            if config.lora_path is not None:
                self.load_lora(config.lora_path, config.lora_scale)
        except BaseException:
            self.close()
            raise

    # -- lifecycle ------------------------------------------------------------------------

    def close(self) -> None:
        """Stop the scheduler, fail unfinished requests with :class:`ClosedError`, free the
        context and the weights. Idempotent."""
        if hasattr(self, "_engine"):
            self._engine.close()
        with self._embedder_lock:
            if self._embedder is not None:
                self._embedder.close()
        self._requests.close()  # its chat templates hold a reference to the model
        self._model.close()

    def __enter__(self) -> Self:
        return self

    def __exit__(self, *exc_info: object) -> None:
        self.close()

    async def __aenter__(self) -> Self:
        return self

    async def __aexit__(self, *exc_info: object) -> None:
        await _async.call(lambda _: self.close())

    def __repr__(self) -> str:
        return f"LlamaPool({self.model_path!r}, pool_size={self.pool_size})"

    # -- facts ----------------------------------------------------------------------------

    def stats(self) -> PoolStats:
        """Slots in use, queued requests, and counters of decoded and reused tokens."""
        return PoolStats.from_native(self._engine.stats())

    def expert_stats(self, *, reset: bool = False) -> ExpertStats:
        """The expert-routing counts of this MoE model over all requests so far (see
        :mod:`llama_cpp.experts`; ``profile_experts=True``). Safe while requests run.

        Args:
            reset: Also start the counting again, atomically with the copy (one lock in C++):
                a token routed by a running request is either in the copy or counted afterwards.

        Returns:
            A copy; its ``reset()`` resets the counting.

        Raises:
            ExpertStatsUnavailableError: The pool was created without ``profile_experts=True``,
                or the model has no experts (a dense model).
        """
        return experts.expert_stats(
            self._engine.expert_profiler(), self.config.profile_experts, self._model, reset=reset
        )

    def n_ctx(self) -> int:
        """The window of each sequence, in tokens."""
        return self._engine.n_ctx_seq

    def memory_breakdown(self) -> MemoryBreakdown:
        """What the weights, the shared context of all sequences and its compute buffers take
        on each device, by llama.cpp's own accounting (see :meth:`Llama.memory_breakdown`).

        Returns:
            ``{device: {"model": bytes, "context": bytes, "compute": bytes}}``.

        Raises:
            ClosedError: The pool is closed.
        """
        return self._engine.memory_breakdown()

    @property
    def model(self) -> _core.Model:
        """The native model (raises ClosedError once closed)."""
        if self._model.closed:
            raise _core.ClosedError("the pool is closed")
        return self._model

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

    # -- running a request ----------------------------------------------------------------

    def _submit(self, request: Request, wait: bool, lora: Lora | None) -> _core.EngineStream:
        loras = list((self.loras if lora is None else lora).items())
        return self._engine.submit(request.tokens, request.sampling, request.options, wait, loras)

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
    ) -> GenerationStream:
        """Queue a generation and return its stream, read chunk by chunk with ``next()``.

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
        request = self._requests.generation(
            prompt, max_tokens=max_tokens, sampling=sampling, stop=stop, cancellation=cancellation
        )
        return self._submit(request, wait, lora)

    def submit_request(
        self, request: Request, *, wait: bool = False, lora: Lora | None = None
    ) -> GenerationStream:
        """Queue a request prepared by a :class:`~llama_cpp.request.RequestBuilder` (what an
        :class:`~llama_cpp.IsolatedPool`'s model process runs for its parent).

        Raises:
            PoolBusyError: Every slot is busy and the queue is full (with ``wait=False``).
            ContextOverflowError: The prompt is longer than a sequence's window.
            InvalidArgumentError: A sampling value or token id is out of range.
            ClosedError: The pool is closed.
        """
        return self._submit(request, wait, lora)

    # -- decoding (FrontEnd's request API runs on these) -----------------------------------

    def _stream(self, request: Request, run: Mapping[str, Any]) -> GenerationStream:
        return self._submit(request, False, run.get("lora"))

    # -- the pool's own: batches and warmup -----------------------------------------------

    def generate_batch(
        self,
        prompts: Sequence[Prompt],
        *,
        max_tokens: int | None = 256,
        sampling: SamplingParams | None = None,
        stop: str | Sequence[str] | None = None,
    ) -> list[str]:
        """The texts of ``prompts``, generated concurrently; waits for queue room as needed."""
        requests = [
            self._requests.generation(p, max_tokens=max_tokens, sampling=sampling, stop=stop) for p in prompts
        ]
        streams = [self._submit(request, True, None) for request in requests]
        return ["".join(text_pieces(s)) for s in streams]

    def warmup(self) -> None:
        """Run one short generation, so that the first request does not pay for setup."""
        self.generate([max(self._model.token_bos, 0)], max_tokens=1, sampling=SamplingParams.greedy())

    def create_chat_completion_batch(
        self, conversations: Sequence[Messages], *, lora: Lora | None = None, **kwargs: Any
    ) -> list[CreateChatCompletionResponse]:
        """The answers to several conversations, generated concurrently (waits for queue
        room as needed)."""
        requests = [self._requests.chat(c, kwargs, cancellation=_core.Cancellation()) for c in conversations]
        natives = [self._submit(request.request, True, lora) for request in requests]
        return [request.response(collect(native)) for request, native in zip(requests, natives, strict=True)]

    def create_embedding(
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
                self._embedder = Llama.sharing(
                    self._model, self.model_path, replace(self.config, embedding=True)
                )
            embedder = self._embedder
        return embedder.create_embedding(input, model, cancellation=cancellation)

    # -- async twins: the same calls off the event loop ------------------------------------

    async def generate_batch_async(
        self,
        prompts: Sequence[Prompt],
        *,
        max_tokens: int | None = 256,
        sampling: SamplingParams | None = None,
        stop: str | Sequence[str] | None = None,
    ) -> list[str]:
        """:meth:`generate_batch` off the event loop."""
        return await _async.call(
            lambda _: self.generate_batch(prompts, max_tokens=max_tokens, sampling=sampling, stop=stop)
        )

    async def warmup_async(self) -> None:
        """:meth:`warmup` off the event loop."""
        await _async.call(lambda _: self.warmup())

    async def create_chat_completion_batch_async(
        self, conversations: Sequence[Messages], **kwargs: Any
    ) -> list[CreateChatCompletionResponse]:
        """:meth:`create_chat_completion_batch` off the event loop."""
        return await _async.call(lambda _: self.create_chat_completion_batch(conversations, **kwargs))


def _check_lora_scale(scale: float) -> None:
    if not math.isfinite(scale):
        raise InvalidArgumentError(f"the LoRA scale must be finite, got {scale}")
