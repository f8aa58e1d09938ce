"""A script written for llama-cpp-python 0.3.36 runs unchanged here and prints the same."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

from llama_cpp.testing.reference import reference_python

SCRIPT = Path(__file__).resolve().parent / "dropin" / "llama_cpp_python_script.py"


def run(python: Path | str, model: Path) -> dict[str, object]:
    result = subprocess.run(
        [str(python), str(SCRIPT), str(model)], capture_output=True, text=True, timeout=600, check=True
    )
    output: dict[str, object] = json.loads(result.stdout.strip().splitlines()[-1])
    return output


@pytest.mark.slow
@pytest.mark.timeout(1800)  # the first run builds llama-cpp-python into its cached venv
def test_the_llama_cpp_python_script_gives_the_same_results(default_model_path: Path) -> None:
    theirs = run(reference_python(), default_model_path)
    ours = run(sys.executable, default_model_path)
    assert set(ours) == set(theirs)
    for key in sorted(theirs):
        if key == "seconds":
            continue
        if key == "logprobs_values":  # float32 arithmetic of two implementations
            assert ours[key] == pytest.approx(theirs[key], abs=1e-5), key
        else:
            assert ours[key] == theirs[key], key
