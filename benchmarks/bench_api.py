#!/usr/bin/env python3
"""The high-level API, measured: the llama-cpp-python drop-in script under both libraries, and
the speedup of automatic prefix reuse.

* ``tests/dropin/llama_cpp_python_script.py`` (completion, stop, stream, seeded sampling,
  logprobs, grammar, tokenize, state save/load, embeddings on the default model) is run
  unchanged with llama-cpp-python 0.3.36 and with this package, alternating; the script
  times itself from its first model load to its last result.
* Prefix reuse: a completion whose prompt extends a long prompt already in the KV cache,
  against the same completion from an empty cache.

Usage: ``python benchmarks/bench_api.py [--runs 3]``. Prints Markdown tables.
"""

from __future__ import annotations

import argparse
import json
import statistics
import subprocess
import sys
import time
from pathlib import Path

from llama_cpp import Llama, SamplingParams
from llama_cpp.testing.default_model import ensure_default_model
from llama_cpp.testing.reference import reference_python

ROOT = Path(__file__).resolve().parent.parent
SCRIPT = ROOT / "tests" / "dropin" / "llama_cpp_python_script.py"


def script_seconds(python: Path | str, model: Path) -> float:
    out = subprocess.run([str(python), str(SCRIPT), str(model)], capture_output=True, text=True, check=True)
    return float(json.loads(out.stdout.strip().splitlines()[-1])["seconds"])


def prefix_reuse(model: Path, runs: int) -> tuple[int, float, float]:
    """(prompt tokens, seconds from an empty cache, seconds with the prefix cached)."""
    shared = " ".join(f"Record {i}: the value of item {i} is {i * 37 % 101}." for i in range(110))
    greedy = SamplingParams.greedy()
    cold, warm = [], []
    with Llama(model, n_ctx=4096, n_batch=512, n_threads=2) as llm:
        n_prompt = len(llm.tokenize(shared + " Question A"))
        for i in range(runs):
            llm.reset()
            start = time.perf_counter()
            llm.complete(f"{shared} Question {i}", max_tokens=8, sampling=greedy)
            cold.append(time.perf_counter() - start)
            start = time.perf_counter()
            result = llm.complete(f"{shared} Question {i + 100}", max_tokens=8, sampling=greedy)
            warm.append(time.perf_counter() - start)
            assert result.cached_tokens > n_prompt - 10
    return n_prompt, statistics.median(cold), statistics.median(warm)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--runs", type=int, default=3)
    args = parser.parse_args()
    model = ensure_default_model(ROOT / "models")
    theirs_python = reference_python()

    ours, theirs = [], []
    for _ in range(args.runs):
        theirs.append(script_seconds(theirs_python, model))
        ours.append(script_seconds(sys.executable, model))
    ours_s, theirs_s = statistics.median(ours), statistics.median(theirs)
    print(f"Drop-in script on gemma-3-270m-q4_k_m, median of {args.runs} runs (2 threads):\n")
    print("| llama-cpp-python 0.3.36 | llama_cpp (ours) | speedup |")
    print("| ---: | ---: | ---: |")
    print(f"| {theirs_s:.2f} s | {ours_s:.2f} s | {theirs_s / ours_s:.2f}x |\n")

    n_prompt, cold, warm = prefix_reuse(model, args.runs)
    print(f"Prefix reuse: an {n_prompt}-token prompt, 8 new tokens, median of {args.runs} runs:\n")
    print("| empty cache | prefix cached | speedup |")
    print("| ---: | ---: | ---: |")
    print(f"| {cold * 1000:.0f} ms | {warm * 1000:.0f} ms | {cold / warm:.1f}x |")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
