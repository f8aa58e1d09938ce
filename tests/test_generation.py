"""The token loop, on the tiny successor-table model where every output is known exactly."""

from __future__ import annotations

import threading
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
import pytest

from conftest import TokenGate
from llama_cpp import (
    ClosedError,
    ContextBusyError,
    ContextOverflowError,
    InvalidArgumentError,
    Llama,
    LlamaError,
    SamplingParams,
)
from llama_cpp.testing import BOS_ID, EOS_ID, EOT_ID, SPACE_ID, TinyModelSpec, byte_token, write_tiny_llama

GREEDY = SamplingParams.greedy()
ALPHABET = "abcdefghijklmnopqrstuvwxyz"


def test_greedy_walks_the_successor_table_and_stops_at_eog(tiny: Llama) -> None:
    completion = tiny.complete("A", max_tokens=100, sampling=GREEDY)
    assert completion.text == "é😀世界"
    assert completion.finish_reason == "stop"
    assert completion.tokens == [byte_token(b) for b in "é😀世界".encode()]
    assert EOS_ID not in completion.tokens
    assert completion.prompt_tokens == 2  # BOS + 'A'


def test_any_end_of_generation_token_stops_not_only_eos(tiny: Llama) -> None:
    assert tiny.model.is_eog(EOT_ID)
    assert tiny.token_eos() != EOT_ID
    completion = tiny.complete("B", max_tokens=100, sampling=GREEDY)
    assert completion.text == "!"
    assert completion.finish_reason == "stop"
    assert completion.tokens == [byte_token(ord("!"))]


def test_default_sampling_is_deterministic_on_a_peaked_model(tiny: Llama) -> None:
    assert tiny.generate("A", max_tokens=100) == "é😀世界"


def test_max_tokens_ends_with_length(tiny: Llama) -> None:
    completion = tiny.complete("a", max_tokens=5, sampling=GREEDY)
    assert completion.text == "bcdef"
    assert completion.finish_reason == "length"
    assert len(completion.tokens) == 5


def test_a_full_context_ends_with_length_and_never_samples_stale_logits(tiny_model_path: Path) -> None:
    with Llama(tiny_model_path, n_ctx=256, n_batch=64) as llm:
        n_ctx = llm.n_ctx()
        completion = llm.complete("a", max_tokens=None, sampling=GREEDY)
        assert completion.finish_reason == "length"
        # 2 prompt tokens + every generated token but the last were decoded: exactly full.
        assert len(completion.tokens) == n_ctx - 2 + 1
        assert llm.n_tokens == n_ctx
        expected = "".join(ALPHABET[(1 + i) % 26] for i in range(len(completion.tokens)))
        assert completion.text == expected


def test_stop_string_spanning_tokens_is_cut_and_not_returned(tiny: Llama) -> None:
    completion = tiny.complete("A", max_tokens=100, sampling=GREEDY, stop=["😀"])
    assert completion.text == "é"
    assert completion.finish_reason == "stop"
    assert completion.stop_sequence == "😀"


def test_earliest_of_several_stop_strings_wins(tiny: Llama) -> None:
    completion = tiny.complete("a", max_tokens=100, sampling=GREEDY, stop=["xyz", "klm", "q"])
    assert completion.text == "bcdefghij"
    assert completion.finish_reason == "stop"
    assert completion.stop_sequence == "klm"
    # The stop string found first in the text is reported, not the one listed first.
    assert tiny.complete("a", max_tokens=100, sampling=GREEDY, stop=["k", "jk"]).stop_sequence == "jk"


def test_stop_sequence_is_none_unless_a_stop_string_ended_it(tiny: Llama) -> None:
    assert tiny.complete("A", max_tokens=100, sampling=GREEDY, stop=["zz"]).stop_sequence is None  # EOS
    assert tiny.complete("a", max_tokens=3, sampling=GREEDY, stop=["zz"]).stop_sequence is None  # length


def test_a_stop_prefix_that_does_not_complete_is_released(tiny: Llama) -> None:
    # "bcx" starts like the output ("bc") but never completes; all text must still come out.
    completion = tiny.complete("a", max_tokens=6, sampling=GREEDY, stop=["bcx", "fgz"])
    assert completion.text == "bcdefg"
    assert completion.finish_reason == "length"


def test_stream_yields_whole_characters_and_equals_the_non_streamed_text(tiny: Llama) -> None:
    pieces = list(tiny.generate_stream("A", max_tokens=100, sampling=GREEDY))
    # Each character arrives once its last byte token is generated, never broken.
    assert pieces == ["é", "😀", "世", "界"]


def test_stream_never_leaks_a_stop_string(tiny: Llama) -> None:
    pieces = list(tiny.generate_stream("a", max_tokens=100, sampling=GREEDY, stop=["mno"]))
    assert "".join(pieces) == "bcdefghijkl"
    assert not any("m" in piece for piece in pieces)


def test_a_stop_string_inside_a_multibyte_sequence_is_matched_on_text(tiny: Llama) -> None:
    assert tiny.generate("A", max_tokens=100, sampling=GREEDY, stop="界") == "é😀世"


def test_closing_a_stream_stops_it_and_leaves_the_instance_usable(tiny: Llama) -> None:
    stream = tiny.generate_stream("a", max_tokens=None, sampling=GREEDY)
    assert next(stream) == "b"
    assert next(stream) == "c"
    stream.close()
    with pytest.raises(StopIteration):
        next(stream)
    assert tiny.generate("A", max_tokens=100, sampling=GREEDY) == "é😀世界"


def test_breaking_out_of_a_stream_loop(tiny: Llama) -> None:
    seen = []
    for piece in tiny.generate_stream("a", max_tokens=None, sampling=GREEDY):
        seen.append(piece)
        if len(seen) == 3:
            break
    assert seen == ["b", "c", "d"]
    assert tiny.generate("a", max_tokens=2, sampling=GREEDY) == "bc"


def test_a_call_beside_an_open_stream_of_the_same_thread_raises_instead_of_deadlocking(tiny: Llama) -> None:
    stream = tiny.generate_stream("a", max_tokens=None, sampling=GREEDY)
    assert next(stream) == "b"
    with pytest.raises(ContextBusyError, match="this thread holds an open stream on this context"):
        tiny.generate("A", max_tokens=3, sampling=GREEDY)
    assert tiny.n_tokens == 3  # BOS a b; reads go ahead: the stream is paused in this very thread
    assert next(stream) == "c"  # the stream was not disturbed
    stream.close()
    assert tiny.generate("A", max_tokens=100, sampling=GREEDY) == "é😀世界"


def test_prompt_longer_than_n_batch_is_decoded_in_chunks(tiny_model_path: Path) -> None:
    prompt = "z" * 150 + " "
    with Llama(tiny_model_path, n_ctx=512, n_batch=16) as llm:
        assert llm.context.n_batch() == 16
        completion = llm.complete(prompt, max_tokens=3, sampling=GREEDY)
        assert completion.prompt_tokens == 152
        assert completion.text == "abc"
        assert llm.n_tokens == 152 + 2


def test_prompt_longer_than_the_context_raises(tiny: Llama) -> None:
    prompt = "z" * 300
    with pytest.raises(
        ContextOverflowError, match=r"the prompt has 301 tokens, more than the context window of 256"
    ):
        tiny.complete(prompt, max_tokens=1)
    assert issubclass(ContextOverflowError, ValueError)
    assert tiny.generate("A", max_tokens=100, sampling=GREEDY) == "é😀世界"


def test_the_cached_prefix_is_reused(tiny: Llama) -> None:
    first = tiny.complete("zzzz zzzz a", max_tokens=2, sampling=GREEDY)
    assert first.cached_tokens == 0
    second = tiny.complete("zzzz zzzz b", max_tokens=2, sampling=GREEDY)
    assert second.cached_tokens == len("zzzz zzzz ") + 1  # BOS and the shared text
    assert second.text == "cd"
    third = tiny.complete([BOS_ID, byte_token(ord("x"))], max_tokens=2, sampling=GREEDY)
    assert third.cached_tokens == 1
    assert third.text == "yz"


@pytest.mark.parametrize(
    ("params", "message"),
    [
        (SamplingParams(top_p=1.5), r"top_p must be in \[0, 1\]"),
        (SamplingParams(min_p=-0.1), r"min_p must be in \[0, 1\]"),
        (SamplingParams(top_k=-1), "top_k must be >= 0"),
        (SamplingParams(repeat_penalty=0.0), "repeat_penalty must be > 0"),
        (SamplingParams(temperature=float("nan")), "temperature must be a number"),
        (SamplingParams(mirostat_mode=3), "mirostat_mode must be 0, 1 or 2"),
        (SamplingParams(logit_bias={100000: 1.0}), "logit_bias token id 100000 is out of range"),
        (SamplingParams(seed=2**40), r"seed must be in \[0, 2\*\*32\)"),
        (SamplingParams(frequency_penalty=float("inf")), "frequency_penalty must be finite"),
    ],
)
def test_invalid_sampling_values_raise_a_typed_error(
    tiny: Llama, params: SamplingParams, message: str
) -> None:
    with pytest.raises(InvalidArgumentError, match=message):
        tiny.complete("a", max_tokens=2, sampling=params)
    assert tiny.generate("a", max_tokens=2, sampling=GREEDY) == "bc"


def test_out_of_range_prompt_tokens_raise(tiny: Llama) -> None:
    with pytest.raises(InvalidArgumentError, match="token id 999 is out of range"):
        tiny.complete([BOS_ID, 999], max_tokens=1)
    with pytest.raises(InvalidArgumentError, match="the prompt is empty"):
        tiny.complete([], max_tokens=1)


def test_logit_bias_bans_a_token(tiny: Llama) -> None:
    banned = SamplingParams(temperature=0.0, logit_bias={byte_token(ord("d")): float("-inf")})
    text = tiny.generate("a", max_tokens=2, sampling=banned)
    assert text[0] == "b"
    assert text[1] != "d"


def seeded_runs(llm: Llama, params: SamplingParams, n: int) -> tuple[list[int], list[int], list[int]]:
    """Tokens of two runs with ``params`` and one with another seed."""
    first = llm.complete("a", max_tokens=n, sampling=params).tokens
    again = llm.complete("a", max_tokens=n, sampling=params).tokens
    other_seed = SamplingParams(**{**params.__dict__, "seed": (params.seed or 0) + 1})
    return first, again, llm.complete("a", max_tokens=n, sampling=other_seed).tokens


def test_seeded_sampling_is_reproducible(noisy_path: Path) -> None:
    with Llama(noisy_path, n_ctx=256) as llm:
        params = SamplingParams(temperature=1.0, top_k=0, top_p=1.0, min_p=0.0, seed=1234)
        first, again, other = seeded_runs(llm, params, 24)
    assert first == again
    assert first != other


def test_tokenize_and_detokenize(tiny: Llama) -> None:
    assert tiny.tokenize("Aé") == [BOS_ID, byte_token(0x41), byte_token(0xC3), byte_token(0xA9)]
    assert tiny.tokenize(b"A", add_bos=False) == [byte_token(0x41)]
    assert tiny.detokenize([byte_token(0xC3)]) == b"\xc3"  # bytes: may end mid-character
    assert tiny.detokenize(tiny.tokenize("héllo wörld", add_bos=False)) == "héllo wörld".encode()
    assert tiny.tokenize(" ", add_bos=False) == [SPACE_ID]
    assert tiny.tokenize("</s>", add_bos=False, special=True) == [EOS_ID]
    assert tiny.detokenize([EOS_ID], special=True) == b"</s>"
    assert tiny.detokenize([EOS_ID]) == b""
    with pytest.raises(InvalidArgumentError):
        tiny.detokenize([12345])


def test_model_facts(tiny: Llama) -> None:
    assert tiny.n_vocab() == 261
    assert tiny.n_ctx() == 256
    assert tiny.token_bos() == BOS_ID
    assert tiny.token_eos() == EOS_ID
    assert tiny.metadata["general.architecture"] == "llama"
    assert tiny.metadata["general.name"] == "tiny-successor-llama"
    assert tiny.n_embd() == TinyModelSpec().n_embd


def test_eval_and_reset_track_the_kv_position(tiny: Llama) -> None:
    tiny.reset()
    assert tiny.n_tokens == 0
    tiny.eval([BOS_ID, byte_token(ord("a"))])
    assert tiny.n_tokens == 2
    logits = tiny.context.logits()
    assert int(np.argmax(logits)) == byte_token(ord("b"))
    tiny.reset()
    assert tiny.n_tokens == 0
    with pytest.raises(LlamaError, match="no logits"):
        tiny.context.logits()


def test_logits_are_a_float32_array_that_owns_its_memory(tiny: Llama) -> None:
    tiny.reset()
    tiny.eval([BOS_ID, byte_token(ord("a"))])
    logits = tiny.context.logits()
    assert isinstance(logits, np.ndarray)
    assert logits.dtype == np.float32
    assert logits.shape == (tiny.n_vocab(),)
    before = logits.copy()
    tiny.eval([byte_token(ord("b"))])  # llama.cpp overwrites its own logits buffer
    assert np.array_equal(logits, before)
    assert int(np.argmax(tiny.context.logits())) == byte_token(ord("c"))
    logits[:] = 0.0  # a copy: writing to it changes nothing in the context
    assert int(np.argmax(tiny.context.logits())) == byte_token(ord("c"))


def test_llama_cpp_python_views_of_the_context(tiny: Llama) -> None:
    tiny.reset()
    assert tiny.input_ids.dtype == np.intc
    assert tiny.input_ids.shape == (0,)
    assert tiny.scores.shape == (0, tiny.n_vocab())
    assert len(tiny.eval_logits) == 0
    tiny.eval([BOS_ID, byte_token(ord("a"))])
    assert tiny.input_ids.tolist() == [BOS_ID, byte_token(ord("a"))]
    assert list(tiny.eval_tokens) == [BOS_ID, byte_token(ord("a"))]
    assert tiny.eval_tokens.maxlen == tiny.n_ctx()
    scores = tiny.scores
    assert scores.dtype == np.float32
    assert scores.shape == (1, tiny.n_vocab())  # only the last row is kept
    assert np.array_equal(scores[-1], tiny.context.logits())
    assert int(np.argmax(scores[-1])) == byte_token(ord("b"))
    (row,) = tiny.eval_logits
    assert tiny.eval_logits.maxlen == 1
    assert np.array_equal(row, scores[-1])
    tiny.kv_cache_truncate(1)  # the cached tokens' logits are gone
    with pytest.raises(LlamaError, match="no logits"):
        _ = tiny.scores


def test_vocab_only_model_tokenizes_but_cannot_generate(tiny_model_path: Path) -> None:
    with Llama(tiny_model_path, vocab_only=True) as llm:
        assert llm.tokenize("A") == [BOS_ID, byte_token(0x41)]
        with pytest.raises(LlamaError, match="vocab_only"):
            llm.generate("A")


def test_close_is_idempotent_and_later_calls_raise(tiny_model_path: Path) -> None:
    llm = Llama(tiny_model_path, n_ctx=256)
    llm.close()
    llm.close()
    with pytest.raises(ClosedError):
        llm.generate("A")
    with pytest.raises(ClosedError):
        llm.tokenize("A")


@pytest.mark.timeout(60)
def test_close_during_a_generation_in_another_thread(tiny_model_path: Path) -> None:
    llm = Llama(tiny_model_path, n_ctx=4096, n_batch=64)
    outcome: list[BaseException | str] = []
    with TokenGate(at=3) as gate:

        def run() -> None:
            try:
                chunks = llm.create_completion(
                    "a", max_tokens=None, temperature=0, stream=True, logits_processor=gate.logits_processor
                )
                outcome.append("".join(chunk["choices"][0]["text"] for chunk in chunks))
            except BaseException as error:
                outcome.append(error)

        worker = threading.Thread(target=run)
        worker.start()
        assert gate.reached.wait(30)  # the worker is inside its 3rd step, held there
        closer = threading.Thread(target=llm.close)
        closer.start()
        # close() raises the context's closing flag, then waits for the running step. The step
        # goes on only once the flag is up, so the close always lands mid-generation.
        while not llm.context.closed:
            closer.join(0.01)
        gate.open()
        closer.join(30)
        worker.join(30)
    assert not closer.is_alive()
    assert not worker.is_alive()
    assert len(outcome) == 1
    assert isinstance(outcome[0], ClosedError)
    assert str(outcome[0]) == "the generation was aborted because the context is closing"
    assert gate.calls == 3  # it stopped at its next token


@pytest.mark.timeout(60)
def test_one_instance_shared_by_threads_is_serialized(tiny: Llama) -> None:
    results: dict[int, str] = {}
    errors: list[BaseException] = []

    def run(index: int) -> None:
        try:
            prompt = "A" if index % 2 else "a"
            results[index] = tiny.generate(prompt, max_tokens=40, sampling=GREEDY)
        except BaseException as error:
            errors.append(error)

    threads = [threading.Thread(target=run, args=(i,)) for i in range(8)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(30)
    assert not errors
    expected_letters = "".join(ALPHABET[(1 + i) % 26] for i in range(40))
    assert results == {i: ("é😀世界" if i % 2 else expected_letters) for i in range(8)}


def test_llama_cpp_python_keywords_with_no_effect_warn(tiny_model_path: Path) -> None:
    with pytest.warns(UserWarning, match=r"Llama\(\) ignores the keyword argument 'last_n_tokens_size'"):
        Llama(tiny_model_path, n_ctx=256, last_n_tokens_size=64).close()


@pytest.mark.parametrize(("name", "value"), [("n_ctx", -1), ("n_batch", 0), ("n_threads", 0)])
def test_invalid_constructor_values_raise(tiny_model_path: Path, name: str, value: int) -> None:
    kwargs: dict[str, Any] = {name: value}
    with pytest.raises(InvalidArgumentError, match=name):
        Llama(tiny_model_path, **kwargs)


@pytest.mark.slow
def test_close_frees_the_memory_at_once(default_model_path: Path, rss_kib: Callable[[], int]) -> None:
    before = rss_kib()
    llm = Llama(default_model_path, n_ctx=2048, use_mmap=False)  # weights read into RAM
    llm.generate("Hello", max_tokens=4, sampling=GREEDY)
    llm.render_chat([{"role": "user", "content": "Hi"}])  # the chat templates hold the model too
    loaded = rss_kib()
    assert loaded - before > 200_000  # the 253 MB model and its context are resident
    llm.close()
    assert rss_kib() - before < 60_000  # gone without waiting for the garbage collector


@pytest.fixture(scope="module")
def noisy_path(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A tiny model with a spread-out next-token distribution."""
    spec = TinyModelSpec(logit_scale=0.0, noise=1.0, seed=3)
    return write_tiny_llama(tmp_path_factory.mktemp("noisy") / "noisy.gguf", spec)


def test_presence_penalty_steers_away_from_seen_tokens(noisy_path: Path) -> None:
    with Llama(noisy_path, n_ctx=256) as llm:
        plain = llm.complete("a", max_tokens=40, sampling=GREEDY).tokens
        # Greedy on a fixed table soon cycles; a large presence penalty forbids any repeat.
        assert len(set(plain)) < len(plain)
        penalized = SamplingParams(temperature=0.0, presence_penalty=100.0, penalty_last_n=-1)
        tokens = llm.complete("a", max_tokens=40, sampling=penalized).tokens
        assert len(set(tokens)) == len(tokens) == 40


@pytest.mark.parametrize("mode", [1, 2])
def test_mirostat_is_seeded_and_reproducible(noisy_path: Path, mode: int) -> None:
    with Llama(noisy_path, n_ctx=256) as llm:
        params = SamplingParams(temperature=1.0, mirostat_mode=mode, mirostat_tau=3.0, seed=9)
        first, again, other = seeded_runs(llm, params, 30)
    assert first == again
    assert first != other
    assert len(first) == 30
