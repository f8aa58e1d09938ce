"""Bad model files raise ModelLoadError with a reason, never crash the process."""

from __future__ import annotations

from pathlib import Path

import pytest

from llama_cpp import Llama, LlamaError, ModelLoadError


def test_missing_file(tmp_path: Path) -> None:
    with pytest.raises(ModelLoadError, match=r"model file not found: '.*nope\.gguf'"):
        Llama(tmp_path / "nope.gguf")


def test_directory(tmp_path: Path) -> None:
    with pytest.raises(ModelLoadError, match="not a regular file"):
        Llama(tmp_path)


def test_empty_file(tmp_path: Path) -> None:
    path = tmp_path / "empty.gguf"
    path.write_bytes(b"")
    with pytest.raises(ModelLoadError, match="not a GGUF file"):
        Llama(path)


def test_not_gguf(tmp_path: Path) -> None:
    path = tmp_path / "text.gguf"
    path.write_text("hello, I am not a model\n")
    with pytest.raises(ModelLoadError, match="bad magic"):
        Llama(path)


def test_garbage_after_the_magic(tmp_path: Path) -> None:
    path = tmp_path / "garbage.gguf"
    path.write_bytes(b"GGUF\x03\x00\x00\x00" + bytes(range(256)) * 4)
    with pytest.raises(ModelLoadError, match=r"failed to load model from .*garbage\.gguf"):
        Llama(path)


@pytest.mark.parametrize(("fraction", "reason"), [(0.5, "not within the file bounds"), (0.0005, "failed to")])
def test_truncated_model(tiny_model_path: Path, tmp_path: Path, fraction: float, reason: str) -> None:
    data = tiny_model_path.read_bytes()
    path = tmp_path / "truncated.gguf"
    path.write_bytes(data[: int(len(data) * fraction)])
    with pytest.raises(ModelLoadError, match=reason):
        Llama(path)


def test_truncated_default_model(default_model_path: Path, tmp_path: Path) -> None:
    path = tmp_path / "gemma-truncated.gguf"
    with default_model_path.open("rb") as source:
        path.write_bytes(source.read(default_model_path.stat().st_size // 2))
    with pytest.raises(ModelLoadError, match="data is not within the file bounds"):
        Llama(path)


def test_error_hierarchy() -> None:
    assert issubclass(ModelLoadError, LlamaError)
    assert issubclass(ModelLoadError, ValueError)  # llama-cpp-python raised ValueError
    assert issubclass(LlamaError, RuntimeError)
