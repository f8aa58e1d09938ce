"""One Llama and one LlamaPool shared by many threads and asyncio tasks, with cancellation at
random and close() racing in: every call ends in its exact result or a typed error, nothing
crashes or hangs, and no thread outlives the run.

Interference shows as a wrong answer: prompts are lowercase letters, after which the tiny model
greedily cycles through the alphabet, so every finished generation and every piece read before
a stop must be exactly (a prefix of) what the same prompt gives alone.
"""

from __future__ import annotations

import asyncio
import random
import string
import threading
from collections import Counter
from collections.abc import Callable
from pathlib import Path

import pytest

from llama_cpp import (
    Cancellation,
    ClosedError,
    ContextBusyError,
    GenerationCancelled,
    Llama,
    LlamaPool,
    PoolBusyError,
    SamplingParams,
)
from llama_cpp.frontend import FrontEnd
from llama_cpp.testing.soak import settled_usage

GREEDY = SamplingParams.greedy()
MAX_TOKENS = 24
#: What a shared front end may answer instead of a result: it was closed, the call was
#: cancelled, a stream held the context past its timeout, a pool's queue was full.
TYPED = (ClosedError, GenerationCancelled, ContextBusyError, PoolBusyError)
THREADS = 8
OPS_PER_THREAD = 12
TASKS = 48


def expected_text(prompt: str, n: int) -> str:
    """The tiny model's greedy answer: the alphabet, cycling, from the prompt's last letter."""
    start = string.ascii_lowercase.index(prompt[-1]) + 1
    return "".join(string.ascii_lowercase[(start + i) % 26] for i in range(n))


def open_llama(path: Path) -> Llama:
    return Llama(path, n_ctx=256, n_batch=64, verbose=False)


def open_pool(path: Path) -> LlamaPool:
    # 3 slots and 24 places in the queue: 8 threads never fill it, 48 tasks at once do.
    return LlamaPool(path, 3, max_queue=24, n_ctx=128, n_batch=64, verbose=False)


FRONT_ENDS: dict[str, Callable[[Path], Llama | LlamaPool]] = {"llama": open_llama, "pool": open_pool}


class Outcomes:
    """What the calls of one run ended in, by kind, and anything that was not allowed."""

    def __init__(self) -> None:
        self.lock = threading.Lock()
        self.kinds: Counter[str] = Counter()
        self.wrong: list[str] = []

    def add(self, kind: str) -> None:
        with self.lock:
            self.kinds[kind] += 1

    def bad(self, what: str) -> None:
        with self.lock:
            self.wrong.append(what)


def one_call(frontend: FrontEnd, rng: random.Random, outcomes: Outcomes, live: list[Cancellation]) -> None:
    """A generation, a stream read to its end, or a stream stopped early (closed, or cancelled
    by its own reader); its cancellation is in ``live`` for the canceller thread too."""
    prompt = "".join(rng.choice(string.ascii_lowercase) for _ in range(rng.randint(1, 4)))
    n = rng.randint(1, MAX_TOKENS)
    cancellation = Cancellation()
    live.append(cancellation)
    how = rng.randrange(4)
    pieces: list[str] = []
    try:
        if how == 0:
            text = frontend.generate(prompt, max_tokens=n, sampling=GREEDY, cancellation=cancellation)
            if text != expected_text(prompt, n):
                outcomes.bad(f"generate({prompt!r}, {n}) -> {text!r}")
            outcomes.add("result")
            return
        stream = frontend.generate_stream(prompt, max_tokens=n, sampling=GREEDY, cancellation=cancellation)
        stop_after = rng.randint(0, n) if how > 1 else n + 1
        for piece in stream:
            pieces.append(piece)
            if len(pieces) == stop_after:
                if how == 2:
                    stream.close()
                    break
                cancellation.cancel()
        if "".join(pieces) != expected_text(prompt, n)[: len("".join(pieces))]:
            outcomes.bad(f"stream({prompt!r}, {n}) -> {pieces!r}")
        outcomes.add("result" if how == 1 else "stopped")
    except TYPED as error:
        if "".join(pieces) != expected_text(prompt, n)[: len("".join(pieces))]:
            outcomes.bad(f"stream({prompt!r}, {n}) -> {pieces!r} then {error!r}")
        outcomes.add(type(error).__name__)
    except BaseException as error:
        outcomes.bad(f"{prompt!r}: {error!r}")


@pytest.mark.timeout(120)
@pytest.mark.parametrize("kind", ["llama", "pool"])
@pytest.mark.parametrize("seed", [1, 2])
def test_threads_share_one_front_end_with_cancellation_and_close_racing_in(
    tiny_model_path: Path, kind: str, seed: int
) -> None:
    baseline = settled_usage().threads
    rng = random.Random(seed)
    outcomes = Outcomes()
    live: list[Cancellation] = []
    frontend = FRONT_ENDS[kind](tiny_model_path)
    # The first calls of every thread run before close() can land: there are results to check.
    close_after = THREADS * OPS_PER_THREAD // 2 + rng.randint(0, THREADS * OPS_PER_THREAD // 4)
    calls = threading.Semaphore(0)
    seeds = [rng.randrange(1 << 30) for _ in range(THREADS)]

    def worker(i: int) -> None:
        own = random.Random(seeds[i])
        for _ in range(OPS_PER_THREAD):
            one_call(frontend, own, outcomes, live)
            calls.release()

    done = threading.Event()

    def canceller() -> None:
        own = random.Random(seed)
        while not done.wait(own.uniform(0.0, 0.1)):
            if live:
                own.choice(live).cancel()

    threads = [threading.Thread(target=worker, args=(i,), name=f"stress-{i}") for i in range(THREADS)]
    threads.append(threading.Thread(target=canceller, name="stress-canceller"))
    for thread in threads:
        thread.start()
    for _ in range(close_after):
        assert calls.acquire(timeout=60), "the calls stopped progressing"
    frontend.close()
    for thread in threads[:-1]:
        thread.join(60)
    done.set()
    threads[-1].join(60)
    assert not any(thread.is_alive() for thread in threads), "a thread hung"

    assert outcomes.wrong == []
    assert sum(outcomes.kinds.values()) == THREADS * OPS_PER_THREAD
    assert outcomes.kinds["result"] > 0, outcomes.kinds
    assert outcomes.kinds["ClosedError"] > 0, outcomes.kinds  # the calls after close()
    with pytest.raises(ClosedError):
        frontend.generate("a", max_tokens=1)
    assert settled_usage(baseline).threads <= baseline


async def one_task(frontend: FrontEnd, rng: random.Random) -> str:
    """An awaited generation or an async stream read part way (left with aclose); returns
    what it checked, raises what the call raised."""
    prompt = "".join(rng.choice(string.ascii_lowercase) for _ in range(rng.randint(1, 4)))
    n = rng.randint(1, MAX_TOKENS)
    if rng.random() < 0.5:
        text = await frontend.generate_async(prompt, max_tokens=n, sampling=GREEDY)
        assert text == expected_text(prompt, n), (prompt, n, text)
        return "result"
    stream = await frontend.generate_stream_async(prompt, max_tokens=n, sampling=GREEDY)
    pieces = []
    stop_after = rng.randint(1, n)
    try:
        async for piece in stream:
            pieces.append(piece)
            if len(pieces) == stop_after:
                break
    finally:
        await stream.aclose()  # type: ignore[attr-defined]  # an AsyncStream
        text = "".join(pieces)
        assert text == expected_text(prompt, n)[: len(text)], (prompt, n, pieces)
    return "stopped"


@pytest.mark.timeout(120)
@pytest.mark.parametrize("kind", ["llama", "pool"])
def test_asyncio_tasks_share_one_front_end_with_cancellation_and_close_racing_in(
    tiny_model_path: Path, kind: str
) -> None:
    baseline = settled_usage().threads
    frontend = FRONT_ENDS[kind](tiny_model_path)
    rng = random.Random(7)

    async def main() -> Counter[str]:
        tasks = [
            asyncio.create_task(one_task(frontend, random.Random(rng.randrange(1 << 30))))
            for _ in range(TASKS)
        ]
        for task in rng.sample(tasks, TASKS // 3):
            await asyncio.sleep(rng.uniform(0.0, 0.01))
            task.cancel()
        # close() lands once six tasks ended with their answer checked.
        pending: set[asyncio.Task[str]] = set(tasks)
        while pending and sum(t.done() and not t.cancelled() and not t.exception() for t in tasks) < 6:
            _, pending = await asyncio.wait(pending, timeout=60, return_when=asyncio.FIRST_COMPLETED)
        await asyncio.to_thread(frontend.close)
        results = await asyncio.wait_for(asyncio.gather(*tasks, return_exceptions=True), 60)
        kinds: Counter[str] = Counter()
        for result in results:
            if isinstance(result, (asyncio.CancelledError, *TYPED)):
                kinds[type(result).__name__] += 1
            elif isinstance(result, BaseException):
                raise result  # a wrong answer (AssertionError) or an untyped error
            else:
                kinds[result] += 1
        return kinds

    kinds = asyncio.run(main())
    assert sum(kinds.values()) == TASKS
    assert kinds["CancelledError"] > 0, kinds
    assert kinds["result"] + kinds["stopped"] > 0, kinds
    with pytest.raises(ClosedError):
        frontend.generate("a", max_tokens=1)
    # The worker threads end at their stream's next token once cancelled or closed.
    assert settled_usage(baseline).threads <= baseline
