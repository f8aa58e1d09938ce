"""``python -m llama_cpp.server``: run the server (the flags of ``llama-cpp serve``)."""

import sys

from llama_cpp.server.cli import main

sys.exit(main())
