"""Chat completion: messages rendered to a prompt, completed, parsed back into OpenAI dicts.

A model's chat template (``tokenizer.chat_template`` in the GGUF, or ``chat_template=``) is
rendered by llama.cpp's own Jinja engine with the code llama-server uses
(``common/chat.h``): it knows each model family's format for tools and reasoning, gives the
grammar that constrains a tool call or a JSON answer, and parses the generated text into
``content``, ``reasoning_content`` and ``tool_calls``. ``chat_format`` picks one of
llama-cpp-python's built-in Python formats instead (plain text out); a model without any
template gets llama-cpp-python's ``"llama-2"`` format, or llama.cpp's ChatML when tools or a
JSON answer are asked for.
"""

from __future__ import annotations

import json
import logging
from collections.abc import AsyncIterator, Iterator, Mapping, Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, Literal, cast, overload

from llama_cpp import _async, _core
from llama_cpp._completion import CompletionMixin
from llama_cpp.chat_formats import CHAT_FORMATS, ChatFormatter
from llama_cpp.chat_output import OutputParser, PlainText, chat_chunks, chat_response
from llama_cpp.chat_tools import GenericToolParser, tool_call_schema, with_tools_described
from llama_cpp.errors import InvalidArgumentError
from llama_cpp.grammar import LlamaGrammar
from llama_cpp.hooks import LogitsProcessor
from llama_cpp.llama_types import ChatCompletionChunk, CreateChatCompletionResponse

if TYPE_CHECKING:
    # The openai package is optional: only create_chat_completion_openai_v1 needs it.
    from openai.types.chat import ChatCompletion as OpenAIChatCompletion
    from openai.types.chat import ChatCompletionChunk as OpenAIChatCompletionChunk

Message = Mapping[str, Any]
ReasoningFormat = Literal["none", "auto", "deepseek", "deepseek-legacy"]
_ROLES = ("system", "developer", "user", "assistant", "tool")
_log = logging.getLogger("llama_cpp")


def check_messages(messages: Sequence[Message]) -> None:
    """Raise InvalidArgumentError unless every message has a known role, and content where
    OpenAI requires it (an assistant message may carry only ``tool_calls``)."""
    if not messages:
        raise InvalidArgumentError("messages is empty")
    for i, message in enumerate(messages):
        if not isinstance(message, Mapping) or "role" not in message:
            raise InvalidArgumentError(f"messages[{i}] must be a dict with a 'role'")
        if message["role"] not in _ROLES:
            raise InvalidArgumentError(f"messages[{i}] has an unknown role {message['role']!r}")
        if message["role"] == "assistant" and "content" not in message and "tool_calls" not in message:
            raise InvalidArgumentError(f"messages[{i}]: an assistant message needs content or tool_calls")
        if message["role"] != "assistant" and "content" not in message:
            raise InvalidArgumentError(f"messages[{i}] ({message['role']}) has no content")


def schema_for_response_format(response_format: Mapping[str, Any]) -> Mapping[str, Any] | None:
    """The JSON schema an OpenAI / llama-cpp-python ``response_format`` asks for.

    ``{"type": "text"}``: none. ``{"type": "json_object"}``: any JSON object, or the documents
    valid under its ``"schema"`` (llama-cpp-python's form). ``{"type": "json_schema",
    "json_schema": {"name": ..., "schema": ..., "strict": ...}}``: OpenAI's form.

    Raises:
        InvalidArgumentError: An unknown type or a missing schema.
    """
    kind = response_format.get("type")
    if kind == "text":
        return None
    if kind == "json_object":
        schema = response_format.get("schema")
        return schema if schema else {"type": "object"}
    if kind == "json_schema":
        spec = response_format.get("json_schema")
        if not isinstance(spec, Mapping) or not isinstance(spec.get("schema"), Mapping):
            raise InvalidArgumentError(
                "response_format json_schema needs {'json_schema': {'name', 'schema'}}"
            )
        schema = spec["schema"]
        return schema if schema else {"type": "object"}
    raise InvalidArgumentError(f"response_format type must be text, json_object or json_schema, got {kind!r}")


def _tool_choice(
    tools: list[Mapping[str, Any]], tool_choice: str | Mapping[str, Any] | None
) -> tuple[list[Mapping[str, Any]], str]:
    """The tools to offer and llama.cpp's choice (auto/none/required): a named function offers
    that tool alone and requires a call, as OpenAI's forced function. A bare tool name (what
    LangChain's ``bind_tools(tool_choice="name")`` sends) names a function too."""
    if tool_choice is None:
        return tools, "auto"
    if isinstance(tool_choice, str):
        if tool_choice in ("auto", "none", "required"):
            if tool_choice == "required" and not tools:
                raise InvalidArgumentError("tool_choice='required' needs tools")
            return tools, tool_choice
        if not any((t.get("function") or {}).get("name") == tool_choice for t in tools):
            raise InvalidArgumentError(
                "tool_choice must be 'auto', 'none', 'required', the name of one of the tools or a "
                f"function, got {tool_choice!r}"
            )
        name: object = tool_choice
    elif tool_choice.get("type") == "function":
        name = (tool_choice.get("function") or {}).get("name")
    else:
        name = None
    if not isinstance(name, str):
        raise InvalidArgumentError(
            "tool_choice must be {'type': 'function', 'function': {'name': ...}}, got " + repr(tool_choice)
        )
    chosen = [t for t in tools if (t.get("function") or {}).get("name") == name]
    if not chosen:
        raise InvalidArgumentError(f"tool_choice names {name!r}, which is not among the tools")
    return chosen, "required"


def _legacy_functions(
    functions: Sequence[Mapping[str, Any]] | None, function_call: str | Mapping[str, Any] | None
) -> tuple[list[Mapping[str, Any]], str | Mapping[str, Any] | None]:
    """OpenAI's deprecated ``functions``/``function_call`` as tools and a tool choice."""
    tools: list[Mapping[str, Any]] = [{"type": "function", "function": f} for f in functions or ()]
    if isinstance(function_call, Mapping):
        return tools, {"type": "function", "function": {"name": function_call.get("name")}}
    return tools, function_call


def _check_tools(tools: Sequence[Mapping[str, Any]]) -> None:
    for i, tool in enumerate(tools):
        function = tool.get("function") if isinstance(tool, Mapping) else None
        if tool.get("type", "function") != "function" or not isinstance(function, Mapping):
            raise InvalidArgumentError(f"tools[{i}] must be {{'type': 'function', 'function': {{...}}}}")
        if not isinstance(function.get("name"), str) or not function["name"]:
            raise InvalidArgumentError(f"tools[{i}].function needs a name")


@dataclass(frozen=True, slots=True)
class PreparedChat:
    """A conversation ready to generate from (see :meth:`ChatMixin.prepare_chat`)."""

    prompt: list[int]
    grammar: LlamaGrammar | None
    stop: list[str]  # the format's stops, besides the caller's
    preserved_tokens: list[int]  # special tokens whose text is part of the answer
    parser: OutputParser


class ChatMixin(CompletionMixin):
    """llama-cpp-python's ``create_chat_completion``, its async twin, and
    ``create_chat_completion_openai_v1`` (the same answers as ``openai``'s types)."""

    _chat_templates: _core.ChatTemplates | None = None

    def chat_templates(self) -> _core.ChatTemplates:
        """llama.cpp's templates for this model: ``chat_template`` if given, else the GGUF's
        (llama.cpp falls back to ChatML for a model without one).

        Raises:
            InvalidArgumentError: The template does not parse.
        """
        if self._chat_templates is None:
            self._chat_templates = _core.ChatTemplates(self.model, self.config.chat_template or "")
        return self._chat_templates

    def close(self) -> None:
        """Free the context and the weights (the templates hold a reference to the model)."""
        self._chat_templates = None
        super().close()

    def chat_formatter(self) -> ChatFormatter | None:
        """The Python format used instead of a Jinja template: ``chat_format`` by name, or
        llama-cpp-python's ``"llama-2"`` for a model without a template; None when the model's
        (or the given) template is rendered by llama.cpp.

        Raises:
            InvalidArgumentError: An unknown ``chat_format``.
        """
        if self.config.chat_template:
            return None
        name = self.config.chat_format
        if name is None:
            if self.model.chat_template():
                return None
            name = "llama-2"
        if name not in CHAT_FORMATS:
            raise InvalidArgumentError(f"unknown chat_format {name!r}; known: {sorted(CHAT_FORMATS)}")
        return CHAT_FORMATS[name]

    def render_chat(
        self,
        messages: Sequence[Message],
        *,
        tools: Sequence[Mapping[str, Any]] | None = None,
        tool_choice: str | Mapping[str, Any] | None = None,
        json_schema: Mapping[str, Any] | None = None,
        parallel_tool_calls: bool = False,
        enable_thinking: bool | None = None,
        reasoning_format: ReasoningFormat = "auto",
        add_generation_prompt: bool = True,
        **template_kwargs: Any,
    ) -> _core.ChatParams:
        """Render ``messages`` with llama.cpp's chat templates (see :meth:`chat_templates`).

        Returns the prompt with what generating and parsing its answer needs: the grammar
        (tool calls, a JSON schema) and its lazy triggers, special tokens kept as text, extra
        stops, the format's name. ``enable_thinking=False`` turns a hybrid model's thinking
        off (also accepted in ``template_kwargs``, as llama-server does); other keyword
        arguments are variables of the template (e.g. ``reasoning_effort`` for GPT-OSS).

        Raises:
            InvalidArgumentError: Malformed messages or tools, or the template rejected them.
        """
        check_messages(messages)
        all_tools, choice = _tool_choice(list(tools or ()), tool_choice)
        _check_tools(all_tools)
        thinking = template_kwargs.pop("enable_thinking", enable_thinking)
        if thinking is not None and not isinstance(thinking, bool):
            raise InvalidArgumentError(f"enable_thinking must be a bool, got {thinking!r}")
        request = _core.ChatRequest()
        try:
            request.messages = json.dumps(list(messages))
            request.tools = json.dumps(all_tools) if all_tools else ""
            request.json_schema = json.dumps(json_schema) if json_schema is not None else ""
            request.template_kwargs = [(k, json.dumps(v)) for k, v in template_kwargs.items()]
        except TypeError as error:
            raise InvalidArgumentError(f"chat request is not JSON-serializable: {error}") from error
        request.tool_choice = choice
        request.parallel_tool_calls = parallel_tool_calls
        request.add_generation_prompt = add_generation_prompt
        request.enable_thinking = True if thinking is None else thinking
        request.reasoning_format = reasoning_format
        return self.chat_templates().apply(request)

    def prepare_chat(
        self,
        messages: Sequence[Message],
        *,
        functions: Sequence[Mapping[str, Any]] | None = None,
        function_call: str | Mapping[str, Any] | None = None,
        tools: Sequence[Mapping[str, Any]] | None = None,
        tool_choice: str | Mapping[str, Any] | None = None,
        response_format: Mapping[str, Any] | None = None,
        grammar: LlamaGrammar | None = None,
        parallel_tool_calls: bool = False,
        reasoning_format: ReasoningFormat = "auto",
        chat_template_kwargs: Mapping[str, Any] | None = None,
        **template_kwargs: Any,
    ) -> PreparedChat:
        """Everything a chat generation needs but the sampling values: the prompt's tokens,
        the grammar (a JSON schema, tool calls or ``grammar``), stops, and the parser of the
        answer. :meth:`create_chat_completion` (and :class:`~llama_cpp.LlamaPool`) run it.

        Raises:
            InvalidArgumentError: Malformed messages or tools, or the template rejected them.
            GrammarError: A ``response_format`` schema llama.cpp cannot convert.
        """
        check_messages(messages)
        template_kwargs = {**(chat_template_kwargs or {}), **template_kwargs}
        if functions or function_call:
            if tools or tool_choice:
                raise InvalidArgumentError("pass tools/tool_choice or functions/function_call, not both")
            tools, tool_choice = _legacy_functions(functions, function_call)
        offered, choice = _tool_choice(list(tools or ()), tool_choice)
        _check_tools(offered)
        schema = schema_for_response_format(response_format) if response_format is not None else None
        schema_grammar = LlamaGrammar.from_json_schema(schema) if schema is not None else None  # checks it
        if grammar is not None and (schema is not None or offered):
            raise InvalidArgumentError("pass either grammar or a JSON response_format / tools, not both")
        formatter = self.chat_formatter()
        calls_tools = bool(offered) and choice != "none"
        parser: OutputParser
        if calls_tools and (
            formatter is not None or not dict(self.chat_templates().caps())["supports_tool_calls"]
        ):
            # The format has no tool calls of its own: the generic JSON answer (chat_tools).
            if schema is not None:
                raise InvalidArgumentError(
                    "this chat format has no tool calls of its own: pass tools or a JSON response_format"
                )
            messages = with_tools_described(messages, offered, choice, parallel_tool_calls)
            tool_schema = json.dumps(tool_call_schema(offered, choice, parallel_tool_calls))
            schema_grammar = LlamaGrammar(_core.json_schema_to_grammar(tool_schema))
            offered, parser = [], GenericToolParser()
        else:
            parser = PlainText()
        if formatter is not None:
            rendered = formatter(messages, **template_kwargs)
            return PreparedChat(
                prompt=self.tokenize(rendered.prompt, add_bos=True, special=True),
                grammar=grammar or schema_grammar,
                stop=rendered.stop,
                preserved_tokens=[],
                parser=parser,
            )
        params = self.render_chat(
            messages,
            tools=offered,
            tool_choice=choice if offered else None,
            json_schema=schema,
            parallel_tool_calls=parallel_tool_calls,
            reasoning_format=reasoning_format,
            **template_kwargs,
        )
        if not isinstance(parser, GenericToolParser):
            parser = _core.ChatParser(params)
            if params.grammar:
                grammar = LlamaGrammar.from_chat_params(params)
        if grammar is None:  # the format left the schema (or the generic tools) to us
            grammar = schema_grammar
        return PreparedChat(
            prompt=self.tokenize(params.prompt, add_bos=True, special=True),
            grammar=grammar,
            stop=list(params.additional_stops),
            preserved_tokens=list(params.preserved_tokens),
            parser=parser,
        )

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
        parallel_tool_calls: bool = False,
        reasoning_format: ReasoningFormat = "auto",
        chat_template_kwargs: Mapping[str, Any] | None = None,
        dry_multiplier: float = 0.0,
        dry_base: float = 1.75,
        dry_allowed_length: int = 2,
        dry_penalty_last_n: int = 64,
        dry_sequence_breakers: Sequence[str] = ("\n", ":", '"', "*"),
        xtc_probability: float = 0.0,
        xtc_threshold: float = 0.1,
        top_n_sigma: float = -1.0,
        **template_kwargs: Any,
    ) -> CreateChatCompletionResponse | Iterator[ChatCompletionChunk]:
        """Answer a conversation, returning llama-cpp-python's (OpenAI's) chat dicts.

        The messages are rendered (see :meth:`render_chat`), tokenized with special tokens
        parsed, and completed; generation ends at the model's end of turn. The answer is
        parsed by the model's format: ``message["content"]``, ``message["reasoning_content"]``
        (a thinking model's reasoning, unless ``reasoning_format="none"`` leaves it in the
        content) and ``message["tool_calls"]`` (``finish_reason="tool_calls"``).

        ``tools`` + ``tool_choice`` (``"auto"``, ``"none"``, ``"required"``,
        ``{"type": "function", "function": {"name": ...}}``, or the bare name of one of the
        tools, as LangChain's ``bind_tools`` passes it): a forced call is constrained by
        a grammar so that it always parses; under ``"auto"`` the grammar takes over once the
        model starts a call. ``response_format`` (``json_object``, with or without
        ``schema``, or OpenAI's ``json_schema``) constrains the answer to the schema. With
        ``stream=True``: ``chat.completion.chunk`` dicts, the role first, then content,
        reasoning and tool-call deltas, ``finish_reason`` last. ``cancellation`` lets another
        thread stop the generation. ``chat_template_kwargs`` and other keyword arguments are
        template variables (``enable_thinking=False``, ``reasoning_effort="low"``, ...).

        Raises:
            InvalidArgumentError: Malformed messages or tools, or the template rejected them.
            GrammarError: A ``response_format`` schema llama.cpp cannot convert.
        """
        chat = self.prepare_chat(
            messages,
            functions=functions,
            function_call=function_call,
            tools=tools,
            tool_choice=tool_choice,
            response_format=response_format,
            grammar=grammar,
            parallel_tool_calls=parallel_tool_calls,
            reasoning_format=reasoning_format,
            chat_template_kwargs=chat_template_kwargs,
            **template_kwargs,
        )
        stops = [stop] if isinstance(stop, str) else list(stop or [])
        completion = self._create_completion(
            chat.prompt,
            stream=stream,
            cancellation=cancellation or _core.Cancellation(),
            max_tokens=max_tokens,
            temperature=temperature,
            top_p=top_p,
            min_p=min_p,
            typical_p=typical_p,
            logprobs=(top_logprobs or 0) if logprobs else None,
            stop=stops + chat.stop,
            frequency_penalty=frequency_penalty,
            presence_penalty=presence_penalty,
            repeat_penalty=repeat_penalty,
            top_k=top_k,
            seed=seed,
            mirostat_mode=mirostat_mode,
            mirostat_tau=mirostat_tau,
            mirostat_eta=mirostat_eta,
            dry_multiplier=dry_multiplier,
            dry_base=dry_base,
            dry_allowed_length=dry_allowed_length,
            dry_penalty_last_n=dry_penalty_last_n,
            dry_sequence_breakers=tuple(dry_sequence_breakers),
            xtc_probability=xtc_probability,
            xtc_threshold=xtc_threshold,
            top_n_sigma=top_n_sigma,
            model=model,
            logit_bias=dict(logit_bias or {}),
            grammar=chat.grammar,
            logits_processor=logits_processor,
            preserved_tokens=chat.preserved_tokens,
        )
        if isinstance(completion, dict):
            response = chat_response(completion, chat.parser)
            _warn_if_unparsed(chat.parser)
            return response
        return chat_chunks(completion, chat.parser)

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

    @overload
    def create_chat_completion_openai_v1(
        self, *args: Any, stream: Literal[False] = False, **kwargs: Any
    ) -> OpenAIChatCompletion: ...

    @overload
    def create_chat_completion_openai_v1(
        self, *args: Any, stream: Literal[True], **kwargs: Any
    ) -> Iterator[OpenAIChatCompletionChunk]: ...

    def create_chat_completion_openai_v1(
        self, *args: Any, stream: bool = False, **kwargs: Any
    ) -> OpenAIChatCompletion | Iterator[OpenAIChatCompletionChunk]:
        """:meth:`create_chat_completion` (same arguments) returning the ``openai`` package's
        pydantic types, as llama-cpp-python's method of this name (instructor patches it).

        Returns:
            ``openai.types.chat.ChatCompletion``; with ``stream=True`` an iterator of
            ``ChatCompletionChunk`` (closing it stops the generation).

        Raises:
            ImportError: The ``openai`` package is not installed.
            InvalidArgumentError: ``stream`` is not a bool, or as :meth:`create_chat_completion`.
        """
        try:
            from openai.types.chat import ChatCompletion, ChatCompletionChunk
        except ImportError as error:
            raise ImportError(
                "create_chat_completion_openai_v1 needs the openai package: pip install openai"
            ) from error
        if not isinstance(stream, bool):
            raise InvalidArgumentError(f"stream must be a bool, got {stream!r}")
        if stream:
            return _openai_chunks(
                self.create_chat_completion(*args, stream=True, **kwargs), ChatCompletionChunk
            )
        return ChatCompletion.model_validate(self.create_chat_completion(*args, stream=False, **kwargs))


def _openai_chunks(
    chunks: Iterator[ChatCompletionChunk], chunk_type: type[OpenAIChatCompletionChunk]
) -> Iterator[OpenAIChatCompletionChunk]:
    try:
        for chunk in chunks:
            yield chunk_type.model_validate(chunk)
    finally:
        # Leaving the loop early must stop the generation now, not when the stream is collected.
        close = getattr(chunks, "close", None)
        if close is not None:
            close()


def _warn_if_unparsed(parser: OutputParser) -> None:
    if getattr(parser, "fell_back", False):
        _log.warning("the model's answer did not follow its chat format; it is returned as plain content")
