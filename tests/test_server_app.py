"""The server as a process (``python -m llama_cpp.server``, SIGTERM), as an app mounted in
another, and fuzzed from its OpenAPI schema; all on the suite's tiny model."""

from __future__ import annotations

import asyncio
import contextlib
import logging
import re
import signal
import subprocess
import sys
import time
import types
from collections import Counter
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import httpx
import pytest
import schemathesis
from fastapi import FastAPI
from hypothesis import HealthCheck, given, settings
from schemathesis.core.result import Ok

from llama_cpp.server import ModelSettings, ServerSettings, create_app, load_settings
from llama_cpp.testing import write_tiny_moe

ROOT = Path(__file__).resolve().parent.parent


@pytest.mark.timeout(120)
def test_the_command_serves_and_stops_on_sigterm(tiny_model_path: Path) -> None:
    process = subprocess.Popen(
        [sys.executable, "-m", "llama_cpp.server", "--model", str(tiny_model_path), "--alias", "tiny",
         "--port", "0", "--parallel", "1", "--ctx-size", "128", "--api-key", "k", "--kv-unified"],
        cwd=ROOT, stderr=subprocess.PIPE, text=True,
    )  # fmt: skip
    try:
        assert process.stderr is not None
        url = None
        for line in process.stderr:  # uvicorn logs the port the kernel gave it
            match = re.search(r"Uvicorn running on (http://127\.0\.0\.1:\d+)", line)
            if match:
                url = match.group(1)
                break
        assert url, "the server did not start"
        deadline = time.monotonic() + 60
        while (health := httpx.get(f"{url}/health", timeout=10)).status_code != 200:
            assert health.json() == {"status": "loading"}
            assert time.monotonic() < deadline, "the model did not load"
            time.sleep(0.02)
        answer = httpx.post(
            f"{url}/v1/completions",
            json={"prompt": "A", "max_tokens": 3, "temperature": 0},
            headers={"Authorization": "Bearer k"},
            timeout=30,
        )
        assert answer.status_code == 200, answer.text
        assert answer.json()["model"] == "tiny"
        process.send_signal(signal.SIGTERM)
        # uvicorn shuts down gracefully (the lifespan closes the pools), then re-raises the
        # signal it caught, so the process ends as killed by SIGTERM.
        assert process.wait(timeout=60) in (0, -signal.SIGTERM)
        rest = process.stderr.read()
        assert "Application shutdown complete" in rest, rest
    finally:
        if process.poll() is None:
            process.kill()
            process.wait()
        if process.stderr is not None:
            process.stderr.close()


def test_mounted_in_another_app(tiny_model_path: Path) -> None:
    server = create_app(ServerSettings(model=tiny_model_path, alias="tiny", parallel=1, ctx_size=128))

    @contextlib.asynccontextmanager
    async def lifespan(app: FastAPI) -> AsyncIterator[None]:
        async with server.router.lifespan_context(server):  # loads, and closes, the models
            yield

    parent = FastAPI(lifespan=lifespan)
    parent.mount("/llm", server)

    async def run() -> None:
        async with parent.router.lifespan_context(parent):
            transport = httpx.ASGITransport(app=parent)
            async with httpx.AsyncClient(transport=transport, base_url="http://app") as client:
                deadline = time.monotonic() + 60
                while (await client.get("/llm/health")).status_code != 200:
                    assert time.monotonic() < deadline, "the model did not load"
                    await asyncio.sleep(0.02)
                answer = await client.post("/llm/v1/completions", json={"prompt": "A", "max_tokens": 3})
                assert answer.status_code == 200, answer.text
                assert answer.json()["choices"][0]["text"]

    asyncio.run(run())


@pytest.mark.timeout(300)
def test_no_5xx_on_requests_generated_from_the_openapi_schema(tiny_model_path: Path) -> None:
    app = create_app(
        ServerSettings(model=tiny_model_path, alias="tiny", parallel=2, ctx_size=128, max_tokens_limit=8)
    )
    schema = schemathesis.openapi.from_asgi("/openapi.json", app)
    failures: list[str] = []
    statuses: Counter[int] = Counter()
    operations = []
    for result in schema.get_all_operations():
        assert isinstance(result, Ok), result  # the schema is valid
        operations.append(result.ok())
    assert len(operations) >= 12

    for operation in operations:

        @given(case=operation.as_strategy())
        @settings(max_examples=25, deadline=None, suppress_health_check=list(HealthCheck), database=None)
        def check(case: schemathesis.Case[Any]) -> None:
            response = case.call()
            statuses[response.status_code] += 1
            if response.status_code >= 500:
                failures.append(
                    f"{case.method} {case.path} {case.body!r}: {response.status_code} {response.text}"
                )

        check()
    assert not failures, "\n".join(failures[:5])
    assert statuses[200] > 0, statuses  # valid requests were sent, and invalid ones
    assert statuses[400] > 0, statuses


def _readme_server_blocks(language: str) -> list[str]:
    readme = (ROOT / "README.md").read_text(encoding="utf-8")
    section = readme[readme.index("## Server\n") : readme.index("## Integrations\n")]
    return re.findall(rf"```{language}\n(.*?)```", section, re.S)


def test_the_readme_mount_example_and_config_work(default_model_path: Path, tmp_path: Path) -> None:
    from fastapi.testclient import TestClient

    mount = next(block for block in _readme_server_blocks("python") if "app.mount" in block)
    namespace: dict[str, Any] = {}
    exec(compile(mount, "README.md", "exec"), namespace)  # the repository root is the cwd of the suite
    with TestClient(namespace["app"]) as client:
        deadline = time.monotonic() + 60
        while client.get("/llm/health").status_code != 200:
            assert time.monotonic() < deadline, "the model did not load"
            time.sleep(0.02)
        assert client.get("/llm/health").json() == {"status": "ok"}
        assert [m["id"] for m in client.get("/llm/v1/models").json()["data"]] == ["gemma"]
    (toml,) = _readme_server_blocks("toml")
    config = tmp_path / "server.toml"
    config.write_text(toml)
    loaded = load_settings(config, environ={})
    assert (loaded.alias, loaded.parallel, loaded.models_max) == ("gemma", 8, 2)
    assert loaded.models["small"].options == {"n_gpu_layers": 0}
    assert loaded.models["rerank"].kind == "reranker"


def test_translator_routers_are_mounted_with_the_chat_call(
    tiny_model_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A module named like the Anthropic translator gets the app's ChatCall and CountTokens."""
    from fastapi import APIRouter
    from fastapi.testclient import TestClient

    from llama_cpp.server.chat_call import ChatCall, CountTokens

    def anthropic_router(chat: ChatCall, count_tokens: CountTokens) -> APIRouter:
        router = APIRouter()

        @router.post("/v1/fake")
        async def fake() -> dict[str, Any]:
            messages = [{"role": "user", "content": "A"}]
            answer = await chat(None, messages, {"max_tokens": 3, "temperature": 0}, False)
            assert isinstance(answer, dict)
            chunks = await chat(
                "tiny", messages, {"max_tokens": 3, "stream_options": {"include_usage": True}}, True
            )
            assert not isinstance(chunks, dict)
            streamed = [chunk async for chunk in chunks]
            return {
                "answer": answer["object"],
                "n_chunks": len(streamed),
                "usage_last": streamed[-1]["choices"] == [] and "usage" in streamed[-1],
                "count": await count_tokens("tiny", messages, {}),
            }

        return router

    module = types.ModuleType("llama_cpp.server.anthropic")
    module.anthropic_router = anthropic_router  # type: ignore[attr-defined]
    monkeypatch.setitem(sys.modules, "llama_cpp.server.anthropic", module)
    app = create_app(ServerSettings(model=tiny_model_path, alias="tiny", parallel=1, ctx_size=128))
    with TestClient(app) as client:
        body = client.post("/v1/fake").json()
    assert body["answer"] == "chat.completion"
    assert body["n_chunks"] >= 2
    assert body["usage_last"] is True
    assert body["count"] > 1


def test_the_registry_unloads_before_it_loads(tiny_model_path: Path) -> None:
    """At most models_max resident, also while the next model loads (peak memory)."""
    from llama_cpp.server import ModelSettings, ServerSettings
    from llama_cpp.server.registry import ModelRegistry

    tiny = ModelSettings(path=tiny_model_path, parallel=1, ctx_size=128)
    registry = ModelRegistry(ServerSettings(models={"a": tiny, "b": tiny}, models_max=1))

    async def main() -> list[list[str]]:
        seen = []
        async with registry.lease("a"):
            seen.append(list(registry.loaded()))
        async with registry.lease("b"):
            seen.append(list(registry.loaded()))
        await registry.close()
        return seen

    assert asyncio.run(main()) == [["a"], ["b"]]


def test_expert_stats_per_model(tmp_path: Path, tiny_model_path: Path) -> None:
    moe = write_tiny_moe(tmp_path / "moe.gguf")
    settings = ServerSettings(
        model=moe,
        alias="moe",
        parallel=2,
        ctx_size=64,
        profile_experts=True,  # --profile-experts: every generating model, the dense one too
        models={"dense": ModelSettings(path=tiny_model_path)},
    )
    app = create_app(settings)

    async def run() -> None:
        async with app.router.lifespan_context(app):
            transport = httpx.ASGITransport(app=app)
            async with httpx.AsyncClient(transport=transport, base_url="http://app") as client:
                deadline = time.monotonic() + 60
                while (await client.get("/health")).status_code != 200:
                    assert time.monotonic() < deadline, "the model did not load"
                    await asyncio.sleep(0.02)
                for model in ("moe", "dense"):
                    body = {"model": model, "prompt": "ABC", "max_tokens": 3, "temperature": 0}
                    assert (await client.post("/v1/completions", json=body)).status_code == 200
                stats = (await client.get("/api/v1/expert-stats", params={"reset": "true"})).json()
                assert stats["available"] is True
                assert set(stats["models"]) == {"moe", "dense"}
                dense = (
                    "the model has no experts to profile (a dense model: llama.expert_count is missing or 0)"
                )
                assert stats["models"]["dense"] == {"available": False, "reason": dense}
                entry = stats["models"]["moe"]
                assert entry["available"] is True
                assert (entry["n_expert"], entry["n_expert_used"], entry["layers"]) == (8, 2, [0, 1, 2, 3])
                assert entry["tokens"][0] > entry["tokens"][3] > 0
                assert [sum(row) for row in entry["counts"]] == [2 * n for n in entry["tokens"]]
                assert set(entry["cache"]) == {"capacity", "static-hot"}  # no trace asked for
                # reset=true started the counts again.
                again = (await client.get("/api/v1/expert-stats")).json()["models"]["moe"]
                assert (again["layers"], again["counts"]) == ([], [])

    asyncio.run(run())


def test_expert_stats_simulations_are_opt_in_and_reset_is_atomic(tmp_path: Path) -> None:
    moe = write_tiny_moe(tmp_path / "moe.gguf")
    traced = ModelSettings(path=moe, options={"profile_experts_trace": 64})
    settings = ServerSettings(parallel=1, ctx_size=64, profile_experts=True, models={"traced": traced})
    app = create_app(settings)

    async def run() -> None:
        async with app.router.lifespan_context(app):
            transport = httpx.ASGITransport(app=app)
            async with httpx.AsyncClient(transport=transport, base_url="http://app") as client:
                body = {"model": "traced", "prompt": "ABC", "max_tokens": 3, "temperature": 0}
                assert (await client.post("/v1/completions", json=body)).status_code == 200

                async def get(**params: str) -> dict[str, Any]:
                    response = await client.get("/api/v1/expert-stats", params=params)
                    assert response.status_code == 200, response.text
                    entry: dict[str, Any] = response.json()["models"]["traced"]
                    return entry

                # Default: static-hot alone, from the counts; the trace is not replayed.
                assert set((await get())["cache"]) == {"capacity", "static-hot"}
                assert (await get(simulate=""))["cache"] == {"capacity": 2}
                asked = await get(simulate="lru,lfu", capacity="3")
                assert set(asked["cache"]) == {"capacity", "lru", "lfu"}
                assert asked["cache"]["capacity"] == 3
                assert 0 < asked["cache"]["lfu"]["hit_rate"] < 1
                bad = await client.get("/api/v1/expert-stats", params={"simulate": "fifo"})
                assert bad.status_code == 400
                assert "'fifo' is not a policy (lru, lfu, static-hot)" in bad.json()["error"]["message"]
                assert (await client.get("/api/v1/expert-stats", params={"capacity": "0"})).status_code == 400
                # reset=true: this answer has every token so far, the next one none.
                before = await get(reset="true")
                assert before["tokens"][0] > 0
                after = await get()
                assert (after["layers"], after["counts"], after["trace_total"]) == ([], [], 0)

    asyncio.run(run())


@pytest.mark.timeout(120)
def test_isolated_models_are_not_profiled(tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    moe = write_tiny_moe(tmp_path / "moe.gguf")
    settings = ServerSettings(
        model=moe, alias="moe", parallel=1, ctx_size=64, profile_experts=True, isolated=True
    )
    app = create_app(settings)

    async def run() -> dict[str, Any]:
        async with app.router.lifespan_context(app):
            transport = httpx.ASGITransport(app=app)
            async with httpx.AsyncClient(transport=transport, base_url="http://app") as client:
                deadline = time.monotonic() + 60
                while (await client.get("/health")).status_code != 200:
                    assert time.monotonic() < deadline, "the model did not load"
                    await asyncio.sleep(0.05)
                stats: dict[str, Any] = (await client.get("/api/v1/expert-stats")).json()
                return stats

    with caplog.at_level(logging.INFO, logger="llama_cpp.server"):
        stats = asyncio.run(run())
    # Loaded (IsolatedPool refuses profile_experts=True), without the profiler.
    assert stats["models"]["moe"] == {
        "available": False,
        "reason": "an isolated pool's model runs in a child process: its expert routing is not profiled",
    }
    assert f"expert profiling is off for {moe}: it runs isolated, in a child process" in caplog.text


def test_expert_stats_without_profiling_says_how_to_enable_it(tiny_model_path: Path) -> None:
    app = create_app(ServerSettings(model=tiny_model_path, alias="tiny", parallel=1, ctx_size=64))

    async def run() -> None:
        async with app.router.lifespan_context(app):
            transport = httpx.ASGITransport(app=app)
            async with httpx.AsyncClient(transport=transport, base_url="http://app") as client:
                deadline = time.monotonic() + 60
                while (await client.get("/health")).status_code != 200:
                    assert time.monotonic() < deadline, "the model did not load"
                    await asyncio.sleep(0.02)
                stats = (await client.get("/api/v1/expert-stats")).json()
        assert stats["available"] is False
        assert stats["models"]["tiny"]["available"] is False
        assert "profile_experts=True" in stats["models"]["tiny"]["reason"]

    asyncio.run(run())
