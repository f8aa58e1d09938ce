"""GGUF files from the Hugging Face Hub, for :meth:`Llama.from_pretrained`.

Needs the optional ``huggingface_hub`` package (``pip install 'llama-cpp-nanobind[hub]'``).
Files land in huggingface_hub's cache (or ``local_dir``) and are reused from there.
"""

from __future__ import annotations

import fnmatch
import os
import shutil
from collections.abc import Sequence
from pathlib import Path, PurePosixPath

from llama_cpp.errors import InvalidArgumentError, ModelLoadError

__all__ = ["download"]

_INSTALL = "pip install 'llama-cpp-nanobind[hub]' (or pip install huggingface_hub)"


def _match(repo_id: str, pattern: str, files: Sequence[str], where: str) -> str:
    """The one file of ``files`` (repository-relative, ``/``-separated) that ``pattern`` matches."""
    matches = sorted(f for f in files if fnmatch.fnmatch(f, pattern))
    if not matches:
        listing = sorted(files)
        raise ModelLoadError(f"no file of {repo_id} ({where}) matches {pattern!r}; its files: {listing}")
    if len(matches) > 1:
        raise InvalidArgumentError(
            f"{pattern!r} matches {len(matches)} files of {repo_id} ({where}), expected one: {matches}"
        )
    return matches[0]


def _files_under(folder: Path) -> dict[str, Path]:
    """Repository path -> file, for the files under ``folder``: a snapshot, or a local_dir
    without the ``.cache`` folder where huggingface_hub keeps its download records."""
    if not folder.is_dir():
        return {}
    files = {}
    for path in folder.rglob("*"):
        relative = PurePosixPath(path.relative_to(folder).as_posix())
        if relative.parts[0] != ".cache" and path.is_file():
            files[str(relative)] = path
    return files


def _download_offline(
    repo_id: str, patterns: list[str], *, local_dir: Path | None, cache_dir: str
) -> list[Path]:
    # Without the Hub the repository's file list is unknown: the patterns are matched against
    # what an earlier download left in the cache (the snapshot of "main") or in local_dir.
    from huggingface_hub import snapshot_download

    snapshot: str | None
    try:
        snapshot = snapshot_download(
            repo_id, cache_dir=cache_dir, local_files_only=True, allow_patterns=patterns
        )
    except FileNotFoundError as error:
        # huggingface_hub's LocalEntryNotFoundError. Newer releases (2.x) raise its subclass
        # IncompleteSnapshotError, naming the snapshot, when their record of the repository's
        # files has a matching file that was never downloaded: what was downloaded is usable.
        snapshot = getattr(error, "snapshot_path", None)
    cached = _files_under(Path(snapshot)) if snapshot is not None else {}
    if local_dir is not None:
        cached |= _files_under(local_dir)
    if not cached:
        raise ModelLoadError(
            f"{repo_id} is not in the Hugging Face cache and the Hub is offline (HF_HUB_OFFLINE): "
            "download it once with the Hub reachable"
        )
    paths = []
    for pattern in patterns:
        relative = _match(repo_id, pattern, list(cached), "cached; the Hub is offline")
        path = cached[relative]
        if local_dir is not None and not path.is_relative_to(local_dir):
            target = local_dir / relative
            target.parent.mkdir(parents=True, exist_ok=True)
            shutil.copyfile(path, target)  # follows the snapshot's symlink to its blob
            path = target
        paths.append(path)
    return paths


def download(
    repo_id: str,
    filename: str,
    *,
    local_dir: str | os.PathLike[str] | None = None,
    cache_dir: str | os.PathLike[str] | None = None,
    additional_files: Sequence[str] | None = None,
) -> Path:
    """Download a model file (and its companions) from a Hugging Face Hub repository.

    ``filename`` and each of ``additional_files`` are :mod:`fnmatch` patterns (``"*q4_k_m.gguf"``)
    matched against the repository's files, paths relative to its root; each must match
    exactly one. With ``HF_HUB_OFFLINE=1`` the repository cannot be listed: the patterns are
    matched against the files an earlier download put in the cache or in ``local_dir``.

    Args:
        repo_id: ``"owner/name"``.
        filename: The model file (for a split GGUF, its first part).
        local_dir: Put the files here (keeping the repository's folders) instead of leaving
            them in the cache.
        cache_dir: huggingface_hub's cache (default: ``HF_HUB_CACHE``).
        additional_files: More files to fetch beside it, such as the other parts of a split
            GGUF.

    Returns:
        The local path of the ``filename`` match.

    Raises:
        ImportError: huggingface_hub is not installed.
        ModelLoadError: A pattern matches no file (offline: no cached file), or the Hub is
            offline and nothing of ``repo_id`` is cached.
        InvalidArgumentError: A pattern matches more than one file.
        huggingface_hub's errors (HfHubHTTPError and its subclasses): the repository is
            missing or private, or a download fails.
    """
    try:
        from huggingface_hub import HfApi, constants, hf_hub_download
    except ImportError as error:
        raise ImportError(f"Llama.from_pretrained needs huggingface_hub: {_INSTALL}") from error

    patterns = [filename, *(additional_files or ())]
    target = Path(local_dir) if local_dir is not None else None
    # The default read here, as the offline flag is: huggingface_hub 0.23 binds it when
    # imported, 2.x when called.
    cache = os.fspath(cache_dir) if cache_dir is not None else constants.HF_HUB_CACHE
    if constants.HF_HUB_OFFLINE:
        return _download_offline(repo_id, patterns, local_dir=target, cache_dir=cache)[0]
    files = HfApi().list_repo_files(repo_id)
    matches = [_match(repo_id, pattern, files, "on the Hub") for pattern in patterns]
    paths = [hf_hub_download(repo_id, match, local_dir=target, cache_dir=cache) for match in matches]
    return Path(paths[0])
