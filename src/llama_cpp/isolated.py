"""`IsolatedPool`: a :class:`~llama_cpp.LlamaPool` in a supervised child process.

llama.cpp aborts the whole process on errors it cannot return, the RPC client first among
them: a worker that dies mid-decode ends its client with ``abort()``. An isolated pool
keeps that process apart from the application. Requests are prepared here, by the same
:class:`~llama_cpp.request.RequestBuilder` as every front end (over a vocabulary-only copy of
the model: tokenizer, chat templates, grammars), and only the prepared request (tokens,
sampler settings, generation options) crosses to the child, which runs a ``LlamaPool`` and
streams chunks back as they are decoded. When the child dies, every request in flight fails
with :class:`WorkerLostError`, and a supervisor thread starts a new child once every RPC
worker of the model answers a TCP probe again (retrying with backoff). Requests made while
it reloads wait for it, up to ``ready_timeout`` seconds.

The child is a fresh interpreter (``python -c``: nothing of the parent's ``__main__`` is
imported again); the two talk over a socket pair with :mod:`multiprocessing.connection`'s
framing (length-prefixed pickles of tuples):

* parent -> child: ``(load, log_level)`` first, then ``("submit", id, tokens, sampler,
  options)``, ``("cancel", id)``, ``("query", id, what)`` (``"stats"``: the pool's
  :class:`PoolStats` fields; ``"memory"``: its ``memory_breakdown()``), ``("close",)``;
* child -> parent: ``("ready", n_ctx)`` or ``("failed", error, message)`` once, then
  ``("chunk", id, text, tokens, logprobs)``, ``("end", id, finish_reason, stop_sequence,
  queue_seconds, n_prompt, n_reused, prompt_logprobs)``, ``("error", id, error, message)``,
  ``("reply", id, value)`` and ``("log", level, message)`` (the child's ``llama_cpp`` log,
  re-emitted here).

Python hooks (``logits_processor``, ``stopping_criteria``) cannot run in another process and
are refused; so are embeddings, LoRA adapters and ``profile_experts=True`` (the counters would
stay in the child; ``expert_stats()`` raises).
"""

from __future__ import annotations

import contextlib
import itertools
import logging
import os
import queue
import socket
import subprocess
import sys
import threading
import time
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, replace
from multiprocessing.connection import Connection
from typing import Any, Self, cast

from llama_cpp import _async, _core, errors
from llama_cpp._isolated_child import Load, Logprob, logprobs_in
from llama_cpp.cluster import rpc_endpoints, unreachable
from llama_cpp.completion_output import GenerationStream
from llama_cpp.config import LlamaConfig, resolve_config
from llama_cpp.embeddings import EmbeddingInput
from llama_cpp.errors import ExpertStatsUnavailableError, InvalidArgumentError, LlamaError, WorkerLostError
from llama_cpp.experts import ExpertStats
from llama_cpp.frontend import FrontEnd
from llama_cpp.llama_types import CreateEmbeddingResponse
from llama_cpp.params import SamplingParams
from llama_cpp.placement import MemoryBreakdown
from llama_cpp.request import Prompt, Request, RequestBuilder
from llama_cpp.results import PoolStats

__all__ = ["IsolatedPool", "WorkerLostError"]

_log = logging.getLogger("llama_cpp")

#: The sampler settings that cross to the child: every property of the native config.
_SAMPLER_FIELDS = tuple(n for n, v in vars(_core.SamplerConfig).items() if isinstance(v, property))
#: The generation options that cross (the cancellation is the child's own, tripped by "cancel").
_OPTION_FIELDS = ("max_tokens", "stop", "n_probs", "prompt_logprobs", "preserved_tokens")
#: Seconds between checks of a waiting reader's cancellation flag (a flag cannot wake it).
_CANCEL_CHECK = 0.05
#: Backoff of the supervisor between attempts to start a new child: first, factor, last.
_BACKOFF = (0.2, 2.0, 5.0)
#: Seconds a query (stats, memory) waits for the child's answer: the child answers between
#: decode steps, and one that does not return (a worker that stopped answering without
#: closing its connection) must not hold the caller, a metrics scrape, forever.
_QUERY_TIMEOUT = 10.0


def _error(name: str, message: str) -> LlamaError:
    """The library error named ``name`` (LlamaError for any other)."""
    kind = getattr(errors, name, LlamaError)
    return kind(message) if isinstance(kind, type) and issubclass(kind, LlamaError) else LlamaError(message)


# -- the parent ---------------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class _End:
    finish_reason: str
    stop_sequence: str | None
    queue_seconds: float | None
    n_prompt: int
    n_reused: int
    prompt_logprobs: list[Logprob]


class _RemoteStream:
    """A request running in the child, read chunk by chunk (a :class:`GenerationStream`).

    The reader thread of the :class:`_Child` puts the child's messages in :attr:`inbox`; a
    lost child puts a :class:`WorkerLostError`.
    """

    def __init__(self, child: _Child, rid: int, cancellation: _core.Cancellation) -> None:
        self.inbox: queue.SimpleQueue[_core.Chunk | _End | BaseException] = queue.SimpleQueue()
        self._child = child
        self._rid = rid
        self._cancellation = cancellation
        self._cancel_sent = False
        self._done = False
        self._tokens: list[int] = []
        self._end: _End | None = None

    def next(self) -> _core.Chunk | None:
        while not self._done:
            if self._cancel_sent or self._cancellation.cancelled:
                # As a pool's stream: once cancelled, next() raises; what the child decoded
                # meanwhile is dropped.
                self.cancel()
                self._finish()
                raise _core.GenerationCancelled("the generation was cancelled")
            try:
                item = self.inbox.get(timeout=_CANCEL_CHECK)
            except queue.Empty:
                continue
            if isinstance(item, _core.Chunk):
                self._tokens += item.tokens
                return item
            self._finish()
            if isinstance(item, BaseException):
                raise item
            self._end = item
        return None

    def cancel(self) -> None:
        if not self._cancel_sent and not self._done:
            self._cancel_sent = True
            with contextlib.suppress(WorkerLostError):  # a child that is gone runs nothing
                self._child.send(("cancel", self._rid))

    def close(self) -> None:
        if not self._done:
            self.cancel()
            self._finish()

    def _finish(self) -> None:
        self._done = True
        self._child.forget(self._rid)

    @property
    def finish_reason(self) -> str | None:
        return None if self._end is None else self._end.finish_reason

    @property
    def stop_sequence(self) -> str | None:
        return None if self._end is None else self._end.stop_sequence

    @property
    def queue_seconds(self) -> float | None:
        """The wait for a slot in the child's pool (known here once the request ended)."""
        return None if self._end is None else self._end.queue_seconds

    @property
    def tokens(self) -> list[int]:
        return list(self._tokens)

    @property
    def n_prompt(self) -> int:
        return 0 if self._end is None else self._end.n_prompt

    @property
    def n_reused(self) -> int:
        return 0 if self._end is None else self._end.n_reused

    @property
    def prompt_logprobs(self) -> list[_core.TokenLogprob]:
        return [] if self._end is None else logprobs_in(self._end.prompt_logprobs)


class _Child:
    """One child process and the thread that reads its pipe.

    Raises (constructor): what the child's ``LlamaPool`` raised while loading, or
    WorkerLostError if it died before it was ready.
    """

    def __init__(self, load: Load) -> None:
        ours, theirs = socket.socketpair()
        self._conn = Connection(ours.detach())
        self._send_lock = threading.Lock()
        self._lock = threading.Lock()  # guards _streams and _replies
        self._streams: dict[int, _RemoteStream] = {}
        self._replies: dict[int, queue.SimpleQueue[object]] = {}
        self._ids = itertools.count()
        self.lost = threading.Event()
        self.closing = False  # set by close(): the end of the pipe is then no loss
        with theirs:
            self.process = subprocess.Popen(
                [
                    sys.executable,
                    "-c",
                    "from llama_cpp._isolated_child import main; main()",
                    str(theirs.fileno()),
                ],
                pass_fds=(theirs.fileno(),),
                stdin=subprocess.DEVNULL,
            )
        # The child's end now lives in the child only: reading here ends (EOF) when it dies.
        try:
            self.send((load, _log.getEffectiveLevel()))
            first = self._receive_until_ready()
        except BaseException:
            self.kill()
            self._conn.close()
            raise
        self.n_ctx: int = first[1]
        self._reader = threading.Thread(target=self._read, name="llama-cpp-isolated-reader", daemon=True)
        self._reader.start()

    def _receive_until_ready(self) -> tuple[Any, ...]:
        while True:
            try:
                message = self._conn.recv()
            except EOFError:
                self._wait(5)
                raise WorkerLostError(
                    f"the model's process died while loading (exit code {self.process.returncode})"
                ) from None
            if message[0] == "log":
                _log.log(message[1], "%s", message[2])
            elif message[0] == "failed":
                self._wait(5)
                raise _error(message[1], message[2])
            else:
                return tuple(message)

    def _read(self) -> None:
        while True:
            try:
                message = self._conn.recv()
            except (EOFError, OSError):
                break
            kind = message[0]
            if kind == "log":
                _log.log(message[1], "%s", message[2])
                continue
            with self._lock:
                stream = self._streams.get(message[1])
                reply = self._replies.pop(message[1], None) if kind == "reply" else None
            if reply is not None:
                reply.put(message[2])
            elif stream is None:
                continue  # a stream closed early: the rest of its messages are dropped
            elif kind == "chunk":
                stream.inbox.put(_core.Chunk(message[2], message[3], logprobs_in(message[4])))
            elif kind == "end":
                stream.inbox.put(_End(*message[2:]))
            elif kind == "error":
                stream.inbox.put(_error(message[2], message[3]))
        self._wait(5)
        lost: LlamaError = WorkerLostError(
            f"the model's process died (exit code {self.process.returncode}): a request in flight was lost; "
            "see the llama_cpp log for why (an RPC worker that went away aborts it)"
        )
        if self.closing:
            lost = _core.ClosedError("the pool is closed")
        with self._lock:
            streams, self._streams = self._streams, {}
            replies, self._replies = self._replies, {}
            self.lost.set()
        for stream in streams.values():
            stream.inbox.put(lost)
        for reply in replies.values():
            reply.put(None)

    def send(self, message: tuple[Any, ...]) -> None:
        """Send ``message`` to the child.

        Raises:
            WorkerLostError: The child is gone.
        """
        try:
            with self._send_lock:
                self._conn.send(message)
        except (OSError, ValueError) as error:
            raise WorkerLostError("the model's process is gone") from error

    def submit(self, request: Request) -> _RemoteStream:
        """Start ``request`` in the child.

        Raises:
            WorkerLostError: The child is gone.
        """
        rid = next(self._ids)
        stream = _RemoteStream(self, rid, request.options.cancellation)
        with self._lock:
            if self.lost.is_set():
                raise WorkerLostError("the model's process is gone")
            self._streams[rid] = stream
        sampler = {name: getattr(request.sampling, name) for name in _SAMPLER_FIELDS}
        options = {name: getattr(request.options, name) for name in _OPTION_FIELDS}
        options["cancelled"] = request.options.cancellation.cancelled  # as a pool treats one cancelled before
        try:
            self.send(("submit", rid, list(request.tokens), sampler, options))
        except WorkerLostError:
            self.forget(rid)
            raise
        return stream

    def query(self, what: str) -> object:
        """The child pool's answer to ``what`` (see the module docstring); None when the
        child is gone, the query failed there, or no answer came within
        :data:`_QUERY_TIMEOUT` seconds (a child stuck in a decode that does not return)."""
        rid = next(self._ids)
        reply: queue.SimpleQueue[object] = queue.SimpleQueue()
        with self._lock:
            if self.lost.is_set():
                return None
            self._replies[rid] = reply
        try:
            self.send(("query", rid, what))
        except WorkerLostError:
            return None
        try:
            return reply.get(timeout=_QUERY_TIMEOUT)
        except queue.Empty:
            self.forget_reply(rid)
            return None

    def forget_reply(self, rid: int) -> None:
        with self._lock:
            self._replies.pop(rid, None)

    def forget(self, rid: int) -> None:
        with self._lock:
            self._streams.pop(rid, None)

    def close(self, timeout: float = 10.0) -> None:
        """Ask the child to close its pool and exit; kill it if it does not within ``timeout``.
        Requests still running fail with ClosedError."""
        self.closing = True
        with contextlib.suppress(WorkerLostError):
            self.send(("close",))
        self._wait(timeout)
        self.kill()
        self._conn.close()

    def kill(self) -> None:
        if self.process.poll() is None:
            self.process.kill()
            self.process.wait()

    def _wait(self, timeout: float) -> None:
        with contextlib.suppress(subprocess.TimeoutExpired):
            self.process.wait(timeout)


class IsolatedPool(FrontEnd):
    """:class:`~llama_cpp.LlamaPool`'s request API, with the model in a supervised child
    process: a crash of llama.cpp (an RPC worker lost mid-generation) fails the requests in
    flight with :class:`WorkerLostError` instead of ending this process, and the model is
    loaded again once its RPC workers answer.

    Args:
        model_path: Path to a GGUF file.
        pool_size: Requests decoded concurrently (the child pool's sequences).
        max_queue: Requests that may wait for a free sequence in the child.
        config: The model and context settings as a :class:`LlamaConfig` (its
            ``progress_callback`` is not called: the weights load in the child).
        ready_timeout: Seconds a request waits for the model while it is being reloaded
            before raising :class:`WorkerLostError`.
        restart: Reload the model after its process died (False: stay down; every later
            request raises :class:`WorkerLostError`).
        **options: :class:`~llama_cpp.Llama`'s keyword arguments (set over ``config``).

    Attributes:
        restarts: How many times the model's process was started again after it died.

    Raises:
        TypeError: An unknown keyword argument.
        ModelLoadError: The file is missing or not a loadable GGUF model.
        InvalidArgumentError: An argument is out of range; ``lora_path``, ``embedding``,
            ``profile_experts=True``.
        LlamaError: An RPC worker cannot be reached.
        WorkerLostError: The child process died while loading the model.
    """

    def __init__(
        self,
        model_path: str | os.PathLike[str],
        pool_size: int = 4,
        *,
        max_queue: int = 64,
        config: LlamaConfig | None = None,
        ready_timeout: float = 30.0,
        restart: bool = True,
        **options: Any,
    ) -> None:
        config = resolve_config("IsolatedPool", config, options)
        if config.embedding or config.vocab_only:
            raise InvalidArgumentError(
                "an IsolatedPool generates text: embedding/vocab_only are not accepted"
            )
        if config.lora_path is not None:
            raise InvalidArgumentError("an IsolatedPool runs no LoRA adapters")
        if config.profile_experts:
            # The counters would live in the child, where nobody reads them, and the profiler
            # splits the graph after every MoE layer's router: a cost for nothing.
            raise InvalidArgumentError(
                "an IsolatedPool does not profile expert routing (its model runs in a child process): "
                "profile_experts=True is not accepted; use a LlamaPool"
            )
        if not ready_timeout > 0:
            raise InvalidArgumentError(f"ready_timeout must be > 0 seconds, got {ready_timeout!r}")
        if pool_size < 1:
            raise InvalidArgumentError(f"pool_size must be >= 1, got {pool_size}")
        self.model_path = os.fspath(model_path)
        self.pool_size = pool_size
        self.config = config
        self.ready_timeout = ready_timeout
        self._load = Load(self.model_path, pool_size, max_queue, replace(config, progress_callback=None))
        self._restart = restart
        self._closed = threading.Event()
        self._state = threading.Condition()  # guards _child and restarts; notified on a reload
        self.restarts = 0
        # The tokenizer, chat templates and grammars of the request path: the vocabulary only,
        # loaded here without the RPC workers (it cannot crash this process).
        vocab = replace(config, vocab_only=True, rpc_servers=None, n_gpu_layers=0, progress_callback=None)
        self._vocab = _core.Model(self.model_path, vocab.model_options())
        self._requests = RequestBuilder(self._vocab, config, self.model_path)
        try:
            self._child: _Child | None = _Child(self._load)
        except BaseException:
            self._requests.close()
            self._vocab.close()
            raise
        self._n_ctx = self._child.n_ctx
        threading.Thread(
            target=self._watch, args=(self._child,), name="llama-cpp-isolated-watch", daemon=True
        ).start()

    # -- supervision ----------------------------------------------------------------------

    def _watch(self, child: _Child) -> None:
        """Wait for ``child`` to die; then reload the model (unless closed)."""
        child.lost.wait()
        with self._state:
            if self._child is child:
                self._child = None
        if self._closed.is_set():
            return
        _log.error(
            "the isolated model's process died (exit code %s)%s",
            child.process.returncode,
            "; reloading it once its RPC workers answer" if self._restart else "",
        )
        if self._restart:
            self._reload()

    def _reload(self) -> None:
        delay, factor, longest = _BACKOFF
        while not self._closed.is_set():
            down = unreachable(self.config.rpc_servers, timeout=1.0)
            if not down:
                try:
                    child = _Child(self._load)
                except (LlamaError, OSError) as error:  # retried: the supervisor must not die
                    _log.warning("reloading the isolated model failed: %s", error)
                else:
                    with self._state:
                        if self._closed.is_set():
                            child.close()
                            return
                        self._child = child
                        self.restarts += 1
                        self._state.notify_all()
                    _log.warning("the isolated model is loaded again (restart %d)", self.restarts)
                    threading.Thread(
                        target=self._watch, args=(child,), name="llama-cpp-isolated-watch", daemon=True
                    ).start()
                    return
            else:
                _log.info("waiting for RPC workers %s", ", ".join(down))
            self._closed.wait(delay)
            delay = min(delay * factor, longest)

    def _live_child(self) -> _Child:
        """The running child, waiting up to ``ready_timeout`` for a reload.

        Raises:
            ClosedError: The pool is closed.
            WorkerLostError: No child is running within ``ready_timeout``.
        """
        deadline = time.monotonic() + self.ready_timeout
        with self._state:
            while True:
                if self._closed.is_set():
                    raise _core.ClosedError("the pool is closed")
                child = self._child
                if child is not None and not child.lost.is_set():
                    return child
                left = deadline - time.monotonic()
                if not self._restart or left <= 0:
                    raise WorkerLostError(
                        "the model's process is down"
                        + (f" and was not reloaded within {self.ready_timeout:g} s" if self._restart else "")
                        + f" (RPC workers: {', '.join(rpc_endpoints(self.config.rpc_servers)) or 'none'})"
                    )
                self._state.wait(min(left, 0.5))

    @property
    def alive(self) -> bool:
        """Whether the model's process is running now (False while it is reloaded)."""
        with self._state:
            return self._child is not None and not self._child.lost.is_set()

    @property
    def pid(self) -> int | None:
        """The process id of the model's process (None while there is none)."""
        with self._state:
            return None if self._child is None else self._child.process.pid

    # -- lifecycle ------------------------------------------------------------------------

    def close(self) -> None:
        """Stop the child (its unfinished requests fail with :class:`ClosedError`) and the
        supervisor, free the vocabulary. Idempotent."""
        with self._state:
            self._closed.set()
            child, self._child = self._child, None
            self._state.notify_all()
        if child is not None:
            child.close()
        self._requests.close()
        self._vocab.close()

    def __enter__(self) -> Self:
        return self

    def __exit__(self, *exc_info: object) -> None:
        self.close()

    async def __aenter__(self) -> Self:
        return self

    async def __aexit__(self, *exc_info: object) -> None:
        await _async.call(lambda _: self.close())

    def __repr__(self) -> str:
        return f"IsolatedPool({self.model_path!r}, pool_size={self.pool_size})"

    # -- facts ----------------------------------------------------------------------------

    def stats(self) -> PoolStats:
        """The child pool's slots, queue and counters (zeros, counters included, while no
        child runs: a reloaded model starts counting again)."""
        with self._state:
            child = self._child
        fields = child.query("stats") if child is not None else None
        if not isinstance(fields, dict):
            return PoolStats(self.pool_size, 0, 0, 0, 0, 0, 0, 0, (), 0.0)
        return PoolStats(**fields)

    def memory_breakdown(self) -> MemoryBreakdown:
        """The child pool's :meth:`LlamaPool.memory_breakdown` (llama.cpp's accounting by device).

        Raises:
            ClosedError: The pool is closed.
            WorkerLostError: No child runs now (the model is being reloaded).
        """
        with self._state:
            child = self._child
        if self._vocab.closed:
            raise _core.ClosedError("the pool is closed")
        breakdown = child.query("memory") if child is not None else None
        if breakdown is None:
            raise WorkerLostError("the model's process is not running (it is being reloaded)")
        return cast(MemoryBreakdown, breakdown)

    def expert_stats(self, *, reset: bool = False) -> ExpertStats:
        """Not available: an isolated pool does not profile expert routing (``profile_experts``
        is refused), its model running in another process. ``reset`` as :class:`LlamaPool`'s.

        Raises:
            ExpertStatsUnavailableError: Always.
        """
        raise ExpertStatsUnavailableError(
            "an isolated pool's model runs in a child process: its expert routing is not profiled"
        )

    def n_ctx(self) -> int:
        """The window of each sequence, in tokens."""
        return self._n_ctx

    @property
    def model(self) -> _core.Model:
        """The vocabulary-only copy of the model that prepares requests (tokenizer, chat
        templates, metadata); raises ClosedError once closed."""
        if self._vocab.closed:
            raise _core.ClosedError("the pool is closed")
        return self._vocab

    def warmup(self) -> None:
        """Run one short generation, so that the first request does not pay for setup."""
        self.generate([max(self._vocab.token_bos, 0)], max_tokens=1)

    async def warmup_async(self) -> None:
        """:meth:`warmup` off the event loop."""
        await _async.call(lambda _: self.warmup())

    def create_embedding(
        self,
        input: EmbeddingInput,
        model: str | None = None,
        *,
        cancellation: _core.Cancellation | None = None,
    ) -> CreateEmbeddingResponse:
        """Not served: an isolated pool generates text only.

        Raises:
            InvalidArgumentError: Always.
        """
        raise InvalidArgumentError("an IsolatedPool serves no embeddings (use a LlamaPool or Llama)")

    def submit(
        self,
        prompt: Prompt,
        *,
        max_tokens: int | None = 256,
        sampling: SamplingParams | None = None,
        stop: str | Sequence[str] | None = None,
        cancellation: _core.Cancellation | None = None,
    ) -> GenerationStream:
        """Start a generation and return its stream, read chunk by chunk with ``next()``
        (:meth:`LlamaPool.submit`'s, without ``wait`` and ``lora``).

        Raises:
            WorkerLostError: The model's process is down and was not reloaded in time.
            PoolBusyError: (from ``next()``) every slot of the child is busy and its queue full.
            ContextOverflowError: (from ``next()``) the prompt is longer than a sequence's window.
            ClosedError: The pool is closed.
        """
        request = self._requests.generation(
            prompt, max_tokens=max_tokens, sampling=sampling, stop=stop, cancellation=cancellation
        )
        return self._stream(request, {})

    # -- decoding (FrontEnd's request API runs on this) ------------------------------------

    def _stream(self, request: Request, run: Mapping[str, Any]) -> GenerationStream:
        if request.options.has_hooks:
            raise InvalidArgumentError(
                "logits_processor / stopping_criteria are Python hooks: they cannot run in an IsolatedPool's "
                "model process"
            )
        return self._live_child().submit(request)
