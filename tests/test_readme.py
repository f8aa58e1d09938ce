"""The README's API tour runs as written (from the repository root, on the default model)."""

from __future__ import annotations

import re
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent


def run_python(code: str) -> subprocess.CompletedProcess[str]:
    """``code`` run by this interpreter from the repository root."""
    return subprocess.run(
        [sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True, timeout=600, check=False
    )


@pytest.mark.slow
@pytest.mark.timeout(600)
def test_the_api_tour_runs(default_model_path: Path) -> None:
    readme = (ROOT / "README.md").read_text(encoding="utf-8")
    match = re.search(r"## API tour\n\n```python\n(.*?)```", readme, re.S)
    assert match, "the README has no API tour"
    assert "models/gemma-3-270m-q4_k_m.gguf" in match.group(1)
    result = run_python(match.group(1))
    assert result.returncode == 0, result.stderr[-3000:]


@pytest.mark.slow
@pytest.mark.timeout(600)
def test_the_chat_docs_run(default_model_path: Path) -> None:
    """docs/chat.md's examples, one script in the order they appear."""
    text = (ROOT / "docs" / "chat.md").read_text(encoding="utf-8")
    blocks = re.findall(r"```python\n(.*?)```", text, re.S)
    assert len(blocks) >= 4, "docs/chat.md lost its examples"
    result = run_python("\n".join(blocks))
    assert result.returncode == 0, result.stderr[-3000:]
    assert "gemma" in result.stdout


@pytest.mark.slow
@pytest.mark.timeout(600)
def test_the_embedding_docs_run(default_model_path: Path) -> None:
    """docs/embeddings.md's examples, one script in the order they appear."""
    text = (ROOT / "docs" / "embeddings.md").read_text(encoding="utf-8")
    blocks = re.findall(r"```python\n(.*?)```", text, re.S)
    assert len(blocks) == 2, "docs/embeddings.md lost its examples"
    result = run_python("\n".join(blocks))
    assert result.returncode == 0, result.stderr[-3000:]
    assert "(640,) (3, 640) float32" in result.stdout
