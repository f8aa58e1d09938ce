"""GBNF grammars: generation follows them, each request starts fresh, bad ones raise."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from llama_cpp import GrammarError, InvalidArgumentError, Llama, LlamaGrammar, SamplingParams

# On the tiny model 'a' is followed by 'b' unless a grammar forbids it.
ONLY_XYZ = LlamaGrammar.from_string('root ::= "xyz"')


def test_grammar_overrides_the_model(tiny: Llama) -> None:
    response = tiny.create_completion("a", max_tokens=10, temperature=0, grammar=ONLY_XYZ)
    assert response["choices"][0]["text"] == "xyz"
    assert response["choices"][0]["finish_reason"] == "stop"  # the grammar is complete: EOS


def test_each_request_gets_a_fresh_grammar_state(tiny: Llama) -> None:
    for _ in range(3):
        assert (
            tiny.generate("a", max_tokens=10, sampling=SamplingParams(temperature=0, grammar=ONLY_XYZ))
            == "xyz"
        )
    assert tiny.generate("a", max_tokens=3, sampling=SamplingParams.greedy()) == "bcd"  # and none after


def test_grammar_with_sampling_and_streaming(tiny: Llama) -> None:
    grammar = LlamaGrammar.from_string('root ::= ("ab" | "ba")+ "!"')
    params = SamplingParams(temperature=1.0, seed=5, grammar=grammar)
    text = "".join(tiny.generate_stream("a", max_tokens=12, sampling=params))
    assert set(text) <= {"a", "b", "!"}
    assert text[:2] in {"ab", "ba"}


@pytest.mark.parametrize(
    ("gbnf", "reason"),
    [
        ('root ::= "unterminated', "failed to parse grammar"),
        ("root ::= undefined-rule", "failed to parse grammar"),
        ('start ::= "x"', "grammar does not contain a 'root' symbol"),
    ],
)
def test_invalid_grammars_raise_a_typed_error(tiny: Llama, gbnf: str, reason: str) -> None:
    grammar = LlamaGrammar.from_string(gbnf)
    with pytest.raises(GrammarError, match=f"invalid grammar: {reason}"):
        tiny.check_grammar(grammar)
    with pytest.raises(GrammarError, match="invalid grammar"):
        tiny.create_completion("a", max_tokens=3, grammar=grammar)
    assert issubclass(GrammarError, InvalidArgumentError)
    assert tiny.generate("a", max_tokens=2, sampling=SamplingParams.greedy()) == "bc"


def test_empty_grammar_and_files(tmp_path: Path) -> None:
    with pytest.raises(GrammarError, match="empty"):
        LlamaGrammar.from_string("  ")
    path = tmp_path / "digits.gbnf"
    path.write_text("root ::= [0-9]+\n")
    assert LlamaGrammar.from_file(path).grammar == "root ::= [0-9]+\n"


@pytest.mark.slow
def test_json_grammar_on_the_default_model(gemma: Llama) -> None:
    grammar = LlamaGrammar.from_string(
        r"""
root   ::= "{" ws "\"name\"" ws ":" ws string ws "," ws "\"age\"" ws ":" ws number ws "}"
string ::= "\"" [a-zA-Z ]{1,20} "\""
number ::= [0-9]{1,3}
ws     ::= [ ]?
"""
    )
    for seed in (1, 2):
        response = gemma.create_completion(
            "A person as JSON:", max_tokens=64, temperature=0.7, seed=seed, grammar=grammar
        )
        data = json.loads(response["choices"][0]["text"])
        assert set(data) == {"name", "age"}
        assert isinstance(data["age"], int)
