"""llama-server's DRY, XTC and top-n-sigma samplers on the tiny model, whose greedy walk is
known: each changes the output the way it should, and is off by default."""

from __future__ import annotations

import string
from dataclasses import replace
from typing import Any

import pytest

from conftest import FrontEnd
from llama_cpp import InvalidArgumentError, Llama, SamplingParams

CYCLE = "abcdefghijklmnopqrstuvwxyzabcdefghij"  # the tiny model's letter cycle, then 'k' comes
HOT = SamplingParams(temperature=30.0, top_k=0, top_p=1.0, min_p=0.0, seed=7)


def test_the_new_samplers_are_off_by_default() -> None:
    params = SamplingParams()
    assert (params.dry_multiplier, params.dry_base, params.dry_allowed_length, params.dry_penalty_last_n) == (
        0.0,
        1.75,
        2,
        64,
    )
    assert params.dry_sequence_breakers == ("\n", ":", '"', "*")
    assert (params.xtc_probability, params.xtc_threshold, params.top_n_sigma) == (0.0, 0.1, -1.0)


def test_dry_breaks_the_repetition_cycle(tiny: Llama) -> None:
    assert tiny.generate(CYCLE, max_tokens=4, sampling=SamplingParams.greedy()) == "klmn"
    # 'k' would extend a 10-token repetition: 0.8 * 1.75**8 logits off, below the end of text.
    dry = tiny.create_completion(CYCLE, max_tokens=4, temperature=0, dry_multiplier=0.8)
    assert dry["choices"][0]["text"] == ""
    assert dry["choices"][0]["finish_reason"] == "stop"
    # Repetitions up to dry_allowed_length, and outside dry_penalty_last_n, go unpenalized.
    assert (
        tiny.generate("ab", max_tokens=4, sampling=SamplingParams(temperature=0, dry_multiplier=0.8))
        == "cdef"
    )
    wide_allowance = SamplingParams(temperature=0, dry_multiplier=0.8, dry_allowed_length=20)
    assert tiny.generate(CYCLE, max_tokens=4, sampling=wide_allowance) == "klmn"
    short_window = SamplingParams(temperature=0, dry_multiplier=0.8, dry_penalty_last_n=8)
    assert tiny.generate(CYCLE, max_tokens=4, sampling=short_window) == "klmn"


def test_the_new_samplers_work_on_both_front_ends(front: FrontEnd) -> None:
    dry = front.create_completion(CYCLE, max_tokens=4, temperature=0, dry_multiplier=0.8)
    assert dry["choices"][0]["text"] == ""
    sigma = front.create_completion(
        "a", max_tokens=8, temperature=30.0, top_k=0, top_p=1.0, min_p=0.0, seed=7, top_n_sigma=1.0
    )
    assert sigma["choices"][0]["text"] == "bcdefghi"
    with pytest.raises(InvalidArgumentError, match="xtc_probability"):
        front.create_completion("a", max_tokens=2, xtc_probability=2.0)


def test_dry_sequence_breakers_end_a_repetition(tiny: Llama) -> None:
    breakers = SamplingParams(temperature=0, dry_multiplier=0.8, dry_sequence_breakers=tuple("abcdefghij"))
    assert tiny.generate(CYCLE, max_tokens=4, sampling=breakers) == "klmn"


def test_top_n_sigma_keeps_only_the_clear_winner(tiny: Llama) -> None:
    # At temperature 30 the tiny model's distribution is nearly flat...
    assert tiny.generate("a", max_tokens=8, sampling=HOT) == "8O\ufffdsMA\x13j"
    # ...but top-n-sigma runs on the raw logits, where only the successor is near the top.
    sigma = tiny.create_completion(
        "a", max_tokens=8, temperature=30.0, top_k=0, top_p=1.0, min_p=0.0, seed=7, top_n_sigma=1.0
    )
    assert sigma["choices"][0]["text"] == "bcdefghi"


def test_xtc_removes_the_top_choice(tiny: Llama) -> None:
    params = SamplingParams(temperature=1.0, top_k=0, top_p=1.0, min_p=0.0, seed=7)
    assert tiny.generate("a", max_tokens=8, sampling=params) == "bcdefghi"
    # Every token is above a threshold of 0: all but the least likely go, the successor first.
    xtc = tiny.create_completion(
        "a",
        max_tokens=8,
        temperature=1.0,
        top_k=0,
        top_p=1.0,
        min_p=0.0,
        seed=7,
        xtc_probability=1.0,
        xtc_threshold=0.0,
    )
    assert not set(xtc["choices"][0]["text"]) & set(string.ascii_lowercase)
    # With the default threshold (0.1) only the successor is above it: XTC keeps it.
    kept = SamplingParams(temperature=1.0, top_k=0, top_p=1.0, min_p=0.0, seed=7, xtc_probability=1.0)
    assert tiny.generate("a", max_tokens=8, sampling=kept) == "bcdefghi"


def test_chat_completion_takes_the_new_samplers(tiny: Llama) -> None:
    # The chat keywords reach the sampler: top-n-sigma tames a near-flat distribution.
    messages = [{"role": "user", "content": "a"}]
    hot: dict[str, Any] = {
        "max_tokens": 6,
        "temperature": 30.0,
        "top_k": 0,
        "top_p": 1.0,
        "min_p": 0.0,
        "seed": 7,
    }
    plain = tiny.create_chat_completion(messages, **hot)
    sigma = tiny.create_chat_completion(messages, **hot, top_n_sigma=1.0)
    greedy = tiny.create_chat_completion(messages, max_tokens=6, temperature=0)
    assert sigma["choices"][0]["message"]["content"] == greedy["choices"][0]["message"]["content"]
    assert plain["choices"][0]["message"]["content"] != greedy["choices"][0]["message"]["content"]


@pytest.mark.parametrize(
    ("field", "value", "message"),
    [
        ("dry_multiplier", -0.5, "dry_multiplier must be finite and >= 0 (0 disables DRY), got -0.500000"),
        ("dry_multiplier", float("inf"), "dry_multiplier must be finite and >= 0 (0 disables DRY), got inf"),
        ("dry_base", 0.5, "dry_base must be finite and >= 1, got 0.500000"),
        ("dry_allowed_length", -1, "dry_allowed_length must be >= 0, got -1"),
        ("dry_penalty_last_n", -2, "dry_penalty_last_n must be >= -1, got -2"),
        ("xtc_probability", 1.5, "xtc_probability must be in [0, 1], got 1.500000"),
        ("xtc_probability", float("nan"), "xtc_probability must be in [0, 1], got nan"),
        ("xtc_threshold", -0.1, "xtc_threshold must be in [0, 1], got -0.100000"),
        ("top_n_sigma", float("nan"), "top_n_sigma must be finite (<= 0 disables it)"),
    ],
)
def test_invalid_values_name_the_field(tiny: Llama, field: str, value: float, message: str) -> None:
    overrides: dict[str, Any] = {field: value}
    params = replace(SamplingParams(temperature=0.5), **overrides)
    with pytest.raises(InvalidArgumentError) as raised:
        tiny.generate("a", max_tokens=2, sampling=params)
    assert str(raised.value) == message
