"""LlamaConfig, kv_overrides, perf() and the KV-cache operations."""

from __future__ import annotations

import inspect
from pathlib import Path

import pytest

from llama_cpp import InvalidArgumentError, Llama, LlamaConfig, SamplingParams
from llama_cpp.config import DEFAULTS
from llama_cpp.testing import BOS_ID, byte_token

GREEDY = SamplingParams.greedy()


def test_the_constructor_and_the_config_have_the_same_options() -> None:
    keywords = set(inspect.signature(Llama.__init__).parameters) - {"self", "model_path", "config", "kwargs"}
    assert keywords == set(DEFAULTS)
    for name, parameter in inspect.signature(Llama.__init__).parameters.items():
        if name in DEFAULTS:
            assert parameter.default == DEFAULTS[name], name


def test_config_and_keywords(tiny_model_path: Path) -> None:
    config = LlamaConfig(n_ctx=512, n_batch=32)
    with Llama(tiny_model_path, config=config) as llm:
        assert llm.n_ctx() == 512
        assert llm.context.n_batch() == 32
    with Llama(tiny_model_path, config=config, n_ctx=256) as llm:  # the keyword wins
        assert llm.n_ctx() == 256
        assert llm.config.n_batch == 32


@pytest.mark.parametrize(
    ("options", "message"),
    [
        ({"n_ctx": -1}, "n_ctx must be an integer >= 0"),
        ({"n_batch": 0}, "n_batch must be an integer >= 1"),
        ({"n_threads": 0}, "n_threads must be an integer >= 1"),
        ({"pooling_type": 7}, r"pooling_type must be in \[-1, 4\]"),
        ({"split_mode": 3}, "split_mode must be 0, 1 or 2"),
    ],
)
def test_invalid_options_are_named(options: dict[str, int], message: str) -> None:
    with pytest.raises(InvalidArgumentError, match=message):
        LlamaConfig(**options)  # type: ignore[arg-type]


def test_kv_overrides_change_the_model(tiny_model_path: Path) -> None:
    with Llama(tiny_model_path, n_ctx=256, kv_overrides={"llama.context_length": 1234}) as llm:
        assert llm.model.n_ctx_train == 1234
    with Llama(tiny_model_path, n_ctx=256, kv_overrides={"tokenizer.ggml.add_bos_token": False}) as llm:
        assert llm.tokenize("a") == [byte_token(ord("a"))]


@pytest.mark.parametrize(
    ("overrides", "message"),
    [
        (
            {"llama.context_length": "abc"},
            r"kv_overrides\['llama.context_length'\] is a str, but the model stores a u32",
        ),
        ({"llama.context_length": 1.5}, "is a float, but the model stores a u32"),
        ({"tokenizer.ggml.add_bos_token": 1}, "is a int, but the model stores a bool"),
        ({"general.name": "x" * 200}, "must have < 128 bytes"),
        ({"k" * 200: 1}, "key must have 1 to 127 bytes"),
    ],
)
def test_bad_kv_overrides_raise(tiny_model_path: Path, overrides: dict[str, object], message: str) -> None:
    with pytest.raises(InvalidArgumentError, match=message):
        Llama(tiny_model_path, n_ctx=256, kv_overrides=overrides)  # type: ignore[arg-type]


def test_perf_counts_prompt_and_generated_tokens(tiny: Llama) -> None:
    tiny.reset()
    tiny.perf(reset=True)
    tiny.complete("abc", max_tokens=5, sampling=GREEDY)
    perf = tiny.perf()
    assert perf.prompt_tokens == 4  # BOS + 3, one batch
    assert perf.eval_tokens == 4  # 5 sampled, the last one not decoded
    assert perf.eval_ms > 0
    assert perf.eval_tokens_per_second > 0
    tiny.perf(reset=True)
    assert tiny.perf().eval_tokens == 0


def test_kv_cache_truncate_and_shift(tiny: Llama) -> None:
    tiny.reset()
    tiny.eval(tiny.tokenize("abcdefgh"))
    assert tiny.n_tokens == 9
    tiny.kv_cache_truncate(6)  # BOS a b c d e
    assert tiny.n_tokens == 6
    assert tiny.context.tokens() == tiny.tokenize("abcde")
    tiny.kv_cache_shift(1, 3)  # drop 'a' 'b': BOS c d e, positions 0..3
    assert tiny.n_tokens == 4
    cached = tiny.context.tokens()
    assert cached == [BOS_ID, *(byte_token(ord(c)) for c in "cde")]
    # The shifted cache serves as a prefix: only the new token is evaluated.
    completion = tiny.complete([*cached, byte_token(ord("x"))], max_tokens=2, sampling=GREEDY)
    assert completion.cached_tokens == 4
    assert completion.text == "yz"
    with pytest.raises(InvalidArgumentError, match="invalid range"):
        tiny.kv_cache_shift(3, 100)
    with pytest.raises(InvalidArgumentError, match="cannot keep 100"):
        tiny.kv_cache_truncate(100)
    tiny.kv_cache_clear()
    assert tiny.n_tokens == 0
