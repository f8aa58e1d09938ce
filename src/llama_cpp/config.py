"""Model and context settings: :class:`LlamaConfig`, llama-cpp-python's constructor as a value, and
:class:`ModelParams` / :class:`ContextParams`, its ``model_params`` / ``context_params``."""

from __future__ import annotations

import os
import warnings
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field, fields, replace

from llama_cpp import _core
from llama_cpp.cluster import rpc_endpoints
from llama_cpp.errors import InvalidArgumentError
from llama_cpp.params import DEFAULT_SEED

# Embedding contexts decode several inputs at once, one sequence each.
EMBEDDING_SEQUENCES = 16


def _default_threads() -> int:
    try:
        return max(1, len(os.sched_getaffinity(0)))
    except AttributeError:  # not on Linux
        return max(1, os.cpu_count() or 1)


@dataclass(frozen=True, kw_only=True)
class LlamaConfig:
    """Everything :class:`Llama` takes besides the model path, with the same names and meaning
    as llama-cpp-python's keyword arguments (see :class:`Llama` for each). Checked on creation:
    an out-of-range value raises :class:`InvalidArgumentError` naming it."""

    n_gpu_layers: int = 0
    split_mode: int = 1
    main_gpu: int = 0
    tensor_split: Sequence[float] | None = None
    vocab_only: bool = False
    use_mmap: bool = True
    use_mlock: bool = False
    kv_overrides: Mapping[str, bool | int | float | str] | None = None
    rpc_servers: str | Sequence[str] | None = None
    seed: int = DEFAULT_SEED
    n_ctx: int = 512
    n_batch: int = 512
    n_ubatch: int | None = None
    n_threads: int | None = None
    n_threads_batch: int | None = None
    flash_attn: bool | None = False
    offload_kqv: bool = True
    #: llama.cpp's --kv-unified, for a LlamaPool: one pool of KV cells for all its sequences
    #: (a shared prefix is held once) instead of a stream of cells per sequence (each token
    #: attends over its own sequence's cells only: faster with several running).
    kv_unified: bool = False
    embedding: bool = False
    pooling_type: int = -1
    rope_scaling_type: int = -1
    rope_freq_base: float = 0.0
    rope_freq_scale: float = 0.0
    yarn_ext_factor: float = -1.0
    yarn_attn_factor: float = -1.0
    yarn_beta_fast: float = -1.0
    yarn_beta_slow: float = -1.0
    yarn_orig_ctx: int = 0
    type_k: int | None = None
    type_v: int | None = None
    lora_path: str | os.PathLike[str] | None = None
    lora_scale: float = 1.0
    chat_format: str | None = None
    chat_template: str | None = None
    #: Ours: bounds on rendering the chat template, which comes from the GGUF file (see
    #: docs/hardening.md, "Hostile chat templates"): seconds a render (or loading the template)
    #: may take, the longest prompt it may produce, and how deep macro calls may nest.
    chat_template_timeout: float = _core.TEMPLATE_DEFAULT_TIME_LIMIT
    chat_template_max_output: int = _core.TEMPLATE_DEFAULT_MAX_OUTPUT_BYTES
    chat_template_max_depth: int = _core.TEMPLATE_DEFAULT_MAX_MACRO_DEPTH
    #: Seconds a paused stream may keep other calls on the model waiting before it loses the
    #: context (its next step then raises ContextBusyError).
    stream_timeout: float = 60.0
    #: Ours: count the experts a MoE model routes each token to (``expert_stats()``), and keep
    #: the routing of the latest ``profile_experts_trace`` tokens (0: no trace; the trace takes
    #: n_layer x n_expert_used x 4 bytes a token, at most 1 GiB).
    profile_experts: bool = False
    profile_experts_trace: int = 0
    verbose: bool = field(default=True, compare=False)
    #: Ours (llama-cpp-python has no such keyword): called as ``progress_callback(fraction)``
    #: with increasing fractions in [0, 1], ending at 1.0, while the weights load (in the
    #: loading thread); returning False cancels the load (ModelLoadError), and so does
    #: raising (the ModelLoadError's cause is the callback's exception).
    progress_callback: Callable[[float], bool | None] | None = field(default=None, compare=False, repr=False)
    #: Placement, as llama.cpp's --override-tensor / --cpu-moe / --n-cpu-moe: ``(regex,
    #: device)`` pairs (device names as :func:`llama_cpp.devices` lists them, or llama.cpp's
    #: ``"REGEX=DEVICE,..."`` string); the first pair whose regex is found in a tensor's name
    #: places it. Then ``cpu_moe`` keeps every expert tensor in host memory, ``n_cpu_moe``
    #: those of the first N layers.
    tensor_overrides: Sequence[tuple[str, str]] | str | None = None
    cpu_moe: bool = False
    n_cpu_moe: int = 0
    #: Fit to free device memory before loading (llama.cpp's common_fit_params, see
    #: :func:`llama_cpp.plan_fit`): each device keeps ``fit_margin`` bytes free, and a context
    #: of ``n_ctx=0`` is lowered no further than ``fit_min_ctx``.
    fit: bool = False
    fit_margin: int = 1 << 30
    fit_min_ctx: int = 4096
    #: llama.cpp's NUMA strategy for the process: "distribute", "isolate" or "numactl" (True:
    #: "distribute"; llama-cpp-python's ints 1-3 too); set once per process.
    numa: bool | int | str = False

    def __post_init__(self) -> None:
        _at_least("n_ctx", self.n_ctx, 0)
        _at_least("n_batch", self.n_batch, 1)
        for name in ("n_ubatch", "n_threads", "n_threads_batch"):
            value = getattr(self, name)
            if value is not None:
                _at_least(name, value, 1)
        if not -1 <= self.pooling_type <= 4:
            raise InvalidArgumentError(f"pooling_type must be in [-1, 4], got {self.pooling_type}")
        if not (isinstance(self.stream_timeout, int | float) and self.stream_timeout > 0):
            raise InvalidArgumentError(
                f"stream_timeout must be a number of seconds > 0, got {self.stream_timeout!r}"
            )
        timeout = self.chat_template_timeout
        if isinstance(timeout, bool) or not (isinstance(timeout, int | float) and 0 < timeout < float("inf")):
            raise InvalidArgumentError(
                f"chat_template_timeout must be a number of seconds > 0, got {timeout!r}"
            )
        _at_least("chat_template_max_output", self.chat_template_max_output, 1)
        _at_least("chat_template_max_depth", self.chat_template_max_depth, 0)
        if self.chat_template_max_depth > _core.TEMPLATE_MAX_MACRO_DEPTH:
            raise InvalidArgumentError(
                f"chat_template_max_depth must be <= {_core.TEMPLATE_MAX_MACRO_DEPTH}, "
                f"got {self.chat_template_max_depth}"
            )
        _at_least("profile_experts_trace", self.profile_experts_trace, 0)
        # The trace takes at least 4 bytes a token (one layer, top-1); the exact ceiling, from
        # the model's layers and top-k, is checked in C++ when the context is created.
        if self.profile_experts_trace > _core.EXPERT_TRACE_MAX_BYTES // 4:
            raise InvalidArgumentError(
                f"profile_experts_trace must be <= {_core.EXPERT_TRACE_MAX_BYTES // 4} (the trace is limited "
                f"to 1 GiB, n_layer x n_expert_used x 4 bytes a token), got {self.profile_experts_trace}"
            )
        if self.profile_experts_trace and not self.profile_experts:
            raise InvalidArgumentError("profile_experts_trace needs profile_experts=True")
        if self.split_mode not in (0, 1, 2, 3):
            raise InvalidArgumentError(f"split_mode must be 0, 1, 2 or 3, got {self.split_mode}")
        if self.split_mode == 3 and self.flash_attn is False:  # llama.cpp refuses the context
            raise InvalidArgumentError("split_mode=3 (tensor) needs flash attention: flash_attn=True or None")
        if self.progress_callback is not None and not callable(self.progress_callback):
            raise InvalidArgumentError(
                f"progress_callback must be a callable or None, got {self.progress_callback!r}"
            )
        if self.tensor_overrides is not None:
            check_tensor_overrides(self.tensor_overrides)
        _at_least("n_cpu_moe", self.n_cpu_moe, 0)
        _at_least("fit_margin", self.fit_margin, 0)
        _at_least("fit_min_ctx", self.fit_min_ctx, 0)
        self.numa_strategy()

    def numa_strategy(self) -> str | None:
        """``numa`` as llama.cpp names the strategy (None: leave NUMA alone).

        Raises:
            InvalidArgumentError: Not a strategy.
        """
        numa = self.numa
        if numa is None or numa is False or numa in {0, "disabled"}:
            return None
        if numa is True:
            return "distribute"
        if isinstance(numa, int) and numa in NUMA_STRATEGIES:
            return NUMA_STRATEGIES[numa]
        if isinstance(numa, str) and numa in NUMA_STRATEGIES.values():
            return numa
        raise InvalidArgumentError(
            f"numa must be one of 'distribute', 'isolate', 'numactl' or a bool, got {numa!r}"
        )

    def model_options(self) -> _core.ModelOptions:
        options = _core.ModelOptions()
        options.n_gpu_layers = self.n_gpu_layers
        options.split_mode = self.split_mode
        options.main_gpu = self.main_gpu
        options.tensor_split = list(self.tensor_split or [])
        options.vocab_only = self.vocab_only
        options.use_mmap = self.use_mmap
        options.use_mlock = self.use_mlock
        options.kv_overrides = list((self.kv_overrides or {}).items())
        options.verbose = self.verbose
        options.progress_callback = self.progress_callback
        options.tensor_overrides = list(check_tensor_overrides(self.tensor_overrides or ()))
        options.cpu_moe = self.cpu_moe
        options.n_cpu_moe = self.n_cpu_moe
        options.rpc_servers = rpc_endpoints(self.rpc_servers)  # a list or "host:port,host:port"
        return options

    def context_options(self) -> _core.ContextOptions:
        threads = self.n_threads or _default_threads()
        options = _core.ContextOptions()
        options.n_ctx = self.n_ctx
        options.n_batch = self.n_batch
        options.n_ubatch = self.n_ubatch or self.n_batch
        options.n_threads = threads
        options.n_threads_batch = self.n_threads_batch or threads
        # Off by default, as in llama-cpp-python. At the pinned llama.cpp, flash attention on the
        # CPU also changes results with the cache layout: a reused prefix or a batch neighbour
        # (embeddings) alters the output, where the default path gives the same tokens.
        options.flash_attn = -1 if self.flash_attn is None else int(self.flash_attn)
        options.offload_kqv = self.offload_kqv
        options.kv_unified = self.kv_unified
        options.embeddings = self.embedding
        options.pooling_type = self.pooling_type
        if self.embedding:
            # One sequence per input, each with the whole window; a pooled sequence must sit
            # in one physical batch.
            options.n_seq_max = EMBEDDING_SEQUENCES
            options.kv_unified = True
            # llama.cpp reserves its worst-case graph with the batch rounded up to a multiple
            # of n_seq_max but as many outputs as the batch: mean pooling (also the model's
            # default, or a ranking head's) multiplies the two sizes together, and a batch of,
            # say, 300 aborts the process (GGML_ASSERT(ggml_can_mul_mat(a, b))). The batch is
            # at most the window, so both are rounded up; llama.cpp pads the window to a
            # multiple of 256 regardless.
            if self.pooling_type in _MAY_POOL_MEAN:
                options.n_batch = _round_up(options.n_batch, EMBEDDING_SEQUENCES)
                if options.n_ctx:
                    options.n_ctx = _round_up(options.n_ctx, EMBEDDING_SEQUENCES)
            options.n_ubatch = options.n_batch
        options.rope_scaling_type = self.rope_scaling_type
        options.rope_freq_base = self.rope_freq_base
        options.rope_freq_scale = self.rope_freq_scale
        options.yarn_ext_factor = self.yarn_ext_factor
        options.yarn_attn_factor = self.yarn_attn_factor
        options.yarn_beta_fast = self.yarn_beta_fast
        options.yarn_beta_slow = self.yarn_beta_slow
        options.yarn_orig_ctx = self.yarn_orig_ctx
        options.type_k = -1 if self.type_k is None else self.type_k
        options.type_v = -1 if self.type_v is None else self.type_v
        options.stream_timeout = float(self.stream_timeout)
        options.profile_experts = self.profile_experts
        options.profile_experts_trace = self.profile_experts_trace
        options.verbose = self.verbose
        return options


#: ggml's enum ggml_numa_strategy, as llama-cpp-python passes it (an int).
NUMA_STRATEGIES = {1: "distribute", 2: "isolate", 3: "numactl"}


def parse_tensor_overrides(text: str) -> list[tuple[str, str]]:
    """llama.cpp's ``--override-tensor`` syntax, ``REGEX=DEVICE[,REGEX=DEVICE...]``, as pairs.

    Split as llama.cpp splits it: at every comma, then at the first ``=`` (so a regex can
    hold neither a comma nor ``=``; pass pairs to keep them).

    Raises:
        InvalidArgumentError: An item without ``=``.
    """
    pairs: list[tuple[str, str]] = []
    for item in text.split(","):
        pattern, sep, device = item.partition("=")
        if not sep:
            raise InvalidArgumentError(f"tensor override {item!r} is not REGEX=DEVICE")
        pairs.append((pattern, device))
    return pairs


def check_tensor_overrides(value: object) -> tuple[tuple[str, str], ...]:
    """``tensor_overrides`` as pairs: a sequence of ``(regex, device)`` or llama.cpp's string.
    (The regexes and devices are checked where the model loads, against llama.cpp's engine.)

    Raises:
        InvalidArgumentError: Anything else.
    """
    if isinstance(value, str):
        return tuple(parse_tensor_overrides(value))
    if not isinstance(value, Sequence):
        raise InvalidArgumentError(f"tensor_overrides must be (regex, device) pairs, got {value!r}")
    pairs: list[tuple[str, str]] = []
    for item in value:
        if (
            isinstance(item, str)
            or not isinstance(item, Sequence)
            or len(item) != 2
            or not all(isinstance(x, str) for x in item)
        ):
            raise InvalidArgumentError(f"tensor_overrides must be (regex, device) pairs of str, got {item!r}")
        pairs.append((item[0], item[1]))
    return tuple(pairs)


# llama.h's enum llama_load_mode, which replaced llama-cpp-python's use_mmap / use_mlock flags.
LOAD_MODE_AUTO = -1
LOAD_MODE_NONE = 0
LOAD_MODE_MLOCK = 2
LOAD_MODE_MMAP_MLOCK = 3


@dataclass(frozen=True, kw_only=True)
class ModelParams:
    """The model's load parameters under the names of llama.h's ``llama_model_params``:
    llama-cpp-python's ``Llama.model_params``, as a frozen value instead of a ctypes struct.

    These are the values the model was loaded with (llama.cpp does not report them back).

    Attributes:
        n_gpu_layers: Layers offloaded to the GPU (negative: all).
        split_mode: 0 none, 1 layer, 2 row, 3 tensor.
        main_gpu: The GPU used when ``split_mode`` is 0.
        tensor_split: Proportion of the model per GPU (empty: llama.cpp decides).
        load_mode: llama.h's ``llama_load_mode``: -1 auto (mmap where possible, the default),
            0 read into memory (``use_mmap=False``), 2 mlock, 3 mmap + mlock.
        use_mmap: llama-cpp-python's flag behind ``load_mode``.
        use_mlock: Same.
        vocab_only: Only the vocabulary was loaded.
        kv_overrides: GGUF metadata overridden at load.
    """

    n_gpu_layers: int
    split_mode: int
    main_gpu: int
    tensor_split: tuple[float, ...]
    load_mode: int
    use_mmap: bool
    use_mlock: bool
    vocab_only: bool
    kv_overrides: Mapping[str, bool | int | float | str]


@dataclass(frozen=True, kw_only=True)
class ContextParams:
    """The context's parameters under the names of llama.h's ``llama_context_params``:
    llama-cpp-python's ``Llama.context_params``, as a frozen value instead of a ctypes struct.

    Sizes, threads and pooling are read back from the llama.cpp context, so they are what
    llama.cpp made of the request: ``n_ctx`` is the model's training context when 0 was
    asked for (as llama-cpp-python reports it) and is rounded up where llama.cpp pads it;
    ``n_ubatch`` is at most ``n_batch``. The other fields are the values passed to llama.cpp.

    Attributes:
        n_ctx: The context window in tokens (all sequences together).
        n_batch: Most tokens submitted in one ``llama_decode``.
        n_ubatch: Most tokens computed in one physical step.
        n_seq_max: Sequences the context holds.
        n_threads: Threads for generation.
        n_threads_batch: Threads for prompt processing.
        pooling_type: 0 none, 1 mean, 2 CLS, 3 last, 4 rank (the model's where -1 was passed).
        flash_attn_type: llama.h's ``llama_flash_attn_type``: -1 auto, 0 off, 1 on.
        embeddings: The context extracts embeddings.
        offload_kqv: The KV cache stays on the GPU with offloaded layers.
        kv_unified: One KV buffer across sequences.
        type_k: ggml type id of the K cache (-1: llama.cpp's default, f16).
        type_v: Same for the V cache.
        rope_scaling_type: -1 the model's, 0 none, 1 linear, 2 YaRN, 3 LongRoPE.
        rope_freq_base: 0: the model's.
        rope_freq_scale: 0: the model's.
        yarn_ext_factor: Negative: the model's.
        yarn_attn_factor: Negative: the model's.
        yarn_beta_fast: Negative: llama.cpp's default.
        yarn_beta_slow: Negative: llama.cpp's default.
        yarn_orig_ctx: 0: the model's.
    """

    n_ctx: int
    n_batch: int
    n_ubatch: int
    n_seq_max: int
    n_threads: int
    n_threads_batch: int
    pooling_type: int
    flash_attn_type: int
    embeddings: bool
    offload_kqv: bool
    kv_unified: bool
    type_k: int
    type_v: int
    rope_scaling_type: int
    rope_freq_base: float
    rope_freq_scale: float
    yarn_ext_factor: float
    yarn_attn_factor: float
    yarn_beta_fast: float
    yarn_beta_slow: float
    yarn_orig_ctx: int


def model_params(config: LlamaConfig) -> ModelParams:
    """The :class:`ModelParams` a model loaded with ``config`` was given."""
    options = config.model_options()
    if options.use_mlock:
        load_mode = LOAD_MODE_MMAP_MLOCK if options.use_mmap else LOAD_MODE_MLOCK
    else:
        load_mode = LOAD_MODE_AUTO if options.use_mmap else LOAD_MODE_NONE
    return ModelParams(
        n_gpu_layers=options.n_gpu_layers,
        split_mode=options.split_mode,
        main_gpu=options.main_gpu,
        tensor_split=tuple(options.tensor_split),
        load_mode=load_mode,
        use_mmap=options.use_mmap,
        use_mlock=options.use_mlock,
        vocab_only=options.vocab_only,
        kv_overrides=dict(config.kv_overrides or {}),
    )


def context_params(config: LlamaConfig, context: _core.Context) -> ContextParams:
    """The :class:`ContextParams` of ``context``, created from ``config``."""
    options = config.context_options()
    return ContextParams(
        n_ctx=context.n_ctx(),
        n_batch=context.n_batch(),
        n_ubatch=context.n_ubatch(),
        n_seq_max=context.n_seq_max(),
        n_threads=context.n_threads(),
        n_threads_batch=context.n_threads_batch(),
        pooling_type=context.pooling_type(),
        flash_attn_type=options.flash_attn,
        embeddings=options.embeddings,
        offload_kqv=options.offload_kqv,
        kv_unified=options.kv_unified,
        type_k=options.type_k,
        type_v=options.type_v,
        rope_scaling_type=options.rope_scaling_type,
        rope_freq_base=options.rope_freq_base,
        rope_freq_scale=options.rope_freq_scale,
        yarn_ext_factor=options.yarn_ext_factor,
        yarn_attn_factor=options.yarn_attn_factor,
        yarn_beta_fast=options.yarn_beta_fast,
        yarn_beta_slow=options.yarn_beta_slow,
        yarn_orig_ctx=options.yarn_orig_ctx,
    )


#: The default of every LlamaConfig field.
DEFAULTS: dict[str, object] = {f.name: f.default for f in fields(LlamaConfig)}

#: llama-cpp-python keywords that are accepted for compatibility and have no effect here.
#: lora_base is stored and never read by llama-cpp-python 0.3; n_parts and f16_kv are older
#: names (the KV cache is f16 unless type_k/type_v say otherwise) that LangChain still passes.
IGNORED_OPTIONS = frozenset(
    {"last_n_tokens_size", "logits_all", "draft_model", "lora_base", "n_parts", "f16_kv"}
)


def resolve_config(where: str, config: LlamaConfig | None, options: Mapping[str, object]) -> LlamaConfig:
    """The settings of a constructor call: ``config`` (or the defaults) with ``options``, the
    keywords passed besides it, set over it. A keyword set to its default value still wins.

    Raises:
        TypeError: An unknown keyword (llama-cpp-python's that have no effect here only warn).
        InvalidArgumentError: A value out of range.
    """
    unknown = sorted(set(options) - DEFAULTS.keys() - IGNORED_OPTIONS)
    if unknown:
        raise TypeError(f"{where}() got unexpected keyword arguments {unknown}")
    for name in sorted(IGNORED_OPTIONS & options.keys()):
        warnings.warn(f"{where}() ignores the keyword argument {name!r} (no effect here)", stacklevel=3)
    given = {name: value for name, value in options.items() if name in DEFAULTS}
    return replace(config, **given) if config is not None else LlamaConfig(**given)  # type: ignore[arg-type]


#: pooling_type values that may pool by mean: the model's own (-1), mean (1), rank (4: a
#: ModernBERT-style head pools by mean first).
_MAY_POOL_MEAN = (-1, 1, 4)


def _round_up(value: int, multiple: int) -> int:
    return -(-value // multiple) * multiple


def _at_least(name: str, value: int, minimum: int) -> None:
    if not isinstance(value, int) or isinstance(value, bool) or value < minimum:
        raise InvalidArgumentError(f"{name} must be an integer >= {minimum}, got {value!r}")
