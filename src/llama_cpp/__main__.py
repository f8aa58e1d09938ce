"""``python -m llama_cpp``: the command-line interface."""

from llama_cpp.cli import main

raise SystemExit(main())
