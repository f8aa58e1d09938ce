"""Expert-routing statistics of a Mixture-of-Experts model: :class:`ExpertStats`.

A model created with ``profile_experts=True`` (:class:`~llama_cpp.Llama`,
:class:`~llama_cpp.LlamaPool`) counts, in C++ during ``llama_decode``, the experts its router
picks in every MoE layer for every token it routes (llama.cpp's ``ffn_moe_topk-<layer>``
tensors, read through the eval callback: no GIL; outputs unchanged on CPU, see
docs/expert-profiler.md for GPUs). ``expert_stats()``
copies the counts out as an :class:`ExpertStats`, whose derived views (hot experts, routing
entropy, simulated expert caches) are the data for deciding which experts to keep on a GPU.

What is counted: every token that ``llama_decode`` routes, prompt and generated alike, in
every request. A prompt prefix reused from the KV cache is not decoded again, so it is not
routed again. llama.cpp computes the *last* layer's feed-forward only for the tokens whose
outputs (logits) were asked for, usually one per prompt and one per generated token; that
layer therefore routes fewer tokens, and :attr:`ExpertStats.tokens` is per layer.

The optional trace (``profile_experts_trace=N``) keeps the routing of the latest ``N`` tokens
(a ring buffer: older tokens are dropped, :attr:`ExpertStats.trace_total` counts them all), in
decode order; in a pool, the tokens of concurrent requests are interleaved as the scheduler
batches them. A token the last layer did not route has ``-1`` there.

Cache simulation (:meth:`ExpertStats.simulate_cache`), one cache of ``capacity`` experts per
layer, starting empty:

* ``"lru"`` and ``"lfu"`` replay the trace token by token; each of a token's experts (in the
  router's order, best first) is one lookup: a hit if cached, else a miss that loads it,
  evicting, when the cache is full, the least recently used expert (``"lru"``) or the one
  looked up least often so far in the replay, cached or not, ties to the least recently used
  (``"lfu"``).
* ``"static-hot"`` keeps the ``capacity`` experts with the largest counts (ties: the lower id)
  for the whole run, as a placement fixed from this very profile would: its hit rate is their
  share of the layer's lookups in :attr:`ExpertStats.counts` (all tokens since the last reset,
  not only the trace). It knows the future, so it bounds what a fixed placement can reach.
"""

from __future__ import annotations

import heapq
import math
from collections import OrderedDict
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from typing import Any, Literal, get_args

import numpy as np
import numpy.typing as npt

from llama_cpp import _core
from llama_cpp.errors import ExpertStatsUnavailableError, InvalidArgumentError

__all__ = ["CachePolicy", "CacheSimulation", "ExpertStats", "simulate_cache"]

#: How a simulated expert cache chooses what to keep (see the module docstring).
CachePolicy = Literal["lru", "lfu", "static-hot"]
POLICIES: tuple[str, ...] = get_args(CachePolicy)

IntArray = npt.NDArray[np.int64]


@dataclass(frozen=True, slots=True)
class CacheSimulation:
    """Hit rates of one simulated per-layer expert cache.

    Attributes:
        policy: ``"lru"``, ``"lfu"`` or ``"static-hot"``.
        capacity: Experts each layer's cache holds.
        layers: The model layer of each entry below.
        hits: Lookups served from the cache, per layer.
        lookups: Expert lookups, per layer (routed tokens times ``n_expert_used``).
    """

    policy: str
    capacity: int
    layers: tuple[int, ...]
    hits: IntArray
    lookups: IntArray

    @property
    def hit_rates(self) -> npt.NDArray[np.float64]:
        """Hits / lookups per layer (0.0 for a layer with no lookups)."""
        rates = np.zeros(len(self.hits), dtype=np.float64)
        np.divide(self.hits, self.lookups, out=rates, where=self.lookups > 0)
        return rates

    @property
    def hit_rate(self) -> float:
        """Hits / lookups over all layers (0.0 with no lookups)."""
        total = int(self.lookups.sum())
        return int(self.hits.sum()) / total if total else 0.0


@dataclass(frozen=True)
class ExpertStats:
    """Expert-routing counts of a MoE model, copied when ``expert_stats()`` was called.

    Rows are the model's MoE layers that have routed tokens since the collector was created
    or reset, in layer order (none before the first decode).

    Attributes:
        counts: int64 ``(n_moe_layers, n_expert)``: tokens routed to each expert.
        tokens: int64 ``(n_moe_layers,)``: tokens each layer routed (each to ``n_expert_used``
            experts, so ``counts.sum(axis=1) == tokens * n_expert_used``).
        layers: The model layer of each row (``layers[i]`` is row ``i``'s layer index).
        n_expert: Experts per layer.
        n_expert_used: Experts each token is routed to (top-k).
        trace: int32 ``(n_tokens, n_moe_layers, n_expert_used)``: the experts of the latest
            traced tokens, oldest first, each token's in the router's order; -1 where a layer
            did not route the token. Empty without ``profile_experts_trace``.
        trace_total: Tokens that entered the trace since the reset, including those dropped.
        trace_capacity: Tokens the trace keeps (``profile_experts_trace``; 0: no trace).
    """

    counts: IntArray
    tokens: IntArray
    layers: tuple[int, ...]
    n_expert: int
    n_expert_used: int
    trace: npt.NDArray[np.int32]
    trace_total: int = 0
    trace_capacity: int = 0
    _reset: Callable[[], None] | None = field(default=None, repr=False, compare=False)

    @classmethod
    def from_profiler(cls, profiler: _core.ExpertProfiler, *, reset: bool = False) -> ExpertStats:
        """A copy of what ``profiler`` has counted (its :meth:`reset` resets that profiler).

        Args:
            profiler: The native collector.
            reset: Also reset the collector, atomically with the copy: every token is either
                in this copy or counted afterwards.
        """
        layers, counts, tokens, trace, trace_total = profiler.snapshot(reset=reset)
        return cls(
            counts=counts,
            tokens=tokens,
            layers=tuple(int(layer) for layer in layers),
            n_expert=profiler.n_expert,
            n_expert_used=profiler.n_expert_used,
            trace=trace,
            trace_total=trace_total,
            trace_capacity=profiler.trace_capacity,
            _reset=profiler.reset,
        )

    def reset(self) -> None:
        """Reset the collector: the model's counts and trace start again from zero.

        This object keeps what it copied.

        Raises:
            ExpertStatsUnavailableError: The object was not made by ``expert_stats()``.
        """
        if self._reset is None:
            raise ExpertStatsUnavailableError("these statistics were not collected from a model: no reset")
        self._reset()

    def hot(self, k: int) -> IntArray:
        """The ``k`` most used experts of each layer, most used first (ties: the lower id).

        Returns:
            int64 ``(n_moe_layers, min(k, n_expert))``: expert ids.

        Raises:
            InvalidArgumentError: ``k`` is not an integer >= 1.
        """
        _check_positive("k", k)
        # A stable sort of the negated counts keeps equal counts in id order.
        order = np.argsort(-self.counts, axis=1, kind="stable")
        return order[:, : min(k, self.n_expert)].astype(np.int64)

    def shares(self) -> npt.NDArray[np.float64]:
        """Each expert's share of its layer's routings (rows sum to 1; 0 for an idle layer).

        Returns:
            float64 ``(n_moe_layers, n_expert)``.
        """
        totals = self.counts.sum(axis=1, keepdims=True)
        shares = np.zeros(self.counts.shape, dtype=np.float64)
        np.divide(self.counts, totals, out=shares, where=totals > 0)
        return shares

    def entropy(self) -> npt.NDArray[np.float64]:
        """The entropy of each layer's routing distribution (:meth:`shares`), in bits.

        0 when one expert takes everything (or the layer is idle); ``log2(n_expert)`` when
        routing is uniform.

        Returns:
            float64 ``(n_moe_layers,)``.
        """
        p = self.shares()
        terms = np.zeros_like(p)
        np.multiply(p, np.log2(p, out=np.zeros_like(p), where=p > 0), out=terms, where=p > 0)
        entropy = np.zeros(len(p), dtype=np.float64)
        np.subtract(entropy, terms.sum(axis=1), out=entropy)  # 0 - 0 is 0.0, where -0 is -0.0
        return entropy

    def simulate_cache(self, policy: str = "lru", capacity: int = 1) -> CacheSimulation:
        """Simulate a cache of ``capacity`` experts per layer (see the module docstring).

        Args:
            policy: ``"lru"`` or ``"lfu"`` (replay :attr:`trace`) or ``"static-hot"``
                (from :attr:`counts`).
            capacity: Experts each layer's cache holds.

        Returns:
            The hits and lookups per layer, with their hit rates.

        Raises:
            InvalidArgumentError: An unknown policy, or ``capacity`` is not an integer >= 1.
            ExpertStatsUnavailableError: ``"lru"``/``"lfu"`` without a trace.
        """
        _check_positive("capacity", capacity)
        if policy not in POLICIES:
            raise InvalidArgumentError(f"policy must be one of {', '.join(POLICIES)}; got {policy!r}")
        if policy == "static-hot":
            hot = self.hot(capacity)
            hits = np.take_along_axis(self.counts, hot, axis=1).sum(axis=1)
            lookups = self.counts.sum(axis=1)
        else:
            if self.trace_capacity == 0:
                raise ExpertStatsUnavailableError(
                    f"the {policy!r} simulation replays the per-token trace: create the model with "
                    "profile_experts_trace=N (tokens to keep) as well as profile_experts=True"
                )
            hits, lookups = simulate_cache(self.trace, policy, capacity)
        return CacheSimulation(
            policy=policy,
            capacity=capacity,
            layers=self.layers,
            hits=np.asarray(hits, dtype=np.int64),
            lookups=np.asarray(lookups, dtype=np.int64),
        )

    def to_dict(
        self, *, hot: int = 4, cache_capacity: int | None = None, simulate: Iterable[str] | None = None
    ) -> dict[str, Any]:
        """A JSON-ready summary: the counts, per-layer tokens, hot experts, entropy, and the
        hit rates of simulated caches.

        Args:
            hot: Hot experts listed per layer.
            cache_capacity: The simulated caches' capacity (default: ``n_expert_used``).
            simulate: The cache policies to simulate (None: all three, LRU/LFU only with a
                trace). LRU and LFU replay the trace in Python; a policy asked for by name that
                needs the trace when there is none has ``{"available": false, "reason": ...}``.

        Raises:
            InvalidArgumentError: ``hot`` or ``cache_capacity`` is not an integer >= 1, or an
                unknown policy.
        """
        capacity = self.n_expert_used if cache_capacity is None else cache_capacity
        _check_positive("cache_capacity", capacity)
        if simulate is None:
            policies: tuple[str, ...] = POLICIES if self.trace_capacity else ("static-hot",)
        else:
            policies = tuple(dict.fromkeys(simulate))
            unknown = [p for p in policies if p not in POLICIES]
            if unknown:
                raise InvalidArgumentError(f"policy must be one of {', '.join(POLICIES)}; got {unknown[0]!r}")
        caches: dict[str, Any] = {}
        for policy in policies:
            try:
                sim = self.simulate_cache(policy, capacity)
            except ExpertStatsUnavailableError as error:
                caches[policy] = {"available": False, "reason": str(error)}
                continue
            caches[policy] = {"hit_rate": sim.hit_rate, "per_layer": [float(r) for r in sim.hit_rates]}
        shares = self.shares()
        return {
            "n_expert": self.n_expert,
            "n_expert_used": self.n_expert_used,
            "layers": list(self.layers),
            "tokens": [int(t) for t in self.tokens],
            "counts": self.counts.tolist(),
            "entropy_bits": [float(e) for e in self.entropy()],
            "max_entropy_bits": math.log2(self.n_expert) if self.n_expert else 0.0,
            "hot": [
                [{"expert": int(e), "share": float(shares[row, e])} for e in experts]
                for row, experts in enumerate(self.hot(hot))
            ],
            "trace_capacity": self.trace_capacity,
            "trace_tokens": int(self.trace.shape[0]),
            "trace_total": self.trace_total,
            "cache": {"capacity": capacity, **caches},
        }


def simulate_cache(trace: npt.ArrayLike, policy: str, capacity: int) -> tuple[IntArray, IntArray]:
    """Replay a routing trace through one LRU or LFU cache per layer.

    Args:
        trace: Integers ``(n_tokens, n_layers, n_expert_used)``: each token's experts per
            layer in lookup order; negative entries are skipped (the layer did not route it).
        policy: ``"lru"`` or ``"lfu"``.
        capacity: Experts each layer's cache holds (it starts empty).

    Returns:
        ``(hits, lookups)``, int64 arrays of ``n_layers``.

    Raises:
        InvalidArgumentError: ``trace`` is not 3-dimensional, ``policy`` is not ``"lru"`` or
            ``"lfu"``, or ``capacity`` is not an integer >= 1.
    """
    _check_positive("capacity", capacity)
    if policy not in ("lru", "lfu"):
        raise InvalidArgumentError(f"a trace is replayed with 'lru' or 'lfu', not {policy!r}")
    routes = np.asarray(trace)
    if routes.ndim != 3:
        raise InvalidArgumentError(f"trace must be (tokens, layers, n_expert_used); got shape {routes.shape}")
    n_layers = routes.shape[1]
    hits = np.zeros(n_layers, dtype=np.int64)
    lookups = np.zeros(n_layers, dtype=np.int64)
    replay = _replay_lfu if policy == "lfu" else _replay_lru
    for layer in range(n_layers):
        column = routes[:, layer, :].ravel()
        # The lookups in order, unrouted slots (negative) dropped, as Python ints.
        experts = column[column >= 0].tolist()
        hits[layer], lookups[layer] = replay(experts, capacity), len(experts)
    return hits, lookups


def _replay_lru(experts: list[int], capacity: int) -> int:
    """Hits of one layer's LRU cache: an OrderedDict in recency order (oldest first)."""
    cache: OrderedDict[int, None] = OrderedDict()
    hits = 0
    for expert in experts:
        if expert in cache:
            hits += 1
            cache.move_to_end(expert)
            continue
        if len(cache) >= capacity:
            cache.popitem(last=False)
        cache[expert] = None
    return hits


def _replay_lfu(experts: list[int], capacity: int) -> int:
    """Hits of one layer's LFU cache, evicting the cached expert with the fewest uses so far,
    ties to the least recently used: the smallest ``(uses, last use)``.

    A heap of ``(uses, last use, expert)`` entries, one pushed at every lookup; an entry is
    stale once its expert is looked up again or evicted, and stale entries are dropped when
    they reach the top (or all at once when the heap outgrows the cache): O(log n) a lookup.
    """
    uses: dict[int, int] = {}
    last: dict[int, int] = {}  # the lookup index of each cached expert's latest use
    heap: list[tuple[int, int, int]] = []
    hits = 0
    for now, expert in enumerate(experts):
        n = uses[expert] = uses.get(expert, 0) + 1
        if expert in last:
            hits += 1
        elif len(last) >= capacity:
            while True:
                _, at, victim = heapq.heappop(heap)
                if last.get(victim) == at:  # each lookup has its own index: the latest entry
                    break
            del last[victim]
        last[expert] = now
        heapq.heappush(heap, (n, now, expert))
        if len(heap) > 4 * capacity + 64:
            heap = [(uses[e], at, e) for e, at in last.items()]
            heapq.heapify(heap)
    return hits


def _check_positive(name: str, value: object) -> None:
    if not isinstance(value, int) or isinstance(value, bool) or value < 1:
        raise InvalidArgumentError(f"{name} must be an integer >= 1, got {value!r}")


def expert_stats(
    profiler: _core.ExpertProfiler | None, profile_experts: bool, model: _core.Model, *, reset: bool = False
) -> ExpertStats:
    """What a front end's ``expert_stats()`` returns, or why there is nothing.

    Args:
        reset: Reset the collector atomically with the copy (see :meth:`ExpertStats.from_profiler`).

    Raises:
        ExpertStatsUnavailableError: Profiling is off, or the model has no experts.
    """
    if profiler is not None:
        return ExpertStats.from_profiler(profiler, reset=reset)
    if not profile_experts:
        raise ExpertStatsUnavailableError(
            "expert routing is not profiled: create the model with profile_experts=True "
            "(Llama or LlamaPool; the server: --profile-experts)"
        )
    arch = dict(model.metadata()).get("general.architecture", "?")
    raise ExpertStatsUnavailableError(
        f"the model has no experts to profile (a dense model: {arch}.expert_count is missing or 0)"
    )
