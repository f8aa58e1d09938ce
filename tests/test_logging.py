"""llama.cpp's log reaches Python logging under the 'llama_cpp' logger."""

from __future__ import annotations

import logging
from pathlib import Path

import pytest

from llama_cpp import Llama, ModelLoadError, set_native_log_level


def test_load_messages_reach_logging(tiny_model_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    with caplog.at_level(logging.INFO, logger="llama_cpp"):
        Llama(tiny_model_path, n_ctx=256).close()
    lines = [r.getMessage() for r in caplog.records if r.name == "llama_cpp"]
    assert any("tiny-successor-llama" in line for line in lines)
    assert all("\n" not in line for line in lines)  # whole lines, reassembled in C++


def test_errors_are_logged_at_error_level(tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    path = tmp_path / "bad.gguf"
    path.write_bytes(b"GGUF\x03\x00\x00\x00" + b"\xff" * 64)
    with caplog.at_level(logging.INFO, logger="llama_cpp"), pytest.raises(ModelLoadError):
        Llama(path)
    assert any(r.levelno == logging.ERROR and r.name == "llama_cpp" for r in caplog.records)


def test_native_threshold_drops_lines_in_cpp(tiny_model_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    set_native_log_level(logging.ERROR)
    try:
        with caplog.at_level(logging.DEBUG, logger="llama_cpp"):
            Llama(tiny_model_path, n_ctx=256).close()
        assert not [r for r in caplog.records if r.name == "llama_cpp" and r.levelno < logging.ERROR]
    finally:
        set_native_log_level(logging.INFO)
