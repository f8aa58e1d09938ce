"""GBNF grammars that constrain generation: :class:`LlamaGrammar`."""

from __future__ import annotations

import os
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from llama_cpp import _core
from llama_cpp.errors import GrammarError
from llama_cpp.json_schema import load_schema, schema_to_grammar


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
        if not isinstance(grammar, str):
            raise GrammarError(f"invalid grammar: expected GBNF text, got {type(grammar).__name__}")
        if not grammar.strip():
            raise GrammarError("invalid grammar: the grammar is empty")
        return cls(grammar=grammar, root=root)

    @classmethod
    def from_json_schema(cls, json_schema: str | Mapping[str, Any], verbose: bool = True) -> LlamaGrammar:
        """A grammar that accepts only JSON documents valid under ``json_schema``.

        Converted by :func:`llama_cpp.json_schema.schema_to_grammar`: properties (required
        and optional), ``additionalProperties``, ``min/maxProperties``, ``enum``, ``const``,
        arrays (``items``, ``prefixItems``, ``min/maxItems``, ``uniqueItems`` over a small
        set of values), strings (lengths, ``pattern`` and lengths together, formats date,
        time, date-time and uuid), integers and numbers (bounds, exclusive bounds, integral
        ``multipleOf``), ``$ref``/``$defs`` (recursion too), ``anyOf``, ``oneOf`` with
        disjoint branches, ``allOf``. Every document the grammar accepts validates under the
        schema (draft 2020-12), except ``uniqueItems`` on other items, left to the validation
        of the answer. A keyword it cannot enforce (``not``, ``if``/``then``/``else``,
        ``patternProperties``, a fractional ``multipleOf``, a backreference in a pattern, ...)
        refuses the schema up front.

        Raises:
            UnsupportedSchemaError: The schema uses keywords the grammar cannot enforce
                (``keywords`` names each as a JSON pointer).
            GrammarError: The schema is not valid JSON, is invalid, or cannot be converted
                (with the reason).
        """
        del verbose
        schema = load_schema(json_schema) if isinstance(json_schema, str) else json_schema
        return cls(grammar=schema_to_grammar(schema))

    @classmethod
    def from_file(
        cls, path: str | os.PathLike[str], verbose: bool = True, root: str = "root"
    ) -> LlamaGrammar:
        """A grammar from a ``.gbnf`` file (raises FileNotFoundError if there is none)."""
        return cls.from_string(Path(path).read_text(encoding="utf-8"), verbose, root)
