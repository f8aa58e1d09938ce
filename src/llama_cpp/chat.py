"""Chat completion: messages rendered to a prompt, completed, returned as OpenAI chat dicts.

A model's own chat template (``tokenizer.chat_template`` in the GGUF) is rendered with
Jinja2 in a sandbox, as llama-cpp-python and Hugging Face do; a model without one falls back
to llama-cpp-python's ``"llama-2"`` format. ``chat_format`` picks a built-in format by name
instead, ``chat_template`` a Jinja template of your own.

``response_format`` (JSON object or JSON schema) constrains the answer with a grammar built
by llama.cpp's converter. Not here yet (see the project's issues): tool calls and per-family
reasoning parsing.
"""

from __future__ import annotations

import json
from collections.abc import AsyncIterator, Callable, Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from datetime import datetime
from typing import TYPE_CHECKING, Any, Literal, cast, overload

from llama_cpp import _async, _core
from llama_cpp._completion import CompletionMixin
from llama_cpp.errors import InvalidArgumentError
from llama_cpp.grammar import LlamaGrammar
from llama_cpp.hooks import LogitsProcessor
from llama_cpp.llama_types import (
    ChatCompletionChunk,
    ChatCompletionLogprobs,
    ChatCompletionTokenLogprob,
    ChatCompletionTopLogprob,
    CompletionLogprobs,
    CreateChatCompletionResponse,
    CreateCompletionResponse,
)

if TYPE_CHECKING:
    from jinja2 import Template

Message = Mapping[str, Any]


@dataclass(frozen=True, slots=True)
class ChatPrompt:
    """A rendered conversation.

    Attributes:
        prompt: The text to complete.
        stop: Stop strings the format adds (e.g. the template's EOS text).
        added_special: The text already holds BOS: do not add another when tokenizing.
    """

    prompt: str
    stop: list[str] = field(default_factory=list)
    added_special: bool = False


ChatFormatter = Callable[..., ChatPrompt]  # (messages, **template_kwargs) -> ChatPrompt


class Jinja2ChatFormatter:
    """Renders a Jinja chat template in a sandbox, with the variables chat templates expect
    (``messages``, ``bos_token``, ``eos_token``, ``add_generation_prompt``,
    ``raise_exception``, ``strftime_now``)."""

    def __init__(
        self, template: str, *, bos_token: str, eos_token: str, add_generation_prompt: bool = True
    ) -> None:
        try:
            import jinja2
            import jinja2.ext
            from jinja2.sandbox import ImmutableSandboxedEnvironment
        except ImportError as error:  # pragma: no cover - jinja2 is a dependency
            raise ImportError("chat templates need jinja2: pip install jinja2") from error
        environment = ImmutableSandboxedEnvironment(
            loader=jinja2.BaseLoader(),
            trim_blocks=True,
            lstrip_blocks=True,
            extensions=[jinja2.ext.loopcontrols],
        )
        environment.filters["tojson"] = _tojson
        try:
            self._template: Template = environment.from_string(template)
        except jinja2.TemplateError as error:
            raise InvalidArgumentError(f"invalid chat template: {error}") from error
        self.bos_token = bos_token
        self.eos_token = eos_token
        self.add_generation_prompt = add_generation_prompt

    def __call__(self, messages: Sequence[Message], **kwargs: Any) -> ChatPrompt:
        def raise_exception(message: str) -> None:
            raise InvalidArgumentError(f"the chat template rejected the messages: {message}")

        prompt = self._template.render(
            messages=list(messages),
            bos_token=self.bos_token,
            eos_token=self.eos_token,
            add_generation_prompt=self.add_generation_prompt,
            raise_exception=raise_exception,
            strftime_now=lambda fmt: datetime.now().strftime(fmt),
            **kwargs,
        )
        return ChatPrompt(prompt=prompt, stop=[self.eos_token] if self.eos_token else [], added_special=True)


def _tojson(
    value: object, ensure_ascii: bool = False, indent: int | None = None, sort_keys: bool = False
) -> str:
    return json.dumps(value, ensure_ascii=ensure_ascii, indent=indent, sort_keys=sort_keys)


def _content(message: Message) -> str | None:
    content = message.get("content")
    return content if isinstance(content, str) else None


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


def check_messages(messages: Sequence[Message]) -> None:
    """Raise InvalidArgumentError unless every message has a known role and text content."""
    if not messages:
        raise InvalidArgumentError("messages is empty")
    for i, message in enumerate(messages):
        if not isinstance(message, Mapping) or "role" not in message:
            raise InvalidArgumentError(f"messages[{i}] must be a dict with a 'role'")
        if message["role"] not in ("system", "developer", "user", "assistant", "tool"):
            raise InvalidArgumentError(f"messages[{i}] has an unknown role {message['role']!r}")


def grammar_for_response_format(response_format: Mapping[str, Any]) -> LlamaGrammar | None:
    """The grammar that enforces an OpenAI / llama-cpp-python ``response_format``.

    ``{"type": "text"}``: none. ``{"type": "json_object"}``: any JSON object, or the documents
    valid under its ``"schema"`` (llama-cpp-python's form). ``{"type": "json_schema",
    "json_schema": {"name": ..., "schema": ..., "strict": ...}}``: OpenAI's form.

    Raises:
        InvalidArgumentError: An unknown type or a missing schema.
        GrammarError: A schema llama.cpp cannot convert.
    """
    kind = response_format.get("type")
    if kind == "text":
        return None
    if kind == "json_object":
        return LlamaGrammar.from_json_schema(response_format.get("schema") or {"type": "object"})
    if kind == "json_schema":
        spec = response_format.get("json_schema")
        if not isinstance(spec, Mapping) or "schema" not in spec:
            raise InvalidArgumentError(
                "response_format json_schema needs {'json_schema': {'name', 'schema'}}"
            )
        return LlamaGrammar.from_json_schema(spec["schema"])
    raise InvalidArgumentError(f"response_format type must be text, json_object or json_schema, got {kind!r}")


# -- responses ------------------------------------------------------------------------------


def _chat_logprobs(logprobs: CompletionLogprobs | None) -> ChatCompletionLogprobs | None:
    if logprobs is None:
        return None
    content: list[ChatCompletionTokenLogprob] = []
    for token, logprob, top in zip(
        logprobs["tokens"], logprobs["token_logprobs"], logprobs["top_logprobs"], strict=True
    ):
        alternatives: list[ChatCompletionTopLogprob] = [
            {"token": t, "bytes": None, "logprob": v} for t, v in (top or {}).items()
        ]
        content.append({"token": token, "bytes": None, "logprob": logprob, "top_logprobs": alternatives})
    return {"content": content, "refusal": None}


def chat_response(completion: CreateCompletionResponse) -> CreateChatCompletionResponse:
    """A chat.completion dict from a text completion (llama-cpp-python's conversion)."""
    choice = completion["choices"][0]
    return {
        "id": "chat" + completion["id"],
        "object": "chat.completion",
        "created": completion["created"],
        "model": completion["model"],
        "choices": [
            {
                "index": 0,
                "message": {"role": "assistant", "content": choice["text"]},
                "logprobs": _chat_logprobs(choice["logprobs"]),
                "finish_reason": choice["finish_reason"],
            }
        ],
        "usage": completion["usage"],
    }


def chat_chunks(chunks: Iterator[CreateCompletionResponse]) -> Iterator[ChatCompletionChunk]:
    """chat.completion.chunk dicts: the role first, then content deltas, the finish reason last."""
    for i, chunk in enumerate(chunks):
        choice = chunk["choices"][0]
        base = {"id": "chat" + chunk["id"], "model": chunk["model"], "created": chunk["created"]}
        if i == 0:
            yield {
                **base,  # type: ignore[typeddict-item]
                "object": "chat.completion.chunk",
                "choices": [
                    {"index": 0, "delta": {"role": "assistant"}, "logprobs": None, "finish_reason": None}
                ],
            }
        yield {
            **base,  # type: ignore[typeddict-item]
            "object": "chat.completion.chunk",
            "choices": [
                {
                    "index": 0,
                    "delta": {"content": choice["text"]} if choice["finish_reason"] is None else {},
                    "logprobs": _chat_logprobs(choice["logprobs"]),
                    "finish_reason": choice["finish_reason"],
                }
            ],
        }


class ChatMixin(CompletionMixin):
    """llama-cpp-python's ``create_chat_completion`` and the async twin."""

    _chat_formatter: ChatFormatter | None = None

    def chat_formatter(self) -> ChatFormatter:
        """How messages become a prompt: ``chat_template``, ``chat_format``, the GGUF template,
        or llama-cpp-python's ``"llama-2"`` fallback, in that order."""
        if self._chat_formatter is None:
            template = self.config.chat_template or (
                None if self.config.chat_format else self.model.chat_template()
            )
            if template:
                special = [
                    self.model.token_to_piece(t, True).decode("utf-8", "ignore") for t in self._bos_eos()
                ]
                self._chat_formatter = Jinja2ChatFormatter(
                    template, bos_token=special[0], eos_token=special[1]
                )
            else:
                name = self.config.chat_format or "llama-2"
                if name not in CHAT_FORMATS:
                    raise InvalidArgumentError(f"unknown chat_format {name!r}; known: {sorted(CHAT_FORMATS)}")
                self._chat_formatter = CHAT_FORMATS[name]
        return self._chat_formatter

    def _bos_eos(self) -> tuple[int, int]:
        return max(self.token_bos(), 0), max(self.token_eos(), 0)

    @overload
    def create_chat_completion(
        self, messages: Sequence[Mapping[str, Any]], *, stream: Literal[False] = False, **kwargs: Any
    ) -> CreateChatCompletionResponse: ...

    @overload
    def create_chat_completion(
        self, messages: Sequence[Mapping[str, Any]], *, stream: Literal[True], **kwargs: Any
    ) -> Iterator[ChatCompletionChunk]: ...

    def create_chat_completion(  # noqa: PLR0917 - llama-cpp-python passes these positionally too
        self,
        messages: Sequence[Mapping[str, Any]],
        functions: Sequence[Mapping[str, Any]] | None = None,
        function_call: str | Mapping[str, Any] | None = None,
        tools: Sequence[Mapping[str, Any]] | None = None,
        tool_choice: str | Mapping[str, Any] | None = None,
        temperature: float = 0.2,
        top_p: float = 0.95,
        top_k: int = 40,
        min_p: float = 0.05,
        typical_p: float = 1.0,
        stream: bool = False,
        stop: str | Sequence[str] | None = None,
        seed: int | None = None,
        response_format: Mapping[str, Any] | None = None,
        max_tokens: int | None = None,
        presence_penalty: float = 0.0,
        frequency_penalty: float = 0.0,
        repeat_penalty: float = 1.0,
        mirostat_mode: int = 0,
        mirostat_tau: float = 5.0,
        mirostat_eta: float = 0.1,
        model: str | None = None,
        logits_processor: LogitsProcessor | Sequence[LogitsProcessor] | None = None,
        grammar: LlamaGrammar | None = None,
        logit_bias: Mapping[int, float] | None = None,
        logprobs: bool | None = None,
        top_logprobs: int | None = None,
        cancellation: _core.Cancellation | None = None,
        **template_kwargs: Any,
    ) -> CreateChatCompletionResponse | Iterator[ChatCompletionChunk]:
        """Answer a conversation, returning llama-cpp-python's (OpenAI's) chat dicts.

        The messages are rendered by :meth:`chat_formatter`, tokenized with special tokens
        parsed, and completed; generation ends at the model's end of turn. With
        ``stream=True``: ``chat.completion.chunk`` dicts, the role first, ``finish_reason`` last.
        ``cancellation`` lets another thread stop the generation. Other keyword arguments are
        passed to the chat template (e.g. ``enable_thinking``).

        Raises:
            InvalidArgumentError: Malformed messages, or the template rejected them.
            GrammarError: A ``response_format`` schema llama.cpp cannot convert.
            NotImplementedError: ``tools`` or ``functions`` (not yet).
        """
        if tools or functions or tool_choice or function_call:
            raise NotImplementedError("tool calls are not supported yet")
        if response_format is not None:
            schema_grammar = grammar_for_response_format(response_format)
            if schema_grammar is not None and grammar is not None:
                raise InvalidArgumentError("pass either grammar or a JSON response_format, not both")
            grammar = schema_grammar or grammar
        check_messages(messages)
        rendered = self.chat_formatter()(messages, **template_kwargs)
        prompt = self.tokenize(rendered.prompt, add_bos=not rendered.added_special, special=True)
        stops = [stop] if isinstance(stop, str) else list(stop or [])
        completion = self._create_completion(
            prompt,
            stream=stream,
            cancellation=cancellation or _core.Cancellation(),
            max_tokens=max_tokens,
            temperature=temperature,
            top_p=top_p,
            min_p=min_p,
            typical_p=typical_p,
            logprobs=top_logprobs if logprobs else None,
            stop=stops + rendered.stop,
            frequency_penalty=frequency_penalty,
            presence_penalty=presence_penalty,
            repeat_penalty=repeat_penalty,
            top_k=top_k,
            seed=seed,
            mirostat_mode=mirostat_mode,
            mirostat_tau=mirostat_tau,
            mirostat_eta=mirostat_eta,
            model=model,
            logit_bias=dict(logit_bias or {}),
            grammar=grammar,
            logits_processor=logits_processor,
        )
        if isinstance(completion, dict):
            return chat_response(completion)
        return chat_chunks(completion)

    async def create_chat_completion_async(
        self, messages: Sequence[Mapping[str, Any]], **kwargs: Any
    ) -> CreateChatCompletionResponse | AsyncIterator[ChatCompletionChunk]:
        """:meth:`create_chat_completion` off the event loop (same keyword arguments).

        With ``stream=True`` it returns an async iterator of chunks; cancelling the task or
        leaving the ``async for`` early stops the generation.
        """
        # One flag for the generation and the await: cancelling the task reaches the C++ loop.
        cancellation = _core.Cancellation()
        if kwargs.get("stream"):
            chunks = self.create_chat_completion(messages, cancellation=cancellation, **kwargs)
            assert not isinstance(chunks, dict)
            return _async.iterate(chunks, cancellation)

        def call() -> CreateChatCompletionResponse:
            response = self.create_chat_completion(messages, cancellation=cancellation, **kwargs)
            assert isinstance(response, dict)
            return cast(CreateChatCompletionResponse, response)

        return await _async.run(call, cancellation)
