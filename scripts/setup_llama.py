#!/usr/bin/env python3
"""Fetch, verify and build the pinned llama.cpp; put its headers in include/ and libraries in lib/.

llama.cpp comes from the source distribution of llama-cpp-python (it carries llama.cpp under
``vendor/llama.cpp``), downloaded with pip and checked against a pinned sha256. The build is
cached outside the clone, keyed by version and build options, so a second run takes seconds.

Environment (all optional):
    LLAMA_BACKEND         cpu (default) or cuda, vulkan, metal: the ggml backend to build.
    LLAMA_PORTABLE        1: no -march=native; CPU variants loaded at run time (for wheels).
    LLAMA_CMAKE_ARGS      extra arguments for llama.cpp's CMake configure step.
    LLAMA_CPP_SOURCE_DIR  build this llama.cpp checkout instead of the pinned one.
    LLAMA_CPP_NANOBIND_CACHE  cache root (default: ~/.cache/llama-cpp-nanobind).

Users with a prebuilt llama.cpp skip this script and point the package build at it with
LLAMA_CPP_LIB_DIR and LLAMA_CPP_INCLUDE_DIR (see README.md).

Usage: python scripts/setup_llama.py [--tools TARGET ...] [--print-bin-dir]
Only the standard library is used, so any Python 3.11+ can run it.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import os
import shlex
import shutil
import subprocess
import sys
import tarfile
import tempfile
from pathlib import Path

LLAMA_CPP_PYTHON_VERSION = "0.3.36"
SDIST_NAME = f"llama_cpp_python-{LLAMA_CPP_PYTHON_VERSION}.tar.gz"
SDIST_SHA256 = "832db0699007f1be95a7e41ef12e88926b02ba836461e36a36372db2760c1a2e"
LLAMA_CPP_COMMIT = "0c1e570"
# Bumped when what goes into include/ and lib/ changes, so that existing checkouts refresh.
LAYOUT_VERSION = 5  # 3: include/common/jinja/ (chat templates); 4: include/llama-internal/;
# 5: include/llama-internal/llama-ext.h

ROOT = Path(__file__).resolve().parent.parent
# Libraries the binding links, the RPC worker, and the native tools the tests and
# benchmarks compare against. Built together: they share almost every object file.
DEFAULT_TARGETS = ("llama", "ggml", "llama-common", "ggml-rpc-server", "llama-completion", "llama-bench")
BACKEND_FLAGS = {
    "cpu": [],
    "cuda": ["-DGGML_CUDA=ON"],
    "vulkan": ["-DGGML_VULKAN=ON"],
    "metal": ["-DGGML_METAL=ON"],
}


def log(message: str) -> None:
    print(f"[setup_llama] {message}", file=sys.stderr, flush=True)


def cache_root() -> Path:
    default = Path.home() / ".cache" / "llama-cpp-nanobind"
    return Path(os.environ.get("LLAMA_CPP_NANOBIND_CACHE", default)).expanduser()


def sha256_file(path: Path) -> str:
    digest = hashlib.sha256()
    with path.open("rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def fetch_sdist(cache: Path) -> Path:
    """Download llama-cpp-python's sdist with pip (once) and verify its hash."""
    target_dir = cache / "sdist"
    target = target_dir / SDIST_NAME
    if target.exists() and sha256_file(target) == SDIST_SHA256:
        return target
    target_dir.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(dir=target_dir) as tmp:
        log(f"downloading llama-cpp-python=={LLAMA_CPP_PYTHON_VERSION} (source distribution) with pip")
        subprocess.run(
            [
                sys.executable,
                "-m",
                "pip",
                "download",
                "--no-deps",
                "--no-binary",
                ":all:",
                "--disable-pip-version-check",
                "-q",
                "-d",
                tmp,
                f"llama-cpp-python=={LLAMA_CPP_PYTHON_VERSION}",
            ],
            check=True,
        )
        downloaded = Path(tmp) / SDIST_NAME
        actual = sha256_file(downloaded)
        if actual != SDIST_SHA256:
            raise SystemExit(f"sha256 mismatch for {SDIST_NAME}: expected {SDIST_SHA256}, got {actual}")
        os.replace(downloaded, target)
    log(f"verified {SDIST_NAME} sha256 {SDIST_SHA256}")
    return target


def extract_llama_cpp(cache: Path, sdist: Path) -> Path:
    """Extract vendor/llama.cpp from the sdist (once)."""
    source = cache / "src" / f"llama.cpp-{LLAMA_CPP_COMMIT}"
    if (source / ".complete").exists():
        return source
    if source.exists():
        shutil.rmtree(source)
    prefix = f"llama_cpp_python-{LLAMA_CPP_PYTHON_VERSION}/vendor/llama.cpp/"
    staging = Path(tempfile.mkdtemp(dir=cache))
    with tarfile.open(sdist) as tar:
        members = []
        for member in tar.getmembers():
            if member.name.startswith(prefix) and len(member.name) > len(prefix):
                member.name = member.name[len(prefix) :]
                members.append(member)
        tar.extractall(staging, members=members, filter="data")
    source.parent.mkdir(parents=True, exist_ok=True)
    os.replace(staging, source)
    (source / ".complete").write_text(LLAMA_CPP_COMMIT + "\n")
    log(f"extracted llama.cpp {LLAMA_CPP_COMMIT} to {source}")
    return source


def build_options() -> dict[str, object]:
    backend = os.environ.get("LLAMA_BACKEND", "cpu").strip().lower() or "cpu"
    if backend not in BACKEND_FLAGS:
        raise SystemExit(f"LLAMA_BACKEND={backend!r} is not one of {sorted(BACKEND_FLAGS)}")
    portable = os.environ.get("LLAMA_PORTABLE", "0").strip().lower() in {"1", "true", "on", "yes"}
    extra = shlex.split(os.environ.get("LLAMA_CMAKE_ARGS", ""))
    return {"backend": backend, "portable": portable, "extra_cmake_args": extra}


def cmake_args(options: dict[str, object], prefix: Path) -> list[str]:
    args = [
        "-DCMAKE_BUILD_TYPE=Release",
        "-DBUILD_SHARED_LIBS=ON",
        "-DLLAMA_BUILD_COMMON=ON",
        "-DLLAMA_BUILD_TOOLS=ON",
        "-DLLAMA_BUILD_SERVER=ON",
        "-DLLAMA_BUILD_TESTS=OFF",
        "-DLLAMA_BUILD_EXAMPLES=OFF",
        "-DLLAMA_BUILD_APP=OFF",
        "-DLLAMA_OPENSSL=OFF",
        "-DGGML_RPC=ON",
        # Everything lands in one folder that travels as a unit (lib/, the wheel's llama_cpp/lib):
        # each library and tool finds its neighbours through $ORIGIN.
        "-DCMAKE_BUILD_WITH_INSTALL_RPATH=ON",
        "-DCMAKE_INSTALL_RPATH=$ORIGIN",
        f"-DCMAKE_INSTALL_PREFIX={prefix}",
    ]
    args += BACKEND_FLAGS[str(options["backend"])]
    if options["portable"]:
        args += ["-DGGML_NATIVE=OFF", "-DGGML_BACKEND_DL=ON", "-DGGML_CPU_ALL_VARIANTS=ON"]
    else:
        args += ["-DGGML_NATIVE=ON"]
    args += list(options["extra_cmake_args"])  # type: ignore[call-overload]
    return args


def build_key(source_id: str, options: dict[str, object], targets: tuple[str, ...]) -> str:
    compiler = shutil.which(os.environ.get("CXX", "c++")) or "c++"
    blob = json.dumps(
        {"source": source_id, "options": options, "targets": sorted(targets), "compiler": compiler},
        sort_keys=True,
    )
    return hashlib.sha256(blob.encode()).hexdigest()[:16]


def build(source: Path, build_dir: Path, options: dict[str, object], targets: tuple[str, ...]) -> None:
    jobs = str(os.cpu_count() or 2)
    generator = ["-G", "Ninja"] if shutil.which("ninja") else []
    log(f"configuring llama.cpp in {build_dir}")
    subprocess.run(
        [
            "cmake",
            "-S",
            str(source),
            "-B",
            str(build_dir),
            *generator,
            *cmake_args(options, build_dir / "prefix"),
        ],
        check=True,
        stdout=subprocess.DEVNULL,
    )
    log(f"building {' '.join(targets)} with {jobs} jobs (the first build takes 10-20 minutes on 2 cores)")
    subprocess.run(["cmake", "--build", str(build_dir), "-j", jobs, "--target", *targets], check=True)


def copy_headers(source: Path, include: Path) -> None:
    if include.exists():
        shutil.rmtree(include)
    include.mkdir(parents=True)
    for header in (source / "include").glob("*.h"):
        shutil.copy2(header, include / header.name)
    for header in (source / "ggml" / "include").glob("*.h"):
        shutil.copy2(header, include / header.name)
    # llama.cpp's common library (JSON schema to grammar, chat templates): include/common/.
    # The chat headers include jinja/*.h: keep the folder structure.
    for header in (source / "common").rglob("*.h"):
        target = include / "common" / header.relative_to(source / "common")
        target.parent.mkdir(parents=True, exist_ok=True)
        shutil.copy2(header, target)
    # Internal headers, as llama.cpp's own tests and common library use them: its grammar
    # parser (exported by libllama), whose error message the public API only prints to
    # stderr; and its staging API (llama-ext.h: llama_get_memory_breakdown, exported too).
    internal = include / "llama-internal"
    internal.mkdir()
    for name in ("llama-grammar.h", "llama-ext.h"):
        shutil.copy2(source / "src" / name, internal / name)


def copy_binaries(build_dir: Path, lib: Path) -> None:
    if lib.exists():
        shutil.rmtree(lib)
    lib.mkdir(parents=True)
    bin_dir = build_dir / "bin"
    for entry in sorted(bin_dir.iterdir()):
        if (
            entry.name.endswith((".so", ".dylib"))
            or ".so." in entry.name
            or entry.name.startswith(("ggml-rpc-server", "llama-"))
        ):
            if entry.is_symlink():
                (lib / entry.name).symlink_to(os.readlink(entry))
            elif entry.is_file():
                shutil.copy2(entry, lib / entry.name)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument(
        "--tools", nargs="*", default=[], help="extra llama.cpp targets to build (e.g. llama-server)"
    )
    parser.add_argument(
        "--dest", type=Path, default=ROOT, help="where include/ and lib/ go (default: the repo)"
    )
    parser.add_argument(
        "--print-bin-dir", action="store_true", help="print the cached folder holding the binaries"
    )
    args = parser.parse_args()

    cache = cache_root()
    cache.mkdir(parents=True, exist_ok=True)
    options = build_options()
    targets = tuple(dict.fromkeys((*DEFAULT_TARGETS, *args.tools)))

    user_source = os.environ.get("LLAMA_CPP_SOURCE_DIR")
    if user_source:
        source = Path(user_source).expanduser().resolve()
        source_id = f"checkout:{source}"
        commit = "custom"
    else:
        source = extract_llama_cpp(cache, fetch_sdist(cache))
        source_id = f"llama-cpp-python=={LLAMA_CPP_PYTHON_VERSION}:{LLAMA_CPP_COMMIT}"
        commit = LLAMA_CPP_COMMIT

    # Extra tools share the build tree of the default set, keyed without them.
    key = build_key(source_id, options, DEFAULT_TARGETS)
    build_dir = cache / "build" / key
    stamp = build_dir / "built-targets.json"
    built = set(json.loads(stamp.read_text())) if stamp.exists() else set()
    if user_source or not set(targets) <= built:
        build(source, build_dir, options, targets)
        stamp.write_text(json.dumps(sorted(built | set(targets))))
    else:
        log(f"llama.cpp build {key} is cached in {build_dir}")

    if args.print_bin_dir:
        print(build_dir / "bin")

    info = {
        "llama_cpp_python_version": LLAMA_CPP_PYTHON_VERSION,
        "llama_cpp_commit": commit,
        "build_key": key,
        "layout": LAYOUT_VERSION,
        "source_dir": str(source),
        "backend": options["backend"],
        "portable": options["portable"],
        "backend_dl": bool(options["portable"]),
        "extra_cmake_args": options["extra_cmake_args"],
    }
    lib = args.dest / "lib"
    include = args.dest / "include"
    current = lib / "llama-build.json"
    if current.exists() and not user_source:
        installed = json.loads(current.read_text())
        if installed.get("build_key") == key and installed.get("layout") == LAYOUT_VERSION:
            return 0
    copy_headers(source, include)
    copy_binaries(build_dir, lib)
    current.write_text(json.dumps(info, indent=2) + "\n")
    log(f"installed llama.cpp {commit} ({options['backend']}) into {include} and {lib}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
