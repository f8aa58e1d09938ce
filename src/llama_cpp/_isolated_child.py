"""The model process of an :class:`~llama_cpp.IsolatedPool`: a ``LlamaPool`` serving the
parent's prepared requests over one connection (see :mod:`llama_cpp.isolated` for the
protocol). Started as ``python -c "from llama_cpp._isolated_child import main; main()" FD``."""

from __future__ import annotations

import contextlib
import logging
import sys
import threading
from collections.abc import Callable
from dataclasses import dataclass
from multiprocessing.connection import Connection
from typing import Any

from llama_cpp import _core
from llama_cpp.completion_output import GenerationStream
from llama_cpp.config import LlamaConfig
from llama_cpp.request import Request
from llama_cpp.results import PoolStats

_log = logging.getLogger("llama_cpp")

#: A token's logprob as it crosses: (token, logprob, [(alternative, logprob), ...]).
Logprob = tuple[int, float, list[tuple[int, float]]]


def logprobs_out(entries: list[_core.TokenLogprob]) -> list[Logprob]:
    return [(e.token, e.logprob, list(e.top)) for e in entries]


def logprobs_in(entries: list[Logprob]) -> list[_core.TokenLogprob]:
    return [_core.TokenLogprob(token, logprob, top) for token, logprob, top in entries]


class _PipeLogHandler(logging.Handler):
    """Sends the child's log records to the parent, which logs them under its own logger."""

    def __init__(self, send: Callable[[tuple[Any, ...]], None]) -> None:
        super().__init__()
        self._send = send

    def emit(self, record: logging.LogRecord) -> None:
        with contextlib.suppress(OSError, ValueError):  # the parent is gone: nobody to tell
            self._send(("log", record.levelno, record.getMessage()))


@dataclass(frozen=True, slots=True)
class Load:
    """What the child loads: ``LlamaPool(path, pool_size, max_queue=..., config=...)``."""

    path: str
    pool_size: int
    max_queue: int
    config: LlamaConfig


def main() -> None:
    """The child's ``main``: its end of the socket pair is the file descriptor in argv[1]."""
    conn = Connection(int(sys.argv[1]))
    try:
        load, level = conn.recv()
    except EOFError:
        return
    serve(conn, load, level)


def serve(conn: Connection, load: Load, level: int) -> None:
    """The child: load the pool, then serve the parent's requests until it closes the pipe."""
    from llama_cpp import _logging  # imported here: the parent does not need them
    from llama_cpp.pool import LlamaPool

    send_lock = threading.Lock()

    def send(message: tuple[Any, ...]) -> None:
        with send_lock:
            conn.send(message)

    logger = logging.getLogger("llama_cpp")
    logger.setLevel(level)
    logger.propagate = False
    logger.addHandler(_PipeLogHandler(send))
    _logging.set_native_log_level(level)
    try:
        pool = LlamaPool(load.path, load.pool_size, max_queue=load.max_queue, config=load.config)
    except Exception as error:  # reported to the parent, which raises it
        send(("failed", type(error).__name__, str(error)))
        return
    streams: dict[int, GenerationStream] = {}

    def relay(rid: int, stream: GenerationStream) -> None:
        try:
            while (chunk := stream.next()) is not None:
                send(("chunk", rid, chunk.text, list(chunk.tokens), logprobs_out(chunk.logprobs)))
            end = (
                stream.finish_reason,
                stream.stop_sequence,
                stream.queue_seconds,
                stream.n_prompt,
                stream.n_reused,
                logprobs_out(stream.prompt_logprobs),
            )
            send(("end", rid, *end))
        except Exception as error:
            send(("error", rid, type(error).__name__, str(error)))
        finally:
            stream.close()
            streams.pop(rid, None)

    try:
        send(("ready", pool.n_ctx()))
        while True:
            try:
                message = conn.recv()
            except EOFError:  # the parent is gone
                break
            if message[0] == "submit":
                _, rid, tokens, sampler, options = message
                try:
                    request = _child_request(tokens, sampler, options)
                    stream = pool.submit_request(request)
                except Exception as error:
                    send(("error", rid, type(error).__name__, str(error)))
                    continue
                streams[rid] = stream
                threading.Thread(
                    target=relay, args=(rid, stream), name=f"isolated-{rid}", daemon=True
                ).start()
            elif message[0] == "cancel":
                if (running := streams.get(message[1])) is not None:
                    running.cancel()
            elif message[0] == "query":
                # Always answered (None if it fails): a monitoring call must neither end this
                # process, and with it every request running here, nor leave the parent waiting.
                _, rid, what = message
                answer: object = None
                try:
                    if what == "stats":
                        stats = pool.stats()
                        answer = {f: getattr(stats, f) for f in PoolStats.__dataclass_fields__}
                    elif what == "memory":
                        answer = pool.memory_breakdown()
                except Exception:
                    _log.exception("the %s query failed", what)
                send(("reply", rid, answer))
            elif message[0] == "close":
                break
    finally:
        pool.close()


def _child_request(tokens: list[int], sampler: dict[str, Any], options: dict[str, Any]) -> Request:
    native_sampler = _core.SamplerConfig()
    for name, value in sampler.items():
        setattr(native_sampler, name, value)
    native_options = _core.GenerateOptions()
    if options.pop("cancelled"):
        native_options.cancellation.cancel()
    for name, value in options.items():
        setattr(native_options, name, value)
    return Request(tokens, native_sampler, native_options)
