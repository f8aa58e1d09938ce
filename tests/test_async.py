"""Async twins: same results as the sync API, the event loop stays free, cancellation stops C++."""

from __future__ import annotations

import asyncio
from pathlib import Path
from typing import Any

import pytest

from conftest import TokenGate
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
@pytest.mark.parametrize("stream", [False, True], ids=["awaited", "streamed"])
def test_the_event_loop_keeps_running_during_generation(tiny_model_path: Path, stream: bool) -> None:
    # The generation stops at its 3rd token until a coroutine on the loop opens the gate: it
    # can only finish if the loop keeps running while the generation is under way. Were it
    # run on the loop, nothing could open the gate, and its hang guard fails the test.
    with Llama(tiny_model_path, n_ctx=256) as llm, TokenGate(at=3) as gate:

        async def generate() -> str:
            kwargs: dict[str, Any] = {
                "max_tokens": 20,
                "temperature": 0,
                "logits_processor": gate.logits_processor,
            }
            if not stream:
                response = await llm.create_completion_async("a", **kwargs)
                text: str = response["choices"][0]["text"]
                return text
            chunks = await llm.create_completion_async("a", stream=True, **kwargs)
            return "".join([chunk["choices"][0]["text"] async for chunk in chunks])

        async def main() -> str:
            task = asyncio.create_task(generate())
            await gate.reached_async()
            assert not task.done()
            gate.open()
            return await task

        assert asyncio.run(main()) == "bcdefghijklmnopqrstu"
    assert gate.calls == 20


@pytest.mark.timeout(60)
def test_cancelling_the_task_stops_the_cpp_loop(tiny_model_path: Path) -> None:
    # The generation would fill 32k tokens; it is held at its 3rd token until the task is
    # cancelled, so the cancellation always reaches a running C++ loop.
    with Llama(tiny_model_path, n_ctx=32768, n_batch=512) as llm, TokenGate(at=3) as gate:

        async def main() -> str:
            task = asyncio.create_task(
                llm.create_completion_async(
                    "a", max_tokens=None, temperature=0, logits_processor=gate.logits_processor
                )
            )
            await gate.reached_async()
            task.cancel()
            with pytest.raises(asyncio.CancelledError):
                await task
            gate.open()
            # The context lock is free again as soon as the C++ loop noticed the flag.
            return await llm.generate_async("A", max_tokens=20, sampling=GREEDY)

        assert asyncio.run(main()) == "é😀世界"
        assert gate.calls == 3  # it stopped at its next token: nothing sampled after the cancel
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
