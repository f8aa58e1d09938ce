"""llama-cpp-python 0.3.36, the library this package is a drop-in for, in its own venv.

Tests and benchmarks run the same scripts with it and with this package. It is built once
from the source distribution that scripts/setup_llama.py downloaded and verified (pip
downloads it again if that cache is gone), into ``$LLAMA_CPP_NANOBIND_CACHE/bench``.
"""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import llama_cpp

VERSION = "0.3.36"
REQUIREMENT = f"llama-cpp-python=={VERSION}"


def venv_dir() -> Path:
    root = os.environ.get("LLAMA_CPP_NANOBIND_CACHE", Path.home() / ".cache" / "llama-cpp-nanobind")
    return Path(root).expanduser() / "bench" / f"llama-cpp-python-{VERSION}"


def reference_python() -> Path:
    """The interpreter of a venv holding llama-cpp-python 0.3.36 (built on first use: 5-10 min)."""
    venv = venv_dir()
    python = venv / "bin" / "python"
    if (venv / ".complete").exists():
        return python
    source_dir = str(llama_cpp.build_info().get("source_dir", ""))
    archive = Path(source_dir).parent.parent / "sdist" / f"llama_cpp_python-{VERSION}.tar.gz"
    requirement = str(archive) if source_dir and archive.exists() else REQUIREMENT
    print(f"[reference] building {REQUIREMENT} into {venv} (once)", file=sys.stderr, flush=True)
    subprocess.run([sys.executable, "-m", "venv", "--clear", str(venv)], check=True)
    subprocess.run(
        [str(python), "-m", "pip", "install", "-q", "--disable-pip-version-check", requirement], check=True
    )
    (venv / ".complete").write_text(REQUIREMENT + "\n")
    return python
