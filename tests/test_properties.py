"""Property tests (hypothesis) of streaming, stop strings, sampling and generation values, and
states: hostile values work or raise typed errors, never crash.

Every generated text is predicted exactly: the tiny successor model of
:mod:`llama_cpp.testing` emits one byte per token along its successor table, so the bytes of
any generation (from any start token, cut at any length) are known, and with them the text,
where a multi-byte character is split, and where a stop string starts. The tokenizer is in
test_properties_tokenizer.py, grammars and JSON schemas in test_properties_grammar.py.

Examples are derandomized and bounded (the ``llama_cpp`` profile of conftest.py);
``HYPOTHESIS_PROFILE=fuzz`` runs more, fresh ones.
"""

from __future__ import annotations

import math
from collections.abc import Iterator
from dataclasses import fields
from pathlib import Path
from typing import Any, NamedTuple

import pytest
from hypothesis import given
from hypothesis import strategies as st

from conftest import FrontEnd, examples
from llama_cpp import Llama, LlamaPool, SamplingParams
from llama_cpp.errors import ContextOverflowError, InvalidArgumentError, LlamaError
from llama_cpp.state import LlamaState
from llama_cpp.testing import EOS_ID, EOT_ID, SPACE_ID, TinyModelSpec, byte_token, write_tiny_llama

# -- generation on the tiny successor model --------------------------------------------------

SPEC = TinyModelSpec()
#: Start tokens whose walks differ: inside and at the start of the multi-byte chain
#: "é😀世界" (continuation bytes first: invalid UTF-8), the letters' endless cycle, "B" (then
#: end-of-turn), a space, and a byte with no successor (end of generation at once).
START_TOKENS = [byte_token(b) for b in "Aé😀世界Bamz!".encode()] + [SPACE_ID, byte_token(0x07)]


def walk(start: int, max_tokens: int) -> bytes:
    """The bytes greedy decoding generates after ``start``: the successor table, one byte per
    token, until end of generation or ``max_tokens``."""
    out = bytearray()
    token = start
    for _ in range(max_tokens):
        token = SPEC.successor(token)
        if token in (EOS_ID, EOT_ID):
            break
        out += b" " if token == SPACE_ID else bytes([token - byte_token(0)])
    return bytes(out)


def expected_text(generated: bytes) -> str:
    # What every front end returns: invalid bytes as U+FFFD, one per maximal invalid subpart
    # (a truncated character at the end is one U+FFFD), exactly Python's "replace".
    return generated.decode("utf-8", errors="replace")


@pytest.fixture(scope="module", params=["llama", "pool"])
def tiny_front(
    request: pytest.FixtureRequest, tmp_path_factory: pytest.TempPathFactory
) -> Iterator[FrontEnd]:
    path = write_tiny_llama(tmp_path_factory.mktemp("props") / "tiny.gguf", SPEC)
    # One thread: a tiny model's decode is microseconds, and ggml's threads spin-waiting on a
    # loaded machine made each completion 15 times slower (every fixture here does the same).
    target: FrontEnd
    if request.param == "llama":
        target = Llama(path, n_ctx=256, n_batch=64, n_threads=1, verbose=False)
    else:
        target = LlamaPool(path, pool_size=2, n_ctx=256, n_batch=64, n_threads=1, verbose=False)
    with target:
        yield target


def completion(front: FrontEnd, start: int, **kwargs: Any) -> tuple[str, list[str], str | None]:
    """(the text, the streamed pieces, finish_reason) of one greedy completion."""
    answer = front.create_completion([start], temperature=0.0, **kwargs)
    pieces: list[str] = []
    streamed_finish = None
    for chunk in front.create_completion([start], temperature=0.0, stream=True, **kwargs):
        choice = chunk["choices"][0]
        pieces.append(choice["text"])
        streamed_finish = choice["finish_reason"] or streamed_finish
    choice = answer["choices"][0]
    assert streamed_finish == choice["finish_reason"]
    return choice["text"], pieces, choice["finish_reason"]


@examples(60)
@given(start=st.sampled_from(START_TOKENS), max_tokens=st.integers(1, 40))
def test_streamed_text_equals_the_text_and_is_whole_utf8(
    tiny_front: FrontEnd, start: int, max_tokens: int
) -> None:
    generated = walk(start, max_tokens)
    text, pieces, finish = completion(tiny_front, start, max_tokens=max_tokens)
    assert text == expected_text(generated)
    assert "".join(pieces) == text
    for piece in pieces:
        piece.encode("utf-8")  # no lone surrogate: whole characters only
    # U+FFFD stands only for bytes that are invalid where they are: a character that a
    # piece boundary (a token boundary) split is never replaced.
    assert text.count("\ufffd") == expected_text(generated).count("\ufffd")
    assert finish == ("length" if len(generated) == max_tokens else "stop")
    native = list(
        tiny_front.generate_stream([start], max_tokens=max_tokens, sampling=SamplingParams.greedy())
    )
    assert "".join(native) == text
    assert all(native)  # no empty piece from the native API


def stop_strings(generated: str) -> st.SearchStrategy[list[str]]:
    """1-3 stops: substrings of the generated text (at any position, any length, so across
    any token split) and strings that may or may not occur."""
    substring = st.tuples(st.integers(0, len(generated)), st.integers(1, 6)).map(
        lambda p: generated[p[0] : p[0] + p[1]]
    )
    return st.lists(
        substring.filter(bool) | st.text(alphabet="abcé😀世界 z", min_size=1, max_size=4),
        min_size=1,
        max_size=3,
    )


def stopped_text(generated: bytes, stops: list[str]) -> tuple[str, bool]:
    """The text of ``generated`` under ``stops``, and whether one matched: the generation ends
    at the first token that completes a stop (as llama-server and llama-cpp-python check
    after each token), and the text is cut where the earliest stop found then begins."""
    encoded = [s.encode() for s in stops]
    for n in range(1, len(generated) + 1):
        found = [i for i in (generated[:n].find(s) for s in encoded) if i >= 0]
        if found:
            return expected_text(generated[: min(found)]), True
    return expected_text(generated), False


@examples(80)
@given(start=st.sampled_from(START_TOKENS), max_tokens=st.integers(1, 40), data=st.data())
def test_stop_strings_never_leak(
    tiny_front: FrontEnd, start: int, max_tokens: int, data: st.DataObject
) -> None:
    generated = walk(start, max_tokens)
    full = expected_text(walk(start, 40))
    stops = data.draw(stop_strings(full.replace("\ufffd", "")), label="stops")
    expected, stopped = stopped_text(generated, stops)
    text, pieces, finish = completion(tiny_front, start, max_tokens=max_tokens, stop=stops)
    if stopped:
        assert finish == "stop"
    assert text == expected
    assert "".join(pieces) == text
    assert not any(s in text for s in stops)
    native = tiny_front.generate([start], max_tokens=max_tokens, sampling=SamplingParams.greedy(), stop=stops)
    assert native == text


GENERATION_VALUES: dict[str, st.SearchStrategy[Any]] = {
    "max_tokens": st.none()
    | st.integers(-(2**70), 2**70)
    | st.integers(-2, 8)
    | st.floats()
    | st.text(max_size=2),
    "stop": st.none()
    | st.text(max_size=3)
    | st.lists(st.text(max_size=3) | st.none() | st.integers(), max_size=3)
    | st.integers()
    | st.just("\ud800"),
    "logprobs": st.none() | st.integers(-(2**70), 2**70) | st.integers(-1, 5) | st.floats(),
}


@examples(100)
@given(values=st.fixed_dictionaries({}, optional=GENERATION_VALUES))
def test_generation_options_work_or_raise_invalid_argument(
    tiny_front: FrontEnd, values: dict[str, Any]
) -> None:
    try:
        answer = tiny_front.create_completion([byte_token(ord("a"))], temperature=0.0, **values)
    except InvalidArgumentError:
        return
    # What came back is the letters' cycle, cut by the limit or a stop, whatever the values.
    assert expected_text(walk(byte_token(ord("a")), 300)).startswith(answer["choices"][0]["text"])


@pytest.mark.parametrize(
    ("values", "message"),
    [
        ({"max_tokens": "8"}, "max_tokens must be an int or None, got '8'"),
        ({"max_tokens": 8.0}, "max_tokens must be an int or None, got 8.0"),
        ({"stop": 5}, "stop must be a str or a list of str, got 5"),
        ({"stop": ["b", None]}, "stop must be a str or a list of str, got ['b', None]"),
        ({"stop": "\ud800"}, "stop '\\ud800' has no UTF-8 form (surrogates not allowed)"),
        ({"logprobs": 1.5}, "logprobs must be an int or None, got 1.5"),
    ],
)
def test_unrepresentable_generation_options_raise_invalid_argument(
    tiny_front: FrontEnd, values: dict[str, Any], message: str
) -> None:
    # Regression: these raised TypeError (from a comparison or from nanobind) or were ignored.
    with pytest.raises(InvalidArgumentError) as e:
        tiny_front.create_completion("a", **values)
    assert str(e.value) == message


def test_a_limit_beyond_int32_is_no_limit(tiny_front: FrontEnd) -> None:
    # Regression: max_tokens=2**40 raised nanobind's TypeError; it now runs to a stop (or the
    # context's end), and logprobs beyond int32 are llama.cpp's cap (the vocabulary).
    answer = tiny_front.create_completion("a", max_tokens=2**40, stop="z", logprobs=2**40)
    assert answer["choices"][0]["text"] == "bcdefghijklmnopqrstuvwxy"


# -- sampling parameters ---------------------------------------------------------------------

FLOATS = st.floats(allow_nan=True, allow_infinity=True) | st.sampled_from(
    [math.nan, math.inf, -math.inf, -0.0, 1e-45, 1e39, -1e39, 0.5, 1.0, 2.0]
)
INTS = (
    st.integers(-(2**70), 2**70)
    | st.integers(-3, 70)
    | st.sampled_from([2**31 - 1, 2**31, -(2**31) - 1, 2**64])
)
#: Every sampling keyword (the fields of SamplingParams, checked below) and what to throw at it.
SAMPLING_VALUES: dict[str, st.SearchStrategy[Any]] = {
    "temperature": FLOATS | INTS,
    "top_k": INTS | FLOATS,
    "top_p": FLOATS,
    "min_p": FLOATS,
    "typical_p": FLOATS,
    "repeat_penalty": FLOATS,
    "frequency_penalty": FLOATS,
    "presence_penalty": FLOATS,
    "penalty_last_n": INTS,
    "mirostat_mode": INTS,
    "mirostat_tau": FLOATS,
    "mirostat_eta": FLOATS,
    "dry_multiplier": FLOATS,
    "dry_base": FLOATS,
    "dry_allowed_length": INTS,
    "dry_penalty_last_n": INTS,
    "dry_sequence_breakers": st.lists(st.text(max_size=3), max_size=3) | st.text(max_size=3),
    "xtc_probability": FLOATS,
    "xtc_threshold": FLOATS,
    "top_n_sigma": FLOATS,
    "seed": INTS | st.none() | FLOATS,
    "logit_bias": st.dictionaries(INTS, FLOATS, max_size=3)
    | st.dictionaries(st.integers(0, 260), FLOATS, max_size=3),
    "grammar": st.none(),  # grammars: test_properties_grammar.py
}


def test_every_sampling_keyword_is_covered() -> None:
    assert set(SAMPLING_VALUES) == {f.name for f in fields(SamplingParams)}


@pytest.fixture(scope="module")
def noisy_model(tmp_path_factory: pytest.TempPathFactory) -> Path:
    # Noise gives every token some probability: the samplers have a distribution to cut.
    spec = TinyModelSpec(noise=0.5, logit_scale=4.0)
    return write_tiny_llama(tmp_path_factory.mktemp("props") / "noisy.gguf", spec)


@pytest.fixture(scope="module")
def noisy(noisy_model: Path) -> Iterator[Llama]:
    with Llama(noisy_model, n_ctx=128, n_batch=32, n_threads=1, verbose=False) as llm:
        yield llm


@examples(150)
@given(values=st.fixed_dictionaries({}, optional=SAMPLING_VALUES))
def test_sampling_values_work_or_raise_invalid_argument(noisy: Llama, values: dict[str, Any]) -> None:
    try:
        answer = noisy.create_completion("ab", max_tokens=3, **values)
    except InvalidArgumentError:
        return
    assert answer["choices"][0]["finish_reason"] in ("length", "stop")
    assert len(noisy.tokenize(answer["choices"][0]["text"], add_bos=False)) <= 3 * 4


@examples(60)
@given(values=st.fixed_dictionaries({}, optional=SAMPLING_VALUES))
def test_sampling_params_work_or_raise_invalid_argument_on_the_pool(
    tiny_front: FrontEnd, values: dict[str, Any]
) -> None:
    try:
        sampling = SamplingParams(**values)
        tiny_front.complete("a", max_tokens=2, sampling=sampling)
    except InvalidArgumentError:
        pass


@pytest.mark.parametrize(
    ("values", "message"),
    [
        ({"top_k": 2**31}, "top_k must be an int in [-2**31, 2**31), got 2147483648"),
        ({"top_k": 1.5}, "top_k must be an int in [-2**31, 2**31), got 1.5"),
        ({"penalty_last_n": -(2**63)}, f"penalty_last_n must be an int in [-2**31, 2**31), got {-(2**63)}"),
        ({"temperature": "hot"}, "temperature must be a float, got 'hot'"),
        ({"dry_sequence_breakers": 5}, "dry_sequence_breakers must be a sequence of str, got 5"),
        (
            {"logit_bias": {2**40: 1.0}},
            "logit_bias must map token ids (int32) to numbers, got {1099511627776: 1.0}",
        ),
        ({"seed": 1.5}, "seed must be in [0, 2**32) or None, got 1.5"),
        ({"top_p": math.nan}, "top_p must be in [0, 1], got nan"),
    ],
)
def test_unrepresentable_sampling_values_raise_invalid_argument(
    noisy: Llama, values: dict[str, Any], message: str
) -> None:
    # Regression: values beyond the native config's types raised nanobind's TypeError
    # ("incompatible function arguments"), naming no field.
    with pytest.raises(InvalidArgumentError) as e:
        noisy.complete("a", max_tokens=1, sampling=SamplingParams(**values))
    assert str(e.value) == message
    if "dry_sequence_breakers" not in values:  # see the next test
        with pytest.raises(InvalidArgumentError) as e:
            noisy.create_completion("a", max_tokens=1, **values)
        assert str(e.value) == message


@pytest.mark.parametrize("breakers", [5, "ab", b"ab", {"a": 1}, ["a", 1], [None]])
def test_dry_sequence_breakers_that_are_not_strings_raise_invalid_argument(
    noisy: Llama, breakers: Any
) -> None:
    with pytest.raises(InvalidArgumentError, match="dry_sequence_breakers must be a sequence of str"):
        noisy.create_completion("a", max_tokens=1, dry_sequence_breakers=breakers)
    assert noisy.create_completion("a", max_tokens=1, dry_sequence_breakers=["a", "\n"])["choices"]


@examples(100)
@given(seed=INTS | FLOATS | st.none() | st.booleans() | st.text(max_size=2))
def test_set_seed_takes_a_seed_or_raises_invalid_argument(noisy: Llama, seed: Any) -> None:
    valid = isinstance(seed, int) and not isinstance(seed, bool) and -1 <= seed < 2**32
    if valid:
        noisy.set_seed(seed)
        noisy.create_completion("a", max_tokens=1)
    else:
        with pytest.raises(InvalidArgumentError):
            noisy.set_seed(seed)


# -- states ----------------------------------------------------------------------------------


class Stateful(NamedTuple):
    """A context and a state it saved (a short repr: hypothesis prints it on a failure)."""

    llm: Llama
    state: LlamaState

    def __repr__(self) -> str:
        return f"Stateful({self.llm!r}, {len(self.state.data)} bytes)"


@pytest.fixture(scope="module")
def stateful(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Stateful]:
    path = write_tiny_llama(tmp_path_factory.mktemp("props") / "tiny.gguf", SPEC)
    with Llama(path, n_ctx=64, n_batch=32, n_threads=1, verbose=False) as llm:
        llm.create_completion("abc", max_tokens=4, temperature=0.0)
        yield Stateful(llm, llm.save_state())


def assert_usable(llm: Llama) -> None:
    # After a refused state the context generates as a fresh one would.
    assert (
        llm.create_completion([byte_token(ord("A"))], max_tokens=20, temperature=0.0)["choices"][0]["text"]
        == "é😀世界"
    )


@pytest.mark.parametrize("state", [b"", b"abc", bytearray(b"\x00" * 64), None, "state", {"data": b""}])
def test_load_state_refuses_what_is_not_a_state(stateful: Stateful, state: Any) -> None:
    llm, _ = stateful
    with pytest.raises(InvalidArgumentError) as e:
        llm.load_state(state)
    assert str(e.value) == f"load_state expects a LlamaState (from save_state()), got {type(state).__name__}"
    assert_usable(llm)


@examples(60)
@given(
    how=st.sampled_from(["truncate", "flip", "random"]),
    cut=st.integers(0, 2**31),
    flips=st.lists(st.tuples(st.integers(0, 2**31), st.integers(1, 255)), min_size=1, max_size=8),
    junk=st.binary(max_size=4096),
)
def test_load_state_of_damaged_data_raises_llama_error(
    stateful: Stateful, how: str, cut: int, flips: list[tuple[int, int]], junk: bytes
) -> None:
    llm, good = stateful
    raw = bytearray(good.data)
    if how == "truncate":
        raw = raw[: cut % len(raw)]
    elif how == "flip":
        for at, mask in flips:
            raw[at % len(raw)] ^= mask
    else:
        raw = bytearray(junk)
    error = "the state could not be loaded: "
    try:
        llm.load_state(LlamaState(good.model_path, good.n_ctx, good.tokens, bytes(raw)))
    except LlamaError as e:
        error = str(e)
    assert error.startswith("the state could not be loaded: "), error
    llm.reset()
    assert_usable(llm)


@pytest.mark.parametrize("length", [2**32 - 1, 2**31, 15_000])
def test_load_state_with_a_damaged_header_raises_llama_error(stateful: Stateful, length: int) -> None:
    # Regression: llama.cpp allocated (and zeroed) the architecture name's length as read,
    # up to 4 GiB, before checking it against the data: seconds per damaged state.
    llm, good = stateful
    data = length.to_bytes(4, "little") + good.data[4:]
    with pytest.raises(LlamaError) as e:
        llm.load_state(LlamaState(good.model_path, good.n_ctx, good.tokens, data))
    assert (
        str(e.value)
        == "the state could not be loaded: it is truncated or damaged (its header runs past its end)"
    )
    assert llm.n_tokens == 0
    assert_usable(llm)


def test_load_state_of_another_model_raises_llama_error(
    stateful: Stateful, tmp_path_factory: pytest.TempPathFactory
) -> None:
    llm, _ = stateful
    other_path = write_tiny_llama(tmp_path_factory.mktemp("props") / "other.gguf", TinyModelSpec(n_layer=3))
    with Llama(other_path, n_ctx=64, verbose=False) as other:
        other.create_completion("ab", max_tokens=2, temperature=0.0)
        foreign = other.save_state()
    with pytest.raises(LlamaError) as e:
        llm.load_state(foreign)
    assert str(e.value).startswith("the state could not be loaded: ")
    assert llm.n_tokens == 0
    assert_usable(llm)


def test_load_state_with_foreign_tokens_raises_invalid_argument(stateful: Stateful) -> None:
    llm, good = stateful
    with pytest.raises(InvalidArgumentError) as e:
        llm.load_state(LlamaState(good.model_path, good.n_ctx, (10**6,) * len(good.tokens), good.data))
    assert str(e.value) == "token id 1000000 is out of range [0, 261)"
    assert_usable(llm)


def test_load_state_larger_than_the_window_raises_context_overflow(
    stateful: Stateful, tiny_model_path: Path
) -> None:
    llm, _ = stateful
    with Llama(tiny_model_path, n_ctx=1024, n_batch=64, n_threads=1, verbose=False) as big:
        big.create_completion("a", max_tokens=llm.n_ctx() + 8, temperature=0.0)
        large = big.save_state()
    assert len(large.tokens) > llm.n_ctx()
    with pytest.raises(ContextOverflowError):
        llm.load_state(large)
    assert_usable(llm)
