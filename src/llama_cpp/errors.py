"""The exceptions raised by llama_cpp.

Every error derives from :class:`LlamaError` (a ``RuntimeError``). Errors caused by a bad
argument or input also derive from ``ValueError``, so code written against llama-cpp-python,
which raises ``ValueError`` for these, keeps working.

The classes are created by the native module, so that C++ can raise them directly, except
:class:`ExpertStatsUnavailableError`, :class:`WorkerLostError`, :class:`UnsupportedSchemaError`,
:class:`SchemaValidationError` and :class:`TemplateError`, which only Python raises.
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


class UnsupportedSchemaError(GrammarError):
    """A JSON schema uses a keyword (or a combination) whose constraint the grammar cannot
    enforce: raised before generating, so that no answer can break the schema.
    ``keywords`` lists each one as a JSON pointer (``#/properties/tags/not``)."""

    def __init__(self, message: str, keywords: tuple[str, ...] = ()) -> None:
        super().__init__(message)
        self.keywords = keywords


class SchemaValidationError(LlamaError):
    """A completed structured answer does not validate against its JSON schema (a keyword
    enforced by validation only, such as ``uniqueItems`` on free-form items). ``answer`` is
    the text generated, ``reason`` jsonschema's message."""

    def __init__(self, message: str, answer: str = "", reason: str = "") -> None:
        super().__init__(message)
        self.answer = answer
        self.reason = reason


class TemplateError(InvalidArgumentError):
    """A chat template was refused or failed: it ran past its time or output budget, it
    recurses without end, or it raised while rendering."""


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
    "SchemaValidationError",
    "TemplateError",
    "UnsupportedSchemaError",
    "WorkerLostError",
]
