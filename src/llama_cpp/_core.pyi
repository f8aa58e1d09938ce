"""The native core of llama_cpp: llama.cpp through nanobind."""

from collections.abc import Callable, Sequence
from typing import Annotated

import numpy
from numpy.typing import NDArray


class LlamaError(RuntimeError):
    """Base class of every error raised by llama_cpp."""

class ModelLoadError(LlamaError, ValueError):
    """
    A GGUF file is missing, unreadable, truncated or not a model llama.cpp can load.
    """

class ContextOverflowError(LlamaError, ValueError):
    """The tokens to evaluate do not fit in the context window."""

class DecodeError(LlamaError):
    """llama_decode failed (out of memory or an internal error)."""

class ClosedError(LlamaError):
    """
    The model or context was closed (possibly while a call on it was running).
    """

class InvalidArgumentError(LlamaError, ValueError):
    """An argument is out of its valid range."""

class GrammarError(InvalidArgumentError):
    """A GBNF grammar (or a schema turned into one) is invalid."""

class GenerationCancelled(LlamaError):
    """The generation was cancelled (Cancellation.cancel())."""

def set_log_callback(callback: object | None) -> None:
    """
    Install ``callback(level: int, line: str)`` for llama.cpp's log (None removes it).
    """

def set_log_level(level: int) -> None:
    """
    Drop llama.cpp log lines below ``level`` (a GGML_LOG_LEVEL value) without taking the GIL.
    """

LOG_LEVEL_DEBUG: int = 1

LOG_LEVEL_INFO: int = 2

LOG_LEVEL_WARN: int = 3

LOG_LEVEL_ERROR: int = 4

def backend_init(backend_dir: str) -> None:
    """
    Load backend modules from ``backend_dir`` (portable builds) and initialise llama.cpp. Called once by the package on import; later calls do nothing.
    """

def backend_load_errors() -> list[tuple[str, str]]:
    """
    The backend modules backend_init found but could not load: (file name, reason).
    """

def probe_backend_modules(directory: str) -> list[tuple[str, str]]:
    """
    Why the backend modules in ``directory`` whose backend is not registered fail to load: (file name, reason) pairs. Registers nothing.
    """

def system_info() -> str:
    """
    llama.cpp's system line: backends and the CPU features they were built with.
    """

def supports_gpu_offload() -> bool: ...

def supports_mmap() -> bool: ...

def supports_mlock() -> bool: ...

def supports_rpc() -> bool: ...

def max_devices() -> int: ...

def llama_cpp_commit() -> str:
    """
    The llama.cpp commit the module was compiled against ('unknown' for a user's build).
    """

class Device:
    """A compute device that ggml can use."""

    @property
    def name(self) -> str: ...

    @property
    def description(self) -> str: ...

    @property
    def type(self) -> str:
        """'cpu', 'gpu', 'igpu', 'accel' or 'other'."""

    @property
    def memory_free(self) -> int:
        """Free memory in bytes."""

    @property
    def memory_total(self) -> int:
        """Total memory in bytes."""

    @property
    def available(self) -> bool:
        """
        False for an RPC server that does not answer now (its memory then reads 0).
        """

    def __repr__(self) -> str: ...

def devices() -> list[Device]:
    """
    The devices of every loaded backend (an RPC worker that does not answer: 0 bytes of memory).
    """

def rpc_register(endpoints: Sequence[str]) -> None:
    """
    Connect to ggml-rpc-server processes ('host:port') and register their devices.
    """

def numa_init(strategy: str) -> None:
    """
    llama_numa_init with 'distribute', 'isolate' or 'numactl', once per process. Raises InvalidArgumentError for another name, or for a strategy other than the one already set.
    """

def numa_strategy() -> str | None:
    """The NUMA strategy set in this process (None: none)."""

class ModelOptions:
    """Options for loading a model (llama_model_params)."""

    def __init__(self) -> None: ...

    @property
    def n_gpu_layers(self) -> int: ...

    @n_gpu_layers.setter
    def n_gpu_layers(self, arg: int, /) -> None: ...

    @property
    def split_mode(self) -> int: ...

    @split_mode.setter
    def split_mode(self, arg: int, /) -> None: ...

    @property
    def main_gpu(self) -> int: ...

    @main_gpu.setter
    def main_gpu(self, arg: int, /) -> None: ...

    @property
    def tensor_split(self) -> list[float]: ...

    @tensor_split.setter
    def tensor_split(self, arg: Sequence[float], /) -> None: ...

    @property
    def vocab_only(self) -> bool: ...

    @vocab_only.setter
    def vocab_only(self, arg: bool, /) -> None: ...

    @property
    def use_mmap(self) -> bool: ...

    @use_mmap.setter
    def use_mmap(self, arg: bool, /) -> None: ...

    @property
    def use_mlock(self) -> bool: ...

    @use_mlock.setter
    def use_mlock(self, arg: bool, /) -> None: ...

    @property
    def check_tensors(self) -> bool: ...

    @check_tensors.setter
    def check_tensors(self, arg: bool, /) -> None: ...

    @property
    def verbose(self) -> bool: ...

    @verbose.setter
    def verbose(self, arg: bool, /) -> None: ...

    @property
    def rpc_servers(self) -> list[str]: ...

    @rpc_servers.setter
    def rpc_servers(self, arg: Sequence[str], /) -> None: ...

    @property
    def tensor_overrides(self) -> list[tuple[str, str]]:
        """
        (regex, device name) pairs, as llama.cpp's --override-tensor; the first match wins.
        """

    @tensor_overrides.setter
    def tensor_overrides(self, arg: Sequence[tuple[str, str]], /) -> None: ...

    @property
    def cpu_moe(self) -> bool:
        """Every expert tensor in host memory (--cpu-moe)."""

    @cpu_moe.setter
    def cpu_moe(self, arg: bool, /) -> None: ...

    @property
    def n_cpu_moe(self) -> int:
        """The expert tensors of the first N layers in host memory (--n-cpu-moe)."""

    @n_cpu_moe.setter
    def n_cpu_moe(self, arg: int, /) -> None: ...

    @property
    def kv_overrides(self) -> list[tuple[str, bool | int | float | str]]: ...

    @kv_overrides.setter
    def kv_overrides(self, arg: Sequence[tuple[str, bool | int | float | str]], /) -> None: ...

    @property
    def progress_callback(self, /) -> Callable[[float], bool | None] | None:
        """
        Called with the fraction loaded (0..1) while the weights load; False cancels.
        """

    @progress_callback.setter
    def progress_callback(self, arg: Callable[[float], bool | None] | None, /) -> None: ...

class LoraAdapter:
    """A LoRA adapter loaded for one model."""

    def __init__(self, model: Model, path: str) -> None:
        """
        Load the adapter at ``path``. Raises ModelLoadError if it is missing or does not fit the model.
        """

    @property
    def path(self) -> str: ...

    def __eq__(self, other: object, /) -> bool: ...

    def __hash__(self) -> int: ...

    def __repr__(self) -> str: ...

class Model:
    """A GGUF model loaded by llama.cpp."""

    def __init__(self, path: str, options: ModelOptions) -> None:
        """
        Load ``path`` (the GIL released, except inside ``options.progress_callback``).

        Raises ModelLoadError if it is missing or not a loadable GGUF, or if the progress callback returned False or raised (its exception is the cause); an interrupt raised in the callback (KeyboardInterrupt) propagates unchanged.
        """

    def close(self) -> None:
        """Drop this object's reference to the weights (idempotent)."""

    @property
    def closed(self) -> bool: ...

    @property
    def path(self) -> str: ...

    def tokenize(self, text: bytes, add_special: bool, parse_special: bool) -> list[int]:
        """Token ids of the UTF-8 bytes ``text``."""

    def detokenize(self, tokens: Sequence[int], special: bool) -> bytes: ...

    def token_to_piece(self, token: int, special: bool) -> bytes: ...

    def metadata(self) -> list[tuple[str, str]]:
        """GGUF key/value metadata, values rendered as text."""

    def description(self) -> str: ...

    def chat_template(self) -> str | None: ...

    def is_eog(self, arg: int, /) -> bool: ...

    @property
    def n_vocab(self) -> int: ...

    @property
    def n_ctx_train(self) -> int: ...

    @property
    def n_embd(self) -> int: ...

    @property
    def n_layer(self) -> int: ...

    @property
    def n_params(self) -> int: ...

    @property
    def size(self) -> int: ...

    @property
    def token_bos(self) -> int: ...

    @property
    def token_eos(self) -> int: ...

    @property
    def token_fim_pre(self) -> int: ...

    @property
    def token_fim_suf(self) -> int: ...

    @property
    def token_fim_mid(self) -> int: ...

    @property
    def token_fim_pad(self) -> int: ...

    @property
    def token_fim_rep(self) -> int: ...

    @property
    def token_fim_sep(self) -> int: ...

    @property
    def add_bos(self) -> bool: ...

    @property
    def add_eos(self) -> bool: ...

    def __repr__(self) -> str: ...

class SamplerConfig:
    """Sampling settings of one generation (see llama_cpp.SamplingParams)."""

    def __init__(self) -> None: ...

    @property
    def temperature(self) -> float: ...

    @temperature.setter
    def temperature(self, arg: float, /) -> None: ...

    @property
    def top_k(self) -> int: ...

    @top_k.setter
    def top_k(self, arg: int, /) -> None: ...

    @property
    def top_p(self) -> float: ...

    @top_p.setter
    def top_p(self, arg: float, /) -> None: ...

    @property
    def min_p(self) -> float: ...

    @min_p.setter
    def min_p(self, arg: float, /) -> None: ...

    @property
    def typical_p(self) -> float: ...

    @typical_p.setter
    def typical_p(self, arg: float, /) -> None: ...

    @property
    def repeat_penalty(self) -> float: ...

    @repeat_penalty.setter
    def repeat_penalty(self, arg: float, /) -> None: ...

    @property
    def frequency_penalty(self) -> float: ...

    @frequency_penalty.setter
    def frequency_penalty(self, arg: float, /) -> None: ...

    @property
    def presence_penalty(self) -> float: ...

    @presence_penalty.setter
    def presence_penalty(self, arg: float, /) -> None: ...

    @property
    def penalty_last_n(self) -> int: ...

    @penalty_last_n.setter
    def penalty_last_n(self, arg: int, /) -> None: ...

    @property
    def mirostat_mode(self) -> int: ...

    @mirostat_mode.setter
    def mirostat_mode(self, arg: int, /) -> None: ...

    @property
    def mirostat_tau(self) -> float: ...

    @mirostat_tau.setter
    def mirostat_tau(self, arg: float, /) -> None: ...

    @property
    def mirostat_eta(self) -> float: ...

    @mirostat_eta.setter
    def mirostat_eta(self, arg: float, /) -> None: ...

    @property
    def dry_multiplier(self) -> float: ...

    @dry_multiplier.setter
    def dry_multiplier(self, arg: float, /) -> None: ...

    @property
    def dry_base(self) -> float: ...

    @dry_base.setter
    def dry_base(self, arg: float, /) -> None: ...

    @property
    def dry_allowed_length(self) -> int: ...

    @dry_allowed_length.setter
    def dry_allowed_length(self, arg: int, /) -> None: ...

    @property
    def dry_penalty_last_n(self) -> int: ...

    @dry_penalty_last_n.setter
    def dry_penalty_last_n(self, arg: int, /) -> None: ...

    @property
    def dry_sequence_breakers(self) -> list[str]: ...

    @dry_sequence_breakers.setter
    def dry_sequence_breakers(self, arg: Sequence[str], /) -> None: ...

    @property
    def xtc_probability(self) -> float: ...

    @xtc_probability.setter
    def xtc_probability(self, arg: float, /) -> None: ...

    @property
    def xtc_threshold(self) -> float: ...

    @xtc_threshold.setter
    def xtc_threshold(self, arg: float, /) -> None: ...

    @property
    def top_n_sigma(self) -> float: ...

    @top_n_sigma.setter
    def top_n_sigma(self, arg: float, /) -> None: ...

    @property
    def seed(self) -> int: ...

    @seed.setter
    def seed(self, arg: int, /) -> None: ...

    @property
    def logit_bias(self) -> list[tuple[int, float]]: ...

    @logit_bias.setter
    def logit_bias(self, arg: Sequence[tuple[int, float]], /) -> None: ...

    @property
    def grammar(self) -> str: ...

    @grammar.setter
    def grammar(self, arg: str, /) -> None: ...

    @property
    def grammar_root(self) -> str: ...

    @grammar_root.setter
    def grammar_root(self, arg: str, /) -> None: ...

    @property
    def grammar_lazy(self) -> bool: ...

    @grammar_lazy.setter
    def grammar_lazy(self, arg: bool, /) -> None: ...

    @property
    def grammar_trigger_patterns(self) -> list[str]: ...

    @grammar_trigger_patterns.setter
    def grammar_trigger_patterns(self, arg: Sequence[str], /) -> None: ...

    @property
    def grammar_trigger_tokens(self) -> list[int]: ...

    @grammar_trigger_tokens.setter
    def grammar_trigger_tokens(self, arg: Sequence[int], /) -> None: ...

    @property
    def grammar_prefill(self) -> list[int]: ...

    @grammar_prefill.setter
    def grammar_prefill(self, arg: Sequence[int], /) -> None: ...

def json_schema_to_grammar(schema: str) -> str:
    """
    GBNF that accepts exactly the JSON documents valid under ``schema`` (JSON text), by llama.cpp's own converter. Raises GrammarError for a schema it cannot convert.
    """

def check_grammar(model: Model, grammar: str, root: str) -> None:
    """
    Raise GrammarError if llama.cpp rejects ``grammar`` for this model's vocabulary.
    """

def validate_grammar(grammar: str, root: str) -> None:
    """
    Raise GrammarError, with llama.cpp's reason, if it would reject ``grammar`` whatever the model (its syntax, undefined rules, no ``root`` rule, left recursion). Token literals (``<end_of_turn>``) are checked against a model's vocabulary only (check_grammar).
    """

DEFAULT_SEED: int = 4294967295

class ChatRequest:
    """What to render: messages, tools and options (JSON text)."""

    def __init__(self) -> None: ...

    @property
    def messages(self) -> str: ...

    @messages.setter
    def messages(self, arg: str, /) -> None: ...

    @property
    def tools(self) -> str: ...

    @tools.setter
    def tools(self, arg: str, /) -> None: ...

    @property
    def tool_choice(self) -> str: ...

    @tool_choice.setter
    def tool_choice(self, arg: str, /) -> None: ...

    @property
    def json_schema(self) -> str: ...

    @json_schema.setter
    def json_schema(self, arg: str, /) -> None: ...

    @property
    def parallel_tool_calls(self) -> bool: ...

    @parallel_tool_calls.setter
    def parallel_tool_calls(self, arg: bool, /) -> None: ...

    @property
    def add_generation_prompt(self) -> bool: ...

    @add_generation_prompt.setter
    def add_generation_prompt(self, arg: bool, /) -> None: ...

    @property
    def enable_thinking(self) -> bool: ...

    @enable_thinking.setter
    def enable_thinking(self, arg: bool, /) -> None: ...

    @property
    def reasoning_format(self) -> str: ...

    @reasoning_format.setter
    def reasoning_format(self, arg: str, /) -> None: ...

    @property
    def template_kwargs(self) -> list[tuple[str, str]]: ...

    @template_kwargs.setter
    def template_kwargs(self, arg: Sequence[tuple[str, str]], /) -> None: ...

class ChatParams:
    """A rendered conversation and what its generation needs."""

    @property
    def prompt(self) -> str: ...

    @property
    def format(self) -> str: ...

    @property
    def grammar(self) -> str: ...

    @property
    def grammar_lazy(self) -> bool: ...

    @property
    def grammar_trigger_patterns(self) -> list[str]: ...

    @property
    def grammar_trigger_tokens(self) -> list[int]: ...

    @property
    def grammar_prefill(self) -> list[int]: ...

    @property
    def preserved_tokens(self) -> list[int]: ...

    @property
    def additional_stops(self) -> list[str]: ...

    @property
    def generation_prompt(self) -> str: ...

    @property
    def supports_thinking(self) -> bool: ...

    @property
    def thinking_start_tag(self) -> str: ...

    @property
    def thinking_end_tags(self) -> list[str]: ...

class ChatDelta:
    """One change of a streamed chat message."""

    @property
    def content(self) -> str: ...

    @property
    def reasoning_content(self) -> str: ...

    @property
    def tool_call_index(self) -> int: ...

    @property
    def tool_call_id(self) -> str: ...

    @property
    def tool_call_name(self) -> str: ...

    @property
    def tool_call_arguments(self) -> str: ...

class ChatTemplates:
    """
    A model's chat templates, rendered by llama.cpp's Jinja engine within limits (docs/hardening.md, "Hostile chat templates"): TemplateError past them.
    """

    def __init__(self, model: Model, override_template: str = '', *, time_limit: float = 5.0, max_output_bytes: int = 33554432, max_macro_depth: int = 64) -> None: ...

    def apply(self, request: ChatRequest) -> ChatParams: ...

    def source(self) -> str: ...

    def supports_thinking(self) -> bool: ...

    def caps(self) -> list[tuple[str, bool]]: ...

    @property
    def time_limit(self) -> float: ...

    @property
    def max_output_bytes(self) -> int: ...

    @property
    def max_macro_depth(self) -> int: ...

    @property
    def refused(self) -> str: ...

TEMPLATE_MAX_SOURCE_BYTES: int = 1048576

TEMPLATE_MAX_AST_DEPTH: int = 256

TEMPLATE_MAX_LOOP_NESTING: int = 8

TEMPLATE_MAX_CONST_ITERATIONS: int = 100000

TEMPLATE_MAX_CONST_REPEAT: int = 100000

TEMPLATE_DEFAULT_TIME_LIMIT: float = 5.0

TEMPLATE_DEFAULT_MAX_OUTPUT_BYTES: int = 33554432

TEMPLATE_DEFAULT_MAX_MACRO_DEPTH: int = 64

TEMPLATE_MAX_MACRO_DEPTH: int = 512

class ChatParser:
    """Parses generated text in a chat format into an OpenAI message."""

    def __init__(self, params: ChatParams) -> None: ...

    def parse(self, text: str, is_partial: bool = False) -> str: ...

    def update(self, delta: str, is_partial: bool = True) -> list[ChatDelta]: ...

    @property
    def fell_back(self) -> bool: ...

class Utf8Decoder:
    """Incremental UTF-8: bytes in, whole characters out."""

    def __init__(self) -> None: ...

    def push(self, data: bytes) -> str:
        """
        Add bytes; returns the text they complete (invalid bytes become U+FFFD).
        """

    def flush(self) -> str:
        """The end: whatever is held back, incomplete sequences as U+FFFD."""

class StopMatcher:
    """Stop strings matched across pieces of text."""

    def __init__(self, stops: Sequence[str]) -> None: ...

    def push(self, text: str) -> tuple[str, bool]:
        """
        Add text; returns (text that can be released, whether a stop string completed).
        """

    def flush(self) -> str:
        """The end: the text held back as a possible stop-string start."""

class TokenLogprob:
    """log_softmax of the raw logits at a token."""

    def __init__(self, token: int, logprob: float, top: Sequence[tuple[int, float]]) -> None:
        """One computed elsewhere (a child process of an IsolatedPool)."""

    @property
    def token(self) -> int: ...

    @property
    def logprob(self) -> float: ...

    @property
    def top(self) -> list[tuple[int, float]]:
        """The most likely tokens and their logprobs, best first."""

class Cancellation:
    """A flag that stops a generation it is given to."""

    def __init__(self) -> None: ...

    def cancel(self) -> None:
        """Stop the generation at its next token or decode step."""

    @property
    def cancelled(self) -> bool: ...

class GenerateOptions:
    """What a generation produces and when it stops."""

    def __init__(self) -> None: ...

    @property
    def max_tokens(self) -> int:
        """<= 0: until the context is full."""

    @max_tokens.setter
    def max_tokens(self, arg: int, /) -> None: ...

    @property
    def stop(self) -> list[str]:
        """Stop strings, matched on text."""

    @stop.setter
    def stop(self, arg: Sequence[str], /) -> None: ...

    @property
    def n_probs(self) -> int:
        """-1: no logprobs; k >= 0: logprob and top k."""

    @n_probs.setter
    def n_probs(self, arg: int, /) -> None: ...

    @property
    def prompt_logprobs(self) -> bool:
        """Also score the prompt's tokens (evaluates the whole prompt)."""

    @prompt_logprobs.setter
    def prompt_logprobs(self, arg: bool, /) -> None: ...

    @property
    def cancellation(self) -> Cancellation: ...

    @cancellation.setter
    def cancellation(self, arg: Cancellation, /) -> None: ...

    @property
    def preserved_tokens(self) -> list[int]:
        """
        Special tokens whose text is part of the output (a chat format's markers).
        """

    @preserved_tokens.setter
    def preserved_tokens(self, arg: Sequence[int], /) -> None: ...

    def set_hooks(self, logits_hook: object | None, stop_hook: object | None) -> None:
        """
        Per-token Python hooks, called as hook(token_ids, logits) over memoryviews (slow path).
        """

    @property
    def has_hooks(self) -> bool:
        """Whether Python hooks are set (they cannot run in another process)."""

class Chunk:
    """
    Text released by one or more steps, with its tokens and their logprobs.
    """

    def __init__(self, text: str, tokens: Sequence[int], logprobs: Sequence[TokenLogprob]) -> None:
        """One produced elsewhere (a child process of an IsolatedPool)."""

    @property
    def text(self) -> str: ...

    @property
    def tokens(self) -> list[int]: ...

    @property
    def logprobs(self) -> list[TokenLogprob]: ...

EXPERT_TRACE_MAX_BYTES: int = 1073741824

class ExpertProfiler:
    """
    Counts of the experts a MoE model's router picks, collected during llama_decode (see llama_cpp.experts).
    """

    @property
    def n_expert(self) -> int: ...

    @property
    def n_expert_used(self) -> int: ...

    @property
    def trace_capacity(self) -> int:
        """Tokens the routing trace keeps (0: no trace)."""

    def snapshot(self, reset: bool = False) -> tuple[Annotated[NDArray[numpy.int32], dict(shape=(None,), order='C')], Annotated[NDArray[numpy.int64], dict(shape=(None, None), order='C')], Annotated[NDArray[numpy.int64], dict(shape=(None,), order='C')], Annotated[NDArray[numpy.int32], dict(shape=(None, None, None), order='C')], int]:
        """
        (layers int32[rows], counts int64[rows, n_expert], tokens int64[rows], trace int32[n_trace, rows, n_expert_used], trace_total): copies, rows being the MoE layers that routed tokens. reset=True also forgets everything counted, under the same lock as the copy: no token falls between the two.
        """

    def reset(self) -> None:
        """Forget everything counted."""

class ContextBusyError(LlamaError):
    """
    The context is held by a stream open in the calling thread or by the generation whose hook made the call; or a stream left unread past stream_timeout lost the context to a waiting call.
    """

class ContextOptions:
    """Options for a context (llama_context_params)."""

    def __init__(self) -> None: ...

    @property
    def n_ctx(self) -> int: ...

    @n_ctx.setter
    def n_ctx(self, arg: int, /) -> None: ...

    @property
    def n_batch(self) -> int: ...

    @n_batch.setter
    def n_batch(self, arg: int, /) -> None: ...

    @property
    def n_ubatch(self) -> int: ...

    @n_ubatch.setter
    def n_ubatch(self, arg: int, /) -> None: ...

    @property
    def n_threads(self) -> int: ...

    @n_threads.setter
    def n_threads(self, arg: int, /) -> None: ...

    @property
    def n_threads_batch(self) -> int: ...

    @n_threads_batch.setter
    def n_threads_batch(self, arg: int, /) -> None: ...

    @property
    def flash_attn(self) -> int: ...

    @flash_attn.setter
    def flash_attn(self, arg: int, /) -> None: ...

    @property
    def offload_kqv(self) -> bool: ...

    @offload_kqv.setter
    def offload_kqv(self, arg: bool, /) -> None: ...

    @property
    def embeddings(self) -> bool: ...

    @embeddings.setter
    def embeddings(self, arg: bool, /) -> None: ...

    @property
    def rope_freq_base(self) -> float: ...

    @rope_freq_base.setter
    def rope_freq_base(self, arg: float, /) -> None: ...

    @property
    def rope_freq_scale(self) -> float: ...

    @rope_freq_scale.setter
    def rope_freq_scale(self, arg: float, /) -> None: ...

    @property
    def rope_scaling_type(self) -> int: ...

    @rope_scaling_type.setter
    def rope_scaling_type(self, arg: int, /) -> None: ...

    @property
    def yarn_ext_factor(self) -> float: ...

    @yarn_ext_factor.setter
    def yarn_ext_factor(self, arg: float, /) -> None: ...

    @property
    def yarn_attn_factor(self) -> float: ...

    @yarn_attn_factor.setter
    def yarn_attn_factor(self, arg: float, /) -> None: ...

    @property
    def yarn_beta_fast(self) -> float: ...

    @yarn_beta_fast.setter
    def yarn_beta_fast(self, arg: float, /) -> None: ...

    @property
    def yarn_beta_slow(self) -> float: ...

    @yarn_beta_slow.setter
    def yarn_beta_slow(self, arg: float, /) -> None: ...

    @property
    def yarn_orig_ctx(self) -> int: ...

    @yarn_orig_ctx.setter
    def yarn_orig_ctx(self, arg: int, /) -> None: ...

    @property
    def pooling_type(self) -> int: ...

    @pooling_type.setter
    def pooling_type(self, arg: int, /) -> None: ...

    @property
    def type_k(self) -> int: ...

    @type_k.setter
    def type_k(self, arg: int, /) -> None: ...

    @property
    def type_v(self) -> int: ...

    @type_v.setter
    def type_v(self, arg: int, /) -> None: ...

    @property
    def n_seq_max(self) -> int: ...

    @n_seq_max.setter
    def n_seq_max(self, arg: int, /) -> None: ...

    @property
    def kv_unified(self) -> bool: ...

    @kv_unified.setter
    def kv_unified(self, arg: bool, /) -> None: ...

    @property
    def verbose(self) -> bool: ...

    @verbose.setter
    def verbose(self, arg: bool, /) -> None: ...

    @property
    def profile_experts(self) -> bool:
        """
        Count the experts a MoE model routes each token to (no effect on a dense model).
        """

    @profile_experts.setter
    def profile_experts(self, arg: bool, /) -> None: ...

    @property
    def profile_experts_trace(self) -> int:
        """
        Tokens whose routing the profiler keeps (the latest ones; 0: none); the trace takes at most EXPERT_TRACE_MAX_BYTES (1 GiB): more raises InvalidArgumentError when the context is created.
        """

    @profile_experts_trace.setter
    def profile_experts_trace(self, arg: int, /) -> None: ...

    @property
    def stream_timeout(self) -> float:
        """
        Seconds a paused TokenStream may keep other calls waiting before it loses the context.
        """

    @stream_timeout.setter
    def stream_timeout(self, arg: float, /) -> None: ...

class PerfData:
    """llama.cpp's context timings since the last reset."""

    @property
    def t_load_ms(self) -> float: ...

    @property
    def t_prompt_ms(self) -> float: ...

    @property
    def t_eval_ms(self) -> float: ...

    @property
    def n_prompt(self) -> int: ...

    @property
    def n_eval(self) -> int: ...

    @property
    def n_reused(self) -> int: ...

class Context:
    """A llama_context: KV cache, batch buffer and token loop."""

    def __init__(self, model: Model, options: ContextOptions) -> None: ...

    def close(self) -> None:
        """
        Stop any running call at its next step, wait for it, free the context. Idempotent.
        """

    @property
    def closed(self) -> bool: ...

    def n_ctx(self) -> int: ...

    def memory_breakdown(self) -> dict[str, dict[str, int]]:
        """
        llama.cpp's accounting by device: {name: {'model', 'context', 'compute': bytes}}.
        """

    def n_batch(self) -> int: ...

    def n_ubatch(self) -> int: ...

    def n_seq_max(self) -> int: ...

    def n_threads(self) -> int: ...

    def n_threads_batch(self) -> int: ...

    def n_past(self) -> int:
        """Tokens in sequence 0 of the KV cache, as llama.cpp reports it."""

    def tokens(self) -> list[int]:
        """The tokens held in the KV cache."""

    def reset(self) -> None: ...

    def eval(self, tokens: Sequence[int]) -> None:
        """Append ``tokens`` to the KV cache (n_batch at a time)."""

    def logits(self) -> Annotated[NDArray[numpy.float32], dict(shape=(None,), order='C')]:
        """
        The logits of the last evaluated token: a float32 array of n_vocab (a copy).
        """

    def state_data(self) -> tuple[bytes, list[int]]:
        """The KV cache and last logits as bytes, and the tokens they hold."""

    def set_state_data(self, data: bytes, tokens: Sequence[int]) -> None:
        """
        Restore what state_data returned (raises LlamaError if it does not fit).
        """

    def save_state_file(self, path: str) -> None: ...

    def load_state_file(self, path: str) -> None: ...

    def kv_truncate(self, n: int) -> None:
        """Keep the first ``n`` cached tokens."""

    def kv_shift(self, p0: int, p1: int) -> None:
        """Drop cached tokens [p0, p1) and move the later ones back."""

    def embed(self, inputs: Sequence[Sequence[int]], normalize: bool, truncate: bool, cancellation: Cancellation | None = None) -> Annotated[NDArray[numpy.float32], dict(shape=(None, None), order='C')] | list[Annotated[NDArray[numpy.float32], dict(shape=(None, None), order='C')]]:
        """
        Embeddings of each token list as float32 arrays: one (n_inputs, width) array when pooled (width n_embd, or n_cls_out with rank pooling), a (n_tokens, n_embd) array per input otherwise.
        """

    def pooling_type(self) -> int:
        """
        llama.cpp's pooling type of this context (0 none, 1 mean, 2 CLS, 3 last, 4 rank).
        """

    def rerank_inputs(self, query: bytes, documents: Sequence[bytes]) -> list[list[int]]:
        """
        The tokens llama-server scores for ``query`` (UTF-8) paired with each document: the model's rerank template, or BOS query EOS SEP document EOS.
        """

    def set_lora(self, adapter: LoraAdapter, scale: float) -> None:
        """
        Apply ``adapter`` at ``scale`` (or change its scale); empties the KV cache.
        """

    def remove_lora(self, adapter: LoraAdapter) -> bool:
        """
        Stop applying ``adapter``; False if it was not applied. Empties the KV cache.
        """

    def clear_loras(self) -> None: ...

    def loras(self) -> list[tuple[LoraAdapter, float]]:
        """The applied adapters and their scales, as llama.cpp was given them."""

    def perf(self) -> PerfData: ...

    def perf_reset(self) -> None: ...

    def expert_profiler(self) -> ExpertProfiler:
        """
        The expert-routing profiler (None unless created with profile_experts on a MoE model).
        """

    def generate(self, prompt: Sequence[int], sampling: SamplerConfig, options: GenerateOptions) -> GenerationResult:
        """Run the whole token loop in C++."""

    def stream(self, prompt: Sequence[int], sampling: SamplerConfig, options: GenerateOptions) -> TokenStream:
        """
        Like generate, but returns a TokenStream that runs one step per next() and owns the context until it ends.
        """

class GenerationResult:
    """The outcome of Context.generate."""

    @property
    def text(self) -> str: ...

    @property
    def tokens(self) -> list[int]: ...

    @property
    def finish_reason(self) -> str:
        """'stop' or 'length'."""

    @property
    def stop_sequence(self) -> str | None:
        """The stop string that ended it, if one did."""

    @property
    def n_prompt(self) -> int: ...

    @property
    def n_reused(self) -> int:
        """Prompt tokens served from the cache."""

    @property
    def logprobs(self) -> list[TokenLogprob]: ...

    @property
    def prompt_logprobs(self) -> list[TokenLogprob]: ...

class TokenStream:
    """A generation advanced one chunk at a time."""

    def next(self) -> Chunk | None:
        """The next chunk, or None once the generation has ended."""

    def cancel(self) -> None:
        """Stop at the next token (next() then raises GenerationCancelled)."""

    def close(self) -> None:
        """Stop early and give the context back; later next() calls return None."""

    @property
    def finish_reason(self) -> str | None: ...

    @property
    def stop_sequence(self) -> str | None:
        """The stop string that ended it, if one did."""

    @property
    def queue_seconds(self) -> float | None:
        """
        None: a context has no queue (a pool's stream says how long it waited for a slot).
        """

    @property
    def tokens(self) -> list[int]:
        """The tokens generated so far."""

    @property
    def n_prompt(self) -> int: ...

    @property
    def n_reused(self) -> int:
        """Prompt tokens served from the cache."""

    @property
    def prompt_logprobs(self) -> list[TokenLogprob]: ...

    @property
    def cancellation(self) -> Cancellation: ...

class PoolBusyError(LlamaError):
    """Every slot of the pool is busy and its queue is full."""

class EngineOptions:
    """Slots and queue of an Engine."""

    def __init__(self) -> None: ...

    @property
    def n_slots(self) -> int:
        """Concurrent sequences (the pool size)."""

    @n_slots.setter
    def n_slots(self, arg: int, /) -> None: ...

    @property
    def max_queue(self) -> int:
        """Requests that may wait for a slot."""

    @max_queue.setter
    def max_queue(self, arg: int, /) -> None: ...

    @property
    def min_shared_prefix(self) -> int:
        """
        Prompt tokens shared with a running prefill worth waiting for and copying.
        """

    @min_shared_prefix.setter
    def min_shared_prefix(self, arg: int, /) -> None: ...

class EngineStats:
    """Counters of an Engine since it started."""

    @property
    def n_slots(self) -> int: ...

    @property
    def n_busy(self) -> int:
        """Requests holding a slot."""

    @property
    def n_waiting(self) -> int:
        """Requests queued for a slot."""

    @property
    def n_decode_calls(self) -> int: ...

    @property
    def n_prompt_evaluated(self) -> int:
        """Prompt tokens decoded."""

    @property
    def n_prompt_reused(self) -> int:
        """Prompt tokens served from cached prefixes."""

    @property
    def n_generated(self) -> int:
        """Tokens sampled."""

    @property
    def queue_time_buckets(self) -> list[tuple[float, int]]:
        """
        Waits for a slot: (upper bound in seconds, requests admitted within it), cumulative, +inf last.
        """

    @property
    def queue_time_sum(self) -> float:
        """Seconds admitted requests waited, in all."""

    @property
    def n_cached_tokens(self) -> int:
        """
        Tokens the sequences hold in the KV cache now (a prefix shared by several counts in each).
        """

class EngineStream:
    """One request of an Engine, read chunk by chunk."""

    def next(self) -> Chunk | None:
        """
        The next token's text and token (blocks for it; a character split across tokens comes whole); None at the end.
        """

    def cancel(self) -> None:
        """
        End the request and free its slot; next() then raises GenerationCancelled.
        """

    def close(self) -> None:
        """Cancel the request unless it has finished (leaving a stream early)."""

    @property
    def finished(self) -> bool: ...

    @property
    def finish_reason(self) -> str | None: ...

    @property
    def stop_sequence(self) -> str | None:
        """The stop string that ended it, if one did."""

    @property
    def queue_seconds(self) -> float | None:
        """Seconds the request waited for a slot (None while it waits)."""

    @property
    def n_prompt(self) -> int: ...

    @property
    def n_reused(self) -> int:
        """Prompt tokens served from a cached prefix."""

    @property
    def tokens(self) -> list[int]:
        """The tokens read so far."""

    @property
    def prompt_logprobs(self) -> list[TokenLogprob]:
        """
        Logprobs of the prompt's tokens after the first (once it is evaluated), if asked for.
        """

    @property
    def cancellation(self) -> Cancellation: ...

class Engine:
    """
    Continuous batching: n_slots sequences of one context, one scheduler thread.
    """

    def __init__(self, model: Model, context: ContextOptions, options: EngineOptions) -> None: ...

    def submit(self, prompt: Sequence[int], sampling: SamplerConfig, options: GenerateOptions, wait: bool = False, loras: Sequence[tuple[LoraAdapter, float]] = []) -> EngineStream:
        """
        Queue a generation (run with the LoRA adapters ``loras`` at their scales). Raises PoolBusyError when the queue is full (with wait=False).
        """

    def close(self) -> None:
        """
        Stop the scheduler, fail unfinished requests with ClosedError, free the context. Idempotent.
        """

    @property
    def closed(self) -> bool: ...

    @property
    def n_ctx_seq(self) -> int:
        """Tokens each sequence may hold."""

    def stats(self) -> EngineStats: ...

    def memory_breakdown(self) -> dict[str, dict[str, int]]:
        """
        llama.cpp's accounting by device: {name: {'model', 'context', 'compute': bytes}}.
        """

    def expert_profiler(self) -> ExpertProfiler:
        """
        The expert-routing profiler (None unless created with profile_experts on a MoE model).
        """

class FitDevice:
    """One device's memory, as common_fit_params projects it."""

    @property
    def name(self) -> str: ...

    @property
    def free(self) -> int: ...

    @property
    def total(self) -> int: ...

    @property
    def model(self) -> int: ...

    @property
    def context(self) -> int: ...

    @property
    def compute(self) -> int: ...

class FitResult:
    """What common_fit_params chose."""

    @property
    def status(self) -> int:
        """0 success, 1 failure (no placement projected to fit)."""

    @property
    def n_gpu_layers(self) -> int: ...

    @property
    def n_ctx(self) -> int: ...

    @property
    def tensor_split(self) -> list[float]: ...

    @property
    def tensor_overrides(self) -> list[tuple[str, str]]: ...

    @property
    def devices(self) -> list[FitDevice]: ...

    @property
    def n_layer(self) -> int: ...

    @property
    def n_ctx_train(self) -> int: ...

    @property
    def n_expert(self) -> int: ...

def fit_params(path: str, model: ModelOptions, context: ContextOptions, margin: int, n_ctx_min: int) -> FitResult:
    """
    Run llama.cpp's common_fit_params (one at a time in the process), then project the memory of what it chose. Raises ModelLoadError if the file does not load, InvalidArgumentError for bad options.
    """
