#!/usr/bin/env python3
"""Soak benchmark: thousands of generations, streams cancelled at random, create/close cycles
of ``Llama`` and ``LlamaPool``, and server requests whose HTTP clients disconnect mid-stream,
in rounds, reporting what the process holds as it goes: resident memory (VmRSS), OS threads
and open file descriptors, at the start, after the warm-up rounds and at the end.

The server (``create_app`` under uvicorn, in this process, on 127.0.0.1, 2 slots) runs over
all the rounds, as a deployed one does. Each round (``llama_cpp.testing.soak.soak_round``)
opens a ``Llama`` and a 4-slot ``LlamaPool``, splits the generations (1-16 tokens, greedy or
seeded sampling, complete and streamed) and the cancelled streams (unbounded streams stopped
after 0-8 pieces by closing, dropping, or ``Cancellation.cancel()``) between the two, closes
them, creates and closes ``--cycles`` models (a ``Llama`` and a 2-slot ``LlamaPool`` in turn)
and sends ``--server-requests`` streamed completions from fresh ``httpx`` clients (about half
hang up after 1-4 events). What a round leaves behind is a leak: after the warm-up, RSS,
threads and descriptors should stay flat. The model is the tiny test model
(``write_tiny_llama``): the figures are about this package's code, not a model's weights.

The same workload, a few hundred operations long, is asserted by ``tests/test_soak.py``.

Usage::

    python benchmarks/soak.py [--rounds 20 | --duration SECONDS] [--warmup-rounds 3]
        [--generations 100] [--cancelled-streams 50] [--cycles 6] [--server-requests 20]
        [--report-every 5] [--seed 0] [--json FILE]

Rows: ``start`` (nothing loaded), ``served`` (the server up), ``warm`` (after the warm-up
rounds), every ``--report-every`` rounds, ``end`` (the server still up) and ``stopped``. The exit
status is 1 when threads or descriptors at ``end`` differ from ``warm``.
"""

from __future__ import annotations

import argparse
import json
import logging
import random
import sys
import tempfile
import time
from dataclasses import asdict
from pathlib import Path
from typing import Any

from llama_cpp.testing import write_tiny_llama
from llama_cpp.testing.soak import SoakCounts, SoakSizes, settled_usage, soak_round, soak_server

#: The table's columns: name, width, and the format of a float (None: as it is).
COLUMNS = (
    ("checkpoint", 10, None),
    ("rounds", 6, None),
    ("seconds", 7, ".1f"),
    ("generations", 11, None),
    ("cancelled", 9, None),
    ("llama_cycles", 12, None),
    ("pool_cycles", 11, None),
    ("requests", 8, None),
    ("disconnects", 11, None),
    ("rss_mib", 7, ".1f"),
    ("threads", 7, None),
    ("fds", 4, None),
)


def row(checkpoint: str, rounds: int, start: float, counts: SoakCounts, settle: int | None) -> dict[str, Any]:
    usage = settled_usage(settle) if settle is not None else settled_usage()
    return {
        "checkpoint": checkpoint,
        "rounds": rounds,
        "seconds": time.monotonic() - start,
        "generations": counts.generations,
        "cancelled": counts.cancelled_streams,
        "llama_cycles": counts.llama_cycles,
        "pool_cycles": counts.pool_cycles,
        "requests": counts.server_requests,
        "disconnects": counts.server_disconnects,
        "rss_mib": usage.rss_kib / 1024,
        "threads": usage.threads,
        "fds": usage.fds,
    }


def print_row(values: dict[str, Any] | None) -> None:
    """One line of the table; its header for None."""
    cells = []
    for name, width, fmt in COLUMNS:
        value = name if values is None else format(values[name], fmt or "")
        cells.append(value.ljust(width) if name == "checkpoint" else value.rjust(width))
    print("  ".join(cells), flush=True)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--rounds", type=int, default=20, help="rounds after the warm-up")
    parser.add_argument("--duration", type=float, help="run rounds for this many seconds instead")
    parser.add_argument("--warmup-rounds", type=int, default=3)
    parser.add_argument("--generations", type=int, default=100, help="per round")
    parser.add_argument("--cancelled-streams", type=int, default=50, help="per round")
    parser.add_argument("--cycles", type=int, default=6, help="create/close cycles per round")
    parser.add_argument("--server-requests", type=int, default=20, help="per round")
    parser.add_argument("--report-every", type=int, default=5, help="print a row every N rounds")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--json", type=Path, help="also write the rows here")
    args = parser.parse_args()
    # Expected on every cancelled stream and every hung-up client: llama.cpp reports the
    # aborted decode as an error, asyncio the writes to a closed socket. Not this table's news.
    logging.getLogger("llama_cpp").setLevel(logging.CRITICAL)
    logging.getLogger("asyncio").setLevel(logging.CRITICAL)

    sizes = SoakSizes(args.generations, args.cancelled_streams, args.cycles, args.server_requests)
    rng = random.Random(args.seed)
    counts = SoakCounts()
    rows: list[dict[str, Any]] = []
    print_row(None)
    start = time.monotonic()
    rows.append(row("start", 0, start, counts, None))
    print_row(rows[-1])
    with tempfile.TemporaryDirectory() as tmp:
        model = write_tiny_llama(Path(tmp) / "tiny.gguf")
        with soak_server(model) as url:
            rows.append(row("served", 0, start, counts, None))
            print_row(rows[-1])
            for _ in range(args.warmup_rounds):
                soak_round(model, url, sizes, rng, counts)
            warm = row("warm", args.warmup_rounds, start, counts, None)
            rows.append(warm)
            print_row(warm)
            done = 0
            deadline = None if args.duration is None else time.monotonic() + args.duration
            while done < args.rounds if deadline is None else time.monotonic() < deadline:
                soak_round(model, url, sizes, rng, counts)
                done += 1
                if done % args.report_every == 0:
                    rows.append(row(f"round {done}", args.warmup_rounds + done, start, counts, None))
                    print_row(rows[-1])
            end = row("end", args.warmup_rounds + done, start, counts, warm["threads"])
            rows.append(end)
            print_row(end)
    # The server stopped: what it held beyond the process's start is what it did not give back.
    rows.append(row("stopped", args.warmup_rounds + done, start, counts, None))
    print_row(rows[-1])
    print(
        f"drift after warm-up: RSS {end['rss_mib'] - warm['rss_mib']:+.1f} MiB, "
        f"threads {end['threads'] - warm['threads']:+d}, fds {end['fds'] - warm['fds']:+d} "
        f"over {done} rounds (peak RSS {max(r['rss_mib'] for r in rows):.1f} MiB)"
    )
    if args.json:
        args.json.write_text(json.dumps({"sizes": asdict(sizes), "rows": rows}, indent=2) + "\n")
    return 0 if (end["threads"], end["fds"]) == (warm["threads"], warm["fds"]) else 1


if __name__ == "__main__":
    sys.exit(main())
