"""Each model family's real chat template, rendered and parsed by llama.cpp's chat code.

For every family: the template (llama.cpp's models/templates) on a vocab-only GGUF renders a
golden conversation with a tool call; the prompt must show the family's markers and end with
its generation prompt. Then a golden model output, taken from llama.cpp's
tests/test-chat.cpp for that template (or written in the format the template itself
describes, where that file has none: noted per case), is parsed into tool calls and
reasoning.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pytest

from llama_cpp import InvalidArgumentError, Llama, RenderedChat
from llama_cpp.families import GEMMA_TEMPLATE, detect_family

TOOLS = [
    {
        "type": "function",
        "function": {
            "name": "special_function",
            "description": "I'm special",
            "parameters": {
                "type": "object",
                "properties": {"arg1": {"type": "integer", "description": "The arg."}},
                "required": ["arg1"],
            },
        },
    }
]
CONVERSATION: list[dict[str, Any]] = [
    {"role": "system", "content": "You are a helpful assistant."},
    {"role": "user", "content": "Call the special function."},
    {
        "role": "assistant",
        "content": "",
        "tool_calls": [
            {
                "id": "call12345",
                "type": "function",
                "function": {"name": "special_function", "arguments": '{"arg1": 1}'},
            }
        ],
    },
    # Mistral's templates want 9 alphanumeric characters as the call id.
    {"role": "tool", "tool_call_id": "call12345", "content": "42"},
    # Mistral's templates insist on an assistant turn between a tool result and a user turn.
    {"role": "assistant", "content": "It says 42."},
    {"role": "user", "content": "Thanks! What now?"},
]
# The same without the tool turns, for templates that reject a tool message.
PLAIN_CONVERSATION: list[dict[str, Any]] = [
    CONVERSATION[0],
    CONVERSATION[1],
    CONVERSATION[4],
    CONVERSATION[5],
]
CALL = [("special_function", {"arg1": 1})]
DEFAULT_MODEL = "default model"  # the Gemma 3 GGUF's vocabulary


@dataclass(frozen=True)
class Case:
    """One family's template, how it renders the conversation and how it parses an answer.

    Attributes:
        family: The family the template's metadata is detected as.
        template: File in llama.cpp's models/templates (or GEMMA_TEMPLATE's name).
        vocab: ggml-vocab-<vocab>.gguf of llama.cpp's models/, or DEFAULT_MODEL.
        architecture: general.architecture of such a model.
        kwargs: render_chat options (enable_thinking, reasoning_format, template variables).
        prompt_has: Texts the prompt contains, in this order.
        generation_prompt: What the prompt ends with (the answer's start).
        output: The model's text after the generation prompt.
        content: The parsed answer.
        reasoning: The parsed reasoning.
        calls: The parsed tool calls, (name, arguments).
        tool_turns_error: The error llama.cpp raises for the conversation's tool turns when
            the template rejects them (then PLAIN_CONVERSATION is rendered instead).
        describes_tools: Whether the prompt names the tool (False: the template neither
            describes tools nor shows past calls, and llama.cpp adds nothing).
        xfail: Why llama.cpp's own golden answer does not parse here (a known divergence).
        reported_generation_prompt: ChatParams.generation_prompt where llama.cpp's differs
            from the prompt's actual ending.
    """

    family: str
    template: str
    vocab: str
    architecture: str
    kwargs: dict[str, Any] = field(default_factory=dict)
    prompt_has: tuple[str, ...] = ()
    generation_prompt: str = ""
    output: str = ""
    content: str = ""
    reasoning: str = ""
    calls: list[tuple[str, dict[str, Any]]] = field(default_factory=list)
    tool_turns_error: str = ""
    describes_tools: bool = True
    xfail: str = ""
    reported_generation_prompt: str | None = None


ALTERNATE = "Conversation roles must alternate user/assistant/user/assistant/..."
HERMES_CALL = '<tool_call>\n{"name": "special_function", "arguments": {"arg1": 1}}\n</tool_call>'
# DeepSeek's special tokens are written with fullwidth vertical bars (U+FF5C).
R1_CALL = (
    "<\uff5ctool▁calls▁begin\uff5c><\uff5ctool▁call▁begin\uff5c>function<\uff5ctool▁sep\uff5c>special_function\n"
    '```json\n{"arg1": 1}```<\uff5ctool▁call▁end\uff5c><\uff5ctool▁calls▁end\uff5c>'
)

CASES = {
    # Qwen3: test-chat.cpp has no answer for this template; Qwen2.5 / Hermes' <tool_call>
    # golden is the format the template describes, after a <think> block.
    "qwen3-thinking": Case(
        family="qwen3",
        template="Qwen-Qwen3-0.6B.jinja",
        vocab="qwen2",
        architecture="qwen3",
        prompt_has=(
            "<|im_start|>system\nYou are a helpful assistant.\n\n# Tools",
            '"name": "special_function", "description": "I\'m special"',
            "<|im_start|>assistant\n" + HERMES_CALL + "<|im_end|>",
            "<|im_start|>user\n<tool_response>\n42\n</tool_response><|im_end|>",
            "<|im_start|>user\nThanks! What now?<|im_end|>",
        ),
        generation_prompt="<|im_start|>assistant\n",
        output="<think>\nI'm\nthinking\n</think>\n\n" + HERMES_CALL,
        reasoning="I'm\nthinking\n",
        calls=CALL,
    ),
    "qwen3-no-thinking": Case(
        family="qwen3",
        template="Qwen-Qwen3-0.6B.jinja",
        vocab="qwen2",
        architecture="qwen3",
        kwargs={"enable_thinking": False},
        prompt_has=("<|im_start|>user\nThanks! What now?<|im_end|>",),
        # Thinking off: the template writes an empty think block.
        generation_prompt="<|im_start|>assistant\n<think>\n\n</think>\n\n",
        output=HERMES_CALL,
        calls=CALL,
    ),
    "llama-3.1": Case(
        family="llama-3",
        template="meta-llama-Llama-3.1-8B-Instruct.jinja",
        vocab="llama-bpe",
        architecture="llama",
        prompt_has=(
            "<|start_header_id|>system<|end_header_id|>\n\nEnvironment: ipython\n",
            "You are a helpful assistant.<|eot_id|>",
            '"name": "special_function",\n        "description": "I\'m special"',
            '<|start_header_id|>assistant<|end_header_id|>\n\n{"name": "special_function", '
            '"parameters": {"arg1": 1}}<|eot_id|>',
            '<|start_header_id|>ipython<|end_header_id|>\n\n"42"<|eot_id|>',
        ),
        generation_prompt="<|start_header_id|>assistant<|end_header_id|>\n\n",
        # test-chat.cpp has only plain answers for Llama 3.x; the call is in the JSON form
        # the template asks for ({"name", "parameters"}).
        output='{"name": "special_function", "parameters": {"arg1": 1}}',
        calls=CALL,
    ),
    "llama-3.2": Case(
        family="llama-3",
        template="meta-llama-Llama-3.2-3B-Instruct.jinja",
        vocab="llama-bpe",
        architecture="llama",
        prompt_has=('"name": "special_function",\n        "description": "I\'m special"',),
        generation_prompt="<|start_header_id|>assistant<|end_header_id|>\n\n",
        output="Hello, world!\nWhat's up?",
        content="Hello, world!\nWhat's up?",
    ),
    # Gemma 2 / 3's templates know no tools and no tool role: the tool turn breaks their
    # user/model alternation and llama.cpp raises the template's error. Without tool turns,
    # tools offered are not described and answers parse as plain content.
    "gemma-2": Case(
        family="gemma",
        template="google-gemma-2-2b-it.jinja",
        vocab=DEFAULT_MODEL,
        architecture="gemma2",
        prompt_has=(
            "<start_of_turn>user\n",
            "<end_of_turn>\n<start_of_turn>user\nThanks! What now?<end_of_turn>\n",
        ),
        generation_prompt="<start_of_turn>model\n",
        output="Hello, world!\nWhat's up?",
        content="Hello, world!\nWhat's up?",
        tool_turns_error=ALTERNATE,
        describes_tools=False,
    ),
    "gemma-3": Case(
        family="gemma",
        template="GEMMA_TEMPLATE",
        vocab=DEFAULT_MODEL,
        architecture="gemma3",
        prompt_has=("<start_of_turn>user\n", "<start_of_turn>user\nThanks! What now?<end_of_turn>\n"),
        generation_prompt="<start_of_turn>model\n",
        output="Hello, world!",
        content="Hello, world!",
        tool_turns_error=ALTERNATE,
        describes_tools=False,
    ),
    "mistral-nemo": Case(
        family="mistral",
        template="mistralai-Mistral-Nemo-Instruct-2407.jinja",
        vocab="llama-spm",
        architecture="llama",
        prompt_has=(
            '[AVAILABLE_TOOLS][{"type": "function", "function": {"name": "special_function"',
            "[INST]",
        ),
        generation_prompt="",
        output='[TOOL_CALLS][{"name": "special_function", "arguments": {"arg1": 1}, "id": "123456789"}]',
        calls=CALL,
    ),
    "mistral-small-3.2": Case(
        family="mistral",
        template="Mistral-Small-3.2-24B-Instruct-2506.jinja",
        vocab="llama-spm",
        architecture="mistral3",
        prompt_has=(
            "[SYSTEM_PROMPT]You are a helpful assistant.[/SYSTEM_PROMPT]",
            "[AVAILABLE_TOOLS]",
            "[INST]",
        ),
        generation_prompt="",
        output='[TOOL_CALLS]special_function[CALL_ID]123456789[ARGS]{"arg1": 1}',
        calls=CALL,
        xfail="test-chat.cpp's golden call comes back as plain content (unparsed peg-native output)",
    ),
    "ministral-3-reasoning": Case(
        family="magistral",
        template="mistralai-Ministral-3-14B-Reasoning-2512.jinja",
        vocab="llama-spm",
        architecture="mistral3",
        prompt_has=("[AVAILABLE_TOOLS]", "[INST]"),
        generation_prompt="",
        output="[THINK]I'm\nthinking[/THINK]" + '[TOOL_CALLS]special_function[ARGS]{"arg1":1}',
        reasoning="I'm\nthinking",
        calls=CALL,
    ),
    # Phi-3.5: test-chat.cpp has no answer for it; its template knows no tools.
    "phi-3.5": Case(
        family="phi",
        template="microsoft-Phi-3.5-mini-instruct.jinja",
        vocab="phi-3",
        architecture="phi3",
        prompt_has=("<|system|>\n", "<|user|>\nThanks! What now?<|end|>\n"),
        generation_prompt="<|assistant|>\n",
        output="Hello, world!",
        content="Hello, world!",
        describes_tools=False,
        # llama.cpp finds the generation prompt by diffing two renderings; the shared "<|"
        # of "<|end|>" and "<|assistant|>" is cut off its front.
        reported_generation_prompt="assistant|>\n",
    ),
    "glm-4.6": Case(
        family="glm-4.5",
        template="GLM-4.6.jinja",
        vocab="qwen2",
        architecture="glm4moe",
        prompt_has=("[gMASK]<sop><|system|>", "special_function", "<|user|>\nThanks! What now?"),
        generation_prompt="<|assistant|>",
        output="<think>I'm\nthinking</think>\n<tool_call>special_function\n<arg_key>arg1</arg_key>\n"
        "<arg_value>1</arg_value>\n</tool_call>",
        reasoning="I'm\nthinking",
        calls=CALL,
    ),
    "glm-4.7-flash": Case(
        family="glm-4.5",
        template="GLM-4.7-Flash.jinja",
        vocab="qwen2",
        architecture="deepseek2",
        prompt_has=("[gMASK]<sop><|system|>", "special_function", "<|user|>Thanks! What now?"),
        generation_prompt="<|assistant|><think>",
        output="I'm\nthinking</think><tool_call>special_function<arg_key>arg1</arg_key><arg_value>1</arg_value>"
        "</tool_call>",
        reasoning="I'm\nthinking",
        calls=CALL,
    ),
    "gpt-oss": Case(
        family="gpt-oss",
        template="openai-gpt-oss-120b.jinja",
        vocab="llama-bpe",
        architecture="gpt-oss",
        kwargs={"reasoning_effort": "high"},
        prompt_has=(
            "<|start|>system<|message|>",
            "Reasoning: high",
            "// I'm special\ntype special_function = (_: {",
            "<|start|>user<|message|>Thanks! What now?<|end|>",
        ),
        generation_prompt="<|start|>assistant",
        output="<|channel|>analysis<|message|>I'm\nthinking<|end|>"
        "<|start|>assistant to=functions.special_function"
        '<|channel|>commentary json<|message|>{"arg1": 1}',
        reasoning="I'm\nthinking",
        calls=CALL,
    ),
    "deepseek-r1-qwen": Case(
        family="deepseek-r1",
        template="deepseek-ai-DeepSeek-R1-Distill-Qwen-32B.jinja",
        vocab="qwen2",
        architecture="qwen2",
        prompt_has=(
            "<\uff5cUser\uff5c>Call the special function.<\uff5cAssistant\uff5c>",
            "<\uff5cUser\uff5c>Thanks! What now?",
        ),
        generation_prompt="<\uff5cAssistant\uff5c><think>\n",
        output="I'm\nthinking</think>" + R1_CALL,
        reasoning="\nI'm\nthinking",
        calls=CALL,
    ),
    "deepseek-r1-llama": Case(
        family="deepseek-r1",
        template="deepseek-ai-DeepSeek-R1-Distill-Llama-8B.jinja",
        vocab="llama-bpe",
        architecture="llama",
        prompt_has=(
            "<\uff5cUser\uff5c>Call the special function.<\uff5cAssistant\uff5c>",
            "<\uff5cUser\uff5c>Thanks! What now?",
        ),
        generation_prompt="<\uff5cAssistant\uff5c><think>\n",
        output="I'm\nthinking</think>Hello, world!\nWhat's up?",
        content="Hello, world!\nWhat's up?",
        reasoning="\nI'm\nthinking",
        # This template drops past tool calls and does not describe tools.
        describes_tools=False,
    ),
    "minicpm5": Case(
        family="minicpm",
        template="openbmb-MiniCPM5-1B.jinja",
        vocab="qwen2",
        architecture="minicpm",
        kwargs={"enable_thinking": False},
        prompt_has=(
            "<|im_start|>system\n",
            "special_function",
            "<|im_start|>user\nThanks! What now?<|im_end|>",
        ),
        generation_prompt="<|im_start|>assistant\n<think>\n\n</think>\n\n",
        output='<function name="special_function"><param name="arg1">1</param></function>',
        calls=CALL,
    ),
    "granite-3.3": Case(
        family="granite",
        template="ibm-granite-granite-3.3-2B-Instruct.jinja",
        vocab="llama-bpe",
        architecture="granite",
        kwargs={"reasoning_format": "deepseek"},
        prompt_has=("<|start_of_role|>system<|end_of_role|>", "special_function", "<|end_of_text|>"),
        generation_prompt="<|start_of_role|>assistant<|end_of_role|>",
        output="<think>I'm\nthinking</think>Hello, world!\nWhat's up?",
        content="Hello, world!\nWhat's up?",
        reasoning="I'm\nthinking",
    ),
    "granite-4.0": Case(
        family="granite",
        template="ibm-granite-granite-4.0.jinja",
        vocab="llama-bpe",
        architecture="granitehybrid",
        prompt_has=("<|start_of_role|>system<|end_of_role|>", "special_function", "<|end_of_text|>"),
        generation_prompt="<|start_of_role|>assistant<|end_of_role|>",
        output=HERMES_CALL,
        calls=CALL,
    ),
}


@pytest.fixture(scope="module")
def vocabs(llama_source_dir: Path, default_model_path: Path) -> dict[str, Path]:
    """Vocab-only models by name, opened once each (a template is set per case via Llama)."""
    return {DEFAULT_MODEL: default_model_path} | {
        name: llama_source_dir / "models" / f"ggml-vocab-{name}.gguf"
        for name in ("qwen2", "llama-bpe", "llama-spm", "phi-3")
    }


def template_source(llama_source_dir: Path, name: str) -> str:
    if name == "GEMMA_TEMPLATE":
        return GEMMA_TEMPLATE
    return (llama_source_dir / "models" / "templates" / name).read_text()


@pytest.fixture(params=sorted(CASES), ids=sorted(CASES))
def case(request: pytest.FixtureRequest) -> Case:
    return CASES[request.param]


@pytest.fixture
def rendered(case: Case, vocabs: dict[str, Path], llama_source_dir: Path) -> RenderedChat:
    source = template_source(llama_source_dir, case.template)
    with Llama(vocabs[case.vocab], vocab_only=True, chat_template=source, verbose=False) as llm:
        if not case.tool_turns_error:
            return llm.render_chat(CONVERSATION, tools=TOOLS, chat_template_kwargs=case.kwargs)
        with pytest.raises(InvalidArgumentError) as error:
            llm.render_chat(CONVERSATION, tools=TOOLS, chat_template_kwargs=case.kwargs)
        assert str(error.value).startswith("the chat template failed: ")
        assert str(error.value).endswith(f"Error: Jinja Exception: {case.tool_turns_error}")
        return llm.render_chat(PLAIN_CONVERSATION, tools=TOOLS, chat_template_kwargs=case.kwargs)


def test_the_template_is_detected_as_its_family(case: Case, llama_source_dir: Path) -> None:
    meta = {
        "general.architecture": case.architecture,
        "tokenizer.chat_template": template_source(llama_source_dir, case.template),
    }
    assert detect_family(meta).name == case.family


def test_prompt_shows_the_conversation_in_the_familys_format(case: Case, rendered: RenderedChat) -> None:
    prompt = rendered.prompt
    position = 0
    for text in case.prompt_has:
        found = prompt.find(text, position)
        assert found >= 0, f"{text!r} not in the prompt after position {position}:\n{prompt}"
        position = found + len(text)
    assert ("special_function" in prompt) == case.describes_tools
    assert prompt.endswith(case.generation_prompt)
    reported = case.reported_generation_prompt
    assert rendered.generation_prompt == (case.generation_prompt if reported is None else reported)


def test_golden_answer_parses(case: Case, rendered: RenderedChat, request: pytest.FixtureRequest) -> None:
    if case.xfail:
        request.applymarker(pytest.mark.xfail(reason=case.xfail, strict=True))
    message = rendered.parse(case.output)
    calls = [
        (c["function"]["name"], json.loads(c["function"]["arguments"])) for c in message.get("tool_calls", [])
    ]
    assert calls == case.calls
    assert message.get("reasoning_content", "") == case.reasoning
    assert (message["content"] or "") == case.content
