"""Llama.from_pretrained: GGUF files from a Hugging Face Hub cache, with no network.

Each test fills a cache of its own in huggingface_hub's layout (``models--ORG--NAME/refs/main``
naming a commit, ``snapshots/<commit>/<file>`` linking to ``blobs/<hash>``) with the suite's
tiny model, and turns huggingface_hub offline: any HTTP request it tried would raise.
"""

from __future__ import annotations

import hashlib
import json
import sys
from pathlib import Path

import huggingface_hub
import pytest
from huggingface_hub import constants, try_to_load_from_cache

from llama_cpp import InvalidArgumentError, Llama, ModelLoadError, SamplingParams
from llama_cpp.hub import download

COMMIT = "0123456789abcdef0123456789abcdef01234567"
GREEDY = SamplingParams.greedy()


def fill_cache(cache: Path, repo_id: str, files: dict[str, bytes]) -> Path:
    """Put ``files`` (repository path -> content) in ``cache`` as huggingface_hub would after
    downloading them at commit COMMIT of branch main; returns the snapshot folder."""
    repo = cache / f"models--{repo_id.replace('/', '--')}"
    (repo / "refs").mkdir(parents=True)
    (repo / "refs" / "main").write_text(COMMIT)
    snapshot = repo / "snapshots" / COMMIT
    for name, content in files.items():
        blob = repo / "blobs" / hashlib.sha256(content).hexdigest()
        blob.parent.mkdir(exist_ok=True)
        blob.write_bytes(content)
        link = snapshot / name
        link.parent.mkdir(parents=True, exist_ok=True)
        link.symlink_to(Path("../" * (len(Path(name).parts) + 1)) / "blobs" / blob.name)
    return snapshot


@pytest.fixture
def offline(monkeypatch: pytest.MonkeyPatch) -> None:
    # huggingface_hub reads HF_HUB_OFFLINE when it is imported; its flag is set as well.
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", True)


@pytest.fixture
def gguf(tiny_model_path: Path) -> bytes:
    return tiny_model_path.read_bytes()


@pytest.fixture
def cache(tmp_path: Path, gguf: bytes) -> Path:
    """A cache holding org/tiny: tiny.gguf and config.json at the root, sub/other.bin."""
    root = tmp_path / "hub"
    fill_cache(root, "org/tiny", {"tiny.gguf": gguf, "config.json": b"{}", "sub/other.bin": b"x"})
    return root


def test_the_cache_layout_is_huggingface_hubs(cache: Path, offline: None) -> None:
    path = try_to_load_from_cache("org/tiny", "tiny.gguf", cache_dir=cache)
    assert isinstance(path, str)
    assert Path(path) == cache / "models--org--tiny" / "snapshots" / COMMIT / "tiny.gguf"
    hf_path = huggingface_hub.hf_hub_download("org/tiny", "tiny.gguf", cache_dir=cache)
    assert hf_path == path


def test_from_pretrained_loads_the_cached_match_and_generates(
    cache: Path, offline: None, gguf: bytes
) -> None:
    with Llama.from_pretrained("org/tiny", "*.gguf", cache_dir=cache, n_ctx=64, verbose=False) as llm:
        assert Path(llm.model_path) == cache / "models--org--tiny" / "snapshots" / COMMIT / "tiny.gguf"
        assert Path(llm.model_path).read_bytes() == gguf
        assert llm.generate("A", max_tokens=20, sampling=GREEDY) == "é😀世界"


def test_the_default_cache_is_hf_hub_cache(
    cache: Path, offline: None, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("HF_HUB_CACHE", str(cache))
    monkeypatch.setattr(constants, "HF_HUB_CACHE", str(cache))  # read at import, as HF_HUB_OFFLINE
    with Llama.from_pretrained("org/tiny", "tiny.gguf", n_ctx=64, verbose=False) as llm:
        assert llm.generate("B", max_tokens=5, sampling=GREEDY) == "!"


def test_a_pattern_must_match_one_file(tmp_path: Path, offline: None, gguf: bytes) -> None:
    cache = tmp_path / "hub"
    fill_cache(cache, "org/two", {"tiny-q4.gguf": gguf, "tiny-q8.gguf": gguf})
    message = (
        r"'\*\.gguf' matches 2 files of org/two \(cached; the Hub is offline\), expected one: "
        r"\['tiny-q4.gguf', 'tiny-q8.gguf'\]"
    )
    with pytest.raises(InvalidArgumentError, match=message):
        Llama.from_pretrained("org/two", "*.gguf", cache_dir=cache)
    with Llama.from_pretrained("org/two", "*q8.gguf", cache_dir=cache, n_ctx=64, verbose=False) as llm:
        assert Path(llm.model_path).name == "tiny-q8.gguf"


def test_a_missing_file_raises_model_load_error(cache: Path, offline: None) -> None:
    message = (
        r"no file of org/tiny \(cached; the Hub is offline\) matches '\*Q4_K_M.gguf'; "
        r"its files: \['config.json', 'sub/other.bin', 'tiny.gguf'\]"
    )
    with pytest.raises(ModelLoadError, match=message):
        Llama.from_pretrained("org/tiny", "*Q4_K_M.gguf", cache_dir=cache)
    with pytest.raises(ModelLoadError, match=r"org/other is not in the Hugging Face cache and the Hub is"):
        Llama.from_pretrained("org/other", "*.gguf", cache_dir=cache)
    with pytest.raises(ModelLoadError, match=r"no file of org/tiny .* matches 'missing.json'"):
        Llama.from_pretrained("org/tiny", "tiny.gguf", cache_dir=cache, additional_files=["missing.json"])


def test_local_dir_gets_copies_of_the_files(cache: Path, offline: None, tmp_path: Path, gguf: bytes) -> None:
    local = tmp_path / "models"
    with Llama.from_pretrained(
        "org/tiny",
        "*.gguf",
        local_dir=local,
        local_dir_use_symlinks=False,
        cache_dir=cache,
        additional_files=["sub/*.bin"],
        n_ctx=64,
        verbose=False,
    ) as llm:
        assert Path(llm.model_path) == local / "tiny.gguf"
        assert llm.generate("A", max_tokens=20, sampling=GREEDY) == "é😀世界"
    assert not (local / "tiny.gguf").is_symlink()
    assert (local / "tiny.gguf").read_bytes() == gguf
    assert (local / "sub" / "other.bin").read_bytes() == b"x"
    assert sorted(p.relative_to(local).as_posix() for p in local.rglob("*") if p.is_file()) == [
        "sub/other.bin",
        "tiny.gguf",
    ]
    # Later, what local_dir holds is found without the cache.
    empty = tmp_path / "empty"
    assert download("org/tiny", "*.gguf", local_dir=local, cache_dir=empty) == local / "tiny.gguf"


def test_online_the_pattern_is_matched_against_the_hubs_listing(monkeypatch: pytest.MonkeyPatch) -> None:
    # Only the listing is replaced: both errors are raised before anything is downloaded.
    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", False)
    listing = ["README.md", "model-Q4_K_M.gguf", "model-Q8_0.gguf"]
    monkeypatch.setattr(huggingface_hub.HfApi, "list_repo_files", lambda self, repo_id, **kw: listing)
    with pytest.raises(InvalidArgumentError, match=r"matches 2 files of org/model \(on the Hub\)"):
        download("org/model", "*.gguf")
    with pytest.raises(ModelLoadError, match=r"no file of org/model \(on the Hub\) matches '\*Q2_K.gguf'"):
        download("org/model", "*Q2_K.gguf")


def test_without_huggingface_hub_the_error_says_what_to_install(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setitem(sys.modules, "huggingface_hub", None)  # makes the import fail
    with pytest.raises(ImportError, match=r"pip install 'llama-cpp-nanobind\[hub\]'"):
        Llama.from_pretrained("org/tiny", "*.gguf")


def test_a_partly_downloaded_repository_loads_what_is_cached(
    tmp_path: Path, offline: None, gguf: bytes
) -> None:
    # After a download of one file, huggingface_hub 2.x may have recorded the repository's
    # whole file list (trees/<commit>.json): snapshot_download(local_files_only=True) then
    # refuses the snapshot as incomplete, yet the file asked for is there.
    cache = tmp_path / "hub"
    fill_cache(cache, "org/two", {"tiny-q4.gguf": gguf})
    entry = {"size": len(gguf), "blob_id": "0" * 40}
    listing = {"format_version": 1, "files": {"tiny-q4.gguf": entry, "tiny-q8.gguf": entry}}
    (cache / "models--org--two" / "trees").mkdir()
    (cache / "models--org--two" / "trees" / f"{COMMIT}.json").write_text(json.dumps(listing))
    with Llama.from_pretrained("org/two", "*.gguf", cache_dir=cache, n_ctx=64, verbose=False) as llm:
        assert Path(llm.model_path).name == "tiny-q4.gguf"
