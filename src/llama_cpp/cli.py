"""The ``llama-cpp`` command: ``generate`` streams a completion, ``info`` describes a model."""

from __future__ import annotations

import argparse
import logging
import sys
from collections.abc import Sequence

import llama_cpp
from llama_cpp import Llama, LlamaError, SamplingParams
from llama_cpp.server.cli import add_serve_command


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="llama-cpp", description="Run GGUF models with llama.cpp.")
    parser.add_argument("-v", "--verbose", action="store_true", help="show llama.cpp's log")
    sub = parser.add_subparsers(dest="command", required=True)

    gen = sub.add_parser("generate", help="stream a completion of a prompt to the terminal")
    gen.add_argument("-m", "--model", required=True, help="path to a GGUF file")
    gen.add_argument("prompt", help="the prompt text")
    gen.add_argument("-n", "--max-tokens", type=int, default=128, help="tokens to generate (default 128)")
    gen.add_argument("--temperature", type=float, default=0.8, help="0 for greedy decoding")
    gen.add_argument("--top-k", type=int, default=40)
    gen.add_argument("--top-p", type=float, default=0.95)
    gen.add_argument("--min-p", type=float, default=0.05)
    gen.add_argument("--repeat-penalty", type=float, default=1.0)
    gen.add_argument("--seed", type=int, default=None)
    gen.add_argument("--stop", action="append", default=[], help="stop string (repeatable)")
    gen.add_argument("-c", "--n-ctx", type=int, default=2048)
    gen.add_argument("-t", "--threads", type=int, default=None)
    gen.add_argument("-ngl", "--n-gpu-layers", type=int, default=0)

    info = sub.add_parser("info", help="model metadata and the llama.cpp build")
    info.add_argument("-m", "--model", help="path to a GGUF file (omit for build information only)")
    add_serve_command(sub)
    return parser


def _generate(args: argparse.Namespace) -> int:
    sampling = SamplingParams(
        temperature=args.temperature,
        top_k=args.top_k,
        top_p=args.top_p,
        min_p=args.min_p,
        repeat_penalty=args.repeat_penalty,
        seed=args.seed,
    )
    with Llama(args.model, n_ctx=args.n_ctx, n_threads=args.threads, n_gpu_layers=args.n_gpu_layers) as llm:
        sys.stdout.write(args.prompt)
        for piece in llm.generate_stream(
            args.prompt, max_tokens=args.max_tokens, sampling=sampling, stop=args.stop
        ):
            sys.stdout.write(piece)
            sys.stdout.flush()
        sys.stdout.write("\n")
    return 0


def _info(args: argparse.Namespace) -> int:
    build = llama_cpp.build_info()
    print(f"llama-cpp-nanobind {llama_cpp.__version__}")
    print(f"llama.cpp commit:  {build.get('llama_cpp_commit', 'unknown')}")
    print(f"backend:           {build.get('backend', 'unknown')} (portable: {build.get('portable', False)})")
    print(f"system:            {llama_cpp.system_info()}")
    for device in llama_cpp.devices():
        print(f"device:            {device.name} ({device.type}): {device.description}")
    if args.model:
        with Llama(args.model, vocab_only=False, n_ctx=256) as llm:
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


def main(argv: Sequence[str] | None = None) -> int:
    """Entry point of ``llama-cpp`` and ``python -m llama_cpp``."""
    args = _parser().parse_args(argv)
    if args.verbose:
        logging.basicConfig(level=logging.INFO, format="%(name)s: %(message)s")
    try:
        if hasattr(args, "func"):
            return int(args.func(args))
        if args.command == "generate":
            return _generate(args)
        return _info(args)
    except LlamaError as error:
        print(f"llama-cpp: error: {error}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        return 130
