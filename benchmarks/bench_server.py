#!/usr/bin/env python3
"""HTTP load benchmark with the metrics of vLLM's ``vllm bench serve``: native ``llama-server``
(built from the pinned source) against ``python -m llama_cpp.server``, in one run.

For each concurrency level C, each server is started fresh with C slots (``llama-server -np C
-c C*ctx --cont-batching``; ours ``--parallel C --ctx-size ctx``), both with the same model and
thread count, on a port of 127.0.0.1 the OS hands out; once GET /health answers 200 and one
unmeasured warm-up request is done, ``--requests`` streamed requests go out through at most C
async clients at once (httpx, SSE). The servers take turns: their order alternates from one
level to the next, so that a slow spell of the machine does not always hit the same one.

Every request is the same on both servers: the same endpoint (``/v1/completions`` by default:
the default model has no chat template, and llama-server falls back to ChatML where
llama-cpp-python, and so this package, fall back to its "llama-2" format, so that chat
prompts would differ in tokens; the run checks that both servers report the same prompt
tokens for every request and warns otherwise), fixed prompts (``--prompt-tokens`` tokens of
seeded random words, each starting with its own number, so no two share a cached prefix),
greedy sampling, ``seed``, ``max_tokens=--tokens``, ``stream_options.include_usage``, and
end-of-generation tokens banned (``logit_bias`` -100 on every EOG token of the model, plus
``ignore_eos``), so that each one generates exactly ``--tokens`` tokens. A request counts as
completed only with status 200 and ``usage.completion_tokens`` (the token-carrying chunks
where no usage comes) equal to ``--tokens``; anything else is a failed request.

Metrics, as ``vllm bench serve`` defines them (vllm/benchmarks/serve.py, calculate_metrics):

* request throughput: completed requests / duration (the first request sent to the last
  answer received); output tokens/s: their output tokens / duration;
* TTFT: from sending a request to its first token-carrying chunk (a chunk with text; the
  role-only chunk some servers send first is not a token and does not count, where vLLM's
  chat client would count it);
* ITL: the gaps between consecutive token-carrying chunks of a request, pooled over all;
* TPOT: per request, (end-to-end latency - TTFT) / (output tokens - 1);
* p50 / p95 / p99 and mean in milliseconds (numpy.percentile, linear, as vLLM);
* RSS of the server process and its children (VmRSS) after the warm-up and after the load,
  and its peak (VmHWM).

Usage::

    python benchmarks/bench_server.py [--requests 32] [--concurrency 1 4 8 16] [--tokens 64]
        [--prompt-tokens 128] [--servers llama-server ours] [--threads 2] [--ctx-size 512]
        [--endpoint completions|chat] [--seed 0] [--model GGUF] [--json FILE]
        [--ours-cmd TEMPLATE] [--url URL [--pid PID]]

``--ours-cmd`` is a command template with ``{python} {model} {port} {parallel} {ctx_size}
{ctx_total} {threads}`` (``{ctx_size}`` per slot, as LlamaPool's ``n_ctx``; ``{ctx_total}``
= parallel x ctx_size, as llama-server's ``-c``); by default ``python -m llama_cpp.server``,
skipped with a message when this checkout cannot import it. ``--url`` measures an already
running OpenAI-compatible server instead (its slots are its own; ``--pid`` for its RSS).
The exit status is 1 when any request failed.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import importlib.util
import json
import os
import random
import shlex
import sys
import time
from collections.abc import Iterator
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import httpx
import numpy as np

from harness import (
    MODEL,
    ROOT,
    THREADS,
    llama_server_args,
    native_bin_dir,
    peak_rss_mb,
    start_server,
    tree_rss_mb,
)

PERCENTILES = (50, 95, 99)
OURS_CMD = (
    "{python} -m llama_cpp.server --model {model} --host 127.0.0.1 --port {port} "
    "--parallel {parallel} --ctx-size {ctx_size} --threads {threads}"
)
WORDS = (
    "river",
    "stone",
    "lantern",
    "harbor",
    "meadow",
    "copper",
    "violin",
    "winter",
    "orchard",
    "signal",
    "compass",
    "thunder",
    "garden",
    "mirror",
    "canyon",
    "feather",
    "ember",
    "glacier",
    "market",
    "pepper",
    "saddle",
    "timber",
    "velvet",
    "willow",
    "anchor",
    "basket",
    "candle",
    "desert",
    "falcon",
    "galaxy",
    "hammer",
    "island",
    "jungle",
    "kettle",
    "ladder",
    "marble",
)


# -- the workload -----------------------------------------------------------------------------


@dataclass(frozen=True)
class Workload:
    """What every server is sent: the prompts, and the body fields shared by all requests."""

    endpoint: str  # "chat" or "completions"
    prompts: list[str]
    warmup_prompt: str
    tokens: int
    body: dict[str, Any]  # sampling, seed, EOG ban, usage: the same for every request

    def payload(self, model: str, prompt: str, tokens: int) -> dict[str, Any]:
        key = "messages" if self.endpoint == "chat" else "prompt"
        text: Any = [{"role": "user", "content": prompt}] if self.endpoint == "chat" else prompt
        return {"model": model, key: text, "max_tokens": tokens, **self.body}

    @property
    def path(self) -> str:
        return "/v1/chat/completions" if self.endpoint == "chat" else "/v1/completions"


def make_workload(
    model: Path, *, endpoint: str, n: int, prompt_tokens: int, tokens: int, seed: int
) -> Workload:
    """Seeded prompts of ``prompt_tokens`` tokens each (before any chat template), and the body.

    The model's vocabulary (loaded alone) measures the prompts and lists its end-of-generation
    tokens, which every request bans so that none stops before ``tokens``.
    """
    from llama_cpp import Llama

    rng = random.Random(seed)
    with Llama(str(model), vocab_only=True, verbose=False) as vocab:

        def prompt(label: str) -> str:
            head = f"{label}: continue this list of words, one per line, and never stop: "
            words = " ".join(rng.choice(WORDS) for _ in range(2 * prompt_tokens))
            ids = vocab.tokenize(head + words, add_bos=False)[:prompt_tokens]
            return vocab.detokenize(ids).decode("utf-8", errors="ignore")

        prompts = [prompt(f"Request {i}") for i in range(n)]
        warmup = prompt("Warm-up")
        eog = [t for t in range(vocab.n_vocab()) if vocab.model.is_eog(t)]
    body = {
        "temperature": 0.0,
        "seed": seed,
        "stream": True,
        "stream_options": {"include_usage": True},
        "logit_bias": {str(t): -100 for t in eog},
        "ignore_eos": True,  # llama-server's and vLLM's own switch; others ignore unknown fields
    }
    return Workload(endpoint, prompts, warmup, tokens, body)


# -- one streamed request -----------------------------------------------------------------------


@dataclass
class RequestResult:
    """One request as the client saw it; times in seconds (``time.perf_counter``)."""

    ok: bool = False
    error: str = ""
    ttft: float = 0.0
    latency: float = 0.0  # end to end: sent -> end of the stream
    itl: list[float] = field(default_factory=list)
    chunks: int = 0  # token-carrying chunks
    output_tokens: int = 0  # usage.completion_tokens, else the chunks
    prompt_tokens: int = 0
    text: str = ""


def token_text(event: dict[str, Any]) -> str | None:
    """The text of a token-carrying chunk, None for any other event (role-only, usage, final)."""
    choices = event.get("choices")
    if not choices:
        return None
    choice = choices[0]
    delta = choice.get("delta")
    if isinstance(delta, dict):
        piece = delta.get("content")
        if piece is None:
            piece = delta.get("reasoning_content")
    else:
        piece = choice.get("text")
    if piece is None or (piece == "" and choice.get("finish_reason") is not None):
        return None
    return str(piece)


async def send(client: httpx.AsyncClient, url: str, payload: dict[str, Any], tokens: int) -> RequestResult:
    """Send one streamed request and time its chunks; never raises (errors are in the result)."""
    result, pieces, usage = RequestResult(), [], None
    start = last = time.perf_counter()
    try:
        async with client.stream("POST", url, json=payload) as response:
            if response.status_code != 200:
                body = (await response.aread()).decode(errors="replace")
                result.error = f"HTTP {response.status_code}: {body[:300]}"
                return result
            async for line in response.aiter_lines():
                if not line.startswith("data:"):
                    continue  # blank separators, SSE comments, event: lines
                data = line.removeprefix("data:").strip()
                if data == "[DONE]":
                    break
                now = time.perf_counter()
                event = json.loads(data)
                if "error" in event:
                    result.error = f"error event: {json.dumps(event['error'])[:300]}"
                    return result
                usage = event.get("usage") or usage
                piece = token_text(event)
                if piece is None:
                    continue
                if result.chunks == 0:
                    result.ttft = now - start
                else:
                    result.itl.append(now - last)
                last = now
                result.chunks += 1
                pieces.append(piece)
        result.latency = time.perf_counter() - start
    except (httpx.HTTPError, json.JSONDecodeError) as error:
        result.error = f"{type(error).__name__}: {error}"
        return result
    result.text = "".join(pieces)
    result.output_tokens = int(usage["completion_tokens"]) if usage else result.chunks
    result.prompt_tokens = int(usage["prompt_tokens"]) if usage else 0
    if result.chunks == 0:
        result.error = "no token-carrying chunk"
    elif result.output_tokens != tokens:
        result.error = f"generated {result.output_tokens} tokens, not {tokens}"
    result.ok = not result.error
    return result


# -- one measurement: a server at one concurrency level ---------------------------------------


def model_id(base: str) -> str:
    """The first model the server lists (GET /v1/models), as vLLM's client picks it."""
    with httpx.Client(trust_env=False, timeout=30) as client:
        models = client.get(f"{base}/v1/models").raise_for_status().json()
    return str(models["data"][0]["id"])


async def measure(base: str, work: Workload, concurrency: int, pid: int | None) -> dict[str, Any]:
    """One warm-up request, then all of ``work``'s requests, at most ``concurrency`` at once."""
    model, url = model_id(base), base + work.path
    limits = httpx.Limits(max_connections=concurrency, max_keepalive_connections=concurrency)
    timeout = httpx.Timeout(600.0, connect=30.0)
    async with httpx.AsyncClient(limits=limits, timeout=timeout, trust_env=False) as client:
        warm = await send(client, url, work.payload(model, work.warmup_prompt, 4), 4)
        if not warm.ok:
            raise RuntimeError(f"the warm-up request failed ({warm.error}): check the server and options")
        rss_before = tree_rss_mb(pid) if pid else float("nan")
        gate = asyncio.Semaphore(concurrency)

        async def limited(prompt: str) -> RequestResult:
            async with gate:
                return await send(client, url, work.payload(model, prompt, work.tokens), work.tokens)

        load_before = os.getloadavg()[0]
        start = time.perf_counter()
        results = await asyncio.gather(*(limited(p) for p in work.prompts))
        duration = time.perf_counter() - start
    return {
        "metrics": summarize(results, duration),
        "rss_mb": {
            "before": rss_before,
            "after": tree_rss_mb(pid) if pid else float("nan"),
            "peak": peak_rss_mb(pid) if pid else float("nan"),
        },
        "loadavg_1min_before": load_before,
        "requests": [asdict(r) for r in results],
    }


def stats_ms(values: list[float]) -> dict[str, float]:
    if not values:
        return {"mean": float("nan"), **{f"p{p}": float("nan") for p in PERCENTILES}}
    ms = np.asarray(values) * 1000
    return {"mean": float(ms.mean()), **{f"p{p}": float(np.percentile(ms, p)) for p in PERCENTILES}}


def summarize(results: list[RequestResult], duration: float) -> dict[str, Any]:
    """vLLM's calculate_metrics over the completed requests."""
    done = [r for r in results if r.ok]
    output = sum(r.output_tokens for r in done)
    return {
        "completed": len(done),
        "failed": len(results) - len(done),
        "errors": sorted({r.error for r in results if r.error}),
        "duration_s": duration,
        "total_input_tokens": sum(r.prompt_tokens for r in done),
        "total_output_tokens": output,
        "chunks_per_token": sum(r.chunks for r in done) / output if output else float("nan"),
        "request_throughput": len(done) / duration,
        "output_throughput": output / duration,
        "ttft_ms": stats_ms([r.ttft for r in done]),
        "tpot_ms": stats_ms(
            [(r.latency - r.ttft) / (r.output_tokens - 1) for r in done if r.output_tokens > 1]
        ),
        "itl_ms": stats_ms([gap for r in done for gap in r.itl]),
        "e2el_ms": stats_ms([r.latency for r in done]),
    }


# -- the servers ----------------------------------------------------------------------------------


def ours_skip_reason() -> str | None:
    """Why ``python -m llama_cpp.server`` cannot run in this checkout, or None if it can."""
    try:
        found = importlib.util.find_spec("llama_cpp.server.__main__") is not None
    except ImportError as error:
        return f"llama_cpp.server cannot be imported ({error})"
    return None if found else "llama_cpp.server has no __main__ (python -m llama_cpp.server) yet"


@contextlib.contextmanager
def launched(name: str, concurrency: int, args: argparse.Namespace) -> Iterator[tuple[str, int | None]]:
    """A server of ``name`` with ``concurrency`` slots: its base URL and pid (None for --url)."""
    if name == "url":
        yield args.url.rstrip("/"), args.pid
        return
    if name == "llama-server":
        bin_dir = native_bin_dir("llama-server")

        def command(port: int) -> list[str]:
            size = {"n_parallel": concurrency, "n_ctx": concurrency * args.ctx_size}
            native = llama_server_args(bin_dir, port=port, threads=args.threads, model=args.model, **size)
            return [*native, "--cont-batching"]

    else:

        def command(port: int) -> list[str]:
            return shlex.split(
                args.ours_cmd.format(
                    python=shlex.quote(sys.executable),
                    model=shlex.quote(str(args.model)),
                    port=port,
                    parallel=concurrency,
                    ctx_size=args.ctx_size,
                    ctx_total=concurrency * args.ctx_size,
                    threads=args.threads,
                )
            )

    with start_server(name, command, env={"OMP_NUM_THREADS": str(args.threads)}) as server:
        yield server.url, server.pid


# -- the report ---------------------------------------------------------------------------------


def triple(stats: dict[str, float]) -> str:
    return " / ".join(f"{stats[f'p{p}']:.1f}" for p in PERCENTILES)


def prompt_token_mismatches(runs: list[dict[str, Any]]) -> list[str]:
    """Servers that counted other prompt tokens than the first one for the same prompts."""
    counts: dict[str, list[int]] = {}
    for run in runs:
        counts.setdefault(run["server"], [r["prompt_tokens"] for r in run["requests"]])
    first, *others = counts.items() if counts else [("", [])]
    return [
        f"{name} counted prompt tokens {sorted(set(c))} where {first[0]} counted {sorted(set(first[1]))}"
        for name, c in others
        if c != first[1]
    ]


def markdown(runs: list[dict[str, Any]]) -> str:
    lines = [
        "| concurrency | server | completed / failed | req/s | output tok/s "
        "| TTFT p50 / p95 / p99 (ms) | TPOT p50 / p95 / p99 (ms) | ITL p50 / p95 / p99 (ms) "
        "| RSS before / after / peak (MiB) |",
        "| ---: | --- | ---: | ---: | ---: | ---: | ---: | ---: | ---: |",
    ]
    for run in sorted(runs, key=lambda r: (r["concurrency"], r["server"])):
        m, rss = run["metrics"], run["rss_mb"]
        lines.append(
            f"| {run['concurrency']} | {run['server']} | {m['completed']} / {m['failed']} "
            f"| {m['request_throughput']:.2f} | {m['output_throughput']:.1f} | {triple(m['ttft_ms'])} "
            f"| {triple(m['tpot_ms'])} | {triple(m['itl_ms'])} "
            f"| {rss['before']:.0f} / {rss['after']:.0f} / {rss['peak']:.0f} |"
        )
    by_key = {(r["server"], r["concurrency"]): r["metrics"] for r in runs}
    levels = sorted({c for s, c in by_key if s == "ours" and ("llama-server", c) in by_key})
    if levels:
        lines += [
            "",
            "| concurrency | output tok/s, ours / llama-server | TTFT p50, ours / llama-server |",
            "| ---: | ---: | ---: |",
        ]
        for c in levels:
            ours, native = by_key["ours", c], by_key["llama-server", c]
            ratio = ours["output_throughput"] / native["output_throughput"]
            ttft = ours["ttft_ms"]["p50"] / native["ttft_ms"]["p50"]
            lines.append(f"| {c} | {ratio:.2f}x | {ttft:.2f}x |")
    return "\n".join(lines)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--requests", type=int, default=32, help="requests per server and level")
    parser.add_argument("--concurrency", type=int, nargs="+", default=[1, 4, 8, 16])
    parser.add_argument("--tokens", type=int, default=64, help="output tokens of every request")
    parser.add_argument("--prompt-tokens", type=int, default=128, help="tokens of each prompt's text")
    parser.add_argument(
        "--servers", nargs="+", choices=["llama-server", "ours"], default=["llama-server", "ours"]
    )
    parser.add_argument("--threads", type=int, default=THREADS)
    parser.add_argument("--ctx-size", type=int, default=512, help="context per slot")
    parser.add_argument("--endpoint", choices=["chat", "completions"], default="completions")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--model", type=Path, default=MODEL)
    parser.add_argument("--ours-cmd", help="command template of our server (see the module docstring)")
    parser.add_argument("--url", help="benchmark this running server instead of starting any")
    parser.add_argument("--pid", type=int, help="with --url: the server's pid, for its RSS")
    parser.add_argument("--json", type=Path, help="write the configuration, metrics and requests here")
    args = parser.parse_args()
    if args.prompt_tokens + args.tokens + 64 > args.ctx_size:
        parser.error("--ctx-size must hold the prompt, its chat template and the output tokens")

    servers: list[str] = ["url"] if args.url else list(dict.fromkeys(args.servers))
    if "ours" in servers and args.ours_cmd is None:
        reason = ours_skip_reason()
        if reason:
            print(f"skipping ours: {reason}; pass --ours-cmd to run another command", file=sys.stderr)
            servers.remove("ours")
        args.ours_cmd = OURS_CMD
    if not servers:
        parser.error("no server left to benchmark")

    work = make_workload(
        args.model,
        endpoint=args.endpoint,
        n=args.requests,
        prompt_tokens=args.prompt_tokens,
        tokens=args.tokens,
        seed=args.seed,
    )
    runs: list[dict[str, Any]] = []
    for i, concurrency in enumerate(args.concurrency):
        for name in servers if i % 2 == 0 else servers[::-1]:
            with launched(name, concurrency, args) as (base, pid):
                run = asyncio.run(measure(base, work, concurrency, pid))
            run |= {"server": name, "concurrency": concurrency}
            runs.append(run)
            m = run["metrics"]
            print(
                f"{name} at concurrency {concurrency}: {m['completed']} completed, {m['failed']} failed, "
                f"{m['output_throughput']:.1f} output tok/s, TTFT p50 {m['ttft_ms']['p50']:.0f} ms"
                + (f"; errors: {m['errors'][:3]}" if m["errors"] else ""),
                file=sys.stderr,
            )

    build = ROOT / "lib" / "llama-build.json"
    loads = ", ".join(f"{r['loadavg_1min_before']:.1f}" for r in runs)
    print(
        f"{args.requests} requests of {args.prompt_tokens} prompt tokens (plus BOS or the chat template) "
        f"and {args.tokens} output tokens each, /v1/{'chat/' if args.endpoint == 'chat' else ''}"
        f"completions, {args.threads} threads, model {args.model.name}, {os.cpu_count()} CPUs "
        f"(1-minute load average before each run: {loads})\n"
    )
    print(markdown(runs))
    mismatches = prompt_token_mismatches(runs)
    for line in mismatches:
        print(f"\nWARNING: the servers did not get the same prompts: {line}")
    if args.json:
        report = {
            "config": {k: str(v) if isinstance(v, Path) else v for k, v in vars(args).items()},
            "machine": {"cpus": os.cpu_count(), "loadavg": os.getloadavg()},
            "llama_cpp_build": json.loads(build.read_text()) if build.exists() else None,
            "prompts": work.prompts,
            "prompt_token_mismatches": mismatches,
            "runs": runs,
        }
        args.json.write_text(json.dumps(report, indent=2))
    return 1 if any(r["metrics"]["failed"] for r in runs) else 0


if __name__ == "__main__":
    raise SystemExit(main())
