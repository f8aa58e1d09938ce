"""Running a model across machines: llama.cpp's RPC workers, their endpoints, and probing them.

A worker is llama.cpp's ``ggml-rpc-server`` (bundled in :func:`llama_cpp.lib_dir`), started
by ``llama-cpp rpc-worker``; a model names its workers with ``rpc_servers`` and llama.cpp
places layers on their devices. The protocol has no authentication and no encryption: a
worker must only listen where nobody else can connect (see ``docs/cluster.md``).
"""

from __future__ import annotations

import ipaddress
import os
import socket
from collections.abc import Sequence
from pathlib import Path

from llama_cpp.errors import InvalidArgumentError

__all__ = ["is_loopback", "probe", "rpc_endpoints", "rpc_server_command", "unreachable"]

#: What llama.cpp's RPC client, and so every ``rpc_servers`` value, takes.
RpcServers = str | Sequence[str] | None


def rpc_endpoints(servers: RpcServers) -> list[str]:
    """The ``host:port`` endpoints of ``rpc_servers``: a list, or llama-cpp-python's
    comma-separated string (``"10.0.0.2:50052,10.0.0.3:50052"``); blanks are dropped.

    Raises:
        InvalidArgumentError: ``servers`` is neither a string nor a sequence of strings.
    """
    if servers is None:
        return []
    if isinstance(servers, str):
        return [s.strip() for s in servers.split(",") if s.strip()]
    if not all(isinstance(s, str) for s in servers):
        raise InvalidArgumentError(f"rpc_servers must be 'host:port' strings, got {servers!r}")
    return [s.strip() for s in servers if s.strip()]


def split_endpoint(endpoint: str) -> tuple[str, int]:
    """``(host, port)`` of ``"host:port"`` (``"[::1]:50052"`` for IPv6).

    Raises:
        InvalidArgumentError: Not ``host:port`` with a port in [1, 65535].
    """
    host, colon, port = endpoint.rpartition(":")
    if not colon or not host or not port.isdigit() or not 0 < int(port) < 65536:
        raise InvalidArgumentError(f"an RPC server is 'host:port', got {endpoint!r}")
    return host.removeprefix("[").removesuffix("]"), int(port)


def probe(endpoint: str, timeout: float = 1.0) -> bool:
    """Whether a TCP connection to ``endpoint`` succeeds within ``timeout`` seconds.

    A worker serves one client at a time and logs each connection; a probe is a connection
    that closes at once, which the worker accepts and drops.

    Raises:
        InvalidArgumentError: ``endpoint`` is not ``host:port``.
    """
    host, port = split_endpoint(endpoint)
    try:
        with socket.create_connection((host, port), timeout=timeout):
            return True
    except OSError:
        return False


def unreachable(servers: RpcServers, timeout: float = 1.0) -> list[str]:
    """The endpoints of ``servers`` that refuse a TCP connection now (empty: all answer).

    Raises:
        InvalidArgumentError: An endpoint is not ``host:port``.
    """
    return [e for e in rpc_endpoints(servers) if not probe(e, timeout)]


def is_loopback(host: str) -> bool:
    """Whether ``host`` only accepts connections from this machine (``127.0.0.0/8``, ``::1``,
    ``localhost``). ``0.0.0.0``, ``::`` and any other address or name are not."""
    if host.lower() == "localhost":
        return True
    try:
        return ipaddress.ip_address(host.removeprefix("[").removesuffix("]")).is_loopback
    except ValueError:
        return False


def rpc_server_command(
    server: str | os.PathLike[str],
    *,
    host: str,
    port: int,
    threads: int | None = None,
    cache: bool = False,
    devices: Sequence[str] = (),
) -> list[str]:
    """The argument list that starts ``ggml-rpc-server`` (at ``server``) with these settings.

    Args:
        server: Path of the ``ggml-rpc-server`` executable.
        host: Address to bind (``127.0.0.1``: this machine only).
        port: TCP port to listen on, in [1, 65535].
        threads: CPU threads of its CPU device (None: its default).
        cache: Keep received tensors in its file cache (``$LLAMA_CACHE/rpc``), so that a
            client that reloads the model sends only their hashes.
        devices: Its devices by name (``CUDA0``, ``CPU``; empty: its accelerators, else the CPU).

    Raises:
        InvalidArgumentError: ``port`` or ``threads`` out of range, an empty device name.
    """
    if not 0 < port < 65536:
        raise InvalidArgumentError(f"port must be in [1, 65535], got {port}")
    command = [os.fspath(server), "--host", host, "--port", str(port)]
    if threads is not None:
        if threads < 1:
            raise InvalidArgumentError(f"threads must be >= 1, got {threads}")
        command += ["--threads", str(threads)]
    if devices:
        if not all(d.strip() for d in devices):
            raise InvalidArgumentError(f"device names must not be empty, got {list(devices)!r}")
        command += ["--device", ",".join(d.strip() for d in devices)]
    if cache:
        command.append("--cache")
    return command


def bundled_rpc_server() -> Path:
    """The ``ggml-rpc-server`` built with the package.

    Raises:
        FileNotFoundError: This build has none (llama.cpp built without ``GGML_RPC``).
    """
    from llama_cpp import lib_dir  # the package imports this module

    path = lib_dir() / "ggml-rpc-server"
    if not path.is_file():
        raise FileNotFoundError(f"no ggml-rpc-server in {lib_dir()} (llama.cpp built without GGML_RPC?)")
    return path
