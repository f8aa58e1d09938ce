"""JSON schemas to grammars that enforce them, and the validation of every answer.

llama.cpp's converter (json-schema-to-grammar.cpp, the one llama-server uses) ignores some
value-constraining keywords. :func:`schema_to_grammar` enforces them in the grammar or
refuses the schema up front (:class:`UnsupportedSchemaError`, naming each keyword).
"""

from __future__ import annotations

import json
from collections.abc import Mapping
from typing import Any

from llama_cpp import _core


def schema_to_grammar(schema: Mapping[str, Any]) -> str:
    """GBNF (start symbol ``root``) accepting only JSON documents valid under ``schema``.

    Raises:
        UnsupportedSchemaError: A keyword whose constraint cannot be enforced (named).
        GrammarError: The schema cannot be converted (with the reason).
    """
    return _core.json_schema_to_grammar(json.dumps(schema))
