"""LoRA adapters on the tiny model: exact effects, scales, removal, persistence."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import pytest

from conftest import FrontEnd, completion_text
from llama_cpp import (
    GenerationStream,
    InvalidArgumentError,
    Llama,
    LlamaPool,
    ModelLoadError,
    SamplingParams,
)
from llama_cpp.testing import byte_token, write_tiny_lora

GREEDY = SamplingParams.greedy()
A, B, Z = (byte_token(ord(c)) for c in "abz")


@pytest.fixture(scope="module")
def lora_path(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """An adapter that makes 'a' be followed by 'z' instead of 'b'."""
    return write_tiny_lora(tmp_path_factory.mktemp("lora") / "a-to-z.gguf", {A: Z})


def test_applying_changes_the_output_and_removing_restores_it(front: FrontEnd, lora_path: Path) -> None:
    base = completion_text(front, "a", max_tokens=6, temperature=0)
    assert base == "bcdefg"
    adapter = front.load_lora(lora_path)
    assert front.loras == {adapter: 1.0}
    assert completion_text(front, "a", max_tokens=6, temperature=0) == "zazaza"
    front.remove_lora(adapter)
    assert front.loras == {}
    assert completion_text(front, "a", max_tokens=6, temperature=0) == base


def test_scale_is_applied(front: FrontEnd, lora_path: Path) -> None:
    adapter = front.load_lora(lora_path, scale=0.2)  # 2 * 0.2 < 1 - 2 * 0.2: the base wins
    assert completion_text(front, "a", max_tokens=4, temperature=0) == "bcde"
    front.set_lora_scale(adapter, 0.5)
    assert front.loras[adapter] == 0.5
    assert completion_text(front, "a", max_tokens=4, temperature=0) == "zaza"
    front.clear_lora()
    assert completion_text(front, "a", max_tokens=4, temperature=0) == "bcde"


def test_bad_scales_and_unknown_adapters_raise(front: FrontEnd, lora_path: Path) -> None:
    adapter = front.load_lora(lora_path)
    with pytest.raises(InvalidArgumentError, match="finite"):
        front.set_lora_scale(adapter, float("nan"))
    front.remove_lora(adapter)
    with pytest.raises(InvalidArgumentError, match="not applied"):
        front.remove_lora(adapter)
    with pytest.raises(InvalidArgumentError, match="not applied"):
        front.set_lora_scale(adapter, 1.0)


@pytest.fixture
def pool(tiny_model_path: Path) -> Iterator[LlamaPool]:
    with LlamaPool(tiny_model_path, pool_size=3, n_ctx=128, n_batch=64, verbose=False) as pool:
        yield pool


def test_each_pool_request_runs_with_its_own_adapters(pool: LlamaPool, lora_path: Path) -> None:
    adapter = pool.load_lora(lora_path)
    pool.clear_lora()  # loaded, not a default: requests name it
    streams = {
        "base": pool.submit("a", max_tokens=6, sampling=GREEDY),
        "lora": pool.submit("a", max_tokens=6, sampling=GREEDY, lora={adapter: 1.0}),
        "weak": pool.submit("a", max_tokens=6, sampling=GREEDY, lora={adapter: 0.2}),
    }
    texts = {name: "".join(iter_text(stream)) for name, stream in streams.items()}
    assert texts == {"base": "bcdefg", "lora": "zazaza", "weak": "bcdefg"}
    response = pool.create_completion("a", max_tokens=4, temperature=0, lora={adapter: 0.5})
    assert isinstance(response, dict)
    assert response["choices"][0]["text"] == "zaza"


def test_a_pool_never_reuses_a_prefix_computed_with_other_adapters(pool: LlamaPool, lora_path: Path) -> None:
    adapter = pool.load_lora(lora_path)
    first = pool.submit("zzzzzzzz a", max_tokens=2, sampling=GREEDY, lora={})
    assert "".join(iter_text(first)) == "bc"
    with_lora = pool.submit("zzzzzzzz a", max_tokens=2, sampling=GREEDY, lora={adapter: 1.0})
    assert "".join(iter_text(with_lora)) == "za"
    assert with_lora.n_reused == 0
    again = pool.submit("zzzzzzzz a", max_tokens=2, sampling=GREEDY, lora={adapter: 1.0})
    assert "".join(iter_text(again)) == "za"
    assert again.n_reused == 10  # BOS + 9 prompt tokens: the same adapters may share


def test_pool_lora_path_and_foreign_adapters(tiny_model_path: Path, lora_path: Path, tiny: Llama) -> None:
    with LlamaPool(
        tiny_model_path, pool_size=2, n_ctx=128, n_batch=64, lora_path=lora_path, verbose=False
    ) as pool:
        assert pool.generate("a", max_tokens=4, sampling=GREEDY) == "zaza"
        foreign = tiny.load_lora(lora_path)
        with pytest.raises(InvalidArgumentError, match="loaded for another model"):
            pool.submit("a", lora={foreign: 1.0})
        with pytest.raises(InvalidArgumentError, match="finite"):
            pool.submit("a", lora={next(iter(pool.loras)): float("inf")})


def iter_text(stream: GenerationStream) -> Iterator[str]:
    while (chunk := stream.next()) is not None:
        yield chunk.text


def test_adapters_persist_across_reset_and_state_loads(tiny: Llama, lora_path: Path) -> None:
    tiny.load_lora(lora_path)
    state = tiny.save_state()
    tiny.reset()
    assert tiny.generate("a", max_tokens=4, sampling=GREEDY) == "zaza"
    tiny.load_state(state)
    assert tiny.generate("a", max_tokens=4, sampling=GREEDY) == "zaza"
    assert len(tiny.loras) == 1


def test_changing_adapters_never_reuses_a_cache_computed_with_other_weights(
    tiny: Llama, lora_path: Path
) -> None:
    tiny.complete("zzzz a", max_tokens=1, sampling=GREEDY)
    adapter = tiny.load_lora(lora_path)
    after = tiny.complete("zzzz a", max_tokens=2, sampling=GREEDY)
    assert after.cached_tokens == 0
    assert after.text == "za"
    tiny.remove_lora(adapter)
    assert tiny.complete("zzzz a", max_tokens=2, sampling=GREEDY).cached_tokens == 0


def test_lora_path_in_the_constructor(tiny_model_path: Path, lora_path: Path) -> None:
    with Llama(tiny_model_path, n_ctx=256, lora_path=lora_path, lora_scale=1.0) as llm:
        assert llm.generate("a", max_tokens=4, sampling=GREEDY) == "zaza"
        assert [a.path for a in llm.loras] == [str(lora_path)]


def test_bad_adapters_raise(tiny: Llama, tmp_path: Path, tiny_model_path: Path, lora_path: Path) -> None:
    with pytest.raises(ModelLoadError, match="LoRA adapter not found"):
        tiny.load_lora(tmp_path / "missing.gguf")
    with pytest.raises(ModelLoadError, match="failed to load LoRA adapter"):
        tiny.load_lora(tiny_model_path)  # a model, not an adapter


def test_an_adapter_of_another_model_is_refused(tiny: Llama, tiny_model_path: Path, lora_path: Path) -> None:
    with Llama(tiny_model_path, n_ctx=256) as other:
        foreign = other.load_lora(lora_path)
        with pytest.raises(InvalidArgumentError, match="loaded for another model"):
            tiny.context.set_lora(foreign, 1.0)
