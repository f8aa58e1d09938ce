"""``llama-cpp generate``: stream a completion of a prompt."""

from __future__ import annotations

import argparse
import sys

from llama_cpp import Llama
from llama_cpp.commands.common import (
    Subcommands,
    add_command,
    add_model_arguments,
    add_sampling_arguments,
    load_progress,
    model_options,
    sampling_params,
)


def register(sub: Subcommands) -> None:
    """Add the command's parser to ``sub``."""
    parser = add_command(
        sub,
        "generate",
        summary="stream a completion of a prompt to the terminal",
        description="""
            Continue PROMPT with the model (no chat template) and stream the text to stdout,
            the prompt first.""",
        examples="""
            llama-cpp generate -m model.gguf "The three primary colors are"
            llama-cpp generate -m model.gguf --temperature 0 -n 64 --stop "\\n" "Q: 2+2? A:"
        """,
    )
    add_model_arguments(parser)
    add_sampling_arguments(parser, max_tokens=128)
    parser.add_argument("--stop", action="append", default=[], help="stop string (repeatable)")
    parser.add_argument("prompt", help="the prompt text")
    parser.set_defaults(run=run)


def run(args: argparse.Namespace) -> int:
    with load_progress(args.model) as progress:
        llm = Llama(args.model, progress_callback=progress, **model_options(args))
    with llm:
        sys.stdout.write(args.prompt)
        pieces = llm.generate_stream(
            args.prompt, max_tokens=args.max_tokens, sampling=sampling_params(args), stop=args.stop
        )
        for piece in pieces:
            sys.stdout.write(piece)
            sys.stdout.flush()
        sys.stdout.write("\n")
    return 0
