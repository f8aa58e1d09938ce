"""The llama-cpp command line (run as a real subprocess)."""

from __future__ import annotations

import json
import re
import subprocess
import sys
from pathlib import Path

import pytest

from llama_cpp import Llama, SamplingParams
from llama_cpp.testing import write_tiny_moe

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


@pytest.mark.parametrize("command", ["generate", "chat", "tokenize", "bench", "info", "profile-experts"])
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


def test_profile_experts_reports_writes_json_and_a_heatmap(tmp_path: Path) -> None:
    model = write_tiny_moe(tmp_path / "moe.gguf")
    prompts = ["ABCD", "EFG HI", "xyz"]
    (tmp_path / "prompts.txt").write_text("\n".join([prompts[0], "", *prompts[1:]]) + "\n")
    out, png = tmp_path / "stats.json", tmp_path / "heat.png"
    args = (
        "--prompts",
        str(tmp_path / "prompts.txt"),
        "-n",
        "4",
        "--temperature",
        "0",
        "--cache-capacity",
        "3",
    )
    result = run_cli("profile-experts", str(model), *args, "--json", str(out), "--heatmap", str(png))
    assert result.returncode == 0, result.stderr

    # What the command decoded: each prompt whole (from an empty cache), then what it
    # generated, as the KV cache holds it; the last layer routes only the output rows.
    decoded = outputs = 0
    with Llama(model, n_ctx=128, verbose=False) as llm:
        for prompt in prompts:
            llm.reset()
            llm.complete(prompt, max_tokens=4, sampling=SamplingParams(temperature=0))
            n_cached, n_prompt = len(llm.context.tokens()), len(llm.tokenize(prompt.encode()))
            decoded += n_cached
            outputs += n_cached - n_prompt + 1
    stats = json.loads(out.read_text())
    assert stats["prompts"] == 3
    assert stats["layers"] == [0, 1, 2, 3]
    assert stats["tokens"] == [decoded] * 3 + [outputs]
    assert [sum(row) for row in stats["counts"]] == [2 * n for n in stats["tokens"]]
    assert set(stats["cache"]) == {"capacity", "lru", "lfu", "static-hot"}
    assert stats["cache"]["capacity"] == 3
    assert 0 < stats["cache"]["lru"]["hit_rate"] <= stats["cache"]["static-hot"]["hit_rate"] <= 1
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"

    lines = result.stdout.splitlines()
    assert lines[0] == "moe.gguf: 8 experts, top-2, 4 MoE layers; 3 prompts"
    assert re.fullmatch(rf"\s+0\s+{decoded}\s+\d\.\d\d/3\.00 b(\s+\d\s+\d+\.\d%){{4}}", lines[2]), lines[2]
    assert re.fullmatch(
        r"cache hit rates, 3 experts per layer: lru \S+%  lfu \S+%  static-hot \S+%", lines[-1]
    )


def test_profile_experts_errors(tmp_path: Path, tiny_model_path: Path) -> None:
    model = write_tiny_moe(tmp_path / "moe.gguf")
    prompts = tmp_path / "prompts.txt"
    prompts.write_text("A\n")
    dense = run_cli("profile-experts", str(tiny_model_path), "--prompts", str(prompts))
    assert dense.returncode == 1
    assert "llama-cpp: error: the model has no experts to profile" in dense.stderr
    (tmp_path / "empty.txt").write_text("\n\n")
    empty = run_cli("profile-experts", str(model), "--prompts", str(tmp_path / "empty.txt"))
    assert (empty.returncode, empty.stderr.strip()) == (
        2,
        f"llama-cpp: error: {tmp_path / 'empty.txt'} has no prompts (one a line)",
    )
    # Without matplotlib: a clear error before the model is loaded.
    argv = ["profile-experts", str(model), "--prompts", str(prompts), "--heatmap", "x.png"]
    hide = "import sys; sys.modules['matplotlib'] = None"  # import matplotlib then raises ImportError
    code = f"{hide}; from llama_cpp.cli import main; sys.exit(main({argv!r}))"
    no_plot = subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, timeout=120, check=False
    )
    assert no_plot.returncode == 2
    assert no_plot.stderr.strip() == (
        "llama-cpp: error: --heatmap needs matplotlib: pip install 'llama-cpp-nanobind[plot]'"
    )
