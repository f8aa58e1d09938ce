"""JSON schemas to grammars that enforce them.

llama.cpp's converter (json-schema-to-grammar.cpp, the one llama-server uses) ignores some
value-constraining keywords and over-approximates others (a pattern it cannot translate
accepts any string, ``allOf`` merges only objects, ``oneOf`` is ``anyOf``). This converter,
written in Python on the same GBNF conventions, enforces every keyword it accepts or refuses
the schema up front (:class:`UnsupportedSchemaError`, naming each keyword): every document its
grammar accepts validates under the schema (jsonschema, draft 2020-12), except for
``uniqueItems`` on items without a small finite domain, which is left to the validation of the
answer. The grammar accepts a subset of the valid documents: numbers without exponent and with
at most 15 digits, strings that match a pattern in full, declared properties only (when some
are declared), required properties first, at most :data:`MAX_REPEAT` repeated items.
"""

from __future__ import annotations

import json
import re
from collections.abc import Mapping
from decimal import Decimal
from typing import Any
from urllib.parse import unquote

from jsonschema import Draft202012Validator, FormatChecker, SchemaError

from llama_cpp import _core
from llama_cpp._gbnf import JSON_CHAR, Rules, choice, literal
from llama_cpp._schema_common import ANNOTATIONS, Json, NoValue, Refused, canonical
from llama_cpp._schema_merge import merge
from llama_cpp._schema_numbers import Bound, NumberError, number_rule, schema_bound
from llama_cpp._schema_strings import FORMAT_PATTERNS, PatternError, string_rule
from llama_cpp.errors import GrammarError, UnsupportedSchemaError

#: Keywords whose constraint no grammar here enforces: a schema using one is refused.
UNSUPPORTED_KEYWORDS = (
    "not",
    "if",
    "then",
    "else",
    "dependentSchemas",
    "dependentRequired",
    "propertyNames",
    "patternProperties",
    "unevaluatedProperties",
    "unevaluatedItems",
    "contains",
    "minContains",
    "maxContains",
    "$dynamicRef",
    "$recursiveRef",
)
#: Most items or characters one repetition may need (more is cut: a subset), deepest nesting.
MAX_REPEAT = 1000
MAX_DEPTH = 100
#: Formats refused up front: ones jsonschema checks out of the box that no pattern here
#: enforces. Every other format outside FORMAT_PATTERNS (uri, hostname, duration, ...) is an
#: annotation, as draft 2020-12 has it by default: neither enforced nor asserted, whatever
#: format packages are installed.
REFUSED_FORMATS = frozenset({"ipv6", "regex", "idn-hostname", "relative-json-pointer"})
#: The checker of the formats the grammar enforces: draft 2020-12's checkers of them (time
#: and date-time need jsonschema's optional rfc3339-validator; their patterns hold regardless).
FORMAT_CHECKER = FormatChecker(())
FORMAT_CHECKER.checkers = {
    name: check
    for name, check in Draft202012Validator.FORMAT_CHECKER.checkers.items()
    if name in FORMAT_PATTERNS
}
#: Most distinct values of a uniqueItems array the grammar lists in canonical order.
MAX_UNIQUE_DOMAIN = 64
_ONE_SCHEMA = ("additionalProperties", "items", "additionalItems", *UNSUPPORTED_KEYWORDS[:8])
_SCHEMA_LISTS = ("allOf", "anyOf", "oneOf", "prefixItems", "items")
_SCHEMA_MAPS = ("properties", "$defs", "definitions", "patternProperties", "dependentSchemas")
_KEYWORDS_OF = {
    "object": ("properties", "required", "additionalProperties", "minProperties", "maxProperties"),
    "array": ("items", "prefixItems", "minItems", "maxItems", "uniqueItems"),
    "string": ("minLength", "maxLength", "pattern", "format"),
    "number": ("minimum", "maximum", "exclusiveMinimum", "exclusiveMaximum", "multipleOf"),
}
_ALL_TYPES = ("object", "array", "string", "number", "boolean", "null")
_FLOAT_EXACT_LOW: Bound = (Decimal(-(2**53)), True)
_FLOAT_EXACT_HIGH: Bound = (Decimal(2**53), True)
_SPACE = '| " " | "\\n"{1,2} [ \\t]{0,20}'


def schema_to_grammar(schema: Mapping[str, Any] | bool) -> str:
    """GBNF (start symbol ``root``) accepting only JSON documents valid under ``schema``.

    Args:
        schema: A JSON schema (draft 2020-12; ``$ref`` within the document only).

    Returns:
        The grammar's text.

    Raises:
        UnsupportedSchemaError: A keyword whose constraint cannot be enforced; ``keywords``
            names each (JSON pointers such as ``#/properties/x/not``).
        GrammarError: The schema is invalid, too deep, accepts no value, or its grammar is
            rejected by llama.cpp (with the reason).
    """
    if not isinstance(schema, Mapping | bool):
        raise GrammarError(f"invalid JSON schema: expected an object, got {type(schema).__name__}")
    check_depth(schema)
    try:
        return _to_grammar(schema)
    except RecursionError:  # a wide schema whose references nest deeper than MAX_DEPTH
        raise GrammarError("invalid JSON schema: nested too deeply to convert") from None


def load_schema(text: str) -> Mapping[str, Any] | bool:
    """The schema a JSON text holds, its nesting checked before it is parsed.

    Raises:
        GrammarError: The text is not JSON or nests deeper than :data:`MAX_DEPTH`.
    """
    depth = 0
    for token in _JSON_TOKENS.finditer(text):
        bracket = token.group()
        if bracket in "[{":
            depth += 1
            if depth > MAX_DEPTH:
                raise GrammarError(f"invalid JSON schema: nested deeper than {MAX_DEPTH} levels")
        elif bracket in "]}":
            depth -= 1
    try:
        schema = json.loads(text)
    except ValueError as e:
        raise GrammarError(f"invalid JSON schema: not JSON ({e})") from None
    if not isinstance(schema, dict | bool):
        raise GrammarError(f"invalid JSON schema: expected an object, got {type(schema).__name__}")
    return schema


def _to_grammar(schema: Mapping[str, Any] | bool) -> str:
    try:
        Draft202012Validator.check_schema(schema)
    except SchemaError as e:
        where = "".join(f"/{_escape(str(part))}" for part in e.absolute_path)
        raise GrammarError(f"invalid JSON schema: #{where}: {e.message}") from None
    refused = list(_unsupported(schema, "#"))
    converter = _Converter(schema)
    if not refused:
        converter.convert()
    refused += converter.refused
    if refused:
        raise UnsupportedSchemaError(
            "the grammar cannot enforce: " + "; ".join(f"{p} ({why})" for p, why in refused),
            tuple(dict.fromkeys(p for p, _ in refused)),
        )
    grammar = converter.rules.text()
    _core.validate_grammar(grammar, "root")
    return grammar


# A string to its closing quote or, unclosed, to the end (no backtracking: linear), or a bracket.
_JSON_TOKENS = re.compile(r'"(?:[^"\\]|\\.)*(?:"|\Z)|[\[\]{}]')


def check_depth(schema: object) -> None:
    """Raise GrammarError if ``schema`` (dicts and lists) nests deeper than :data:`MAX_DEPTH`:
    the converter and jsonschema recurse once or more per level."""
    todo = [(schema, 0)]
    while todo:
        node, depth = todo.pop()
        if depth > MAX_DEPTH:
            raise GrammarError(f"invalid JSON schema: nested deeper than {MAX_DEPTH} levels")
        if isinstance(node, Mapping):
            todo.extend((v, depth + 1) for v in node.values())
        elif isinstance(node, list):
            todo.extend((v, depth + 1) for v in node)


def _unsupported(schema: object, ptr: str) -> list[tuple[str, str]]:
    """(pointer, reason) of every keyword refused outright, in schema positions only."""
    if not isinstance(schema, Mapping):
        return []
    out = [(f"{ptr}/{k}", "not enforceable") for k in UNSUPPORTED_KEYWORDS if k in schema]
    ref = schema.get("$ref")
    if isinstance(ref, str) and not ref.startswith("#"):
        out.append((f"{ptr}/$ref", "remote $ref"))
    multiple = schema.get("multipleOf")
    if isinstance(multiple, float) and not multiple.is_integer():
        out.append((f"{ptr}/multipleOf", "fractional multipleOf"))
    for key in _ONE_SCHEMA:
        if key in schema and key not in UNSUPPORTED_KEYWORDS:
            out += _unsupported(schema[key], f"{ptr}/{key}")
    for key in _SCHEMA_LISTS:
        if isinstance(schema.get(key), list):
            for i, sub in enumerate(schema[key]):
                out += _unsupported(sub, f"{ptr}/{key}/{i}")
    for key in _SCHEMA_MAPS:
        if key in schema and key not in UNSUPPORTED_KEYWORDS and isinstance(schema[key], Mapping):
            for name, sub in schema[key].items():
                out += _unsupported(sub, f"{ptr}/{key}/{_escape(name)}")
    return out


def _escape(name: str) -> str:
    return name.replace("~", "~0").replace("/", "~1")


def _json_type(value: Json) -> str:
    if isinstance(value, bool):
        return "boolean"
    if value is None:
        return "null"
    if isinstance(value, int | float):
        return "number"
    if isinstance(value, str):
        return "string"
    return "array" if isinstance(value, list) else "object"


class _Converter:
    def __init__(self, root: Mapping[str, Any] | bool) -> None:
        self.root = root
        self.rules = Rules()
        self.refused: list[tuple[str, str]] = []
        self.validator = Draft202012Validator(
            root if isinstance(root, Mapping) else {}, format_checker=FORMAT_CHECKER
        )
        self.refs: dict[str, str] = {}

    def convert(self) -> None:
        self.rules.reserve("root")
        self.rules.define("space", _SPACE)
        self.rules.define("char", JSON_CHAR)
        body = self.visit(self.root, "#", "root")
        self.rules.define("root", body)

    # -- primitives --------------------------------------------------------------------

    def primitive(self, name: str) -> str:
        if name in self.rules.rules:
            return name
        if name == "string":
            self.rules.define("string", '"\\"" char* "\\""')
        elif name == "number":
            self.rules.define("number", "")
            self.rules.define("number", number_rule(self.rules, "num", None, None, integer=False))
        elif name == "integer":
            self.rules.define("integer", "")
            self.rules.define("integer", number_rule(self.rules, "int", None, None, integer=True))
        elif name == "value":
            self.rules.define("value", "")
            parts = [self.primitive(p) for p in ("object", "array", "string", "number")]
            self.rules.define("value", " | ".join(parts) + ' | "true" | "false" | "null"')
        elif name == "object":
            self.rules.define("object", "")
            kv = f'{self.primitive("string")} ":" space {self.primitive("value")}'
            self.rules.define("object", f'"{{" space ( {kv} ( "," space {kv} )* )? space "}}"')
        elif name == "array":
            self.rules.define("array", "")
            value = self.primitive("value")
            self.rules.define("array", f'"[" space ( {value} ( "," space {value} )* )? space "]"')
        return name

    # -- schemas -----------------------------------------------------------------------

    def visit(self, schema: Json, ptr: str, hint: str) -> str:
        """The name of (or an expression for) a rule matching the values valid under ``schema``."""
        try:
            return self._visit(schema, ptr, hint)
        except Refused as e:
            self.refused.append((e.ptr, e.reason))
            return '"null"'

    def _visit(self, schema: Json, ptr: str, hint: str) -> str:
        if schema is True or schema == {}:
            return self.primitive("value")
        if schema is False:
            raise NoValue(f"invalid JSON schema: {ptr} is false, which no value satisfies")
        schema = {k: v for k, v in schema.items() if k not in ANNOTATIONS}
        if not schema:
            return self.primitive("value")
        if "$ref" in schema:
            if len(schema) == 1:
                return self.ref(schema["$ref"], ptr)
            rest = {k: v for k, v in schema.items() if k != "$ref"}
            schema = {"allOf": [{"$ref": schema["$ref"]}, rest]}
        if "allOf" in schema:
            rest = {k: v for k, v in schema.items() if k != "allOf"}
            schema = merge([rest, *schema["allOf"]], ptr, self.resolve)
        for key in ("anyOf", "oneOf"):
            if key in schema:
                return self.union(schema, key, ptr, hint)
        if "const" in schema or "enum" in schema:
            return self.enum(schema, ptr, hint)
        alternatives = []
        for kind in self.types(schema):
            try:
                alternatives.append(self.typed(kind, schema, ptr, hint))
            except NoValue:
                if len(self.types(schema)) == 1:
                    raise
        if not alternatives:
            raise NoValue(f"invalid JSON schema: {ptr}: no value of any of its types satisfies it")
        return self.rules.add(hint, " | ".join(dict.fromkeys(alternatives)))

    def ref(self, ref: str, ptr: str) -> str:
        if ref in self.refs:
            return self.refs[ref]  # recursion: the rule is being made
        name = self.rules.reserve("ref-" + ref.lstrip("#/"))
        self.refs[ref] = name
        try:
            self.rules.define(name, self.visit(self.resolve(ref, ptr), ref, name + "-v"))
        except GrammarError:
            del self.refs[ref]  # the name stays undefined: nothing may refer to it
            raise
        return name

    def resolve(self, ref: str, ptr: str) -> Json:
        if not ref.startswith("#"):
            raise Refused(f"{ptr}/$ref", "remote $ref")
        node: Any = self.root
        for token in unquote(ref[1:]).split("/")[1:]:
            part = token.replace("~1", "/").replace("~0", "~")
            if isinstance(node, Mapping) and part in node:
                node = node[part]
            elif isinstance(node, list) and part.isdigit() and int(part) < len(node):
                node = node[int(part)]
            else:
                raise GrammarError(f"invalid JSON schema: unresolvable $ref {ref!r} at {ptr}")
        return node

    def union(self, schema: dict[str, Any], key: str, ptr: str, hint: str) -> str:
        rest = {k: v for k, v in schema.items() if k != key}
        branches = [{"allOf": [rest, b]} if rest else b for b in schema[key] if b is not False]
        if not branches:
            raise NoValue(f"invalid JSON schema: {ptr}/{key}: every branch is false")
        if key == "oneOf" and len(branches) > 1 and not self.disjoint(branches, ptr):
            raise Refused(f"{ptr}/oneOf", "branches that may overlap (a value valid under two fails oneOf)")
        names = []
        for i, branch in enumerate(branches):
            try:
                names.append(self.visit(branch, f"{ptr}/{key}/{i}", f"{hint}-{i}"))
            except NoValue:
                continue  # a branch no value satisfies
        if not names:
            raise NoValue(f"invalid JSON schema: {ptr}/{key}: no branch has a value")
        return self.rules.add(hint, " | ".join(dict.fromkeys(names)))

    def disjoint(self, branches: list[Json], ptr: str) -> bool:
        """Whether no value the grammar writes for one branch is valid under another: the
        types written for one are not valid for the others, or all are objects that require
        one property with distinct constant values."""
        resolved = []
        for branch in branches:
            try:
                resolved.append(self.flat(branch, ptr))
            except NoValue:
                continue  # a branch no value satisfies: dropped from the union too
        written = [self.value_types(b, written=True) for b in resolved]
        valid = [self.value_types(b, written=False) for b in resolved]
        pairs = [(i, j) for i in range(len(resolved)) for j in range(len(resolved)) if i != j]
        if all(written[i].isdisjoint(valid[j]) for i, j in pairs):
            return True
        if not all(isinstance(b, dict) for b in resolved) or any(w != {"object"} for w in written):
            return False
        common = set.intersection(*(set(b.get("required", ())) for b in resolved))
        for name in sorted(common):
            seen: set[str] = set()
            for branch in resolved:
                values = self.finite(self.flat(branch.get("properties", {}).get(name, True), ptr))
                keys = {canonical(v) for v in values or ()}
                if values is None or seen & keys:
                    break
                seen |= keys
            else:
                return True
        return False

    def flat(self, schema: Json, ptr: str) -> Json:
        """``schema`` with its $ref and allOf merged in (for inspection)."""
        if isinstance(schema, Mapping) and ("$ref" in schema or "allOf" in schema):
            return merge([schema], ptr, self.resolve)
        return schema

    def value_types(self, schema: Json, *, written: bool) -> set[str]:
        """The JSON types (integers count as numbers) of the values the grammar writes for
        ``schema`` (``written``) or of those valid under it: a superset of either."""
        kinds: list[str] = list(_ALL_TYPES)
        if isinstance(schema, Mapping):
            if "const" in schema or "enum" in schema:
                kinds = [_json_type(v) for v in ([schema["const"]] if "const" in schema else schema["enum"])]
            elif "type" in schema or (written and not {"anyOf", "oneOf"} & schema.keys()):
                kinds = self.types(schema)  # inferred from the keywords: what is written
        return {"number" if t == "integer" else t for t in kinds}

    def finite(self, schema: Json) -> list[Any] | None:
        """The values valid under ``schema`` if few are (enum, const, boolean, null)."""
        if not isinstance(schema, Mapping):
            return None
        if "const" in schema or "enum" in schema:
            values = [schema["const"]] if "const" in schema else list(schema["enum"])
        elif self.types(schema) == ["boolean"]:
            values = [True, False]
        elif self.types(schema) == ["null"]:
            values = [None]
        else:
            return None
        unique = {canonical(v): v for v in values}
        # Each value is in its enum: check it against the other keywords alone (a huge enum
        # would otherwise make this quadratic).
        rest = {k: v for k, v in schema.items() if k not in ("enum", "const")}
        if rest:
            check = self.validator.evolve(schema=rest)
            unique = {k: v for k, v in unique.items() if check.is_valid(v)}
        return list(unique.values())

    def enum(self, schema: dict[str, Any], ptr: str, hint: str) -> str:
        values = self.finite(schema) or []
        if not values:
            raise NoValue(f"invalid JSON schema: no value of the enum/const at {ptr} satisfies it")
        return self.rules.add(hint, choice([json.dumps(v, ensure_ascii=False) for v in values]))

    def types(self, schema: Mapping[str, Any]) -> list[str]:
        declared = schema.get("type")
        if declared is None:
            inferred = [t for t, keys in _KEYWORDS_OF.items() if any(k in schema for k in keys)]
            return inferred or list(_ALL_TYPES)
        kinds = [declared] if isinstance(declared, str) else list(declared)
        if "integer" in kinds and "number" in kinds:
            kinds.remove("integer")
        return kinds

    def typed(self, kind: str, schema: Mapping[str, Any], ptr: str, hint: str) -> str:
        if kind == "null":
            return '"null"'
        if kind == "boolean":
            return '"true" | "false"'
        if kind in ("integer", "number"):
            return self.number(kind, schema, ptr, hint)
        if kind == "string":
            return self.string(schema, ptr, hint)
        if kind == "array":
            return self.array(schema, ptr, hint)
        return self.object(schema, ptr, hint)

    def number(self, kind: str, schema: Mapping[str, Any], ptr: str, hint: str) -> str:
        lo = _tighter(schema, "minimum", "exclusiveMinimum", lower=True)
        hi = _tighter(schema, "maximum", "exclusiveMaximum", lower=False)
        multiple = schema.get("multipleOf", 1)
        integer = kind == "integer" or "multipleOf" in schema  # integral multipleOf: integers
        if lo is None and hi is None and multiple == 1:
            return self.primitive("integer" if integer else "number")
        if isinstance(multiple, float):
            # jsonschema divides by a float multipleOf: exact for integers below 2**53 only.
            lo = max(lo or _FLOAT_EXACT_LOW, _FLOAT_EXACT_LOW, key=lambda b: (b[0], not b[1]))
            hi = min(hi or _FLOAT_EXACT_HIGH, _FLOAT_EXACT_HIGH, key=lambda b: (b[0], b[1]))
        try:
            return number_rule(self.rules, f"{hint}-num", lo, hi, integer=integer, multiple_of=int(multiple))
        except NumberError as e:
            if "multipleOf" in str(e):
                raise Refused(f"{ptr}/multipleOf", str(e)) from None
            raise NoValue(f"invalid JSON schema: {ptr}: {e}") from None

    def string(self, schema: Mapping[str, Any], ptr: str, hint: str) -> str:
        low, high = int(schema.get("minLength", 0)), _count(schema.get("maxLength"))
        fmt = schema.get("format", "")
        if fmt in REFUSED_FORMATS:
            raise Refused(f"{ptr}/format", f"format {fmt} has no grammar")
        if fmt in FORMAT_PATTERNS and "pattern" in schema:
            raise Refused(f"{ptr}/format", f"format {fmt} beside a pattern")
        pattern = schema.get("pattern", FORMAT_PATTERNS.get(fmt))
        if pattern is not None:
            try:
                return string_rule(self.rules, f"{hint}-str", pattern, low, high)
            except PatternError as e:
                if not e.args[0].startswith("no string"):
                    raise Refused(f"{ptr}/{'pattern' if 'pattern' in schema else 'format'}", str(e)) from None
                raise NoValue(f"invalid JSON schema: {ptr}: {e}") from None
        if low == 0 and high is None:
            return self.primitive("string")
        chars = _repetition("char", low, high, "", ptr=ptr, keyword="minLength")
        return self.rules.add(f"{hint}-str", f'"\\"" {chars} "\\""')

    def array(self, schema: Mapping[str, Any], ptr: str, hint: str) -> str:
        prefix = list(schema.get("prefixItems", []))
        items = schema.get("items", not prefix)  # no items past prefixItems: a subset
        low, high = int(schema.get("minItems", 0)), _count(schema.get("maxItems"))
        if not prefix and items is True and low == 0 and high is None and not schema.get("uniqueItems"):
            return self.primitive("array")
        if schema.get("uniqueItems") and not prefix:
            domain = self.finite(self.flat(items, ptr))
            if domain is not None and len(domain) <= MAX_UNIQUE_DOMAIN:
                return self.unique(domain, low, high, ptr, hint)
            # Otherwise left to the validation of the answer.
        rules: list[str] = []
        for i, sub in enumerate(prefix):
            try:
                rules.append(self.visit(sub, f"{ptr}/prefixItems/{i}", f"{hint}-{i}"))
            except NoValue:
                items = False  # no value at position i: the array ends before it
                break
        tail = None
        if items is not False and len(rules) == len(prefix):
            try:
                tail = self.visit(items, f"{ptr}/items", f"{hint}-item")
            except NoValue:
                tail = None
        if high is not None:
            high = min(high, len(rules)) if tail is None else high
        elif tail is None:
            high = len(rules)
        if low > (high if high is not None else low):
            raise NoValue(f"invalid JSON schema: {ptr}: no array has between minItems and maxItems items")
        if not rules:
            body = (
                "" if tail is None else _repetition(tail, low, high, '"," space', ptr=ptr, keyword="minItems")
            )
        else:
            # p0 ("," p1 ("," p2 (...)?)?)? with the first minItems ones required.
            rest = ""
            if tail is not None and (high is None or high > len(rules)):
                more_high = None if high is None else high - len(rules)
                rest = _repetition(
                    f'"," space {tail}', max(low - len(rules), 0), more_high, "", ptr=ptr, keyword="minItems"
                )
            count = min(len(rules), high if high is not None else len(rules))
            body = rest
            for i in reversed(range(count)):
                part = (f'"," space {rules[i]}' if i else rules[i]) + (f" {body}" if body else "")
                body = f"( {part} )?" if i >= low else part
        return self.rules.add(hint, f'"[" space {body} space "]"' if body else '"[" space "]"')

    def unique(self, domain: list[Any], low: int, high: int | None, ptr: str, hint: str) -> str:
        """Distinct values of ``domain`` in its order, ``low`` to ``high`` of them."""
        n = len(domain)
        high = n if high is None else min(high, n)
        if low > high:
            raise NoValue(f"invalid JSON schema: {ptr}: fewer distinct items than minItems")
        literals = [literal(json.dumps(v, ensure_ascii=False)) for v in domain]
        made: dict[tuple[int, int], str] = {}

        def state(i: int, count: int) -> str:
            """Values ``i``.. still to choose from, ``count`` written (enough can follow)."""
            if i == n or count == high:
                return ""
            if (i, count) not in made:
                after = state(i + 1, count + 1)
                sep = '"," space ' if count else ""
                alternatives = [f"{sep}{literals[i]} {after}".rstrip()]
                if count + (n - i - 1) >= low:  # skipping this value still leaves enough
                    alternatives.append(state(i + 1, count))
                body = " | ".join(a for a in alternatives if a)
                made[(i, count)] = self.rules.add(f"{hint}-u", ("| " if "" in alternatives else "") + body)
            return made[(i, count)]

        return self.rules.add(hint, f'"[" space {state(0, 0)} space "]"')

    def object(self, schema: Mapping[str, Any], ptr: str, hint: str) -> str:
        props = dict(schema.get("properties", {}))
        required = list(dict.fromkeys(schema.get("required", [])))
        extra = schema.get("additionalProperties", None if props else True)
        for name in required:
            if name not in props:
                if extra is False:
                    raise NoValue(f"invalid JSON schema: {ptr}: required {name!r} is not allowed")
                props[name] = True if extra is None else extra
        props = {k: v for k, v in props.items() if v is not False or k in required}
        if any(props[k] is False for k in required):
            raise NoValue(f"invalid JSON schema: {ptr}: a required property's schema is false")
        optional = [k for k in props if k not in required]
        low, high = int(schema.get("minProperties", 0)), _count(schema.get("maxProperties"))
        if props:
            extra = None  # the declared properties only: a subset
        if high is not None:
            if len(required) > high:
                raise NoValue(f"invalid JSON schema: {ptr}: more required properties than maxProperties")
            optional = optional[: high - len(required)]
        if len(required) < low:
            if len(required) + len(optional) < low:
                raise Refused(f"{ptr}/minProperties", "fewer declared properties than minProperties")
            promoted = optional[: low - len(required)]
            required += promoted
            optional = [k for k in optional if k not in promoted]
        if not props:
            if extra is None or extra is False:
                return '"{" space "}"'
            if low > 0:
                raise Refused(f"{ptr}/minProperties", "minProperties without declared properties")
            value = self.visit(extra, f"{ptr}/additionalProperties", f"{hint}-value")
            kv = self.rules.add(f"{hint}-kv", f'{self.primitive("string")} ":" space {value}')
            pairs = _repetition(kv, 0, high, '"," space', ptr=ptr, keyword="maxProperties")
            return self.rules.add(hint, f'"{{" space {pairs} space "}}"')
        kvs = {}
        for name in required + optional:
            try:
                value = self.visit(props[name], f"{ptr}/properties/{_escape(name)}", f"{hint}-{name}")
            except NoValue:
                if name in required:
                    raise
                optional.remove(name)
                continue
            kvs[name] = self.rules.add(
                f"{hint}-{name}-kv",
                f'{literal(json.dumps(name, ensure_ascii=False))} space ":" space {value}',
            )
        body = ' "," space '.join(kvs[k] for k in required)
        if optional:
            # As llama.cpp's converter: the first optional one present, then any of the later.
            chains = []
            for i, k in enumerate(optional):
                tail = ""
                for later in reversed(optional[i + 1 :]):
                    tail = self.rules.add(f"{hint}-rest", f'( "," space {kvs[later]} )? {tail}'.rstrip())
                chains.append(f"{kvs[k]} {tail}".rstrip())
            choice = " | ".join(chains)
            body += f' ( "," space ( {choice} ) )?' if required else f" ( {choice} )?"
        return self.rules.add(hint, f'"{{" space {body} space "}}"')


def _tighter(schema: Mapping[str, Any], inclusive: str, exclusive: str, *, lower: bool) -> Bound | None:
    bounds = [schema_bound(schema[inclusive], True)] if inclusive in schema else []
    if exclusive in schema:
        bounds.append(schema_bound(schema[exclusive], False))
    if not bounds:
        return None
    if lower:
        return max(bounds, key=lambda b: (b[0], not b[1]))
    return min(bounds, key=lambda b: (b[0], b[1]))


def _count(value: int | float | None) -> int | None:
    return None if value is None else int(value)


def _repetition(item: str, low: int, high: int | None, sep: str, *, ptr: str, keyword: str) -> str:
    """``item`` ``low`` to ``high`` times (None: any), ``sep`` between; more than
    :data:`MAX_REPEAT` is cut to it (a subset), a minimum above it refused."""
    if high is not None and low > high:
        raise NoValue(f"invalid JSON schema: {ptr}: the minimum count is above the maximum")
    if low > MAX_REPEAT:
        raise GrammarError(f"invalid JSON schema: {ptr}/{keyword}: {low} is more than {MAX_REPEAT}")
    if high is not None and high > MAX_REPEAT:
        high = MAX_REPEAT
    if high == 0:
        return ""
    if not sep:
        if high is None:
            return f"({item})*" if low == 0 else f"({item}){{{low},}}"
        return f"({item}){{{low},{high}}}"
    more = _repetition(
        f"{sep} {item}", max(low - 1, 0), None if high is None else high - 1, "", ptr=ptr, keyword=keyword
    )
    body = f"{item} {more}".rstrip()
    return f"( {body} )?" if low == 0 else body
