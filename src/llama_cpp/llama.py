"""`Llama`: a GGUF model and one context, with llama-cpp-python's high-level API.

`Llama` is composed of its parts: the native model and context (:mod:`llama_cpp._core`), a
:class:`~llama_cpp.request.RequestBuilder` that prepares every completion and chat request
and builds its answers (the one :class:`~llama_cpp.LlamaPool` uses too), a
:class:`~llama_cpp.chat.ChatRenderer` and an :class:`~llama_cpp.embeddings.Embedder`. The
request API itself (completions, chat, the native generation API and their async twins) is
:class:`~llama_cpp.frontend.FrontEnd`'s, shared with the pool; ``Llama`` says only how its
one context decodes a request.
"""

from __future__ import annotations

import os
from collections import deque
from collections.abc import Mapping, Sequence
from typing import TYPE_CHECKING, Any, Literal, Self

import numpy as np
import numpy.typing as npt

from llama_cpp import _async, _core, experts
from llama_cpp._core import LoraAdapter
from llama_cpp._docs import documented_by
from llama_cpp.chat import ChatRenderer
from llama_cpp.chat_formats import ChatFormatter
from llama_cpp.config import (
    ContextParams,
    LlamaConfig,
    ModelParams,
    context_params,
    model_params,
    resolve_config,
)
from llama_cpp.embeddings import Embedder, EmbeddingInput, FloatArray, RerankResult
from llama_cpp.errors import InvalidArgumentError
from llama_cpp.experts import ExpertStats
from llama_cpp.frontend import FrontEnd
from llama_cpp.grammar import LlamaGrammar
from llama_cpp.llama_types import (
    CreateEmbeddingResponse,
)
from llama_cpp.placement import FitPlan, MemoryBreakdown, prepare_load
from llama_cpp.request import Request, RequestBuilder
from llama_cpp.results import Completion, Perf
from llama_cpp.state import LlamaState
from llama_cpp.tokenizer import LlamaTokenizer

if TYPE_CHECKING:
    # The openai package is optional: only create_chat_completion_openai_v1 needs it.
    pass

__all__ = ["Completion", "Llama", "Perf"]


class Llama(FrontEnd):
    """A GGUF model with one context: tokenization, completion and streaming.

    The keyword arguments are llama-cpp-python's, with the same meaning. llama.cpp's log goes
    to the ``llama_cpp`` logger. One instance may be shared between threads: calls on it are
    serialized by a lock in C++. Use it as a context manager, or call :meth:`close`, to free
    its memory deterministically.

    Args:
        model_path: Path to a GGUF file.
        config: All of the options below as one :class:`LlamaConfig`; keywords passed
            besides it are set over it (a keyword set to its default value wins too).
        n_gpu_layers: Layers to offload to the GPU (-1: all).
        split_mode: How to split over several devices (0 none, 1 layer, 2 row, 3 tensor:
            llama.cpp's tensor parallelism, which needs flash attention; docs/cluster.md).
        main_gpu: GPU for the whole model when ``split_mode`` is 0.
        tensor_split: Proportion of the model per GPU.
        vocab_only: Load only the vocabulary (tokenize/detokenize; no generation).
        use_mmap: Map the file instead of reading it.
        use_mlock: Lock the weights in RAM.
        kv_overrides: GGUF metadata to override at load (bool, int, float or str values).
        rpc_servers: ``ggml-rpc-server`` endpoints ("host:port", a list or llama-cpp-python's
            comma-separated string) whose devices take offloaded layers (see ``n_gpu_layers``).
        tensor_overrides: Ours, llama.cpp's ``--override-tensor``: ``(regex, device)`` pairs
            (devices as :func:`llama_cpp.devices` names them: ``"CPU"``, ``"CUDA0"``, ``"RPC0"``;
            or as llama.cpp's buffer types: ``"RPC0[host:port]"``, the device's index within
            its server), or its ``"REGEX=DEVICE,..."`` string. A tensor goes to the
            device of the first pair whose regex is found in its name (``std::regex``, as
            llama.cpp matches). Checked before loading.
        cpu_moe: Ours (``--cpu-moe``): every MoE expert tensor stays in host memory.
        n_cpu_moe: Ours (``--n-cpu-moe``): the expert tensors of the first N layers do.
        fit: Ours (llama.cpp's ``--fit``): before loading, choose ``n_gpu_layers`` (when 0 or
            -1), expert overrides (when none are given) and ``n_ctx`` (when 0) for each
            device's free memory; :attr:`fit_plan` says what was chosen and why (see
            :func:`llama_cpp.plan_fit`).
        fit_margin: Bytes each device keeps free when fitting (default 1 GiB).
        fit_min_ctx: The smallest context the fit lowers ``n_ctx=0`` to (default 4096).
        numa: llama.cpp's NUMA strategy, once per process: "distribute" (or True),
            "isolate", "numactl" (or llama-cpp-python's ints 1-3); False leaves it alone.
        seed: Default sampling seed (``DEFAULT_SEED`` or -1: random each generation).
        n_ctx: Context window in tokens (0: the model's training context).
        n_batch: Largest number of tokens decoded in one llama_decode call.
        n_ubatch: Physical batch size (defaults to ``n_batch``).
        n_threads: Threads for generation (default: the CPUs this process may use).
        n_threads_batch: Threads for prompt processing (default: same as ``n_threads``).
        flash_attn: Use flash attention (None: let llama.cpp decide). Off by default, as in
            llama-cpp-python; see the README for why it stays off on the CPU.
        offload_kqv: Keep the KV cache on the GPU when layers are offloaded.
        kv_unified: For a :class:`LlamaPool`: one pool of KV cells shared by its sequences
            (llama.cpp's ``--kv-unified``) instead of a stream of cells per sequence, the
            default. Shared prefixes then take their cells once and a burst of prompts is
            prefilled in fewer passes, but every token attends over the cells of all
            sequences: slower decoding with several running (no effect on a Llama).
        embedding: Create the context for :meth:`embed` / :meth:`create_embedding`.
        pooling_type: -1 the model's, 0 none (a vector per token), 1 mean, 2 CLS, 3 last, 4 rank.
        rope_freq_base, rope_freq_scale, rope_scaling_type, yarn_*: RoPE overrides.
        type_k, type_v: KV cache data types (ggml type ids).
        lora_path: A LoRA adapter to apply from the start (see :meth:`load_lora`).
        lora_scale: Its scale.
        chat_format: A built-in chat format by name ("llama-2", "chatml") instead of the
            model's template.
        chat_template: A Jinja chat template of your own (wins over both).
        chat_template_timeout: Ours: seconds loading the chat template, or one render of it,
            may take (default 5). Past it, TemplateError, and the template is refused from
            then on (a render cannot be stopped: it runs on in the background).
        chat_template_max_output: Ours: the longest prompt, in bytes, a render may produce
            (default 32 MiB); a longer one raises TemplateError.
        chat_template_max_depth: Ours: how deep macro calls may nest in one another while the
            template renders, recursion included (default 64; 0: no limit, for a template you
            trust); deeper raises TemplateError.
        stream_timeout: A stream owns the context from its first step until it ends or is
            closed; other threads' calls wait for it. One left unread this many seconds while
            another call waits loses the context (its next step raises ContextBusyError).
        profile_experts: Ours: count the experts a Mixture-of-Experts model routes each token
            to, in C++ during decoding (:meth:`expert_stats`; no effect on outputs).
        profile_experts_trace: Ours: also keep the routing of the latest this many tokens
            (a ring buffer) for :meth:`ExpertStats.simulate_cache` and offline analysis.
        verbose: False keeps llama.cpp quiet while this model and context are created (errors
            still reach ``logging``); llama.cpp's log otherwise goes to the ``llama_cpp`` logger.
        progress_callback: Ours, not llama-cpp-python's: called with the fraction loaded
            (increasing floats in [0, 1], the last one 1.0) while the weights load, from the
            loading thread. Return False to cancel the load; an exception it raises also
            cancels it and becomes the cause of the ModelLoadError.

    Raises:
        ModelLoadError: The file is missing, unreadable or not a loadable GGUF model, or the
            progress callback cancelled the load.
        InvalidArgumentError: An argument is out of range; an invalid ``tensor_overrides``
            regex or an unknown device (before anything loads); a ``numa`` strategy other
            than the one this process already set.
    """

    def __init__(
        self, model_path: str | os.PathLike[str], *, config: LlamaConfig | None = None, **options: Any
    ) -> None:
        config = resolve_config("Llama", config, options)
        path = os.fspath(model_path)
        config, plan = prepare_load(path, config)
        self._attach(_core.Model(path, config.model_options()), path, config, owns_model=True, fit_plan=plan)

    @classmethod
    def sharing(cls, model: _core.Model, model_path: str, config: LlamaConfig) -> Self:
        """An instance over ``model``, loaded already: the weights are shared, not copied.

        It gets a context of its own (none with ``config.vocab_only``); its :meth:`close`
        frees that context and leaves the model to its owner (e.g. :class:`LlamaPool`).
        """
        instance = cls.__new__(cls)
        instance._attach(model, model_path, config, owns_model=False)
        return instance

    @classmethod
    def from_pretrained(
        cls,
        repo_id: str,
        filename: str,
        *,
        local_dir: str | os.PathLike[str] | None = None,
        local_dir_use_symlinks: bool | Literal["auto"] = "auto",
        cache_dir: str | os.PathLike[str] | None = None,
        additional_files: Sequence[str] | None = None,
        **options: Any,
    ) -> Self:
        """Download a GGUF from the Hugging Face Hub (or take it from the cache) and load it,
        as llama-cpp-python's ``from_pretrained`` (needs the ``hub`` extra: huggingface_hub).

        Args:
            repo_id: ``"owner/name"``.
            filename: The model file, or an :mod:`fnmatch` pattern (``"*Q4_K_M.gguf"``) that
                must match exactly one of the repository's files.
            local_dir: Put the files here instead of leaving them in the cache.
            local_dir_use_symlinks: No effect (huggingface_hub >= 0.23 copies into
                ``local_dir``); accepted for llama-cpp-python's callers.
            cache_dir: huggingface_hub's cache (default: ``HF_HUB_CACHE``).
            additional_files: More files or patterns to fetch beside it (the other parts of a
                split GGUF, which llama.cpp loads from the first).
            **options: The constructor's keyword arguments.

        Raises:
            ImportError: huggingface_hub is not installed.
            ModelLoadError: No file matches (with ``HF_HUB_OFFLINE=1``: no cached file), or
                the file does not load.
            InvalidArgumentError: A pattern matches several files.
        """
        from llama_cpp import hub

        del local_dir_use_symlinks
        path = hub.download(
            repo_id, filename, local_dir=local_dir, cache_dir=cache_dir, additional_files=additional_files
        )
        return cls(path, **options)

    def _attach(
        self,
        model: _core.Model,
        model_path: str,
        config: LlamaConfig,
        *,
        owns_model: bool,
        fit_plan: FitPlan | None = None,
    ) -> None:
        self.config = config
        #: What ``fit=True`` chose (None without it); ``config`` holds the chosen values.
        self.fit_plan = fit_plan
        self.model_path = model_path
        self.verbose = config.verbose
        self._model: _core.Model | None = model
        self._owns_model = owns_model
        self._ctx: _core.Context | None = None
        self._requests = RequestBuilder(model, config, model_path)
        self._embedder = Embedder(lambda: self.context, model, config.embedding, model_path)
        if config.vocab_only:
            return
        try:
            self._ctx = _core.Context(self._model, config.context_options())
            if config.lora_path is not None:
                self.load_lora(config.lora_path, config.lora_scale)
        except BaseException:
            self.close()
            raise

    # -- lifecycle ------------------------------------------------------------------------

    def close(self) -> None:
        """Free the context and the weights. Idempotent.

        A generation running in another thread is stopped at its next token (it raises
        :class:`ClosedError`) before any memory is freed.
        """
        self._requests.close()  # its chat templates hold a reference to the model
        if self._ctx is not None:
            self._ctx.close()
        if self._model is not None and self._owns_model:
            self._model.close()

    def __enter__(self) -> Self:
        return self

    def __exit__(self, *exc_info: object) -> None:
        self.close()

    def __repr__(self) -> str:
        return f"Llama({self.model_path!r})"

    @property
    def model(self) -> _core.Model:
        """The native model (raises ClosedError once closed)."""
        if self._model is None or self._model.closed:
            raise _core.ClosedError("the model is closed")
        return self._model

    @property
    def context(self) -> _core.Context:
        """The native context (raises LlamaError for a vocab_only model, ClosedError once closed)."""
        if self._ctx is None:
            if self._model is not None and not self._model.closed:
                raise _core.LlamaError("this model was loaded with vocab_only=True: it has no context")
            raise _core.ClosedError("the model is closed")
        return self._ctx

    # -- model facts ----------------------------------------------------------------------

    def n_ctx(self) -> int:
        """The context window in tokens."""
        return self.context.n_ctx()

    def memory_breakdown(self) -> MemoryBreakdown:
        """What the weights, the context and its compute buffers take on each device, by
        llama.cpp's own accounting (``llama_get_memory_breakdown``).

        Returns:
            ``{device: {"model": bytes, "context": bytes, "compute": bytes}}``, a key for
            every device the model uses and ``"CPU"`` (host memory; with ``use_mmap`` its
            ``"model"`` is the mapped span of the file, which may include tensors placed
            elsewhere).

        Raises:
            LlamaError: The model was loaded with ``vocab_only=True`` (no context).
            ClosedError: The model is closed.
        """
        return self.context.memory_breakdown()

    @property
    def model_params(self) -> ModelParams:
        """llama-cpp-python's ``model_params``: what the model was loaded with, under the names
        of llama.h's ``llama_model_params`` (a frozen :class:`ModelParams`, not a ctypes struct).
        A record of the load: it stays readable after :meth:`close`."""
        return model_params(self.config)

    @property
    def context_params(self) -> ContextParams:
        """llama-cpp-python's ``context_params``: the context's parameters under the names of
        llama.h's ``llama_context_params`` (a frozen :class:`ContextParams`). Sizes, threads and
        pooling are read back from llama.cpp (``context_params.n_ctx == n_ctx()``).

        Raises:
            LlamaError: The model was loaded with ``vocab_only=True`` (it has no context).
            ClosedError: The model is closed.
        """
        return context_params(self.config, self.context)

    def n_embd(self) -> int:
        return self.model.n_embd

    def token_bos(self) -> int:
        return self.model.token_bos

    def token_eos(self) -> int:
        return self.model.token_eos

    # -- tokens ---------------------------------------------------------------------------

    def tokenizer(self) -> LlamaTokenizer:
        """llama-cpp-python's :class:`~llama_cpp.tokenizer.LlamaTokenizer` over this model."""
        return LlamaTokenizer(self)

    def reset(self) -> None:
        """Empty the KV cache."""
        self.context.reset()

    def eval(self, tokens: Sequence[int]) -> None:
        """Append ``tokens`` to the KV cache, n_batch at a time."""
        self.context.eval(list(tokens))

    @property
    def n_tokens(self) -> int:
        """Tokens in the KV cache, as llama.cpp reports it."""
        return self.context.n_past()

    # -- llama-cpp-python's views of the context, as numpy arrays (copies) -----------------

    @property
    def input_ids(self) -> npt.NDArray[np.intc]:
        """The tokens in the KV cache, as an int32 array of ``n_tokens``.

        llama-cpp-python's ``input_ids`` is an ``n_ctx`` buffer whose first ``n_tokens``
        entries are valid (its ``_input_ids``); this is that prefix, a copy.
        """
        return np.array(self.context.tokens(), dtype=np.intc)

    @property
    def scores(self) -> npt.NDArray[np.single]:
        """The logits of the last evaluated token, as a float32 array of shape ``(1, n_vocab)``.

        Only the last row is kept (llama-cpp-python with ``logits_all=True`` keeps a row per
        cached token; ``logits_all`` is ignored here): ``scores[-1]`` is what sampling sees
        next. The array is ``(0, n_vocab)`` while the cache is empty.

        Raises:
            LlamaError: Tokens are cached but their logits are gone (after :meth:`load_state`
                or a cache truncation); evaluate a token first.
        """
        if self.n_tokens == 0:
            return np.empty((0, self.n_vocab()), dtype=np.single)
        return self.context.logits()[np.newaxis, :]

    @property
    def eval_tokens(self) -> deque[int]:
        """llama-cpp-python's ``eval_tokens``: the cached tokens as a deque (``maxlen=n_ctx``)."""
        return deque(self.context.tokens(), maxlen=self.n_ctx())

    @property
    def eval_logits(self) -> deque[npt.NDArray[np.single]]:
        """llama-cpp-python's ``eval_logits`` without ``logits_all``: a deque holding at most
        one row, the logits of the last evaluated token (a float32 array of ``n_vocab``).

        Raises:
            LlamaError: As :attr:`scores`.
        """
        return deque(self.scores, maxlen=1)

    def kv_cache_clear(self) -> None:
        """Empty the KV cache (the same as :meth:`reset`)."""
        self.context.reset()

    def kv_cache_truncate(self, n_keep: int) -> None:
        """Keep only the first ``n_keep`` cached tokens."""
        self.context.kv_truncate(n_keep)

    def kv_cache_shift(self, start: int, end: int) -> None:
        """Drop cached tokens ``[start, end)`` and move the later ones back (a context shift).

        Raises:
            InvalidArgumentError: The range is not within the cached tokens.
            LlamaError: The model's cache cannot shift positions.
        """
        self.context.kv_shift(start, end)

    def perf(self, reset: bool = False) -> Perf:
        """llama.cpp's timings of this context since creation or the last ``reset=True``."""
        data = self.context.perf()
        if reset:
            self.context.perf_reset()
        return Perf(
            load_ms=data.t_load_ms,
            prompt_tokens=data.n_prompt,
            prompt_ms=data.t_prompt_ms,
            eval_tokens=data.n_eval,
            eval_ms=data.t_eval_ms,
        )

    def expert_stats(self, *, reset: bool = False) -> ExpertStats:
        """The expert-routing counts of this MoE model so far (see :mod:`llama_cpp.experts`).

        Args:
            reset: Also start the counting again, atomically with the copy (one lock in C++):
                every routed token is either in the copy or counted afterwards.

        Returns:
            A copy; its ``reset()`` resets the counting.

        Raises:
            ExpertStatsUnavailableError: The model was created without ``profile_experts=True``,
                or it has no experts (a dense model).
            ClosedError: The model is closed.
        """
        return experts.expert_stats(
            self.context.expert_profiler(), self.config.profile_experts, self.model, reset=reset
        )

    # -- state ----------------------------------------------------------------------------

    def save_state(self) -> LlamaState:
        """A snapshot of the KV cache, the last logits and the tokens they hold."""
        data, tokens = self.context.state_data()
        return LlamaState(model_path=self.model_path, n_ctx=self.n_ctx(), tokens=tuple(tokens), data=data)

    def load_state(self, state: LlamaState) -> None:
        """Restore a snapshot taken by :meth:`save_state` (of this model).

        Raises:
            InvalidArgumentError: ``state`` is not a :class:`LlamaState` (raw bytes, say).
            LlamaError: The state does not belong to this model or is damaged; the KV cache is
                left empty.
            ContextOverflowError: The state holds more tokens than this context's window.
        """
        if not isinstance(state, LlamaState):
            raise InvalidArgumentError(
                f"load_state expects a LlamaState (from save_state()), got {type(state).__name__}"
            )
        self.context.set_state_data(state.data, list(state.tokens))

    def save_state_file(self, path: str | os.PathLike[str]) -> None:
        """Write the KV cache and its tokens to ``path`` (llama.cpp's session file format)."""
        self.context.save_state_file(os.fspath(path))

    def load_state_file(self, path: str | os.PathLike[str]) -> None:
        """Restore what :meth:`save_state_file` wrote (raises LlamaError as :meth:`load_state`)."""
        self.context.load_state_file(os.fspath(path))

    def check_grammar(self, grammar: LlamaGrammar) -> None:
        """Raise :class:`GrammarError` (with llama.cpp's reason) if it rejects ``grammar``."""
        _core.check_grammar(self.model, grammar.grammar, grammar.root)

    # -- LoRA -----------------------------------------------------------------------------

    def load_lora(self, path: str | os.PathLike[str], scale: float = 1.0) -> LoraAdapter:
        """Load the LoRA adapter at ``path`` and apply it at ``scale``.

        Adapters stay applied across :meth:`reset` and state loads; applying, rescaling or
        removing one empties the KV cache (it was computed with other weights).

        Returns:
            The adapter's handle, for :meth:`set_lora_scale` and :meth:`remove_lora`.

        Raises:
            ModelLoadError: The file is missing or is not a LoRA adapter of this model.
        """
        adapter = _core.LoraAdapter(self.model, os.fspath(path))
        self.context.set_lora(adapter, scale)
        return adapter

    def set_lora_scale(self, adapter: LoraAdapter, scale: float) -> None:
        """Change the scale of an applied adapter.

        Raises:
            InvalidArgumentError: The adapter is not applied, or ``scale`` is not finite.
        """
        if adapter not in self.loras:
            raise InvalidArgumentError(f"{adapter!r} is not applied to this model")
        self.context.set_lora(adapter, scale)

    def remove_lora(self, adapter: LoraAdapter) -> None:
        """Stop applying ``adapter`` and free it (raises InvalidArgumentError if not applied)."""
        if not self.context.remove_lora(adapter):
            raise InvalidArgumentError(f"{adapter!r} is not applied to this model")

    def clear_lora(self) -> None:
        """Remove every adapter: the base model's output comes back exactly."""
        self.context.clear_loras()

    @property
    def loras(self) -> dict[LoraAdapter, float]:
        """The applied adapters and their scales, as the native context holds them."""
        return dict(self.context.loras())

    # -- chat formatting ------------------------------------------------------------------

    @documented_by(ChatRenderer.templates)
    def chat_templates(self) -> _core.ChatTemplates:
        return self._requests.renderer.templates()

    @documented_by(ChatRenderer.formatter)
    def chat_formatter(self) -> ChatFormatter | None:
        return self._requests.renderer.formatter()

    # -- decoding (FrontEnd's request API runs on these) -----------------------------------

    def _generate(self, request: Request, run: Mapping[str, Any]) -> _core.GenerationResult:
        return self.context.generate(request.tokens, request.sampling, request.options)

    def _stream(self, request: Request, run: Mapping[str, Any]) -> _core.TokenStream:
        return self.context.stream(request.tokens, request.sampling, request.options)

    # -- embeddings and reranking ---------------------------------------------------------

    @documented_by(Embedder.embed)
    def embed(
        self, input: EmbeddingInput, normalize: bool = False, truncate: bool = True
    ) -> FloatArray | list[FloatArray]:
        return self._embedder.embed(input, normalize, truncate)

    @documented_by(Embedder.create_embedding)
    def create_embedding(
        self,
        input: EmbeddingInput,
        model: str | None = None,
        *,
        cancellation: _core.Cancellation | None = None,
    ) -> CreateEmbeddingResponse:
        return self._embedder.create_embedding(input, model, cancellation=cancellation)

    @documented_by(Embedder.rerank)
    def rerank(
        self,
        query: str,
        documents: Sequence[str],
        *,
        top_n: int | None = None,
        normalize: bool = False,
        cancellation: _core.Cancellation | None = None,
    ) -> list[RerankResult]:
        return self._embedder.rerank(
            query, documents, top_n=top_n, normalize=normalize, cancellation=cancellation
        )

    async def rerank_async(
        self, query: str, documents: Sequence[str], *, top_n: int | None = None, normalize: bool = False
    ) -> list[RerankResult]:
        """:meth:`rerank` off the event loop; cancelling the task stops it."""
        return await _async.call(
            lambda c: self.rerank(query, documents, top_n=top_n, normalize=normalize, cancellation=c)
        )
