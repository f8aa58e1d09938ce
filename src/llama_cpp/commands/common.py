"""What several subcommands share: model and sampling flags, help layout, loading a model."""

from __future__ import annotations

import argparse
import textwrap
from typing import TYPE_CHECKING, Any, TypeAlias

from llama_cpp import SamplingParams
from llama_cpp.commands.progress import load_progress
from llama_cpp.config import parse_tensor_overrides

if TYPE_CHECKING:
    #: What ``ArgumentParser.add_subparsers`` returns.
    Subcommands: TypeAlias = argparse._SubParsersAction[argparse.ArgumentParser]
else:
    Subcommands = object


def add_command(
    sub: Subcommands, name: str, *, summary: str, description: str, examples: str
) -> argparse.ArgumentParser:
    """A subcommand parser: ``summary`` in ``llama-cpp --help``, ``description`` and the
    ``examples`` (one command a line, as typed) in ``llama-cpp NAME --help``."""
    return sub.add_parser(
        name,
        help=summary,
        description=textwrap.dedent(description).strip(),
        epilog="examples:\n" + textwrap.indent(textwrap.dedent(examples).strip(), "  "),
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )


def add_model_arguments(parser: argparse.ArgumentParser, *, n_ctx: int = 2048) -> None:
    """-m, -c, -t, -ngl and the placement flags (:func:`add_placement_arguments`)."""
    parser.add_argument("-m", "--model", required=True, help="path to a GGUF file")
    parser.add_argument(
        "-c",
        "--n-ctx",
        type=int,
        default=n_ctx,
        metavar="N",
        help=f"context window in tokens (default {n_ctx})",
    )
    parser.add_argument(
        "-t", "--threads", type=int, default=None, metavar="N", help="CPU threads (default: all usable)"
    )
    parser.add_argument(
        "-ngl",
        "--n-gpu-layers",
        type=int,
        default=0,
        metavar="N",
        help="layers to offload to the GPU (-1: all)",
    )
    add_placement_arguments(parser)


def add_placement_arguments(parser: argparse.ArgumentParser) -> None:
    """-ot/--override-tensor, --cpu-moe, --n-cpu-moe, --fit, --numa: llama.cpp's flags."""
    parser.add_argument(
        "-ot",
        "--override-tensor",
        action="append",
        default=[],
        metavar="REGEX=DEVICE,...",
        help="put tensors whose name matches REGEX on DEVICE (as `llama-cpp info` lists devices); repeatable",
    )
    parser.add_argument("--cpu-moe", action="store_true", help="keep every MoE expert tensor in host memory")
    parser.add_argument(
        "--n-cpu-moe",
        type=int,
        default=0,
        metavar="N",
        help="keep the expert tensors of the first N layers there",
    )
    parser.add_argument(
        "--fit", action="store_true", help="choose GPU layers, expert placement and context for free memory"
    )
    parser.add_argument(
        "--numa", choices=("distribute", "isolate", "numactl"), default=None, help="llama.cpp's NUMA strategy"
    )


def placement_options(args: argparse.Namespace) -> dict[str, Any]:
    """The Llama / LlamaPool keywords of the flags of :func:`add_placement_arguments`.

    Raises:
        InvalidArgumentError: An ``-ot`` value that is not REGEX=DEVICE.
    """
    overrides = [pair for value in args.override_tensor for pair in parse_tensor_overrides(value)]
    options: dict[str, Any] = {
        "tensor_overrides": overrides,
        "cpu_moe": args.cpu_moe,
        "n_cpu_moe": args.n_cpu_moe,
    }
    options["fit"] = args.fit
    if args.numa is not None:
        options["numa"] = args.numa
    return options


def add_sampling_arguments(parser: argparse.ArgumentParser, *, max_tokens: int) -> None:
    """-n and the sampler settings."""
    parser.add_argument(
        "-n",
        "--max-tokens",
        type=int,
        default=max_tokens,
        metavar="N",
        help=f"tokens to generate (default {max_tokens})",
    )
    parser.add_argument(
        "--temperature", type=float, default=0.8, metavar="T", help="0 for greedy decoding (default 0.8)"
    )
    parser.add_argument("--top-k", type=int, default=40, metavar="K", help="default 40 (0: off)")
    parser.add_argument("--top-p", type=float, default=0.95, metavar="P", help="default 0.95 (1: off)")
    parser.add_argument("--min-p", type=float, default=0.05, metavar="P", help="default 0.05 (0: off)")
    parser.add_argument("--repeat-penalty", type=float, default=1.0, metavar="X", help="default 1.0 (off)")
    parser.add_argument("--seed", type=int, default=None, metavar="N", help="sampling seed (default: random)")


def model_options(args: argparse.Namespace) -> dict[str, Any]:
    """The Llama / LlamaPool keywords of the flags of :func:`add_model_arguments`."""
    return {
        "n_ctx": args.n_ctx,
        "n_threads": args.threads,
        "n_gpu_layers": args.n_gpu_layers,
        **placement_options(args),
    }


def sampling_params(args: argparse.Namespace) -> SamplingParams:
    """The SamplingParams of the flags of :func:`add_sampling_arguments`."""
    return SamplingParams(
        temperature=args.temperature,
        top_k=args.top_k,
        top_p=args.top_p,
        min_p=args.min_p,
        repeat_penalty=args.repeat_penalty,
        seed=args.seed,
    )


__all__ = [
    "Subcommands",
    "add_command",
    "add_model_arguments",
    "add_placement_arguments",
    "add_sampling_arguments",
    "load_progress",
    "model_options",
    "placement_options",
    "sampling_params",
]
