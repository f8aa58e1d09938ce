# ruff: noqa: E501  # a table: one schema a line, easier to read and review than wrapped dicts
"""A corpus of JSON schemas (draft 2020-12), each with a short prompt, for structured output.

It covers every value-constraining and applicator keyword of draft 2020-12 (``KEYWORDS``;
``test_schema_corpus.py`` checks that each one occurs), with realistic schemas (API payloads,
nested objects) and tight ones (narrow ranges, ``multipleOf: 7``, numbers up to 1, short
patterned strings). ``tests/test_schema_corpus.py`` runs it on the default model and
``benchmarks/bench_schemas.py`` compares llama.cpp's converter with ours on it.
"""

from __future__ import annotations

import json
from collections.abc import Callable, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from typing import Any, Literal

import jsonschema

from llama_cpp import LlamaGrammar, LlamaPool
from llama_cpp.errors import GrammarError, SchemaValidationError, UnsupportedSchemaError

__all__ = ["CORPUS", "KEYWORDS", "Case", "Result", "keywords_of", "run_converter", "run_ours"]

Schema = dict[str, Any]

#: The draft 2020-12 keywords the corpus must cover (validation and applicator vocabularies,
#: ``$ref``/``$defs`` and ``format``).
KEYWORDS = frozenset(
    {
        "type", "enum", "const", "multipleOf", "maximum", "exclusiveMaximum", "minimum",
        "exclusiveMinimum", "maxLength", "minLength", "pattern", "maxItems", "minItems",
        "uniqueItems", "maxContains", "minContains", "maxProperties", "minProperties",
        "required", "dependentRequired", "allOf", "anyOf", "oneOf", "not", "if", "then", "else",
        "dependentSchemas", "prefixItems", "items", "contains", "properties",
        "patternProperties", "additionalProperties", "propertyNames", "unevaluatedItems",
        "unevaluatedProperties", "$ref", "$defs", "format",
    }
)  # fmt: skip

# Keywords whose value is data, not a schema: their contents are not searched for keywords.
_DATA = frozenset({"enum", "const", "required", "dependentRequired", "default", "examples"})
# Keywords whose value maps names to schemas.
_NAMED = frozenset({"properties", "patternProperties", "$defs", "dependentSchemas"})


@dataclass(frozen=True, slots=True)
class Case:
    """One schema of the corpus.

    Attributes:
        name: A short unique name.
        prompt: What the user asks for.
        schema: The JSON schema the answer must validate against.
    """

    name: str
    prompt: str
    schema: Schema


def keywords_of(schema: object) -> set[str]:
    """The keywords used anywhere in ``schema`` (names under ``properties`` and values of
    ``enum``/``const`` are not keywords)."""
    found: set[str] = set()
    if isinstance(schema, list):
        for item in schema:
            found |= keywords_of(item)
        return found
    if not isinstance(schema, dict):
        return found
    for key, value in schema.items():
        found.add(key)
        if key in _DATA:
            continue
        if key in _NAMED and isinstance(value, dict):
            for sub in value.values():
                found |= keywords_of(sub)
        else:
            found |= keywords_of(value)
    return found


def _obj(properties: Schema, required: list[str] | None = None, **extra: Any) -> Schema:
    """An object schema with no properties besides ``properties``, all required by default."""
    return {
        "type": "object",
        "properties": properties,
        "required": list(properties) if required is None else required,
        "additionalProperties": False,
        **extra,
    }


_S: Schema = {"type": "string"}
_I: Schema = {"type": "integer"}
_N: Schema = {"type": "number"}
_B: Schema = {"type": "boolean"}

_CASES: list[tuple[str, str, Schema]] = [
    # -- type, enum, const -------------------------------------------------------------
    ("type-string", "Name a fruit.", _obj({"fruit": _S})),
    ("type-integer", "How many legs does a spider have?", _obj({"legs": _I})),
    ("type-number", "What is the value of pi?", _obj({"pi": _N})),
    ("type-boolean", "Is water wet?", _obj({"answer": _B})),
    ("type-null", "Give a value that is null.", _obj({"value": {"type": "null"}})),
    ("type-union", "Give an id, number or text.", _obj({"id": {"type": ["integer", "string"]}})),
    ("type-nullable", "Give a middle name if any.", _obj({"middle": {"type": ["string", "null"]}})),
    ("top-array", "List three colours.", {"type": "array", "items": _S, "minItems": 3, "maxItems": 3}),
    ("top-integer", "Pick a number from 1 to 5.", {"type": "integer", "minimum": 1, "maximum": 5}),
    ("top-string-enum", "Is the sky blue? yes or no.", {"enum": ["yes", "no"]}),
    ("enum-strings", "Pick a primary colour.", _obj({"colour": {"enum": ["red", "green", "blue"]}})),
    ("enum-mixed", "Pick a value.", _obj({"v": {"enum": [1, "one", None, True, 2.5]}})),
    ("enum-objects", "Pick a point.", _obj({"p": {"enum": [{"x": 1}, {"x": 2, "y": 3}]}})),
    ("const-string", "Say which API version you use.", _obj({"version": {"const": "v2"}, "ok": _B})),
    ("const-number", "Give the answer to everything.", _obj({"answer": {"const": 42}})),
    ("const-object", "Echo the header.", _obj({"header": {"const": {"alg": "HS256", "typ": "JWT"}}})),
    # -- numbers -----------------------------------------------------------------------
    ("int-range", "How old is a typical student?", _obj({"age": {"type": "integer", "minimum": 18, "maximum": 25}})),
    ("int-narrow", "Pick a dice face.", _obj({"face": {"type": "integer", "minimum": 1, "maximum": 6}})),
    ("int-negative", "A winter temperature in Celsius.", _obj({"t": {"type": "integer", "minimum": -30, "maximum": -1}})),
    ("int-exclusive", "A number strictly between 0 and 10.", _obj({"n": {"type": "integer", "exclusiveMinimum": 0, "exclusiveMaximum": 10}})),
    ("int-multiple-7", "A multiple of seven.", _obj({"n": {"type": "integer", "multipleOf": 7}})),
    ("int-multiple-7-range", "A multiple of 7 under 50.", _obj({"n": {"type": "integer", "multipleOf": 7, "minimum": 1, "maximum": 50}})),
    ("int-multiple-5", "A price in whole fives.", _obj({"price": {"type": "integer", "multipleOf": 5, "minimum": 0}})),
    ("int-multiple-100", "A round number of metres.", _obj({"m": {"type": "integer", "multipleOf": 100, "maximum": 1000}})),
    ("int-min-only", "A year after 2000.", _obj({"year": {"type": "integer", "minimum": 2001}})),
    ("int-max-only", "A count below 3.", _obj({"count": {"type": "integer", "maximum": 2}})),
    ("num-unit", "A probability.", _obj({"p": {"type": "number", "minimum": 0, "maximum": 1}})),
    ("num-max-1", "A score no more than 1.", _obj({"score": {"type": "number", "maximum": 1}})),
    ("num-exclusive", "A ratio strictly between 0 and 1.", _obj({"r": {"type": "number", "exclusiveMinimum": 0, "exclusiveMaximum": 1}})),
    ("num-negative", "A latitude in the southern hemisphere.", _obj({"lat": {"type": "number", "minimum": -90, "maximum": 0}})),
    ("num-wide", "A temperature in Kelvin.", _obj({"k": {"type": "number", "minimum": 0, "maximum": 10000}})),
    ("num-multiple-half", "A shoe size.", _obj({"size": {"type": "number", "multipleOf": 0.5, "minimum": 3, "maximum": 15}})),
    ("num-min-positive", "A positive price.", _obj({"price": {"type": "number", "exclusiveMinimum": 0}})),
    # -- strings -----------------------------------------------------------------------
    ("str-max-5", "A short nickname.", _obj({"nick": {"type": "string", "maxLength": 5}})),
    ("str-min-3", "A word of three letters or more.", _obj({"word": {"type": "string", "minLength": 3}})),
    ("str-len-range", "A username.", _obj({"user": {"type": "string", "minLength": 3, "maxLength": 12}})),
    ("str-exact-len", "A two-letter country code.", _obj({"cc": {"type": "string", "minLength": 2, "maxLength": 2}})),
    ("str-pattern-zip", "A US zip code.", _obj({"zip": {"type": "string", "pattern": "^[0-9]{5}$"}})),
    ("str-pattern-code", "A product code like AB-123.", _obj({"code": {"type": "string", "pattern": "^[A-Z]{2}-[0-9]{3}$"}})),
    ("str-pattern-hex", "A hex colour.", _obj({"hex": {"type": "string", "pattern": "^#[0-9a-f]{6}$"}})),
    ("str-pattern-len", "An upper-case code of at most 3 letters.", _obj({"code": {"type": "string", "pattern": "^[A-Z]+$", "maxLength": 3}})),
    ("str-pattern-minlen", "A lower-case word of 4+ letters.", _obj({"w": {"type": "string", "pattern": "^[a-z]+$", "minLength": 4}})),
    ("str-pattern-alt", "A size.", _obj({"size": {"type": "string", "pattern": "^(S|M|L|XL)$"}})),
    ("str-pattern-unanchored", "Text containing a digit.", _obj({"t": {"type": "string", "pattern": "[0-9]", "maxLength": 10}})),
    ("fmt-date", "Today's date.", _obj({"date": {"type": "string", "format": "date"}})),
    ("fmt-time", "A time of day.", _obj({"time": {"type": "string", "format": "time"}})),
    ("fmt-date-time", "A timestamp.", _obj({"at": {"type": "string", "format": "date-time"}})),
    ("fmt-uuid", "A request id.", _obj({"id": {"type": "string", "format": "uuid"}})),
    ("fmt-email", "An email address.", _obj({"email": {"type": "string", "format": "email"}})),
    ("fmt-ipv4", "An IPv4 address.", _obj({"ip": {"type": "string", "format": "ipv4"}})),
    ("fmt-uri", "A web address.", _obj({"url": {"type": "string", "format": "uri"}})),
    # -- arrays ------------------------------------------------------------------------
    ("arr-min-max", "Two or three hobbies.", _obj({"hobbies": {"type": "array", "items": {"type": "string", "maxLength": 12}, "minItems": 2, "maxItems": 3}})),
    ("arr-int-items", "Three lucky numbers from 1 to 9.", _obj({"nums": {"type": "array", "items": {"type": "integer", "minimum": 1, "maximum": 9}, "minItems": 3, "maxItems": 3}})),
    ("arr-empty-ok", "Any allergies?", _obj({"allergies": {"type": "array", "items": _S, "maxItems": 2}})),
    ("arr-unique-enum", "Pick two different days.", _obj({"days": {"type": "array", "items": {"enum": ["mon", "tue", "wed"]}, "uniqueItems": True, "minItems": 2, "maxItems": 2}})),
    ("arr-unique-bool", "Two different booleans.", {"type": "array", "items": _B, "uniqueItems": True, "minItems": 2, "maxItems": 2}),
    ("arr-unique-small-int", "Distinct digits.", _obj({"d": {"type": "array", "items": {"type": "integer", "minimum": 0, "maximum": 3}, "uniqueItems": True, "maxItems": 3}})),
    ("arr-unique-strings", "List the word apple several times.", {"type": "array", "items": {"type": "string", "maxLength": 8}, "uniqueItems": True, "minItems": 3, "maxItems": 5}),
    ("arr-prefix", "A point as [x, y, label].", {"type": "array", "prefixItems": [_I, _I, {"type": "string", "maxLength": 8}], "items": False}),
    ("arr-prefix-rest", "A name then numbers.", {"type": "array", "prefixItems": [{"type": "string", "maxLength": 8}], "items": _I, "maxItems": 4}),
    ("arr-contains", "Numbers including a 7.", {"type": "array", "items": {"type": "integer", "minimum": 0, "maximum": 9}, "contains": {"const": 7}, "maxItems": 4}),
    ("arr-min-contains", "Tags with at least two 'x'.", {"type": "array", "items": {"enum": ["x", "y"]}, "contains": {"const": "x"}, "minContains": 2, "maxItems": 4}),
    ("arr-max-contains", "Letters with at most one 'a'.", {"type": "array", "items": {"enum": ["a", "b"]}, "contains": {"const": "a"}, "maxContains": 1, "maxItems": 3}),
    ("arr-unevaluated", "A pair then nothing else.", {"type": "array", "prefixItems": [_S, _I], "unevaluatedItems": False}),
    ("arr-nested", "A 2x2 grid of digits.", {"type": "array", "items": {"type": "array", "items": {"type": "integer", "minimum": 0, "maximum": 9}, "minItems": 2, "maxItems": 2}, "minItems": 2, "maxItems": 2}),
    ("arr-of-objects", "Two people with names.", {"type": "array", "items": _obj({"name": {"type": "string", "maxLength": 10}}), "minItems": 2, "maxItems": 2}),
    # -- objects -----------------------------------------------------------------------
    ("obj-optional", "A contact, phone optional.", _obj({"name": {"type": "string", "maxLength": 12}, "phone": {"type": "string", "pattern": "^[0-9]{3,10}$"}}, ["name"])),
    ("obj-min-props", "Some settings (at least two).", {"type": "object", "properties": {"a": _B, "b": _B, "c": _B}, "additionalProperties": False, "minProperties": 2}),
    ("obj-max-props", "At most one setting.", {"type": "object", "properties": {"a": _B, "b": _B}, "additionalProperties": False, "maxProperties": 1}),
    ("obj-min-max-props", "Pick one or two flags.", {"type": "object", "properties": {"x": _B, "y": _B, "z": _B}, "additionalProperties": False, "minProperties": 1, "maxProperties": 2}),
    ("obj-additional-schema", "Word counts.", {"type": "object", "additionalProperties": {"type": "integer", "minimum": 0}, "maxProperties": 3}),
    ("obj-additional-true", "A user with anything else.", {"type": "object", "properties": {"id": _I}, "required": ["id"]}),
    ("obj-additional-false", "A point.", _obj({"x": _N, "y": _N})),
    ("obj-dependent-required", "A payment; a card needs an expiry.", {"type": "object", "properties": {"card": {"type": "string", "pattern": "^[0-9]{4}$"}, "expiry": {"type": "string", "pattern": "^[0-9]{2}/[0-9]{2}$"}}, "additionalProperties": False, "dependentRequired": {"card": ["expiry"]}}),
    ("obj-dependent-schemas", "A shipment.", {"type": "object", "properties": {"express": _B, "fee": _I}, "dependentSchemas": {"express": {"required": ["fee"]}}}),
    ("obj-pattern-props", "Environment variables.", {"type": "object", "patternProperties": {"^[A-Z_]+$": _S}, "additionalProperties": False}),
    ("obj-property-names", "A map of short keys.", {"type": "object", "propertyNames": {"maxLength": 3}, "additionalProperties": _I}),
    ("obj-unevaluated", "A base record, nothing extra.", {"allOf": [{"type": "object", "properties": {"id": _I}, "required": ["id"]}], "unevaluatedProperties": False}),
    ("obj-empty", "An empty object.", {"type": "object", "additionalProperties": False}),
    ("obj-nested", "A user with an address.", _obj({"user": _obj({"name": {"type": "string", "maxLength": 12}, "address": _obj({"city": {"type": "string", "maxLength": 15}, "zip": {"type": "string", "pattern": "^[0-9]{5}$"}})})})),
    # -- combinators -------------------------------------------------------------------
    ("all-of", "A named entity with an id.", {"allOf": [_obj({"id": _I, "name": _S}), {"type": "object", "required": ["id"]}]}),
    ("all-of-bounds", "A number from 10 to 20.", _obj({"n": {"allOf": [{"type": "integer", "minimum": 10}, {"maximum": 20}]}})),
    ("any-of", "An id or a name.", _obj({"key": {"anyOf": [{"type": "integer", "minimum": 0}, {"type": "string", "maxLength": 10}]}})),
    ("any-of-null", "A nickname or nothing.", _obj({"nick": {"anyOf": [{"type": "string", "maxLength": 10}, {"type": "null"}]}})),
    ("one-of-disjoint", "A circle or a square.", {"oneOf": [_obj({"kind": {"const": "circle"}, "r": _N}), _obj({"kind": {"const": "square"}, "side": _N})]}),
    ("one-of-overlap", "An integer or a number.", _obj({"v": {"oneOf": [{"type": "integer"}, {"type": "string"}]}})),
    ("not-type", "Anything but a string.", _obj({"v": {"not": {"type": "string"}}})),
    ("not-enum", "A colour other than red.", _obj({"c": {"type": "string", "not": {"enum": ["red"]}}})),
    ("if-then-else", "A country and its postcode.", {"type": "object", "properties": {"country": {"enum": ["US", "NL"]}, "code": _S}, "required": ["country", "code"], "if": {"properties": {"country": {"const": "US"}}}, "then": {"properties": {"code": {"pattern": "^[0-9]{5}$"}}}, "else": {"properties": {"code": {"pattern": "^[0-9]{4}[A-Z]{2}$"}}}}),
    ("if-then", "An age, adults need an id.", {"type": "object", "properties": {"age": _I, "id": _S}, "required": ["age"], "if": {"properties": {"age": {"minimum": 18}}}, "then": {"required": ["id"]}}),
    # -- $ref / $defs ------------------------------------------------------------------
    ("ref-defs", "Two addresses.", {"$defs": {"addr": _obj({"city": {"type": "string", "maxLength": 15}})}, **_obj({"home": {"$ref": "#/$defs/addr"}, "work": {"$ref": "#/$defs/addr"}})}),
    ("ref-enum", "A status.", {"$defs": {"status": {"enum": ["open", "closed"]}}, **_obj({"status": {"$ref": "#/$defs/status"}})}),
    ("ref-bounded", "A percentage.", {"$defs": {"pct": {"type": "integer", "minimum": 0, "maximum": 100}}, **_obj({"done": {"$ref": "#/$defs/pct"}})}),
    ("ref-recursive", "A small tree.", {"$defs": {"node": {"type": "object", "properties": {"v": {"type": "integer", "minimum": 0, "maximum": 9}, "kids": {"type": "array", "items": {"$ref": "#/$defs/node"}, "maxItems": 2}}, "required": ["v"], "additionalProperties": False}}, "$ref": "#/$defs/node"}),
    # -- realistic payloads ------------------------------------------------------------
    ("api-user", "Create a user for Alice.", _obj({"username": {"type": "string", "pattern": "^[a-z0-9_]{3,16}$"}, "email": {"type": "string", "format": "email"}, "age": {"type": "integer", "minimum": 13, "maximum": 120}, "role": {"enum": ["admin", "member"]}}, ["username", "role"])),
    ("api-order", "An order of two books.", _obj({"order_id": {"type": "string", "pattern": "^ORD-[0-9]{4}$"}, "items": {"type": "array", "items": _obj({"sku": {"type": "string", "maxLength": 8}, "qty": {"type": "integer", "minimum": 1, "maximum": 10}}), "minItems": 1, "maxItems": 2}, "total": {"type": "number", "minimum": 0}})),
    ("api-weather", "Weather in Paris.", _obj({"city": {"type": "string", "maxLength": 20}, "celsius": {"type": "number", "minimum": -50, "maximum": 50}, "sky": {"enum": ["clear", "cloudy", "rain"]}})),
    ("api-event", "A meeting tomorrow.", _obj({"title": {"type": "string", "maxLength": 30}, "date": {"type": "string", "format": "date"}, "minutes": {"type": "integer", "multipleOf": 15, "minimum": 15, "maximum": 120}})),
    ("api-review", "Review a film.", _obj({"film": {"type": "string", "maxLength": 30}, "stars": {"type": "integer", "minimum": 1, "maximum": 5}, "recommend": _B})),
    ("api-geo", "Coordinates of London.", _obj({"lat": {"type": "number", "minimum": -90, "maximum": 90}, "lon": {"type": "number", "minimum": -180, "maximum": 180}})),
    ("api-log", "A log line.", _obj({"level": {"enum": ["debug", "info", "warn", "error"]}, "message": {"type": "string", "maxLength": 40}, "code": {"type": "integer", "minimum": 100, "maximum": 599}})),
    ("api-money", "A price in euros.", _obj({"currency": {"const": "EUR"}, "cents": {"type": "integer", "minimum": 0, "maximum": 100000}})),
    ("api-pagination", "Page two of results.", _obj({"page": {"type": "integer", "minimum": 1}, "per_page": {"type": "integer", "enum": [10, 25, 50]}, "has_more": _B})),
    ("api-rgb", "The colour orange as RGB.", _obj({"r": {"type": "integer", "minimum": 0, "maximum": 255}, "g": {"type": "integer", "minimum": 0, "maximum": 255}, "b": {"type": "integer", "minimum": 0, "maximum": 255}})),
    ("api-version", "A semantic version.", _obj({"version": {"type": "string", "pattern": "^[0-9]+\\.[0-9]+\\.[0-9]+$"}})),
    ("api-classify", "Classify the sentiment of 'I love it'.", _obj({"label": {"enum": ["positive", "negative", "neutral"]}, "confidence": {"type": "number", "minimum": 0, "maximum": 1}})),
    ("api-extract", "Extract the people in 'Ann met Bob'.", _obj({"people": {"type": "array", "items": {"type": "string", "maxLength": 10}, "maxItems": 3}})),
    ("api-tool-args", "Arguments to search for cats, five results.", _obj({"query": {"type": "string", "minLength": 1, "maxLength": 20}, "limit": {"type": "integer", "minimum": 1, "maximum": 10}})),
    ("api-inventory", "Stock of one item.", _obj({"sku": {"type": "string", "pattern": "^[A-Z]{3}[0-9]{2}$"}, "count": {"type": "integer", "minimum": 0, "multipleOf": 7, "maximum": 70}})),
    ("api-schema-draft7", "A flag.", {"$schema": "http://json-schema.org/draft-07/schema#", "type": "object", "properties": {"on": _B}, "required": ["on"], "additionalProperties": False}),
]  # fmt: skip

#: The corpus: at least 100 schemas.
CORPUS: tuple[Case, ...] = tuple(Case(name, prompt, schema) for name, prompt, schema in _CASES)


Status = Literal["valid", "invalid", "refused", "truncated"]


@dataclass(frozen=True, slots=True)
class Result:
    """What became of one schema.

    Attributes:
        case: The schema.
        status: ``valid`` (a completed answer that validates), ``invalid`` (a completed answer
            that does not), ``refused`` (raised before generating), ``truncated`` (cut at
            ``max_tokens``: not judged).
        detail: The keywords refused, the validation failure, or the answer.
    """

    case: Case
    status: Status
    detail: str


def _messages(case: Case) -> list[dict[str, str]]:
    return [{"role": "user", "content": f"{case.prompt} Answer with JSON only."}]


def _valid(schema: Schema, text: str) -> str | None:
    """None if ``text`` is JSON valid under ``schema``, else why not."""
    try:
        document = json.loads(text)
    except json.JSONDecodeError as error:
        return f"not JSON: {error}"
    cls = jsonschema.validators.validator_for(schema, default=jsonschema.Draft202012Validator)
    failure = jsonschema.exceptions.best_match(
        cls(schema, format_checker=cls.FORMAT_CHECKER).iter_errors(document)
    )
    return None if failure is None else failure.message


def run_ours(pool: LlamaPool, cases: Sequence[Case], max_tokens: int) -> list[Result]:
    """Each case through ``response_format`` (our grammar, every answer validated), greedy,
    ``pool.pool_size`` at a time."""

    def one(case: Case) -> Result:
        format_ = {"type": "json_schema", "json_schema": {"name": case.name, "schema": case.schema}}
        try:
            answer = pool.create_chat_completion(
                _messages(case), response_format=format_, temperature=0.0, max_tokens=max_tokens
            )
        except UnsupportedSchemaError as error:
            return Result(case, "refused", " ".join(error.keywords) or str(error))
        except SchemaValidationError as error:
            return Result(case, "invalid", error.reason)
        choice = answer["choices"][0]
        text = choice["message"]["content"] or ""
        return Result(case, "valid" if choice["finish_reason"] == "stop" else "truncated", text)

    return _map(pool, one, cases)


def run_converter(pool: LlamaPool, cases: Sequence[Case], max_tokens: int) -> list[Result]:
    """Each case with llama.cpp's converter alone (``_core.json_schema_to_grammar``, as
    llama-server does), the answers validated here (not by the request path)."""
    from llama_cpp import _core

    def one(case: Case) -> Result:
        try:
            grammar = LlamaGrammar(_core.json_schema_to_grammar(json.dumps(case.schema)))
        except GrammarError as error:
            return Result(case, "refused", str(error).splitlines()[0])
        answer = pool.create_chat_completion(
            _messages(case), grammar=grammar, temperature=0.0, max_tokens=max_tokens
        )
        choice = answer["choices"][0]
        text = choice["message"]["content"] or ""
        if choice["finish_reason"] != "stop":
            return Result(case, "truncated", text)
        failure = _valid(case.schema, text)
        return Result(case, "valid", text) if failure is None else Result(case, "invalid", failure)

    return _map(pool, one, cases)


def _map(pool: LlamaPool, one: Callable[[Case], Result], cases: Sequence[Case]) -> list[Result]:
    with ThreadPoolExecutor(pool.pool_size) as workers:
        return list(workers.map(one, cases))
