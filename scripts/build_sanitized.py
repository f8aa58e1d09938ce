#!/usr/bin/env python3
"""Build llama.cpp and llama_cpp._core with AddressSanitizer, into a cache folder outside the clone.

Three steps, each cached (a second run takes seconds unless the Python sources changed):

1. llama.cpp from the pinned source that scripts/setup_llama.py fetches and verifies, configured
   like the regular build plus ``LLAMA_SANITIZE_ADDRESS`` / ``GGML_SANITIZE_ADDRESS``, into
   ``~/.cache/llama-cpp-nanobind/build/asan-<key>`` (only libllama, libggml*, libllama-common:
   about 30-60 minutes on 2 busy cores). Its headers and libraries go to ``<that>/dist``.
2. A virtual environment ``<that>/venv`` that sees the packages of the interpreter running this
   script (pytest, numpy, gguf, fastapi, ...) through a plain path entry: the editable install of
   this clone is *not* visible there, because path entries added by a ``.pth`` file get no
   ``.pth`` processing of their own (its import hook never loads).
3. This package, installed (not editable) into that venv with ``LLAMA_CPP_SANITIZE=address``
   (CMakeLists.txt): ``_core`` compiled and linked with ``-fsanitize=address``, against step 1.

Running under it (the script prints the exact line): the ASan runtime must be loaded first,
before the interpreter (which is not instrumented) allocates anything, and libstdc++ with it:
the interpreter does not link libstdc++, so ASan would find no ``__cxa_throw`` to intercept at
start-up and abort at the first C++ exception ("CHECK failed: ... real___cxa_throw")::

    LD_PRELOAD="$(gcc -print-file-name=libasan.so) $(gcc -print-file-name=libstdc++.so)" \\
        ASAN_OPTIONS=detect_leaks=0 \\
        <cache>/build/asan-<key>/venv/bin/python -m pytest -p no:cacheprovider tests/test_pool.py

``detect_leaks=0``: CPython keeps interned objects and module state alive until exit on purpose,
and LeakSanitizer reports all of them; leaks of our own are measured by tests/test_soak.py and
benchmarks/soak.py instead (RSS, threads and descriptors over thousands of operations).

Usage: python scripts/build_sanitized.py [--print-python]
Run it with the project's virtual environment (its site-packages is what the ASan venv sees).
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import os
import shutil
import subprocess
import sys
import sysconfig
from pathlib import Path
from types import ModuleType

ROOT = Path(__file__).resolve().parent.parent
SANITIZE_ARGS = ["-DLLAMA_SANITIZE_ADDRESS=ON", "-DGGML_SANITIZE_ADDRESS=ON"]
# What _core links: no tools, no RPC server (a sanitized build is for running the tests in-process).
TARGETS = ("llama", "ggml", "llama-common")


def load_setup_llama() -> ModuleType:
    """scripts/setup_llama.py as a module: one definition of the fetch, the options and the layout."""
    spec = importlib.util.spec_from_file_location("setup_llama", ROOT / "scripts" / "setup_llama.py")
    assert spec is not None
    assert spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def log(message: str) -> None:
    print(f"[build_sanitized] {message}", file=sys.stderr, flush=True)


def build_llama(setup: ModuleType, cache: Path) -> Path:
    """Build the sanitized llama.cpp (once); return the folder holding its include/ and lib/."""
    source = setup.extract_llama_cpp(cache, setup.fetch_sdist(cache))
    source_id = f"llama-cpp-python=={setup.LLAMA_CPP_PYTHON_VERSION}:{setup.LLAMA_CPP_COMMIT}"
    options = {"backend": "cpu", "portable": False, "extra_cmake_args": SANITIZE_ARGS}
    build_dir = cache / "build" / f"asan-{setup.build_key(source_id, options, TARGETS)}"
    dist = build_dir / "dist"
    stamp = dist / "lib" / "llama-build.json"
    if stamp.exists():
        log(f"sanitized llama.cpp is cached in {build_dir}")
        return dist
    setup.build(source, build_dir, options, TARGETS)
    setup.copy_headers(source, dist / "include")
    setup.copy_binaries(build_dir, dist / "lib")
    info = {
        "llama_cpp_python_version": setup.LLAMA_CPP_PYTHON_VERSION,
        "llama_cpp_commit": setup.LLAMA_CPP_COMMIT,
        "build_key": build_dir.name,
        "layout": setup.LAYOUT_VERSION,
        "source_dir": str(source),
        "backend": "cpu",
        "portable": False,
        "backend_dl": False,
        "extra_cmake_args": SANITIZE_ARGS,
    }
    stamp.write_text(json.dumps(info, indent=2) + "\n")
    return dist


def make_venv(root: Path) -> Path:
    """A venv whose sys.path ends with this interpreter's site-packages; return its python."""
    venv = root / "venv"
    python = venv / "bin" / "python"
    if not python.exists():
        subprocess.run([sys.executable, "-m", "venv", "--without-pip", str(venv)], check=True)
    # The venv's own site-packages comes first: the sanitized llama_cpp installed there wins.
    site = subprocess.run(
        [str(python), "-c", "import sysconfig; print(sysconfig.get_paths()['purelib'])"],
        capture_output=True,
        text=True,
        check=True,
    ).stdout.strip()
    (Path(site) / "project-packages.pth").write_text(sysconfig.get_paths()["purelib"] + "\n")
    return python


def install_package(python: Path, dist: Path, root: Path) -> None:
    """Build _core with -fsanitize=address and install the package into the venv."""
    env = dict(
        os.environ,
        LLAMA_CPP_LIB_DIR=str(dist / "lib"),
        LLAMA_CPP_INCLUDE_DIR=str(dist / "include"),
    )
    log("building and installing llama_cpp with LLAMA_CPP_SANITIZE=address")
    subprocess.run(
        [
            str(python),
            "-m",
            "pip",
            "install",
            "-q",
            "--disable-pip-version-check",
            "--no-deps",
            "--no-build-isolation",
            "--force-reinstall",
            "-C",
            "cmake.define.LLAMA_CPP_SANITIZE=address",
            "-C",
            f"build-dir={root / 'ext'}",
            str(ROOT),
        ],
        env=env,
        check=True,
    )


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument(
        "--print-python", action="store_true", help="print only the venv's python (after building)"
    )
    args = parser.parse_args()
    setup = load_setup_llama()
    cache = setup.cache_root()
    cache.mkdir(parents=True, exist_ok=True)
    dist = build_llama(setup, cache)
    python = make_venv(dist.parent)
    install_package(python, dist, dist.parent)
    if args.print_python:
        print(python)
        return 0
    preload = " ".join(
        subprocess.run(
            [os.environ.get("CC") or shutil.which("gcc") or "gcc", f"-print-file-name={name}"],
            capture_output=True,
            text=True,
            check=True,
        ).stdout.strip()
        for name in ("libasan.so", "libstdc++.so")
    )
    print(f'LD_PRELOAD="{preload}" ASAN_OPTIONS=detect_leaks=0 {python} -m pytest tests/...')
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
