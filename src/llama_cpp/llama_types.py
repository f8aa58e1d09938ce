"""The dictionaries returned by the OpenAI-style methods, as in llama-cpp-python."""

from __future__ import annotations

from typing import Literal, NotRequired, TypedDict

FinishReason = Literal["stop", "length"]
ChatFinishReason = Literal["stop", "length", "tool_calls"]


class PromptTokensDetails(TypedDict):
    cached_tokens: int


class CompletionUsage(TypedDict):
    prompt_tokens: int
    completion_tokens: int
    total_tokens: int
    prompt_tokens_details: NotRequired[PromptTokensDetails]


class CompletionLogprobs(TypedDict):
    """Per token: its text, its character offset in the returned text, its logprob and the
    most likely alternatives (the token itself included); None where nothing came before."""

    tokens: list[str]
    text_offset: list[int]
    token_logprobs: list[float | None]
    top_logprobs: list[dict[str, float] | None]


class CompletionChoice(TypedDict):
    text: str
    index: int
    logprobs: CompletionLogprobs | None
    finish_reason: FinishReason | None
    #: A finished choice: the stop string that ended it, or None (vLLM's field).
    stop_reason: NotRequired[str | None]


class CreateCompletionResponse(TypedDict):
    id: str
    object: Literal["text_completion"]
    created: int
    model: str
    choices: list[CompletionChoice]
    usage: NotRequired[CompletionUsage]


#: One streamed chunk: the same shape, without usage.
CreateCompletionStreamResponse = CreateCompletionResponse


class EmbeddingData(TypedDict):
    object: Literal["embedding"]
    embedding: list[float] | list[list[float]]
    index: int


class EmbeddingUsage(TypedDict):
    prompt_tokens: int
    total_tokens: int


class CreateEmbeddingResponse(TypedDict):
    object: Literal["list"]
    data: list[EmbeddingData]
    model: str
    usage: EmbeddingUsage


class ChatCompletionTopLogprob(TypedDict):
    token: str
    bytes: list[int] | None
    logprob: float


class ChatCompletionTokenLogprob(TypedDict):
    token: str
    bytes: list[int] | None
    logprob: float | None
    top_logprobs: list[ChatCompletionTopLogprob]


class ChatCompletionLogprobs(TypedDict):
    content: list[ChatCompletionTokenLogprob] | None
    refusal: list[ChatCompletionTokenLogprob] | None


class ChatCompletionFunctionCall(TypedDict):
    name: str
    arguments: str  # JSON text


class ChatCompletionMessageToolCall(TypedDict):
    id: str
    type: Literal["function"]
    function: ChatCompletionFunctionCall


class ChatCompletionMessage(TypedDict):
    """The answer. ``reasoning_content`` (the model's thinking, when its format separates it)
    and ``tool_calls`` are present only when not empty; ``content`` is None when the answer
    is only tool calls."""

    role: Literal["assistant"]
    content: str | None
    reasoning_content: NotRequired[str]
    tool_calls: NotRequired[list[ChatCompletionMessageToolCall]]


class ChatCompletionChoice(TypedDict):
    index: int
    message: ChatCompletionMessage
    logprobs: ChatCompletionLogprobs | None
    finish_reason: ChatFinishReason | None
    #: The stop string that ended the answer, or None (vLLM's field).
    stop_reason: NotRequired[str | None]


class CreateChatCompletionResponse(TypedDict):
    id: str
    object: Literal["chat.completion"]
    created: int
    model: str
    choices: list[ChatCompletionChoice]
    usage: CompletionUsage


class ChatCompletionFunctionCallDelta(TypedDict, total=False):
    name: str
    arguments: str


class ChatCompletionToolCallDelta(TypedDict, total=False):
    """A streamed piece of tool call ``index``: its first piece has the id, type and name,
    later ones more ``arguments`` text."""

    index: int
    id: str
    type: Literal["function"]
    function: ChatCompletionFunctionCallDelta


class ChatCompletionDelta(TypedDict, total=False):
    role: Literal["assistant"]
    content: str
    reasoning_content: str
    tool_calls: list[ChatCompletionToolCallDelta]


class ChatCompletionChunkChoice(TypedDict):
    index: int
    delta: ChatCompletionDelta
    logprobs: ChatCompletionLogprobs | None
    finish_reason: ChatFinishReason | None
    #: The last chunk's: the stop string that ended the answer, or None (vLLM's field).
    stop_reason: NotRequired[str | None]


class ChatCompletionChunk(TypedDict):
    id: str
    object: Literal["chat.completion.chunk"]
    created: int
    model: str
    choices: list[ChatCompletionChunkChoice]
    #: Only in the last chunk of a stream with ``stream_options={"include_usage": True}``.
    usage: NotRequired[CompletionUsage]
