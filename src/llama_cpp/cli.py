"""The ``llama-cpp`` command (also ``python -m llama_cpp``); its subcommands live in
:mod:`llama_cpp.commands`."""

from __future__ import annotations

import argparse
import logging
import sys
from collections.abc import Sequence

from llama_cpp import LlamaError
from llama_cpp.commands import bench, chat, generate, info, profile_experts, rpc_worker, tokenize
from llama_cpp.server.cli import add_serve_command

DESCRIPTION = (
    "Run GGUF models with llama.cpp: generate text, chat, tokenize, benchmark, inspect, profile experts."
)
EPILOG = """examples:
  llama-cpp generate -m model.gguf "The three primary colors are"
  llama-cpp chat -m model.gguf
  llama-cpp bench -m model.gguf -p 512 -n 128
  llama-cpp serve -m model.gguf --port 8000
  llama-cpp profile-experts moe.gguf --prompts prompts.txt --heatmap experts.png
  llama-cpp rpc-worker --port 50052
  llama-cpp COMMAND --help     (each command's options and examples)"""


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="llama-cpp",
        description=DESCRIPTION,
        epilog=EPILOG,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.add_argument("-v", "--verbose", action="store_true", help="show llama.cpp's log")
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    # Each module adds its parser to `sub`, with run=(Namespace -> exit status) as a default.
    for command in (generate, chat, tokenize, bench, info, profile_experts, rpc_worker):
        command.register(sub)
    add_serve_command(sub)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    """Entry point of ``llama-cpp`` and ``python -m llama_cpp``."""
    args = _parser().parse_args(argv)
    if args.verbose:
        logging.basicConfig(level=logging.INFO, format="%(name)s: %(message)s")
    try:
        return int(args.run(args))
    except LlamaError as error:
        print(f"llama-cpp: error: {error}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        return 130
