"""LoRA adapters on the tiny model: exact effects, scales, removal, persistence."""

from __future__ import annotations

from pathlib import Path

import pytest

from llama_cpp import InvalidArgumentError, Llama, ModelLoadError, SamplingParams
from llama_cpp.testing import byte_token, write_tiny_lora

GREEDY = SamplingParams.greedy()
A, B, Z = (byte_token(ord(c)) for c in "abz")


@pytest.fixture(scope="module")
def lora_path(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """An adapter that makes 'a' be followed by 'z' instead of 'b'."""
    return write_tiny_lora(tmp_path_factory.mktemp("lora") / "a-to-z.gguf", {A: Z})


def test_applying_changes_the_output_and_removing_restores_it(tiny: Llama, lora_path: Path) -> None:
    base = tiny.generate("a", max_tokens=6, sampling=GREEDY)
    assert base == "bcdefg"
    adapter = tiny.load_lora(lora_path)
    assert tiny.loras == {adapter: 1.0}
    assert tiny.generate("a", max_tokens=6, sampling=GREEDY) == "zazaza"
    tiny.remove_lora(adapter)
    assert tiny.loras == {}
    assert tiny.generate("a", max_tokens=6, sampling=GREEDY) == base


def test_scale_is_applied(tiny: Llama, lora_path: Path) -> None:
    adapter = tiny.load_lora(lora_path, scale=0.2)  # 2 * 0.2 < 1 - 2 * 0.2: the base wins
    assert tiny.generate("a", max_tokens=4, sampling=GREEDY) == "bcde"
    tiny.set_lora_scale(adapter, 0.5)
    assert tiny.loras[adapter] == 0.5
    assert tiny.generate("a", max_tokens=4, sampling=GREEDY) == "zaza"
    tiny.clear_lora()
    assert tiny.generate("a", max_tokens=4, sampling=GREEDY) == "bcde"


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
    adapter = tiny.load_lora(lora_path)
    with pytest.raises(InvalidArgumentError, match="finite"):
        tiny.set_lora_scale(adapter, float("nan"))
    tiny.remove_lora(adapter)
    with pytest.raises(InvalidArgumentError, match="not applied"):
        tiny.remove_lora(adapter)
    with pytest.raises(InvalidArgumentError, match="not applied"):
        tiny.set_lora_scale(adapter, 1.0)


def test_an_adapter_of_another_model_is_refused(tiny: Llama, tiny_model_path: Path, lora_path: Path) -> None:
    with Llama(tiny_model_path, n_ctx=256) as other:
        foreign = other.load_lora(lora_path)
        with pytest.raises(InvalidArgumentError, match="loaded for another model"):
            tiny.context.set_lora(foreign, 1.0)
