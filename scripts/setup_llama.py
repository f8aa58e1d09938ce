#!/usr/bin/env python3
"""Fetch, verify and build the pinned llama.cpp; put its headers in include/ and libraries in lib/.

llama.cpp comes from the source distribution of llama-cpp-python (it carries llama.cpp under
``vendor/llama.cpp``), downloaded with pip and checked against a pinned sha256. The build is
cached outside the clone, keyed by version and build options, so a second run takes seconds.

Environment (all optional):
    LLAMA_BACKEND         cpu (default) or cuda, vulkan, metal: the ggml backend to build.
                          cuda: the portable build plus libggml-cuda.so, a backend module built
                          in a tree of its own (see build_cuda_module).
    LLAMA_PORTABLE        1: no -march=native; CPU variants loaded at run time (for wheels).
    LLAMA_CUDA_ARCHITECTURES  CMAKE_CUDA_ARCHITECTURES of the CUDA module
                          (default 90-real;90-virtual; the release list is in docs/RELEASING.md).
    CUDACXX               nvcc (default: on PATH, else /usr/local/cuda/bin/nvcc).
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
import importlib.util
import json
import os
import re
import shlex
import shutil
import subprocess
import sys
import tarfile
import tempfile
import urllib.request
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


# The CUDA module is built against CUDA 13 from PyPI: cuBLAS ships its headers and
# libraries there (site-packages/nvidia/cu13/{include,lib}); the toolkit's nvcc brings the
# rest. Pinned to the CUDA 13.0 releases, the oldest the module may then run with: users
# get these or newer through the package's [cuda] extra.
CUDA_BUILD_PACKAGES = ("nvidia-cublas==13.0.2.14", "nvidia-cuda-runtime==13.0.88")
CUDA_ARCHITECTURES = "90-real;90-virtual"


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


def download_with_pip(directory: Path) -> None:
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
            str(directory),
            f"llama-cpp-python=={LLAMA_CPP_PYTHON_VERSION}",
        ],
        check=True,
    )


def download_from_pypi(directory: Path) -> None:
    # The simple index (PEP 691, JSON) is what every PyPI mirror and proxy serves.
    index = os.environ.get("PIP_INDEX_URL", "https://pypi.org/simple").rstrip("/")
    page = f"{index}/llama-cpp-python/"
    log(f"downloading {SDIST_NAME} from {page}")
    request = urllib.request.Request(page, headers={"Accept": "application/vnd.pypi.simple.v1+json"})
    with urllib.request.urlopen(request, timeout=60) as response:
        files = json.load(response)["files"]
    (url,) = [f["url"] for f in files if f["filename"] == SDIST_NAME]
    with urllib.request.urlopen(url, timeout=600) as response, (directory / SDIST_NAME).open("wb") as out:
        shutil.copyfileobj(response, out)


def fetch_sdist(cache: Path) -> Path:
    """Download llama-cpp-python's sdist with pip (once) and verify its hash."""
    target_dir = cache / "sdist"
    target = target_dir / SDIST_NAME
    if target.exists() and sha256_file(target) == SDIST_SHA256:
        return target
    target_dir.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(dir=target_dir) as tmp:
        if importlib.util.find_spec("pip") is not None:
            download_with_pip(Path(tmp))
        else:
            # Inside pip's isolated build environment (pip install of our sdist) pip itself
            # cannot be imported: ask PyPI's JSON API for the file instead.
            download_from_pypi(Path(tmp))
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
    if backend == "cuda":
        # The CUDA wheel is the portable CPU build (shared with it, cached once) plus one
        # more backend module: with GGML_BACKEND_DL a module needs only ggml-base's API,
        # checked by GGML_BACKEND_API_VERSION when it is loaded.
        return {"backend": "cpu", "portable": True, "extra_cmake_args": extra}
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
    default = shutil.which("c++")
    if default and os.path.realpath(compiler) == os.path.realpath(default):
        # CMake hands CXX=g++ to what it runs (pip install of the sdist): the same compiler
        # as c++, and the same cached build.
        compiler = default
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


def find_nvcc() -> str:
    nvcc = os.environ.get("CUDACXX") or shutil.which("nvcc") or "/usr/local/cuda/bin/nvcc"
    if not Path(nvcc).exists():
        raise SystemExit("LLAMA_BACKEND=cuda needs nvcc (CUDA 13): set CUDACXX or put it on PATH")
    return nvcc


def cuda_packages(cache: Path) -> Path:
    """Install the pinned cuBLAS and CUDA runtime wheels into the cache (once); return their root."""
    key = hashlib.sha256(" ".join(CUDA_BUILD_PACKAGES).encode()).hexdigest()[:12]
    root = cache / "cuda" / f"packages-{key}"
    if (root / ".complete").exists():
        return root
    if root.exists():
        shutil.rmtree(root)
    log(f"installing {' '.join(CUDA_BUILD_PACKAGES)} into {root} (build-time headers and libraries)")
    subprocess.run(
        [
            sys.executable,
            "-m",
            "pip",
            "install",
            "--no-deps",
            "--disable-pip-version-check",
            "-q",
            "--target",
            str(root),
            *CUDA_BUILD_PACKAGES,
        ],
        check=True,
    )
    (root / ".complete").write_text("\n".join(CUDA_BUILD_PACKAGES) + "\n")
    return root


def driver_functions(cuda_h: Path) -> list[str]:
    """The driver API functions cuda.h declares, under their exported names (cuMemGetInfo_v2...)."""
    compiler = os.environ.get("CC") or shutil.which("cc") or "gcc"
    preprocessed = subprocess.run(
        [compiler, "-E", "-P", "-x", "c", "-I", str(cuda_h.parent), "-"],
        input=f"#include <{cuda_h.name}>\n",
        capture_output=True,
        text=True,
        check=True,
    ).stdout
    return sorted(set(re.findall(r"\bCUresult\s+(cu[A-Za-z0-9_]+)\s*\(", preprocessed)))


def driver_stub(cache: Path, cuda_h: Path) -> Path:
    """A build-time-only libcuda.so (SONAME libcuda.so.1) exporting the driver API; never shipped.

    ggml-cuda links the driver for its virtual memory pool (cuMemCreate...). No stub comes
    with a toolkit installed without a driver, and the module must still be built here: the
    stub's functions are empty, only its SONAME and symbol names end up in libggml-cuda.so,
    which then loads the user's real libcuda.so.1 (or fails to load: no driver, CPU only).
    """
    names = driver_functions(cuda_h)
    digest = hashlib.sha256("\n".join(names).encode()).hexdigest()[:12]
    stub_dir = cache / "cuda" / f"driver-stub-{digest}"
    library = stub_dir / "libcuda.so"
    if library.exists():
        return library
    stub_dir.mkdir(parents=True, exist_ok=True)
    source = stub_dir / "libcuda-stub.c"
    source.write_text("".join(f"void {name}(void) {{}}\n" for name in names))
    compiler = os.environ.get("CC") or shutil.which("cc") or "gcc"
    subprocess.run(
        [
            compiler,
            "-shared",
            "-fPIC",
            "-Wl,-soname,libcuda.so.1",
            "-o",
            str(stub_dir / "libcuda.so.1"),
            str(source),
        ],
        check=True,
    )
    library.symlink_to("libcuda.so.1")
    log(f"generated the build-time driver stub {library} ({len(names)} functions from {cuda_h})")
    return library


def cuda_module_args(cache: Path) -> list[str]:
    """CMake arguments of the CUDA module's tree: CUDA 13 from PyPI, the driver stub, shared cudart."""
    packages = cuda_packages(cache) / "nvidia" / "cu13"
    nvcc = find_nvcc()
    architectures = (
        os.environ.get("LLAMA_CUDA_ARCHITECTURES", CUDA_ARCHITECTURES).strip() or CUDA_ARCHITECTURES
    )
    return [
        "-DCMAKE_BUILD_TYPE=Release",
        "-DBUILD_SHARED_LIBS=ON",
        "-DGGML_BACKEND_DL=ON",
        "-DGGML_NATIVE=OFF",
        "-DGGML_CUDA=ON",
        f"-DCMAKE_CUDA_COMPILER={nvcc}",
        f"-DCMAKE_CUDA_ARCHITECTURES={architectures}",
        # libcudart.so.13 from the nvidia-cuda-runtime package, not linked in statically.
        "-DCMAKE_CUDA_RUNTIME_LIBRARY=Shared",
        # The PyPI packages carry no unversioned libcublas.so for find_library to find.
        f"-DCUDA_cublas_LIBRARY={packages / 'lib' / 'libcublas.so.13'}",
        f"-DCUDA_cublasLt_LIBRARY={packages / 'lib' / 'libcublasLt.so.13'}",
        f"-DCUDA_cudart_LIBRARY={packages / 'lib' / 'libcudart.so.13'}",
        f"-DCMAKE_CUDA_FLAGS=-I{packages / 'include'}",
        f"-DCUDA_cuda_driver_LIBRARY={driver_stub(cache, packages / 'include' / 'cuda.h')}",
        # Installed in llama_cpp/lib; the nvidia packages sit next to llama_cpp in
        # site-packages. $ORIGIN first: libggml-base.so.0 is its neighbour.
        "-DCMAKE_BUILD_WITH_INSTALL_RPATH=ON",
        "-DCMAKE_INSTALL_RPATH=$ORIGIN;$ORIGIN/../../nvidia/cu13/lib",
        "-DLLAMA_BUILD_COMMON=OFF",
        "-DLLAMA_BUILD_TOOLS=OFF",
        "-DLLAMA_BUILD_TESTS=OFF",
        "-DLLAMA_BUILD_EXAMPLES=OFF",
        "-DLLAMA_BUILD_SERVER=OFF",
        "-DLLAMA_OPENSSL=OFF",
    ]


def build_cuda_module(cache: Path, source: Path, source_id: str) -> Path:
    """Build libggml-cuda.so (once per source, CUDA options and toolkit); return it.

    Its own tree builds only ggml-base and ggml-cuda: the rest of the CUDA wheel is the
    portable CPU build. About 35-50 minutes for one architecture on 2 cores.
    """
    args = cuda_module_args(cache)
    nvcc_version = subprocess.run([find_nvcc(), "--version"], capture_output=True, text=True, check=True)
    blob = json.dumps({"source": source_id, "args": args, "nvcc": nvcc_version.stdout}, sort_keys=True)
    build_dir = cache / "build" / f"cuda-{hashlib.sha256(blob.encode()).hexdigest()[:16]}"
    module = build_dir / "bin" / "libggml-cuda.so"
    stamp = build_dir / "built-module.json"
    if stamp.exists() and module.exists():
        log(f"CUDA module is cached in {build_dir}")
        return module
    generator = ["-G", "Ninja"] if shutil.which("ninja") else []
    log(f"configuring the CUDA module in {build_dir}")
    subprocess.run(
        ["cmake", "-S", str(source), "-B", str(build_dir), *generator, *args],
        check=True,
        stdout=subprocess.DEVNULL,
    )
    jobs = str(os.cpu_count() or 2)
    log(f"building ggml-cuda with {jobs} jobs (35-50 minutes per architecture on 2 cores)")
    subprocess.run(["cmake", "--build", str(build_dir), "-j", jobs, "--target", "ggml-cuda"], check=True)
    stamp.write_text(json.dumps({"cmake_args": args}, indent=2) + "\n")
    return module


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
    with_cuda = os.environ.get("LLAMA_BACKEND", "").strip().lower() == "cuda"
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

    # The long build first (so that a portable CPU build run meanwhile is found cached).
    cuda_module = build_cuda_module(cache, source, source_id) if with_cuda else None

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
    if cuda_module is not None:
        key = f"{key}+{cuda_module.parent.parent.name}"

    if args.print_bin_dir:
        print(build_dir / "bin")

    info = {
        "llama_cpp_python_version": LLAMA_CPP_PYTHON_VERSION,
        "llama_cpp_commit": commit,
        "build_key": key,
        "layout": LAYOUT_VERSION,
        "source_dir": str(source),
        "backend": "cuda" if with_cuda else options["backend"],
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
    if cuda_module is not None:
        shutil.copy2(cuda_module, lib / cuda_module.name)
    current.write_text(json.dumps(info, indent=2) + "\n")
    log(f"installed llama.cpp {commit} ({info['backend']}) into {include} and {lib}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
