#!/usr/bin/env python3
"""A cluster on one machine: RPC on loopback against local, and IsolatedPool against LlamaPool.

1. RPC throughput: the default model on the CPU of this process (``Llama``, T threads) and with
   every layer on one or two ``llama-cpp rpc-worker`` processes on 127.0.0.1
   (``n_gpu_layers=-1``; the workers' CPU devices, T threads for one, T/2 each for two). Prompt
   tokens/s (a ~200-token prompt, evaluated from an empty cache) and decode tokens/s (128
   greedy tokens), from llama.cpp's own timings (``Llama.perf``).
2. Isolated-mode overhead: ``LlamaPool`` and ``IsolatedPool`` (``pool_size=1``, the model
   on the CPU): decode tokens/s of one 128-token greedy stream (wall time, first chunk to
   last) and time to first token (submit to first chunk), median over rounds.

Every figure is the median of ``--rounds`` rounds. Usage:
``python benchmarks/bench_cluster.py [--rounds 5] [--tokens 128] [--threads T] [--json FILE]``
(T: 2 by default, the machine's cores).
"""

from __future__ import annotations

import argparse
import contextlib
import json
import signal
import socket
import statistics
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

from harness import MODEL, THREADS, free_port

PROMPT = " ".join(["The lighthouse keeper wrote in the log every night about ships and storms."] * 14)


@contextlib.contextmanager
def rpc_workers(n: int, threads: int) -> Iterator[list[str]]:
    """``n`` rpc-worker processes on 127.0.0.1; yields their endpoints."""
    processes: list[subprocess.Popen[bytes]] = []
    endpoints: list[str] = []
    try:
        for _ in range(n):
            port = free_port()
            cmd = [sys.executable, "-m", "llama_cpp", "rpc-worker", "--port", str(port), "-t", str(threads)]
            processes.append(subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL))
            deadline = time.monotonic() + 30
            while True:
                with socket.socket() as probe:
                    if probe.connect_ex(("127.0.0.1", port)) == 0:
                        break
                if processes[-1].poll() is not None or time.monotonic() > deadline:
                    raise RuntimeError(f"rpc-worker on port {port} did not start")
                time.sleep(0.05)
            endpoints.append(f"127.0.0.1:{port}")
        yield endpoints
    finally:
        for p in processes:
            p.terminate()
            p.wait(10)


def rpc_round(rpc_servers: list[str] | None, tokens: int, threads: int) -> dict[str, float]:
    from llama_cpp import Llama, SamplingParams

    options: dict[str, Any] = {"rpc_servers": rpc_servers, "n_gpu_layers": -1} if rpc_servers else {}
    with Llama(MODEL, n_ctx=1024, n_threads=threads, verbose=False, **options) as llm:
        llm.generate("warm up", max_tokens=2)
        llm.reset()
        llm.perf(reset=True)
        llm.generate(PROMPT, max_tokens=tokens, sampling=SamplingParams.greedy())
        perf = llm.perf()
    return {"prompt_tps": perf.prompt_tokens_per_second, "decode_tps": perf.eval_tokens_per_second}


def stream_round(isolated: bool, tokens: int, threads: int) -> dict[str, float]:
    from llama_cpp import IsolatedPool, LlamaPool, SamplingParams

    kind = IsolatedPool if isolated else LlamaPool
    with kind(MODEL, 1, n_ctx=1024, n_threads=threads, verbose=False) as pool:
        pool.warmup()
        start = time.perf_counter()
        stream = pool.submit(
            "Write a long story about a lighthouse.", max_tokens=tokens, sampling=SamplingParams.greedy()
        )
        first_chunk = None
        n = 0
        while (chunk := stream.next()) is not None:
            if first_chunk is None:
                first_chunk = time.perf_counter()
            n += len(chunk.tokens)
        end = time.perf_counter()
    assert first_chunk is not None
    return {"ttft_ms": (first_chunk - start) * 1000, "decode_tps": (n - 1) / (end - first_chunk)}


def median(rows: list[dict[str, float]], key: str) -> float:
    return statistics.median(r[key] for r in rows)


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--tokens", type=int, default=128)
    parser.add_argument("--threads", type=int, default=THREADS)
    parser.add_argument("--json", type=Path, default=None)
    args = parser.parse_args()
    # SIGTERM unwinds (closing the pools and stopping the workers) instead of leaving them.
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(128 + signal.SIGTERM))
    results: dict[str, Any] = {"rpc": {}, "isolated": {}}

    threads = args.threads
    with rpc_workers(1, threads) as one, rpc_workers(2, max(1, threads // 2)) as two:
        setups: dict[str, list[str] | None] = {
            "local CPU (in process)": None,
            "1 rpc-worker, loopback": one,
            "2 rpc-workers, loopback (layer split)": two,
        }
        rows: dict[str, list[dict[str, float]]] = {name: [] for name in setups}
        for _ in range(args.rounds):  # the setups alternate within each round
            for name, servers in setups.items():
                rows[name].append(rpc_round(servers, args.tokens, threads))
    print(f"RPC on loopback against local (the default model, greedy, {threads} threads)")
    print("| setup | prompt tokens/s | decode tokens/s |\n|---|---:|---:|")
    for name, got in rows.items():
        results["rpc"][name] = {k: median(got, k) for k in ("prompt_tps", "decode_tps")}
        print(f"| {name} | {median(got, 'prompt_tps'):.0f} | {median(got, 'decode_tps'):.1f} |")

    iso: dict[str, list[dict[str, float]]] = {
        "LlamaPool (in process)": [],
        "IsolatedPool (child process)": [],
    }
    for _ in range(args.rounds):
        iso["LlamaPool (in process)"].append(stream_round(False, args.tokens, threads))
        iso["IsolatedPool (child process)"].append(stream_round(True, args.tokens, threads))
    print("\nIsolated mode against in-process (pool_size 1, one stream)")
    print("| front end | decode tokens/s | time to first token (ms) |\n|---|---:|---:|")
    for name, got in iso.items():
        results["isolated"][name] = {k: median(got, k) for k in ("decode_tps", "ttft_ms")}
        print(f"| {name} | {median(got, 'decode_tps'):.1f} | {median(got, 'ttft_ms'):.1f} |")
    if args.json is not None:
        args.json.write_text(json.dumps(results, indent=2))


if __name__ == "__main__":
    main()
