"""Model families as data: how to recognise a GGUF's family and what its quirks are.

A family is recognised from the model's GGUF metadata, never from its file name: the
architecture (``general.architecture``), the chat template (``tokenizer.chat_template``) and
the pre-tokenizer (``tokenizer.ggml.pre``). :data:`FAMILIES` is an ordered table of
:class:`ModelFamily` values; :func:`detect_family` returns the first whose rules match, and
:data:`GENERIC` when none does (such a model still works through its own template).

The rest of a family's entry is what its model card and chat template say: how it reasons
(:data:`ReasoningStyle`), the sampling settings its authors recommend and a default cap on
the context window. Where a model's turn ends and where its reasoning starts are not here:
llama.cpp reads them from the vocabulary (end-of-generation tokens) and the chat template.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any, Literal

from llama_cpp.errors import InvalidArgumentError

__all__ = [
    "FAMILIES",
    "GEMMA_TEMPLATE",
    "GENERIC",
    "Match",
    "ModelFamily",
    "ReasoningEffort",
    "ReasoningStyle",
    "Sampling",
    "Thinking",
    "detect_family",
    "family_named",
]

#: How a family reasons.
#:
#: - ``"none"``: never; ``thinking=True`` is an error.
#: - ``"hybrid"``: a switch in the template, ``enable_thinking`` (Qwen3, GLM-4.5+, MiniCPM 4.1+).
#: - ``"always"``: every answer starts with its reasoning; ``thinking=False`` is an error.
#: - ``"effort"``: always reasons, at a ``reasoning_effort`` of low / medium / high (GPT-OSS).
ReasoningStyle = Literal["none", "hybrid", "always", "effort"]

#: GPT-OSS's reasoning efforts.
ReasoningEffort = Literal["low", "medium", "high"]

#: What callers ask for: a bool works for every family, an effort for ``"effort"`` families.
Thinking = bool | ReasoningEffort | None

_EFFORTS: tuple[ReasoningEffort, ...] = ("low", "medium", "high")

# GGUF metadata keys the rules read.
ARCHITECTURE_KEY = "general.architecture"
TEMPLATE_KEY = "tokenizer.chat_template"
PRE_TOKENIZER_KEY = "tokenizer.ggml.pre"


@dataclass(frozen=True, slots=True)
class Sampling:
    """Sampling settings a model card recommends; None leaves llama-cpp-python's default.

    Attributes:
        temperature: Softmax temperature.
        top_p: Nucleus sampling threshold.
        top_k: Keep the k most likely tokens (0 keeps all).
        min_p: Minimum probability relative to the most likely token.
    """

    temperature: float | None = None
    top_p: float | None = None
    top_k: int | None = None
    min_p: float | None = None

    def as_kwargs(self) -> dict[str, float | int]:
        """The settings that are set, as ``create_chat_completion`` keyword arguments."""
        values = {
            "temperature": self.temperature,
            "top_p": self.top_p,
            "top_k": self.top_k,
            "min_p": self.min_p,
        }
        return {name: value for name, value in values.items() if value is not None}


@dataclass(frozen=True, slots=True)
class Match:
    """One rule recognising a family; every condition that is set must hold.

    Attributes:
        architectures: ``general.architecture`` is one of these (empty: any).
        template_has: Texts that all occur in the chat template (Jinja source).
        template_lacks: Texts that none occur in the chat template.
        pre_tokenizers: ``tokenizer.ggml.pre`` is one of these (empty: any).
    """

    architectures: frozenset[str] = frozenset()
    template_has: tuple[str, ...] = ()
    template_lacks: tuple[str, ...] = ()
    pre_tokenizers: frozenset[str] = frozenset()

    def __post_init__(self) -> None:
        if not (self.architectures or self.template_has or self.pre_tokenizers):
            raise ValueError("a Match needs an architecture, a template text or a pre-tokenizer")

    def matches(self, architecture: str, template: str, pre_tokenizer: str) -> bool:
        """Whether a model with these metadata values satisfies the rule."""
        return (
            (not self.architectures or architecture in self.architectures)
            and (not self.pre_tokenizers or pre_tokenizer in self.pre_tokenizers)
            and all(text in template for text in self.template_has)
            and not any(text in template for text in self.template_lacks)
        )


@dataclass(frozen=True, slots=True)
class ModelFamily:
    """A model family's rules and quirks.

    Attributes:
        name: Short stable name (``"qwen3"``, ``"gpt-oss"``, ...).
        description: The models it covers.
        rules: The family matches when any rule does.
        reasoning: How it reasons (see :data:`ReasoningStyle`).
        sampling: Recommended sampling (for a hybrid family: with thinking off).
        thinking_sampling: Recommended sampling while thinking (hybrid families; None:
            same as ``sampling``).
        context_cap: The context window :class:`~llama_cpp.unified.UnifiedLLM` opens when
            none is given (or the model's training context, if smaller).
        fallback_template: The family's chat template, for GGUF files that lack one (some
            conversions ship none; llama.cpp would fall back to ChatML).
    """

    name: str
    description: str
    rules: tuple[Match, ...]
    reasoning: ReasoningStyle = "none"
    sampling: Sampling = field(default_factory=Sampling)
    thinking_sampling: Sampling | None = None
    context_cap: int = 8192
    fallback_template: str | None = None

    def matches(self, metadata: Mapping[str, str], chat_template: str | None = None) -> bool:
        """Whether a model with this GGUF metadata belongs to the family.

        Args:
            metadata: GGUF metadata (``Llama.metadata``).
            chat_template: A template used instead of the GGUF's, if any.
        """
        template = chat_template if chat_template is not None else metadata.get(TEMPLATE_KEY, "")
        architecture = metadata.get(ARCHITECTURE_KEY, "")
        pre = metadata.get(PRE_TOKENIZER_KEY, "")
        return any(rule.matches(architecture, template, pre) for rule in self.rules)

    def template_kwargs(self, thinking: Thinking) -> dict[str, Any]:
        """The chat template variables that ask this family for ``thinking``.

        ``None``: the template's default (none). Hybrid families: ``enable_thinking``. GPT-OSS
        (``"effort"``): ``reasoning_effort``; ``True`` is ``"medium"`` (its default), ``False``
        the least it allows, ``"low"`` (GPT-OSS always reasons). ``"always"`` families take
        ``True``, no template variable.

        Raises:
            InvalidArgumentError: The family cannot do it: ``True`` for a family without
                reasoning, ``False`` for one that always reasons, an effort for a family
                without effort levels, or an unknown value.
        """
        if thinking is None:
            return {}
        if isinstance(thinking, str):
            if thinking not in _EFFORTS:
                raise InvalidArgumentError(
                    f"thinking must be a bool, None or one of {_EFFORTS}, got {thinking!r}"
                )
            if self.reasoning != "effort":
                raise InvalidArgumentError(
                    f"{self.name} has no reasoning effort levels; "
                    f"pass thinking=True or False, not {thinking!r}"
                )
            return {"reasoning_effort": thinking}
        if not isinstance(thinking, bool):
            raise InvalidArgumentError(
                f"thinking must be a bool, None or one of {_EFFORTS}, got {thinking!r}"
            )
        if self.reasoning == "none" and thinking:
            raise InvalidArgumentError(f"{self.name} models do not reason; thinking=True is not available")
        if self.reasoning == "always" and not thinking:
            raise InvalidArgumentError(f"{self.name} models always reason; thinking=False is not available")
        if self.reasoning == "hybrid":
            return {"enable_thinking": thinking}
        if self.reasoning == "effort":
            return {"reasoning_effort": "medium" if thinking else "low"}
        return {}

    def recommended_sampling(self, thinking: Thinking) -> Sampling:
        """The recommended sampling for a request: a hybrid family's thinking settings
        unless ``thinking`` is False (its templates think by default)."""
        if self.thinking_sampling is not None and thinking is not False:
            return self.thinking_sampling
        return self.sampling


#: Gemma 2 / 3's chat template (google/gemma-3-*-it, text only): the system message is
#: prepended to the first user turn, the assistant's role is "model".
GEMMA_TEMPLATE = (
    "{{ bos_token }}"
    "{%- if messages[0]['role'] == 'system' -%}"
    "{%- set first_user_prefix = messages[0]['content'] + '\n\n' -%}"
    "{%- set loop_messages = messages[1:] -%}"
    "{%- else -%}"
    "{%- set first_user_prefix = '' -%}"
    "{%- set loop_messages = messages -%}"
    "{%- endif -%}"
    "{%- for message in loop_messages -%}"
    "{%- if (message['role'] == 'user') != (loop.index0 % 2 == 0) -%}"
    "{{ raise_exception('Conversation roles must alternate user/assistant/user/assistant/...') }}"
    "{%- endif -%}"
    "{%- set role = 'model' if message['role'] == 'assistant' else message['role'] -%}"
    "{{ '<start_of_turn>' + role + '\n' + (first_user_prefix if loop.first else '') }}"
    "{{ message['content'] | trim }}"
    "{{ '<end_of_turn>\n' }}"
    "{%- endfor -%}"
    "{%- if add_generation_prompt -%}{{ '<start_of_turn>model\n' }}{%- endif -%}"
)
_QWEN3 = frozenset({"qwen3", "qwen3moe"})
# Qwen's model cards (Qwen3, and the 2507 Instruct / Thinking releases).
_QWEN_THINKING = Sampling(temperature=0.6, top_p=0.95, top_k=20, min_p=0.0)
_QWEN_INSTRUCT = Sampling(temperature=0.7, top_p=0.8, top_k=20, min_p=0.0)

#: The known families, most specific first: :func:`detect_family` takes the first match.
FAMILIES: tuple[ModelFamily, ...] = (
    ModelFamily(
        name="deepseek-r1",
        description="DeepSeek-R1 distills (Qwen 2.5 and Llama 3 based)",
        rules=(
            # The R1 template opens every answer with <think> after its role tag, written with
            # fullwidth vertical bars (U+FF5C).
            Match(
                architectures=frozenset({"qwen2", "llama"}),
                template_has=("<\uff5cAssistant\uff5c>", "<think>"),
            ),
            # llama.cpp's converter names the Qwen-based distills' pre-tokenizer.
            Match(architectures=frozenset({"qwen2"}), pre_tokenizers=frozenset({"deepseek-r1-qwen"})),
        ),
        reasoning="always",
        sampling=Sampling(temperature=0.6, top_p=0.95),
        context_cap=16384,
    ),
    ModelFamily(
        name="qwen3-thinking-2507",
        description="Qwen3 Thinking-2507 (always thinks: the generation prompt opens <think>)",
        rules=(Match(architectures=_QWEN3, template_has=("<|im_start|>assistant\\n<think>\\n",)),),
        reasoning="always",
        sampling=_QWEN_THINKING,
        context_cap=16384,
    ),
    ModelFamily(
        name="qwen3",
        description="Qwen3 hybrid thinking models (enable_thinking switch in the template)",
        rules=(Match(architectures=_QWEN3, template_has=("enable_thinking",)),),
        reasoning="hybrid",
        sampling=_QWEN_INSTRUCT,
        thinking_sampling=_QWEN_THINKING,
        context_cap=16384,
    ),
    ModelFamily(
        name="qwen3-instruct-2507",
        description="Qwen3 Instruct-2507 and Qwen3-Coder (no thinking)",
        rules=(Match(architectures=_QWEN3, template_has=("<|im_start|>",)),),
        sampling=_QWEN_INSTRUCT,
    ),
    ModelFamily(
        name="gpt-oss",
        description="OpenAI gpt-oss (harmony format: analysis / final channels, reasoning effort)",
        rules=(Match(architectures=frozenset({"gpt-oss"})), Match(template_has=("<|channel|>", "<|start|>"))),
        # <|end|> closes each message, including the analysis before the final answer: only
        # <|return|> (answer done) and <|call|> (tool call) end the turn.
        reasoning="effort",
        # The card: temperature 1.0, top_p 1.0 (the whole distribution, no other cut).
        sampling=Sampling(temperature=1.0, top_p=1.0, top_k=0, min_p=0.0),
        context_cap=16384,
    ),
    ModelFamily(
        name="glm-4.5",
        description="GLM-4.5, 4.6, 4.7 (hybrid thinking)",
        rules=(
            Match(template_has=("[gMASK]", "enable_thinking")),
            Match(architectures=frozenset({"glm4moe"})),
        ),
        reasoning="hybrid",
        sampling=Sampling(temperature=1.0, top_p=0.95),
        context_cap=16384,
    ),
    ModelFamily(
        name="glm-4",
        description="GLM-4 (0414) and ChatGLM",
        rules=(Match(architectures=frozenset({"glm4", "chatglm"})), Match(template_has=("[gMASK]",))),
    ),
    ModelFamily(
        name="magistral",
        description="Magistral and Ministral 3 Reasoning ([THINK] blocks)",
        rules=(Match(template_has=("[THINK]", "[INST]")),),
        reasoning="always",
        sampling=Sampling(temperature=0.7, top_p=0.95),
        context_cap=16384,
    ),
    ModelFamily(
        name="mistral",
        description="Mistral, Mistral Nemo / Small, Ministral, Devstral ([INST] format)",
        rules=(
            Match(architectures=frozenset({"mistral3"})),
            # Llama 2 also writes [INST], with a <<SYS>> block.
            Match(template_has=("[INST]", "[/INST]"), template_lacks=("<<SYS>>",)),
        ),
        # Mistral Small 3.x's card (Nemo's says 0.3): low temperatures.
        sampling=Sampling(temperature=0.15),
    ),
    ModelFamily(
        name="llama-3",
        description="Llama 3.0 to 3.3 Instruct",
        rules=(Match(template_has=("<|start_header_id|>", "<|eot_id|>")),),
        # generation_config.json of the 3.1 / 3.2 / 3.3 Instruct models.
        sampling=Sampling(temperature=0.6, top_p=0.9),
    ),
    ModelFamily(
        name="gemma",
        description="Gemma, Gemma 2 and Gemma 3",
        rules=(
            Match(architectures=frozenset({"gemma", "gemma2", "gemma3", "gemma3n"})),
            Match(template_has=("<start_of_turn>", "<end_of_turn>")),
        ),
        # Gemma 3's recommended settings.
        sampling=Sampling(temperature=1.0, top_p=0.95, top_k=64, min_p=0.0),
        fallback_template=GEMMA_TEMPLATE,
    ),
    ModelFamily(
        name="phi",
        description="Phi-3, Phi-3.5 and Phi-4",
        rules=(
            Match(architectures=frozenset({"phi3", "phimoe"})),
            Match(template_has=("<|assistant|>", "<|end|>")),
        ),
        # Phi-3/3.5 and Phi-4-mini end turns with <|end|>, Phi-4 with <|im_end|>.
    ),
    ModelFamily(
        name="granite",
        description="IBM Granite 3.x and 4.x",
        rules=(
            Match(architectures=frozenset({"granite", "granitemoe", "granitehybrid"})),
            Match(template_has=("<|start_of_role|>",)),
        ),
    ),
    ModelFamily(
        name="minicpm",
        description="MiniCPM (4.1 and later switch thinking with enable_thinking)",
        rules=(
            Match(architectures=frozenset({"minicpm", "minicpm3"})),
            Match(pre_tokenizers=frozenset({"minicpm5"})),
        ),
        reasoning="hybrid",
        # MiniCPM4's card.
        sampling=Sampling(temperature=0.7, top_p=0.7),
    ),
)

#: Models of no known family: the template decides everything; ``thinking`` toggles
#: ``enable_thinking`` where the template reads it.
GENERIC = ModelFamily(
    name="generic",
    description="any other model, through its own chat template",
    rules=(),
    reasoning="hybrid",
)


def detect_family(metadata: Mapping[str, str], chat_template: str | None = None) -> ModelFamily:
    """The family of a model with this GGUF metadata, or :data:`GENERIC`.

    Args:
        metadata: GGUF metadata (``Llama.metadata``): ``general.architecture``,
            ``tokenizer.chat_template`` and ``tokenizer.ggml.pre`` are read.
        chat_template: A template used instead of the GGUF's, if any.

    Returns:
        The first entry of :data:`FAMILIES` that matches.
    """
    return next((family for family in FAMILIES if family.matches(metadata, chat_template)), GENERIC)


def family_named(name: str) -> ModelFamily:
    """The family called ``name`` (``"generic"`` included).

    Raises:
        InvalidArgumentError: No family has that name.
    """
    for family in (*FAMILIES, GENERIC):
        if family.name == name:
            return family
    raise InvalidArgumentError(
        f"unknown model family {name!r}; known: {[f.name for f in (*FAMILIES, GENERIC)]}"
    )
