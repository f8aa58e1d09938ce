"""Hostile GGUF files end in a clean load or a typed error, never a crash of the process.

The cases run in a worker subprocess (llama_cpp.testing.fuzz_gguf), so that a case which
aborts the process fails its test instead of ending the test session. The long run is
benchmarks/fuzz_loader.py; here: the regression corpus (tests/data/fuzz_corpus.json, recipes
of the inputs that crashed before the loader validated files), a bounded fuzzing run, the
files that must keep loading, and the harness's own detection of crashes and hangs.
"""

from __future__ import annotations

import json
import os
import re
import signal
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from llama_cpp import Llama, ModelLoadError
from llama_cpp.testing import TinyModelSpec, write_tiny_llama
from llama_cpp.testing.fuzz_gguf import (
    CLEAN,
    CRASH,
    HANG,
    TYPED,
    Base,
    Case,
    Fuzzer,
    make_bases,
    make_cases,
    materialize,
)

CORPUS: list[dict[str, Any]] = json.loads((Path(__file__).parent / "data" / "fuzz_corpus.json").read_text())

#: Small bases for the bounded run: each tokenizer family once (SPM, BPE, WordPiece).
BOUNDED_VOCABS = ("vocab-llama-spm", "vocab-gpt-2", "vocab-bert-bge")


@pytest.fixture(scope="module")
def bases(tmp_path_factory: pytest.TempPathFactory, llama_source_dir: Path) -> dict[str, Base]:
    found = make_bases(tmp_path_factory.mktemp("fuzz-bases"), vocab_dir=llama_source_dir / "models")
    return {b.name: b for b in found}


@pytest.fixture(scope="module")
def fuzzer(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Fuzzer]:
    with Fuzzer(tmp_path_factory.mktemp("fuzz-work"), timeout_s=60) as f:
        yield f


@pytest.mark.parametrize("entry", CORPUS, ids=[e["name"] for e in CORPUS])
def test_corpus_case_is_refused(
    entry: dict[str, Any], bases: dict[str, Base], fuzzer: Fuzzer, tmp_path: Path
) -> None:
    case = Case(entry["base"], "patch", tuple(entry["patch"]), entry["full"])
    path = materialize(case, bases[case.base], tmp_path / "case.gguf")
    outcome, detail = fuzzer.run_one(path, case.full)
    assert (outcome, detail.split(":")[0]) == (TYPED, "ModelLoadError"), detail
    assert re.search(entry["error"], detail), detail


def test_bounded_fuzzing_run(bases: dict[str, Base], fuzzer: Fuzzer) -> None:
    chosen = [bases[n] for n in ("tiny-llama", "tiny-moe", "tiny-reranker", *BOUNDED_VOCABS)]
    report = fuzzer.run(make_cases(chosen, 200, seed=14), chosen)
    failures = "\n".join(f"{r.outcome}: {r.case.label()}: {r.detail}" for r in report.failures)
    assert not report.failures, f"{report.summary()}\n{failures}"
    # Both outcomes occur: the mutations reach past the header checks, and some files survive.
    assert report.counts[CLEAN] >= 10, report.summary()
    assert report.counts[TYPED] >= 80, report.summary()


def test_real_files_still_load(llama_source_dir: Path, default_model_path: Path, tmp_path: Path) -> None:
    """The validation refuses none of llama.cpp's vocabularies, the default model or the tiny ones."""
    vocabs = sorted((llama_source_dir / "models").glob("ggml-vocab-*.gguf"))
    assert len(vocabs) >= 19
    for path in [*vocabs, default_model_path]:
        with Llama(path, vocab_only=True, verbose=False) as llm:
            assert llm.tokenize(b"Hello world", add_bos=False)
    with Llama(write_tiny_llama(tmp_path / "tiny.gguf"), n_ctx=64, verbose=False) as llm:
        assert llm.create_completion("A", max_tokens=2)["choices"][0]["text"]


def test_duplicate_token_message(tiny_model_path: Path, tmp_path: Path, bases: dict[str, Base]) -> None:
    """The case of the issue, in-process: the message names the key, both indices and the token."""
    case = Case("tiny-llama", "patch", ("token", 5, "3c3078303" + "03e"), True)  # <0x02> := <0x00>
    path = materialize(case, bases["tiny-llama"], tmp_path / "dup.gguf")
    with pytest.raises(
        ModelLoadError, match=r"tokenizer\.ggml\.tokens\[5\] '<0x00>' is the same token as \[3\]"
    ):
        Llama(path, vocab_only=True, verbose=False)


def test_mean_pooling_with_an_odd_window(tiny_model_path: Path) -> None:
    """n_ctx=300 with mean pooling aborted in GGML_ASSERT(ggml_can_mul_mat(a, b)) while the
    context reserved its graph (a batch not a multiple of the 16 embedding sequences)."""
    code = (
        "import sys\nfrom llama_cpp import Llama\n"
        f"with Llama({str(tiny_model_path)!r}, n_ctx=300, embedding=True, pooling_type=1,\n"
        "           verbose=False) as llm:\n"
        "    v = llm.embed('hello')\n"
        "    print(len(v), llm.context_params.n_batch, llm.context_params.n_ubatch)\n"
    )
    run = subprocess.run(
        [sys.executable, "-c", code],
        capture_output=True,
        text=True,
        timeout=120,
        check=False,
        env=dict(os.environ, GGML_NO_BACKTRACE="1"),
    )
    assert run.returncode == 0, run.stderr[-2000:]
    assert run.stdout.split() == [str(TinyModelSpec().n_embd), "304", "304"]


def test_harness_reports_a_crash_and_carries_on(tiny_model_path: Path, tmp_path: Path) -> None:
    with Fuzzer(tmp_path, timeout_s=60) as fuzzer:  # a loaded machine starts a worker slowly
        assert fuzzer.run_one(tiny_model_path, False) == (CLEAN, "")
        pid = fuzzer.worker_pid
        assert pid is not None
        os.kill(pid, signal.SIGABRT)  # as a GGML_ASSERT would
        assert fuzzer.run_one(tiny_model_path, False) == (CRASH, "worker died: SIGABRT")
        assert fuzzer.run_one(tiny_model_path, True) == (CLEAN, "")  # a new worker


def test_harness_reports_a_hang(tiny_model_path: Path, tmp_path: Path) -> None:
    with Fuzzer(tmp_path, timeout_s=0.001) as fuzzer:
        assert fuzzer.run_one(tiny_model_path, True) == (HANG, "no answer in 0.001 s")
