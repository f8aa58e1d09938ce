"""Model and context settings: :class:`LlamaConfig`, llama-cpp-python's constructor as a value."""

from __future__ import annotations

import os
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field, fields

from llama_cpp import _core
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
    #: Seconds a paused stream may keep other calls on the model waiting before it loses the
    #: context (its next step then raises ContextBusyError).
    stream_timeout: float = 60.0
    verbose: bool = field(default=True, compare=False)

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
        if self.split_mode not in (0, 1, 2):
            raise InvalidArgumentError(f"split_mode must be 0, 1 or 2, got {self.split_mode}")

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
        if isinstance(self.rpc_servers, str):  # llama-cpp-python's "host:port,host:port"
            options.rpc_servers = [s.strip() for s in self.rpc_servers.split(",") if s.strip()]
        else:
            options.rpc_servers = list(self.rpc_servers or [])
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
        options.embeddings = self.embedding
        options.pooling_type = self.pooling_type
        if self.embedding:
            # One sequence per input, each with the whole window; a pooled sequence must sit
            # in one physical batch.
            options.n_seq_max = EMBEDDING_SEQUENCES
            options.kv_unified = True
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
        options.verbose = self.verbose
        return options


#: The default of every LlamaConfig field.
DEFAULTS: dict[str, object] = {f.name: f.default for f in fields(LlamaConfig)}


def _at_least(name: str, value: int, minimum: int) -> None:
    if not isinstance(value, int) or isinstance(value, bool) or value < minimum:
        raise InvalidArgumentError(f"{name} must be an integer >= {minimum}, got {value!r}")
