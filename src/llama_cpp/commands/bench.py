"""``llama-cpp bench``: prompt and decode speed, and concurrent throughput, as a Markdown table."""

from __future__ import annotations

import argparse
import random
import statistics
import sys
import time
from collections.abc import Callable, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from functools import partial
from typing import Any

from llama_cpp import Llama, LlamaPool, SamplingParams
from llama_cpp.commands.common import (
    Subcommands,
    add_command,
    add_placement_arguments,
    load_progress,
    placement_options,
)


def register(sub: Subcommands) -> None:
    """Add the command's parser to ``sub``."""
    parser = add_command(
        sub,
        "bench",
        summary="measure prompt and decode speed, and concurrent throughput",
        description="""
            A llama-bench-style table, measured through this library: ppP is the prompt
            speed (llama.cpp's timings after evaluating a P-token prompt), tgN the decode
            speed of N greedy tokens (end of generation banned, so that all N are made),
            and "tgN xK" the generated tokens per second of K simultaneous requests of N
            tokens each on a LlamaPool of max(--parallel) sequences (wall-clock time, from
            submitting them to the last token). Each figure is the median of -r runs (after
            one warm-up run), with the standard deviation.""",
        examples="""
            llama-cpp bench -m model.gguf
            llama-cpp bench -m model.gguf -p 256 -n 64 -r 5 --parallel 1 2 4 8 16
        """,
    )
    parser.add_argument("-m", "--model", required=True, help="path to a GGUF file")
    parser.add_argument(
        "-p", "--n-prompt", type=int, default=512, help="prompt tokens (default 512; 0: skip)"
    )
    parser.add_argument(
        "-n", "--n-gen", type=int, default=128, help="generated tokens (default 128; 0: skip)"
    )
    parser.add_argument("-r", "--repetitions", type=int, default=3, help="runs of each test (default 3)")
    parser.add_argument(
        "--parallel",
        type=int,
        nargs="*",
        default=[1, 4, 8],
        metavar="K",
        help="concurrent requests, one row each (default: 1 4 8; none: skip)",
    )
    parser.add_argument("-b", "--n-batch", type=int, default=512, help="llama.cpp batch size (default 512)")
    parser.add_argument("-t", "--threads", type=int, default=None, help="CPU threads (default: all usable)")
    parser.add_argument("-ngl", "--n-gpu-layers", type=int, default=0, help="layers to offload to the GPU")
    add_placement_arguments(parser)
    parser.set_defaults(run=run)


@dataclass(frozen=True)
class Row:
    """One test: its name and the tokens per second of each run."""

    test: str
    rates: list[float]

    def cell(self) -> str:
        spread = statistics.stdev(self.rates) if len(self.rates) > 1 else 0.0
        return f"{statistics.median(self.rates):.2f} ± {spread:.2f}"


def run(args: argparse.Namespace) -> int:
    for name in ("n_prompt", "n_gen"):
        if getattr(args, name) < 0:
            raise SystemExit(f"llama-cpp bench: error: --{name.replace('_', '-')} must be >= 0")
    if args.repetitions < 1 or any(k < 1 for k in args.parallel):
        raise SystemExit("llama-cpp bench: error: -r and --parallel values must be >= 1")
    n_ctx = max(args.n_prompt, 1) + args.n_gen + 8
    options: dict[str, Any] = {
        "n_ctx": n_ctx,
        "n_batch": args.n_batch,
        "n_threads": args.threads,
        "n_gpu_layers": args.n_gpu_layers,
        "verbose": args.verbose,
        **placement_options(args),
    }
    rows: list[Row] = []
    with load_progress(args.model) as progress:
        llm = Llama(args.model, progress_callback=progress, **options)
    with llm:
        header = _model_cells(llm, args)
        sampling = _greedy(llm)
        start = [llm.token_bos()]
        if args.n_prompt:
            prompt = _random_prompt(llm, args.n_prompt)
            name = f"pp{args.n_prompt}"
            rows.append(Row(name, _repeat(args, name, partial(_prompt_rate, llm, prompt))))
        if args.n_gen:
            name = f"tg{args.n_gen}"
            rows.append(
                Row(name, _repeat(args, name, partial(_decode_rate, llm, start, args.n_gen, sampling)))
            )
    if args.n_gen and args.parallel:
        # One pool of the most sequences asked for; each row uses k of them.
        options["n_ctx"] = args.n_gen + len(start) + 8
        with load_progress(args.model) as progress:
            pool = LlamaPool(args.model, pool_size=max(args.parallel), progress_callback=progress, **options)
        with pool:
            for k in args.parallel:
                name = f"tg{args.n_gen} x{k}"
                measure = partial(_concurrent_rate, pool, k, start, args.n_gen, sampling)
                rows.append(Row(name, _repeat(args, name, measure)))
    print(_table(header, rows, args.repetitions))
    return 0


def _model_cells(llm: Llama, args: argparse.Namespace) -> list[str]:
    model = llm.model
    threads = llm.context_params.n_threads
    return [
        model.description(),
        f"{model.size / 2**20:.2f} MiB",
        f"{model.n_params / 1e6:.2f} M",
        "CPU" if args.n_gpu_layers == 0 else f"ngl {args.n_gpu_layers}",
        str(threads),
    ]


def _table(header: list[str], rows: Sequence[Row], repetitions: int) -> str:
    names = [
        "model",
        "size",
        "params",
        "backend",
        "threads",
        "test",
        f"t/s (median ± sd, {repetitions} runs)",
    ]
    align = ["---", "---:", "---:", "---", "---:", "---:", "---:"]
    lines = ["| " + " | ".join(names) + " |", "| " + " | ".join(align) + " |"]
    lines += ["| " + " | ".join([*header, row.test, row.cell()]) + " |" for row in rows]
    return "\n".join(lines)


def _repeat(args: argparse.Namespace, name: str, measure: Callable[[], float]) -> list[float]:
    measure()  # a warm-up run, not counted (graph allocation, threads starting), as llama-bench
    rates = []
    for i in range(args.repetitions):
        if sys.stderr.isatty():
            print(f"\r{name}: run {i + 1}/{args.repetitions}", end="", file=sys.stderr, flush=True)
        rates.append(measure())
    if sys.stderr.isatty():
        print("\r\x1b[K", end="", file=sys.stderr, flush=True)
    return rates


def _greedy(llm: Llama) -> SamplingParams:
    """Greedy decoding that never ends the generation early (every end-of-generation token banned)."""
    model = llm.model
    banned = {token: float("-inf") for token in range(model.n_vocab) if model.is_eog(token)}
    return SamplingParams(temperature=0.0, logit_bias=banned)


def _random_prompt(llm: Llama, n: int) -> list[int]:
    """BOS and n - 1 token ids drawn at random (seeded), as llama-bench does."""
    draw = random.Random(1234)
    return [llm.token_bos(), *(draw.randrange(llm.n_vocab()) for _ in range(n - 1))][:n]


def _prompt_rate(llm: Llama, prompt: list[int]) -> float:
    llm.reset()
    llm.perf(reset=True)
    llm.eval(prompt)
    return llm.perf().prompt_tokens_per_second


def _decode_rate(llm: Llama, prompt: list[int], n: int, sampling: SamplingParams) -> float:
    llm.reset()
    llm.perf(reset=True)
    llm.complete(prompt, max_tokens=n, sampling=sampling)
    perf = llm.perf()
    return perf.eval_tokens / perf.eval_ms * 1000.0


def _concurrent_rate(pool: LlamaPool, k: int, prompt: list[int], n: int, sampling: SamplingParams) -> float:
    start = time.perf_counter()
    with ThreadPoolExecutor(k) as workers:
        done = list(workers.map(lambda _: pool.complete(prompt, max_tokens=n, sampling=sampling), range(k)))
    elapsed = time.perf_counter() - start
    return sum(len(c.tokens) for c in done) / elapsed
