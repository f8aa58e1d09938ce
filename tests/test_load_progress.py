"""The load progress callback (LlamaConfig.progress_callback) and the CLI's progress bar."""

from __future__ import annotations

import io
from pathlib import Path

import pytest

from llama_cpp import InvalidArgumentError, Llama, LlamaConfig, LlamaPool, ModelLoadError
from llama_cpp.commands.progress import load_progress, plain_bar


def test_called_with_increasing_fractions_ending_at_one(tiny_model_path: Path) -> None:
    seen: list[float] = []
    with Llama(tiny_model_path, n_ctx=64, progress_callback=seen.append, verbose=False) as llm:
        assert llm.generate("A", max_tokens=2, sampling=None) != ""
    assert len(seen) >= 2
    assert seen == sorted(seen)
    assert seen[0] >= 0.0
    assert seen[-1] == 1.0


def test_returning_false_cancels_the_load(tiny_model_path: Path) -> None:
    calls: list[float] = []

    def cancel(fraction: float) -> bool:
        calls.append(fraction)
        return False

    with pytest.raises(ModelLoadError) as caught:
        Llama(tiny_model_path, progress_callback=cancel, verbose=False)
    assert (
        str(caught.value)
        == f"loading '{tiny_model_path}' was cancelled: the progress callback returned False"
    )
    assert len(calls) == 1


def test_an_exception_cancels_the_load_and_is_the_cause(tiny_model_path: Path) -> None:
    def broken(fraction: float) -> None:
        raise ValueError("disk on fire")

    with pytest.raises(ModelLoadError) as caught:
        LlamaPool(tiny_model_path, pool_size=1, progress_callback=broken, verbose=False)
    assert str(caught.value) == (
        f"loading '{tiny_model_path}' was cancelled: the progress callback raised ValueError: disk on fire"
    )
    assert isinstance(caught.value.__cause__, ValueError)


def test_an_interrupt_in_the_callback_propagates(tiny_model_path: Path) -> None:
    def interrupt(fraction: float) -> None:
        raise KeyboardInterrupt

    with pytest.raises(KeyboardInterrupt):
        Llama(tiny_model_path, progress_callback=interrupt, verbose=False)


def test_the_model_still_loads_after_a_cancelled_load(tiny_model_path: Path) -> None:
    with pytest.raises(ModelLoadError):
        Llama(tiny_model_path, progress_callback=lambda _: False, verbose=False)
    with Llama(tiny_model_path, n_ctx=64, verbose=False) as llm:
        assert llm.n_vocab() == 261


def test_config_checks_and_ignores_it_in_comparisons() -> None:
    with pytest.raises(InvalidArgumentError, match="progress_callback must be a callable or None, got 3"):
        LlamaConfig(progress_callback=3)  # type: ignore[arg-type]
    assert LlamaConfig(progress_callback=print) == LlamaConfig()


class FakeTerminal(io.StringIO):
    def isatty(self) -> bool:
        return True


def test_no_bar_when_the_stream_is_not_a_terminal() -> None:
    with load_progress("m.gguf", io.StringIO()) as progress:
        assert progress is None


def test_plain_bar_writes_each_percentage_once_and_erases_itself() -> None:
    out = FakeTerminal()
    with plain_bar("loading m.gguf", out) as update:
        for fraction in (0.0, 0.001, 0.5, 1.0):
            update(fraction)
    assert out.getvalue() == "\rloading m.gguf:   0%\rloading m.gguf:  50%\rloading m.gguf: 100%\r\x1b[K"


def test_a_bar_is_drawn_on_a_terminal(tiny_model_path: Path) -> None:
    out = FakeTerminal()
    with load_progress(str(tiny_model_path), out) as progress:
        assert progress is not None
        Llama(tiny_model_path, n_ctx=64, progress_callback=progress, verbose=False).close()
    assert "loading tiny.gguf" in out.getvalue()
