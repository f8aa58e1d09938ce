"""`Llama`: a GGUF model and one context, with llama-cpp-python's high-level API.

The class is composed of layers, each in its own module: the core (model, context, tokens,
state, LoRA, the native ``generate`` API) in :mod:`llama_cpp.llama_base`, and on top of it
``create_completion`` (:mod:`llama_cpp._completion`), ``create_chat_completion``
(:mod:`llama_cpp.chat`) and embeddings (:mod:`llama_cpp.embeddings`).
"""

from __future__ import annotations

from llama_cpp.chat import ChatMixin
from llama_cpp.embeddings import EmbeddingMixin
from llama_cpp.llama_base import Completion, Perf

__all__ = ["Completion", "Llama", "Perf"]


class Llama(ChatMixin, EmbeddingMixin):
    """A GGUF model with one context: tokenization, completion and streaming.

    The keyword arguments are llama-cpp-python's, with the same meaning. llama.cpp's log goes
    to the ``llama_cpp`` logger. One instance may be shared between threads: calls on it are
    serialized by a lock in C++. Use it as a context manager, or call :meth:`close`, to free
    its memory deterministically.

    Args:
        model_path: Path to a GGUF file.
        config: All of the options below as one :class:`LlamaConfig`; keywords passed
            besides it (with other than their default values) win over it.
        n_gpu_layers: Layers to offload to the GPU (-1: all).
        split_mode: How to split over several GPUs (0 none, 1 layer, 2 row).
        main_gpu: GPU for the whole model when ``split_mode`` is 0.
        tensor_split: Proportion of the model per GPU.
        vocab_only: Load only the vocabulary (tokenize/detokenize; no generation).
        use_mmap: Map the file instead of reading it.
        use_mlock: Lock the weights in RAM.
        kv_overrides: GGUF metadata to override at load (bool, int, float or str values).
        rpc_servers: ``ggml-rpc-server`` endpoints ("host:port", a list or llama-cpp-python's
            comma-separated string) whose devices take offloaded layers (see ``n_gpu_layers``).
        seed: Default sampling seed (``DEFAULT_SEED`` or -1: random each generation).
        n_ctx: Context window in tokens (0: the model's training context).
        n_batch: Largest number of tokens decoded in one llama_decode call.
        n_ubatch: Physical batch size (defaults to ``n_batch``).
        n_threads: Threads for generation (default: the CPUs this process may use).
        n_threads_batch: Threads for prompt processing (default: same as ``n_threads``).
        flash_attn: Use flash attention (None: let llama.cpp decide). Off by default, as in
            llama-cpp-python; see the README for why it stays off on the CPU.
        offload_kqv: Keep the KV cache on the GPU when layers are offloaded.
        embedding: Create the context for :meth:`embed` / :meth:`create_embedding`.
        pooling_type: -1 the model's, 0 none (a vector per token), 1 mean, 2 CLS, 3 last, 4 rank.
        rope_freq_base, rope_freq_scale, rope_scaling_type, yarn_*: RoPE overrides.
        type_k, type_v: KV cache data types (ggml type ids).
        lora_path: A LoRA adapter to apply from the start (see :meth:`load_lora`).
        lora_scale: Its scale.
        chat_format: A built-in chat format by name ("llama-2", "chatml") instead of the
            model's template.
        chat_template: A Jinja chat template of your own (wins over both).
        stream_timeout: A stream owns the context from its first step until it ends or is
            closed; other threads' calls wait for it. One left unread this many seconds while
            another call waits loses the context (its next step raises ContextBusyError).
        verbose: False keeps llama.cpp quiet while this model and context are created (errors
            still reach ``logging``); llama.cpp's log otherwise goes to the ``llama_cpp`` logger.

    Raises:
        ModelLoadError: The file is missing, unreadable or not a loadable GGUF model.
        InvalidArgumentError: An argument is out of range.
    """
