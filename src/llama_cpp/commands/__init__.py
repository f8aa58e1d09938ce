"""The subcommands of ``llama-cpp`` (assembled by :mod:`llama_cpp.cli`).

Each module has ``register(subparsers)``: it adds its parser and sets ``run`` on it, a function
of the parsed arguments returning the exit status.
"""
