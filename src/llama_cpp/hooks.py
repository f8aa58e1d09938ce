"""Per-token Python hooks, llama-cpp-python's ``logits_processor`` and ``stopping_criteria``.

This is the slow path: the token loop otherwise runs entirely in C++, and a hook makes it
take the GIL and call Python once per token. Hooks get NumPy arrays (``numpy`` must be
installed) that view the native buffers: ``input_ids`` (the prompt and the tokens generated
so far) and ``scores`` (the logits of the next token). A logits processor returns the new
scores (or edits them in place); a stopping criterion returns True to end the generation
with ``finish_reason="stop"``, keeping the token that triggered it.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import TYPE_CHECKING, Any, TypeAlias

from llama_cpp import _core

if TYPE_CHECKING:
    import numpy as np
    import numpy.typing as npt

    LogitsProcessor: TypeAlias = Callable[
        [npt.NDArray[np.intc], npt.NDArray[np.single]], npt.NDArray[np.single]
    ]
    StoppingCriteria: TypeAlias = Callable[[npt.NDArray[np.intc], npt.NDArray[np.single]], bool]
else:
    LogitsProcessor = Callable[[Any, Any], Any]
    StoppingCriteria = Callable[[Any, Any], bool]


class LogitsProcessorList(list[LogitsProcessor]):
    """Logits processors applied in order (llama-cpp-python's class of the same name)."""

    def __call__(self, input_ids: Any, scores: Any) -> Any:  # noqa: ANN401 - NumPy arrays
        for processor in self:
            scores = processor(input_ids, scores)
        return scores


class StoppingCriteriaList(list[StoppingCriteria]):
    """Stopping criteria; generation stops when any is met (llama-cpp-python's class)."""

    def __call__(self, input_ids: Any, logits: Any) -> bool:  # noqa: ANN401 - NumPy arrays
        return any(criteria(input_ids, logits) for criteria in self)


def _numpy() -> Any:  # noqa: ANN401 - the numpy module
    try:
        import numpy
    except ImportError as error:  # pragma: no cover - numpy is a test dependency
        raise ImportError("logits_processor and stopping_criteria need numpy: pip install numpy") from error
    return numpy


def install(
    options: _core.GenerateOptions,
    logits_processor: LogitsProcessor | Sequence[LogitsProcessor] | None,
    stopping_criteria: StoppingCriteria | Sequence[StoppingCriteria] | None,
) -> None:
    """Attach the hooks (if any) to the native options of one generation."""
    if logits_processor is None and stopping_criteria is None:
        return
    np = _numpy()
    processor = (
        LogitsProcessorList(logits_processor) if isinstance(logits_processor, Sequence) else logits_processor
    )
    criteria = (
        StoppingCriteriaList(stopping_criteria)
        if isinstance(stopping_criteria, Sequence)
        else stopping_criteria
    )

    def logits_hook(ids: memoryview, scores: memoryview) -> bool:
        logits = np.frombuffer(scores, dtype=np.single)
        assert processor is not None
        result = processor(np.frombuffer(ids, dtype=np.intc), logits)
        if result is not logits:
            logits[:] = result
        return False

    def stop_hook(ids: memoryview, scores: memoryview) -> bool:
        assert criteria is not None
        return bool(criteria(np.frombuffer(ids, dtype=np.intc), np.frombuffer(scores, dtype=np.single)))

    options.set_hooks(
        logits_hook if processor is not None else None, stop_hook if criteria is not None else None
    )
