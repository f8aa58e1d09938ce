"""Prometheus metrics of one app (a registry per app: two apps in a process never mix counts).

Counters and histograms are recorded by the routes; the pools' gauges (busy slots, waiting
requests, KV cache tokens and capacity), token counters and the histogram of the wait for a
slot (measured by the engine as it admits requests) are read from :meth:`LlamaPool.stats` at
scrape time.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Iterator, Mapping
from dataclasses import dataclass, field

from prometheus_client import CollectorRegistry, Counter, Histogram, generate_latest
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, HistogramMetricFamily, Metric
from prometheus_client.registry import Collector

from llama_cpp.server.registry import Pool

__all__ = ["Metrics", "RequestTimer"]

_LATENCY_BUCKETS = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0, 120.0)


class _PoolCollector(Collector):
    def __init__(self, pools: Callable[[], Mapping[str, Pool]]) -> None:
        self._pools = pools

    def collect(self) -> Iterator[Metric]:
        gauges = {
            "n_busy": GaugeMetricFamily("llamacpp_busy_slots", "Slots running a request", labels=["model"]),
            "n_waiting": GaugeMetricFamily(
                "llamacpp_requests_waiting", "Requests queued for a slot", labels=["model"]
            ),
            "n_slots": GaugeMetricFamily("llamacpp_slots", "Slots of the model's pool", labels=["model"]),
        }
        capacity = GaugeMetricFamily(
            "llamacpp_kv_cache_capacity_tokens",
            "Tokens the pool's KV cache holds at most (slots x context of each)",
            labels=["model"],
        )
        cached = GaugeMetricFamily(
            "llamacpp_kv_cache_tokens",
            "Tokens the pool's sequences hold in the KV cache (a prefix shared by several counts in each)",
            labels=["model"],
        )
        queue_time = HistogramMetricFamily(
            "llamacpp_queue_time_seconds",
            "From submission to the engine until a slot took the request",
            labels=["model"],
        )
        counters = {
            "n_prompt_evaluated": CounterMetricFamily(
                "llamacpp_prompt_tokens_evaluated", "Prompt tokens decoded", labels=["model"]
            ),
            "n_prompt_reused": CounterMetricFamily(
                "llamacpp_prompt_tokens_reused",
                "Prompt tokens served from the prefix cache",
                labels=["model"],
            ),
            "n_decode_calls": CounterMetricFamily(
                "llamacpp_decode_calls", "llama_decode calls", labels=["model"]
            ),
        }
        for alias, pool in self._pools().items():
            try:
                stats = pool.stats()
            except Exception:  # closed between listing and reading: nothing to report
                continue
            for name, family in gauges.items():
                family.add_metric([alias], getattr(stats, name))
            for name, counter in counters.items():
                counter.add_metric([alias], getattr(stats, name))
            capacity.add_metric([alias], stats.n_slots * pool.n_ctx())
            cached.add_metric([alias], stats.n_cached_tokens)
            if stats.queue_time_buckets:  # none while an isolated pool's process is being reloaded
                bounds = stats.queue_time_buckets
                buckets = [("+Inf" if le == float("inf") else repr(le), n) for le, n in bounds]
                queue_time.add_metric([alias], buckets, stats.queue_time_sum)
        yield from gauges.values()
        yield capacity
        yield cached
        yield queue_time
        yield from counters.values()


@dataclass
class Metrics:
    """The app's metrics; ``pools`` lists the resident models at scrape time."""

    pools: Callable[[], Mapping[str, Pool]]
    registry: CollectorRegistry = field(default_factory=CollectorRegistry)

    def __post_init__(self) -> None:
        r = self.registry
        self.requests = Counter(
            "llamacpp_requests", "HTTP requests by endpoint and status", ["endpoint", "status"], registry=r
        )
        self.running = Counter("llamacpp_generations", "Generations started", ["model"], registry=r)
        self.prompt_tokens = Counter(
            "llamacpp_prompt_tokens", "Prompt tokens of requests", ["model"], registry=r
        )
        self.generated_tokens = Counter(
            "llamacpp_generated_tokens", "Tokens generated", ["model"], registry=r
        )
        self.ttft = Histogram(
            "llamacpp_time_to_first_token_seconds", "Time to first token", ["model"],
            buckets=_LATENCY_BUCKETS, registry=r,
        )  # fmt: skip
        self.itl = Histogram(
            "llamacpp_inter_token_latency_seconds", "Time between streamed tokens", ["model"],
            buckets=_LATENCY_BUCKETS, registry=r,
        )  # fmt: skip
        self.e2e = Histogram(
            "llamacpp_request_latency_seconds", "End-to-end generation latency", ["model"],
            buckets=_LATENCY_BUCKETS, registry=r,
        )  # fmt: skip
        self.to_engine = Histogram(
            "llamacpp_time_to_engine_seconds",
            "Streamed requests: from arrival until the model's engine has the request (model load "
            "or lease, chat template, tokenization); the engine's own queue wait is not included",
            ["model"], buckets=_LATENCY_BUCKETS, registry=r,
        )  # fmt: skip
        self.prefix_hits = Counter(
            "llamacpp_prefix_cache_hits",
            "Requests whose prompt started with a cached prefix (usage cached_tokens > 0)",
            ["model"], registry=r,
        )  # fmt: skip
        self.cached_tokens = Counter(
            "llamacpp_prompt_tokens_cached",
            "Prompt tokens of requests served from the prefix cache (usage cached_tokens)",
            ["model"], registry=r,
        )  # fmt: skip
        r.register(_PoolCollector(self.pools))

    def render(self) -> bytes:
        """The Prometheus text exposition."""
        return generate_latest(self.registry)

    def timer(self, model: str) -> RequestTimer:
        self.running.labels(model).inc()
        return RequestTimer(self, model)


@dataclass
class RequestTimer:
    """Times one generation: first token, gaps between tokens, the whole request."""

    metrics: Metrics
    model: str
    start: float = field(default_factory=time.perf_counter)
    last: float | None = None

    def submitted(self) -> None:
        """The model's engine has the request (a stream has started)."""
        self.metrics.to_engine.labels(self.model).observe(time.perf_counter() - self.start)

    def token(self) -> None:
        """A token (a streamed chunk with content) went out."""
        now = time.perf_counter()
        if self.last is None:
            self.metrics.ttft.labels(self.model).observe(now - self.start)
        else:
            self.metrics.itl.labels(self.model).observe(now - self.last)
        self.last = now

    def finish(self, usage: Mapping[str, object] | None) -> None:
        """The request ended; ``usage`` is its OpenAI usage (None if it failed)."""
        now = time.perf_counter()
        if self.last is None and usage is not None:  # not streamed: the answer is the first token
            self.metrics.ttft.labels(self.model).observe(now - self.start)
        self.metrics.e2e.labels(self.model).observe(now - self.start)
        if usage is not None:
            prompt, completion = usage.get("prompt_tokens", 0), usage.get("completion_tokens", 0)
            self.metrics.prompt_tokens.labels(self.model).inc(prompt if isinstance(prompt, int) else 0)
            self.metrics.generated_tokens.labels(self.model).inc(
                completion if isinstance(completion, int) else 0
            )
            details = usage.get("prompt_tokens_details")
            cached = details.get("cached_tokens", 0) if isinstance(details, Mapping) else 0
            if isinstance(cached, int) and cached > 0:
                self.metrics.prefix_hits.labels(self.model).inc()
                self.metrics.cached_tokens.labels(self.model).inc(cached)
