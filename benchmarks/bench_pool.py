#!/usr/bin/env python3
"""LlamaPool throughput, in one run: the pool, one Llama serving the same requests one after
another, native ``llama-server -np N`` and ``llama-batched-bench`` (same pinned source).

For N in 1, 2, 4, 8 concurrent requests of 64 generated tokens each (greedy, short distinct
prompts, 2 threads, flash attention off, n_ctx 512 per sequence), it measures:

* aggregate tokens/s: generated tokens of all N requests / wall time from the first submit to
  the last token (prompt evaluation included), for the pool, the sequential Llama and
  llama-server (HTTP on 127.0.0.1, ``ignore_eos``, N requests at once);
* llama-batched-bench's S_TG (decode only, N sequences of 64 tokens after a 16-token prompt);
* peak RSS (VmHWM) of the process serving them (a fresh subprocess each);
* time to first token under load: per request, submit to first text, median and max.

Native tools are built into the cached llama.cpp build on first use
(``scripts/setup_llama.py --tools llama-server llama-batched-bench``).
Usage: ``python benchmarks/bench_pool.py [--streams 1 2 4 8] [--tokens 64] [--rounds 3] [--json FILE]``;
each figure is the median of ``--rounds`` rounds that alternate the engines.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import threading
import time
import urllib.request
from pathlib import Path
from typing import Any

from harness import MODEL, THREADS, llama_server_args, native_bin_dir, peak_rss_mb, start_server

N_CTX = 512
TOPICS = ["a lighthouse", "the moon", "a red fox", "bread", "a river", "old maps", "a violin", "winter"]


def prompts(n: int) -> list[str]:
    return [f"Write a long story about {TOPICS[i % len(TOPICS)]}." for i in range(n)]


# -- children: one measurement per process, so that peak RSS is its own ----------------------


def child_pool(n: int, tokens: int) -> dict[str, Any]:
    from llama_cpp import LlamaPool, SamplingParams

    greedy = SamplingParams.greedy()
    with LlamaPool(MODEL, pool_size=n, n_ctx=N_CTX, n_threads=THREADS, verbose=False) as pool:
        pool.warmup()
        start = time.perf_counter()
        streams = [pool.submit(p, max_tokens=tokens, sampling=greedy) for p in prompts(n)]
        first: list[float] = [0.0] * n
        done = threading.Barrier(n + 1)

        def read(i: int) -> None:
            while stream_chunk := streams[i].next():
                if not first[i] and stream_chunk.tokens:
                    first[i] = time.perf_counter() - start
            done.wait()

        for i in range(n):
            threading.Thread(target=read, args=(i,), daemon=True).start()
        done.wait()
        elapsed = time.perf_counter() - start
        generated = sum(len(s.tokens) for s in streams)
        return {
            "tps": generated / elapsed,
            "tokens": generated,
            "ttft_ms": [t * 1000 for t in first],
            "rss_mb": peak_rss_mb(),
            "token_ids": [list(s.tokens) for s in streams],
        }


def child_llama(n: int, tokens: int) -> dict[str, Any]:
    from llama_cpp import Llama, SamplingParams

    greedy = SamplingParams.greedy()
    with Llama(MODEL, n_ctx=N_CTX, n_threads=THREADS, verbose=False) as llm:
        llm.complete("Hello", max_tokens=1, sampling=greedy)
        start = time.perf_counter()
        outs, first = [], []
        for p in prompts(n):
            llm.reset()
            first.append(time.perf_counter() - start)
            outs.append(llm.complete(p, max_tokens=tokens, sampling=greedy).tokens)
        elapsed = time.perf_counter() - start
        generated = sum(len(t) for t in outs)
        return {
            "tps": generated / elapsed,
            "tokens": generated,
            "ttft_ms": [t * 1000 for t in first],  # when each request's turn came
            "rss_mb": peak_rss_mb(),
            "token_ids": outs,
        }


def run_child(kind: str, n: int, tokens: int) -> dict[str, Any]:
    out = subprocess.run(
        [sys.executable, __file__, "--child", kind, "--streams", str(n), "--tokens", str(tokens)],
        capture_output=True,
        text=True,
        check=True,
        timeout=600,
    )
    result: dict[str, Any] = json.loads(out.stdout.strip().splitlines()[-1])
    return result


# -- native tools -------------------------------------------------------------------------


def post(url: str, body: dict[str, Any], timeout: float = 300) -> dict[str, Any]:
    request = urllib.request.Request(
        url, data=json.dumps(body).encode(), headers={"Content-Type": "application/json"}
    )
    with urllib.request.urlopen(request, timeout=timeout) as response:
        result: dict[str, Any] = json.loads(response.read())
        return result


def server(bin_dir: Path, n: int, tokens: int) -> dict[str, Any]:
    def command(port: int) -> list[str]:
        return llama_server_args(bin_dir, port=port, n_parallel=n, n_ctx=N_CTX * n, threads=THREADS)

    with start_server("llama-server", command, ready_timeout=120) as native:
        base = native.url
        body = {"n_predict": 1, "temperature": 0, "cache_prompt": False}
        post(f"{base}/completion", {**body, "prompt": "Hello"})
        results: list[dict[str, Any]] = [{}] * n

        def call(i: int, prompt: str) -> None:
            request = {**body, "prompt": prompt, "n_predict": tokens, "ignore_eos": True}
            results[i] = post(f"{base}/completion", request)

        threads = [threading.Thread(target=call, args=(i, p)) for i, p in enumerate(prompts(n))]
        start = time.perf_counter()
        for t in threads:
            t.start()
        for t in threads:
            t.join()
        elapsed = time.perf_counter() - start
        generated = sum(int(r["tokens_predicted"]) for r in results)
        return {"tps": generated / elapsed, "tokens": generated, "rss_mb": peak_rss_mb(native.pid)}


def batched_bench(bin_dir: Path, streams: list[int], tokens: int) -> dict[int, float]:
    out = subprocess.run(
        [
            str(bin_dir / "llama-batched-bench"),
            "-m",
            str(MODEL),
            "-c",
            str(N_CTX * max(streams)),
            "-b",
            "512",
            "-ub",
            "512",
            "-npp",
            "16",
            "-ntg",
            str(tokens),
            "-npl",
            ",".join(map(str, streams)),
            "-t",
            str(THREADS),
            "-tb",
            str(THREADS),
            "-fa",
            "off",
        ],
        capture_output=True,
        text=True,
        check=True,
        timeout=600,
    )
    rates: dict[int, float] = {}
    for line in out.stdout.splitlines():
        cells = [c.strip() for c in line.strip().strip("|").split("|")]
        if len(cells) >= 8 and cells[0].isdigit():
            rates[int(cells[2])] = float(cells[7])  # B -> S_TG t/s
    return rates


def first_divergence(a: list[int], b: list[int]) -> int | None:
    return next((i for i, (x, y) in enumerate(zip(a, b, strict=False)) if x != y), None)


def median_run(runs: list[dict[str, Any]]) -> dict[str, Any]:
    return sorted(runs, key=lambda r: float(r["tps"]))[len(runs) // 2]


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--streams", type=int, nargs="+", default=[1, 2, 4, 8])
    parser.add_argument("--tokens", type=int, default=64)
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--child", choices=["pool", "llama"])
    parser.add_argument("--no-native", action="store_true", help="skip llama-server and llama-batched-bench")
    parser.add_argument("--json", type=Path)
    args = parser.parse_args()
    if args.child:
        run = child_pool if args.child == "pool" else child_llama
        print(json.dumps(run(args.streams[0], args.tokens)))
        return 0

    bin_dir = None if args.no_native else native_bin_dir("llama-server", "llama-batched-bench")
    batched = batched_bench(bin_dir, args.streams, args.tokens) if bin_dir else {}
    rows = []
    for n in args.streams:
        # Rounds alternate the engines, so that a slow spell of the shared machine hits all;
        # each figure is the round with the median rate.
        runs: dict[str, list[dict[str, Any]]] = {"pool": [], "llama": [], "server": []}
        for _ in range(args.rounds):
            runs["pool"].append(run_child("pool", n, args.tokens))
            runs["llama"].append(run_child("llama", n, args.tokens))
            if bin_dir:
                runs["server"].append(server(bin_dir, n, args.tokens))
        pool, llama = median_run(runs["pool"]), median_run(runs["llama"])
        native = median_run(runs["server"]) if bin_dir else None
        pairs = zip(llama["token_ids"], pool["token_ids"], strict=True)
        divergence = [first_divergence(a, b) for a, b in pairs]
        rows.append(
            {
                "n": n,
                "pool": pool,
                "llama": llama,
                "server": native,
                "batched_bench_tg": batched.get(n),
                "divergence": divergence,
            }
        )
        print(
            f"N={n}: pool {pool['tps']:.1f} t/s, Llama sequential {llama['tps']:.1f} t/s, "
            f"server {native['tps'] if native else float('nan'):.1f} t/s, divergence {divergence}",
            file=sys.stderr,
        )

    print(
        "| streams | pool t/s | one `Llama`, sequential | `llama-server -np N` "
        "| `llama-batched-bench` S_TG | pool / Llama | pool / server "
        "| pool TTFT median / max (ms) | RSS pool / Llama / server (MB) |"
    )
    print("| ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: |")
    for r in rows:
        pool, llama, native = r["pool"], r["llama"], r["server"]
        server_tps = native["tps"] if native else float("nan")
        server_rss = native["rss_mb"] if native else float("nan")
        ttft = pool["ttft_ms"]
        print(
            f"| {r['n']} | {pool['tps']:.1f} | {llama['tps']:.1f} | {server_tps:.1f} | "
            f"{r['batched_bench_tg'] or float('nan'):.1f} | {pool['tps'] / llama['tps']:.2f}x | "
            f"{pool['tps'] / server_tps:.2f}x | {statistics.median(ttft):.0f} / {max(ttft):.0f} | "
            f"{pool['rss_mb']:.0f} / {llama['rss_mb']:.0f} / {server_rss:.0f} |"
        )
    if args.json:
        args.json.write_text(json.dumps(rows, indent=2))
    return 0


if __name__ == "__main__":
    os.environ.setdefault("OMP_NUM_THREADS", str(THREADS))
    raise SystemExit(main())
