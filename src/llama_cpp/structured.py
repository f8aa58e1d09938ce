"""Structured answers checked against their schemas: a chat answer constrained by a JSON
schema (``response_format``) and the arguments of its tool calls are validated with
``jsonschema`` once the answer is complete, whole or streamed.

The grammar (:func:`llama_cpp.json_schema.schema_to_grammar`) enforces what it can and
refuses what it cannot; validation is the last word, so that an answer that breaks its
schema (a keyword enforced by validation only, or a grammar's gap) is never returned as a
success: :class:`~llama_cpp.errors.SchemaValidationError` is raised instead. A truncated
answer (``finish_reason="length"``) is not validated: it is incomplete by definition.
"""

from __future__ import annotations

import json
from collections.abc import Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

import jsonschema

from llama_cpp.errors import GrammarError, InvalidArgumentError, SchemaValidationError
from llama_cpp.json_schema import FORMAT_CHECKER, check_depth
from llama_cpp.llama_types import ChatCompletionChunk, ChatCompletionMessage

__all__ = ["AnswerCheck", "StreamedAnswer", "schema_validator"]

#: A jsonschema validator (jsonschema.protocols.Validator; the package has no stubs here).
Validator = Any

# Longest answer quoted in an error message (the whole answer is on the exception).
_QUOTE = 200


def schema_validator(schema: Mapping[str, Any], where: str = "JSON schema") -> Validator:
    """A validator of ``schema``: the draft its ``$schema`` names, Draft 2020-12 without one;
    ``format`` is asserted for the formats the grammar enforces.

    Raises:
        GrammarError: ``schema`` is not a valid schema of its draft (with jsonschema's reason).
    """
    if not isinstance(schema, Mapping):
        raise GrammarError(f"invalid JSON schema: {where} must be an object, got {type(schema).__name__}")
    check_depth(schema)
    cls = jsonschema.validators.validator_for(schema, default=jsonschema.Draft202012Validator)
    try:
        cls.check_schema(schema)
    except jsonschema.SchemaError as error:
        raise GrammarError(f"invalid JSON schema ({where}): {error.message}") from error
    except RecursionError:  # $refs that nest deeper than the schema's own depth
        raise GrammarError(f"invalid JSON schema ({where}): nested too deeply to check") from None
    # The formats the grammar enforces are asserted (json_schema.FORMAT_CHECKER); the others
    # are refused (json_schema.REFUSED_FORMATS) or annotations, whatever packages are installed.
    return cls(schema, format_checker=FORMAT_CHECKER)


def _invalid(what: str, answer: str, reason: str) -> SchemaValidationError:
    quoted = answer if len(answer) <= _QUOTE else answer[:_QUOTE] + "..."
    return SchemaValidationError(f"{what} does not validate: {reason} (answer: {quoted!r})", answer, reason)


def _check_document(validator: Validator, text: str, what: str) -> None:
    """Raise SchemaValidationError unless ``text`` is JSON valid under ``validator``."""
    try:
        document = json.loads(text)
        failure = jsonschema.exceptions.best_match(validator.iter_errors(document))
    except json.JSONDecodeError as error:
        raise _invalid(what, text, f"not JSON: {error}") from None
    except RecursionError:  # a recursive schema lets an answer nest as deep as max_tokens
        raise _invalid(what, text, "nested too deeply to validate") from None
    if failure is not None:
        where = "/".join(str(p) for p in failure.absolute_path)
        raise _invalid(what, text, f"at '/{where}': {failure.message}")


@dataclass(frozen=True, slots=True)
class AnswerCheck:
    """What a completed chat answer must satisfy: its content, the schema of
    ``response_format``; each tool call's arguments, its tool's ``parameters``.

    Attributes:
        content: The validator of the content (None: free text).
        tools: A validator per tool name (tools without ``parameters`` take any object).
    """

    content: Validator | None = None
    tools: Mapping[str, Validator] = field(default_factory=dict)

    @classmethod
    def build(
        cls, schema: Mapping[str, Any] | None, tools: Sequence[Mapping[str, Any]]
    ) -> AnswerCheck | None:
        """The check of an answer to ``schema`` and ``tools`` (None when there is nothing to
        check), every schema checked for validity now, before anything is generated.

        Raises:
            GrammarError: ``schema`` is not a valid JSON schema.
            InvalidArgumentError: A tool's ``parameters`` is not a valid JSON schema.
        """
        content = schema_validator(schema, "response_format") if schema is not None else None
        validators: dict[str, Validator] = {}
        for i, tool in enumerate(tools):
            function = tool["function"]
            parameters = function.get("parameters")
            if parameters is None:
                parameters = {"type": "object"}
            try:
                validators[function["name"]] = schema_validator(parameters, f"tools[{i}].function.parameters")
            except GrammarError as error:
                raise InvalidArgumentError(str(error)) from error
        if content is None and not validators:
            return None
        return cls(content, validators)

    def check(self, message: ChatCompletionMessage, finish_reason: str | None) -> None:
        """Raise SchemaValidationError unless ``message`` (a completed answer) validates.

        Only finished answers are checked (``"stop"``, ``"tool_calls"``); a truncated one
        (``"length"``) is returned as it is. The content is checked when there is a schema
        and no tool call; each tool call's arguments against its tool.
        """
        if finish_reason not in ("stop", "tool_calls"):
            return
        calls = message.get("tool_calls") or []
        for call in calls:
            name, arguments = call["function"]["name"], call["function"]["arguments"]
            validator = self.tools.get(name)
            if validator is None:
                raise _invalid(f"tool call {name!r}", arguments, "no tool of that name was offered")
            _check_document(validator, arguments, f"the arguments of tool call {name!r}")
        if self.content is not None and not calls:
            _check_document(self.content, message.get("content") or "", "the answer")


class StreamedAnswer:
    """The message a chat stream builds, checked by an :class:`AnswerCheck` when it ends.

    :meth:`chunks` passes the chunks on as they come and raises SchemaValidationError in
    place of the chunk carrying the finish reason when the completed answer is invalid.
    """

    def __init__(self, check: AnswerCheck) -> None:
        self._check = check
        self._content: list[str] = []
        self._calls: dict[int, dict[str, Any]] = {}

    def _add(self, delta: Mapping[str, Any]) -> None:
        if delta.get("content"):
            self._content.append(delta["content"])
        for call in delta.get("tool_calls") or ():
            entry = self._calls.setdefault(call["index"], {"name": "", "arguments": []})
            function = call.get("function") or {}
            if function.get("name"):
                entry["name"] = function["name"]
            if function.get("arguments"):
                entry["arguments"].append(function["arguments"])

    def message(self) -> ChatCompletionMessage:
        """The message streamed so far."""
        message: ChatCompletionMessage = {"role": "assistant", "content": "".join(self._content)}
        if self._calls:
            message["tool_calls"] = [
                {
                    "id": "",
                    "type": "function",
                    "function": {"name": c["name"], "arguments": "".join(c["arguments"])},
                }
                for _, c in sorted(self._calls.items())
            ]
        return message

    def chunks(self, chunks: Iterator[ChatCompletionChunk]) -> Iterator[ChatCompletionChunk]:
        """``chunks``, the answer checked before its finish reason is passed on (closing this
        closes ``chunks``)."""
        try:
            for chunk in chunks:
                for choice in chunk["choices"]:
                    self._add(choice.get("delta") or {})
                    if choice.get("finish_reason") is not None:
                        self._check.check(self.message(), choice["finish_reason"])
                yield chunk
        finally:
            close = getattr(chunks, "close", None)
            if close is not None:
                close()
