"""What every route runs: pick the model by alias, check limits, run ``n`` generations on the
pool's async API, shape the chunks, record metrics.

The OpenAI routes and the protocol translators (through :meth:`Service.chat`, the app's
:data:`~llama_cpp.server.chat_call.ChatCall`) share it, so limits, ``n``, the streaming
rules and metrics are written once.

Streaming rules: one chunk per chunk the library yields (one token each), no role-only chunk
ahead of the first token (the library's ``{"role": "assistant"}`` delta is merged into the
next delta of that choice), choices indexed ``0..n-1``, and the usage, summed over the
choices, last (only if the client asked for it with ``stream_options.include_usage``).
Chat logprobs carry exactly ``top_logprobs`` alternatives per token, as OpenAI's chat API.
"""

from __future__ import annotations

import asyncio
import uuid
from collections.abc import AsyncGenerator, AsyncIterator, Awaitable, Callable, Mapping, Sequence
from contextlib import AsyncExitStack
from dataclasses import dataclass
from typing import Any, cast

from llama_cpp import fim
from llama_cpp.embeddings import EmbeddingInput
from llama_cpp.errors import ContextOverflowError
from llama_cpp.server.errors import APIError, from_library_error
from llama_cpp.server.metrics import Metrics, RequestTimer
from llama_cpp.server.registry import ModelRegistry, Pool
from llama_cpp.server.settings import ServerSettings

__all__ = ["Service"]

Chunk = dict[str, Any]
#: Starts one choice's generation: ``await start(pool, keywords)``.
_Start = Callable[[Pool, dict[str, Any]], Awaitable[object]]


class _End:
    pass


_END = _End()


def _seeded(keywords: Mapping[str, Any], n: int) -> list[dict[str, Any]]:
    """The keywords of each of ``n`` choices: choice i samples with ``seed + i`` (mod 2**32)."""
    seed = keywords.get("seed")
    return [
        {**keywords, "seed": (seed + i) % 2**32} if isinstance(seed, int) and i else dict(keywords)
        for i in range(n)
    ]


def _sum_usage(usages: Sequence[Mapping[str, Any]], n: int) -> dict[str, Any]:
    """OpenAI's usage of ``n`` choices per prompt: each prompt once, every completion."""
    firsts = usages[::n]
    prompt = sum(int(u.get("prompt_tokens", 0)) for u in firsts)
    completion = sum(int(u.get("completion_tokens", 0)) for u in usages)
    usage: dict[str, Any] = {
        "prompt_tokens": prompt,
        "completion_tokens": completion,
        "total_tokens": prompt + completion,
    }
    if all("prompt_tokens_details" in u for u in firsts):
        cached = sum(int(u["prompt_tokens_details"].get("cached_tokens", 0)) for u in firsts)
        usage["prompt_tokens_details"] = {"cached_tokens": cached}
    return usage


def _top_logprobs(choice: Chunk, n: int) -> Chunk:
    """``choice`` with OpenAI's chat ``top_logprobs``: the ``n`` most likely tokens exactly.

    The library's chat logprobs are llama-cpp-python's: converted from the completion shape,
    whose alternatives include the sampled token itself (appended after the ``n`` most likely
    when it is not among them, as where a grammar forces a token), so that a token may carry
    ``n + 1``. OpenAI's legacy completions allow that; its chat API does not.
    """
    logprobs = choice.get("logprobs")
    if not logprobs or not logprobs.get("content"):
        return choice
    content = [{**entry, "top_logprobs": entry["top_logprobs"][:n]} for entry in logprobs["content"]]
    return {**choice, "logprobs": {**logprobs, "content": content}}


def _carries_token(chunk: Chunk) -> bool:
    for choice in chunk.get("choices", ()):
        delta = choice.get("delta")
        if delta is None:  # a completion chunk
            if choice.get("text"):
                return True
        elif any(delta.get(k) for k in ("content", "reasoning_content", "tool_calls")):
            return True
    return False


@dataclass
class Service:
    """The server's model registry, metrics and settings, and the calls the routes make."""

    settings: ServerSettings
    registry: ModelRegistry
    metrics: Metrics

    def check_max_tokens(self, value: int | None, param: str = "max_tokens") -> None:
        """Raise 400 if ``value`` is above the server's ``max_tokens_limit``."""
        limit = self.settings.max_tokens_limit
        if value is not None and value > limit:
            raise APIError(
                400, f"{param} is {value}, above this server's limit of {limit}", param=param,
                code="invalid_value",
            )  # fmt: skip

    def check_n(self, n: int) -> None:
        """Raise 400 unless ``1 <= n <= parallel``."""
        if not 1 <= n <= self.settings.parallel:
            raise APIError(
                400, f"n must be between 1 and {self.settings.parallel} (the server's parallel slots)",
                param="n", code="invalid_value",
            )  # fmt: skip

    # -- chat -----------------------------------------------------------------------------

    async def chat(
        self, model: str | None, messages: list[dict[str, Any]], keywords: dict[str, Any], stream: bool
    ) -> Chunk | AsyncIterator[Chunk]:
        """The app's :data:`~llama_cpp.server.chat_call.ChatCall`; ``keywords`` may hold ``n``."""
        keywords = dict(keywords)
        n = int(keywords.pop("n", None) or 1)
        self.check_n(n)
        self.check_max_tokens(keywords.get("max_tokens"))
        if keywords.get("max_tokens") is None:
            keywords["max_tokens"] = self.settings.max_tokens_limit

        def start(pool: Pool, kw: dict[str, Any]) -> Awaitable[object]:
            if stream:
                return pool.create_chat_completion_async(messages, stream=True, **kw)
            return pool.create_chat_completion_async(messages, **kw)

        jobs = _seeded(keywords, n)
        return await self._run_jobs("chat.completion", model, keywords, jobs, n=n, stream=stream, start=start)

    async def count_tokens(
        self, model: str | None, messages: list[dict[str, Any]], keywords: dict[str, Any]
    ) -> int:
        """The prompt tokens of a chat request as the model's template renders it."""
        async with self.registry.lease(model) as (_, pool):

            def count() -> int:
                rendered = pool.render_chat(
                    messages,
                    tools=keywords.get("tools"),
                    tool_choice=keywords.get("tool_choice"),
                    chat_template_kwargs=keywords.get("chat_template_kwargs"),
                )
                return len(pool.tokenize(rendered.prompt, add_bos=True, special=True))

            return await asyncio.to_thread(count)

    # -- completions ----------------------------------------------------------------------

    async def completion(
        self, model: str | None, prompts: list[Any], keywords: dict[str, Any], n: int, stream: bool
    ) -> Chunk | AsyncIterator[Chunk]:
        """``n`` completions of each prompt; choice ``p * n + i`` is prompt p's i-th."""
        self.check_n(n)
        self.check_max_tokens(keywords.get("max_tokens"))
        if keywords.get("max_tokens") is None:  # OpenAI's default, within the server's limit
            keywords = {**keywords, "max_tokens": min(16, self.settings.max_tokens_limit)}
        # Each prompt's n choices, one after another in the choice indices.
        per_prompt = [(p, kw) for p in prompts for kw in _seeded(keywords, n)]

        def start(pool: Pool, kw: dict[str, Any]) -> Awaitable[object]:
            prompt, own = per_prompt[kw.pop("_job")]
            own = {k: v for k, v in own.items() if k != "stream_options"}
            if stream:
                return pool.create_completion_async(prompt, stream=True, **own, **kw)
            return pool.create_completion_async(prompt, **own, **kw)

        jobs = [{"_job": j} for j in range(len(per_prompt))]
        return await self._run_jobs("text_completion", model, keywords, jobs, n=n, stream=stream, start=start)

    async def infill_prompt(
        self,
        model: str | None,
        *,
        prefix: str,
        suffix: str,
        prompt: str,
        chunks: Sequence[tuple[str, str]],
        n_predict: int,
    ) -> list[int]:
        """llama-server's ``/infill`` prompt of ``prefix``, ``suffix``, ``prompt`` and the
        repository context ``chunks`` ((filename, text) pairs), cut to ``model``'s window and
        batch (:func:`llama_cpp.fim.repo_infill_prompt`)."""
        async with self.registry.lease(model) as (_, pool):
            return await asyncio.to_thread(
                fim.repo_infill_prompt, pool.model, prefix, suffix, prompt, chunks,
                n_ctx=pool.n_ctx(), n_batch=pool.config.n_batch, n_predict=n_predict,
            )  # fmt: skip

    # -- embeddings -----------------------------------------------------------------------

    async def embedding(self, model: str | None, input: EmbeddingInput) -> Chunk:
        async with self.registry.lease(model) as (alias, pool):
            timer = self.metrics.timer(alias)
            answer: Chunk = dict(await pool.create_embedding_async(input, model=alias))
            timer.finish(answer.get("usage"))
            return answer

    # -- reranking ------------------------------------------------------------------------

    async def rerank(
        self,
        model: str | None,
        query: str,
        documents: list[str],
        *,
        top_n: int | None,
        normalize: bool,
        return_documents: bool,
    ) -> Chunk:
        """llama-server's ``/v1/rerank`` answer from a reranker alias, best first.

        Raises:
            APIError: 400 ``model_not_reranker`` (the alias is not a reranker),
                ``context_length_exceeded`` (a query/document pair is longer than ``n_batch``).
        """
        async with self.registry.lease_reranker(model) as (alias, reranker):
            timer = self.metrics.timer(alias)
            try:
                results, n_tokens = await reranker.rerank(query, documents, top_n, normalize)
            except ContextOverflowError as error:
                timer.finish(None)
                raise APIError(400, str(error), param="documents", code="context_length_exceeded") from error
            except BaseException:
                timer.finish(None)
                raise
            timer.finish({"prompt_tokens": n_tokens, "completion_tokens": 0})
        items = []
        for result in results:
            item: Chunk = {"index": result.index, "relevance_score": result.relevance_score}
            if return_documents:
                item["document"] = {"text": result.document}
            items.append(item)
        usage = {"prompt_tokens": n_tokens, "total_tokens": n_tokens}
        return {"model": alias, "object": "list", "results": items, "usage": usage}

    # -- running n generations ------------------------------------------------------------

    async def _run_jobs(
        self,
        object_: str,
        model: str | None,
        keywords: dict[str, Any],
        jobs: list[dict[str, Any]],
        *,
        n: int,
        stream: bool,
        start: _Start,
    ) -> Chunk | AsyncIterator[Chunk]:
        """Run ``jobs`` (each a choice's keywords for ``start``) on ``model``'s pool; ``n``
        choices per prompt, at most the pool's slots."""
        include_usage = bool((keywords.get("stream_options") or {}).get("include_usage"))
        prefix = "chatcmpl-" if object_ == "chat.completion" else "cmpl-"
        top_n = int(keywords.get("top_logprobs") or 0) if object_ == "chat.completion" else None
        answer_id = prefix + uuid.uuid4().hex
        exits = AsyncExitStack()
        alias, pool = await exits.enter_async_context(self.registry.lease(model))
        timer = self.metrics.timer(alias)
        try:
            if n > pool.pool_size:
                raise APIError(
                    400, f"n must be at most {pool.pool_size} (the parallel slots of {alias!r})",
                    param="n", code="invalid_value",
                )  # fmt: skip
            if not stream:
                answers = await _gather([start(pool, {k: v for k, v in kw.items() if k != "stream_options"})
                                         for kw in jobs])  # fmt: skip

                await exits.aclose()
                return self._merge(answers, answer_id, timer, n, top_n)
            streams: list[AsyncIterator[Chunk]] = []
            try:
                for kw in jobs:
                    own = {**kw, "stream_options": {"include_usage": True}}
                    streams.append(cast(AsyncIterator[Chunk], await start(pool, own)))
            except BaseException:
                for s in streams:
                    await s.aclose()  # type: ignore[attr-defined]  # AsyncStream
                raise
            timer.submitted()
        except TypeError as error:  # an unknown keyword (a translator's), as the library raises it
            timer.finish(None)
            await exits.aclose()
            raise from_library_error(error) from error
        except BaseException:
            timer.finish(None)
            await exits.aclose()
            raise
        chunks = self._stream(streams, answer_id, timer, exits, include_usage=include_usage, n=n, top_n=top_n)

        async def unstarted() -> None:
            # The answer is dropped before its first chunk: _stream's own finally never ran.
            timer.finish(None)
            for s in streams:
                await s.aclose()  # type: ignore[attr-defined]  # AsyncStream
            await exits.aclose()

        return _Answer(chunks, unstarted)

    def _merge(
        self, answers: list[Chunk], answer_id: str, timer: RequestTimer, n: int, top_n: int | None
    ) -> Chunk:
        merged = dict(answers[0])
        merged["id"] = answer_id
        merged["model"] = timer.model
        merged["choices"] = [{**a["choices"][0], "index": i} for i, a in enumerate(answers)]
        if top_n is not None:
            merged["choices"] = [_top_logprobs(choice, top_n) for choice in merged["choices"]]
        if all("usage" in a for a in answers):
            merged["usage"] = _sum_usage([a["usage"] for a in answers], n)
        timer.finish(merged.get("usage"))
        return merged

    async def _stream(
        self,
        streams: list[AsyncIterator[Chunk]],
        answer_id: str,
        timer: RequestTimer,
        exits: AsyncExitStack,
        *,
        include_usage: bool,
        n: int,
        top_n: int | None,
    ) -> AsyncGenerator[Chunk, None]:
        usages: dict[int, Mapping[str, Any]] = {}
        roles: dict[int, str] = {}
        template: Chunk | None = None
        finished = False
        try:
            async for index, given in _interleave(streams):
                chunk = {**given, "id": answer_id, "model": timer.model}
                if not chunk.get("choices"):
                    if chunk.get("usage"):
                        usages[index] = chunk["usage"]
                        template = chunk
                    continue
                choices = []
                for original in chunk["choices"]:
                    choice = {**original, "index": index}
                    delta = choice.get("delta")
                    if delta is not None and "role" in delta:
                        rest = {k: v for k, v in delta.items() if k != "role" and v not in (None, "")}
                        if not rest and choice.get("finish_reason") is None:
                            roles[index] = delta["role"]  # merged into this choice's next delta
                            continue
                    if delta is not None and index in roles:
                        choice["delta"] = {"role": roles.pop(index), **delta}
                    choices.append(choice if top_n is None else _top_logprobs(choice, top_n))
                if not choices:
                    continue
                if _carries_token(chunk):
                    timer.token()
                chunk["choices"] = choices
                yield chunk
            usage = (
                _sum_usage([usages[i] for i in sorted(usages)], n) if len(usages) == len(streams) else None
            )
            if include_usage and template is not None and usage is not None:
                yield {**template, "id": answer_id, "model": timer.model, "choices": [], "usage": usage}
            timer.finish(usage)
            finished = True
        finally:
            if not finished:
                timer.finish(None)
            for s in streams:
                await s.aclose()  # type: ignore[attr-defined]  # AsyncStream: cancels if unfinished
            await exits.aclose()


class _Answer(AsyncIterator[Chunk]):
    """A streamed answer whose ``aclose()`` releases everything (streams, the model's lease,
    the timer) whether or not its iteration began: closing an async generator that never
    started does not run its ``finally``."""

    def __init__(self, chunks: AsyncGenerator[Chunk, None], unstarted: Callable[[], Awaitable[None]]) -> None:
        self._chunks = chunks
        self._unstarted: Callable[[], Awaitable[None]] | None = unstarted

    def __aiter__(self) -> _Answer:
        return self

    async def __anext__(self) -> Chunk:
        self._unstarted = None
        return await self._chunks.__anext__()

    async def aclose(self) -> None:
        unstarted, self._unstarted = self._unstarted, None
        if unstarted is not None:
            await self._chunks.aclose()
            await unstarted()
        else:
            await self._chunks.aclose()


async def _gather(calls: Sequence[Awaitable[Any]]) -> list[Any]:
    """Await ``calls`` concurrently; the first failure cancels the others and is raised."""
    if len(calls) == 1:
        return [await calls[0]]
    tasks = [asyncio.ensure_future(c) for c in calls]
    try:
        return list(await asyncio.gather(*tasks))
    finally:
        for task in tasks:
            task.cancel()


async def _interleave(streams: list[AsyncIterator[Chunk]]) -> AsyncIterator[tuple[int, Chunk]]:
    """The chunks of ``streams`` as each arrives, with its stream's index."""
    if len(streams) == 1:
        async for chunk in streams[0]:
            yield 0, chunk
        return
    queue: asyncio.Queue[tuple[int, Chunk | _End | BaseException]] = asyncio.Queue()

    async def pump(index: int, stream: AsyncIterator[Chunk]) -> None:
        try:
            async for chunk in stream:
                await queue.put((index, chunk))
        except Exception as error:
            await queue.put((index, error))
            return
        await queue.put((index, _END))

    tasks = [asyncio.ensure_future(pump(i, s)) for i, s in enumerate(streams)]
    try:
        running = len(tasks)
        while running:
            index, item = await queue.get()
            if isinstance(item, _End):
                running -= 1
            elif isinstance(item, BaseException):
                raise item
            else:
                yield index, item
    finally:
        for task in tasks:
            task.cancel()
