"""The README's API tour runs as written (from the repository root, on the default model)."""

from __future__ import annotations

import re
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent


@pytest.mark.slow
@pytest.mark.timeout(600)
def test_the_api_tour_runs(default_model_path: Path) -> None:
    readme = (ROOT / "README.md").read_text(encoding="utf-8")
    match = re.search(r"## API tour\n\n```python\n(.*?)```", readme, re.S)
    assert match, "the README has no API tour"
    assert "models/gemma-3-270m-q4_k_m.gguf" in match.group(1)
    result = subprocess.run(
        [sys.executable, "-c", match.group(1)],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=600,
        check=False,
    )
    assert result.returncode == 0, result.stderr[-3000:]


@pytest.mark.slow
@pytest.mark.timeout(600)
def test_the_chat_docs_run(default_model_path: Path) -> None:
    """docs/chat.md's examples, one script in the order they appear."""
    text = (ROOT / "docs" / "chat.md").read_text(encoding="utf-8")
    blocks = re.findall(r"```python\n(.*?)```", text, re.S)
    assert len(blocks) >= 4, "docs/chat.md lost its examples"
    result = subprocess.run(
        [sys.executable, "-c", "\n".join(blocks)],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=600,
        check=False,
    )
    assert result.returncode == 0, result.stderr[-3000:]
    assert "gemma" in result.stdout
