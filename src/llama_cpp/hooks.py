"""Per-token Python hooks, llama-cpp-python's ``logits_processor`` and ``stopping_criteria``.

This is the slow path: the token loop otherwise runs entirely in C++, and a hook makes it
take the GIL and call Python once per token (in :class:`LlamaPool`, on the scheduler thread,
so a slow hook slows every request of the pool). Hooks get NumPy arrays that are copies owned
by the hook, valid for as long as it keeps them: ``input_ids`` (int32: the prompt and the
tokens generated so far) and ``scores`` (float32: the logits of the next token). A logits
processor returns the new scores (or edits ``scores`` in place and returns it); they are
copied back before sampling. A stopping criterion returns True to end the generation with
``finish_reason="stop"``, keeping the token that triggered it.

A hook may read from its model (``llm.n_ctx()``, ``llm.n_tokens``, ``llm.tokenize(...)``) and
may close it (the generation then raises :class:`ClosedError`); starting another generation on
the same model from inside a hook raises :class:`ContextBusyError`.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import TypeAlias

import numpy as np
import numpy.typing as npt

from llama_cpp import _core

LogitsProcessor: TypeAlias = Callable[[npt.NDArray[np.intc], npt.NDArray[np.single]], npt.NDArray[np.single]]
StoppingCriteria: TypeAlias = Callable[[npt.NDArray[np.intc], npt.NDArray[np.single]], bool]


class LogitsProcessorList(list[LogitsProcessor]):
    """Logits processors applied in order (llama-cpp-python's class of the same name)."""

    def __call__(
        self, input_ids: npt.NDArray[np.intc], scores: npt.NDArray[np.single]
    ) -> npt.NDArray[np.single]:
        for processor in self:
            scores = processor(input_ids, scores)
        return scores


class StoppingCriteriaList(list[StoppingCriteria]):
    """Stopping criteria; generation stops when any is met (llama-cpp-python's class)."""

    def __call__(self, input_ids: npt.NDArray[np.intc], logits: npt.NDArray[np.single]) -> bool:
        return any(criteria(input_ids, logits) for criteria in self)


def install(
    options: _core.GenerateOptions,
    logits_processor: LogitsProcessor | Sequence[LogitsProcessor] | None,
    stopping_criteria: StoppingCriteria | Sequence[StoppingCriteria] | None,
) -> None:
    """Attach the hooks (if any) to the native options of one generation."""
    if logits_processor is None and stopping_criteria is None:
        return
    processor = (
        LogitsProcessorList(logits_processor) if isinstance(logits_processor, Sequence) else logits_processor
    )
    criteria = (
        StoppingCriteriaList(stopping_criteria)
        if isinstance(stopping_criteria, Sequence)
        else stopping_criteria
    )

    def logits_hook(
        input_ids: npt.NDArray[np.intc], scores: npt.NDArray[np.single]
    ) -> npt.NDArray[np.single]:
        assert processor is not None
        result = processor(input_ids, scores)
        return np.ascontiguousarray(scores if result is None else result, dtype=np.single)

    def stop_hook(input_ids: npt.NDArray[np.intc], scores: npt.NDArray[np.single]) -> bool:
        assert criteria is not None
        return bool(criteria(input_ids, scores))

    options.set_hooks(
        logits_hook if processor is not None else None, stop_hook if criteria is not None else None
    )
