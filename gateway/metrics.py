"""The gateway's Prometheus metrics: request latencies as clients see them (time to first token, inter-token
latency, time per output token, end to end) and HTTP responses by status. With several worker processes
(--gateway-workers) each writes its samples to files in one directory (prometheus-client's multiprocess mode, set up
by gateway/__main__.py before the client is imported) and /metrics merges them."""

from __future__ import annotations

import bisect
import os
import time
from collections.abc import AsyncIterator

from prometheus_client import (
    CONTENT_TYPE_LATEST,
    REGISTRY,
    CollectorRegistry,
    Counter,
    Histogram,
    generate_latest,
    multiprocess,
)

from common.metrics import PREFIX, REQUEST_BUCKETS, STEP_BUCKETS
from common.types import GenerateOutput

MULTIPROC_ENV = "PROMETHEUS_MULTIPROC_DIR"
# the `endpoint` label: these paths, everything else is "other" (bounded cardinality whatever clients send)
ENDPOINTS = frozenset(
    {
        "/v1/chat/completions",
        "/v1/completions",
        "/generate",
        "/v1/models",
        "/health",
        "/metrics",
        "/model_info",
        "/get_model_info",
        "/server_info",
        "/get_server_info",
    }
)

_families: dict[str, Histogram | Counter] = {}


def _families_once() -> dict[str, Histogram | Counter]:
    if not _families:
        labels = ["model_name", "service"]
        _families.update(
            ttft=Histogram(
                PREFIX + "time_to_first_token_seconds",
                "Time from the request's arrival at the gateway to its first output token, seconds.",
                labels,
                buckets=REQUEST_BUCKETS,
            ),
            itl=Histogram(
                PREFIX + "inter_token_latency_seconds",
                "Time between output tokens as the gateway receives them (a message carrying k tokens after a gap "
                "counts once, at gap / k), seconds.",
                labels,
                buckets=STEP_BUCKETS,
            ),
            tpot=Histogram(
                PREFIX + "time_per_output_token_seconds",
                "Per request: (end-to-end latency - time to first token) / (output tokens - 1), seconds.",
                labels,
                buckets=STEP_BUCKETS,
            ),
            e2e=Histogram(
                PREFIX + "e2e_request_latency_seconds",
                "Time from the request's arrival at the gateway to its last output, seconds.",
                labels,
                buckets=REQUEST_BUCKETS,
            ),
            http=Counter(
                PREFIX + "http_requests",
                "HTTP responses of the gateway, by endpoint and status code.",
                [*labels, "endpoint", "status"],
            ),
        )
    return _families


class GatewayMetrics:
    def __init__(self, model_name: str):
        f = _families_once()
        self.model_name = model_name
        self.ttft = f["ttft"].labels(model_name, "gateway")
        self.itl = f["itl"].labels(model_name, "gateway")
        self.tpot = f["tpot"].labels(model_name, "gateway")
        self.e2e = f["e2e"].labels(model_name, "gateway")
        self._http = f["http"]

    def count_response(self, path: str, status: int) -> None:
        endpoint = path if path in ENDPOINTS else "other"
        self._http.labels(self.model_name, "gateway", endpoint, str(status)).inc()

    def timer(self, arrival: float) -> RequestTimer:
        """The latencies of one streamed request, fed by whatever loop reads its outputs."""
        return RequestTimer(self, arrival)

    async def track(
        self, outs: AsyncIterator[GenerateOutput], arrival: float, stream: bool
    ) -> AsyncIterator[GenerateOutput]:
        """Pass a request's outputs through, timing them: one observation per message, not per token. Only
        streamed requests time their tokens (one that is not streamed gets its text in one message at the end);
        every request that completes times its end. (The gateway's streams call a `timer` from their own loop
        instead: one async generator fewer per streamed message.)"""
        timer = RequestTimer(self, arrival)
        try:
            async for out in outs:
                if stream:
                    timer.output(len(out.token_ids))
                yield out
        finally:
            timer.flush()
            # a caller that stops early aborts the request now, not when the generator is collected
            await outs.aclose()
        timer.end()


class RequestTimer:
    """One request's time to first token, inter-token latencies (one observation per message: a message
    carrying k tokens after a gap counts once, at gap / k), and at its end, its end-to-end latency and time per
    output token."""

    __slots__ = ("metrics", "arrival", "first", "last", "num_tokens", "itl")

    def __init__(self, metrics: GatewayMetrics, arrival: float):
        self.metrics = metrics
        self.arrival = arrival
        self.first: float | None = None
        self.last = 0.0
        self.num_tokens = 0
        self.itl = BatchedObservations(metrics.itl)

    def output(self, n: int) -> None:
        """A message of n tokens arrived now."""
        if not n:
            return
        now = time.perf_counter()
        if self.first is None:
            self.first = now
            self.metrics.ttft.observe(now - self.arrival)
        else:
            self.itl.observe((now - self.last) / n)
        self.last = now
        self.num_tokens += n

    def flush(self) -> None:
        """Hand over the inter-token latencies held back (the request ended, or gave up)."""
        self.itl.flush()

    def end(self) -> None:
        """The request completed."""
        self.metrics.e2e.observe(time.perf_counter() - self.arrival)
        if self.num_tokens > 1:
            self.metrics.tpot.observe((self.last - self.first) / (self.num_tokens - 1))


class BatchedObservations:
    """One request's observations of a histogram, counted here (a bisect and a list increment) and added to the
    histogram every FLUSH_EVERY observations and when the request ends: prometheus-client's `observe` takes a lock
    for the sum and for a bucket (~1.5 us, paid for every streamed message otherwise). The histogram's
    exposition is the same as with one `observe` each; a scrape sees a live stream's last < FLUSH_EVERY later."""

    FLUSH_EVERY = 64
    __slots__ = ("child", "bounds", "counts", "total", "num")

    def __init__(self, child: Histogram):
        self.child = child
        # the child's own bounds (+Inf last) and values: private to prometheus-client, so without them this
        # falls back to one observe each
        self.bounds: list[float] | None = getattr(child, "_upper_bounds", None)
        if not hasattr(child, "_buckets") or not hasattr(child, "_sum"):
            self.bounds = None
        self.counts = [0] * len(self.bounds) if self.bounds is not None else []
        self.total = 0.0
        self.num = 0

    def observe(self, amount: float) -> None:
        if self.bounds is None:
            self.child.observe(amount)
            return
        # the first bound >= amount: the bucket observe() picks (`amount <= bound`)
        self.counts[bisect.bisect_left(self.bounds, amount)] += 1
        self.total += amount
        self.num += 1
        if self.num >= self.FLUSH_EVERY:
            self.flush()

    def flush(self) -> None:
        if not self.num:
            return
        buckets, counts = self.child._buckets, self.counts
        for i, count in enumerate(counts):
            if count:
                buckets[i].inc(count)
                counts[i] = 0
        self.child._sum.inc(self.total)
        self.total, self.num = 0.0, 0


def render() -> tuple[bytes, str]:
    """The exposition of this gateway: every worker process's samples merged in multiprocess mode."""
    if os.environ.get(MULTIPROC_ENV):
        registry = CollectorRegistry()
        multiprocess.MultiProcessCollector(registry)
        return generate_latest(registry), CONTENT_TYPE_LATEST
    return generate_latest(REGISTRY), CONTENT_TYPE_LATEST
