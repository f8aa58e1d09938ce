"""A ggml-rpc-server subprocess on 127.0.0.1 for a test module (the pattern of test_rpc.py)."""

from __future__ import annotations

import contextlib
import socket
import subprocess
import time
from collections.abc import Iterator
from pathlib import Path

import llama_cpp

ACCEPTED = "Accepted client connection"  # what ggml-rpc-server logs (and flushes) per client


def free_port() -> int:
    """A port of 127.0.0.1 that no socket holds now (another process may take it later)."""
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port: int = sock.getsockname()[1]
        return port


def serving(server: subprocess.Popen[bytes], port: int, log: Path) -> bool:
    """Wait until ``server`` accepts connections on ``port`` (True) or exits (False)."""
    while server.poll() is None:
        with socket.socket() as probe:
            listening = probe.connect_ex(("127.0.0.1", port)) == 0
        if listening and ACCEPTED in log.read_text():
            return True
        time.sleep(0.05)
    return False


@contextlib.contextmanager
def rpc_server(log_path: Path) -> Iterator[str]:
    """Run a ggml-rpc-server until the block ends; yields its ``host:port``. ggml-rpc-server
    takes no port 0: when another process takes the picked port first, it starts again."""
    for _ in range(10):
        port = free_port()
        with log_path.open("w") as log:
            server = subprocess.Popen(
                [str(llama_cpp.lib_dir() / "ggml-rpc-server"), "-H", "127.0.0.1", "-p", str(port), "-t", "1"],
                stdout=log,
                stderr=subprocess.STDOUT,
            )
        if serving(server, port, log_path):
            break
    else:
        raise RuntimeError(f"ggml-rpc-server could not bind a port in 10 tries:\n{log_path.read_text()}")
    try:
        yield f"127.0.0.1:{port}"
    finally:
        server.terminate()
        server.wait(10)
