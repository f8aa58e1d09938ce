"""Property tests (hypothesis) of grammars and JSON schemas: they compile or raise
GrammarError, never crash nor hang.

GBNF comes from hypothesis text, from fragments of GBNF syntax, and from mutations of
llama.cpp's own grammars; schemas from a strategy of the converter's keywords with sensible
and hostile values, and from hypothesis-jsonschema drawing documents of a schema of schemas
(hypothesis-jsonschema 0.23.1 needs hypothesis < 6.170.10, whose ``many`` lost ``more()``:
pinned in pyproject.toml).

Hostile inputs that crashed (a stack overflow) or hung (an endless loop) llama.cpp run in a
subprocess, so that a regression fails the test instead of killing the suite.
"""

from __future__ import annotations

import json
import re
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from hypothesis import given
from hypothesis import strategies as st
from hypothesis_jsonschema import from_schema

from conftest import examples, run_python
from llama_cpp import GrammarError, Llama, LlamaGrammar, SamplingParams, UnsupportedSchemaError
from llama_cpp._schema_strings import FORMAT_PATTERNS
from llama_cpp.json_schema import FORMAT_CHECKER


def compiles(gbnf: str) -> LlamaGrammar | None:
    """The grammar, or None if llama.cpp rejects it (GrammarError, and nothing else)."""
    try:
        return LlamaGrammar.from_string(gbnf)
    except GrammarError as e:
        error = str(e)
    assert error.startswith("invalid grammar: "), error
    return None


def schema_compiles(schema: str | dict[str, Any]) -> LlamaGrammar | None:
    try:
        return LlamaGrammar.from_json_schema(schema)
    except UnsupportedSchemaError as e:
        error, keywords = str(e), e.keywords
        assert keywords, error
        assert error.startswith("the grammar cannot enforce: "), error
        return None
    except GrammarError as e:
        error = str(e)
    assert error.startswith(("invalid JSON schema: ", "invalid grammar: ")), error
    return None


# -- GBNF ------------------------------------------------------------------------------------

#: Pieces of GBNF syntax, valid and not, that random sequences of make grammar-like text.
GBNF_PIECES = [
    "root", "item", "x-y", " ::= ", "::=", " ", "\n", "\t", "|", "(", ")", "*", "+", "?", ".",
    "{", "}", ",", "{2}", "{0,3}", "{2,}", "{5,2}", "{ 3 , 1 }", "{0,0}", "{99999999999999999999}",
    '"a"', '"é😀"', '""', '"\\x41"', '"\\u00e9"', '"\\"', '"unterminated', "[a-z]", "[^\"]",
    "[\\]]", "[]", "[z-a]", "<eos>", "<[1]>", "<[999999999]>", "!<[1]>", "# comment\n", "\\",
    "\x00", "root ::= root", 'root ::= "x"\n',
]  # fmt: skip

gbnf_like = st.lists(st.sampled_from(GBNF_PIECES) | st.text(max_size=3), max_size=30).map("".join)


@pytest.fixture(scope="module")
def real_grammars(llama_source_dir: Path) -> list[str]:
    found = sorted((llama_source_dir / "grammars").glob("*.gbnf"))
    assert len(found) >= 8
    return [p.read_text(encoding="utf-8") for p in found]


@examples(300)
@given(text=st.text() | gbnf_like | gbnf_like.map(lambda g: "root ::= " + g))
def test_any_text_compiles_or_raises_grammar_error(text: str) -> None:
    grammar = compiles(text)
    if grammar is not None:
        assert grammar.grammar == text


@examples(150)
@given(data=st.data())
def test_mutated_real_grammars_compile_or_raise_grammar_error(
    real_grammars: list[str], data: st.DataObject
) -> None:
    text = data.draw(st.sampled_from(real_grammars), label="grammar")
    for _ in range(data.draw(st.integers(1, 4), label="edits")):
        at = data.draw(st.integers(0, len(text)), label="at")
        end = data.draw(st.integers(at, min(len(text), at + 20)), label="end")
        edit = data.draw(st.sampled_from(["delete", "insert", "duplicate"]), label="edit")
        if edit == "delete":
            text = text[:at] + text[end:]
        elif edit == "insert":
            text = (
                text[:at]
                + data.draw(st.sampled_from(GBNF_PIECES) | st.text(max_size=4), label="piece")
                + text[at:]
            )
        else:
            text = text[:end] + text[at:end] + text[end:]
    compiles(text)


def test_real_grammars_compile(real_grammars: list[str]) -> None:
    for text in real_grammars:
        assert compiles(text) is not None


@pytest.fixture(scope="module")
def tiny_llm(tiny_model_path: Path) -> Iterator[Llama]:
    with Llama(tiny_model_path, n_ctx=256, n_batch=64, n_threads=1, verbose=False) as llm:
        yield llm


@examples(60)
@given(text=gbnf_like.map(lambda g: "root ::= " + g), temperature=st.sampled_from([0.0, 1.0]))
def test_grammars_that_compile_generate_or_raise_grammar_error(
    tiny_llm: Llama, text: str, temperature: float
) -> None:
    # A grammar that llama.cpp accepts also runs: token literals are resolved against the
    # vocabulary, and a grammar the model cannot continue ends in GrammarError, not a crash.
    grammar = compiles(text)
    if grammar is None:
        return
    sampling = SamplingParams(temperature=temperature, seed=1, grammar=grammar)
    try:
        out = tiny_llm.generate("a", max_tokens=6, sampling=sampling)
    except GrammarError:
        return
    assert isinstance(out, str)


@pytest.mark.parametrize(
    ("gbnf", "reason"),
    [
        # llama.cpp's parser looped (nearly) forever appending rules: max - min wrapped around.
        ('root ::= "a"{5,2}', "repetition {5,2} has its maximum below its minimum, at line 1"),
        (
            'root ::= "x"\nitem ::= [a-z]{ 3 , 1 }',
            "repetition {3,1} has its maximum below its minimum, at line 2",
        ),
        # Its recursive descent overflowed the stack.
        (
            "root ::= " + "(" * 100_000 + '"a"' + ")" * 100_000,
            "parentheses nested deeper than 1000 levels, at line 1",
        ),
        # Quadratic in the alternatives a group starts with: 10 s for 100,000, a hang for a
        # million, whether in one group or in groups that open alternatives of another.
        (
            'root ::= "x" ("y" | ' + " | ".join(f'"v{i}"' for i in range(1_000_000)) + ")",
            "a rule or group that starts with more than 20000 alternatives, at line 1",
        ),
        (
            "root ::= "
            + " | ".join("(" + " | ".join(f'"{j}-{i}"' for i in range(19_000)) + ")" for j in range(50)),
            "a rule or group that starts with more than 20000 alternatives, at line 1",
        ),
    ],
)
def test_grammars_that_hung_or_crashed_llama_cpp_raise_grammar_error(gbnf: str, reason: str) -> None:
    result = run_isolated(
        """
        import sys
        from llama_cpp import GrammarError, LlamaGrammar
        try:
            LlamaGrammar.from_string(sys.stdin.read())
        except GrammarError as e:
            print(e)
        """,
        gbnf,
    )
    assert result == f"invalid grammar: {reason}"


def test_braces_and_parentheses_inside_literals_are_not_syntax() -> None:
    text = 'root ::= "{5,2}" [{5,2}(] "((" # {5,2} (((\n'
    assert compiles(text) is not None
    assert compiles("root ::= " + "(" * 1000 + '"a"' + ")" * 1000) is not None


def run_isolated(code: str, stdin: str, timeout: float = 60.0) -> str:
    """The output of ``code`` in a fresh interpreter: a crash or a hang fails the test."""
    result = run_python(code, stdin=stdin, timeout=timeout)
    assert result.returncode == 0, result.stderr[-2000:]
    return result.stdout.strip()


# -- JSON schemas ----------------------------------------------------------------------------

NUMBERS = (
    st.integers(-(2**70), 2**70) | st.integers(-2, 12) | st.floats(allow_nan=False, allow_infinity=False)
)
JSON_VALUES = st.recursive(
    st.none() | st.booleans() | NUMBERS | st.text(max_size=5),
    lambda inner: st.lists(inner, max_size=3) | st.dictionaries(st.text(max_size=4), inner, max_size=3),
    max_leaves=6,
)
TYPES = st.sampled_from(["string", "integer", "number", "boolean", "null", "object", "array", "bogus"])
REFS = st.sampled_from(
    ["#", "#/$defs/a", "#/$defs/b", "#/$defs/missing", "#/definitions/a", "http://x/y", "#/$defs/a/0"]
)


def schema_keywords(inner: st.SearchStrategy[Any]) -> st.SearchStrategy[dict[str, Any]]:
    """Keywords of the converter, each with sensible and hostile values."""
    return st.fixed_dictionaries(
        {},
        optional={
            "type": TYPES | st.lists(TYPES, max_size=3),
            "properties": st.dictionaries(st.text(max_size=4), inner, max_size=3),
            "required": st.lists(st.text(max_size=4), max_size=3),
            "additionalProperties": st.booleans() | inner,
            "items": inner | st.booleans(),
            "prefixItems": st.lists(inner, max_size=3),
            "enum": st.lists(JSON_VALUES, max_size=4),
            "const": JSON_VALUES,
            "anyOf": st.lists(inner, max_size=3),
            "oneOf": st.lists(inner, max_size=3),
            "allOf": st.lists(inner, max_size=3),
            "$ref": REFS,
            "$defs": st.fixed_dictionaries({}, optional={"a": inner, "b": inner}),
            "minLength": NUMBERS,
            "maxLength": NUMBERS,
            "minItems": NUMBERS,
            "maxItems": NUMBERS,
            "minimum": NUMBERS,
            "maximum": NUMBERS,
            "exclusiveMinimum": NUMBERS,
            "exclusiveMaximum": NUMBERS,
            "pattern": st.sampled_from(["^a+$", "((", "[", "a{3,1}", "^(a|b)*c?$", "\\d{2,4}", ".*"])
            | st.text(max_size=6),
            "format": st.sampled_from(["date", "time", "date-time", "uuid", "email", "bogus"]),
        },
    )


schemas = st.recursive(st.booleans() | schema_keywords(st.just({})), schema_keywords, max_leaves=8)


@examples(300)
@given(schema=schemas)
def test_generated_schemas_compile_or_raise_grammar_error(schema: Any) -> None:
    grammar = schema_compiles(json.dumps(schema))
    if grammar is not None and isinstance(schema, dict):
        assert schema_compiles(schema) is not None  # a dict and its JSON text agree


# A schema of schemas, two levels deep (hypothesis-jsonschema cannot follow the recursive
# $refs of the draft meta-schemas): every value-constraining keyword, with any JSON value.
_LEAF_KEYWORDS = {
    "type": {"enum": ["string", "integer", "number", "boolean", "null", "object", "array"]},
    "enum": {"type": "array", "maxItems": 4},
    "const": {},
    **{k: {"type": "number"} for k in ("minimum", "maximum", "exclusiveMinimum", "exclusiveMaximum")},
    "multipleOf": {"type": "number", "exclusiveMinimum": 0},
    **{k: {"type": "integer", "minimum": 0, "maximum": 2000} for k in ("minLength", "maxLength")},
    **{k: {"type": "integer", "minimum": 0, "maximum": 2000} for k in ("minItems", "maxItems")},
    **{k: {"type": "integer", "minimum": 0, "maximum": 50} for k in ("minProperties", "maxProperties")},
    "uniqueItems": {"type": "boolean"},
    "pattern": {"enum": ["^[a-z]+$", "^\\d{3}-\\d{4}$", "(ab)+", "^.{2,5}$", "x|y|z"]},
    "format": {"enum": ["date", "time", "date-time", "uuid", "email", "ipv4", "hostname"]},
    "required": {"type": "array", "items": {"type": "string", "maxLength": 3}, "maxItems": 3},
    "additionalProperties": {"type": "boolean"},
}
LEAF_SCHEMA = {"type": "object", "properties": _LEAF_KEYWORDS, "additionalProperties": False}
SCHEMA_OF_SCHEMAS: dict[str, Any] = {
    "type": "object",
    "properties": {
        **_LEAF_KEYWORDS,
        "properties": {"type": "object", "additionalProperties": LEAF_SCHEMA, "maxProperties": 4},
        "items": LEAF_SCHEMA,
        "prefixItems": {"type": "array", "items": LEAF_SCHEMA, "maxItems": 3},
        **{
            k: {"type": "array", "items": LEAF_SCHEMA, "minItems": 1, "maxItems": 3}
            for k in ("anyOf", "oneOf", "allOf")
        },
    },
    "additionalProperties": False,
}


@examples(200)
@given(schema=from_schema(SCHEMA_OF_SCHEMAS))
def test_schemas_from_hypothesis_jsonschema_compile_or_raise_grammar_error(schema: dict[str, Any]) -> None:
    grammar = schema_compiles(schema)
    if grammar is None:
        return
    # The schema's JSON text gives the same grammar as the dict.
    text_grammar = LlamaGrammar.from_json_schema(json.dumps(schema))
    assert text_grammar.grammar == grammar.grammar


DEEP = "invalid JSON schema: nested deeper than 100 levels"
TREE = {"type": "object", "properties": {"kids": {"type": "array", "items": {"$ref": "#/$defs/node"}}}}
MANY_PROPERTIES = {f"p{i}": {"type": "string"} for i in range(5000)}
HOSTILE_SCHEMAS: dict[str, tuple[str, str | None]] = {
    # name: (schema as JSON text, GrammarError message or None if it compiles)
    "objects nested 1000 deep": (
        '{"type":"object","properties":{"a":' * 1000 + "{}" + "}}" * 1000,
        DEEP,
    ),
    "anyOf nested 10000 deep (crashed)": (
        '{"anyOf":[' * 10_000 + "{}" + "]}" * 10_000,
        DEEP,
    ),
    "arrays nested 100000 deep (crashed)": (
        '{"type":"array","items":' * 100_000 + "{}" + "}" * 100_000,
        DEEP,
    ),
    "objects nested 100 deep": ('{"type":"object","properties":{"a":' * 100 + "{}" + "}}" * 100, DEEP),
    "objects nested 40 deep": ('{"type":"object","properties":{"a":' * 40 + "{}" + "}}" * 40, None),
    "enum of 10000 values": (json.dumps({"enum": list(range(10_000))}), None),
    "$ref to itself": (
        json.dumps({"$ref": "#"}),
        "invalid grammar: unsupported grammar, left recursion detected for nonterminal at index 0",
    ),
    "$ref cycle": (
        json.dumps({"$defs": {"a": {"$ref": "#/$defs/b"}, "b": {"$ref": "#/$defs/a"}}, "$ref": "#/$defs/a"}),
        "invalid grammar: unsupported grammar, left recursion detected for nonterminal at index 0",
    ),
    "recursive tree": (json.dumps({"$defs": {"node": TREE}, "$ref": "#/$defs/node"}), None),
    "minLength 10**9": (
        json.dumps({"type": "string", "minLength": 10**9}),
        "invalid JSON schema: #/minLength: 1000000000 is more than 1000",
    ),
    "maxLength 10**9": (json.dumps({"type": "string", "maxLength": 10**9}), None),
    "minLength above maxLength (hung)": (
        json.dumps({"type": "string", "minLength": 5, "maxLength": 2}),
        "invalid JSON schema: #: the minimum count is above the maximum",
    ),
    "minItems 10**9": (
        json.dumps({"type": "array", "minItems": 10**9}),
        "invalid JSON schema: #/minItems: 1000000000 is more than 1000",
    ),
    "5000 required properties": (
        json.dumps({"type": "object", "properties": MANY_PROPERTIES, "required": list(MANY_PROPERTIES)}),
        None,
    ),
}  # fmt: skip


def test_hostile_schemas_compile_or_raise_grammar_error() -> None:
    # All in one fresh interpreter (one start-up), each result a JSON line; a crash or hang
    # fails the test with the cases that had passed in its output.
    output = run_isolated(
        """
        import json, sys, warnings
        from llama_cpp import GrammarError, LlamaGrammar
        warnings.simplefilter("ignore")
        for name, text in json.loads(sys.stdin.read()).items():
            try:
                LlamaGrammar.from_json_schema(text)
                result = None
            except GrammarError as e:
                result = str(e)
            print(json.dumps([name, result]), flush=True)
        """,
        json.dumps({name: text for name, (text, _) in HOSTILE_SCHEMAS.items()}),
        timeout=120,
    )
    results = dict(json.loads(line) for line in output.splitlines())
    assert results == {name: expected for name, (_, expected) in HOSTILE_SCHEMAS.items()}


@pytest.mark.parametrize("fmt", sorted(set(FORMAT_PATTERNS) & set(FORMAT_CHECKER.checkers)))
def test_every_string_of_a_format_pattern_passes_the_format_check(fmt: str) -> None:
    # The grammar of an enforced format is its pattern: each string it accepts must pass the
    # answer's validation (a year 0000 did not: date.fromisoformat refuses it).
    @examples(300)
    @given(text=st.from_regex(FORMAT_PATTERNS[fmt], fullmatch=True))
    def conforms(text: str) -> None:
        assert FORMAT_CHECKER.conforms(text, fmt), text

    conforms()
    assert FORMAT_CHECKER.conforms("0001-01-01", "date")
    assert not FORMAT_CHECKER.conforms("0000-01-01", "date")
    assert re.fullmatch(FORMAT_PATTERNS["date"], "0000-01-01") is None
