"""Async twins: the synchronous native core, run off the event loop.

A call runs in a worker thread and hands its result (or each streamed item) to the loop
with ``call_soon_threadsafe``; the loop never blocks and never polls. Cancelling the
awaiting task trips the generation's :class:`llama_cpp._core.Cancellation`, which stops the
C++ loop at its next token or inside ``llama_decode`` (through the abort callback).
"""

from __future__ import annotations

import asyncio
import threading
from collections.abc import AsyncIterator, Callable, Iterator
from dataclasses import dataclass
from typing import TypeVar

from llama_cpp import _core

T = TypeVar("T")


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


async def run(call: Callable[[], T], cancellation: _core.Cancellation) -> T:
    """Await ``call()`` run in a worker thread; cancelling the await cancels the generation."""
    loop = asyncio.get_running_loop()
    future: asyncio.Future[T] = loop.create_future()

    def settle(outcome: object) -> None:
        if future.done():  # cancelled meanwhile
            return
        if isinstance(outcome, _Failure):
            future.set_exception(outcome.error)
        else:
            future.set_result(outcome)  # type: ignore[arg-type]  # T, by construction

    pending = [call]

    def work() -> None:
        # The call (and the model it holds) is dropped before the result is handed over, so
        # nothing of it outlives the await, not even in this thread's last moments.
        task = pending.pop()
        try:
            outcome: object = task()
        except BaseException as error:
            outcome = _Failure(error)
        del task
        _deliver(loop, settle, outcome)

    # Not a daemon: the interpreter waits for it at exit instead of killing it inside C++
    # (a cancelled generation ends at its next token).
    threading.Thread(target=work, name="llama-cpp-async").start()
    try:
        return await future
    except asyncio.CancelledError:
        cancellation.cancel()
        raise


async def iterate(items: Iterator[T], cancellation: _core.Cancellation) -> AsyncIterator[T]:
    """Iterate ``items`` (a generator over a native stream) in a worker thread.

    Leaving the ``async for`` early (break, exception, task cancellation) cancels the
    generation and closes the iterator.
    """
    loop = asyncio.get_running_loop()
    queue: asyncio.Queue[object] = asyncio.Queue()

    source = [items]

    def produce() -> None:
        stream = source.pop()
        try:
            for item in stream:
                if cancellation.cancelled or not _deliver(loop, queue.put_nowait, item):
                    return
        except BaseException as error:
            _deliver(loop, queue.put_nowait, _Failure(error))
        else:
            _deliver(loop, queue.put_nowait, _DONE)
        finally:
            close = getattr(stream, "close", None)
            if close is not None:
                close()

    threading.Thread(target=produce, name="llama-cpp-stream").start()
    try:
        while True:
            item = await queue.get()
            if item is _DONE:
                return
            if isinstance(item, _Failure):
                raise item.error
            yield item  # type: ignore[misc]  # T, by construction
    finally:
        cancellation.cancel()
