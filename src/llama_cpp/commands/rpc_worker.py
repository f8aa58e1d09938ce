"""``llama-cpp rpc-worker``: serve this machine's devices to other machines' models."""

from __future__ import annotations

import argparse
import logging
import os
import signal
import subprocess
import sys
from types import FrameType

from llama_cpp.cluster import bundled_rpc_server, is_loopback, rpc_server_command
from llama_cpp.commands.common import Subcommands, add_command

logger = logging.getLogger("llama_cpp")

#: Signals handed on to the worker: it ends on them, and this command with it.
FORWARDED = (signal.SIGINT, signal.SIGTERM, signal.SIGHUP)

EXPOSED_WARNING = """
!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!
WARNING: the RPC worker listens on {host}:{port}, beyond this machine.
  llama.cpp's RPC protocol has NO authentication and NO encryption: anyone who
  can connect can run computations on this machine's devices and read what they
  hold. Bind 127.0.0.1 (an SSH tunnel or a private network otherwise).
!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!
"""


def register(sub: Subcommands) -> None:
    """Add the command's parser to ``sub``."""
    parser = add_command(
        sub,
        "rpc-worker",
        summary="serve this machine's devices to models elsewhere (llama.cpp RPC)",
        description="""
            Start llama.cpp's ggml-rpc-server (bundled with the package) on HOST:PORT. A model
            loaded with rpc_servers="HOST:PORT" (and n_gpu_layers) then places layers on this
            worker's devices. Runs until interrupted; SIGINT, SIGTERM and SIGHUP are passed on
            to the worker. The protocol has no authentication: binding anything but a loopback
            address prints a warning, since whoever can connect can use the worker.""",
        examples="""
            llama-cpp rpc-worker --port 50052
            llama-cpp rpc-worker --host 127.0.0.1 --port 50052 --threads 8 --cache ~/.cache/rpc
            llama-cpp rpc-worker --port 50053 --device CUDA1
        """,
    )
    parser.add_argument(
        "-H", "--host", default="127.0.0.1", help="address to bind (default 127.0.0.1: this machine only)"
    )
    parser.add_argument("-p", "--port", type=_port, required=True, metavar="N", help="TCP port to listen on")
    parser.add_argument(
        "-t", "--threads", type=_positive, default=None, metavar="T", help="CPU threads (default: its own)"
    )
    parser.add_argument(
        "--cache",
        default=None,
        metavar="DIR",
        help="keep received tensors in DIR/rpc, so a reloaded model sends only their hashes",
    )
    parser.add_argument(
        "-d",
        "--device",
        action="append",
        default=[],
        metavar="NAME",
        help="a device to serve (repeat or comma-separate; default: the accelerators, else the CPU)",
    )
    parser.set_defaults(run=run)


def run(args: argparse.Namespace) -> int:
    devices = [d for value in args.device for d in value.split(",")]
    try:
        server = bundled_rpc_server()
    except FileNotFoundError as error:
        print(f"llama-cpp rpc-worker: error: {error}", file=sys.stderr)
        return 1
    command = rpc_server_command(
        server,
        host=args.host,
        port=args.port,
        threads=args.threads,
        cache=args.cache is not None,
        devices=devices,
    )
    env = dict(os.environ)
    if args.cache is not None:
        os.makedirs(args.cache, exist_ok=True)
        env["LLAMA_CACHE"] = os.path.abspath(args.cache)  # the worker caches in $LLAMA_CACHE/rpc
    if not is_loopback(args.host):
        print(EXPOSED_WARNING.format(host=args.host, port=args.port), file=sys.stderr, flush=True)
        logger.warning(
            "rpc-worker bound to %s:%d: the RPC protocol has no authentication", args.host, args.port
        )
    worker: subprocess.Popen[bytes] | None = None
    received: list[int] = []

    def forward(signum: int, _frame: FrameType | None) -> None:
        received.append(signum)
        if worker is not None:
            worker.send_signal(signum)

    # Installed before the worker starts, so that no signal can end this command and leave the
    # worker running; one that arrives while it starts is passed on once it has.
    previous = {s: signal.signal(s, forward) for s in FORWARDED}
    try:
        worker = subprocess.Popen(command, env=env)
        if received:
            worker.send_signal(received[0])
        status = worker.wait()
    finally:
        for s, handler in previous.items():
            signal.signal(s, handler)
        if worker is not None and worker.poll() is None:  # this command ended otherwise: no orphan
            worker.terminate()
            worker.wait()
    # A worker killed by a signal exits as a shell reports it: 128 + the signal.
    return 128 - status if status < 0 else status


def _port(text: str) -> int:
    port = int(text)
    if not 0 < port < 65536:
        raise argparse.ArgumentTypeError(f"a port is in [1, 65535], got {port}")
    return port


def _positive(text: str) -> int:
    value = int(text)
    if value < 1:
        raise argparse.ArgumentTypeError(f"must be >= 1, got {value}")
    return value
