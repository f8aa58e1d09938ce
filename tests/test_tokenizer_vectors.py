"""Tokenizer conformance on llama.cpp's own test vectors (models/ggml-vocab-*.gguf + .inp/.out).

The convention is llama.cpp's tests/test-tokenizer-0.cpp: vocab-only load, no BOS/EOS added,
special tokens not parsed; inputs separated by "\\n__ggml_vocab_test__\\n", one line of
expected ids per input.
"""

from __future__ import annotations

from pathlib import Path

import pytest

from llama_cpp import Llama

SEPARATOR = "\n__ggml_vocab_test__\n"
# The vocabularies with vectors in the pinned llama.cpp (checked below, so none is skipped).
VOCABS = [
    "bert-bge",
    "command-r",
    "deepseek-coder",
    "deepseek-llm",
    "falcon",
    "gemma-4",
    "gpt-2",
    "llama-bpe",
    "llama-spm",
    "mpt",
    "phi-3",
    "qwen2",
    "qwen35",
    "refact",
    "starcoder",
]


def read_vectors(vocab: Path) -> list[tuple[str, list[int]]]:
    raw = Path(f"{vocab}.inp").read_text(encoding="utf-8")
    inputs = raw.split(SEPARATOR)
    if raw.endswith(SEPARATOR):  # as test-tokenizer-0: a trailing separator opens no input
        inputs.pop()
    lines = Path(f"{vocab}.out").read_text(encoding="utf-8").split("\n")
    if lines and lines[-1] == "":
        lines.pop()
    assert len(inputs) == len(lines), f"{vocab}: {len(inputs)} inputs but {len(lines)} outputs"
    return [(text, [int(tok) for tok in line.split()]) for text, line in zip(inputs, lines, strict=True)]


def test_every_vocabulary_with_vectors_is_covered(llama_source_dir: Path) -> None:
    found = sorted(
        p.name[len("ggml-vocab-") : -len(".gguf.inp")]
        for p in (llama_source_dir / "models").glob("ggml-vocab-*.gguf.inp")
    )
    assert found == sorted(VOCABS)


@pytest.mark.parametrize("name", VOCABS)
def test_tokenizer_matches_llama_cpp_vectors(llama_source_dir: Path, name: str) -> None:
    vocab = llama_source_dir / "models" / f"ggml-vocab-{name}.gguf"
    vectors = read_vectors(vocab)
    assert vectors
    with Llama(vocab, vocab_only=True) as llm:
        for text, expected in vectors:
            assert llm.tokenize(text.encode("utf-8"), add_bos=False, special=False) == expected, text
