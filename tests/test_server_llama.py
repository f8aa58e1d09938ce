"""The server's llama-server routes (``/v1/rerank``, ``/infill``), its queue / KV / prefix-cache
metrics, and logprobs in streamed chat and with tools, on a real uvicorn driven by ``httpx``
and the official ``openai`` client.

One server for the module: the default model as ``gemma`` (2 slots), the suite's tiny BERT
reranker as ``reranker`` (kind reranker) and the tiny FIM model as ``fim``.
"""

from __future__ import annotations

import asyncio
import json
from collections.abc import Iterator
from dataclasses import replace
from pathlib import Path
from typing import Any

import openai
import pytest
from openai.types.chat import ChatCompletionMessageFunctionToolCall

from llama_cpp import Llama
from llama_cpp.server import ModelSettings, ServerSettings, SettingsError, load_settings
from llama_cpp.server.llama_routes import _InfillEvents
from llama_cpp.testing import (
    FIM_MID_ID,
    TinyModelSpec,
    byte_token,
    write_tiny_llama,
    write_tiny_reranker,
)
from llama_cpp.testing.tiny_models import chain
from server_harness import CHOICE, KEY, TOOLS, WEATHER, Server, events, serve

MESSAGES: list[Any] = [
    {"role": "system", "content": "You are helpful."},
    {"role": "user", "content": "Name a color."},
]
#: Gemma's end-of-generation tokens (<eos>, <end_of_turn>), banned so that answers run long.
NO_EOS: Any = {"1": -100, "106": -100}
DOCUMENTS = ["a dog", "the cat", "cat cat", "no", "a cat"]
#: The tiny FIM model's infill prompt of prefix "ab" and suffix "cd": BOS FIM_PRE a b FIM_SUF c d FIM_MID.
AB_CD_TOKENS = 8


def _fim_spec() -> TinyModelSpec:
    # As tests/test_fim.py: after FIM_MID the model writes "XYZ", then EOS.
    successors = {**TinyModelSpec().successors, FIM_MID_ID: byte_token(ord("X")), **chain("XYZ")}
    return TinyModelSpec(fim=True, successors=successors)


@pytest.fixture(scope="module")
def reranker_path(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return write_tiny_reranker(tmp_path_factory.mktemp("reranker") / "reranker.gguf")


@pytest.fixture(scope="module")
def fim_path(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return write_tiny_llama(tmp_path_factory.mktemp("fim") / "fim.gguf", _fim_spec())


@pytest.fixture(scope="module")
def fim_repo_path(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return write_tiny_llama(
        tmp_path_factory.mktemp("fim") / "fim-repo.gguf", replace(_fim_spec(), fim_repo=True)
    )


@pytest.fixture(scope="module")
def server(
    default_model_path: Path, reranker_path: Path, fim_path: Path, fim_repo_path: Path
) -> Iterator[Server]:
    settings = ServerSettings(
        model=default_model_path,
        alias="gemma",
        parallel=2,
        ctx_size=1024,
        n_threads=2,
        api_keys=[KEY],
        max_tokens_limit=512,
        models={
            "reranker": ModelSettings(
                path=reranker_path, kind="reranker", ctx_size=256, options={"n_batch": 64}
            ),
            "fim": ModelSettings(path=fim_path, parallel=2, ctx_size=256),
            # Room for repository context: llama-server's budget is the window less a batch
            # and twice n_predict (with fim's default batch of 512, none).
            "fim-snippets": ModelSettings(path=fim_path, parallel=1, ctx_size=256, options={"n_batch": 64}),
            "fim-repo": ModelSettings(path=fim_repo_path, parallel=1, ctx_size=256, options={"n_batch": 64}),
            "misconfigured": ModelSettings(path=fim_path, kind="reranker", ctx_size=256),
        },
    )
    with serve(settings) as client:
        yield client


# -- /v1/rerank ------------------------------------------------------------------------------


def test_rerank_answers_what_llama_rerank_computes(server: Server, reranker_path: Path) -> None:
    with Llama(reranker_path, n_ctx=256, n_batch=64, n_threads=2, embedding=True, verbose=False) as llm:
        expected = llm.rerank("cat", DOCUMENTS)
        top = llm.rerank("cat", DOCUMENTS, top_n=2, normalize=True)
        pairs = llm.context.rerank_inputs(b"cat", [d.encode() for d in DOCUMENTS])
    n_tokens = sum(len(p) for p in pairs)
    answer = server.http.post(
        "/v1/rerank", json={"model": "reranker", "query": "cat", "documents": DOCUMENTS}
    )
    assert answer.status_code == 200, answer.text
    body = answer.json()
    assert body["model"] == "reranker"
    assert body["object"] == "list"
    assert body["usage"] == {"prompt_tokens": n_tokens, "total_tokens": n_tokens}
    assert [r["index"] for r in body["results"]] == [r.index for r in expected]
    assert [r["document"] for r in body["results"]] == [{"text": r.document} for r in expected]
    assert [r["relevance_score"] for r in body["results"]] == pytest.approx(
        [r.relevance_score for r in expected], rel=1e-6
    )
    assert body["results"][0]["document"]["text"] == "cat cat"  # the tiny reranker likes cats
    # /rerank is the same route; top_n, normalize and return_documents as asked.
    short = server.http.post(
        "/rerank",
        json={"model": "reranker", "query": "cat", "documents": DOCUMENTS, "top_n": 2, "normalize": True,
              "return_documents": False},
    ).json()  # fmt: skip
    assert [set(r) for r in short["results"]] == [{"index", "relevance_score"}] * 2
    assert [r["index"] for r in short["results"]] == [r.index for r in top]
    assert [r["relevance_score"] for r in short["results"]] == pytest.approx(
        [r.relevance_score for r in top], rel=1e-6
    )


def test_rerank_refuses_other_models_and_bad_bodies(server: Server) -> None:
    def error(body: dict[str, Any]) -> tuple[int, dict[str, Any]]:
        answer = server.http.post("/v1/rerank", json=body)
        return answer.status_code, answer.json()["error"]

    status, body = error({"model": "gemma", "query": "cat", "documents": ["a"]})
    assert status == 400
    assert (body["type"], body["param"], body["code"]) == (
        "invalid_request_error",
        "model",
        "model_not_reranker",
    )
    assert "is not a reranker" in body["message"]
    status, body = error({"query": "cat", "documents": ["a"]})  # the default model: gemma
    assert (status, body["code"]) == (400, "model_not_reranker")
    status, body = error({"model": "nope", "query": "cat", "documents": ["a"]})
    assert (status, body["code"]) == (404, "model_not_found")
    status, body = error({"model": "reranker", "query": "cat", "documents": []})
    assert (status, body["param"]) == (400, "documents")
    status, body = error({"model": "reranker", "query": "cat", "documents": ["a"], "top_n": 0})
    assert (status, body["param"]) == (400, "top_n")
    status, body = error({"model": "reranker", "query": "cat", "documents": ["x" * 100]})
    assert (status, body["code"], body["param"]) == (400, "context_length_exceeded", "documents")
    status, body = error({"model": "misconfigured", "query": "cat", "documents": ["a"]})
    assert (status, body["code"]) == (400, "model_not_reranker")
    assert "its GGUF is not one" in body["message"]
    surrogate = server.http.post(
        "/v1/rerank", content=b'{"model": "reranker", "query": "\\ud800", "documents": ["a"]}',
        headers={"content-type": "application/json"},
    )  # fmt: skip
    assert (surrogate.status_code, surrogate.json()["error"]["param"]) == (400, "query")
    # A reranker generates nothing: the generating routes refuse it.
    with pytest.raises(openai.BadRequestError) as caught:
        server.openai.chat.completions.create(model="reranker", messages=MESSAGES, max_tokens=1)
    assert caught.value.code == "model_is_reranker"
    with pytest.raises(openai.BadRequestError) as caught:
        server.openai.embeddings.create(model="reranker", input="cat")
    assert caught.value.code == "model_is_reranker"


def test_a_reranker_loads_and_unloads_as_an_alias(server: Server) -> None:
    models = {m["id"]: m["loaded"] for m in server.http.get("/v1/models").json()["data"]}
    assert set(models) == {"gemma", "reranker", "fim", "fim-snippets", "fim-repo", "misconfigured"}
    assert server.http.post("/models/unload", json={"model": "reranker"}).status_code == 200
    assert server.http.post("/models/load", json={"model": "reranker"}).json() == {
        "model": "reranker",
        "loaded": True,
    }
    answer = server.http.post(
        "/v1/rerank", json={"model": "reranker", "query": "cat", "documents": ["a cat"]}
    )
    assert answer.status_code == 200, answer.text


# -- /infill ---------------------------------------------------------------------------------


def test_infill_fills_the_middle(server: Server, fim_path: Path) -> None:
    with Llama(fim_path, n_ctx=256, verbose=False) as llm:
        library = llm.create_completion("ab", suffix="cd", max_tokens=10, temperature=0)
    assert library["choices"][0]["text"] == "XYZ"
    body = {"model": "fim", "input_prefix": "ab", "input_suffix": "cd", "temperature": 0}
    answer = server.http.post("/infill", json=body)
    assert answer.status_code == 200, answer.text
    assert answer.json() == {
        "index": 0,
        "content": "XYZ",
        "stop": True,
        "model": "fim",
        "tokens_predicted": 3,
        "tokens_evaluated": AB_CD_TOKENS,
        "tokens_reused": answer.json()["tokens_reused"],
        "stop_type": "eos",
        "stopping_word": "",
        "truncated": False,
    }
    limited = server.http.post("/infill", json={**body, "n_predict": 2}).json()
    assert (limited["content"], limited["stop_type"], limited["tokens_predicted"]) == ("XY", "limit", 2)
    worded = server.http.post("/infill", json={**body, "stop": ["Z", "YZ"]}).json()
    assert (worded["content"], worded["stop_type"], worded["stopping_word"]) == ("X", "word", "YZ")
    assert server.http.post("/infill", json={**body, "max_tokens": 1}).json()["content"] == "X"
    # `prompt` continues the prefix (llama-server puts its tokens right after the prefix's).
    split = server.http.post("/infill", json={**body, "input_prefix": "a", "prompt": "b"}).json()
    assert (split["content"], split["tokens_evaluated"]) == ("XYZ", AB_CD_TOKENS)


def test_infill_puts_the_repository_context_ahead_as_far_as_it_fits(server: Server) -> None:
    # input_extra as llama.vim and llama.vscode send it; its tokens, laid out as llama-server
    # does (tests/test_fim.py checks them one by one), count in tokens_evaluated.
    extra = [{"filename": "a.py", "text": "x = 1"}, {"text": "y"}]
    body = {"input_prefix": "ab", "input_suffix": "cd", "input_extra": extra, "temperature": 0}

    def infill(model: str, **more: Any) -> dict[str, Any]:
        answer = server.http.post("/infill", json={**body, "model": model, **more})
        assert answer.status_code == 200, answer.text
        result: dict[str, Any] = answer.json()
        assert result["content"] == "XYZ"
        return result

    # FIM_REP "myproject\n" (11), FIM_SEP "a.py\n" "x = 1" (11), FIM_SEP "tmp\n" "y" (6),
    # FIM_SEP "filename\n" (10): 38 tokens ahead of the 8 of the FIM prompt.
    assert infill("fim-repo")["tokens_evaluated"] == AB_CD_TOKENS + 38
    # n_predict 90: 256 - 64 - 180 = 12 tokens of context are left, the last ones.
    assert infill("fim-repo", n_predict=90)["tokens_evaluated"] == AB_CD_TOKENS + 12
    # Without FIM_REP / FIM_SEP: a "--- snippet ---" line (19 tokens) ahead of each chunk.
    assert infill("fim-snippets")["tokens_evaluated"] == AB_CD_TOKENS + 19 + 5 + 19 + 1
    # The window less a batch of 512 leaves nothing: the FIM prompt alone, as llama-server.
    assert infill("fim")["tokens_evaluated"] == AB_CD_TOKENS


def test_infill_streams_one_token_per_event_without_done(server: Server) -> None:
    body = {"model": "fim", "input_prefix": "ab", "input_suffix": "cd", "temperature": 0, "stream": True}
    with server.http.stream("POST", "/infill", json=body) as response:
        assert response.status_code == 200
        assert response.headers["content-type"].startswith("text/event-stream")
        chunks = list(events(response.iter_lines(), done=False))
    assert [c["content"] for c in chunks] == ["X", "Y", "Z", ""]
    assert [c["stop"] for c in chunks] == [False, False, False, True]
    assert chunks[-1]["tokens_predicted"] == 3
    assert chunks[-1]["tokens_evaluated"] == AB_CD_TOKENS
    assert chunks[-1]["stop_type"] == "eos"


def test_infill_events_close_the_generation_even_unstarted() -> None:
    # A client gone before the first event: the answer closes its events without having
    # started them, which must still close the completion's chunks (lease, slot).
    closed: list[str] = []

    class Chunks:
        def __aiter__(self) -> Chunks:
            return self

        async def __anext__(self) -> dict[str, Any]:
            raise StopAsyncIteration

        async def aclose(self) -> None:
            closed.append("chunks")

    asyncio.run(_InfillEvents(Chunks()).aclose())
    assert closed == ["chunks"]


def test_infill_refuses_models_without_fim_tokens_and_bad_bodies(server: Server) -> None:
    def error(body: dict[str, Any]) -> tuple[int, dict[str, Any]]:
        answer = server.http.post("/infill", json=body)
        return answer.status_code, answer.json()["error"]

    status, body = error({"model": "gemma", "input_prefix": "def f(", "input_suffix": "):"})
    assert status == 400
    assert body["type"] == "invalid_request_error"
    assert "this model has no FIM_PRE, FIM_SUF, FIM_MID token" in body["message"]
    fim = {"model": "fim", "input_prefix": "ab", "input_suffix": "cd"}
    status, body = error({"model": "fim", "input_prefix": "ab"})
    assert (status, body["param"]) == (400, "input_suffix")
    status, body = error({**fim, "input_extra": [{"filename": "a.py", "text": 1}]})
    assert (status, body["param"]) == (400, "input_extra.0.text")
    status, body = error({**fim, "input_extra": {"filename": "a.py"}})
    assert (status, body["param"]) == (400, "input_extra")
    status, body = error({**fim, "input_extra": [{"filename": "a.py"}]})  # llama-server: text is required
    assert (status, body["param"]) == (400, "input_extra.0.text")
    status, body = error({**fim, "n_predict": 0})
    assert (status, body["param"]) == (400, "n_predict")
    status, body = error({**fim, "n_predict": 5000})
    assert (status, body["param"]) == (400, "n_predict")
    status, body = error({**fim, "max_tokens": 5000})
    assert (status, body["param"]) == (400, "max_tokens")
    status, body = error({**fim, "n": 2})
    assert (status, body["param"]) == (400, "n")
    status, body = error({"model": "reranker", "input_prefix": "ab", "input_suffix": "cd"})
    assert (status, body["code"]) == (400, "model_is_reranker")


# -- metrics: queue time, KV cache, prefix cache ----------------------------------------------


def test_metrics_report_time_to_engine_queue_time_kv_use_and_prefix_hits(server: Server) -> None:
    before = server.metrics()
    usages = []
    for _ in range(2):  # the same prompt twice: the second starts with the first's cached prefix
        chunks = list(
            server.openai.chat.completions.create(
                model="gemma", messages=MESSAGES, max_tokens=3, temperature=0, stream=True,
                stream_options={"include_usage": True}, logit_bias=NO_EOS,
            )
        )  # fmt: skip
        usages.append(chunks[-1].usage)
    plain = server.openai.chat.completions.create(model="gemma", messages=MESSAGES, max_tokens=1)
    usages.append(plain.usage)
    after = server.metrics()

    def delta(name: str) -> float:
        return after[name] - before.get(name, 0.0)

    # Observed for the streamed requests only: a non-streamed call returns with its answer.
    assert delta("llamacpp_time_to_engine_seconds_count{model=gemma}") == 2
    assert delta("llamacpp_time_to_engine_seconds_sum{model=gemma}") > 0
    cached = [u.prompt_tokens_details.cached_tokens or 0 for u in usages if u and u.prompt_tokens_details]
    assert len(cached) == 3
    assert cached[1] > 0, "the second identical prompt reused the first's prefix"
    assert delta("llamacpp_prefix_cache_hits_total{model=gemma}") == sum(1 for c in cached if c)
    assert delta("llamacpp_prompt_tokens_cached_total{model=gemma}") == sum(cached)
    assert after["llamacpp_kv_cache_capacity_tokens{model=gemma}"] == 2 * 1024
    # The finished requests' tokens stay cached for the next prompt that starts the same way.
    assert 0 < after["llamacpp_kv_cache_tokens{model=gemma}"] <= 2 * 1024
    # Every request waited for a slot (none here: a slot was free each time), as the engine saw it.
    assert delta("llamacpp_queue_time_seconds_count{model=gemma}") == 3
    assert delta("llamacpp_queue_time_seconds_bucket{le=+Inf,model=gemma}") == 3
    assert delta("llamacpp_queue_time_seconds_bucket{le=2.5,model=gemma}") == 3
    assert 0 <= delta("llamacpp_queue_time_seconds_sum{model=gemma}") < 7.5
    assert after["llamacpp_busy_slots{model=gemma}"] == 0
    # A reranker has no slots: it is not among the pools' gauges.
    assert not any("model=reranker" in k and k.startswith("llamacpp_slots") for k in after)


# -- logprobs: streamed, and with tools --------------------------------------------------------


def test_streamed_chat_carries_each_tokens_logprobs(server: Server) -> None:
    keywords: Any = {"model": "gemma", "messages": MESSAGES, "max_tokens": 6, "temperature": 0,
                     "logprobs": True, "top_logprobs": 2, "logit_bias": NO_EOS}  # fmt: skip
    plain = server.openai.chat.completions.create(**keywords)
    chunks = list(
        server.openai.chat.completions.create(**keywords, stream=True, stream_options={"include_usage": True})
    )
    entries = []
    for chunk in chunks:
        if not chunk.choices:
            continue
        choice = chunk.choices[0]
        if choice.delta.content:
            assert choice.logprobs is not None, f"a content chunk without logprobs: {chunk}"
            assert choice.logprobs.content
        if choice.logprobs is not None and choice.logprobs.content:
            entries.extend(choice.logprobs.content)
    assert chunks[-1].usage is not None
    assert len(entries) == chunks[-1].usage.completion_tokens == 6
    assert all(len(e.top_logprobs) == 2 and e.logprob <= 0 for e in entries)
    content = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
    assert "".join(e.token for e in entries) == content
    assert plain.choices[0].logprobs is not None
    expected = plain.choices[0].logprobs.content
    assert expected is not None
    assert [e.token for e in entries] == [e.token for e in expected]
    assert [e.logprob for e in entries] == pytest.approx([e.logprob for e in expected], abs=1e-4)


def test_a_forced_tool_call_with_logprobs(server: Server) -> None:
    keywords: Any = {"model": "gemma", "messages": WEATHER, "tools": TOOLS, "tool_choice": CHOICE,
                     "max_tokens": 64, "temperature": 0, "logprobs": True, "top_logprobs": 2}  # fmt: skip
    answer = server.openai.chat.completions.create(**keywords)
    calls = answer.choices[0].message.tool_calls
    assert calls is not None
    call = calls[0]
    assert isinstance(call, ChatCompletionMessageFunctionToolCall)
    assert call.function.name == "get_weather"
    assert "city" in json.loads(call.function.arguments)
    assert answer.choices[0].finish_reason == "tool_calls"
    logprobs = answer.choices[0].logprobs
    assert logprobs is not None
    assert logprobs.content
    assert answer.usage is not None
    assert len(logprobs.content) == answer.usage.completion_tokens
    # Exactly the 2 most likely tokens, as OpenAI's chat API, also where the grammar forced a
    # token outside them (the call's first "{"; the library's llama-cpp-python-shaped chat
    # logprobs add the sampled token there, the server leaves it out).
    assert all(len(e.top_logprobs) == 2 for e in logprobs.content)
    forced = [e for e in logprobs.content if e.logprob < e.top_logprobs[1].logprob]
    assert forced
    assert all(e.token not in [t.token for t in e.top_logprobs] for e in forced)
    # Streamed: the call's deltas reassemble to the same arguments, and every token's logprob
    # comes in some chunk (the parser may hold a token's text back, never its logprob).
    chunks = list(
        server.openai.chat.completions.create(**keywords, stream=True, stream_options={"include_usage": True})
    )
    deltas = [d for c in chunks if c.choices for d in (c.choices[0].delta.tool_calls or [])]
    assert deltas[0].function is not None
    assert deltas[0].function.name == "get_weather"
    arguments = "".join((d.function.arguments or "") for d in deltas if d.function)
    assert json.loads(arguments) == json.loads(call.function.arguments)
    streamed = [
        e for c in chunks if c.choices and c.choices[0].logprobs for e in c.choices[0].logprobs.content or []
    ]
    assert [e.token for e in streamed] == [e.token for e in logprobs.content]
    assert all(len(e.top_logprobs) == 2 for e in streamed)
    assert chunks[-2].choices[0].finish_reason == "tool_calls"


# -- settings ----------------------------------------------------------------------------------


def test_the_kind_setting(tmp_path: Path) -> None:
    config = tmp_path / "server.toml"
    config.write_text('[models.rr]\npath = "r.gguf"\nkind = "reranker"\n')
    settings = load_settings(config, environ={})
    assert settings.models["rr"].kind == "reranker"
    assert settings.kind == "generate"
    assert (
        load_settings(environ={}, overrides={"model": "m.gguf", "kind": "reranker"}).model_table()["m"].kind
        == "reranker"
    )
    config.write_text('[models.rr]\npath = "r.gguf"\nkind = "embedder"\n')
    with pytest.raises(SettingsError, match="kind"):
        load_settings(config, environ={})
