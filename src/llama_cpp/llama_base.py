"""The core of :class:`llama_cpp.Llama`: model and context, tokens, state, LoRA, the native
generation API and its async twins. The OpenAI-style APIs are mixins on top of it
(:mod:`llama_cpp._completion`, :mod:`llama_cpp.chat`, :mod:`llama_cpp.embeddings`)."""

from __future__ import annotations

import os
import warnings
from collections import deque
from collections.abc import AsyncIterator, Generator, Iterator, Mapping, Sequence
from dataclasses import dataclass, replace
from typing import Any, Literal, Self, overload

import numpy as np
import numpy.typing as npt

from llama_cpp import _async, _core
from llama_cpp._core import LoraAdapter
from llama_cpp._options import finish_reason, generate_options
from llama_cpp.config import DEFAULTS, ContextParams, LlamaConfig, ModelParams, context_params, model_params
from llama_cpp.errors import InvalidArgumentError
from llama_cpp.grammar import LlamaGrammar
from llama_cpp.llama_types import (
    FinishReason,
)
from llama_cpp.params import DEFAULT_SEED, SamplingParams
from llama_cpp.state import LlamaState
from llama_cpp.tokenizer import LlamaTokenizer

__all__ = ["Completion", "LlamaBase", "Perf"]

# llama-cpp-python keywords that are accepted for compatibility and have no effect here.
# lora_base is stored and never read by llama-cpp-python 0.3; n_parts and f16_kv are older
# names (the KV cache is f16 unless type_k/type_v say otherwise) that LangChain still passes.
_IGNORED_KWARGS = frozenset(
    {"numa", "last_n_tokens_size", "logits_all", "draft_model", "lora_base", "n_parts", "f16_kv"}
)


@dataclass(frozen=True, slots=True)
class Completion:
    """The outcome of :meth:`Llama.complete`.

    Attributes:
        text: The generated text, without the stop string or end-of-generation token.
        tokens: The generated token ids (including those that formed a stop string).
        finish_reason: ``"stop"`` (end of generation or a stop string) or ``"length"``
            (``max_tokens`` reached, or the context window is full).
        prompt_tokens: Number of prompt tokens.
        cached_tokens: Prompt tokens reused from the previous call instead of evaluated.
    """

    text: str
    tokens: list[int]
    finish_reason: FinishReason
    prompt_tokens: int
    cached_tokens: int


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


class LlamaBase:
    """Model, context and the native API; see :class:`llama_cpp.Llama` for the arguments."""

    def __init__(
        self,
        model_path: str | os.PathLike[str],
        *,
        config: LlamaConfig | None = None,
        n_gpu_layers: int = 0,
        split_mode: int = 1,
        main_gpu: int = 0,
        tensor_split: Sequence[float] | None = None,
        vocab_only: bool = False,
        use_mmap: bool = True,
        use_mlock: bool = False,
        kv_overrides: Mapping[str, bool | int | float | str] | None = None,
        rpc_servers: str | Sequence[str] | None = None,
        seed: int = DEFAULT_SEED,
        n_ctx: int = 512,
        n_batch: int = 512,
        n_ubatch: int | None = None,
        n_threads: int | None = None,
        n_threads_batch: int | None = None,
        flash_attn: bool | None = False,
        offload_kqv: bool = True,
        embedding: bool = False,
        pooling_type: int = -1,
        rope_scaling_type: int = -1,
        rope_freq_base: float = 0.0,
        rope_freq_scale: float = 0.0,
        yarn_ext_factor: float = -1.0,
        yarn_attn_factor: float = -1.0,
        yarn_beta_fast: float = -1.0,
        yarn_beta_slow: float = -1.0,
        yarn_orig_ctx: int = 0,
        type_k: int | None = None,
        type_v: int | None = None,
        lora_path: str | os.PathLike[str] | None = None,
        lora_scale: float = 1.0,
        chat_format: str | None = None,
        chat_template: str | None = None,
        stream_timeout: float = 60.0,
        verbose: bool = True,
        **kwargs: object,
    ) -> None:
        for name in kwargs:
            hint = " (no effect here)" if name in _IGNORED_KWARGS else ""
            warnings.warn(f"Llama() got an unknown keyword argument {name!r}{hint}", stacklevel=2)
        given = {name: value for name, value in locals().items() if name in DEFAULTS}
        if config is None:
            config = LlamaConfig(**given)
        else:
            # Keywords passed besides a config win over it.
            config = replace(config, **{k: v for k, v in given.items() if v != DEFAULTS[k]})
        path = os.fspath(model_path)
        self._attach(_core.Model(path, config.model_options()), path, config, owns_model=True)

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
        **kwargs: Any,
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
            **kwargs: The constructor's keyword arguments.

        Raises:
            ImportError: huggingface_hub is not installed.
            ModelLoadError: No file matches (with ``HF_HUB_OFFLINE=1``: no cached file), or
                the file does not load.
            InvalidArgumentError: A pattern matches several files.
        """
        from llama_cpp import hub

        path = hub.download(
            repo_id, filename, local_dir=local_dir, cache_dir=cache_dir, additional_files=additional_files
        )
        return cls(path, **kwargs)

    def _attach(self, model: _core.Model, model_path: str, config: LlamaConfig, *, owns_model: bool) -> None:
        self.config = config
        self.model_path = model_path
        self.verbose = config.verbose
        self._seed = config.seed
        self._model: _core.Model | None = model
        self._owns_model = owns_model
        self._ctx: _core.Context | None = None
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

    def n_vocab(self) -> int:
        return self.model.n_vocab

    def n_embd(self) -> int:
        return self.model.n_embd

    def token_bos(self) -> int:
        return self.model.token_bos

    def token_eos(self) -> int:
        return self.model.token_eos

    @property
    def metadata(self) -> dict[str, str]:
        """The GGUF metadata, values rendered as text (arrays are summarised by llama.cpp)."""
        return dict(self.model.metadata())

    # -- tokens ---------------------------------------------------------------------------

    def tokenize(self, text: bytes | str, add_bos: bool = True, special: bool = False) -> list[int]:
        """Token ids of ``text``.

        Args:
            text: UTF-8 bytes or str.
            add_bos: Add the BOS (and EOS) tokens the model asks for.
            special: Parse special-token text such as ``<start_of_turn>`` as special tokens.
        """
        data = text.encode("utf-8") if isinstance(text, str) else bytes(text)
        return self.model.tokenize(data, add_bos, special)

    def detokenize(self, tokens: Sequence[int], special: bool = False) -> bytes:
        """The bytes of ``tokens`` (may end inside a multi-byte character)."""
        return self.model.detokenize(list(tokens), special)

    def tokenizer(self) -> LlamaTokenizer:
        """llama-cpp-python's :class:`~llama_cpp.tokenizer.LlamaTokenizer` over this model."""
        return LlamaTokenizer(self)

    def set_seed(self, seed: int) -> None:
        """Set the sampling seed used by calls that name none (as the constructor's ``seed``).

        Args:
            seed: In ``[0, 2**32)``; ``-1`` or ``DEFAULT_SEED``: a random seed each generation.

        Raises:
            InvalidArgumentError: ``seed`` is not an int in that range.
        """
        if isinstance(seed, bool) or not isinstance(seed, int) or not -1 <= seed <= DEFAULT_SEED:
            raise InvalidArgumentError(f"seed must be an int in [0, 2**32) or -1, got {seed!r}")
        self._seed = DEFAULT_SEED if seed == -1 else seed

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

    # -- generation -----------------------------------------------------------------------

    def _prompt_tokens(self, prompt: str | bytes | Sequence[int]) -> list[int]:
        if isinstance(prompt, str | bytes):
            # As llama-cpp-python: BOS/EOS where the model asks, special tokens parsed.
            return self.tokenize(prompt, add_bos=True, special=True)
        return list(prompt)

    def _sampling(
        self, sampling: SamplingParams | None, overrides: Mapping[str, Any] | None = None
    ) -> _core.SamplerConfig:
        params = sampling or SamplingParams()
        changes = dict(overrides or {})
        if changes.get("seed", params.seed) is None and self._seed != DEFAULT_SEED:
            changes["seed"] = self._seed  # the constructor's seed, when the call names none
        return (replace(params, **changes) if changes else params).to_native()

    def _piece(self, token: int) -> str:
        return self.model.token_to_piece(token, False).decode("utf-8", errors="ignore")

    def complete(
        self,
        prompt: str | bytes | Sequence[int],
        *,
        max_tokens: int | None = 16,
        sampling: SamplingParams | None = None,
        stop: str | Sequence[str] | None = None,
        cancellation: _core.Cancellation | None = None,
    ) -> Completion:
        """Generate a completion of ``prompt``; the whole token loop runs in C++.

        The longest prefix that ``prompt`` shares with the tokens already in the KV cache is
        reused rather than evaluated again.

        Args:
            prompt: Text (tokenized with BOS, special tokens parsed) or token ids.
            max_tokens: Most tokens to generate; None or <= 0 means until the context is full.
            sampling: Sampling settings (default: ``SamplingParams()``).
            stop: Strings that end the generation; they are not included in the text.
            cancellation: Lets another thread stop the generation (it then raises
                :class:`GenerationCancelled`).

        Returns:
            A :class:`Completion`.

        Raises:
            ContextOverflowError: The prompt does not fit in the context window.
            InvalidArgumentError: A sampling value or token id is out of range.
            ClosedError: The model was closed, possibly during the call.
            GenerationCancelled: ``cancellation`` was cancelled.
        """
        options = generate_options(max_tokens, stop, cancellation=cancellation)
        result = self.context.generate(self._prompt_tokens(prompt), self._sampling(sampling), options)
        return Completion(
            text=result.text,
            tokens=list(result.tokens),
            finish_reason=finish_reason(result.finish_reason),
            prompt_tokens=result.n_prompt,
            cached_tokens=result.n_reused,
        )

    @overload
    def generate(
        self,
        prompt: str | bytes | Sequence[int],
        *,
        max_tokens: int | None = ...,
        sampling: SamplingParams | None = ...,
        stop: str | Sequence[str] | None = ...,
        stream: Literal[False] = ...,
    ) -> str: ...

    @overload
    def generate(
        self,
        prompt: str | bytes | Sequence[int],
        *,
        max_tokens: int | None = ...,
        sampling: SamplingParams | None = ...,
        stop: str | Sequence[str] | None = ...,
        stream: Literal[True],
    ) -> Iterator[str]: ...

    def generate(
        self,
        prompt: str | bytes | Sequence[int],
        *,
        max_tokens: int | None = 256,
        sampling: SamplingParams | None = None,
        stop: str | Sequence[str] | None = None,
        stream: bool = False,
    ) -> str | Iterator[str]:
        """The generated text of ``prompt`` (see :meth:`complete` for the arguments).

        With ``stream=True``, an iterator of text pieces, as :meth:`generate_stream`.
        """
        if stream:
            return self.generate_stream(prompt, max_tokens=max_tokens, sampling=sampling, stop=stop)
        return self.complete(prompt, max_tokens=max_tokens, sampling=sampling, stop=stop).text

    def generate_stream(
        self,
        prompt: str | bytes | Sequence[int],
        *,
        max_tokens: int | None = 256,
        sampling: SamplingParams | None = None,
        stop: str | Sequence[str] | None = None,
    ) -> Generator[str, None, None]:
        """Yield text as it is generated; each piece is whole UTF-8 characters.

        Each step runs in C++ with the GIL released. Closing the iterator (or breaking out of
        a ``for`` loop over it) stops generation at once and leaves the instance usable.
        """
        token_stream = self._token_stream(
            prompt, self._sampling(sampling), generate_options(max_tokens, stop)
        )
        return _iterate_text(token_stream)

    def _token_stream(
        self,
        prompt: str | bytes | Sequence[int],
        sampling: _core.SamplerConfig,
        options: _core.GenerateOptions,
    ) -> _core.TokenStream:
        return self.context.stream(self._prompt_tokens(prompt), sampling, options)

    # -- async twins ----------------------------------------------------------------------

    async def complete_async(
        self,
        prompt: str | bytes | Sequence[int],
        *,
        max_tokens: int | None = 16,
        sampling: SamplingParams | None = None,
        stop: str | Sequence[str] | None = None,
    ) -> Completion:
        """:meth:`complete` off the event loop; cancelling the task stops the generation."""
        cancellation = _core.Cancellation()
        return await _async.run(
            lambda: self.complete(
                prompt, max_tokens=max_tokens, sampling=sampling, stop=stop, cancellation=cancellation
            ),
            cancellation,
        )

    async def generate_async(
        self,
        prompt: str | bytes | Sequence[int],
        *,
        max_tokens: int | None = 256,
        sampling: SamplingParams | None = None,
        stop: str | Sequence[str] | None = None,
    ) -> str:
        """:meth:`generate` off the event loop; cancelling the task stops the generation."""
        completion = await self.complete_async(prompt, max_tokens=max_tokens, sampling=sampling, stop=stop)
        return completion.text

    def generate_stream_async(
        self,
        prompt: str | bytes | Sequence[int],
        *,
        max_tokens: int | None = 256,
        sampling: SamplingParams | None = None,
        stop: str | Sequence[str] | None = None,
    ) -> AsyncIterator[str]:
        """An async iterator of text pieces; leaving it early or cancelling stops generation."""
        cancellation = _core.Cancellation()
        options = generate_options(max_tokens, stop, cancellation=cancellation)
        token_stream = self._token_stream(prompt, self._sampling(sampling), options)
        return _async.iterate(_iterate_text(token_stream), cancellation)


def _iterate_text(token_stream: _core.TokenStream) -> Generator[str, None, None]:
    try:
        while (piece := token_stream.next()) is not None:
            if piece.text:
                yield piece.text
    finally:
        token_stream.close()
