"""``llama-cpp profile-experts``: which experts a MoE model routes a set of prompts to."""

from __future__ import annotations

import argparse
import json
import math
import os
import sys
from pathlib import Path
from typing import Any

from llama_cpp import ExpertStats, Llama
from llama_cpp.commands.common import (
    Subcommands,
    add_command,
    add_sampling_arguments,
    load_progress,
    sampling_params,
)

PLOT_HINT = "pip install 'llama-cpp-nanobind[plot]'"


def register(sub: Subcommands) -> None:
    """Add the command's parser to ``sub``."""
    parser = add_command(
        sub,
        "profile-experts",
        summary="profile a Mixture-of-Experts model's expert routing over prompts",
        description="""
            Run each prompt of FILE (one a line; blank lines skipped) through MODEL from an
            empty cache, generate up to N tokens, and report per MoE layer: the tokens routed,
            the most used experts and their share of the layer's routings, the routing entropy,
            and the hit rates of simulated per-layer expert caches (LRU, LFU, static-hot) of K
            experts. Counts every routed token, prompt and generated.""",
        examples="""
            llama-cpp profile-experts model.gguf --prompts prompts.txt
            llama-cpp profile-experts model.gguf --prompts p.txt -n 64 --json stats.json --heatmap heat.png
            llama-cpp profile-experts model.gguf --prompts p.txt --cache-capacity 16 --temperature 0
        """,
    )
    parser.add_argument("model", help="path to a GGUF file of a MoE model")
    parser.add_argument("--prompts", required=True, metavar="FILE", help="prompts, one a line")
    parser.add_argument("--json", metavar="OUT", help="write the statistics as JSON to OUT")
    parser.add_argument("--heatmap", metavar="PNG", help=f"save a layer x expert heatmap (needs {PLOT_HINT})")
    parser.add_argument(
        "--cache-capacity",
        type=int,
        default=None,
        metavar="K",
        help="experts per simulated cache (default: top-k)",
    )
    parser.add_argument(
        "--top", type=int, default=4, metavar="N", help="hot experts listed per layer (default 4)"
    )
    parser.add_argument(
        "--trace",
        type=int,
        default=50_000,
        metavar="N",
        help="tokens of routing kept for LRU/LFU (default 50000)",
    )
    parser.add_argument(
        "-c", "--n-ctx", type=int, default=2048, metavar="N", help="context window (default 2048)"
    )
    parser.add_argument(
        "-t", "--threads", type=int, default=None, metavar="N", help="CPU threads (default: all)"
    )
    parser.add_argument(
        "-ngl",
        "--n-gpu-layers",
        type=int,
        default=0,
        metavar="N",
        help="layers to offload to the GPU (-1: all)",
    )
    add_sampling_arguments(parser, max_tokens=32)
    parser.set_defaults(run=run)


def run(args: argparse.Namespace) -> int:
    prompts = _read_prompts(args.prompts)
    if prompts is None:
        return 2
    if args.heatmap and not _has_matplotlib():
        print(f"llama-cpp: error: --heatmap needs matplotlib: {PLOT_HINT}", file=sys.stderr)
        return 2
    options = {
        "n_ctx": args.n_ctx,
        "n_threads": args.threads,
        "n_gpu_layers": args.n_gpu_layers,
        "profile_experts": True,
        "profile_experts_trace": args.trace,
    }
    with load_progress(args.model) as progress:
        llm = Llama(args.model, progress_callback=progress, **options)
    with llm:
        stats = llm.expert_stats()  # raises for a dense model before any work
        for prompt in prompts:
            llm.reset()  # each prompt evaluated whole, not from a cached prefix
            llm.complete(prompt, max_tokens=args.max_tokens, sampling=sampling_params(args))
        stats = llm.expert_stats()
    capacity = args.cache_capacity or stats.n_expert_used
    summary = stats.to_dict(hot=args.top, cache_capacity=capacity)
    _print_report(stats, summary["cache"], os.path.basename(args.model), len(prompts), args.top)
    if args.json:
        document = {"model": args.model, "prompts": len(prompts), "max_tokens": args.max_tokens, **summary}
        Path(args.json).write_text(json.dumps(document, indent=1) + "\n", encoding="utf-8")
    if args.heatmap:
        save_heatmap(stats, args.heatmap, title=os.path.basename(args.model))
    return 0


def _read_prompts(path: str) -> list[str] | None:
    try:
        lines = Path(path).read_text(encoding="utf-8").splitlines()
    except (OSError, UnicodeDecodeError) as error:
        print(f"llama-cpp: error: cannot read the prompts: {error}", file=sys.stderr)
        return None
    prompts = [line for line in lines if line.strip()]
    if not prompts:
        print(f"llama-cpp: error: {path} has no prompts (one a line)", file=sys.stderr)
        return None
    return prompts


def _print_report(stats: ExpertStats, cache: dict[str, Any], name: str, n_prompts: int, top: int) -> None:
    print(
        f"{name}: {stats.n_expert} experts, top-{stats.n_expert_used}, {len(stats.layers)} MoE layers; "
        f"{n_prompts} prompts"
    )
    max_entropy = math.log2(stats.n_expert)
    print(f"{'layer':>5} {'tokens':>8} {'entropy':>13}  hot experts (share of the layer's routings)")
    shares, entropy, hot = stats.shares(), stats.entropy(), stats.hot(top)
    for row, layer in enumerate(stats.layers):
        experts = "  ".join(f"{e:>3} {shares[row, e]:6.1%}" for e in hot[row])
        print(f"{layer:>5} {stats.tokens[row]:>8} {entropy[row]:5.2f}/{max_entropy:.2f} b  {experts}")
    policies = [policy for policy in ("lru", "lfu", "static-hot") if policy in cache]
    rates = "  ".join(f"{policy} {cache[policy]['hit_rate']:.1%}" for policy in policies)
    print(f"cache hit rates, {cache['capacity']} experts per layer: {rates}")


def _has_matplotlib() -> bool:
    try:
        import matplotlib  # noqa: F401
    except ImportError:
        return False
    return True


def save_heatmap(stats: ExpertStats, path: str | os.PathLike[str], *, title: str = "") -> None:
    """Save each expert's share of its layer's routings as a layer x expert heatmap (PNG).

    Raises:
        ImportError: matplotlib is not installed (the ``plot`` extra).
    """
    try:
        from matplotlib.figure import Figure
    except ImportError as error:
        raise ImportError(f"the heatmap needs matplotlib: {PLOT_HINT}") from error
    # A Figure of its own, not pyplot's global state (no display needed).
    figure = Figure(figsize=(max(4.0, 0.25 * stats.n_expert + 2), max(3.0, 0.3 * len(stats.layers) + 1.5)))
    axes = figure.add_subplot()
    image = axes.imshow(stats.shares(), aspect="auto", cmap="viridis", interpolation="nearest")
    axes.set_xlabel("expert")
    axes.set_ylabel("layer")
    axes.set_yticks(range(len(stats.layers)), [str(layer) for layer in stats.layers])
    axes.set_title(f"{title} expert routing share".strip())
    figure.colorbar(image, ax=axes, label="share of the layer's routings")
    figure.tight_layout()
    figure.savefig(os.fspath(path), format="png", dpi=120)
