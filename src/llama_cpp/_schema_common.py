"""What the JSON schema converter's modules share: the JSON value type, the errors inside a
conversion, annotation keywords, and the equality jsonschema uses."""

from __future__ import annotations

import json
from typing import Any, TypeAlias

from llama_cpp.errors import GrammarError

#: A decoded JSON value (a schema, a part of one, data): its type is checked where it matters.
Json: TypeAlias = Any

#: Most branches an allOf of anyOfs may expand to.
MAX_BRANCHES = 64

#: Keywords that constrain nothing (annotations, and $defs, visited through $ref).
ANNOTATIONS = frozenset(
    {
        "$schema", "$id", "$comment", "$anchor", "$dynamicAnchor", "$vocabulary", "$defs",
        "definitions", "title", "description", "default", "examples", "deprecated",
        "readOnly", "writeOnly", "contentEncoding", "contentMediaType", "contentSchema",
    }
)  # fmt: skip
LOWER_BOUNDS = ("minimum", "exclusiveMinimum", "minLength", "minItems", "minProperties")
UPPER_BOUNDS = ("maximum", "exclusiveMaximum", "maxLength", "maxItems", "maxProperties")


def canonical(value: Json) -> str:
    """Equal for values jsonschema's uniqueItems and enum treat as equal (1 == 1.0)."""
    if isinstance(value, bool) or value is None:
        return json.dumps(value)
    if isinstance(value, int | float):
        return f"n{float(value)!r}" if not (isinstance(value, int) and abs(value) > 2**53) else f"n{value}"
    if isinstance(value, list):
        return "[" + ",".join(canonical(v) for v in value) + "]"
    if isinstance(value, dict):
        return "{" + ",".join(f"{json.dumps(k)}:{canonical(v)}" for k, v in sorted(value.items())) + "}"
    return json.dumps(value)


class NoValue(GrammarError):
    """No value satisfies a (sub)schema: a part that may be left out (an optional property,
    a branch, more items) is dropped; elsewhere the schema is refused."""


class Refused(Exception):
    """A keyword this converter cannot enforce (pointer, reason)."""

    def __init__(self, ptr: str, reason: str) -> None:
        super().__init__(reason)
        self.ptr, self.reason = ptr, reason
