#!/usr/bin/env python3
"""The long fuzzing run of the model loader: thousands of hostile GGUF files, each loaded in a
worker subprocess (:mod:`llama_cpp.testing.fuzz_gguf`).

Base files: the tiny llama, MoE and reranker models, llama.cpp's ``ggml-vocab-*.gguf`` files
and the default model's metadata (a sparse copy). Mutations: truncations, byte flips and
field sets weighted to the header's counts, lengths, types, dims and offsets, and crafted
metadata (:mod:`llama_cpp.testing.fuzz_crafts`). Every case must end in a clean load (then a
tokenization, and for the tiny models a short generation) or a typed ``LlamaError``; a crash
(signal), a hang or an untyped exception is a finding, printed with its recipe so that it
can join the regression corpus (``tests/data/fuzz_corpus.json``).

Usage: ``python benchmarks/fuzz_loader.py [--cases 5000] [--seed 1] [--minutes 30]
[--no-default-model] [--json FILE]``. Prints the counts by outcome and every finding.
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
from pathlib import Path

from llama_cpp.testing.default_model import ensure_default_model
from llama_cpp.testing.fuzz_gguf import (
    Fuzzer,
    Result,
    case_to_json,
    default_vocab_dir,
    make_bases,
    make_cases,
)

ROOT = Path(__file__).resolve().parent.parent


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--cases", type=int, default=5000)
    parser.add_argument("--seed", type=int, default=1)
    parser.add_argument("--minutes", type=float, default=None, help="stop after this long")
    parser.add_argument("--timeout", type=float, default=60.0, help="seconds one case may take")
    parser.add_argument("--no-default-model", action="store_true")
    parser.add_argument("--json", type=Path, default=None, help="write every finding's recipe here")
    args = parser.parse_args()

    with tempfile.TemporaryDirectory(prefix="fuzz-loader-") as tmp:
        work = Path(tmp)
        default = None if args.no_default_model else ensure_default_model(ROOT / "models")
        bases = make_bases(work / "bases", vocab_dir=default_vocab_dir(), default_model=default)
        cases = make_cases(bases, args.cases, seed=args.seed)

        def progress(i: int, result: Result) -> None:
            if result.outcome not in ("clean", "typed"):
                print(f"[{i}] {result.outcome}: {result.case.label()}: {result.detail}", flush=True)
            elif (i + 1) % 500 == 0:
                print(f"... {i + 1} cases", flush=True)

        with Fuzzer(work, timeout_s=args.timeout) as fuzzer:
            deadline = None if args.minutes is None else args.minutes * 60
            report = fuzzer.run(cases, bases, deadline_s=deadline, progress=progress)

    print(f"bases: {', '.join(b.name for b in bases)}")
    print(report.summary())
    errors: dict[str, int] = {}
    for r in report.results:
        if r.outcome == "typed":
            key = r.detail.split(":")[0]
            errors[key] = errors.get(key, 0) + 1
    print("typed errors by class:", errors)
    if args.json is not None:
        findings = [dict(case_to_json(r.case), outcome=r.outcome, detail=r.detail) for r in report.failures]
        args.json.write_text(json.dumps(findings, indent=1) + "\n")
    return 1 if report.failures else 0


if __name__ == "__main__":
    sys.exit(main())
