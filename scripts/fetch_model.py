#!/usr/bin/env python3
"""Put the default model (Gemma 3 270M Q4_K_M) in models/, assembling it once into the cache.

Usage: python scripts/fetch_model.py [DEST_DIR]   (run with the project's virtual environment)
"""

from __future__ import annotations

import sys
from pathlib import Path

from llama_cpp.testing.default_model import ensure_default_model


def main() -> int:
    dest = Path(sys.argv[1]) if len(sys.argv) > 1 else Path(__file__).resolve().parent.parent / "models"
    print(f"[fetch_model] {ensure_default_model(dest)}", file=sys.stderr)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
