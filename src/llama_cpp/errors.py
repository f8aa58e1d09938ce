"""The exceptions raised by llama_cpp.

Every error derives from :class:`LlamaError` (a ``RuntimeError``). Errors caused by a bad
argument or input also derive from ``ValueError``, so code written against llama-cpp-python,
which raises ``ValueError`` for these, keeps working.

The classes are created by the native module, so that C++ can raise them directly, except
:class:`ExpertStatsUnavailableError` and :class:`WorkerLostError`, which only Python raises.
"""

from llama_cpp._core import (
    ClosedError,
    ContextBusyError,
    ContextOverflowError,
    DecodeError,
    GenerationCancelled,
    GrammarError,
    InvalidArgumentError,
    LlamaError,
    ModelLoadError,
    PoolBusyError,
)


class ExpertStatsUnavailableError(LlamaError):
    """There are no expert-routing statistics to return: the model was created without
    ``profile_experts=True``, it has no experts, or a cache simulation needs the trace."""


class WorkerLostError(LlamaError):
    """The process running the model died (an :class:`~llama_cpp.IsolatedPool`'s child,
    typically aborted by llama.cpp when an RPC worker went away): the requests it ran are
    lost. The pool reloads the model once its workers answer; a later request may succeed."""


__all__ = [
    "ClosedError",
    "ContextBusyError",
    "ContextOverflowError",
    "DecodeError",
    "ExpertStatsUnavailableError",
    "GenerationCancelled",
    "GrammarError",
    "InvalidArgumentError",
    "LlamaError",
    "ModelLoadError",
    "PoolBusyError",
    "WorkerLostError",
]
