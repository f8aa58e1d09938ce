#!/usr/bin/env python3
"""Structured output on the schema corpus (tests/schema_corpus.py), default model, greedy:
(a) llama.cpp's converter alone (``_core.json_schema_to_grammar``, as llama-server does; the
answers validated here, not by the library), (b) ours (``response_format``:
``json_schema.schema_to_grammar`` and every answer validated by the request path).

Prints, for each: schemas, accepted (a grammar was made), answers valid, answers invalid,
truncated (cut at ``--max-tokens``: not judged), refused (with the keywords), and the keywords
of the schemas whose answers were invalid or refused. Usage:
``python benchmarks/bench_schemas.py [--max-tokens 96] [--slots 8] [--json FILE]``.
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import sys
import time
from collections import Counter
from pathlib import Path
from types import ModuleType
from typing import Any

from harness import MODEL, THREADS
from llama_cpp import LlamaPool

ROOT = Path(__file__).resolve().parent.parent


def _corpus() -> ModuleType:
    # The corpus lives with the tests that run it; loaded by path, not by sys.path.
    spec = importlib.util.spec_from_file_location("schema_corpus", ROOT / "tests" / "schema_corpus.py")
    assert spec is not None
    assert spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module  # dataclasses look their module up there
    spec.loader.exec_module(module)
    return module


def _summary(results: list[Any], corpus: ModuleType) -> dict[str, Any]:
    counts = Counter(r.status for r in results)
    keywords: Counter[str] = Counter()
    for r in results:
        if r.status in ("invalid", "refused"):
            keywords.update(corpus.keywords_of(r.case.schema) - {"type", "properties", "required"})
    return {
        "schemas": len(results),
        "accepted": len(results) - counts["refused"],
        "valid": counts["valid"],
        "invalid": counts["invalid"],
        "truncated": counts["truncated"],
        "refused": counts["refused"],
        "invalid_cases": {r.case.name: r.detail for r in results if r.status == "invalid"},
        "refused_cases": {r.case.name: r.detail for r in results if r.status == "refused"},
        "keywords_of_failures": dict(keywords.most_common()),
    }


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--max-tokens", type=int, default=96)
    parser.add_argument("--slots", type=int, default=8)
    parser.add_argument("--json", type=Path, help="write the figures here too")
    args = parser.parse_args()
    corpus = _corpus()
    out: dict[str, Any] = {}
    with LlamaPool(MODEL, pool_size=args.slots, n_ctx=384, n_threads=THREADS) as pool:
        for name, run in (("llama.cpp converter", corpus.run_converter), ("ours", corpus.run_ours)):
            start = time.perf_counter()
            results = run(pool, corpus.CORPUS, args.max_tokens)
            out[name] = {**_summary(results, corpus), "seconds": round(time.perf_counter() - start, 1)}
    header = f"{'':22}{'schemas':>8}{'accepted':>9}{'valid':>7}{'invalid':>8}{'truncated':>10}{'refused':>8}"
    print(header)
    for name, s in out.items():
        print(
            f"{name:22}{s['schemas']:>8}{s['accepted']:>9}{s['valid']:>7}{s['invalid']:>8}"
            f"{s['truncated']:>10}{s['refused']:>8}"
        )
    for name, s in out.items():
        print(f"\n{name}: {s['seconds']} s")
        for case, why in s["invalid_cases"].items():
            print(f"  invalid  {case}: {why[:100]}")
        for case, why in s["refused_cases"].items():
            print(f"  refused  {case}: {why[:100]}")
    if args.json:
        args.json.write_text(json.dumps(out, indent=2) + "\n", encoding="utf-8")


if __name__ == "__main__":
    main()
