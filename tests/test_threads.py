"""One Llama shared by threads: a stream owns the context from its first step to its end,
other threads' calls wait for it, and nothing deadlocks or interrupts another call."""

from __future__ import annotations

import threading
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import pytest

from llama_cpp import ClosedError, ContextBusyError, InvalidArgumentError, Llama, SamplingParams

GREEDY = SamplingParams.greedy()


@pytest.mark.timeout(120)
def test_eight_threads_mixing_completions_and_streams_all_succeed(tiny_model_path: Path) -> None:
    # Regression: 3 of 8 threads failed with "this generation was interrupted: the context
    # was used by another call".
    with Llama(tiny_model_path, n_ctx=256, n_batch=64, verbose=False) as llm:
        expected = {p: llm.generate(p, max_tokens=12, sampling=GREEDY) for p in "aAhp"}

        def work(i: int) -> list[str]:
            out = []
            for j in range(6):
                prompt = "aAhp"[(i + j) % 4]
                if (i + j) % 2:
                    out.append("".join(llm.generate_stream(prompt, max_tokens=12, sampling=GREEDY)))
                else:
                    out.append(llm.generate(prompt, max_tokens=12, sampling=GREEDY))
                assert out[-1] == expected[prompt]
            return out

        with ThreadPoolExecutor(8) as pool:
            results = list(pool.map(work, range(8)))
    assert sum(len(r) for r in results) == 48


@pytest.mark.timeout(60)
def test_another_thread_waits_for_an_open_stream(tiny: Llama) -> None:
    stream = tiny.generate_stream("a", max_tokens=6, sampling=GREEDY)
    assert next(stream) == "b"
    done = threading.Event()
    answer: list[str] = []

    def other() -> None:
        answer.append(tiny.generate("A", max_tokens=100, sampling=GREEDY))
        done.set()

    thread = threading.Thread(target=other)
    thread.start()
    assert not done.wait(0.5)  # it waits while the stream is open
    assert "".join(stream) == "cdefg"  # undisturbed; its end gives the context back
    thread.join(30)
    assert answer == ["é😀世界"]


@pytest.mark.timeout(60)
def test_a_stream_left_unread_past_the_timeout_loses_the_context(tiny_model_path: Path) -> None:
    with Llama(tiny_model_path, n_ctx=256, n_batch=64, stream_timeout=0.3, verbose=False) as llm:
        stream = llm.generate_stream("a", max_tokens=None, sampling=GREEDY)
        # The stream's idle time starts when its step ends, after this instant: whatever the
        # load, the other call cannot have the context sooner than 0.3 s from here.
        before_the_step = time.monotonic()
        assert next(stream) == "b"
        result: list[str] = []
        thread = threading.Thread(
            target=lambda: result.append(llm.generate("A", max_tokens=100, sampling=GREEDY))
        )
        thread.start()
        thread.join(30)
        assert result == ["é😀世界"]
        assert time.monotonic() - before_the_step >= 0.3  # it waited for the stream's timeout
        with pytest.raises(
            ContextBusyError, match="left unread for longer than the context's stream_timeout"
        ):
            next(stream)
        assert llm.generate("a", max_tokens=3, sampling=GREEDY) == "bcd"


@pytest.mark.timeout(60)
def test_a_stream_read_in_time_keeps_the_context(tiny_model_path: Path) -> None:
    # A timeout that no pause of this loaded machine reaches; the reader's pauses stand for a
    # slow consumer, during which the other thread waits for the context.
    with Llama(tiny_model_path, n_ctx=256, n_batch=64, stream_timeout=30.0, verbose=False) as llm:
        stream = llm.generate_stream("a", max_tokens=8, sampling=GREEDY)
        pieces = [next(stream)]
        calling = threading.Event()
        result: list[str] = []

        def other() -> None:
            calling.set()
            result.append(llm.generate("A", max_tokens=100, sampling=GREEDY))

        thread = threading.Thread(target=other)
        thread.start()
        assert calling.wait(30)
        for piece in stream:
            time.sleep(0.05)
            pieces.append(piece)
        thread.join(30)
        assert "".join(pieces) == "bcdefghi"
        assert result == ["é😀世界"]


@pytest.mark.timeout(60)
def test_closing_the_model_revokes_an_open_stream(tiny: Llama) -> None:
    stream = tiny.generate_stream("a", max_tokens=None, sampling=GREEDY)
    assert next(stream) == "b"
    closer = threading.Thread(target=tiny.close)
    closer.start()
    closer.join(30)
    assert not closer.is_alive()
    with pytest.raises(ClosedError, match="closed during generation"):
        next(stream)


@pytest.mark.timeout(60)
def test_a_dropped_stream_gives_the_context_back(tiny: Llama) -> None:
    stream = tiny.generate_stream("a", max_tokens=None, sampling=GREEDY)
    assert next(stream) == "b"
    del stream  # the generator is closed, the native stream freed: the context is free
    result: list[str] = []
    thread = threading.Thread(
        target=lambda: result.append(tiny.generate("A", max_tokens=100, sampling=GREEDY))
    )
    thread.start()
    # A hang guard, shorter than the stream_timeout (60 s) after which a context that was
    # not given back would reach this thread anyway.
    thread.join(30)
    assert result == ["é😀世界"]


def test_stream_timeout_must_be_positive(tiny_model_path: Path) -> None:
    with pytest.raises(InvalidArgumentError, match="stream_timeout must be a number of seconds > 0"):
        Llama(tiny_model_path, stream_timeout=0)
