#!/usr/bin/env python3
"""Overhead of the expert-routing profiler: tokens/s with ``profile_experts`` off and on.

The model is a random Mixture-of-Experts GGUF written on the spot with the ``gguf`` package
(:func:`llama_cpp.testing.write_tiny_moe` with a larger :class:`TinyMoeSpec`: 12 layers, 32
experts, top-4, expert width 256, random experts), since the suite's tiny MoE is too small
to measure anything. It is still a small model (about 220 MB of F32 experts): its per-layer
compute is small, so the cost of the profiler, which cuts each graph after every layer's
router and counts there, is a larger share than on a real MoE model. Treat the figures as an
upper bound.

Measured per configuration (off, on, on with a 100 000-token trace), on one ``Llama``:

* decode: greedy generation of N tokens from a one-token prompt (end of generation banned,
  so exactly N single-token decodes), wall clock of the whole call;
* prefill: evaluating a 512-token prompt from an empty cache.

Each figure is the median over rounds that alternate the configurations, so that a slow
spell of the machine hits all of them. The machine is shared: compare columns of one run.

Usage: ``python benchmarks/bench_experts.py [--tokens 128] [--rounds 5] [--threads 2]``.
Prints a Markdown table; ``--json FILE`` also writes the raw figures.
"""

from __future__ import annotations

import argparse
import json
import statistics
import tempfile
import time
from pathlib import Path
from typing import Any

from llama_cpp import Llama, SamplingParams
from llama_cpp.testing import EOS_ID, EOT_ID, TinyMoeSpec, write_tiny_moe

SPEC = TinyMoeSpec(
    n_layer=12,
    n_expert=32,
    n_expert_used=4,
    n_ff=256,
    expert_scale=0.05,
    name="bench-moe",
    context_length=2048,
)
CONFIGS: dict[str, dict[str, Any]] = {
    "off": {},
    "on": {"profile_experts": True},
    "on + trace": {"profile_experts": True, "profile_experts_trace": 100_000},
}
PROMPT_TOKENS = 512


def measure(llm: Llama, tokens: int) -> tuple[float, float]:
    """(decode tokens/s, prefill tokens/s) of one round."""
    greedy = SamplingParams(temperature=0, logit_bias={EOS_ID: float("-inf"), EOT_ID: float("-inf")})
    llm.reset()
    start = time.perf_counter()
    completion = llm.complete([1], max_tokens=tokens, sampling=greedy)
    decode = len(completion.tokens) / (time.perf_counter() - start)
    assert len(completion.tokens) == tokens, completion.finish_reason
    prompt = [1] + [3 + (i * 7) % 250 for i in range(PROMPT_TOKENS - 1)]
    llm.reset()
    start = time.perf_counter()
    llm.eval(prompt)
    prefill = len(prompt) / (time.perf_counter() - start)
    return decode, prefill


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--tokens", type=int, default=128)
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--json", type=Path)
    args = parser.parse_args()

    with tempfile.TemporaryDirectory() as folder:
        path = write_tiny_moe(Path(folder) / "bench-moe.gguf", SPEC)
        size_mb = path.stat().st_size / 2**20
        llms = {
            name: Llama(
                path, n_ctx=1024, n_batch=PROMPT_TOKENS, n_threads=args.threads, verbose=False, **options
            )
            for name, options in CONFIGS.items()
        }
        results: dict[str, dict[str, list[float]]] = {name: {"decode": [], "prefill": []} for name in CONFIGS}
        try:
            for llm in llms.values():
                measure(llm, 8)  # warm-up
            for _ in range(args.rounds):
                for name, llm in llms.items():
                    decode, prefill = measure(llm, args.tokens)
                    results[name]["decode"].append(decode)
                    results[name]["prefill"].append(prefill)
            profiled = llms["on"].expert_stats()
        finally:
            for llm in llms.values():
                llm.close()

    base = {kind: statistics.median(results["off"][kind]) for kind in ("decode", "prefill")}
    print(
        f"random MoE: {SPEC.n_layer} layers, {SPEC.n_expert} experts, top-{SPEC.n_expert_used}, "
        f"n_ff {SPEC.n_ff}, {size_mb:.0f} MiB F32; {args.threads} threads, median of {args.rounds} rounds"
    )
    print(f"(the 'on' model routed {int(profiled.tokens[0])} tokens per layer over all rounds)")
    print()
    print(f"| profiler | decode t/s (tg{args.tokens}) | vs off | prefill t/s (pp{PROMPT_TOKENS}) | vs off |")
    print("| --- | ---: | ---: | ---: | ---: |")
    for name in CONFIGS:
        decode = statistics.median(results[name]["decode"])
        prefill = statistics.median(results[name]["prefill"])
        print(
            f"| {name} | {decode:.1f} | {decode / base['decode'] - 1:+.1%} "
            f"| {prefill:.1f} | {prefill / base['prefill'] - 1:+.1%} |"
        )
    if args.json:
        args.json.write_text(json.dumps({"spec": repr(SPEC), "results": results}, indent=1) + "\n")


if __name__ == "__main__":
    main()
