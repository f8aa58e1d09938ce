"""``llama-cpp serve`` and ``python -m llama_cpp.server``: run :func:`create_app` with uvicorn.

On SIGTERM (or Ctrl-C) uvicorn stops accepting connections and lets in-flight requests
finish for ``graceful_shutdown_s`` seconds; then the app's lifespan closes the pools, which
cancels what is left.
"""

from __future__ import annotations

import argparse
import logging
import sys
from collections.abc import Sequence
from typing import Any

from llama_cpp.commands.common import add_placement_arguments, placement_options
from llama_cpp.errors import InvalidArgumentError

__all__ = ["add_serve_command", "main", "serve"]


def _add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("-m", "--model", help="the default model's GGUF file (loaded at startup)")
    parser.add_argument("--alias", help="the model's name for clients (default: the file name)")
    parser.add_argument("--kind", choices=("generate", "reranker"),
                        help="what the model serves (reranker: a reranker GGUF, /v1/rerank)")  # fmt: skip
    parser.add_argument("--host", help="address to bind (default 127.0.0.1: this machine only)")
    parser.add_argument("--port", type=int, help="TCP port (default 8000)")
    parser.add_argument("-np", "--parallel", type=int, help="requests decoded concurrently (default 4)")
    parser.add_argument("-c", "--ctx-size", type=int, help="context window of each request (default 4096)")
    parser.add_argument("-t", "--threads", type=int, dest="n_threads", help="CPU threads per model")
    parser.add_argument("--max-queue", type=int, help="requests that may wait for a slot (default 64)")
    parser.add_argument("--models-max", type=int, help="models resident at once (default 4)")
    parser.add_argument("--max-tokens-limit", type=int, help="largest max_tokens a request may ask")
    parser.add_argument("--api-key", action="append", dest="api_keys", metavar="KEY",
                        help="accepted API key (repeatable); none: no authentication")  # fmt: skip
    parser.add_argument("--api-key-file", help="a file of API keys, one a line")
    parser.add_argument("--profile-experts", action="store_true", default=None,
                        help="count MoE expert routing (served at /api/v1/expert-stats)")  # fmt: skip
    parser.add_argument("--config", help="a JSON or TOML file of settings (see the README's table)")
    parser.add_argument("-kvu", "--kv-unified", action="store_true",
                        help="one pool of KV cells for all slots (a shared prefix held once) instead "
                        "of a stream per slot (faster attention)")  # fmt: skip
    add_placement_arguments(parser)  # the default model's; merged into its options
    parser.add_argument("--isolated", action="store_const", const=True, default=None,
                        help="models in supervised child processes (outlive lost RPC workers)")  # fmt: skip


def _overrides(args: argparse.Namespace) -> dict[str, Any]:
    names = ("model", "alias", "kind", "host", "port", "parallel", "ctx_size", "n_threads", "max_queue",
             "models_max", "max_tokens_limit", "api_keys", "api_key_file", "profile_experts",
             "isolated")  # fmt: skip
    return {name: getattr(args, name) for name in names}


def _placement(args: argparse.Namespace) -> dict[str, Any]:
    """The placement and cache flags that were given (set over the default model's ``options``)."""
    given = {"kv_unified": args.kv_unified, **placement_options(args)}
    return {name: value for name, value in given.items() if value not in (False, 0, [], None)}


def serve(args: argparse.Namespace) -> int:
    """Run the server of the parsed ``serve`` arguments until SIGTERM or Ctrl-C."""
    import uvicorn

    from llama_cpp.server.app import create_app
    from llama_cpp.server.settings import SettingsError, load_settings

    try:
        settings = load_settings(args.config, _overrides(args))
        placement = _placement(args)
        if placement:
            settings = settings.model_copy(update={"options": {**settings.options, **placement}})
        app = create_app(settings)
    except (SettingsError, InvalidArgumentError) as error:
        print(f"llama-cpp serve: error: {error}", file=sys.stderr)
        return 2
    if not logging.getLogger().handlers:
        logging.basicConfig(level=logging.INFO, format="%(name)s: %(message)s")
    config = uvicorn.Config(
        app,
        host=settings.host,
        port=settings.port,
        timeout_graceful_shutdown=int(settings.graceful_shutdown_s),
        log_level="info",
    )
    uvicorn.Server(config).run()
    return 0


def add_serve_command(subparsers: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    """Add ``serve`` to the ``llama-cpp`` command's subparsers (``args.run`` runs it)."""
    parser = subparsers.add_parser(
        "serve",
        help="an OpenAI-compatible HTTP server (continuous batching)",
        description="Serve GGUF models over OpenAI's HTTP API. Settings: flags > LLAMA_CPP_SERVER_* "
        "environment variables > --config file > defaults.",
    )
    _add_arguments(parser)
    parser.set_defaults(run=serve)


def main(argv: Sequence[str] | None = None) -> int:
    """``python -m llama_cpp.server``: the ``serve`` command's flags."""
    parser = argparse.ArgumentParser(prog="python -m llama_cpp.server", description="Serve GGUF models.")
    _add_arguments(parser)
    return serve(parser.parse_args(argv))
