"""The build: the pinned llama.cpp, the bundled libraries and tools, the type stubs."""

from __future__ import annotations

import os
import subprocess
import sys
from importlib import metadata
from pathlib import Path

from packaging.requirements import Requirement

import llama_cpp
from llama_cpp import _core

ROOT = Path(__file__).resolve().parent.parent


def runtime_dependencies(name: str) -> set[str]:
    """The distributions ``name`` needs at run time (no extras), transitively."""
    found: set[str] = set()
    todo = [name]
    while todo:
        for line in metadata.requires(todo.pop()) or []:
            requirement = Requirement(line)
            if requirement.marker is not None and not requirement.marker.evaluate({"extra": ""}):
                continue
            if requirement.name not in found:
                found.add(requirement.name)
                todo.append(requirement.name)
    return found


def top_level(dist: str) -> set[Path]:
    """The importable packages and modules a distribution installed (absolute paths)."""
    distribution = metadata.distribution(dist)
    site = Path(str(distribution.locate_file("")))
    names = {
        f.parts[0]
        for f in distribution.files or []
        if f.parts[0] != ".." and (len(f.parts) > 1 or f.suffix in {".py", ".so"})
    }
    return {site / n for n in names if not n.endswith(".dist-info") and n != "__pycache__"}


def test_import_and_version() -> None:
    assert llama_cpp.__version__ == "0.1.0"
    assert set(llama_cpp.__all__) <= set(dir(llama_cpp))


def test_built_from_the_pinned_llama_cpp() -> None:
    info = llama_cpp.build_info()
    assert info["llama_cpp_commit"] == "0c1e570"
    assert info["llama_cpp_python_version"] == "0.3.36"
    assert _core.llama_cpp_commit() == "0c1e570"


def test_system_info_and_devices() -> None:
    assert "CPU :" in llama_cpp.system_info()
    devices = llama_cpp.devices()
    assert any(d.type == "cpu" for d in devices)
    assert all(d.name for d in devices)
    assert _core.supports_rpc()


def test_libraries_and_rpc_server_are_bundled() -> None:
    lib = llama_cpp.lib_dir()
    assert (lib / "libllama.so.0").is_file()
    assert (lib / "libggml.so.0").is_file()
    assert not (lib / "llama-bench").exists()  # native tools are not part of the package
    server = lib / "ggml-rpc-server"
    assert os.access(server, os.X_OK)
    result = subprocess.run([str(server), "--help"], capture_output=True, text=True, timeout=30, check=False)
    assert "usage" in (result.stdout + result.stderr).lower()


def test_committed_stub_matches_the_module(tmp_path: Path) -> None:
    subprocess.run(
        [
            sys.executable,
            "-m",
            "nanobind.stubgen",
            "-q",
            "-m",
            "llama_cpp._core",
            "-o",
            str(tmp_path / "_core.pyi"),
        ],
        check=True,
    )
    generated = (tmp_path / "_core.pyi").read_text()
    committed = (ROOT / "src" / "llama_cpp" / "_core.pyi").read_text()
    assert generated == committed, "regenerate it with: make stubs"


def test_package_is_typed() -> None:
    assert (Path(llama_cpp.__file__).parent / "py.typed").exists()


def test_wheel_is_self_contained(tmp_path: Path, default_model_path: Path) -> None:
    """pip wheel . gives a wheel that runs in a fresh venv, away from include/ and lib/."""
    wheels = tmp_path / "wheels"
    subprocess.run(
        [
            sys.executable,
            "-m",
            "pip",
            "wheel",
            "-q",
            "--no-deps",
            "--no-build-isolation",
            "-w",
            str(wheels),
            f"-Cbuild-dir={tmp_path / 'build'}",
            str(ROOT),
        ],
        check=True,
        timeout=900,
    )
    (wheel,) = wheels.glob("llama_cpp_nanobind-*.whl")
    venv = tmp_path / "venv"
    subprocess.run([sys.executable, "-m", "venv", str(venv)], check=True)
    python = venv / "bin" / "python"
    subprocess.run(
        [str(python), "-m", "pip", "install", "-q", "--no-deps", "--no-index", str(wheel)], check=True
    )
    # Its dependencies (numpy, jsonschema and theirs) are not installed by --no-deps (nothing
    # is downloaded): the fresh venv borrows this interpreter's copies of them, and nothing
    # else of its site-packages.
    borrowed = tmp_path / "borrowed"
    borrowed.mkdir()
    for top in sorted(
        {top for dist in runtime_dependencies("llama-cpp-nanobind") for top in top_level(dist)}
    ):
        (borrowed / top.name).symlink_to(top)
    (site_packages,) = (venv / "lib").glob("python*/site-packages")
    (site_packages / "borrowed-dependencies.pth").write_text(f"{borrowed}\n")
    script = "\n".join(
        [
            "import llama_cpp, pathlib",
            "package = pathlib.Path(llama_cpp.__file__).parent",
            "lib = llama_cpp.lib_dir()",
            "assert lib.parent == package, lib",
            "assert (lib / 'ggml-rpc-server').exists() and (package / '_core.pyi').exists()",
            "maps = pathlib.Path('/proc/self/maps').read_text()",
            "assert str(lib / 'libllama.so') in maps, 'libllama not loaded from the package'",
            f"llm = llama_cpp.Llama({str(default_model_path)!r}, n_ctx=256)",
            "greedy = llama_cpp.SamplingParams.greedy()",
            "print(llm.generate('The capital of France is', max_tokens=8, sampling=greedy))",
        ]
    )
    env = {k: v for k, v in os.environ.items() if k not in {"PYTHONPATH", "LD_LIBRARY_PATH", "VIRTUAL_ENV"}}
    result = subprocess.run(
        [str(python), "-c", script],
        cwd=tmp_path,
        env=env,
        capture_output=True,
        text=True,
        timeout=300,
        check=False,
    )
    assert result.returncode == 0, result.stderr
    assert result.stdout.startswith(" the capital of")
