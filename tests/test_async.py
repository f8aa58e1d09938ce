"""Async twins: same results as the sync API, the event loop stays free, cancellation stops C++."""

from __future__ import annotations

import asyncio
import time
from pathlib import Path

import pytest

from llama_cpp import Cancellation, GenerationCancelled, Llama, SamplingParams
from llama_cpp.testing import TinyModelSpec, write_tiny_llama

GREEDY = SamplingParams.greedy()


@pytest.fixture(scope="module")
def noisy_model(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A tiny model whose next-token distribution is spread out, so seeds matter."""
    return write_tiny_llama(
        tmp_path_factory.mktemp("noisy") / "noisy.gguf", TinyModelSpec(logit_scale=0.0, noise=1.0, seed=11)
    )


@pytest.mark.timeout(60)
def test_sync_and_async_agree_for_the_same_seed(noisy_model: Path) -> None:
    params = SamplingParams(temperature=1.0, top_k=0, top_p=1.0, min_p=0.0, seed=42)
    with Llama(noisy_model, n_ctx=256) as llm:
        sync_text = llm.generate("a", max_tokens=32, sampling=params)
        sync_chunks = llm.create_completion(
            "a", max_tokens=32, temperature=1.0, top_k=0, top_p=1.0, min_p=0.0, seed=42
        )

        async def main() -> tuple[str, str, str]:
            text = await llm.generate_async("a", max_tokens=32, sampling=params)
            streamed = "".join(
                [
                    piece
                    async for piece in await llm.generate_stream_async("a", max_tokens=32, sampling=params)
                ]
            )
            response = await llm.create_completion_async(
                "a", max_tokens=32, temperature=1.0, top_k=0, top_p=1.0, min_p=0.0, seed=42
            )
            return text, streamed, response["choices"][0]["text"]

        async_text, async_streamed, async_completion = asyncio.run(main())
    assert len(sync_text) > 0
    assert async_text == sync_text
    assert async_streamed == sync_text
    assert async_completion == sync_chunks["choices"][0]["text"] == sync_text


@pytest.mark.timeout(60)
def test_async_completion_stream_yields_chunk_dicts(tiny: Llama) -> None:
    async def main() -> list[str]:
        stream = await tiny.create_completion_async("A", max_tokens=50, temperature=0, stream=True)
        return [chunk["choices"][0]["text"] async for chunk in stream]

    assert asyncio.run(main()) == ["é", "😀", "世", "界", ""]


@pytest.mark.timeout(60)
def test_the_event_loop_keeps_running_during_generation(tiny_model_path: Path) -> None:
    with Llama(tiny_model_path, n_ctx=4096) as llm:

        async def main() -> tuple[int, int]:
            ticks = 0
            done = asyncio.Event()

            async def ticker() -> None:
                nonlocal ticks
                while not done.is_set():
                    ticks += 1
                    await asyncio.sleep(0.001)

            task = asyncio.create_task(ticker())
            text = await llm.generate_async("a", max_tokens=3000, sampling=GREEDY)
            done.set()
            await task
            return ticks, len(text)

        ticks, length = asyncio.run(main())
    assert length == 3000
    assert ticks > 5  # the loop ran while the C++ loop generated


@pytest.mark.timeout(60)
def test_cancelling_the_task_stops_the_cpp_loop(tiny_model_path: Path) -> None:
    with Llama(tiny_model_path, n_ctx=32768, n_batch=512) as llm:

        async def main() -> float:
            task = asyncio.create_task(llm.generate_async("a", max_tokens=None, sampling=GREEDY))
            await asyncio.sleep(0.2)
            task.cancel()
            with pytest.raises(asyncio.CancelledError):
                await task
            start = time.perf_counter()
            # The context lock is free again as soon as the C++ loop noticed the flag.
            await llm.generate_async("A", max_tokens=20, sampling=GREEDY)
            return time.perf_counter() - start

        waited = asyncio.run(main())
        assert waited < 2.0
        assert llm.generate("A", max_tokens=20, sampling=GREEDY) == "é😀世界"


@pytest.mark.timeout(60)
def test_leaving_an_async_stream_early_stops_it(tiny: Llama) -> None:
    async def main() -> list[str]:
        seen = []
        async for piece in await tiny.generate_stream_async("a", max_tokens=None, sampling=GREEDY):
            seen.append(piece)
            if len(seen) == 3:
                break
        return seen

    assert asyncio.run(main()) == ["b", "c", "d"]
    assert tiny.generate("A", max_tokens=20, sampling=GREEDY) == "é😀世界"


def test_a_cancellation_stops_a_sync_generation(tiny: Llama) -> None:
    cancellation = Cancellation()
    cancellation.cancel()
    with pytest.raises(GenerationCancelled, match="cancelled"):
        tiny.complete("a", max_tokens=10, cancellation=cancellation)
    assert tiny.generate("A", max_tokens=20, sampling=GREEDY) == "é😀世界"
