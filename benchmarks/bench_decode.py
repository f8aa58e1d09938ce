#!/usr/bin/env python3
"""Decode speed, side by side in one run: native llama.cpp, llama_cpp (ours), llama-cpp-python.

For each model (the default Gemma 3 270M Q4_K_M and a tiny generated model, where the
per-token overhead of a binding dominates), it measures decode tokens/s of:

* ``llama-bench`` (tg test: N single-token decodes from an empty context, no sampling),
  built from the same pinned source;
* ``Llama.create_completion`` and ``Llama.generate_stream`` of this package: greedy, the
  prompt is the BOS token alone, exactly N generated tokens, wall clock of the whole call;
* ``llama_cpp.Llama.create_completion`` of llama-cpp-python 0.3.36, installed from the same
  verified source distribution into its own cached virtual environment, measured the same way.

A one-token prompt makes every engine run exactly N single-token decodes, as llama-bench's tg
test does, so the columns compare like with like. Same threads (default: every CPU this
process may use) and context size (256) everywhere. Each figure is the median over rounds
that alternate the engines, so that a slow spell of the machine hits all of them; compare
the columns of one run, not figures of different runs.

Usage: ``python benchmarks/bench_decode.py [--tokens 128] [--reps 5] [--rounds 3]``
(``make bench``). Prints a Markdown table; ``--json FILE`` also writes the raw figures.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import time
from dataclasses import asdict, dataclass
from pathlib import Path

from llama_cpp import Llama, SamplingParams
from llama_cpp.testing import TinyModelSpec, write_tiny_llama
from llama_cpp.testing.default_model import ensure_default_model
from llama_cpp.testing.reference import reference_python

ROOT = Path(__file__).resolve().parent.parent

# Runs inside llama-cpp-python's venv: the same measurement as measure_ours().
THEIR_SCRIPT = """
import json, statistics, sys, time
from llama_cpp import Llama
model = sys.argv[1]
n, threads, reps = (int(a) for a in sys.argv[2:5])
llm = Llama(model, n_ctx=256, n_threads=threads, n_threads_batch=threads, verbose=False)
prompt = [llm.token_bos()]
llm.create_completion(prompt, max_tokens=8, temperature=0)  # warm-up
rates = []
for _ in range(reps):
    llm.reset()
    start = time.perf_counter()
    out = llm.create_completion(prompt, max_tokens=n, temperature=0)
    elapsed = time.perf_counter() - start
    assert out["usage"]["completion_tokens"] == n, out["usage"]
    rates.append(n / elapsed)
print(json.dumps({"tps": statistics.median(rates), "text": out["choices"][0]["text"]}))
"""


@dataclass(frozen=True)
class Settings:
    tokens: int
    threads: int
    reps: int


@dataclass
class Row:
    model: str
    native_tps: float
    ours_completion_tps: float
    ours_stream_tps: float
    theirs_tps: float | None
    same_text: bool | None


def cache_dir() -> Path:
    root = os.environ.get("LLAMA_CPP_NANOBIND_CACHE", Path.home() / ".cache" / "llama-cpp-nanobind")
    return Path(root).expanduser() / "bench"


def native_tps(model: Path, cfg: Settings) -> float:
    """llama-bench's tg test (n single-token decodes from an empty context)."""
    bench = ROOT / "lib" / "llama-bench"
    out = subprocess.run(
        [
            str(bench),
            "-m",
            str(model),
            "-p",
            "0",
            "-n",
            str(cfg.tokens),
            "-t",
            str(cfg.threads),
            "-r",
            str(cfg.reps),
            "-fa",
            "0",  # flash attention off: llama_cpp's and llama-cpp-python's default
            "-o",
            "json",
        ],
        check=True,
        capture_output=True,
        text=True,
    )
    (result,) = json.loads(out.stdout)
    return float(result["avg_ts"])


def measure_ours(model: Path, cfg: Settings) -> tuple[float, float, str]:
    greedy = SamplingParams.greedy()
    n = cfg.tokens
    with Llama(model, n_ctx=256, n_threads=cfg.threads, n_threads_batch=cfg.threads) as llm:
        prompt = [llm.token_bos()]
        llm.create_completion(prompt, max_tokens=8, temperature=0)  # warm-up
        completion_rates, stream_rates = [], []
        text = ""
        for _ in range(cfg.reps):
            llm.reset()
            start = time.perf_counter()
            out = llm.create_completion(prompt, max_tokens=n, temperature=0)
            elapsed = time.perf_counter() - start
            assert out["usage"]["completion_tokens"] == n, out["usage"]
            completion_rates.append(n / elapsed)
            text = out["choices"][0]["text"]

            llm.reset()
            start = time.perf_counter()
            streamed = "".join(llm.generate_stream(prompt, max_tokens=n, sampling=greedy))
            stream_rates.append(n / (time.perf_counter() - start))
            assert streamed == text
    return statistics.median(completion_rates), statistics.median(stream_rates), text


def measure_theirs(python: Path, model: Path, cfg: Settings) -> tuple[float, str]:
    out = subprocess.run(
        [
            str(python),
            "-c",
            THEIR_SCRIPT,
            str(model),
            str(cfg.tokens),
            str(cfg.threads),
            str(cfg.reps),
        ],
        check=True,
        capture_output=True,
        text=True,
    )
    result = json.loads(out.stdout.strip().splitlines()[-1])
    return float(result["tps"]), str(result["text"])


def markdown(rows: list[Row], cfg: Settings) -> str:
    lines = [
        f"Decode tokens/s, {cfg.tokens} generated tokens, greedy, {cfg.threads} threads, "
        f"median of {cfg.reps} repetitions x rounds alternating the engines.",
        "",
        "| model | native `llama-bench` | ours `create_completion` | ours `generate_stream` "
        "| llama-cpp-python 0.3.36 | ours / native | ours / llama-cpp-python |",
        "| --- | ---: | ---: | ---: | ---: | ---: | ---: |",
    ]
    for r in rows:
        theirs = f"{r.theirs_tps:.1f}" if r.theirs_tps else "n/a"
        vs_theirs = f"{r.ours_completion_tps / r.theirs_tps:.2f}x" if r.theirs_tps else "n/a"
        ours = f"{r.ours_completion_tps:.1f} | {r.ours_stream_tps:.1f}"
        ratio = f"{r.ours_completion_tps / r.native_tps:.3f}"
        lines.append(f"| {r.model} | {r.native_tps:.1f} | {ours} | {theirs} | {ratio} | {vs_theirs} |")
    return "\n".join(lines)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--tokens", type=int, default=128)
    parser.add_argument("--reps", type=int, default=5, help="repetitions per round")
    parser.add_argument("--rounds", type=int, default=3, help="rounds alternating the engines")
    parser.add_argument("--threads", type=int, default=len(os.sched_getaffinity(0)))
    parser.add_argument("--skip-llama-cpp-python", action="store_true")
    parser.add_argument("--json", type=Path, help="also write the raw figures here")
    args = parser.parse_args()

    cfg = Settings(tokens=args.tokens, threads=args.threads, reps=args.reps)
    cache_dir().mkdir(parents=True, exist_ok=True)
    models = {
        "gemma-3-270m-q4_k_m": ensure_default_model(ROOT / "models"),
        # One block, so that a decode costs tens of microseconds and the binding's own
        # per-token work is what differs.
        "tiny (successor table)": write_tiny_llama(
            cache_dir() / "tiny-successor-1-layer.gguf", TinyModelSpec(n_layer=1, n_ff=16)
        ),
    }
    theirs_python = None if args.skip_llama_cpp_python else reference_python()
    rows = []
    for name, model in models.items():
        # Rounds alternate the three engines, so that a slow spell of the machine hits all
        # of them; each figure is the median over the rounds.
        native, completion, stream, theirs = [], [], [], []
        same = None
        for _ in range(args.rounds):
            native.append(native_tps(model, cfg))
            ours = measure_ours(model, cfg)
            completion.append(ours[0])
            stream.append(ours[1])
            if theirs_python is not None:
                their_rate, their_text = measure_theirs(theirs_python, model, cfg)
                theirs.append(their_rate)
                same = their_text == ours[2]
        median = statistics.median
        rows.append(
            Row(
                name,
                median(native),
                median(completion),
                median(stream),
                median(theirs) if theirs else None,
                same,
            )
        )
        print(f"[bench] {name}: {asdict(rows[-1])}", file=sys.stderr)
    print(markdown(rows, cfg))
    if args.json:
        args.json.write_text(json.dumps([asdict(r) for r in rows], indent=2) + "\n")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
