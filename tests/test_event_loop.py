"""The event loop stays responsive while requests are prepared and streamed: everything but
handing results over runs in worker threads, and a stream's worker stays a bounded number
of chunks ahead of its reader."""

from __future__ import annotations

import asyncio
import gc
import json
import threading
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest

from conftest import FrontEnd
from llama_cpp import Cancellation, InvalidArgumentError, Llama, LlamaPool, SamplingParams, _async

WEATHER = {
    "type": "function",
    "function": {
        "name": "get_weather",
        "description": "The weather in a city.",
        "parameters": {"type": "object", "properties": {"city": {"type": "string"}}, "required": ["city"]},
    },
}
PERSON = {
    "type": "object",
    "properties": {"name": {"type": "string"}, "age": {"type": "integer"}},
    "required": ["name", "age"],
}
ASK = [{"role": "user", "content": "What is the weather in Paris? Answer as a tool call."}]
DESCRIBE = [{"role": "user", "content": "Describe a person as JSON."}]
REQUESTS: list[tuple[list[dict[str, str]], dict[str, Any]]] = [
    (ASK, {"tools": [WEATHER], "tool_choice": "required"}),
    (DESCRIBE, {"response_format": {"type": "json_schema", "json_schema": {"name": "p", "schema": PERSON}}}),
    (ASK, {"tools": [WEATHER], "tool_choice": {"type": "function", "function": {"name": "get_weather"}}}),
    (DESCRIBE, {"response_format": {"type": "json_object", "schema": PERSON}}),
]
#: The issue's goal: no tick of the loop delayed by more than this.
MAX_LAG = 0.020
GREEDY = SamplingParams.greedy()
TICK = 0.002
#: Runs in which the wall-clock goal may be met (a loaded machine can delay any tick).
ATTEMPTS = 3


@dataclass
class Stall:
    """The worst tick of the loop: its delay beyond the sleep (wall clock), and the CPU time
    the loop's own thread spent in one tick (what work on the loop costs it, whatever the
    machine's load: another process that takes the CPU adds to the first, never to this)."""

    wall: float = 0.0
    loop_cpu: float = 0.0


async def _worst_lag(done: asyncio.Event) -> Stall:
    """The worst tick of a short sleep on the loop until ``done``."""
    loop = asyncio.get_running_loop()
    worst = Stall()
    while not done.is_set():
        before, cpu = loop.time(), time.thread_time()
        await asyncio.sleep(TICK)
        worst.wall = max(worst.wall, loop.time() - before - TICK)
        worst.loop_cpu = max(worst.loop_cpu, time.thread_time() - cpu)
    return worst


async def _streamed_chats(front: FrontEnd) -> tuple[Stall, list[dict[str, Any]]]:
    done = asyncio.Event()
    lag = asyncio.create_task(_worst_lag(done))
    await asyncio.sleep(0)  # the ticker runs from before the first request is prepared

    async def one(messages: list[dict[str, str]], kwargs: dict[str, Any]) -> dict[str, Any]:
        stream = await front.create_chat_completion_async(
            messages, stream=True, max_tokens=48, temperature=0.0, **kwargs
        )
        content, calls = "", ""
        async for chunk in stream:
            delta = chunk["choices"][0]["delta"]
            content += delta.get("content") or ""
            for call in delta.get("tool_calls") or []:
                calls += call["function"].get("arguments") or ""
        return {"content": content, "arguments": calls}

    try:
        answers = await asyncio.gather(*(one(m, k) for m, k in REQUESTS))
    finally:
        done.set()
    return await lag, answers


@pytest.fixture(params=["llama", "pool"])
def gemma_front(request: pytest.FixtureRequest, default_model_path: Path) -> Iterator[FrontEnd]:
    front: FrontEnd
    if request.param == "llama":
        front = Llama(default_model_path, n_ctx=1024, verbose=False)
    else:
        front = LlamaPool(default_model_path, pool_size=4, n_ctx=1024, verbose=False)
    with front:
        yield front


@pytest.fixture
def frozen_heap() -> Iterator[None]:
    """The objects that exist now (the whole test session's) out of the garbage collector's
    reach while the test runs: a full collection that a tick of the loop happens to trigger
    would walk them all (hundreds of ms of CPU late in the suite), which is the size of the
    test process's heap, not work of ours on the loop. Objects the test creates are still
    collected."""
    gc.collect()
    gc.freeze()
    try:
        yield
    finally:
        gc.unfreeze()


@pytest.mark.timeout(300)
@pytest.mark.usefixtures("frozen_heap")
def test_streamed_chats_with_tools_and_schemas_never_stall_the_loop(gemma_front: FrontEnd) -> None:
    stalls = []
    for _ in range(ATTEMPTS):
        stall, answers = asyncio.run(_streamed_chats(gemma_front))
        # The answers are real: tool calls and JSON documents, whole.
        for (_, kwargs), answer in zip(REQUESTS, answers, strict=True):
            if "tools" in kwargs:
                assert json.loads(answer["arguments"]).keys() == {"city"}
            else:
                assert json.loads(answer["content"]).keys() == {"name", "age"}
        stalls.append(stall)
        if stall.wall < MAX_LAG and stall.loop_cpu < MAX_LAG:
            return
    # The goal must hold in one of ATTEMPTS runs, so that only a stall of ours fails every
    # time. The wall-clock delay also counts other processes taking the CPU; the loop thread's
    # own CPU per tick does not, yet a run now and then shows one tick of 25-30 ms of CPU on a
    # loaded machine (not the garbage collector: the heap is frozen; cause not found), which
    # one run alone must not fail on.
    raise AssertionError(
        "the event loop stalled: "
        + ", ".join(f"{s.wall * 1000:.1f} ms ({s.loop_cpu * 1000:.1f} ms of its CPU)" for s in stalls)
    )


def test_preparation_errors_are_raised_by_the_await(front: FrontEnd) -> None:
    async def main() -> None:
        with pytest.raises(InvalidArgumentError, match="messages is empty"):
            await front.create_chat_completion_async([], stream=True)
        with pytest.raises(TypeError, match="temprature"):
            await front.create_completion_async("a", stream=True, temprature=0.0)

    asyncio.run(main())


@pytest.mark.timeout(60)
def test_a_slow_reader_holds_the_generation_back(front: FrontEnd) -> None:
    """Backpressure: the worker runs at most STREAM_BUFFER chunks ahead of the reader."""
    limit = _async.STREAM_BUFFER + 2  # one read, a full buffer, one waiting for room
    produced = 0
    full = threading.Event()
    overrun = threading.Event()

    def counting(cancellation: Cancellation) -> Iterator[str]:
        nonlocal produced
        pieces = front.generate_stream("a", max_tokens=200, sampling=GREEDY, cancellation=cancellation)
        for piece in pieces:
            produced += 1
            if produced == limit:
                full.set()
            if produced > limit:
                overrun.set()
            yield piece

    async def main() -> str:
        stream = await _async.stream(counting)
        assert await anext(stream) == "b"
        assert await asyncio.to_thread(full.wait, 30)
        # Nothing is read now: the worker must stay blocked. Waiting can only hide a fault
        # on a slow machine, never invent one.
        assert not await asyncio.to_thread(overrun.wait, 0.5)
        return "b" + "".join([piece async for piece in stream])

    # Nothing was lost while the worker waited (the pool's engine kept decoding meanwhile:
    # its stream then hands over several tokens per chunk).
    assert asyncio.run(main()) == front.generate("a", max_tokens=200, sampling=GREEDY)
