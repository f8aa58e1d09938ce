"""The models a server may serve, by alias: loaded on first use, least recently used unloaded.

Clients name aliases only, never paths. A request holds a lease on its model for as long as
it runs (a stream: until it ends), and a model is unloaded only when nobody holds one.
Loading and closing run in worker threads: the event loop never waits for llama.cpp.

An alias is a :class:`LlamaPool` (``kind = "generate"``), or a :class:`Reranker`
(``kind = "reranker"``): a pool refuses ``embedding=True``, and a reranker GGUF (a BERT-style
cross-encoder with rank pooling) generates nothing, so it is loaded as a :class:`Llama` with
``embedding=True`` whose calls run one at a time.
"""

from __future__ import annotations

import asyncio
import logging
from collections import OrderedDict
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from dataclasses import dataclass, field, replace
from typing import Any

from llama_cpp.config import resolve_config
from llama_cpp.embeddings import POOLING_RANK, RerankResult
from llama_cpp.isolated import IsolatedPool
from llama_cpp.llama import Llama
from llama_cpp.pool import LlamaPool
from llama_cpp.server.errors import APIError
from llama_cpp.server.settings import ModelSettings, ServerSettings
from llama_cpp.unified import family_settings

__all__ = ["ModelRegistry", "Reranker"]

_log = logging.getLogger("llama_cpp.server")

#: A generating model: in this process, or in a supervised child process (``isolated``).
Pool = LlamaPool | IsolatedPool


def _open_pool(path: str, parallel: int, max_queue: int, options: dict[str, Any], isolated: bool) -> Pool:
    """A pool over ``path`` with what its model family implies (a GGUF without a chat
    template gets its family's, as :class:`~llama_cpp.UnifiedLLM` does); with ``isolated``,
    an :class:`~llama_cpp.IsolatedPool` (the model in a child process that is restarted when
    it dies)."""
    _, config = family_settings(path, resolve_config("LlamaPool", None, options))
    if isolated:
        if config.profile_experts:
            # IsolatedPool refuses it: the counters would stay in the child process.
            _log.info("expert profiling is off for %s: it runs isolated, in a child process", path)
            config = replace(config, profile_experts=False, profile_experts_trace=0)
        return IsolatedPool(path, parallel, max_queue=max_queue, config=config)
    return LlamaPool(path, parallel, max_queue=max_queue, config=config)


class Reranker:
    """A reranker alias: a :class:`Llama` with ``embedding=True`` (rank pooling).

    Its requests are scored one at a time (an asyncio lock: waiting requests hold no
    thread); a request that is cancelled while it runs stops the scoring in C++.
    """

    def __init__(self, llm: Llama) -> None:
        self.llm = llm
        self._lock = asyncio.Lock()

    async def rerank(
        self, query: str, documents: list[str], top_n: int | None, normalize: bool
    ) -> tuple[list[RerankResult], int]:
        """:meth:`Llama.rerank`'s results, and the tokens of the scored pairs (the
        query/document pairs as llama-server formats them, each evaluated once).

        Raises:
            InvalidArgumentError: No documents, or ``top_n`` < 1.
            ContextOverflowError: A pair is longer than the model's ``n_batch``.
        """
        async with self._lock:
            pairs = await asyncio.to_thread(
                self.llm.context.rerank_inputs, query.encode("utf-8"), [d.encode("utf-8") for d in documents]
            )
            results = await self.llm.rerank_async(query, documents, top_n=top_n, normalize=normalize)
        return results, sum(len(pair) for pair in pairs)

    def close(self) -> None:
        self.llm.close()


def _open_reranker(alias: str, path: str, options: dict[str, Any]) -> Reranker:
    """A :class:`Reranker` over ``path``.

    Raises:
        APIError: 400 ``model_not_reranker``: the GGUF does not pool by rank.
        ModelLoadError: The file cannot be loaded.
    """
    llm = Llama(path, **{**options, "embedding": True})
    pooling = llm.context.pooling_type()
    if pooling != POOLING_RANK:
        llm.close()
        raise APIError(
            400, f"the model {alias!r} is configured as a reranker, but its GGUF is not one (pooling "
            f"type {pooling}, not rank): give a reranker GGUF (bge-reranker, jina-reranker, ...)",
            param="model", code="model_not_reranker",
        )  # fmt: skip
    return Reranker(llm)


@dataclass
class _Resident:
    model: Pool | Reranker
    users: int = 0


@dataclass
class ModelRegistry:
    """Aliases to :class:`LlamaPool` s and :class:`Reranker` s, at most ``settings.models_max``
    resident.

    When a load would exceed ``models_max``, the least recently used models that no request
    holds are closed; if every resident model is in use, the new one is loaded anyway and the
    excess is unloaded as soon as requests release theirs.
    """

    settings: ServerSettings
    table: dict[str, ModelSettings] = field(init=False)
    _resident: OrderedDict[str, _Resident] = field(init=False, default_factory=OrderedDict)
    _locks: dict[str, asyncio.Lock] = field(init=False, default_factory=dict)

    def __post_init__(self) -> None:
        self.table = self.settings.model_table()

    @property
    def default(self) -> str | None:
        """The alias a request without ``model`` gets (the default model, else the first)."""
        return self.settings.default_alias() or next(iter(self.table), None)

    def resolve(self, alias: str | None) -> str:
        """The configured alias of ``alias`` (None: the default).

        Raises:
            APIError: 404 ``model_not_found``.
        """
        name = alias if alias else self.default
        if name is None or name not in self.table:
            raise APIError(
                404,
                f"The model {alias!r} does not exist; this server serves {sorted(self.table)}",
                "invalid_request_error",
                "model",
                "model_not_found",
            )
        return name

    def loaded(self) -> dict[str, Pool | Reranker]:
        """The resident models by alias, least recently used first. Safe from a worker thread
        (/metrics, /api/v1/memory): the residents are copied in one step (list() of a dict
        runs without giving up the GIL) while the loop may load or unload."""
        return {alias: resident.model for alias, resident in list(self._resident.items())}

    def pools(self) -> dict[str, Pool]:
        """The resident pools (the generating models) by alias, least recently used first."""
        return {a: r.model for a, r in list(self._resident.items()) if not isinstance(r.model, Reranker)}

    def _options(self, spec: ModelSettings) -> dict[str, Any]:
        options: dict[str, Any] = {"n_ctx": self.settings.ctx_size}
        if self.settings.n_threads is not None:
            options["n_threads"] = self.settings.n_threads
        if spec.ctx_size is not None:
            options["n_ctx"] = spec.ctx_size
        if self.settings.profile_experts and spec.kind == "generate":
            options["profile_experts"] = True
        options.update(spec.options)
        return options

    async def load(self, alias: str | None) -> str:
        """Make ``alias`` resident (idempotent); returns the resolved alias.

        Raises:
            APIError: 404 for an unknown alias.
            ModelLoadError: The file cannot be loaded.
        """
        name = self.resolve(alias)
        async with self._hold(name):
            return name

    async def _acquire(self, alias: str | None) -> tuple[str, _Resident]:
        """Load ``alias`` if needed and count one more user, so that no eviction (which runs
        between awaits) can close it before the caller holds it."""
        name = self.resolve(alias)
        lock = self._locks.setdefault(name, asyncio.Lock())
        async with lock:
            resident = self._resident.get(name)
            if resident is None:
                spec = self.table[name]
                options = self._options(spec)
                await self._evict(room_for=1)  # unload first: at most models_max resident
                _log.info("loading %s from %s", name, spec.path)
                model: Pool | Reranker
                if spec.kind == "reranker":
                    model = await asyncio.to_thread(_open_reranker, name, str(spec.path), options)
                else:
                    parallel = spec.parallel or self.settings.parallel
                    max_queue = self.settings.max_queue if spec.max_queue is None else spec.max_queue
                    model = await asyncio.to_thread(
                        _open_pool, str(spec.path), parallel, max_queue, options, self.settings.isolated
                    )
                resident = self._resident[name] = _Resident(model)
            self._resident.move_to_end(name)
            resident.users += 1
        return name, resident

    async def unload(self, alias: str) -> bool:
        """Close ``alias``'s pool now (its running requests fail); False if it was not loaded.

        Raises:
            APIError: 404 for an unknown alias.
        """
        name = self.resolve(alias)
        resident = self._resident.pop(name, None)
        if resident is None:
            return False
        await asyncio.to_thread(resident.model.close)
        return True

    @asynccontextmanager
    async def lease(self, alias: str | None) -> AsyncIterator[tuple[str, Pool]]:
        """Hold ``alias``'s pool (loading it if needed) for the duration of the block.

        Raises:
            APIError: 404 for an unknown alias; 400 ``model_is_reranker`` for a reranker.
        """
        name = self.resolve(alias)
        if self.table[name].kind == "reranker":
            raise APIError(
                400, f"the model {name!r} is a reranker: it serves /v1/rerank only", param="model",
                code="model_is_reranker",
            )  # fmt: skip
        async with self._hold(name) as model:
            assert not isinstance(model, Reranker)  # by its kind
            yield name, model

    @asynccontextmanager
    async def lease_reranker(self, alias: str | None) -> AsyncIterator[tuple[str, Reranker]]:
        """Hold ``alias``'s reranker (loading it if needed) for the duration of the block.

        Raises:
            APIError: 404 for an unknown alias; 400 ``model_not_reranker`` for a model whose
                kind is not ``"reranker"``.
        """
        name = self.resolve(alias)
        if self.table[name].kind != "reranker":
            raise APIError(
                400, f"the model {name!r} is not a reranker: /v1/rerank needs a model configured with "
                'kind = "reranker" (a reranker GGUF, such as bge-reranker-v2-m3)',
                param="model", code="model_not_reranker",
            )  # fmt: skip
        async with self._hold(name) as model:
            assert isinstance(model, Reranker)  # by its kind
            yield name, model

    @asynccontextmanager
    async def _hold(self, alias: str) -> AsyncIterator[Pool | Reranker]:
        _, resident = await self._acquire(alias)
        try:
            yield resident.model
        finally:
            resident.users -= 1
            await self._evict()

    async def _evict(self, room_for: int = 0) -> None:
        """Close least recently used idle models until ``room_for`` more fit in ``models_max``
        (models in use are never closed: their excess goes when they are released)."""
        while len(self._resident) + room_for > self.settings.models_max:
            idle = next((a for a, r in self._resident.items() if r.users == 0), None)
            if idle is None:
                return
            _log.info("unloading %s (least recently used)", idle)
            await asyncio.to_thread(self._resident.pop(idle).model.close)

    async def close(self) -> None:
        """Close every pool (unfinished requests fail with ClosedError)."""
        while self._resident:
            _, resident = self._resident.popitem()
            await asyncio.to_thread(resident.model.close)
