"""The llama-cpp command line (run as a real subprocess)."""

from __future__ import annotations

import re
import subprocess
import sys
from pathlib import Path

import pytest

# Renders only the contents after BOS: the tiny model then continues the last character.
CONCAT = "{{ bos_token }}{% for m in messages %}{{ m['content'] }}{% endfor %}"


def run_cli(*args: str, stdin: str | None = None) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "llama_cpp", *args],
        input=stdin,
        capture_output=True,
        text=True,
        timeout=120,
        check=False,
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


@pytest.mark.parametrize("command", ["generate", "chat", "tokenize", "bench", "info"])
def test_each_command_has_a_description_and_examples(command: str) -> None:
    result = run_cli(command, "--help")
    assert result.returncode == 0, result.stderr
    usage, description, *_ = result.stdout.split("\n\n")
    assert usage.startswith(f"usage: llama-cpp {command} ")
    assert len(description) > 60
    assert f"examples:\n  llama-cpp {command}" in result.stdout


def test_tokenize_shows_ids_and_pieces(tiny_model_path: Path) -> None:
    result = run_cli("tokenize", "-m", str(tiny_model_path), "Abc é")
    assert result.returncode == 0, result.stderr
    assert result.stdout == (
        "     1 -> '<s>'\n"
        "    68 -> 'A'\n"
        "   101 -> 'b'\n"
        "   102 -> 'c'\n"
        "   259 -> ' '\n"
        "   198 -> b'\\xc3'\n"  # é is two byte tokens
        "   172 -> b'\\xa9'\n"
    )


def test_tokenize_ids_only_without_bos(tiny_model_path: Path) -> None:
    result = run_cli("tokenize", "-m", str(tiny_model_path), "--ids-only", "--no-bos", "Abc é")
    assert result.returncode == 0, result.stderr
    assert result.stdout == "[68, 101, 102, 259, 198, 172]\n"


def test_tokenize_parses_special_tokens_when_asked(tiny_model_path: Path) -> None:
    special = run_cli("tokenize", "-m", str(tiny_model_path), "--ids-only", "--no-bos", "--special", "<s>A")
    plain = run_cli("tokenize", "-m", str(tiny_model_path), "--ids-only", "--no-bos", "<s>A")
    assert (special.stdout, plain.stdout) == ("[1, 68]\n", "[63, 118, 65, 68]\n")


def test_chat_keeps_the_history_and_resets_it(tiny_model_path: Path) -> None:
    # Turn 2 renders "xy" + "zab" + "cd", so it continues from "d" like a fresh "cd" does.
    lines = "xy\ncd\n/reset\ncd\n\n/exit\nnever read\n"
    args = ("chat", "-m", str(tiny_model_path), "--temperature", "0", "-n", "3", "--chat-template", CONCAT)
    result = run_cli(*args, stdin=lines)
    assert result.returncode == 0, result.stderr
    assert result.stdout == "zab\nefg\nefg\n"
    assert result.stderr.count("(conversation cleared)") == 1


def test_chat_on_the_default_model_repeats_itself_after_reset(default_model_path: Path) -> None:
    question = "What is the capital of France?\n"
    args = ("chat", "-m", str(default_model_path), "--temperature", "0", "-n", "8", "-c", "512", "-t", "2")
    result = run_cli(*args, "--system", "Answer briefly.", stdin=question + "/reset\n" + question)
    assert result.returncode == 0, result.stderr
    half = len(result.stdout) // 2
    assert result.stdout[:half] == result.stdout[half:]
    assert result.stdout.endswith("\n")
    assert len(result.stdout) > 2


def test_chat_reports_a_conversation_that_no_longer_fits(tiny_model_path: Path) -> None:
    args = (
        "chat",
        "-m",
        str(tiny_model_path),
        "-c",
        "8",
        "--temperature",
        "0",
        "-n",
        "2",
        "--chat-template",
        CONCAT,
    )
    result = run_cli(*args, stdin="ab" * 200 + "\n/reset\nxy\n")
    assert result.returncode == 0, result.stderr
    assert "/reset to start over" in result.stderr
    assert result.stdout == "za\n"


def test_bench_prints_a_table_of_positive_rates(tiny_model_path: Path) -> None:
    args = ("-p", "8", "-n", "4", "-r", "2", "--parallel", "1", "2")
    result = run_cli("bench", "-m", str(tiny_model_path), *args)
    assert result.returncode == 0, result.stderr
    lines = result.stdout.splitlines()
    assert lines[0] == "| model | size | params | backend | threads | test | t/s (median ± sd, 2 runs) |"
    rows = [[cell.strip() for cell in line.strip("|").split("|")] for line in lines[2:]]
    assert [row[5] for row in rows] == ["pp8", "tg4", "tg4 x1", "tg4 x2"]
    for row in rows:
        assert row[:5] == ["llama ?B all F32", "3.04 MiB", "0.80 M", "CPU", row[4]]
        match = re.fullmatch(r"(\d+\.\d\d) ± (\d+\.\d\d)", row[6])
        assert match is not None, row
        assert float(match[1]) > 0
