"""UnifiedLLM and model-family detection from GGUF metadata (llama_cpp.families)."""

from __future__ import annotations

import asyncio
from collections.abc import Iterator
from pathlib import Path

import pytest

from llama_cpp import InvalidArgumentError, Llama
from llama_cpp.errors import ClosedError
from llama_cpp.families import (
    FAMILIES,
    GEMMA_TEMPLATE,
    GENERIC,
    Match,
    Sampling,
    Thinking,
    detect_family,
    family_named,
)
from llama_cpp.unified import UnifiedLLM

# Which real template (llama.cpp's models/templates) stands for which family, with the
# architecture (src/llama-arch.cpp) and pre-tokenizer such a GGUF carries.
# (template file or None, general.architecture, tokenizer.ggml.pre, expected family)
DETECTION = [
    ("Qwen-Qwen3-0.6B.jinja", "qwen3", "qwen2", "qwen3"),
    ("Qwen-Qwen3-0.6B.jinja", "qwen3moe", "qwen2", "qwen3"),
    ("Qwen3-Coder.jinja", "qwen3moe", "qwen2", "qwen3-instruct-2507"),
    ("meta-llama-Llama-3.1-8B-Instruct.jinja", "llama", "llama-bpe", "llama-3"),
    ("meta-llama-Llama-3.2-3B-Instruct.jinja", "llama", "llama-bpe", "llama-3"),
    ("meta-llama-Llama-3.3-70B-Instruct.jinja", "llama", "llama-bpe", "llama-3"),
    ("google-gemma-2-2b-it.jinja", "gemma2", "default", "gemma"),
    ("mistralai-Mistral-Nemo-Instruct-2407.jinja", "llama", "tekken", "mistral"),
    ("Mistral-Small-3.2-24B-Instruct-2506.jinja", "llama", "tekken", "mistral"),
    ("unsloth-mistral-Devstral-Small-2507.jinja", "llama", "tekken", "mistral"),
    ("mistralai-Ministral-3-14B-Reasoning-2512.jinja", "mistral3", "tekken", "magistral"),
    ("microsoft-Phi-3.5-mini-instruct.jinja", "phi3", "default", "phi"),
    ("GLM-4.6.jinja", "glm4moe", "glm4", "glm-4.5"),
    # GLM-4.7-Flash converts to llama.cpp's deepseek2 architecture (conversion/glm.py).
    ("GLM-4.7-Flash.jinja", "deepseek2", "glm4", "glm-4.5"),
    ("openai-gpt-oss-120b.jinja", "gpt-oss", "gpt-4o", "gpt-oss"),
    ("deepseek-ai-DeepSeek-R1-Distill-Qwen-32B.jinja", "qwen2", "deepseek-r1-qwen", "deepseek-r1"),
    ("deepseek-ai-DeepSeek-R1-Distill-Llama-8B.jinja", "llama", "llama-bpe", "deepseek-r1"),
    ("openbmb-MiniCPM5-1B.jinja", "minicpm", "minicpm5", "minicpm"),
    ("ibm-granite-granite-3.3-2B-Instruct.jinja", "granite", "refact", "granite"),
    ("ibm-granite-granite-4.0.jinja", "granitehybrid", "refact", "granite"),
    ("ibm-granite-granite-4.1.jinja", "granitemoe", "refact", "granite"),
    # Metadata alone, without a template.
    (None, "glm4", "glm4", "glm-4"),
    (None, "chatglm", "chatglm-bpe", "glm-4"),
    (None, "gpt-oss", "gpt-4o", "gpt-oss"),
    (None, "phi3", "default", "phi"),
    (None, "minicpm3", "default", "minicpm"),
    (None, "qwen2", "deepseek-r1-qwen", "deepseek-r1"),
    (None, "llama", "minicpm5", "minicpm"),
    # Not of a listed family: the generic one (the template does the work).
    ("Qwen-Qwen2.5-7B-Instruct.jinja", "qwen2", "qwen2", "generic"),
    ("HuggingFaceTB-SmolLM3-3B.jinja", "smollm3", "llama-bpe", "generic"),
    ("llama-cpp-rwkv-world.jinja", "rwkv6", "default", "generic"),
    (None, "qwen3", "qwen2", "generic"),
]


def qwen3_2507_templates(source: str) -> tuple[str, str]:
    """Qwen3 Instruct-2507 and Thinking-2507's templates, from the hybrid Qwen3 one.

    llama.cpp ships no 2507 template; the released ones differ from Qwen3's in the generation
    prompt only: Instruct-2507 has no enable_thinking branch, Thinking-2507 always opens
    ``<think>``.
    """
    hybrid_prompt = (
        "    {{- '<|im_start|>assistant\\n' }}\n"
        "    {%- if enable_thinking is defined and enable_thinking is false %}\n"
        "        {{- '<think>\\n\\n</think>\\n\\n' }}\n"
        "    {%- endif %}\n"
    )
    assert hybrid_prompt in source
    instruct = source.replace(hybrid_prompt, "    {{- '<|im_start|>assistant\\n' }}\n")
    thinking = source.replace(hybrid_prompt, "    {{- '<|im_start|>assistant\\n<think>\\n' }}\n")
    assert "enable_thinking" not in instruct
    assert "enable_thinking" not in thinking
    return instruct, thinking


def metadata(template: str | None, architecture: str, pre: str) -> dict[str, str]:
    out = {"general.architecture": architecture, "tokenizer.ggml.pre": pre}
    if template is not None:
        out["tokenizer.chat_template"] = template
    return out


@pytest.mark.parametrize(("template", "architecture", "pre", "expected"), DETECTION)
def test_detects_family_from_metadata(
    llama_source_dir: Path, template: str | None, architecture: str, pre: str, expected: str
) -> None:
    source = (llama_source_dir / "models" / "templates" / template).read_text() if template else None
    assert detect_family(metadata(source, architecture, pre)).name == expected


def test_every_family_is_covered_by_the_detection_table() -> None:
    expected = {row[3] for row in DETECTION}
    names = {family.name for family in FAMILIES}
    assert names - expected == {"qwen3-thinking-2507"}  # covered below, from derived templates
    assert "generic" in expected


def test_qwen3_2507_variants_are_told_apart_by_their_templates(llama_source_dir: Path) -> None:
    hybrid = (llama_source_dir / "models" / "templates" / "Qwen-Qwen3-0.6B.jinja").read_text()
    instruct, thinking = qwen3_2507_templates(hybrid)
    assert detect_family(metadata(hybrid, "qwen3", "qwen2")).name == "qwen3"
    assert detect_family(metadata(instruct, "qwen3moe", "qwen2")).name == "qwen3-instruct-2507"
    assert detect_family(metadata(thinking, "qwen3moe", "qwen2")).name == "qwen3-thinking-2507"


def test_gemma3_from_the_default_models_metadata(default_model_path: Path) -> None:
    with Llama(default_model_path, vocab_only=True, verbose=False) as llm:
        meta = llm.metadata
    assert meta["general.architecture"] == "gemma3"
    assert "tokenizer.chat_template" not in meta  # this conversion ships no template
    assert detect_family(meta).name == "gemma"


def test_a_chat_template_override_wins_over_the_ggufs(llama_source_dir: Path) -> None:
    llama3 = (
        llama_source_dir / "models" / "templates" / "meta-llama-Llama-3.1-8B-Instruct.jinja"
    ).read_text()
    r1 = (
        llama_source_dir / "models" / "templates" / "deepseek-ai-DeepSeek-R1-Distill-Llama-8B.jinja"
    ).read_text()
    meta = metadata(llama3, "llama", "llama-bpe")
    assert detect_family(meta).name == "llama-3"
    assert detect_family(meta, chat_template=r1).name == "deepseek-r1"


def test_family_named() -> None:
    assert family_named("gpt-oss").reasoning == "effort"
    assert family_named("generic") is GENERIC
    with pytest.raises(InvalidArgumentError, match="unknown model family 'gpt-5'"):
        family_named("gpt-5")


def test_a_match_needs_a_condition() -> None:
    with pytest.raises(ValueError, match="a Match needs an architecture, a template text or a pre-tokenizer"):
        Match(template_lacks=("x",))


# -- thinking and sampling, as data --------------------------------------------------------


@pytest.mark.parametrize(
    ("family", "thinking", "variables"),
    [
        ("qwen3", None, {}),
        ("qwen3", True, {"enable_thinking": True}),
        ("qwen3", False, {"enable_thinking": False}),
        ("glm-4.5", False, {"enable_thinking": False}),
        ("gpt-oss", None, {}),
        ("gpt-oss", True, {"reasoning_effort": "medium"}),
        ("gpt-oss", False, {"reasoning_effort": "low"}),
        ("gpt-oss", "high", {"reasoning_effort": "high"}),
        ("deepseek-r1", True, {}),
        ("qwen3-thinking-2507", True, {}),
        ("gemma", False, {}),
        ("llama-3", None, {}),
    ],
)
def test_thinking_as_template_variables(
    family: str, thinking: Thinking, variables: dict[str, object]
) -> None:
    assert family_named(family).template_kwargs(thinking) == variables


@pytest.mark.parametrize(
    ("family", "thinking", "message"),
    [
        ("gemma", True, "gemma models do not reason; thinking=True is not available"),
        ("llama-3", True, "llama-3 models do not reason; thinking=True is not available"),
        ("deepseek-r1", False, "deepseek-r1 models always reason; thinking=False is not available"),
        ("magistral", False, "magistral models always reason; thinking=False is not available"),
        ("qwen3", "high", "qwen3 has no reasoning effort levels; pass thinking=True or False, not 'high'"),
        ("gpt-oss", "max", "thinking must be a bool, None or one of ('low', 'medium', 'high'), got 'max'"),
        ("gpt-oss", 1, "thinking must be a bool, None or one of ('low', 'medium', 'high'), got 1"),
    ],
)
def test_thinking_a_family_cannot_do_raises(family: str, thinking: Thinking, message: str) -> None:
    with pytest.raises(InvalidArgumentError) as error:
        family_named(family).template_kwargs(thinking)
    assert str(error.value) == message


def test_recommended_sampling_follows_thinking() -> None:
    qwen3 = family_named("qwen3")
    thinking = {"temperature": 0.6, "top_p": 0.95, "top_k": 20, "min_p": 0.0}
    assert qwen3.recommended_sampling(None).as_kwargs() == thinking
    assert qwen3.recommended_sampling(True).as_kwargs() == thinking
    assert qwen3.recommended_sampling(False).as_kwargs() == {
        "temperature": 0.7,
        "top_p": 0.8,
        "top_k": 20,
        "min_p": 0.0,
    }
    assert family_named("gemma").recommended_sampling(None) == Sampling(
        temperature=1.0, top_p=0.95, top_k=64, min_p=0.0
    )
    assert family_named("gpt-oss").recommended_sampling("low").as_kwargs() == {
        "temperature": 1.0,
        "top_p": 1.0,
        "top_k": 0,
        "min_p": 0.0,
    }
    assert family_named("deepseek-r1").recommended_sampling(True).as_kwargs() == {
        "temperature": 0.6,
        "top_p": 0.95,
    }
    assert family_named("phi").recommended_sampling(None).as_kwargs() == {}


# -- UnifiedLLM on the default model (Gemma 3 270M) -----------------------------------------


@pytest.fixture(scope="module")
def unified(default_model_path: Path) -> Iterator[UnifiedLLM]:
    with UnifiedLLM(default_model_path, n_threads=2, verbose=False) as llm:
        yield llm


def test_unified_opens_the_default_model_as_gemma(unified: UnifiedLLM) -> None:
    assert unified.family.name == "gemma"
    assert repr(unified).endswith("gemma-3-270m-q4_k_m.gguf', family='gemma')")
    # The family's cap (8192) is below the model's training context (32768).
    assert unified.llama.n_ctx() == 8192
    # The GGUF has no chat template: the family's is used (not llama.cpp's ChatML).
    assert unified.llama.config.chat_template == GEMMA_TEMPLATE
    prompt = unified.llama.render_chat(
        [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Hi"}]
    ).prompt
    assert prompt == "<start_of_turn>user\nBe brief.\n\nHi<end_of_turn>\n<start_of_turn>model\n"


def fresh(llm: UnifiedLLM) -> UnifiedLLM:
    """``llm`` with an empty KV cache. Gemma 3 (sliding-window attention) can pick another
    greedy token when a prompt prefix is reused from the cache, so comparisons start fresh."""
    llm.llama.reset()
    return llm


def test_chat_returns_the_answer(unified: UnifiedLLM) -> None:
    answer = fresh(unified).chat("What is the capital of France?", max_tokens=16, temperature=0.0)
    # Gemma 3 270M's greedy answer at the pinned llama.cpp (a small model, a poor answer).
    assert answer == "What is the capital of France? wnętr\nWhat is the capital of France?"
    assert fresh(unified).chat_with_thinking(
        "What is the capital of France?", max_tokens=16, temperature=0.0
    ) == (
        "",
        answer,
    )


def test_thinking_true_on_gemma_raises(unified: UnifiedLLM) -> None:
    with pytest.raises(InvalidArgumentError) as error:
        unified.chat("Hi", thinking=True, max_tokens=4)
    assert str(error.value) == "gemma models do not reason; thinking=True is not available"
    # False and None ask for nothing: the same prompt as without it.
    assert fresh(unified).chat("Hi", thinking=False, max_tokens=4, temperature=0.0) == fresh(unified).chat(
        "Hi", max_tokens=4, temperature=0.0
    )


def test_recommended_sampling_fills_only_what_the_caller_leaves_out(unified: UnifiedLLM) -> None:
    assert unified.chat_kwargs() == {"temperature": 1.0, "top_p": 0.95, "top_k": 64, "min_p": 0.0}
    assert unified.chat_kwargs(temperature=0.0, max_tokens=3) == {
        "temperature": 0.0,
        "top_p": 0.95,
        "top_k": 64,
        "min_p": 0.0,
        "max_tokens": 3,
    }


def test_thinking_and_a_thinking_variable_together_raise(unified: UnifiedLLM) -> None:
    with pytest.raises(InvalidArgumentError) as error:
        unified.chat_kwargs(False, chat_template_kwargs={"enable_thinking": False})
    assert str(error.value) == "pass thinking or enable_thinking, not both"
    with pytest.raises(InvalidArgumentError) as error:
        unified.chat_kwargs(False, reasoning_effort="low")
    assert str(error.value) == "pass thinking or reasoning_effort, not both"
    with pytest.raises(InvalidArgumentError) as error:
        unified.chat_kwargs(False, chat_template_kwargs={"reasoning_effort": "low"})
    assert str(error.value) == "pass thinking or reasoning_effort, not both"


def test_streamed_chat_matches_the_whole_answer(unified: UnifiedLLM) -> None:
    messages = [{"role": "user", "content": "Name a colour."}]
    whole = fresh(unified).create_chat_completion(messages, max_tokens=8, temperature=0.0)
    chunks = list(fresh(unified).create_chat_completion(messages, max_tokens=8, temperature=0.0, stream=True))
    assert chunks[0]["choices"][0]["delta"] == {"role": "assistant"}
    streamed = "".join(c["choices"][0]["delta"].get("content") or "" for c in chunks)
    assert streamed == whole["choices"][0]["message"]["content"]
    assert "reasoning_content" not in whole["choices"][0]["message"]
    assert chunks[-1]["choices"][0]["finish_reason"] == whole["choices"][0]["finish_reason"] == "length"


def test_async_twins_agree_with_sync(unified: UnifiedLLM) -> None:
    sync = fresh(unified).chat_with_thinking("Say hello.", max_tokens=6, temperature=0.0)

    async def both() -> tuple[tuple[str, str], str]:
        pair = await fresh(unified).chat_with_thinking_async("Say hello.", max_tokens=6, temperature=0.0)
        answer = await fresh(unified).chat_async("Say hello.", max_tokens=6, temperature=0.0)
        return pair, answer

    pair, answer = asyncio.run(asyncio.wait_for(both(), timeout=120))
    assert pair == sync
    assert answer == sync[1]


def test_from_llama_leaves_the_model_open(default_model_path: Path) -> None:
    with Llama(default_model_path, n_ctx=256, n_threads=2, verbose=False) as llm:
        wrapped = UnifiedLLM.from_llama(llm)
        assert wrapped.family.name == "gemma"
        wrapped.close()
        wrapped.close()  # idempotent
        with pytest.raises(ClosedError, match="this UnifiedLLM is closed"):
            _ = wrapped.llama
        assert llm.n_ctx() == 256  # still open


def test_an_explicit_n_ctx_and_family_win(default_model_path: Path) -> None:
    with UnifiedLLM(default_model_path, family=family_named("generic"), n_ctx=512, verbose=False) as llm:
        assert llm.family is GENERIC
        assert llm.llama.n_ctx() == 512
        assert llm.llama.config.chat_template is None  # no family template for a generic model
        with pytest.raises(InvalidArgumentError) as error:
            llm.chat_kwargs(True)
        assert str(error.value) == (
            "this generic model's chat template has no enable_thinking switch; thinking=True is not available"
        )
