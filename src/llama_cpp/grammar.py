"""GBNF grammars that constrain generation: :class:`LlamaGrammar`."""

from __future__ import annotations

import json
import os
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from llama_cpp import _core
from llama_cpp.errors import GrammarError


@dataclass(frozen=True, slots=True)
class LlamaGrammar:
    """A GBNF grammar (llama.cpp's grammar format) and its start symbol.

    llama.cpp parses it against the model's vocabulary when a generation starts, with a fresh
    grammar state every time; a grammar it rejects raises :class:`GrammarError` with
    llama.cpp's reason. :meth:`Llama.check_grammar` checks one up front.
    """

    grammar: str
    root: str = "root"

    @classmethod
    def from_string(cls, grammar: str, verbose: bool = True, root: str = "root") -> LlamaGrammar:
        """A grammar from GBNF text (``verbose`` is accepted for llama-cpp-python compatibility).

        Raises:
            GrammarError: The text is empty.
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
        ``$ref``/``$defs``, anyOf/oneOf, string lengths and formats, integer vs number,
        additionalProperties.

        Raises:
            GrammarError: The schema is not valid JSON or cannot be converted (with the reason).
        """
        del verbose
        text = json_schema if isinstance(json_schema, str) else json.dumps(json_schema)
        return cls(grammar=_core.json_schema_to_grammar(text))

    @classmethod
    def from_file(
        cls, path: str | os.PathLike[str], verbose: bool = True, root: str = "root"
    ) -> LlamaGrammar:
        """A grammar from a ``.gbnf`` file (raises FileNotFoundError if there is none)."""
        return cls.from_string(Path(path).read_text(encoding="utf-8"), verbose, root)
