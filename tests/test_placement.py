"""Placement, memory accounting, fitting and NUMA on a tiny MoE model.

A ggml-rpc-server on 127.0.0.1 stands in for the GPU: with ``n_gpu_layers=-1`` every layer is
offloaded to its device, and the overrides bring expert tensors back to the CPU. The bytes
``memory_breakdown()`` reports are compared with the tensor sizes of the GGUF file.
"""

from __future__ import annotations

import re
import subprocess
import sys
import textwrap
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import gguf
import pytest

import llama_cpp
from llama_cpp import (
    InvalidArgumentError,
    Llama,
    LlamaPool,
    ModelLoadError,
    SamplingParams,
    plan_fit,
)
from llama_cpp.cli import main as cli_main
from llama_cpp.server import ServerSettings
from llama_cpp.testing import write_tiny_moe
from llama_cpp.testing.tiny_moe import TinyMoeSpec
from rpc_harness import rpc_server
from server_harness import serve

GREEDY = SamplingParams.greedy()
SPEC = TinyMoeSpec(expert_scale=0.5)  # the experts change the output
EXPERTS = re.compile(r"^blk\.(\d+)\.ffn_(gate|up|down)_exps\.weight$")


@pytest.fixture(scope="module")
def moe_path(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return write_tiny_moe(tmp_path_factory.mktemp("moe") / "moe.gguf", SPEC)


@pytest.fixture(scope="module")
def tensor_bytes(moe_path: Path) -> dict[str, int]:
    return {t.name: int(t.n_bytes) for t in gguf.GGUFReader(moe_path).tensors}


def expert_bytes(tensor_bytes: dict[str, int], layers: range) -> int:
    return sum(n for name, n in tensor_bytes.items() if (m := EXPERTS.match(name)) and int(m[1]) in layers)


# Session-scoped: llama.cpp keeps a registered RPC device for the whole process, and querying
# the device of a server that is gone (llama_cpp.devices() in a later module) aborts it.
@pytest.fixture(scope="session")
def endpoint(tmp_path_factory: pytest.TempPathFactory) -> Iterator[str]:
    with rpc_server(tmp_path_factory.mktemp("rpc") / "server.log") as address:
        yield address


@dataclass(frozen=True)
class Rpc:
    endpoint: str  # host:port
    device: str  # its device's name in llama_cpp.devices()


@pytest.fixture(scope="module")
def rpc(endpoint: str, moe_path: Path) -> Rpc:
    Llama(moe_path, n_ctx=64, rpc_servers=[endpoint], verbose=False).close()  # registers it
    return Rpc(endpoint, next(d.name for d in llama_cpp.devices() if d.description == endpoint))


@pytest.fixture(scope="module")
def local_text(moe_path: Path) -> str:
    with Llama(moe_path, n_ctx=128, verbose=False) as llm:
        return llm.generate("abc", max_tokens=12, sampling=GREEDY)


def offloaded(moe_path: Path, endpoint: str, **options: Any) -> Llama:
    # Read into memory (no mmap): a mapped CPU buffer spans the file between its tensors.
    return Llama(
        moe_path, n_ctx=128, rpc_servers=[endpoint], n_gpu_layers=-1, use_mmap=False, verbose=False, **options
    )


@pytest.mark.timeout(120)
@pytest.mark.parametrize("k", [0, 1, 3])
def test_n_cpu_moe_puts_exactly_the_first_layers_experts_on_the_cpu(
    moe_path: Path, rpc: Rpc, tensor_bytes: dict[str, int], local_text: str, k: int
) -> None:
    with offloaded(moe_path, rpc.endpoint) as base:
        before = base.memory_breakdown()
    with offloaded(moe_path, rpc.endpoint, n_cpu_moe=k) as llm:
        after = llm.memory_breakdown()
        assert llm.generate("abc", max_tokens=12, sampling=GREEDY) == local_text
    moved = expert_bytes(tensor_bytes, range(k))
    assert before["CPU"]["model"] == tensor_bytes["token_embd.weight"]  # the input layer stays
    assert after["CPU"]["model"] - before["CPU"]["model"] == moved
    assert before[rpc.device]["model"] - after[rpc.device]["model"] == moved
    assert after[rpc.device]["context"] == before[rpc.device]["context"] > 0  # the KV cache stays


@pytest.mark.timeout(120)
def test_cpu_moe_puts_every_expert_on_the_cpu(
    moe_path: Path, rpc: Rpc, tensor_bytes: dict[str, int], local_text: str
) -> None:
    with offloaded(moe_path, rpc.endpoint, cpu_moe=True) as llm:
        memory = llm.memory_breakdown()
        assert llm.generate("abc", max_tokens=12, sampling=GREEDY) == local_text
    experts = expert_bytes(tensor_bytes, range(SPEC.n_layer))
    assert memory["CPU"]["model"] == tensor_bytes["token_embd.weight"] + experts
    rest = sum(tensor_bytes.values()) - tensor_bytes["token_embd.weight"] - experts
    assert memory[rpc.device]["model"] == rest


@pytest.mark.timeout(120)
def test_tensor_overrides_place_what_the_regex_finds_on_the_named_device(
    moe_path: Path, rpc: Rpc, tensor_bytes: dict[str, int], local_text: str
) -> None:
    # Nothing offloaded by layer: only the overridden tensor goes to the RPC device.
    with Llama(
        moe_path,
        n_ctx=128,
        rpc_servers=[rpc.endpoint],
        n_gpu_layers=0,
        use_mmap=False,
        verbose=False,
        tensor_overrides=[(r"blk\.3\.ffn_down", rpc.device)],
    ) as llm:
        memory = llm.memory_breakdown()
        assert llm.generate("abc", max_tokens=12, sampling=GREEDY) == local_text
    assert memory[rpc.device]["model"] == tensor_bytes["blk.3.ffn_down_exps.weight"]
    # llama.cpp's --override-tensor names an RPC server's device by its buffer type: its
    # index within that server, then the endpoint.
    with Llama(
        moe_path,
        n_ctx=128,
        rpc_servers=[rpc.endpoint],
        n_gpu_layers=0,
        use_mmap=False,
        verbose=False,
        tensor_overrides=f"blk\\.3\\.ffn_down=RPC0[{rpc.endpoint}]",
    ) as llm:
        assert llm.memory_breakdown()[rpc.device]["model"] == tensor_bytes["blk.3.ffn_down_exps.weight"]
    # The first matching pair wins; llama.cpp's string form works too.
    with offloaded(
        moe_path, rpc.endpoint, tensor_overrides=r"blk\.[01]\.ffn_(gate|up)_exps=CPU,blk\.[01]\.=CPU"
    ) as llm:
        memory = llm.memory_breakdown()
    on_cpu = [name for name in tensor_bytes if re.search(r"blk\.[01]\.", name)]
    assert memory["CPU"]["model"] == tensor_bytes["token_embd.weight"] + sum(tensor_bytes[n] for n in on_cpu)


def test_bad_overrides_raise_before_loading(moe_path: Path) -> None:
    loads: list[float] = []

    def progress(fraction: float) -> bool:
        loads.append(fraction)
        return True

    bad = re.escape(r"tensor_overrides: invalid regex 'blk\.(0': ")
    with pytest.raises(InvalidArgumentError, match=bad):
        Llama(moe_path, tensor_overrides=[(r"blk\.(0", "CPU")], progress_callback=progress)
    with pytest.raises(
        InvalidArgumentError, match=r"tensor_overrides: unknown device 'CUDA7' \(devices: CPU"
    ):
        Llama(moe_path, tensor_overrides=[("exps", "CUDA7")], progress_callback=progress)
    with pytest.raises(InvalidArgumentError, match="n_cpu_moe must be an integer >= 0, got -1"):
        Llama(moe_path, n_cpu_moe=-1)
    with pytest.raises(InvalidArgumentError, match="tensor override 'exps' is not REGEX=DEVICE"):
        Llama(moe_path, tensor_overrides="exps")
    with pytest.raises(InvalidArgumentError, match=r"\(regex, device\) pairs of str, got \('exps',\)"):
        LlamaPool(moe_path, tensor_overrides=[("exps",)])
    with pytest.raises(InvalidArgumentError, match="unknown device 'GPU'"):
        LlamaPool(moe_path, tensor_overrides=[("exps", "GPU")], progress_callback=progress)
    assert loads == []


def test_memory_breakdown_on_the_cpu(moe_path: Path, tensor_bytes: dict[str, int]) -> None:
    with Llama(moe_path, n_ctx=256, use_mmap=False, verbose=False) as llm:
        memory = llm.memory_breakdown()
        assert set(memory) == {"CPU"}
        assert set(memory["CPU"]) == {"model", "context", "compute"}
        assert memory["CPU"]["model"] == sum(tensor_bytes.values())
        # f16 K and V of every layer for 256 cells: 2 * n_layer * 256 * n_embd_k_gqa * 2 bytes.
        n_embd_kv = SPEC.n_embd  # as many KV heads as heads
        assert memory["CPU"]["context"] == 2 * SPEC.n_layer * 256 * n_embd_kv * 2
        assert memory["CPU"]["compute"] > 0
    with LlamaPool(moe_path, 2, n_ctx=256, use_mmap=False, verbose=False) as pool:
        pooled = pool.memory_breakdown()
        assert pooled["CPU"]["model"] == memory["CPU"]["model"]
        assert pooled["CPU"]["context"] == 2 * memory["CPU"]["context"]  # two sequences of 256
    with pytest.raises(llama_cpp.ClosedError):
        pool.memory_breakdown()
    with pytest.raises(llama_cpp.ClosedError):
        llm.memory_breakdown()


def test_plan_fit_without_an_accelerator(moe_path: Path, tensor_bytes: dict[str, int]) -> None:
    plan = plan_fit(moe_path, n_ctx=0, use_mmap=False, verbose=False)
    assert plan.status == "success"
    assert (plan.n_layer, plan.n_ctx_train, plan.n_expert) == (
        SPEC.n_layer,
        SPEC.context_length,
        SPEC.n_expert,
    )
    assert plan.n_ctx == SPEC.context_length  # n_ctx=0: the training context, which fits
    assert plan.tensor_overrides == ()
    assert [d.name for d in plan.devices] == ["CPU"]
    assert plan.devices[0].model == sum(tensor_bytes.values())
    assert plan.devices[0].free > 0
    no_gpu = "no accelerator device: the model stays in host memory"
    assert plan.reason == f"{no_gpu}; n_ctx={SPEC.context_length}: the training context"
    assert plan_fit(moe_path, n_ctx=96, verbose=False).n_ctx == 96  # a size given is kept
    # The overrides given are kept (llama.cpp's fit leaves them to the user).
    assert plan_fit(moe_path, n_cpu_moe=2, verbose=False).tensor_overrides == (
        (r"blk\.0\.ffn_(up|down|gate|gate_up)_(ch|)exps", "CPU"),
        (r"blk\.1\.ffn_(up|down|gate|gate_up)_(ch|)exps", "CPU"),
    )

    with Llama(moe_path, n_ctx=0, fit=True, verbose=False) as llm:
        assert llm.fit_plan is not None
        assert llm.n_ctx() == llm.fit_plan.n_ctx == SPEC.context_length
    with LlamaPool(moe_path, 2, n_ctx=0, fit=True, verbose=False) as pool:
        assert pool.fit_plan is not None
        # n_ctx=0 in a pool that fits: the training context for each sequence (its own stream
        # of cells), as llama.cpp's fit extends it when memory allows.
        assert pool.n_ctx() == pool.fit_plan.n_ctx == SPEC.context_length
        assert pool.fit_plan.reason.endswith(
            f"n_ctx={SPEC.context_length} for each of 2 sequences: the training context"
        )
    with LlamaPool(moe_path, 2, n_ctx=0, fit=True, kv_unified=True, verbose=False) as pool:
        assert pool.fit_plan is not None
        # ... and with one unified cache, the training context shared by the sequences.
        assert pool.n_ctx() == pool.fit_plan.n_ctx == SPEC.context_length // 2
        assert pool.fit_plan.reason.endswith(
            f"n_ctx={SPEC.context_length // 2} for each of 2 sequences: the training context"
        )
    with Llama(moe_path, n_ctx=64, verbose=False) as llm:
        assert llm.fit_plan is None


def test_plan_fit_errors(tmp_path: Path, moe_path: Path) -> None:
    with pytest.raises(ModelLoadError, match="model file not found"):
        plan_fit(tmp_path / "missing.gguf")
    with pytest.raises(InvalidArgumentError, match="invalid regex"):
        plan_fit(moe_path, tensor_overrides=[("[", "CPU")])
    with pytest.raises(TypeError, match="unexpected keyword arguments \\['n_cxt'\\]"):
        plan_fit(moe_path, n_cxt=0)


NUMA_SCRIPT = """
import sys, llama_cpp
from llama_cpp import InvalidArgumentError, Llama
path = sys.argv[1]
assert llama_cpp._core.numa_strategy() is None
Llama(path, n_ctx=64, numa=True, verbose=False).close()
assert llama_cpp._core.numa_strategy() == "distribute"
Llama(path, n_ctx=64, numa="distribute", verbose=False).close()  # the same again: fine
Llama(path, n_ctx=64, verbose=False).close()  # none asked: fine
try:
    Llama(path, n_ctx=64, numa="isolate", verbose=False)
except InvalidArgumentError as error:
    print(error)
"""


@pytest.mark.timeout(120)
def test_numa_is_set_once_per_process(moe_path: Path) -> None:
    done = subprocess.run(
        [sys.executable, "-c", textwrap.dedent(NUMA_SCRIPT), str(moe_path)],
        capture_output=True,
        text=True,
        timeout=100,
        check=False,
    )
    assert done.returncode == 0, done.stderr
    assert done.stdout.strip() == (
        "the NUMA strategy is set once per process: it is 'distribute', so numa='isolate' cannot take effect"
    )
    with pytest.raises(InvalidArgumentError, match="numa must be one of"):
        Llama(moe_path, numa="everywhere")


def test_cli_flags(moe_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    argv = ["generate", "-m", str(moe_path), "-c", "128", "--temperature", "0", "-n", "12"]
    assert cli_main([*argv, "--n-cpu-moe", "2", "-ot", r"blk\.3\.ffn_down_exps=CPU", "abc"]) == 0
    assert cli_main([*argv, "--override-tensor", r"exps=NOPE", "abc"]) == 1
    assert "unknown device 'NOPE'" in capsys.readouterr().err


@pytest.mark.timeout(120)
def test_server_memory_per_model_and_device(moe_path: Path) -> None:
    settings = ServerSettings(
        model=moe_path, alias="moe", options={"n_cpu_moe": 2, "use_mmap": False}, parallel=2, ctx_size=128
    )
    with serve(settings) as server:
        memory = server.http.get("/api/v1/memory").json()
    assert memory["models"] == ["moe"]
    assert memory["rss_bytes"] > 0
    per_device = memory["per_model"]["moe"]
    assert set(per_device) == {"CPU"}
    assert set(per_device["CPU"]) == {"model", "context", "compute"}
    assert all(isinstance(v, int) and v > 0 for v in per_device["CPU"].values())
    assert memory["devices"] == per_device
