"""GBNF grammars: generation follows them, each request starts fresh, bad ones raise."""

from __future__ import annotations

import json
import re
from pathlib import Path

import pytest

from llama_cpp import GrammarError, InvalidArgumentError, Llama, LlamaGrammar, SamplingParams, _core
from llama_cpp.testing.tiny_models import EOS_ID, EOT_ID

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
        ("root ::= (", "expecting ')' at line 1, column 11 (the end)"),
        ('root ::= "x"\nnext ::= [a-z] )', "expecting newline or end at line 2, column 16: ')'"),
        ('root ::= "unterminated', "unexpected end of input"),
        ("root ::= undefined-rule", "undefined rule 'undefined-rule'"),
        ('start ::= "x"', "grammar does not contain a 'root' symbol"),
        ("root ::= root", "unsupported grammar, left recursion detected for nonterminal at index 0"),
    ],
)
def test_invalid_grammars_raise_at_construction_with_the_reason(gbnf: str, reason: str) -> None:
    # llama.cpp's parser needs no vocabulary: the reason comes without a model, at once.
    with pytest.raises(GrammarError, match=f"^{re.escape(f'invalid grammar: {reason}')}$"):
        LlamaGrammar.from_string(gbnf)
    with pytest.raises(GrammarError, match=f"^{re.escape(f'invalid grammar: {reason}')}$"):
        LlamaGrammar(gbnf)
    assert issubclass(GrammarError, InvalidArgumentError)


def test_the_native_check_gives_the_same_reason(tiny: Llama) -> None:
    # A grammar given as text (SamplerConfig.grammar) is parsed by the same code.
    reason = "invalid grammar: expecting ')' at line 1, column 11 (the end)"
    with pytest.raises(GrammarError, match=f"^{re.escape(reason)}$"):
        _core.check_grammar(tiny.model, "root ::= (", "root")
    assert tiny.generate("a", max_tokens=2, sampling=SamplingParams.greedy()) == "bc"


def test_token_literals_are_checked_against_the_model(tiny: Llama) -> None:
    grammar = LlamaGrammar.from_string("root ::= <nonexistent>")  # no vocabulary to check it yet
    with pytest.raises(GrammarError, match=r"^invalid grammar: invalid token '<nonexistent>'$"):
        tiny.check_grammar(grammar)
    with pytest.raises(GrammarError, match=r"^invalid grammar: invalid token '<nonexistent>'$"):
        tiny.create_completion("a", max_tokens=3, grammar=grammar)
    bos = LlamaGrammar.from_string('root ::= "xy" <s> "z"')  # <s>: the BOS token (rendered as "")
    tiny.check_grammar(bos)
    assert tiny.generate("a", max_tokens=6, sampling=SamplingParams(temperature=0, grammar=bos)) == "xyz"


def test_a_grammar_that_cannot_continue_raises_grammar_error(tiny: Llama) -> None:
    # Once "xy" is out the grammar allows only the end of generation, which the logit bias
    # forbids: llama.cpp's grammar sampler throws a bare runtime_error on the next token.
    complete_then_stuck = LlamaGrammar.from_string('root ::= "xy"')
    with pytest.raises(
        GrammarError,
        match=r"^the grammar cannot continue: Unexpected empty grammar stack after accepting piece: "
        r"<unk> \(0\)$",
    ):
        tiny.create_completion(
            "a",
            max_tokens=10,
            temperature=0,
            grammar=complete_then_stuck,
            logit_bias={EOS_ID: float("-inf"), EOT_ID: float("-inf")},
        )
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
