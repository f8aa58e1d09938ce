"""llama-cpp-python's built-in chat formats, rendered in Python: ``"llama-2"`` (its fallback
for models without a template) and ``"chatml"``. Models with a Jinja template are rendered by
llama.cpp's own engine instead (:mod:`llama_cpp.chat`)."""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

from llama_cpp.errors import InvalidArgumentError

Message = Mapping[str, Any]


@dataclass(frozen=True, slots=True)
class ChatPrompt:
    """A rendered conversation.

    Attributes:
        prompt: The text to complete.
        stop: Stop strings the format adds (e.g. its end-of-turn text).
    """

    prompt: str
    stop: list[str] = field(default_factory=list)


ChatFormatter = Callable[..., ChatPrompt]  # (messages, **template_kwargs) -> ChatPrompt


def _content(message: Message) -> str | None:
    """A message's text: its string content, or its OpenAI content parts' text joined.

    Raises:
        InvalidArgumentError: A part that is not text (these formats carry text only).
    """
    content = message.get("content")
    if content is None or isinstance(content, str):
        return content
    texts = []
    for part in content if isinstance(content, list) else [content]:
        if not (
            isinstance(part, Mapping) and part.get("type") == "text" and isinstance(part.get("text"), str)
        ):
            raise InvalidArgumentError(
                f"this chat format carries text only: content part {part!r} is not "
                "{'type': 'text', 'text': ...}"
            )
        texts.append(part["text"])
    return "".join(texts)


def format_llama2(messages: Sequence[Message], **kwargs: Any) -> ChatPrompt:
    """llama-cpp-python's ``"llama-2"`` format (its fallback for models without a template)."""
    roles = {"user": "<s>[INST]", "assistant": "[/INST]"}
    system = next((_content(m) or "" for m in messages if m.get("role") == "system"), "")
    if system:
        system = f"[INST] <<SYS>>\n{system}\n<</SYS>>"
    mapped = [(roles[m["role"]], _content(m)) for m in messages if m.get("role") in roles]
    separators = [" ", "</s>"]
    prompt = system + " "
    for i, (role, text) in enumerate(mapped):
        if system and i == 0:
            prompt += (text or "") + separators[i % 2]
        elif text:
            prompt += role + text + " " + separators[i % 2]
        else:
            prompt += role + " "
    return ChatPrompt(prompt=prompt + "[/INST]")


def format_chatml(messages: Sequence[Message], **kwargs: Any) -> ChatPrompt:
    """ChatML (``<|im_start|>role ... <|im_end|>``), as llama-cpp-python's ``"chatml"``."""
    system = next((_content(m) or "" for m in messages if m.get("role") == "system"), "")
    prompt = f"<|im_start|>system\n{system}<|im_end|>\n" if system else ""
    for message in messages:
        if message.get("role") in ("user", "assistant"):
            prompt += f"<|im_start|>{message['role']}\n{_content(message) or ''}<|im_end|>\n"
    return ChatPrompt(prompt=prompt + "<|im_start|>assistant\n", stop=["<|im_end|>"])


#: Built-in formats, by llama-cpp-python's names.
CHAT_FORMATS: dict[str, ChatFormatter] = {"llama-2": format_llama2, "chatml": format_chatml}
