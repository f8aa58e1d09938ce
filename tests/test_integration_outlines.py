"""outlines, unchanged, over our Llama (``outlines.from_llamacpp``), and what it needs of
llama-cpp-python besides the high-level API: ``Llama.tokenizer()`` (``LlamaTokenizer``),
``Llama.set_seed`` and the low-level names of :mod:`llama_cpp.llama_cpp`."""

from __future__ import annotations

import ctypes
from collections.abc import Iterator
from pathlib import Path
from typing import Literal

import outlines
import pytest
from pydantic import BaseModel, Field

import llama_cpp
from llama_cpp import (
    ClosedError,
    InvalidArgumentError,
    Llama,
    LlamaTokenizer,
    ModelLoadError,
    llama_model_get_vocab,
    llama_token_to_piece,
)
from llama_cpp.testing import BOS_ID, EOS_ID, SPACE_ID, byte_token

# Renders only the contents after BOS: the tiny model then continues the last character.
CONCAT = "{{ bos_token }}{% for m in messages %}{{ m['content'] }}{% endfor %}"


@pytest.fixture
def tiny_chat(tiny_model_path: Path) -> Iterator[Llama]:
    with Llama(tiny_model_path, n_ctx=256, chat_template=CONCAT, verbose=False) as llm:
        yield llm


# -- outlines -------------------------------------------------------------------------------


def test_outlines_generates_plain_text(tiny: Llama) -> None:
    model = outlines.from_llamacpp(tiny, chat_mode=False)
    assert model("a", max_tokens=5, temperature=0) == "bcdef"
    assert "".join(model.stream("a", max_tokens=5, temperature=0)) == "bcdef"


def test_outlines_chat_mode_goes_through_the_chat_template(tiny_chat: Llama) -> None:
    model = outlines.from_llamacpp(tiny_chat)  # chat_mode=True: a str is a user message
    assert model("xy", max_tokens=3, temperature=0) == "zab"
    assert "".join(model.stream("xy", max_tokens=3, temperature=0)) == "zab"


def test_outlines_builds_its_vocabulary_with_the_low_level_names(tiny: Llama) -> None:
    tokenizer = outlines.from_llamacpp(tiny).tokenizer
    # 261 tokens, 133 texts: the bytes 0x80-0xFF all read "\ufffd", and "▁" reads " " as 0x20
    # does (a text keeps its last id, as in outlines over llama-cpp-python).
    assert len(tokenizer.vocabulary) == 133
    assert tokenizer.vocabulary["a"] == byte_token(ord("a"))
    assert tokenizer.vocabulary[" "] == SPACE_ID
    assert tokenizer.vocabulary["\ufffd"] == byte_token(0xFF)  # the last of the collapsed ones
    assert (tokenizer.eos_token_id, tokenizer.eos_token) == (EOS_ID, "</s>")
    assert tokenizer.encode("ab") == ([BOS_ID, byte_token(ord("a")), byte_token(ord("b"))], [1, 1, 1])
    assert tokenizer.decode([byte_token(ord("a")), SPACE_ID]) == ["a "]


class Fruit(BaseModel):
    name: str = Field(max_length=20)
    color: Literal["red", "yellow", "green"]
    ripe: bool


@pytest.mark.slow
def test_outlines_json_output_type_on_the_default_model(gemma: Llama) -> None:
    # outlines constrains the answer with its own logits processor (outlines_core's index over
    # the 262k-token vocabulary), through our per-token hook. The default model is weak: only
    # the structure is asserted.
    model = outlines.from_llamacpp(gemma, chat_mode=False)
    answer = model("A banana as JSON:", Fruit, max_tokens=60, temperature=0)
    fruit = Fruit.model_validate_json(answer)
    assert isinstance(fruit, Fruit)
    assert len(fruit.name) <= 20


# -- Llama.tokenizer() ----------------------------------------------------------------------


def test_tokenizer_tokenizes_and_detokenizes(tiny: Llama) -> None:
    tokenizer = tiny.tokenizer()
    assert isinstance(tokenizer, LlamaTokenizer)
    a, b = byte_token(ord("a")), byte_token(ord("b"))
    assert tokenizer.tokenize(b"ab") == [BOS_ID, a, b]
    assert tokenizer.tokenize(b"ab", add_bos=False) == [a, b]
    # special=True by default, as llama-cpp-python's: "<s>" is the BOS token, not text.
    assert tokenizer.tokenize(b"<s>a", add_bos=False) == [BOS_ID, a]
    assert tokenizer.tokenize(b"<s>", add_bos=False, special=False) == [byte_token(b) for b in b"<s>"]
    assert tokenizer.encode("ab") == [BOS_ID, a, b]
    assert tokenizer.detokenize([a, b]) == b"ab"
    assert tokenizer.detokenize([a, b], prev_tokens=[a]) == b"ab"
    assert tokenizer.detokenize([EOS_ID, a], special=True) == b"</s>a"
    assert tokenizer.decode([a, byte_token(0xC3), byte_token(0xA9)]) == "aé"
    assert tokenizer.decode([a, byte_token(0xC3)]) == "a"  # a cut character is dropped


def test_tokenizer_rejects_bad_input_with_typed_errors(tiny: Llama) -> None:
    tokenizer = tiny.tokenizer()
    with pytest.raises(InvalidArgumentError, match=r"^tokenize expects UTF-8 bytes, got str$"):
        tokenizer.tokenize("ab")  # type: ignore[arg-type]
    with pytest.raises(InvalidArgumentError, match=r"^encode expects str, got bytes$"):
        tokenizer.encode(b"ab")  # type: ignore[arg-type]
    with pytest.raises(InvalidArgumentError, match=r"^token id 999 is out of range \[0, 261\)$"):
        tokenizer.detokenize([999])


def test_tokenizer_from_a_gguf_file(tiny_model_path: Path, tmp_path: Path) -> None:
    tokenizer = LlamaTokenizer.from_ggml_file(tiny_model_path)
    assert tokenizer.encode("a") == [BOS_ID, byte_token(ord("a"))]
    with pytest.raises(ModelLoadError):
        LlamaTokenizer.from_ggml_file(tmp_path / "missing.gguf")


def test_a_tokenizer_of_a_closed_model_raises_closed_error(tiny_model_path: Path) -> None:
    llm = Llama(tiny_model_path, n_ctx=64, verbose=False)
    tokenizer = llm.tokenizer()
    llm.close()
    with pytest.raises(ClosedError, match=r"^the model is closed$"):
        tokenizer.encode("a")


# -- Llama.set_seed -------------------------------------------------------------------------


def test_set_seed_is_the_seed_of_calls_that_name_none(tiny: Llama) -> None:
    def sample() -> str:
        # temperature < 0: the unmodified distribution, all but uniform over the vocabulary.
        text: str = tiny.create_completion([BOS_ID], max_tokens=8, temperature=-1)["choices"][0]["text"]
        return text

    seeded = tiny.create_completion([BOS_ID], max_tokens=8, temperature=-1, seed=7)["choices"][0]["text"]
    tiny.set_seed(7)
    assert sample() == seeded
    assert sample() == seeded


@pytest.mark.parametrize("seed", [-2, 2**32, 1.5, True])
def test_set_seed_rejects_a_bad_seed(tiny: Llama, seed: object) -> None:
    with pytest.raises(InvalidArgumentError, match=r"^seed must be an int in \[0, 2\*\*32\) or -1, got "):
        tiny.set_seed(seed)  # type: ignore[arg-type]


# -- llama_cpp.llama_cpp: llama_model_get_vocab, llama_token_to_piece ----------------------------


def test_the_low_level_names_are_importable_as_with_llama_cpp_python() -> None:
    assert llama_cpp.llama_token_to_piece is llama_cpp.llama_cpp.llama_token_to_piece
    assert llama_cpp.llama_model_get_vocab is llama_cpp.llama_cpp.llama_model_get_vocab


def test_token_to_piece_writes_into_a_ctypes_buffer(tiny: Llama) -> None:
    vocab = llama_model_get_vocab(tiny.model)
    buffer = (ctypes.c_char * 8)()
    assert llama_token_to_piece(vocab, byte_token(ord("a")), buffer, 8, 0, True) == 1
    assert buffer.raw[:1] == b"a"
    assert llama_token_to_piece(vocab, EOS_ID, buffer, 8, 0, True) == 4
    assert buffer.raw[:4] == b"</s>"
    assert llama_token_to_piece(vocab, EOS_ID, buffer, 8, 0, False) == 0  # control: no text
    # lstrip skips leading spaces; a bytearray is a buffer too.
    data = bytearray(4)
    assert llama_token_to_piece(vocab, SPACE_ID, data, 4, 0, False) == 1
    assert data == bytearray(b" \0\0\0")
    assert llama_token_to_piece(vocab, SPACE_ID, data, 4, 1, False) == 0


def test_token_to_piece_returns_minus_the_size_it_needs(tiny: Llama) -> None:
    # As llama.h: a piece longer than the buffer is not written at all.
    vocab = llama_model_get_vocab(tiny.model)
    buffer = (ctypes.c_char * 2)(b"x", b"y")
    assert llama_token_to_piece(vocab, EOS_ID, buffer, 2, 0, True) == -4
    assert buffer.raw == b"xy"


def test_the_low_level_names_reject_bad_input_with_typed_errors(tiny_model_path: Path) -> None:
    llm = Llama(tiny_model_path, n_ctx=64, verbose=False)
    vocab = llama_model_get_vocab(llm.model)
    buffer = (ctypes.c_char * 8)()
    with pytest.raises(InvalidArgumentError, match=r"^llama_model_get_vocab expects Llama.model"):
        llama_model_get_vocab(llm)  # type: ignore[arg-type]
    with pytest.raises(InvalidArgumentError, match=r"^llama_token_to_piece expects a vocabulary"):
        llama_token_to_piece(llm.model, 3, buffer, 8, 0, True)  # type: ignore[arg-type]
    with pytest.raises(InvalidArgumentError, match=r"^token id 261 is out of range \[0, 261\)$"):
        llama_token_to_piece(vocab, 261, buffer, 8, 0, True)
    with pytest.raises(
        InvalidArgumentError, match=r"^llama_token_to_piece needs a writable buffer of 8 bytes"
    ):
        llama_token_to_piece(vocab, EOS_ID, b"12345678", 8, 0, True)
    with pytest.raises(InvalidArgumentError, match=r"^llama_token_to_piece needs a writable buffer of 16"):
        llama_token_to_piece(vocab, EOS_ID, buffer, 16, 0, True)  # the buffer holds only 8
    llm.close()
    with pytest.raises(ClosedError):
        llama_token_to_piece(vocab, EOS_ID, buffer, 8, 0, True)
