#!/usr/bin/env python3
"""Overhead of the expert-routing profiler: tokens/s with ``profile_experts`` off and on.

The models are random Mixture-of-Experts GGUFs written on the spot with the ``gguf`` package
(:func:`llama_cpp.testing.write_tiny_moe` with larger :class:`TinyMoeSpec` values), since the
suite's tiny MoE is too small to measure anything:

* ``small``: 12 layers, hidden 264, 32 experts, top-4, expert width 256, F32 (311 MiB),
  about 1.5 ms a token here: its per-layer compute is so small that the profiler's fixed
  cost (it cuts each graph after every layer's router and counts there: one more compute
  call and thread synchronisation per MoE layer) is a large share; an upper bound;
* ``mid``: 16 layers, hidden 1024, 32 experts, top-4, expert width 1024, F16 experts (3.3
  GB), the per-layer shapes of a small real MoE (OLMoE-1B-7B's hidden 2048 and 64 experts
  are twice as large), about 15 ms a token here. Writing it holds about 10 GB of memory for a
  minute.

Measured per configuration (off, on, on with a 100 000-token trace), on one ``Llama``:

* decode: greedy generation of N tokens from a one-token prompt (end of generation banned,
  so exactly N single-token decodes), wall clock of the whole call;
* prefill: evaluating a 512-token prompt from an empty cache.

Each figure is the median over rounds that alternate the configurations, so that a slow
spell of the machine hits all of them. The machine is shared: compare columns of one run.

Usage: ``python benchmarks/bench_experts.py [--model small mid] [--tokens 128] [--rounds 5]
[--threads 2]``.
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

SPECS = {
    "small": TinyMoeSpec(
        n_layer=12,
        n_expert=32,
        n_expert_used=4,
        n_ff=256,
        expert_scale=0.05,
        name="bench-moe",
        context_length=2048,
    ),
    "mid": TinyMoeSpec(
        n_layer=16,
        n_embd_min=1024,
        n_expert=32,
        n_expert_used=4,
        n_ff=1024,
        expert_scale=0.02,
        expert_dtype="float16",
        name="bench-moe-mid",
        context_length=2048,
    ),
}
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


def run(name: str, spec: TinyMoeSpec, args: argparse.Namespace, folder: Path) -> dict[str, Any]:
    """Measure the three configurations on the model of ``spec``; print its table."""
    path = write_tiny_moe(folder / f"bench-moe-{name}.gguf", spec)
    size_mb = path.stat().st_size / 2**20
    llms = {
        config: Llama(
            path, n_ctx=1024, n_batch=PROMPT_TOKENS, n_threads=args.threads, verbose=False, **options
        )
        for config, options in CONFIGS.items()
    }
    results: dict[str, dict[str, list[float]]] = {config: {"decode": [], "prefill": []} for config in CONFIGS}
    try:
        for llm in llms.values():
            measure(llm, 8)  # warm-up
        for _ in range(args.rounds):
            for config, llm in llms.items():
                decode, prefill = measure(llm, args.tokens)
                results[config]["decode"].append(decode)
                results[config]["prefill"].append(prefill)
        profiled = llms["on"].expert_stats()
    finally:
        for llm in llms.values():
            llm.close()
        path.unlink()

    base = {kind: statistics.median(results["off"][kind]) for kind in ("decode", "prefill")}
    print(
        f"{name}: random MoE, {spec.n_layer} layers, hidden {spec.n_embd}, {spec.n_expert} experts, "
        f"top-{spec.n_expert_used}, n_ff {spec.n_ff}, {size_mb:.0f} MiB ({spec.expert_dtype} experts); "
        f"{args.threads} threads, median of {args.rounds} rounds"
    )
    print(f"(the 'on' model routed {int(profiled.tokens[0])} tokens per layer over all rounds)")
    print()
    print(f"| profiler | decode t/s (tg{args.tokens}) | vs off | prefill t/s (pp{PROMPT_TOKENS}) | vs off |")
    print("| --- | ---: | ---: | ---: | ---: |")
    for config in CONFIGS:
        decode = statistics.median(results[config]["decode"])
        prefill = statistics.median(results[config]["prefill"])
        print(
            f"| {config} | {decode:.1f} | {decode / base['decode'] - 1:+.1%} "
            f"| {prefill:.1f} | {prefill / base['prefill'] - 1:+.1%} |"
        )
    print()
    return {"spec": repr(spec), "results": results}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--model", nargs="+", choices=list(SPECS), default=list(SPECS))
    parser.add_argument("--tokens", type=int, default=128)
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--json", type=Path)
    args = parser.parse_args()

    with tempfile.TemporaryDirectory() as folder:
        report = {name: run(name, SPECS[name], args, Path(folder)) for name in args.model}
    if args.json:
        args.json.write_text(json.dumps(report, indent=1) + "\n")


if __name__ == "__main__":
    main()
