"""The llama-cpp command line (run as a real subprocess)."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path


def run_cli(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "llama_cpp", *args], capture_output=True, text=True, timeout=120, check=False
    )


def test_generate_streams_the_completion(tiny_model_path: Path) -> None:
    result = run_cli("generate", "-m", str(tiny_model_path), "--temperature", "0", "-n", "50", "A")
    assert result.returncode == 0, result.stderr
    assert result.stdout == "Aé😀世界\n"


def test_generate_with_stop_and_max_tokens(tiny_model_path: Path) -> None:
    result = run_cli(
        "generate", "-m", str(tiny_model_path), "--temperature", "0", "-n", "5", "--stop", "e", "a"
    )
    assert result.returncode == 0, result.stderr
    assert result.stdout == "abcd\n"


def test_info_shows_build_and_model(tiny_model_path: Path) -> None:
    result = run_cli("info", "-m", str(tiny_model_path))
    assert result.returncode == 0, result.stderr
    assert "llama.cpp commit:  0c1e570" in result.stdout
    assert "general.architecture = llama" in result.stdout
    assert "vocabulary:        261" in result.stdout
    assert "device:            CPU (cpu)" in result.stdout


def test_errors_are_reported_without_a_traceback(tmp_path: Path) -> None:
    result = run_cli("generate", "-m", str(tmp_path / "missing.gguf"), "hi")
    assert result.returncode == 1
    assert "llama-cpp: error: model file not found" in result.stderr
    assert "Traceback" not in result.stderr


def test_console_script_is_installed() -> None:
    script = Path(sys.executable).parent / "llama-cpp"
    result = subprocess.run([str(script), "--help"], capture_output=True, text=True, timeout=60, check=False)
    assert result.returncode == 0
    assert "generate" in result.stdout
