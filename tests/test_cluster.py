"""A cluster on 127.0.0.1: `llama-cpp rpc-worker` processes, rpc_servers and split modes, the
abort message of a worker lost mid-generation, and IsolatedPool (and the server's --isolated)
surviving it."""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import re
import signal
import socket
import subprocess
import sys
import textwrap
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

import llama_cpp
from llama_cpp import (
    Cancellation,
    ClosedError,
    ExpertStatsUnavailableError,
    GenerationCancelled,
    InvalidArgumentError,
    IsolatedPool,
    Llama,
    LlamaError,
    ModelLoadError,
    SamplingParams,
    WorkerLostError,
)
from llama_cpp.cluster import is_loopback, rpc_endpoints, unreachable
from llama_cpp.server import ServerSettings
from llama_cpp.testing import TinyMoeSpec, write_tiny_moe
from rpc_harness import ACCEPTED, free_port
from server_harness import KEY, events, serve

GREEDY = SamplingParams.greedy()
RPC_WORKER = [sys.executable, "-m", "llama_cpp", "rpc-worker"]
#: A generation long enough (the tiny llama's whole window from "a": letters that cycle, one
#: RPC round trip per token, seconds in all) to be still running when its worker is killed
#: after its first chunk.
LONG = 4000


class Worker:
    """A `llama-cpp rpc-worker` process on 127.0.0.1 that can be killed and started again on
    the same port."""

    def __init__(self, log: Path, host: str = "127.0.0.1") -> None:
        self.log = log
        self.host = host
        self.port = 0
        self.process: subprocess.Popen[bytes] | None = None

    @property
    def endpoint(self) -> str:
        return f"127.0.0.1:{self.port}"

    def start(self, port: int | None = None) -> None:
        """Start on ``port`` (None: a free one, retried if another process takes it first)."""
        for _ in range(10):
            self.port = port or free_port()
            with self.log.open("w") as log:
                self.process = subprocess.Popen(
                    [*RPC_WORKER, "--host", self.host, "--port", str(self.port), "--threads", "1"],
                    stdout=log,
                    stderr=subprocess.STDOUT,
                )  # fmt: skip
            if self._serving():
                return
            if port is not None:
                time.sleep(0.2)  # the old socket of this port may linger a moment
        pytest.fail(f"rpc-worker could not bind a port in 10 tries:\n{self.log.read_text()}")

    def _serving(self) -> bool:
        assert self.process is not None
        deadline = time.monotonic() + 30
        while self.process.poll() is None and time.monotonic() < deadline:
            with socket.socket() as probe:
                listening = probe.connect_ex(("127.0.0.1", self.port)) == 0
            # Someone listens: the worker, which then logs the probe, or another process that
            # took the port, and then the worker fails to bind it and exits.
            if listening and ACCEPTED in self.log.read_text():
                return True
            time.sleep(0.05)
        self.stop()
        return False

    def kill(self) -> None:
        """SIGKILL the worker itself (ggml-rpc-server, the command's child): a crash."""
        assert self.process is not None
        worker = _child_pid(self.process.pid)
        os.kill(worker, signal.SIGKILL)
        self.process.wait(10)  # the command reports its worker's death and ends

    def stop(self) -> None:
        if self.process is not None and self.process.poll() is None:
            self.process.terminate()  # passed on to the worker
            self.process.wait(10)


def _child_pid(pid: int) -> int:
    children = Path(f"/proc/{pid}/task/{pid}/children").read_text().split()
    assert len(children) == 1, children
    return int(children[0])


@pytest.fixture
def worker(tmp_path: Path) -> Iterator[Worker]:
    w = Worker(tmp_path / "worker.log")
    w.start()
    try:
        yield w
    finally:
        w.stop()


@pytest.fixture(scope="module")
def workers(tmp_path_factory: pytest.TempPathFactory) -> Iterator[list[Worker]]:
    folder = tmp_path_factory.mktemp("workers")
    pair = [Worker(folder / f"worker{i}.log") for i in range(2)]
    try:
        for w in pair:
            w.start()
        yield pair
    finally:
        for w in pair:
            w.stop()


@pytest.fixture(scope="module")
def moe_path(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return write_tiny_moe(tmp_path_factory.mktemp("moe") / "moe.gguf", TinyMoeSpec(expert_scale=0.5))


def _log_text(caplog: pytest.LogCaptureFixture) -> str:
    return "\n".join(r.getMessage() for r in caplog.records)


# -- rpc_servers, split modes ---------------------------------------------------------------


def greedy_16(llm: Llama, prompt: str) -> tuple[str, list[float]]:
    """16 greedy tokens with the end of generation banned (the tiny MoE model would stop after
    a few), and their logprobs."""
    out = llm.create_completion(
        prompt, max_tokens=16, temperature=0, logprobs=1, logit_bias={llm.model.token_eos: -1000.0}
    )
    logprobs = out["choices"][0]["logprobs"]
    assert logprobs is not None
    assert out["usage"]["completion_tokens"] == 16
    return out["choices"][0]["text"], [float(x) for x in logprobs["token_logprobs"] if x is not None]


PROMPTS = ("a", "A", "hello")


@pytest.mark.timeout(120)
def test_two_workers_give_the_local_greedy_output(
    moe_path: Path, workers: list[Worker], caplog: pytest.LogCaptureFixture
) -> None:
    with Llama(moe_path, n_ctx=256, verbose=False) as local:
        expected = [greedy_16(local, p) for p in PROMPTS]
    assert len({text for text, _ in expected}) == 3  # three different answers
    endpoints = [w.endpoint for w in workers]
    for servers in (endpoints, ",".join(endpoints), f" {endpoints[0]} , {endpoints[1]} "):
        caplog.clear()
        with (
            caplog.at_level(logging.INFO, logger="llama_cpp"),
            Llama(moe_path, n_ctx=256, rpc_servers=servers, n_gpu_layers=-1) as remote,
        ):
            log = _log_text(caplog)
            assert "offloaded 5/5 layers to GPU" in log
            for endpoint in endpoints:  # layer split: both workers hold some of the model
                assert re.search(rf"RPC\d+\[{re.escape(endpoint)}\] model buffer size", log), log
            for prompt, (text, logprobs) in zip(PROMPTS, expected, strict=True):
                got_text, got_logprobs = greedy_16(remote, prompt)
                assert got_text == text
                assert got_logprobs == pytest.approx(logprobs, abs=1e-4)
    for w in workers:
        assert ACCEPTED in w.log.read_text()


@pytest.mark.timeout(120)
def test_tensor_split_places_the_model_by_proportion(
    moe_path: Path, workers: list[Worker], caplog: pytest.LogCaptureFixture
) -> None:
    with Llama(moe_path, n_ctx=256, verbose=False) as local:
        expected = greedy_16(local, "hello")[0]
    first, second = (w.endpoint for w in workers)
    with (
        caplog.at_level(logging.INFO, logger="llama_cpp"),
        Llama(moe_path, n_ctx=256, rpc_servers=[first, second], n_gpu_layers=-1, tensor_split=[1, 0]) as llm,
    ):
        log = _log_text(caplog)
        assert re.search(rf"RPC\d+\[{re.escape(first)}\] model buffer size", log), log
        assert not re.search(rf"RPC\d+\[{re.escape(second)}\] model buffer size", log), log
        assert greedy_16(llm, "hello")[0] == expected
    # Row split needs split buffers, which RPC devices do not have: a typed load error.
    with pytest.raises(ModelLoadError, match="does not support split buffers"):
        Llama(moe_path, n_ctx=256, rpc_servers=[first, second], n_gpu_layers=-1, split_mode=2, verbose=False)
    with pytest.raises(InvalidArgumentError, match="split_mode must be 0, 1, 2 or 3"):
        Llama(moe_path, rpc_servers=[first], split_mode=7)


@pytest.mark.timeout(120)
def test_tensor_parallelism_over_two_workers(moe_path: Path, workers: list[Worker]) -> None:
    # llama.cpp's split_mode 3 (tensor) runs with flash attention only: compare with it on.
    with Llama(moe_path, n_ctx=256, flash_attn=True, verbose=False) as local:
        expected = [greedy_16(local, p) for p in PROMPTS]
    servers = [w.endpoint for w in workers]
    with Llama(
        moe_path, n_ctx=256, rpc_servers=servers, n_gpu_layers=-1, split_mode=3, flash_attn=True
    ) as llm:
        for prompt, (text, logprobs) in zip(PROMPTS, expected, strict=True):
            got_text, got_logprobs = greedy_16(llm, prompt)
            assert got_text == text
            assert got_logprobs == pytest.approx(logprobs, abs=1e-4)
    with pytest.raises(InvalidArgumentError, match=r"split_mode=3 \(tensor\) needs flash attention"):
        Llama(moe_path, rpc_servers=servers, n_gpu_layers=-1, split_mode=3)


def test_rpc_endpoints_and_probes() -> None:
    assert rpc_endpoints("a:1, b:2,,") == ["a:1", "b:2"]
    assert rpc_endpoints(["a:1", " b:2 "]) == ["a:1", "b:2"]
    assert rpc_endpoints(None) == []
    with pytest.raises(InvalidArgumentError, match="host:port"):
        rpc_endpoints([1, 2])  # type: ignore[list-item]
    with pytest.raises(InvalidArgumentError, match="an RPC server is 'host:port'"):
        unreachable("localhost")
    with socket.socket() as idle:  # bound, not listening: no other process can take it
        idle.bind(("127.0.0.1", 0))
        endpoint = f"127.0.0.1:{idle.getsockname()[1]}"
        assert unreachable([endpoint], timeout=0.5) == [endpoint]
    assert [is_loopback(h) for h in ("127.0.0.1", "127.1.2.3", "::1", "[::1]", "localhost")] == [True] * 5
    assert [is_loopback(h) for h in ("0.0.0.0", "::", "10.0.0.2", "example.com")] == [False] * 4


@pytest.mark.timeout(60)
def test_an_unreachable_worker_raises_and_the_process_lives(moe_path: Path) -> None:
    with socket.socket() as idle:
        idle.bind(("127.0.0.1", 0))
        endpoint = f"127.0.0.1:{idle.getsockname()[1]}"
        with pytest.raises(LlamaError, match=rf"cannot reach the RPC server at {re.escape(endpoint)}"):
            Llama(moe_path, rpc_servers=endpoint, n_gpu_layers=-1)
        # The same typed error from an isolated pool: its model process reports it.
        with pytest.raises(LlamaError, match=rf"cannot reach the RPC server at {re.escape(endpoint)}"):
            IsolatedPool(moe_path, 1, rpc_servers=[endpoint], n_gpu_layers=-1, verbose=False)
    with Llama(moe_path, n_ctx=64, verbose=False) as llm:  # still here, still working
        assert llm.generate("a", max_tokens=2, sampling=GREEDY)


@pytest.mark.timeout(60)
def test_devices_survive_a_worker_that_is_gone(tiny_model_path: Path, worker: Worker) -> None:
    with Llama(tiny_model_path, n_ctx=64, rpc_servers=worker.endpoint, n_gpu_layers=-1, verbose=False) as llm:
        assert llm.generate("a", max_tokens=3, sampling=GREEDY) == "bcd"
    (listed,) = [d for d in llama_cpp.devices() if d.description == worker.endpoint]
    assert listed.memory_total > 0
    worker.stop()
    # Asking a dead worker for its memory would abort the process: it is not asked.
    (gone,) = [d for d in llama_cpp.devices() if d.description == worker.endpoint]
    assert (gone.memory_free, gone.memory_total) == (0, 0)
    assert gone.name == listed.name


# -- the rpc-worker command ---------------------------------------------------------------


@pytest.mark.timeout(60)
def test_rpc_worker_warns_when_bound_beyond_loopback(tmp_path: Path) -> None:
    port = free_port()
    process = subprocess.Popen(
        [*RPC_WORKER, "--host", "0.0.0.0", "--port", str(port), "-t", "1"],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.PIPE,
        text=True,
    )
    try:
        assert process.stderr is not None
        lines = []
        for line in process.stderr:  # ours first, then the worker's own once it started
            lines.append(line)
            if "Never expose the RPC server" in line:
                break
        text = "".join(lines)
        assert f"WARNING: the RPC worker listens on 0.0.0.0:{port}, beyond this machine" in text
        assert "NO authentication" in text
        assert (
            f"rpc-worker bound to 0.0.0.0:{port}: the RPC protocol has no authentication" in text
        )  # logging
    finally:
        process.terminate()
        process.wait(10)
        if process.stderr is not None:
            process.stderr.close()
    assert process.returncode == 128 + signal.SIGTERM  # the worker ended on the forwarded signal


def test_rpc_worker_rejects_bad_arguments() -> None:
    for argv in (["--port", "0"], ["--port", "70000"], ["--port", "1", "--threads", "0"], []):
        done = subprocess.run(
            [*RPC_WORKER, *argv],
            check=False,
            capture_output=True,
            text=True,
            timeout=30,
        )
        assert done.returncode == 2, (argv, done.stderr)
        assert "usage: llama-cpp rpc-worker" in done.stderr


@pytest.mark.timeout(60)
def test_rpc_worker_serves_a_model_and_its_cache(moe_path: Path, tmp_path: Path) -> None:
    port = free_port()
    cache = tmp_path / "cache"
    log = tmp_path / "w.log"
    with log.open("w") as out:
        process = subprocess.Popen(
            [*RPC_WORKER, "--port", str(port), "-t", "1", "--cache", str(cache), "--device", "CPU"],
            stdout=out,
            stderr=subprocess.STDOUT,
        )  # fmt: skip
    try:
        deadline = time.monotonic() + 30
        while unreachable([f"127.0.0.1:{port}"], timeout=0.2) and time.monotonic() < deadline:
            assert process.poll() is None, log.read_text()
            time.sleep(0.05)
        with Llama(
            moe_path, n_ctx=64, rpc_servers=f"127.0.0.1:{port}", n_gpu_layers=-1, verbose=False
        ) as llm:
            assert llm.generate("a", max_tokens=4, sampling=GREEDY)
        assert (cache / "rpc").is_dir()  # the worker caches in $LLAMA_CACHE/rpc
    finally:
        process.send_signal(signal.SIGINT)
        process.wait(10)
    assert process.returncode == 128 + signal.SIGINT


# -- a worker lost mid-generation ---------------------------------------------------------

IN_PROCESS = textwrap.dedent(
    """
    import logging, sys
    from llama_cpp import Llama, SamplingParams
    logging.basicConfig(level=logging.WARNING, stream=sys.stdout, format="LOGGED %(levelname)s %(message)s")
    llm = Llama(sys.argv[1], n_ctx=4096, rpc_servers=sys.argv[2], n_gpu_layers=-1, verbose=False)
    stream = llm.generate_stream("a", max_tokens=None, sampling=SamplingParams.greedy())
    next(stream)
    print("STREAMING", flush=True)
    sys.stdin.readline()  # the test kills the worker meanwhile
    if sys.argv[3] == "generate":
        for _ in stream:
            pass
    else:  # freeing the model's buffers on the worker is a call to it too
        stream.close()
        llm.close()
    print("FINISHED", flush=True)
    """
)


@pytest.mark.timeout(120)
@pytest.mark.parametrize("then", ["generate", "close"])
def test_in_process_a_lost_worker_is_fatal_but_logged(
    tiny_model_path: Path, worker: Worker, then: str
) -> None:
    # llama.cpp's RPC client aborts the process: fatal in-process, as docs/cluster.md says.
    # The abort message reaches Python logging before the abort.
    app = subprocess.Popen(
        [sys.executable, "-c", IN_PROCESS, str(tiny_model_path), worker.endpoint, then],
        stdin=subprocess.PIPE,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )
    try:
        assert app.stdout is not None
        assert app.stdin is not None
        assert app.stdout.readline() == "STREAMING\n"
        worker.kill()
        with contextlib.suppress(BrokenPipeError):  # (if it already died: a failure below)
            app.stdin.write("go\n")
            app.stdin.flush()
        out, err = app.communicate(timeout=60)
    finally:
        if app.poll() is None:
            app.kill()
            app.wait()
    assert app.returncode == -signal.SIGABRT, (out, err)
    assert "FINISHED" not in out
    assert re.search(
        r"LOGGED ERROR ggml_abort: .*Remote RPC server crashed or returned malformed response", out
    ), (
        out,
        err,
    )


@pytest.mark.timeout(180)
def test_isolated_pool_survives_a_worker_lost_mid_stream(
    tiny_model_path: Path, worker: Worker, caplog: pytest.LogCaptureFixture
) -> None:
    with Llama(tiny_model_path, n_ctx=256, verbose=False) as local:
        expected = local.generate("hello", max_tokens=16, sampling=GREEDY)
    assert len(expected) == 16
    caplog.set_level(logging.INFO, logger="llama_cpp")
    with IsolatedPool(
        tiny_model_path, 2, n_ctx=4096, rpc_servers=worker.endpoint, n_gpu_layers=-1, ready_timeout=60
    ) as pool:
        assert "offloaded 3/3 layers to GPU" in _log_text(caplog)  # the child's log, relayed
        assert pool.generate("hello", max_tokens=16, sampling=GREEDY) == expected
        first_pid = pool.pid
        stream = pool.generate_stream("a", max_tokens=None, sampling=GREEDY)
        assert next(stream)
        worker.kill()
        with pytest.raises(WorkerLostError, match=r"the model's process died \(exit code -6\)"):
            for _ in stream:
                pass
        # The child's last words, relayed to this process's logging before it aborted.
        assert re.search(r"ggml_abort: .*Remote RPC server crashed", _log_text(caplog))
        deadline = time.monotonic() + 10
        while pool.alive and time.monotonic() < deadline:
            time.sleep(0.05)
        assert not pool.alive
        assert pool.restarts == 0
        worker.start(worker.port)
        assert pool.generate("hello", max_tokens=16, sampling=GREEDY) == expected  # waits for the reload
        assert pool.restarts == 1
        assert pool.pid != first_pid
        assert "the isolated model is loaded again (restart 1)" in _log_text(caplog)


@pytest.mark.timeout(120)
def test_isolated_pool_has_the_request_api(tiny_model_path: Path) -> None:
    with Llama(tiny_model_path, n_ctx=256, verbose=False) as local:
        completion = local.create_completion("a", max_tokens=8, temperature=0, logprobs=2)
        chat = local.create_chat_completion([{"role": "user", "content": "hi"}], max_tokens=8, temperature=0)
    with IsolatedPool(tiny_model_path, 2, n_ctx=256, verbose=False) as pool:
        got = pool.create_completion("a", max_tokens=8, temperature=0, logprobs=2)
        assert got["choices"] == completion["choices"]
        assert got["usage"] == completion["usage"]
        got_chat = pool.create_chat_completion(
            [{"role": "user", "content": "hi"}], max_tokens=8, temperature=0
        )
        assert got_chat["choices"] == chat["choices"]
        pieces = list(pool.generate_stream("a", max_tokens=8, sampling=GREEDY))
        assert "".join(pieces) == local_text(tiny_model_path, "a", 8)
        # Leaving a stream early cancels the request in the child; the pool goes on.
        stream = pool.submit("a", max_tokens=LONG)
        assert stream.next() is not None
        stream.close()
        stats = pool.stats()
        assert stats.n_slots == 2
        assert stats.queue_time_buckets[-1][1] == 4  # the four requests so far, each admitted once
        # What the child's engine reports comes across: the stop string, the wait for a slot,
        # the memory by device.
        stopped = pool.submit("a", max_tokens=20, sampling=GREEDY, stop=["de"])
        assert "".join(chunk.text for chunk in iter(stopped.next, None)) == "bc"
        assert stopped.stop_sequence == "de"
        assert stopped.queue_seconds is not None
        assert pool.complete("a", max_tokens=20, sampling=GREEDY, stop=["de"]).stop_sequence == "de"
        assert pool.memory_breakdown()["CPU"]["model"] > 0
        with pytest.raises(ExpertStatsUnavailableError, match="child process"):
            pool.expert_stats()
        with pytest.raises(TypeError, match="unexpected keyword"):
            pool.create_completion("a", lora={})
        with pytest.raises(InvalidArgumentError, match="Python hooks"):
            pool.create_completion("a", logits_processor=[lambda ids, scores: scores])
        with pytest.raises(InvalidArgumentError, match="no embeddings"):
            pool.create_embedding("a")
        assert pool.tokenize("a") == local_tokens(tiny_model_path, "a")
        pid = pool.pid
    assert pid is not None
    with pytest.raises(ProcessLookupError):  # the child is gone once closed
        os.kill(pid, 0)


@pytest.mark.timeout(120)
def test_isolated_pool_cancellation_reaches_the_child(tiny_model_path: Path, worker: Worker) -> None:
    with IsolatedPool(
        tiny_model_path, 1, n_ctx=4096, rpc_servers=worker.endpoint, n_gpu_layers=-1, verbose=False
    ) as pool:
        cancelled = Cancellation()
        cancelled.cancel()
        with pytest.raises(GenerationCancelled):  # as a LlamaPool treats it
            pool.complete("a", max_tokens=4, cancellation=cancelled)
        cancellation = Cancellation()
        stream = pool.create_completion("a", max_tokens=None, stream=True, cancellation=cancellation)
        assert next(stream)
        cancellation.cancel()
        with pytest.raises(GenerationCancelled):
            for _ in stream:
                pass
        # The one slot is free again: a request after it runs.
        assert pool.generate("a", max_tokens=3, sampling=GREEDY) == local_text(tiny_model_path, "a", 3)


@pytest.mark.timeout(120)
def test_isolated_pool_async_and_close(tiny_model_path: Path, worker: Worker) -> None:
    expected = local_text(tiny_model_path, "a", 6)

    async def main(pool: IsolatedPool) -> None:
        assert await pool.generate_async("a", max_tokens=6, sampling=GREEDY) == expected
        stream = await pool.create_completion_async("a", max_tokens=None, stream=True)
        async for _ in stream:
            break  # leaving early cancels the request in the child
        assert await pool.generate_async("a", max_tokens=6, sampling=GREEDY) == expected

    pool = IsolatedPool(
        tiny_model_path, 1, n_ctx=4096, rpc_servers=worker.endpoint, n_gpu_layers=-1, verbose=False
    )
    try:
        asyncio.run(main(pool))
        running = pool.submit("a", max_tokens=None, sampling=GREEDY)
        assert running.next() is not None
    finally:
        pool.close()
        pool.close()  # idempotent
    with pytest.raises(ClosedError):  # a request running when the pool closed
        for _ in iter(running.next, None):
            pass
    with pytest.raises(ClosedError):
        pool.generate("a", max_tokens=2)


def local_text(path: Path, prompt: str, n: int) -> str:
    with Llama(path, n_ctx=256, verbose=False) as llm:
        return llm.generate(prompt, max_tokens=n, sampling=GREEDY)


def local_tokens(path: Path, text: str) -> list[int]:
    with Llama(path, vocab_only=True, verbose=False) as llm:
        return llm.tokenize(text)


@pytest.mark.timeout(180)
def test_server_isolated_answers_503_and_recovers(tiny_model_path: Path, worker: Worker) -> None:
    settings = ServerSettings(
        model=tiny_model_path,
        alias="moe",
        isolated=True,
        parallel=1,
        ctx_size=256,
        api_keys=[KEY],
        options={"rpc_servers": worker.endpoint, "n_gpu_layers": -1, "verbose": False},
    )
    body = {"model": "moe", "prompt": "hello", "max_tokens": 8, "temperature": 0}
    with serve(settings) as server:
        ok = server.http.post("/v1/completions", json=body)
        assert ok.status_code == 200, ok.text
        # The worker dies while the model is idle: the next request's decode finds it gone,
        # and the model process aborts under it.
        worker.kill()
        lost = server.http.post("/v1/completions", json=body)
        assert lost.status_code == 503, lost.text
        error = lost.json()["error"]
        assert error["type"] == "server_error"
        assert error["code"] == "worker_lost"
        assert "the model's process died" in error["message"]
        # While the model is down (its worker is gone, so no reload yet), the server's own
        # endpoints still answer: metrics without that model's engine figures, memory without it.
        scrape = server.http.get("/metrics")
        assert scrape.status_code == 200, scrape.text
        assert 'llamacpp_slots{model="moe"} 1.0' in scrape.text
        assert 'llamacpp_queue_time_seconds_count{model="moe"}' not in scrape.text
        memory = server.http.get("/api/v1/memory")
        assert memory.status_code == 200, memory.text
        assert "moe" not in memory.json()["per_model"]
        worker.start(worker.port)
        again = server.http.post("/v1/completions", json=body)  # waits for the reload
        assert again.status_code == 200, again.text
        assert again.json()["choices"][0]["text"] == ok.json()["choices"][0]["text"]
        # A streamed answer has started (200) before its first chunk: the loss reaches the
        # client as OpenAI's mid-stream error event, before [DONE].
        worker.kill()
        with server.http.stream("POST", "/v1/completions", json={**body, "stream": True}) as streamed:
            assert streamed.status_code == 200
            got = list(events(streamed.iter_lines()))
        assert got[-1]["error"]["code"] == "worker_lost", got
        assert got[-1]["error"]["type"] == "server_error"
        worker.start(worker.port)
        assert server.http.post("/v1/completions", json=body).status_code == 200
