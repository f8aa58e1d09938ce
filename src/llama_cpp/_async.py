"""Async twins: the synchronous calls, run off the event loop.

Everything a call does runs in a worker thread (preparing the request: template, tokens,
grammar; waiting for the context or a pool slot; decoding) and hands its result, or each
streamed item, to the loop with ``call_soon_threadsafe``; the loop never blocks and never
polls. A stream's worker is at most :data:`STREAM_BUFFER` items ahead of its consumer: a
slow reader holds the generation back instead of filling memory (backpressure).
Cancelling the awaiting task, or leaving an ``async for`` early, trips the call's
:class:`llama_cpp._core.Cancellation`, which stops the C++ loop at its next token or inside
``llama_decode`` (through the abort callback).
"""

from __future__ import annotations

import asyncio
import threading
from collections import deque
from collections.abc import AsyncIterator, Callable, Iterator
from dataclasses import dataclass
from typing import Generic, TypeVar

from llama_cpp import _core

T = TypeVar("T")

#: Items a stream's worker thread may produce ahead of the consumer.
STREAM_BUFFER = 16
#: Seconds between checks, while a worker waits for room, that its event loop still runs.
_ORPHAN_CHECK = 1.0


@dataclass(frozen=True, slots=True)
class _Failure:
    error: BaseException


class _Done:
    pass


_DONE = _Done()


def _deliver(loop: asyncio.AbstractEventLoop, put: Callable[[object], None], item: object) -> bool:
    """Hand ``item`` to the loop; False once the loop is gone (the consumer went away)."""
    try:
        loop.call_soon_threadsafe(put, item)
    except RuntimeError:  # the event loop is closed
        return False
    return True


def _settle(future: asyncio.Future[T], outcome: object) -> None:
    if future.done():  # cancelled meanwhile
        return
    if isinstance(outcome, _Failure):
        future.set_exception(outcome.error)
    else:
        future.set_result(outcome)  # type: ignore[arg-type]  # T, by construction


def _thread(target: Callable[[], None], name: str) -> None:
    # Not a daemon: the interpreter waits for it at exit instead of killing it inside C++
    # (a cancelled generation ends at its next token).
    threading.Thread(target=target, name=name).start()


async def call(fn: Callable[[_core.Cancellation], T]) -> T:
    """Await ``fn(cancellation)`` run in a worker thread; cancelling the await cancels it."""
    cancellation = _core.Cancellation()
    loop = asyncio.get_running_loop()
    future: asyncio.Future[T] = loop.create_future()
    pending = [fn]

    def work() -> None:
        # The call (and the model it holds) is dropped before the result is handed over, so
        # nothing of it outlives the await, not even in this thread's last moments.
        task = pending.pop()
        try:
            outcome: object = task(cancellation)
        except BaseException as error:
            outcome = _Failure(error)
        del task
        _deliver(loop, lambda o: _settle(future, o), outcome)

    _thread(work, "llama-cpp-async")
    try:
        return await future
    except asyncio.CancelledError:
        cancellation.cancel()
        raise


class _Channel:
    """What a stream's worker and its reader share. The worker holds only this, never the
    :class:`AsyncStream`, so that a reader that drops its stream lets it be collected."""

    def __init__(
        self, loop: asyncio.AbstractEventLoop, cancellation: _core.Cancellation, capacity: int
    ) -> None:
        self.loop = loop
        self.cancellation = cancellation
        self.items: deque[object] = deque()
        self.ready = asyncio.Event()
        self._credits = threading.Semaphore(capacity)
        self._capacity = capacity

    def put(self, item: object) -> None:  # on the loop
        self.items.append(item)
        self.ready.set()

    def taken(self) -> None:  # on the loop
        self._credits.release()

    def stop(self) -> None:  # anywhere
        if not self.cancellation.cancelled:
            self.cancellation.cancel()
        # Wake a worker waiting for room, so that it sees the cancellation and ends.
        self._credits.release(self._capacity + 1)

    def _wait_for_room(self) -> bool:
        """Block until the reader makes room; False once it went away. A reader that stops
        reading cancels (aclose, break, garbage collection) and wakes this at once; the timed
        wait only notices a loop closed under a stream nobody released."""
        while not self._credits.acquire(timeout=_ORPHAN_CHECK):
            if self.loop.is_closed():
                self.cancellation.cancel()
                return False
        return not self.cancellation.cancelled

    def produce(self, items: Iterator[object]) -> None:
        """Run in the worker thread: hand each item over, waiting for room."""
        try:
            for item in items:
                if not self._wait_for_room() or not _deliver(self.loop, self.put, item):
                    return
        except BaseException as error:
            _deliver(self.loop, self.put, _Failure(error))
        else:
            _deliver(self.loop, self.put, _DONE)
        finally:
            close = getattr(items, "close", None)
            if close is not None:
                close()


class AsyncStream(AsyncIterator[T], Generic[T]):
    """The items of a synchronous stream, produced by a worker thread, read with ``async for``.

    The worker stays at most ``STREAM_BUFFER`` items ahead. Leaving the iteration early
    (break, an exception, task cancellation), :meth:`aclose`, or dropping the object cancels
    the generation; the worker then closes the synchronous stream.
    """

    def __init__(self, channel: _Channel) -> None:
        self._channel = channel
        self._finished = False

    def __aiter__(self) -> AsyncStream[T]:
        return self

    async def __anext__(self) -> T:
        if self._finished:
            raise StopAsyncIteration
        channel = self._channel
        try:
            while not channel.items:
                channel.ready.clear()
                await channel.ready.wait()
        except BaseException:
            await self.aclose()
            raise
        item = channel.items.popleft()
        if item is _DONE or isinstance(item, _Failure):
            self._finished = True
            if isinstance(item, _Failure):
                raise item.error
            raise StopAsyncIteration
        channel.taken()
        return item  # type: ignore[return-value]  # T, by construction

    async def aclose(self) -> None:
        """Stop the generation (idempotent); the worker closes the stream."""
        if not self._finished:
            self._finished = True
            self._channel.stop()

    def __del__(self) -> None:
        if not self._finished:
            self._channel.stop()


async def stream(
    start: Callable[[_core.Cancellation], Iterator[T]], capacity: int = STREAM_BUFFER
) -> AsyncStream[T]:
    """Start ``start(cancellation)`` (which prepares and submits a request and returns its
    synchronous stream) in a worker thread, and iterate it there.

    Awaiting this returns once the request is started, raising what preparing it raised
    (TypeError, InvalidArgumentError, PoolBusyError, ...); the items follow through the
    returned :class:`AsyncStream`.
    """
    cancellation = _core.Cancellation()
    loop = asyncio.get_running_loop()
    started: asyncio.Future[None] = loop.create_future()
    channel = _Channel(loop, cancellation, capacity)
    pending = [start]

    def work() -> None:
        begin = pending.pop()
        try:
            items = begin(cancellation)
        except BaseException as error:
            _deliver(loop, lambda o: _settle(started, o), _Failure(error))
            return
        del begin
        _deliver(loop, lambda o: _settle(started, o), None)
        channel.produce(items)

    _thread(work, "llama-cpp-stream")
    try:
        await started
    except BaseException:
        channel.stop()
        raise
    return AsyncStream(channel)
