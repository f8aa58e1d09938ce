"""The dictionaries returned by the OpenAI-style methods, as in llama-cpp-python."""

from __future__ import annotations

from typing import Literal, NotRequired, TypedDict

FinishReason = Literal["stop", "length"]


class CompletionUsage(TypedDict):
    prompt_tokens: int
    completion_tokens: int
    total_tokens: int


class CompletionChoice(TypedDict):
    text: str
    index: int
    logprobs: None
    finish_reason: FinishReason | None


class CreateCompletionResponse(TypedDict):
    id: str
    object: Literal["text_completion"]
    created: int
    model: str
    choices: list[CompletionChoice]
    usage: NotRequired[CompletionUsage]


#: One streamed chunk: the same shape, without usage.
CreateCompletionStreamResponse = CreateCompletionResponse
