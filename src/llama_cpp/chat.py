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
from collections.abc import Iterator, Mapping, Sequence
from dataclasses import dataclass, field, replace
from typing import TYPE_CHECKING, Any, Literal

from llama_cpp import _core
from llama_cpp.chat_formats import CHAT_FORMATS, ChatFormatter
from llama_cpp.chat_output import OutputParser, PlainText, message_from_json
from llama_cpp.chat_tools import GenericToolParser, tool_call_schema, with_tools_described
from llama_cpp.errors import InvalidArgumentError, TemplateError
from llama_cpp.grammar import LlamaGrammar
from llama_cpp.json_schema import schema_to_grammar
from llama_cpp.llama_types import ChatCompletionChunk, ChatCompletionMessage
from llama_cpp.structured import AnswerCheck

if TYPE_CHECKING:
    # The openai package is optional: only create_chat_completion_openai_v1 needs it.
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
        _check_json(message, f"messages[{i}]")


def _check_json(value: object, where: str) -> None:
    """Raise InvalidArgumentError unless ``value`` serializes to JSON with a UTF-8 form, as
    the template and the tokenizer need it (no lone surrogate, no cycle, not too deep)."""
    try:
        json.dumps(value, ensure_ascii=False).encode("utf-8")
    except (TypeError, ValueError, RecursionError) as e:  # UnicodeEncodeError is a ValueError
        raise InvalidArgumentError(f"{where} is not JSON with a UTF-8 form: {e}") from None


def schema_for_response_format(response_format: Mapping[str, Any]) -> Mapping[str, Any] | None:
    """The JSON schema an OpenAI / llama-cpp-python ``response_format`` asks for.

    ``{"type": "text"}``: none. ``{"type": "json_object"}``: any JSON object, or the documents
    valid under its ``"schema"`` (llama-cpp-python's form). ``{"type": "json_schema",
    "json_schema": {"name": ..., "schema": ..., "strict": ...}}``: OpenAI's form.

    Raises:
        InvalidArgumentError: An unknown type or a missing schema.
    """
    if not isinstance(response_format, Mapping):
        raise InvalidArgumentError(f"response_format must be a dict with a 'type', got {response_format!r}")
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
    if not isinstance(tool_choice, str | Mapping):
        raise InvalidArgumentError(f"tool_choice must be a string or a dict, got {tool_choice!r}")
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


_REASONING_FORMATS = ("none", "auto", "deepseek", "deepseek-legacy")


def _check_choices(
    reasoning_format: object, parallel_tool_calls: object, template_kwargs: Mapping[str, Any] | None
) -> None:
    """Values checked whichever path renders the chat (llama.cpp's templates check them too,
    but a Python format would pass them by silently)."""
    if reasoning_format not in _REASONING_FORMATS:
        raise InvalidArgumentError(
            f"reasoning_format must be one of {_REASONING_FORMATS}, got {reasoning_format!r}"
        )
    if not isinstance(parallel_tool_calls, bool):
        raise InvalidArgumentError(f"parallel_tool_calls must be a bool, got {parallel_tool_calls!r}")
    thinking = (template_kwargs or {}).get("enable_thinking")
    if thinking is not None and not isinstance(thinking, bool):
        raise InvalidArgumentError(f"enable_thinking must be a bool, got {thinking!r}")


def _checked_tools(tools: Sequence[Mapping[str, Any]] | None) -> list[Mapping[str, Any]]:
    """``tools`` as a list, each checked to be OpenAI's ``{"type": "function", "function": {...}}``."""
    if tools is None:
        return []
    if isinstance(tools, str | bytes | Mapping):
        raise InvalidArgumentError(f"tools must be a list of tool dicts, got {type(tools).__name__}")
    checked = list(tools)
    for i, tool in enumerate(checked):
        function = tool.get("function") if isinstance(tool, Mapping) else None
        if not isinstance(function, Mapping) or tool.get("type", "function") != "function":
            raise InvalidArgumentError(
                f"tools[{i}] must be {{'type': 'function', 'function': {{...}}}}, got {tool!r}"
            )
        if not isinstance(function.get("name"), str) or not function["name"]:
            raise InvalidArgumentError(f"tools[{i}].function needs a name")
        _check_json(tool, f"tools[{i}]")
    return checked


@dataclass(frozen=True, slots=True)
class RenderedChat:
    """A conversation rendered by the model's chat template (:meth:`Llama.render_chat`).

    Attributes:
        prompt: The prompt text (special tokens as text).
        format: llama.cpp's name for the chat format it recognised in the template.
        grammar: What constrains the answer (tool calls, a JSON schema), if anything.
        additional_stops: Strings that end the answer besides the model's end of turn.
        preserved_tokens: Special tokens whose text is part of the answer (tool-call tags).
        generation_prompt: The text the template appends to open the assistant's turn.
        supports_thinking: Whether the template has a reasoning switch.
        thinking_start_tag: The text that opens the model's reasoning ("" if none).
        thinking_end_tags: The texts that may close it.
    """

    prompt: str
    format: str
    grammar: LlamaGrammar | None
    additional_stops: tuple[str, ...]
    preserved_tokens: tuple[int, ...]
    generation_prompt: str
    supports_thinking: bool
    thinking_start_tag: str
    thinking_end_tags: tuple[str, ...]
    _params: _core.ChatParams = field(repr=False, compare=False)

    def parse(self, text: str) -> ChatCompletionMessage:
        """An answer to this prompt as OpenAI's message: ``content``, ``reasoning_content``
        and ``tool_calls``, parsed by the format's own parser (llama.cpp's)."""
        return message_from_json(_core.ChatParser(self._params).parse(text, False))

    @classmethod
    def from_native(cls, params: _core.ChatParams) -> RenderedChat:
        return cls(
            prompt=params.prompt,
            format=params.format,
            grammar=LlamaGrammar.from_chat_params(params) if params.grammar else None,
            additional_stops=tuple(params.additional_stops),
            preserved_tokens=tuple(params.preserved_tokens),
            generation_prompt=params.generation_prompt,
            supports_thinking=params.supports_thinking,
            thinking_start_tag=params.thinking_start_tag,
            thinking_end_tags=tuple(params.thinking_end_tags),
            _params=params,
        )


#: What constrains a chat answer: a caller's grammar, a JSON schema's, or the grammar (with
#: lazy triggers and prefill) that the chat template made, kept in its native form.
ChatGrammar = LlamaGrammar | _core.ChatParams


@dataclass(frozen=True, slots=True)
class PreparedChat:
    """A conversation ready to generate from (see :meth:`ChatRenderer.prepare`)."""

    prompt: list[int]
    grammar: ChatGrammar | None
    stop: list[str]  # the format's stops, besides the caller's
    preserved_tokens: list[int]  # special tokens whose text is part of the answer
    parser: OutputParser
    check: AnswerCheck | None = None  # what the completed answer is validated against


class ChatRenderer:
    """A model's chat formatting: the Jinja templates llama.cpp renders, or one of
    llama-cpp-python's Python formats, and the parser of the answers.

    Args:
        model: The model (its vocabulary and GGUF template).
        chat_template: A Jinja template of the caller's (wins over everything).
        chat_format: A built-in format by name instead of the model's template.
        time_limit: Seconds loading the templates, or one render, may take.
        max_output_bytes: The longest prompt a render may produce.
        max_macro_depth: How deep macro calls may nest while rendering (0: no limit).
    """

    def __init__(
        self,
        model: _core.Model,
        chat_template: str | None,
        chat_format: str | None,
        *,
        time_limit: float = _core.TEMPLATE_DEFAULT_TIME_LIMIT,
        max_output_bytes: int = _core.TEMPLATE_DEFAULT_MAX_OUTPUT_BYTES,
        max_macro_depth: int = _core.TEMPLATE_DEFAULT_MAX_MACRO_DEPTH,
    ) -> None:
        self._model = model
        self._chat_template = chat_template
        self._chat_format = chat_format
        self._time_limit = time_limit
        self._max_output_bytes = max_output_bytes
        self._max_macro_depth = max_macro_depth
        self._templates: _core.ChatTemplates | None = None
        self._refused: TemplateError | None = None

    def close(self) -> None:
        """Drop the templates (they hold a reference to the model)."""
        self._templates = None

    def templates(self) -> _core.ChatTemplates:
        """llama.cpp's templates: ``chat_template`` if given, else the GGUF's (llama.cpp falls
        back to ChatML for a model without one), checked and bounded as docs/hardening.md
        ("Hostile chat templates") says.

        Raises:
            TemplateError: The template does not parse, is refused, or took too long to load;
                the same error again on every later call (a load past its deadline still
                runs in the background: it is not started twice).
        """
        if self._refused is not None:
            raise TemplateError(str(self._refused))
        if self._templates is None:
            try:
                self._templates = _core.ChatTemplates(
                    self._model,
                    self._chat_template or "",
                    time_limit=self._time_limit,
                    max_output_bytes=self._max_output_bytes,
                    max_macro_depth=self._max_macro_depth,
                )
            except TemplateError as error:
                self._refused = error
                raise
        return self._templates

    def formatter(self) -> ChatFormatter | None:
        """The Python format used instead of a Jinja template: ``chat_format`` by name, or
        llama-cpp-python's ``"llama-2"`` for a model without a template; None when the model's
        (or the given) template is rendered by llama.cpp.

        Raises:
            InvalidArgumentError: An unknown ``chat_format``.
        """
        if self._chat_template:
            return None
        name = self._chat_format
        if name is None:
            if self._model.chat_template():
                return None
            name = "llama-2"
        if name not in CHAT_FORMATS:
            raise InvalidArgumentError(f"unknown chat_format {name!r}; known: {sorted(CHAT_FORMATS)}")
        return CHAT_FORMATS[name]

    def render(
        self,
        messages: Sequence[Message],
        *,
        tools: Sequence[Mapping[str, Any]] | None = None,
        tool_choice: str | Mapping[str, Any] | None = None,
        json_schema: Mapping[str, Any] | None = None,
        parallel_tool_calls: bool = False,
        reasoning_format: ReasoningFormat = "auto",
        add_generation_prompt: bool = True,
        template_kwargs: Mapping[str, Any] | None = None,
    ) -> _core.ChatParams:
        """Validate the request and render it with llama.cpp's templates.

        ``json_schema`` is not given to the template (whose grammar would be llama.cpp's
        converter's): the caller constrains the answer with :meth:`answer_grammar`.

        Raises:
            InvalidArgumentError: Malformed messages or tools, or the template rejected them.
        """
        check_messages(messages)
        offered, choice = _tool_choice(_checked_tools(tools), tool_choice)
        del json_schema
        return self._render(
            messages=messages,
            tools=offered,
            tool_choice=choice,
            parallel_tool_calls=parallel_tool_calls,
            reasoning_format=reasoning_format,
            add_generation_prompt=add_generation_prompt,
            template_kwargs=dict(template_kwargs or {}),
        )

    def _render(
        self,
        *,
        messages: Sequence[Message],
        tools: list[Mapping[str, Any]],
        tool_choice: str,
        parallel_tool_calls: bool,
        reasoning_format: ReasoningFormat,
        add_generation_prompt: bool,
        template_kwargs: dict[str, Any],
    ) -> _core.ChatParams:
        # Inputs were checked by the caller: here they are only serialized for llama.cpp.
        thinking = template_kwargs.pop("enable_thinking", None)
        if thinking is not None and not isinstance(thinking, bool):
            raise InvalidArgumentError(f"enable_thinking must be a bool, got {thinking!r}")
        request = _core.ChatRequest()
        try:
            request.messages = json.dumps(list(messages))
            request.tools = json.dumps(tools) if tools else ""
            request.template_kwargs = [(k, json.dumps(v)) for k, v in template_kwargs.items()]
        except (TypeError, ValueError, RecursionError) as error:  # not JSON, circular, too deep
            raise InvalidArgumentError(f"chat request is not JSON-serializable: {error}") from None
        request.tool_choice = tool_choice if tools else "auto"
        request.parallel_tool_calls = parallel_tool_calls
        request.add_generation_prompt = add_generation_prompt
        request.enable_thinking = True if thinking is None else thinking
        request.reasoning_format = reasoning_format
        return self.templates().apply(request)

    def prepare(
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
        template_kwargs: Mapping[str, Any] | None = None,
    ) -> PreparedChat:
        """Everything a chat generation needs but the sampling values: the prompt's tokens,
        the grammar (a JSON schema, tool calls or ``grammar``), stops, the parser of the
        answer and what the completed answer is validated against. Each input is checked
        here, once, before anything is generated or queued.

        A JSON schema's grammar is always :func:`~llama_cpp.json_schema.schema_to_grammar`'s
        (never the chat template's, which is llama.cpp's converter's).

        Raises:
            InvalidArgumentError: Malformed messages or tools (a tool's ``parameters`` that is
                not a JSON schema), or the template rejected them.
            UnsupportedSchemaError: The schema has a keyword the grammar cannot enforce.
            GrammarError: A ``response_format`` schema that is not a valid JSON schema.
        """
        check_messages(messages)
        _check_choices(reasoning_format, parallel_tool_calls, template_kwargs)
        if functions or function_call:
            if tools or tool_choice:
                raise InvalidArgumentError("pass tools/tool_choice or functions/function_call, not both")
            tools, tool_choice = _legacy_functions(functions, function_call)
        offered, choice = _tool_choice(_checked_tools(tools), tool_choice)
        schema = schema_for_response_format(response_format) if response_format is not None else None
        if grammar is not None and (schema is not None or offered):
            raise InvalidArgumentError("pass either grammar or a JSON response_format / tools, not both")
        calls_tools = bool(offered) and choice != "none"
        # The schemas are checked, and the answer's converted (or refused), first: nothing is
        # rendered for a request that cannot be answered.
        check = AnswerCheck.build(schema, offered if calls_tools else [])
        schema_gbnf = schema_to_grammar(schema) if schema is not None else None
        variables = dict(template_kwargs or {})
        formatter = self.formatter()
        if calls_tools and (
            formatter is not None or not dict(self.templates().caps())["supports_tool_calls"]
        ):
            # The format has no tool calls of its own: the generic JSON answer (chat_tools).
            if schema is not None:
                raise InvalidArgumentError(
                    "this chat format has no tool calls of its own: pass tools or a JSON response_format"
                )
            messages = with_tools_described(messages, offered, choice, parallel_tool_calls)
            call_schema = tool_call_schema(offered, choice, parallel_tool_calls)
            tool_grammar = LlamaGrammar(schema_to_grammar(call_schema))
            prepared = self._finish(
                messages=messages,
                formatter=formatter,
                grammar=tool_grammar,
                parser=GenericToolParser(),
                variables=variables,
                reasoning_format=reasoning_format,
            )
            return replace(prepared, check=check)
        if formatter is not None:
            prepared = self._finish(
                messages=messages,
                formatter=formatter,
                grammar=grammar or (LlamaGrammar(schema_gbnf) if schema_gbnf is not None else None),
                parser=PlainText(),
                variables=variables,
                reasoning_format=reasoning_format,
            )
            return replace(prepared, check=check)
        thinking = variables.get("enable_thinking") is not False  # _render takes it out
        params = self._render(
            messages=messages,
            tools=offered,
            tool_choice=choice,
            parallel_tool_calls=parallel_tool_calls,
            reasoning_format=reasoning_format,
            add_generation_prompt=True,
            template_kwargs=variables,
        )
        chat_grammar: ChatGrammar | None = grammar
        if schema_gbnf is not None:
            # Ours replaces the template's tool-call grammar too: a JSON answer was asked for
            # (llama.cpp's templates give the response format the same precedence).
            chat_grammar = answer_grammar(schema_gbnf, params, reasoning_format, thinking)
        elif params.grammar:
            chat_grammar = params
        return PreparedChat(
            prompt=self._model.tokenize(params.prompt.encode("utf-8"), True, True),
            grammar=chat_grammar,
            stop=list(params.additional_stops),
            preserved_tokens=list(params.preserved_tokens),
            parser=_core.ChatParser(params),
            check=check,
        )

    def _finish(
        self,
        *,
        messages: Sequence[Message],
        formatter: ChatFormatter | None,
        grammar: LlamaGrammar | None,
        parser: OutputParser,
        variables: dict[str, Any],
        reasoning_format: ReasoningFormat,
    ) -> PreparedChat:
        """A conversation whose answer is plain text or the generic tool JSON: rendered by
        the Python format, or by the template with no tools of its own."""
        if formatter is not None:
            rendered = formatter(messages, **variables)
            return PreparedChat(
                prompt=self._model.tokenize(rendered.prompt.encode("utf-8"), True, True),
                grammar=grammar,
                stop=rendered.stop,
                preserved_tokens=[],
                parser=parser,
            )
        params = self._render(
            messages=messages,
            tools=[],
            tool_choice="auto",
            parallel_tool_calls=False,
            reasoning_format=reasoning_format,
            add_generation_prompt=True,
            template_kwargs=variables,
        )
        return PreparedChat(
            prompt=self._model.tokenize(params.prompt.encode("utf-8"), True, True),
            grammar=grammar,
            stop=list(params.additional_stops),
            preserved_tokens=list(params.preserved_tokens),
            parser=parser,
        )


# Why a start symbol of our own: the schema's GBNF keeps its ``root``, and the reasoning
# that may come first is a rule around it (no renaming inside a grammar we did not write).
_ANSWER_ROOT = "x-llama-cpp-answer"
_WS = "[ \\t\\n]*"


def _gbnf_literal(text: str) -> str:
    return json.dumps(text, ensure_ascii=False)


def _gbnf_char_class_not(char: str) -> str:
    escaped = "\\" + char if char in "\\]^-[" else json.dumps(char, ensure_ascii=False)[1:-1]
    return f"[^{escaped}]"


def _gbnf_until(end: str) -> str:
    """GBNF for any text that does not contain ``end`` (llama.cpp's gbnf_excluding_pattern)."""
    alternatives = [
        (_gbnf_literal(end[:i]) + " " if i else "") + _gbnf_char_class_not(end[i]) for i in range(len(end))
    ]
    return "( " + " | ".join(alternatives) + " )*"


def answer_grammar(
    schema_gbnf: str,
    params: _core.ChatParams,
    reasoning_format: ReasoningFormat,
    thinking: bool,
) -> LlamaGrammar:
    """The grammar of a JSON answer to a rendered chat: the schema's, after the model's
    reasoning where the template has a reasoning block that is on (as llama.cpp's own
    response-format grammar allows it; ``reasoning_format="none"`` leaves reasoning in the
    content, so there is none). A generation prompt that opens the block already (a
    thinking model forced to think) makes the reasoning compulsory. ``thinking``: the
    ``enable_thinking`` the chat was rendered with.
    """
    start = params.thinking_start_tag.strip()
    ends = [e.strip() for e in params.thinking_end_tags if e.strip()]
    if not (params.supports_thinking and thinking and reasoning_format != "none" and start and ends):
        return LlamaGrammar(schema_gbnf)
    end = ends[0]
    reasoning = f"{_gbnf_until(end)} {_gbnf_literal(end)} {_WS}"
    if params.generation_prompt.rstrip().endswith(start):
        rule = f"{_ANSWER_ROOT} ::= {reasoning} root"
    else:
        rule = f"{_ANSWER_ROOT} ::= ( {_WS} {_gbnf_literal(start)} {reasoning} )? root"
    return LlamaGrammar(schema_gbnf.rstrip("\n") + "\n" + rule + "\n", root=_ANSWER_ROOT)


def openai_chunks(
    chunks: Iterator[ChatCompletionChunk], chunk_type: type[OpenAIChatCompletionChunk]
) -> Iterator[OpenAIChatCompletionChunk]:
    """The chunks as ``openai``'s pydantic ``chunk_type``; closing this closes ``chunks``."""
    try:
        for chunk in chunks:
            yield chunk_type.model_validate(chunk)
    finally:
        # Leaving the loop early must stop the generation now, not when the stream is collected.
        close = getattr(chunks, "close", None)
        if close is not None:
            close()
