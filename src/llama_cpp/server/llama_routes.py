"""llama-server's own routes: ``/v1/rerank`` (also ``/rerank``) and ``/infill``.

``/v1/rerank`` takes llama-server's (and Jina's) body ``{model, query, documents, top_n,
return_documents}`` and answers ``{model, object: "list", results: [{index, relevance_score,
document: {text}}], usage: {prompt_tokens, total_tokens}}``, best first, from a model whose
kind is ``"reranker"`` (:meth:`Llama.rerank`; any other model is a 400).

``/infill`` takes llama-server's ``{input_prefix, input_suffix, prompt, n_predict, ...}`` and
answers its non-OpenAI shape ``{content, stop: true, model, tokens_predicted,
tokens_evaluated, stop_type, truncated, ...}``; streamed, one ``data: {content, stop: false}``
event per token and a last one with ``stop: true``, with no ``[DONE]`` (as llama-server). It
runs on :meth:`Service.completion` of the token prompt :meth:`Service.infill_prompt` builds as
llama-server's ``format_prompt_infill`` does (:func:`llama_cpp.fim.repo_infill_prompt`): the
repository context ``input_extra``, then ``[BOS] FIM_PRE prefix prompt FIM_SUF suffix
FIM_MID``, so a model without FIM tokens is the library's 400. Where llama-server differs, it
is said at the line.
"""

from __future__ import annotations

from collections.abc import AsyncGenerator, AsyncIterator, Mapping
from typing import Any

from fastapi import APIRouter
from fastapi.responses import JSONResponse, Response

from llama_cpp.server.errors import APIError
from llama_cpp.server.openai_routes import sse
from llama_cpp.server.schemas import InfillRequest, RerankRequest
from llama_cpp.server.service import Service

__all__ = ["llama_router"]


def _stop_type(finish_reason: str | None, stop_sequence: str | None) -> str:
    """llama-server's ``stop_type``: ``"limit"``, ``"word"`` (a stop string) or ``"eos"``."""
    if finish_reason == "length":
        return "limit"
    return "word" if stop_sequence is not None else "eos"


def _final(
    alias: str, usage: Mapping[str, Any] | None, finish_reason: str | None, stop_sequence: str | None
) -> dict[str, Any]:
    """The fields of llama-server's last infill answer that this server knows."""
    usage = usage or {}
    details = usage.get("prompt_tokens_details") or {}
    return {
        "index": 0,
        "stop": True,
        "model": alias,
        "tokens_predicted": usage.get("completion_tokens", 0),
        "tokens_evaluated": usage.get("prompt_tokens", 0),
        "tokens_reused": details.get("cached_tokens", 0),  # llama-server has no such field
        "stop_type": _stop_type(finish_reason, stop_sequence),
        "stopping_word": stop_sequence or "",
        "truncated": False,  # a prompt too long for the context is a 400, never cut
    }


class _InfillEvents:
    """llama-server's infill events of a completion's chunks. Closing it closes the chunks
    even if it never started (a client gone before the first event), so that the lease and
    the generation end at once."""

    def __init__(self, chunks: AsyncIterator[dict[str, Any]]) -> None:
        self._chunks = chunks
        self._events = self._translate()

    def __aiter__(self) -> _InfillEvents:
        return self

    async def __anext__(self) -> dict[str, Any]:
        return await self._events.__anext__()

    async def aclose(self) -> None:
        await self._events.aclose()
        await self._chunks.aclose()  # type: ignore[attr-defined]  # an async generator: idempotent

    async def _translate(self) -> AsyncGenerator[dict[str, Any], None]:
        finish_reason: str | None = None
        stop_sequence: str | None = None
        alias = ""
        usage: Mapping[str, Any] | None = None
        async for chunk in self._chunks:
            alias = chunk.get("model", alias)
            if not chunk.get("choices"):
                usage = chunk.get("usage")
                continue
            choice = chunk["choices"][0]
            if choice.get("finish_reason"):
                finish_reason, stop_sequence = choice["finish_reason"], choice.get("stop_reason")
            if choice.get("text"):
                yield {"index": 0, "content": choice["text"], "stop": False}
        yield {**_final(alias, usage, finish_reason, stop_sequence), "content": ""}


def llama_router(service: Service) -> APIRouter:
    """llama-server's ``/v1/rerank``, ``/rerank`` and ``/infill`` over ``service``."""
    router = APIRouter(tags=["llama.cpp"])

    @router.post("/v1/rerank")
    @router.post("/rerank")
    async def rerank(body: RerankRequest) -> dict[str, Any]:
        """Documents ranked by relevance to ``query``, best first (a reranker model)."""
        return await service.rerank(
            body.model, body.query, body.documents, top_n=body.top_n, normalize=body.normalize,
            return_documents=body.return_documents,
        )  # fmt: skip

    @router.post("/infill")
    async def infill(body: InfillRequest) -> Response:
        """Fill in the middle between ``input_prefix`` and ``input_suffix`` (a FIM model),
        with the repository context ``input_extra`` ahead, as llama-server lays it out."""
        if body.n != 1:
            raise APIError(400, "/infill generates one answer: n must be 1", param="n", code="invalid_value")
        keywords = body.keywords()
        service.check_max_tokens(
            keywords.get("max_tokens"), "max_tokens" if body.n_predict is None else "n_predict"
        )
        # llama-server tokenizes `prompt` on its own and puts it right after the prefix (its
        # README says after FIM_MID; its format_prompt_infill says otherwise), parsing special
        # tokens in it: here they stay text, as in the prefix and suffix. It cuts the context
        # to what its server-wide n_predict (-n, default -1) leaves: the request's here.
        n_predict = next((n for n in (body.n_predict, body.max_tokens) if n is not None), -1)
        extra = [(chunk.filename, chunk.text) for chunk in body.input_extra]
        prompt = await service.infill_prompt(
            body.model, prefix=body.input_prefix, suffix=body.input_suffix, prompt=body.prompt,
            chunks=extra, n_predict=n_predict,
        )  # fmt: skip
        # llama-server's n_predict defaults to -1 (no limit): the server's limit here.
        keywords.setdefault("max_tokens", service.settings.max_tokens_limit)
        if body.stream:
            keywords["stream_options"] = {"include_usage": True}
            chunks = await service.completion(body.model, [prompt], keywords, 1, True)
            assert not isinstance(chunks, dict)  # streamed
            return sse(_InfillEvents(chunks), done=False)
        answer = await service.completion(body.model, [prompt], keywords, 1, False)
        assert isinstance(answer, dict)  # not streamed
        choice = answer["choices"][0]
        final = _final(
            answer["model"], answer.get("usage"), choice.get("finish_reason"), choice.get("stop_reason")
        )
        return JSONResponse({**final, "content": choice["text"]})

    return router
