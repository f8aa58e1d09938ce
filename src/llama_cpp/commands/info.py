"""``llama-cpp info``: the llama.cpp build, the devices, and a model's metadata."""

from __future__ import annotations

import argparse

import llama_cpp
from llama_cpp import Llama
from llama_cpp.commands.common import Subcommands, add_command, load_progress


def register(sub: Subcommands) -> None:
    """Add the command's parser to ``sub``."""
    parser = add_command(
        sub,
        "info",
        summary="model metadata and the llama.cpp build",
        description="""
            Show the llama.cpp build (commit, backend, CPU features) and the devices it sees;
            with -m, also the model's size, parameters and GGUF metadata.""",
        examples="""
            llama-cpp info
            llama-cpp info -m model.gguf
        """,
    )
    parser.add_argument("-m", "--model", help="path to a GGUF file (omit for build information only)")
    parser.set_defaults(run=run)


def run(args: argparse.Namespace) -> int:
    build = llama_cpp.build_info()
    print(f"llama-cpp-nanobind {llama_cpp.__version__}")
    print(f"llama.cpp commit:  {build.get('llama_cpp_commit', 'unknown')}")
    print(f"backend:           {build.get('backend', 'unknown')} (portable: {build.get('portable', False)})")
    print(f"system:            {llama_cpp.system_info()}")
    for device in llama_cpp.devices():
        print(f"device:            {device.name} ({device.type}): {device.description}")
    if args.model:
        with load_progress(args.model) as progress:
            llm = Llama(args.model, n_ctx=256, progress_callback=progress)
        with llm:
            model = llm.model
            print(f"model:             {args.model}")
            print(f"description:       {model.description()}")
            print(f"parameters:        {model.n_params:,}")
            print(f"size:              {model.size / 2**20:.1f} MiB")
            print(f"context (train):   {model.n_ctx_train}")
            print(f"vocabulary:        {model.n_vocab}")
            print("metadata:")
            for key, value in sorted(llm.metadata.items()):
                shown = value if len(value) <= 80 else value[:77] + "..."
                print(f"  {key} = {shown}")
    return 0
