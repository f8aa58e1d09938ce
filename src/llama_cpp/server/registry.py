"""The models a server may serve, by alias: loaded on first use, least recently used unloaded.

Clients name aliases only, never paths. A request holds a :class:`Lease` on its model for as
long as it runs (a stream: until it ends), and a model is unloaded only when nobody holds one.
Loading and closing run in worker threads: the event loop never waits for llama.cpp.
"""

from __future__ import annotations

import asyncio
import logging
from collections import OrderedDict
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from dataclasses import dataclass, field
from typing import Any

from llama_cpp.config import resolve_config
from llama_cpp.pool import LlamaPool
from llama_cpp.server.errors import APIError
from llama_cpp.server.settings import ModelSettings, ServerSettings
from llama_cpp.unified import family_settings

__all__ = ["ModelRegistry"]

_log = logging.getLogger("llama_cpp.server")


def _open_pool(path: str, parallel: int, max_queue: int, options: dict[str, Any]) -> LlamaPool:
    """A pool over ``path`` with what its model family implies (a GGUF without a chat
    template gets its family's, as :class:`~llama_cpp.UnifiedLLM` does)."""
    _, config = family_settings(path, resolve_config("LlamaPool", None, options))
    return LlamaPool(path, parallel, max_queue=max_queue, config=config)


@dataclass
class _Resident:
    pool: LlamaPool
    users: int = 0


@dataclass
class ModelRegistry:
    """Aliases to :class:`LlamaPool` s, at most ``settings.models_max`` resident.

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

    def loaded(self) -> dict[str, LlamaPool]:
        """The resident pools by alias, least recently used first."""
        return {alias: resident.pool for alias, resident in self._resident.items()}

    def _options(self, spec: ModelSettings) -> dict[str, Any]:
        options: dict[str, Any] = {"n_ctx": self.settings.ctx_size}
        if self.settings.n_threads is not None:
            options["n_threads"] = self.settings.n_threads
        if spec.ctx_size is not None:
            options["n_ctx"] = spec.ctx_size
        options.update(spec.options)
        return options

    async def load(self, alias: str | None) -> str:
        """Make ``alias`` resident (idempotent); returns the resolved alias.

        Raises:
            APIError: 404 for an unknown alias.
            ModelLoadError: The file cannot be loaded.
        """
        async with self.lease(alias) as (name, _):
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
                parallel = spec.parallel or self.settings.parallel
                max_queue = self.settings.max_queue if spec.max_queue is None else spec.max_queue
                options = self._options(spec)
                _log.info("loading %s from %s", name, spec.path)
                pool = await asyncio.to_thread(_open_pool, str(spec.path), parallel, max_queue, options)
                resident = self._resident[name] = _Resident(pool)
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
        await asyncio.to_thread(resident.pool.close)
        return True

    @asynccontextmanager
    async def lease(self, alias: str | None) -> AsyncIterator[tuple[str, LlamaPool]]:
        """Hold ``alias``'s pool (loading it if needed) for the duration of the block."""
        name, resident = await self._acquire(alias)
        try:
            yield name, resident.pool
        finally:
            resident.users -= 1
            await self._evict()

    async def _evict(self) -> None:
        while len(self._resident) > self.settings.models_max:
            idle = next((a for a, r in self._resident.items() if r.users == 0), None)
            if idle is None:
                return
            _log.info("unloading %s (least recently used)", idle)
            await asyncio.to_thread(self._resident.pop(idle).pool.close)

    async def close(self) -> None:
        """Close every pool (unfinished requests fail with ClosedError)."""
        while self._resident:
            _, resident = self._resident.popitem()
            await asyncio.to_thread(resident.pool.close)
