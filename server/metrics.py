"""Prometheus metrics of the reward server, in a registry of its own (one per app)."""

from __future__ import annotations

from collections.abc import Callable

from prometheus_client import (
    GC_COLLECTOR,
    PLATFORM_COLLECTOR,
    PROCESS_COLLECTOR,
    CollectorRegistry,
    Counter,
    Gauge,
    Histogram,
    Info,
)
from prometheus_client.core import CounterMetricFamily

LATENCY_BUCKETS = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60, 120)


class _ReferenceCacheCollector:
    """The reference cache's own hit and miss counts, read at each scrape: every lookup counts, as in /info,
    also those of requests that ended in 499, 504 or 500."""

    def __init__(self, cache_of: Callable[[], object | None]):
        self.cache_of = cache_of

    def collect(self):
        family = CounterMetricFamily("dporm_reference_cache", "Reference log-prob cache lookups", labels=["result"])
        cache = self.cache_of()
        if cache is not None:
            family.add_metric(["hit"], cache.hits)
            family.add_metric(["miss"], cache.misses)
        yield family


PHASES = ("tokenize", "queue")  # a request's phases before its forward; forwards are timed per batch
FORWARDS = ("main", "recheck")  # a batch's forward, or bf16-paired's float32 rescoring of close groups (--recheck)


class ServerMetrics:
    def __init__(self, cache_of: Callable[[], object | None] = lambda: None, version: str = "",
                 endpoints: tuple[str, ...] = ()) -> None:  # fmt: skip
        """``cache_of``: the served model's reference cache (None while loading); ``endpoints``: the inference
        routes, whose series exist from the start (a rate over a series that appears late misses its start)."""
        self.registry = CollectorRegistry()
        r = self.registry
        for collector in (PROCESS_COLLECTOR, PLATFORM_COLLECTOR, GC_COLLECTOR):  # memory, CPU, open files, GC
            r.register(collector)
        Info("dporm_build", "The server's version", registry=r).info({"version": version})
        self.requests = Counter(
            "dporm_requests", "HTTP requests by endpoint and status code", ["endpoint", "code"], registry=r
        )
        self.request_seconds = Histogram(
            "dporm_request_seconds",
            "Time from a request's arrival to its answer, per inference endpoint (errors included)",
            ["endpoint"],
            buckets=LATENCY_BUCKETS,
            registry=r,
        )
        self.latency = Histogram(
            "dporm_phase_seconds",
            "Time per request in each phase: tokenize (from the request's arrival at the tokenizer's queue, its "
            "wait included), queue (waiting for the model, also by requests that gave up there)",
            ["phase"],
            buckets=LATENCY_BUCKETS,
            registry=r,
        )
        self.forward_seconds = Histogram(
            "dporm_forward_seconds",
            "Time per forward batch: main, or recheck (float32 rescoring of close groups)",
            ["kind"],
            buckets=LATENCY_BUCKETS,
            registry=r,
        )
        for phase in PHASES:
            self.latency.labels(phase)
        for kind in FORWARDS:
            self.forward_seconds.labels(kind)
        for endpoint in endpoints:
            self.request_seconds.labels(endpoint)
        self.tokenize_waiting = Gauge(
            "dporm_tokenize_requests", "Requests waiting for the tokenizer or being tokenized", registry=r
        )
        self.queue_requests = Gauge("dporm_queue_requests", "Requests waiting for the model", registry=r)
        self.queue_tokens = Gauge("dporm_queue_tokens", "Tokens waiting for the model", registry=r)
        self.batch_sequences = Histogram(
            "dporm_batch_sequences",
            "Sequences per forward batch",
            buckets=(1, 2, 4, 8, 16, 32, 64, 128, 256),
            registry=r,
        )
        self.batch_tokens = Histogram(
            "dporm_batch_tokens",
            "Tokens per forward batch",
            buckets=(64, 256, 1024, 2048, 4096, 8192, 16384, 32768),
            registry=r,
        )
        r.register(_ReferenceCacheCollector(cache_of))
        self.truncations = Counter("dporm_truncations", "Sequences truncated to fit max_length", registry=r)
        self.rechecked = Counter("dporm_rechecked_groups", "Close groups rescored by the float32 models", registry=r)

    def observe(self, name: str, value: float) -> None:
        """Hook for the batcher's worker thread."""
        if name == "queue_seconds":
            self.latency.labels("queue").observe(value)
        elif name == "forward_seconds":
            self.forward_seconds.labels("main").observe(value)
        elif name == "recheck_seconds":
            self.forward_seconds.labels("recheck").observe(value)
        elif name == "batch_sequences":
            self.batch_sequences.observe(value)
        elif name == "batch_tokens":
            self.batch_tokens.observe(value)
        elif name == "rechecked_groups":
            self.rechecked.inc(value)
