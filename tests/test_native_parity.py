"""Greedy output on the default model equals native llama.cpp from the same build.

Each comparison starts from an empty KV cache, as the native programs do: a prompt whose
prefix is served from the cache is decoded in a different batch shape, and llama.cpp's CPU
kernels are not bit-identical across batch shapes (see README, "Prefix reuse").
"""

from __future__ import annotations

import subprocess
from pathlib import Path

import pytest

from llama_cpp import Llama, SamplingParams

GREEDY = SamplingParams.greedy()
PROMPTS = [
    "The capital of France is",
    "Write a short poem about the sea.\n",
    "def fibonacci(n):",
    "日本の首都は",
]


@pytest.mark.slow
@pytest.mark.parametrize("prompt", PROMPTS)
def test_greedy_tokens_equal_a_native_libllama_program(
    gemma: Llama, native_greedy: Path, default_model_path: Path, prompt: str
) -> None:
    native = subprocess.run(
        [str(native_greedy), str(default_model_path), prompt, "48", "2048", "2"],
        check=True,
        capture_output=True,
        text=True,
    )
    expected = [int(line) for line in native.stdout.split()]
    assert len(expected) > 0
    gemma.reset()
    completion = gemma.complete(prompt, max_tokens=48, sampling=GREEDY)
    assert completion.tokens == expected


@pytest.mark.slow
def test_greedy_text_equals_llama_completion(gemma: Llama, default_model_path: Path) -> None:
    prompt = "The three primary colors are"
    binary = Path(__file__).resolve().parent.parent / "lib" / "llama-completion"
    result = subprocess.run(
        [
            str(binary),
            "-m",
            str(default_model_path),
            "-p",
            prompt,
            "-n",
            "64",
            "--temp",
            "0",
            "-no-cnv",
            "--no-display-prompt",
            "--simple-io",
            "--no-warmup",
            "-c",
            "2048",
            "-t",
            "2",
            "-fa",
            "off",  # llama_cpp's default (as llama-cpp-python's)
        ],
        check=True,
        capture_output=True,
        text=True,
    )
    # llama-completion ends its output with " [end of text]\n" at EOS and always with "\n\n".
    native = result.stdout.removesuffix("\n\n").removesuffix(" [end of text]\n")
    assert native
    gemma.reset()
    assert gemma.generate(prompt, max_tokens=64, sampling=GREEDY) == native


@pytest.mark.slow
def test_long_prompt_in_small_batches_gives_the_same_tokens(default_model_path: Path, gemma: Llama) -> None:
    prompt = " ".join(f"Item {i} is number {i * 7}." for i in range(120)) + " The next item is"
    gemma.reset()
    reference = gemma.complete(prompt, max_tokens=16, sampling=GREEDY)
    assert reference.prompt_tokens > 1000
    with Llama(default_model_path, n_ctx=2048, n_batch=128, n_threads=2) as small_batches:
        chunked = small_batches.complete(prompt, max_tokens=16, sampling=GREEDY)
    assert chunked.prompt_tokens == reference.prompt_tokens
    assert chunked.tokens == reference.tokens


@pytest.mark.slow
def test_streamed_text_equals_the_full_text_on_cjk(gemma: Llama) -> None:
    # Characters split across tokens are covered exactly by the tiny model (test_generation).
    prompt = "猫は"
    gemma.reset()
    full = gemma.generate(prompt, max_tokens=40, sampling=GREEDY)
    gemma.reset()
    pieces = list(gemma.generate_stream(prompt, max_tokens=40, sampling=GREEDY))
    assert "".join(pieces) == full
    assert "\ufffd" not in full
    assert any(ord(ch) > 0x2E80 for ch in full)  # the answer really is CJK
