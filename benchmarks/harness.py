"""What the benchmarks share: the default model, the pinned native llama.cpp tools, server
processes on a free port of 127.0.0.1, and the memory of a process.

Imported by the scripts of this folder (``python benchmarks/bench_*.py`` puts the folder on
``sys.path``); only the standard library, so that it loads before anything is installed.
"""

from __future__ import annotations

import contextlib
import os
import re
import socket
import subprocess
import sys
import tempfile
import time
import urllib.error
import urllib.request
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
MODEL = ROOT / "models" / "gemma-3-270m-q4_k_m.gguf"
THREADS = 2


def native_bin_dir(*tools: str) -> Path:
    """The cached folder of the pinned llama.cpp build's binaries, with ``tools`` built.

    ``scripts/setup_llama.py`` builds the targets missing from the cached build (the first
    time only: later calls take a second) and prints the folder.
    """
    out = subprocess.run(
        [sys.executable, str(ROOT / "scripts" / "setup_llama.py"), "--tools", *tools, "--print-bin-dir"],
        capture_output=True,
        text=True,
        check=True,
    )
    return Path(out.stdout.strip().splitlines()[-1])


def llama_server_args(
    bin_dir: Path, *, port: int, n_parallel: int, n_ctx: int, threads: int, model: Path = MODEL
) -> list[str]:
    """The command line of native ``llama-server`` as the benchmarks run it.

    ``n_ctx`` is the whole context, split among the ``n_parallel`` slots (llama-server's
    ``-c``). Flash attention off and batch 512: the defaults of this package, which it is
    compared with.
    """
    return [
        str(bin_dir / "llama-server"),
        "-m",
        str(model),
        "--host",
        "127.0.0.1",
        "--port",
        str(port),
        "-np",
        str(n_parallel),
        "-c",
        str(n_ctx),
        "-t",
        str(threads),
        "-tb",
        str(threads),
        "-b",
        "512",
        "-fa",
        "off",
        "--no-warmup",
    ]


def free_port() -> int:
    """A port of 127.0.0.1 that was free a moment ago (the OS's choice for port 0).

    Another process may take it before the server binds it: :func:`start_server` retries.
    """
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port: int = s.getsockname()[1]
        return port


# -- memory of a process ------------------------------------------------------------------


def _status_kb(pid: int | str, field: str) -> int | None:
    try:
        status = Path(f"/proc/{pid}/status").read_text()
    except OSError:  # gone, or not Linux
        return None
    match = re.search(rf"{field}:\s+(\d+) kB", status)
    return int(match.group(1)) if match else None


def peak_rss_mb(pid: int | str = "self") -> float:
    """Peak resident memory (VmHWM) of a process, in MiB; NaN where /proc cannot tell."""
    kb = _status_kb(pid, "VmHWM")
    return kb / 1024 if kb is not None else float("nan")


def _children(pid: int) -> list[int]:
    found: list[int] = []
    for task in Path(f"/proc/{pid}/task").glob("*/children"):
        with contextlib.suppress(OSError):
            found += [int(c) for c in task.read_text().split()]
    return found


def tree_rss_mb(pid: int) -> float:
    """Resident memory (VmRSS) of a process and all its descendants, in MiB; NaN if gone."""
    total, pending, seen = 0, [pid], set()
    while pending:
        current = pending.pop()
        if current in seen:
            continue
        seen.add(current)
        kb = _status_kb(current, "VmRSS")
        if kb is None:
            if current == pid:
                return float("nan")
            continue
        total += kb
        pending += _children(current)
    return total / 1024


# -- a server process -----------------------------------------------------------------------


class ServerStartError(RuntimeError):
    """A server process exited, or did not answer /health, before it was ready."""


@dataclass(frozen=True)
class Server:
    """A started server: its base URL (``http://127.0.0.1:PORT``) and its process."""

    name: str
    url: str
    process: subprocess.Popen[bytes]
    log: Path

    @property
    def pid(self) -> int:
        return self.process.pid


# Straight to 127.0.0.1, whatever proxy the environment names.
_DIRECT = urllib.request.build_opener(urllib.request.ProxyHandler({}))


def _healthy(url: str) -> bool:
    try:
        with _DIRECT.open(f"{url}/health", timeout=2) as response:
            status: int = response.status
            return status == 200
    except (OSError, urllib.error.HTTPError):  # refused while starting, 503 while loading
        return False


def _log_tail(log: Path, lines: int = 15) -> str:
    try:
        return "\n".join(log.read_text(errors="replace").splitlines()[-lines:])
    except OSError:
        return ""


_BIND_FAILURE = re.compile(r"address already in use|couldn't bind|failed to bind|errno 98", re.IGNORECASE)


@contextlib.contextmanager
def start_server(
    name: str,
    command: Callable[[int], list[str]],
    *,
    env: dict[str, str] | None = None,
    ready_timeout: float = 180.0,
    attempts: int = 3,
) -> Iterator[Server]:
    """Run ``command(port)`` on a free port until GET /health answers 200; stop it on exit.

    The port is one the OS handed out a moment before (:func:`free_port`); when the server
    exits because another process took it in between, it is started again on a new port,
    up to ``attempts`` times. Output goes to a log file, whose tail is in the error.

    Raises:
        ServerStartError: The server exited, or /health did not answer 200 within
            ``ready_timeout`` seconds.
    """
    log_dir = Path(tempfile.mkdtemp(prefix=f"bench-{name}-"))
    for attempt in range(1, attempts + 1):
        port = free_port()
        log = log_dir / f"attempt-{attempt}.log"
        with log.open("wb") as out:
            process = subprocess.Popen(
                command(port), stdout=out, stderr=subprocess.STDOUT, env={**os.environ, **(env or {})}
            )
        url = f"http://127.0.0.1:{port}"
        try:
            deadline = time.monotonic() + ready_timeout
            while not _healthy(url):
                if process.poll() is not None:
                    break
                if time.monotonic() > deadline:
                    raise ServerStartError(
                        f"{name}: /health did not answer 200 within {ready_timeout:.0f} s; "
                        f"log {log}:\n{_log_tail(log)}"
                    )
                time.sleep(0.2)
            else:
                yield Server(name, url, process, log)
                return
            # It exited before it was ready: retry only when the port was taken.
            if attempt == attempts or not _BIND_FAILURE.search(_log_tail(log, 200)):
                raise ServerStartError(
                    f"{name} exited with status {process.returncode} before it was ready; "
                    f"log {log}:\n{_log_tail(log)}"
                )
        finally:
            stop(process)
    raise AssertionError("unreachable")


def stop(process: subprocess.Popen[bytes], grace: float = 30.0) -> None:
    """Terminate a process (SIGTERM, then SIGKILL after ``grace`` seconds) and reap it."""
    if process.poll() is None:
        process.terminate()
        try:
            process.wait(timeout=grace)
        except subprocess.TimeoutExpired:
            process.kill()
            process.wait()
