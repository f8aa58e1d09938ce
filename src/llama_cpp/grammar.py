"""GBNF grammars that constrain generation: :class:`LlamaGrammar`."""

from __future__ import annotations

import json
import os
import warnings
from collections.abc import Iterator, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from llama_cpp import _core
from llama_cpp.errors import GrammarError


class UnenforcedSchemaWarning(UserWarning):
    """A JSON schema keyword that the generated grammar does not enforce."""


# Keywords llama.cpp's converter (json-schema-to-grammar.cpp at the pinned commit) ignores.
_IGNORED_KEYWORDS = frozenset(
    {
        "multipleOf",
        "uniqueItems",
        "minProperties",
        "maxProperties",
        "not",
        "if",
        "then",
        "else",
        "contains",
        "minContains",
        "maxContains",
        "patternProperties",
        "dependentRequired",
        "dependentSchemas",
        "propertyNames",
        "unevaluatedProperties",
        "unevaluatedItems",
    }
)
_NUMBER_BOUNDS = ("minimum", "maximum", "exclusiveMinimum", "exclusiveMaximum")
_VALUE_KEYWORDS = frozenset({"enum", "const", "default", "examples"})  # hold data, not schemas


def _unenforced(schema: object, path: str) -> Iterator[str]:
    """``path/keyword`` of every keyword in ``schema`` that the converter ignores."""
    if isinstance(schema, list):
        for i, item in enumerate(schema):
            yield from _unenforced(item, f"{path}/{i}")
        return
    if not isinstance(schema, Mapping):
        return
    for keyword in sorted(_IGNORED_KEYWORDS & schema.keys()):
        yield f"{path}/{keyword}"
    if schema.get("type") == "number":
        yield from (f"{path}/{keyword}" for keyword in _NUMBER_BOUNDS if keyword in schema)
    if "pattern" in schema:  # a pattern replaces the length limits
        yield from (f"{path}/{keyword}" for keyword in ("minLength", "maxLength") if keyword in schema)
    for key, value in schema.items():
        if key not in _VALUE_KEYWORDS:
            yield from _unenforced(value, f"{path}/{key}")


def warn_unenforced(schema: object, *, stacklevel: int = 2) -> None:
    """Warn (:class:`UnenforcedSchemaWarning`) about each keyword of ``schema`` that llama.cpp's
    converter ignores; ``stacklevel`` as for :func:`warnings.warn`, counted from here."""
    unenforced = list(_unenforced(schema, "#"))
    if unenforced:
        warnings.warn(
            "llama.cpp's JSON schema converter does not enforce: " + ", ".join(unenforced),
            UnenforcedSchemaWarning,
            stacklevel=stacklevel,
        )


@dataclass(frozen=True, slots=True)
class LlamaGrammar:
    """A GBNF grammar (llama.cpp's grammar format) and its start symbol.

    llama.cpp's parser checks it on construction, without a model: a grammar it rejects
    (syntax, an undefined rule, no root rule, left recursion) raises :class:`GrammarError`
    with llama.cpp's reason and where it found the fault. Token literals (``<end_of_turn>``)
    are resolved against a model's vocabulary when a generation starts, with a fresh grammar
    state every time; :meth:`Llama.check_grammar` checks them up front.

    Raises:
        GrammarError: llama.cpp rejects the grammar.
    """

    grammar: str
    root: str = "root"
    #: Lazy: unconstrained until the text matches a trigger pattern (a regex) or a trigger
    #: token is sampled, as llama-server enforces tool calls under tool_choice="auto".
    lazy: bool = False
    trigger_patterns: tuple[str, ...] = ()
    trigger_tokens: tuple[int, ...] = ()
    #: Tokens the grammar accepts before generation starts (a template's generation prompt).
    prefill_tokens: tuple[int, ...] = ()

    def __post_init__(self) -> None:
        _core.validate_grammar(self.grammar, self.root)

    @classmethod
    def from_chat_params(cls, params: _core.ChatParams) -> LlamaGrammar:
        """The grammar a rendered chat asks for (tool calls, a JSON answer), with its
        triggers and prefill, as llama.cpp's chat templates made it."""
        return cls(
            grammar=params.grammar,
            lazy=params.grammar_lazy,
            trigger_patterns=tuple(params.grammar_trigger_patterns),
            trigger_tokens=tuple(params.grammar_trigger_tokens),
            prefill_tokens=tuple(params.grammar_prefill),
        )

    @classmethod
    def from_string(cls, grammar: str, verbose: bool = True, root: str = "root") -> LlamaGrammar:
        """A grammar from GBNF text (``verbose`` is accepted for llama-cpp-python compatibility).

        Raises:
            GrammarError: The text is empty, or llama.cpp rejects it (with its reason).
        """
        del verbose
        if not grammar.strip():
            raise GrammarError("invalid grammar: the grammar is empty")
        return cls(grammar=grammar, root=root)

    @classmethod
    def from_json_schema(cls, json_schema: str | Mapping[str, Any], verbose: bool = True) -> LlamaGrammar:
        """A grammar that accepts exactly the JSON documents valid under ``json_schema``.

        Converted by llama.cpp's own converter (the one llama-server uses): required and
        optional properties, enum, const, arrays with min/maxItems, nested objects,
        ``$ref``/``$defs``, anyOf/oneOf, string lengths, patterns and formats, integer bounds,
        integer vs number, additionalProperties.

        The converter ignores some keywords (bounds of non-integer numbers, multipleOf,
        uniqueItems, min/maxProperties, not/if/then/else, ...): output can then parse but break
        them. Rather than let that pass silently, a :class:`UnenforcedSchemaWarning` names each.

        Raises:
            GrammarError: The schema is not valid JSON or cannot be converted (with the reason).
        """
        del verbose
        text = json_schema if isinstance(json_schema, str) else json.dumps(json_schema)
        grammar = cls(grammar=_core.json_schema_to_grammar(text))
        schema = json.loads(text) if isinstance(json_schema, str) else json_schema
        warn_unenforced(schema, stacklevel=3)
        return grammar

    @classmethod
    def from_file(
        cls, path: str | os.PathLike[str], verbose: bool = True, root: str = "root"
    ) -> LlamaGrammar:
        """A grammar from a ``.gbnf`` file (raises FileNotFoundError if there is none)."""
        return cls.from_string(Path(path).read_text(encoding="utf-8"), verbose, root)
