"""``llama-cpp tokenize``: a text's token ids and their pieces."""

from __future__ import annotations

import argparse

from llama_cpp import Llama
from llama_cpp.commands.common import Subcommands, add_command


def register(sub: Subcommands) -> None:
    """Add the command's parser to ``sub``."""
    parser = add_command(
        sub,
        "tokenize",
        summary="show the token ids (and pieces) of a text",
        description="""
            Tokenize TEXT with the model's vocabulary (only the vocabulary is loaded) and
            print one token a line: its id and its piece as a Python literal (a str, or
            bytes for a piece that is not whole UTF-8 characters). With --ids-only, the ids
            as one list.""",
        examples="""
            llama-cpp tokenize -m model.gguf "Hello world"
            llama-cpp tokenize -m model.gguf --ids-only --no-bos "Hello world"
            llama-cpp tokenize -m model.gguf --special "<start_of_turn>user"
        """,
    )
    parser.add_argument("-m", "--model", required=True, help="path to a GGUF file")
    parser.add_argument("text", help="the text to tokenize")
    parser.add_argument("--ids-only", action="store_true", help="print only the list of ids")
    parser.add_argument("--no-bos", action="store_true", help="do not add the BOS token the model asks for")
    parser.add_argument(
        "--special",
        action="store_true",
        help="parse special-token text (e.g. <start_of_turn>) as special tokens",
    )
    parser.set_defaults(run=run)


def run(args: argparse.Namespace) -> int:
    with Llama(args.model, vocab_only=True, verbose=args.verbose) as llm:
        ids = llm.tokenize(args.text, add_bos=not args.no_bos, special=args.special)
        if args.ids_only:
            print(ids)
            return 0
        for token in ids:
            print(f"{token:>6} -> {_shown(llm.model.token_to_piece(token, True))}")
    return 0


def _shown(piece: bytes) -> str:
    try:
        return repr(piece.decode("utf-8"))
    except UnicodeDecodeError:  # a byte token, part of a character
        return repr(piece)
