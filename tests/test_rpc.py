"""rpc_servers: layers on a real ggml-rpc-server subprocess over 127.0.0.1."""

from __future__ import annotations

import logging
import os
import re
import socket
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import pytest

import llama_cpp
import rpc_harness
from llama_cpp import InvalidArgumentError, Llama, LlamaError, SamplingParams
from rpc_harness import ACCEPTED

GREEDY = SamplingParams.greedy()


@pytest.fixture(scope="module")
def server_log(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return tmp_path_factory.mktemp("rpc") / "server.log"


@pytest.fixture(scope="module")
def rpc_server(server_log: Path) -> Iterator[str]:
    with rpc_harness.rpc_server(server_log) as endpoint:
        yield endpoint


@pytest.mark.timeout(120)
def test_layers_on_an_rpc_server_give_the_same_tokens(
    tiny_model_path: Path, rpc_server: str, server_log: Path, caplog: pytest.LogCaptureFixture
) -> None:
    with Llama(tiny_model_path, n_ctx=256) as local:
        expected = local.generate("a", max_tokens=12, sampling=GREEDY)
    accepted = server_log.read_text().count(ACCEPTED)
    with (
        caplog.at_level(logging.INFO, logger="llama_cpp"),
        Llama(tiny_model_path, n_ctx=256, rpc_servers=rpc_server, n_gpu_layers=-1) as remote,
    ):
        log = "\n".join(r.getMessage() for r in caplog.records)
        assert "offloaded 3/3 layers to GPU" in log
        assert re.search(rf"RPC\d+\[{re.escape(rpc_server)}\] model buffer size", log)
        assert remote.generate("a", max_tokens=12, sampling=GREEDY) == expected
        assert remote.generate("A", max_tokens=20, sampling=GREEDY) == "é😀世界"
    assert any(d.description == rpc_server for d in llama_cpp.devices())
    assert server_log.read_text().count(ACCEPTED) > accepted  # the model's layers were there


@pytest.mark.timeout(120)
def test_other_models_do_not_use_a_registered_server(tiny_model_path: Path, rpc_server: str) -> None:
    Llama(tiny_model_path, n_ctx=256, rpc_servers=[rpc_server], n_gpu_layers=-1).close()
    # The server stays registered in the process, but a model that did not ask for it runs on
    # the CPU: it still works after the server is gone from its device list.
    with Llama(tiny_model_path, n_ctx=256, n_gpu_layers=-1) as local:
        assert local.generate("a", max_tokens=3, sampling=GREEDY) == "bcd"


def test_bad_endpoints_raise(tiny_model_path: Path) -> None:
    with pytest.raises(InvalidArgumentError, match="an RPC server is 'host:port'"):
        Llama(tiny_model_path, rpc_servers="localhost")
    # A port held by a socket that does not listen: no other process can take it meanwhile.
    with socket.socket() as idle:
        idle.bind(("127.0.0.1", 0))
        endpoint = f"127.0.0.1:{idle.getsockname()[1]}"
        with pytest.raises(LlamaError, match=r"cannot reach the RPC server at 127\.0\.0\.1:"):
            Llama(tiny_model_path, rpc_servers=endpoint)


@pytest.mark.timeout(120)
def test_listing_devices_survives_a_registered_server_that_went_away(tmp_path: Path) -> None:
    """llama.cpp's RPC client aborts the process on a failed call: devices() probes a
    registered server before asking it for its memory, and reports it unavailable. In a
    subprocess, so that a regression fails this test rather than ending the test run."""
    script = f"""
from pathlib import Path
import llama_cpp
from llama_cpp import Llama
from llama_cpp.testing import write_tiny_llama
from rpc_harness import rpc_server

model = write_tiny_llama({str(tmp_path / "tiny.gguf")!r})
with rpc_server(Path({str(tmp_path / "server.log")!r})) as endpoint:
    with Llama(model, n_ctx=64, n_gpu_layers=-1, rpc_servers=[endpoint], verbose=False) as llm:
        llm.complete("a", max_tokens=2)
    alive = [d for d in llama_cpp.devices() if d.description == endpoint]
    assert [d.available for d in alive] == [True], alive
    assert alive[0].memory_total > 0
gone = [d for d in llama_cpp.devices() if d.description == endpoint]
assert [(d.available, d.memory_total) for d in gone] == [(False, 0)], gone
print("alive after", endpoint, "went away")
"""
    env = {**os.environ, "PYTHONPATH": str(Path(__file__).parent)}  # for rpc_harness
    done = subprocess.run(
        [sys.executable, "-c", script], capture_output=True, text=True, timeout=100, check=False, env=env
    )
    assert done.returncode == 0, done.stderr[-3000:]
    assert "alive after" in done.stdout
