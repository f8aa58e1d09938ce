"""The soak workload: repeated generations, streams cancelled at random, create/close cycles of
:class:`~llama_cpp.Llama` and :class:`~llama_cpp.LlamaPool`, server requests whose clients
disconnect mid-stream; and what the process holds (resident memory, threads, descriptors).

Shared by ``tests/test_soak.py`` (a few hundred operations, asserted) and
``benchmarks/soak.py`` (thousands, reported): one workload, two sizes. Linux only (``/proc``).
The server phase needs the ``server`` and ``server-test`` extras (uvicorn, httpx).
"""

from __future__ import annotations

import contextlib
import functools
import os
import random
import socket
import ssl
import string
import threading
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

from llama_cpp import _core
from llama_cpp.errors import GenerationCancelled
from llama_cpp.frontend import FrontEnd
from llama_cpp.llama import Llama
from llama_cpp.params import SamplingParams
from llama_cpp.pool import LlamaPool

if TYPE_CHECKING:
    from llama_cpp.server import ServerSettings

__all__ = [
    "ProcessUsage",
    "SoakCounts",
    "SoakSizes",
    "cancelled_streams",
    "create_close_cycles",
    "generations",
    "process_usage",
    "server_requests",
    "serving",
    "settled_usage",
    "soak_round",
    "soak_server",
]


@dataclass(frozen=True)
class ProcessUsage:
    """What this process holds: resident memory (KiB), OS threads, open file descriptors."""

    rss_kib: int
    threads: int
    fds: int


def process_usage() -> ProcessUsage:
    """This process's :class:`ProcessUsage`, read from ``/proc/self``.

    Threads are the kernel's count (``Threads:``), so that native threads (ggml's workers, a
    pool's scheduler) count as well as Python's.
    """
    fields = {}
    for line in Path("/proc/self/status").read_text().splitlines():
        key, _, value = line.partition(":")
        fields[key] = value.split()
    return ProcessUsage(
        rss_kib=int(fields["VmRSS"][0]),
        threads=int(fields["Threads"][0]),
        fds=len(os.listdir("/proc/self/fd")),
    )


def settled_usage(threads: int | None = None, timeout: float = 10.0) -> ProcessUsage:
    """:func:`process_usage` once the thread count settled, or after ``timeout`` seconds.

    A thread joined in Python still has to exit in the kernel, a moment later: this waits
    until at most ``threads`` are left, or (``threads=None``) until the count stayed the same
    over five reads 20 ms apart.
    """
    deadline = time.monotonic() + timeout
    pause = threading.Event()
    seen: list[int] = []
    while time.monotonic() < deadline:
        usage = process_usage()
        if threads is not None and usage.threads <= threads:
            break
        seen.append(usage.threads)
        if threads is None and len(seen) >= 5 and len(set(seen[-5:])) == 1:
            break
        pause.wait(0.02)
    return usage


@dataclass
class SoakCounts:
    """Operations a soak ran, by kind (added up over its rounds)."""

    generations: int = 0
    streams: int = 0
    cancelled_streams: int = 0
    llama_cycles: int = 0
    pool_cycles: int = 0
    server_requests: int = 0
    server_disconnects: int = 0


def _prompt(rng: random.Random) -> str:
    # Lowercase letters: the tiny test model cycles through the alphabet after any of them,
    # so every generation runs its full max_tokens (no early end of generation).
    return "".join(rng.choice(string.ascii_lowercase) for _ in range(rng.randint(1, 8)))


def _sampling(rng: random.Random) -> SamplingParams:
    if rng.random() < 0.5:
        return SamplingParams.greedy()
    return SamplingParams(temperature=0.8, seed=rng.randrange(1 << 30))


def generations(
    frontend: FrontEnd, n: int, rng: random.Random, counts: SoakCounts, *, max_tokens: int = 16
) -> None:
    """Run ``n`` generations of 1 to ``max_tokens`` tokens, complete and streamed in turn.

    Raises:
        AssertionError: A streamed generation returned no text.
    """
    for i in range(n):
        prompt, sampling = _prompt(rng), _sampling(rng)
        tokens = rng.randint(1, max_tokens)
        if i % 2:
            text = "".join(frontend.generate_stream(prompt, max_tokens=tokens, sampling=sampling))
        else:
            text = frontend.generate(prompt, max_tokens=tokens, sampling=sampling)
        assert text, f"no text for {prompt!r}"
        counts.generations += 1


def cancelled_streams(frontend: FrontEnd, n: int, rng: random.Random, counts: SoakCounts) -> None:
    """Open ``n`` unbounded streams and stop each after 0 to 8 pieces, at random one of three
    ways: closing the iterator, dropping it unread, or cancelling it through a
    :class:`~llama_cpp.Cancellation` (which must then end it with :class:`GenerationCancelled`).

    Raises:
        AssertionError: A cancelled stream went on yielding instead of raising.
    """
    for _ in range(n):
        cancellation = _core.Cancellation()
        stream = frontend.generate_stream(
            _prompt(rng), max_tokens=None, sampling=_sampling(rng), cancellation=cancellation
        )
        for _ in range(rng.randint(0, 8)):
            next(stream)
        how = rng.randrange(3)
        if how == 0:
            stream.close()
        elif how == 1:
            del stream  # the generator's finalizer closes the native stream
        else:
            cancellation.cancel()
            try:
                # Pieces decoded before the flag was seen may still come; the end must be this.
                for _ in range(64):
                    next(stream)
                raise AssertionError("a cancelled stream went on")
            except GenerationCancelled:
                pass
        counts.streams += 1
        counts.cancelled_streams += 1


def create_close_cycles(
    model_path: str | os.PathLike[str], n: int, rng: random.Random, counts: SoakCounts
) -> None:
    """Create and close ``n`` models, a :class:`Llama` and a 2-slot :class:`LlamaPool` in
    turn, each running one short generation in between (so that its context is used)."""
    for i in range(n):
        frontend: Llama | LlamaPool
        if i % 2:
            frontend = LlamaPool(model_path, 2, n_ctx=128, n_batch=64, verbose=False)
            counts.pool_cycles += 1
        else:
            frontend = Llama(model_path, n_ctx=128, n_batch=64, verbose=False)
            counts.llama_cycles += 1
        try:
            frontend.generate(_prompt(rng), max_tokens=4, sampling=SamplingParams.greedy())
        finally:
            frontend.close()


@contextlib.contextmanager
def serving(settings: ServerSettings) -> Iterator[str]:
    """Run ``create_app(settings)`` under uvicorn in a thread of this process, on a port of
    127.0.0.1 that the kernel picks; yield its base URL once ``/health`` answers 200.

    Raises:
        TimeoutError: The server did not become healthy within 60 s.
    """
    import httpx
    import uvicorn

    from llama_cpp.server import create_app

    sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    sock.bind(("127.0.0.1", 0))
    url = f"http://127.0.0.1:{sock.getsockname()[1]}"
    config = uvicorn.Config(create_app(settings), log_level="warning", timeout_graceful_shutdown=2)
    server = uvicorn.Server(config)
    thread = threading.Thread(target=server.run, kwargs={"sockets": [sock]}, name="soak-uvicorn")
    thread.start()
    try:
        deadline = time.monotonic() + 60
        while True:
            with contextlib.suppress(httpx.TransportError):
                if httpx.get(f"{url}/health", timeout=5).status_code == 200:
                    break
            if time.monotonic() > deadline:
                raise TimeoutError(f"the server at {url} was not healthy within 60 s")
            time.sleep(0.02)
        yield url
    finally:
        server.should_exit = True
        thread.join(30)
        sock.close()


@functools.cache
def _client_tls() -> ssl.SSLContext:
    """One SSL context for every client of the soak. httpx.Client builds one by default
    (loading the CA bundle), and OpenSSL keeps part of each: RSS grew by 11 MiB over 800
    clients, a cost of the client's side that would hide or fake a leak of the server's."""
    return ssl.create_default_context()


def server_requests(url: str, n: int, rng: random.Random, counts: SoakCounts, *, model: str) -> None:
    """Send ``n`` streamed completions to ``url`` from real HTTP clients; about half of them
    hang up after 1 to 4 events, each on a connection of its own (closed with the request).

    Raises:
        AssertionError: A request was not answered 200, or a full stream did not end with
            ``data: [DONE]``.
    """
    import httpx

    for _ in range(n):
        disconnect = rng.random() < 0.5
        body = {
            "model": model,
            "prompt": _prompt(rng),
            "max_tokens": 200 if disconnect else rng.randint(1, 12),
            "temperature": 0,
            "stream": True,
        }
        with (
            httpx.Client(base_url=url, timeout=60, verify=_client_tls()) as client,
            client.stream("POST", "/v1/completions", json=body) as response,
        ):
            assert response.status_code == 200, response.read()
            events: list[str] = []
            keep = rng.randint(1, 4) if disconnect else None
            for line in response.iter_lines():
                if line:
                    events.append(line)
                if len(events) == keep:
                    break  # leaving both blocks closes the connection mid-stream
            if not disconnect:
                assert events[-1] == "data: [DONE]", events[-3:]
        counts.server_requests += 1
        counts.server_disconnects += disconnect


@dataclass(frozen=True)
class SoakSizes:
    """Operations of one soak round, by kind (see :func:`soak_round`)."""

    generations: int = 100
    cancelled_streams: int = 50
    create_close_cycles: int = 6
    server_requests: int = 20


def soak_server(model_path: str | os.PathLike[str]) -> contextlib.AbstractContextManager[str]:
    """:func:`serving` the soak's server: ``model_path`` as ``"soak"``, 2 slots of 256 tokens.

    It stays up over all the rounds, as a deployed server does; starting and stopping it is
    not part of a round (see the notes in docs/hardening.md on what each start costs).
    """
    from llama_cpp.server import ServerSettings

    return serving(ServerSettings(model=Path(model_path), alias="soak", parallel=2, ctx_size=256))


def soak_round(
    model_path: str | os.PathLike[str], url: str, sizes: SoakSizes, rng: random.Random, counts: SoakCounts
) -> None:
    """One round: open a :class:`Llama` and a 4-slot :class:`LlamaPool`, split the generations
    and cancelled streams between them, run the create/close cycles, send the requests to the
    server at ``url`` (:func:`soak_server`), close both.

    Whatever a round leaves behind once it returns (threads, descriptors, memory) is a leak:
    rounds are what the soak test and benchmark compare.
    """
    with (
        Llama(model_path, n_ctx=256, n_batch=64, verbose=False) as llm,
        LlamaPool(model_path, 4, n_ctx=256, n_batch=64, verbose=False) as pool,
    ):
        half = sizes.generations // 2
        generations(llm, sizes.generations - half, rng, counts)
        generations(pool, half, rng, counts)
        half = sizes.cancelled_streams // 2
        cancelled_streams(llm, sizes.cancelled_streams - half, rng, counts)
        cancelled_streams(pool, half, rng, counts)
    create_close_cycles(model_path, sizes.create_close_cycles, rng, counts)
    server_requests(url, sizes.server_requests, rng, counts, model="soak")
