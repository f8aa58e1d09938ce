"""LlamaConfig, kv_overrides, perf() and the KV-cache operations."""

from __future__ import annotations

import dataclasses
from pathlib import Path

import pytest

from llama_cpp import (
    ClosedError,
    ContextParams,
    InvalidArgumentError,
    Llama,
    LlamaConfig,
    LlamaError,
    LlamaPool,
    ModelParams,
    SamplingParams,
    UnifiedLLM,
)
from llama_cpp.config import DEFAULTS
from llama_cpp.testing import BOS_ID, byte_token

GREEDY = SamplingParams.greedy()


def test_every_front_end_takes_the_config_options_and_nothing_else(tiny_model_path: Path) -> None:
    for front_end in (Llama, LlamaPool, UnifiedLLM):
        with pytest.raises(TypeError, match=r"got unexpected keyword arguments \['n_ctxx'\]"):
            front_end(tiny_model_path, n_ctxx=256)
    assert set(DEFAULTS) == {f.name for f in dataclasses.fields(LlamaConfig)}


def test_config_and_keywords(tiny_model_path: Path) -> None:
    config = LlamaConfig(n_ctx=512, n_batch=32, seed=7)
    with Llama(tiny_model_path, config=config) as llm:
        assert llm.n_ctx() == 512
        assert llm.context.n_batch() == 32
    with Llama(tiny_model_path, config=config, n_ctx=256) as llm:  # the keyword wins
        assert llm.n_ctx() == 256
        assert llm.config.n_batch == 32
    # A keyword may set a field back to its default.
    with Llama(tiny_model_path, config=config, n_ctx=DEFAULTS["n_ctx"], seed=DEFAULTS["seed"]) as llm:
        assert llm.n_ctx() == DEFAULTS["n_ctx"]
        assert llm.config.seed == DEFAULTS["seed"]
    with LlamaPool(tiny_model_path, pool_size=2, config=config, n_batch=DEFAULTS["n_batch"]) as pool:
        assert pool.config.n_batch == DEFAULTS["n_batch"]


def test_unified_llm_honours_a_template_in_its_config(tiny_model_path: Path) -> None:
    template = "{{ bos_token }}{% for m in messages %}{{ m['content'] }}{% endfor %}"
    config = LlamaConfig(n_ctx=256, chat_template=template)
    with UnifiedLLM(tiny_model_path, config=config) as unified:
        assert unified.llama.config.chat_template == template
        answer = unified.llama.create_chat_completion(
            [{"role": "user", "content": "xy"}], max_tokens=2, temperature=0
        )
        assert answer["choices"][0]["message"]["content"] == "za"


def test_context_params_are_read_back_from_llama_cpp(tiny_model_path: Path) -> None:
    with Llama(tiny_model_path, n_ctx=256, n_batch=64, n_threads=2, verbose=False) as llm:
        assert llm.context_params == ContextParams(
            n_ctx=256,
            n_batch=64,
            n_ubatch=64,
            n_seq_max=1,
            n_threads=2,
            n_threads_batch=2,
            pooling_type=0,
            flash_attn_type=0,
            embeddings=False,
            offload_kqv=True,
            kv_unified=False,
            type_k=-1,
            type_v=-1,
            rope_scaling_type=-1,
            rope_freq_base=0.0,
            rope_freq_scale=0.0,
            yarn_ext_factor=-1.0,
            yarn_attn_factor=-1.0,
            yarn_beta_fast=-1.0,
            yarn_beta_slow=-1.0,
            yarn_orig_ctx=0,
        )
        with pytest.raises(dataclasses.FrozenInstanceError):
            llm.context_params.n_ctx = 8  # type: ignore[misc]
    # n_ctx=0 is the model's training context, as llama-cpp-python reports it; llama.cpp caps
    # n_ubatch at n_batch.
    with Llama(tiny_model_path, n_ctx=0, n_batch=64, n_ubatch=128, verbose=False) as llm:
        params = llm.context_params
        assert (params.n_ctx, params.n_batch, params.n_ubatch) == (4096, 64, 64)
        assert params.n_ctx == llm.n_ctx() == llm.model.n_ctx_train
    # What llama.cpp made of an embedding context: n_batch (512 asked) capped at the window
    # (a pooled sequence must fit one batch), 16 sequences over one unified cache.
    with Llama(tiny_model_path, n_ctx=256, embedding=True, pooling_type=1, verbose=False) as llm:
        params = llm.context_params
        assert (params.n_ctx, params.n_batch, params.n_ubatch, params.n_seq_max) == (256, 256, 256, 16)
        assert (params.embeddings, params.kv_unified, params.pooling_type) == (True, True, 1)


def test_context_params_need_a_context(tiny_model_path: Path) -> None:
    with Llama(tiny_model_path, vocab_only=True, verbose=False) as llm:
        with pytest.raises(LlamaError, match="loaded with vocab_only=True: it has no context"):
            _ = llm.context_params
        assert llm.model_params.vocab_only
    llm = Llama(tiny_model_path, n_ctx=256, verbose=False)
    llm.close()
    with pytest.raises(ClosedError, match="the context is closed"):
        _ = llm.context_params


def test_model_params(tiny_model_path: Path) -> None:
    with Llama(tiny_model_path, n_ctx=256, verbose=False) as llm:
        assert llm.model_params == ModelParams(
            n_gpu_layers=0,
            split_mode=1,
            main_gpu=0,
            tensor_split=(),
            load_mode=-1,
            use_mmap=True,
            use_mlock=False,
            vocab_only=False,
            kv_overrides={},
        )
    assert llm.model_params.load_mode == -1  # a record of the load: readable after close()
    overrides = {"tokenizer.ggml.add_bos_token": False}
    with Llama(tiny_model_path, n_ctx=256, use_mmap=False, kv_overrides=overrides, verbose=False) as llm:
        params = llm.model_params
        assert (params.load_mode, params.use_mmap, params.kv_overrides) == (0, False, overrides)


@pytest.mark.parametrize(
    ("options", "message"),
    [
        ({"n_ctx": -1}, "n_ctx must be an integer >= 0"),
        ({"n_batch": 0}, "n_batch must be an integer >= 1"),
        ({"n_threads": 0}, "n_threads must be an integer >= 1"),
        ({"pooling_type": 7}, r"pooling_type must be in \[-1, 4\]"),
        ({"split_mode": 4}, "split_mode must be 0, 1, 2 or 3"),
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
        Llama(tiny_model_path, n_ctx=256, kv_overrides=overrides)


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
