"""llama_cpp: fast, dependable llama.cpp bindings (nanobind), a drop-in for llama-cpp-python.

Quick start::

    from llama_cpp import Llama

    with Llama("models/gemma-3-270m-q4_k_m.gguf") as llm:
        print(llm.generate("The capital of France is", max_tokens=16))
"""

from __future__ import annotations

import json
from functools import cache
from importlib.metadata import PackageNotFoundError, version
from pathlib import Path
from typing import Any

from llama_cpp import _core, _logging
from llama_cpp._core import (
    Cancellation,
    ChatTemplates,
    Chunk,
    Context,
    Device,
    LoraAdapter,
    Model,
    TokenLogprob,
)
from llama_cpp.chat import RenderedChat
from llama_cpp.completion_output import GenerationStream
from llama_cpp.config import ContextParams, LlamaConfig, ModelParams
from llama_cpp.embeddings import RerankResult
from llama_cpp.errors import (
    ClosedError,
    ContextBusyError,
    ContextOverflowError,
    DecodeError,
    ExpertStatsUnavailableError,
    GenerationCancelled,
    GrammarError,
    InvalidArgumentError,
    LlamaError,
    ModelLoadError,
    PoolBusyError,
    SchemaValidationError,
    TemplateError,
    UnsupportedSchemaError,
    WorkerLostError,
)
from llama_cpp.experts import ExpertStats
from llama_cpp.families import FAMILIES, ModelFamily, detect_family
from llama_cpp.grammar import LlamaGrammar
from llama_cpp.hooks import LogitsProcessorList, StoppingCriteriaList
from llama_cpp.isolated import IsolatedPool
from llama_cpp.llama import Llama
from llama_cpp.llama_cpp import llama_model_get_vocab, llama_token_to_piece
from llama_cpp.params import DEFAULT_SEED, SamplingParams
from llama_cpp.placement import DeviceMemory, FitPlan, MemoryBreakdown, plan_fit
from llama_cpp.pool import LlamaPool
from llama_cpp.results import Completion, Perf, PoolStats
from llama_cpp.state import LlamaState
from llama_cpp.tokenizer import LlamaTokenizer
from llama_cpp.unified import UnifiedLLM

__all__ = [
    "DEFAULT_SEED",
    "FAMILIES",
    "Cancellation",
    "ChatTemplates",
    "Chunk",
    "ClosedError",
    "Completion",
    "Context",
    "ContextBusyError",
    "ContextOverflowError",
    "ContextParams",
    "DecodeError",
    "Device",
    "DeviceMemory",
    "ExpertStats",
    "ExpertStatsUnavailableError",
    "FitPlan",
    "GenerationCancelled",
    "GenerationStream",
    "GrammarError",
    "InvalidArgumentError",
    "IsolatedPool",
    "Llama",
    "LlamaConfig",
    "LlamaError",
    "LlamaGrammar",
    "LlamaPool",
    "LlamaState",
    "LlamaTokenizer",
    "LogitsProcessorList",
    "LoraAdapter",
    "MemoryBreakdown",
    "Model",
    "ModelFamily",
    "ModelLoadError",
    "ModelParams",
    "Perf",
    "PoolBusyError",
    "PoolStats",
    "RenderedChat",
    "RerankResult",
    "SamplingParams",
    "SchemaValidationError",
    "StoppingCriteriaList",
    "TemplateError",
    "TokenLogprob",
    "UnifiedLLM",
    "UnsupportedSchemaError",
    "WorkerLostError",
    "__version__",
    "backend_load_errors",
    "build_info",
    "detect_family",
    "devices",
    "lib_dir",
    "llama_model_get_vocab",
    "llama_token_to_piece",
    "plan_fit",
    "set_native_log_level",
    "system_info",
]

try:
    __version__ = version("llama-cpp-nanobind")
except PackageNotFoundError:  # pragma: no cover - running from an uninstalled tree
    __version__ = "0.0.0"

set_native_log_level = _logging.set_native_log_level


def lib_dir() -> Path:
    """The folder holding llama.cpp's shared libraries and ``ggml-rpc-server``."""
    return Path(_core.__file__).resolve().parent / "lib"


@cache
def build_info() -> dict[str, Any]:
    """How the bundled llama.cpp was built: commit, backend, portability, build key."""
    info_file = lib_dir() / "llama-build.json"
    info: dict[str, Any] = json.loads(info_file.read_text()) if info_file.exists() else {}
    info["llama_cpp_commit"] = _core.llama_cpp_commit()
    return info


def system_info() -> str:
    """llama.cpp's system line: the backends and CPU features they were built with."""
    return _core.system_info()


def devices() -> list[Device]:
    """The compute devices llama.cpp can use (the CPU, and GPUs in a GPU build)."""
    return _core.devices()


def backend_load_errors() -> dict[str, str]:
    """The backend modules of :func:`lib_dir` that did not load, with the reason (dlerror()).

    A CUDA wheel on a machine without an NVIDIA driver, or without the ``[cuda]`` extra,
    reports ``libggml-cuda.so`` here and runs on the CPU. Logged at debug level on import.
    """
    return dict(_core.backend_load_errors())


def _init_backends() -> None:
    _core.backend_init(str(lib_dir()))
    for module, reason in _core.backend_load_errors():
        # Python's logger, not llama.cpp's: the native threshold (INFO) would drop a debug line.
        _logging.logger.debug("backend module %s not loaded: %s", module, reason)


_logging.install()
_init_backends()
