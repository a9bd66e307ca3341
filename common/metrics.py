"""Prometheus metrics shared by the services: the `mirador:` names and buckets (modelled on SGLang's `sglang:` and
vLLM's `vllm:` ones, so their dashboards port with a rename), a gRPC service's metrics HTTP endpoint, the per-RPC
interceptor, and collectors that read a core's plain counters at scrape time (nothing on the hot path).

prometheus-client is imported by whoever imports this module: the gateway sets PROMETHEUS_MULTIPROC_DIR before that
when it runs several worker processes (the client picks its value store at import).
"""

from __future__ import annotations

import asyncio
import errno
import logging
import threading
import time
from collections.abc import Callable, Iterable
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

import grpc
from prometheus_client import CONTENT_TYPE_LATEST, REGISTRY, Counter, Histogram, generate_latest
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily
from prometheus_client.registry import Collector

from common.interceptors import wrap_handler
from common.ports import PortInUse

logger = logging.getLogger(__name__)

PREFIX = "mirador:"
# Request-level latencies (TTFT, e2e, queue): 1 ms to 30 min, denser where interactive serving lives.
REQUEST_BUCKETS = (
    0.001, 0.005, 0.01, 0.02, 0.04, 0.06, 0.08, 0.1, 0.25, 0.5, 0.75, 1.0, 2.5, 5.0, 7.5, 10.0, 20.0, 40.0,
    80.0, 160.0, 640.0, 1800.0,
)  # fmt: skip
# Per-token and per-step times: 0.5 ms to 10 s.
STEP_BUCKETS = (
    0.0005, 0.001, 0.002, 0.005, 0.01, 0.015, 0.02, 0.025, 0.03, 0.04, 0.05, 0.075, 0.1, 0.15, 0.2, 0.3,
    0.4, 0.5, 0.75, 1.0, 2.5, 5.0, 10.0,
)  # fmt: skip


def model_label(args) -> str:
    """The `model_name` label: the name clients send where the service knows it, else the model path."""
    return getattr(args, "served_model_name", "") or getattr(args, "model_path", "")


def start_metrics_server(host: str, port: int) -> int:
    """Serve this process's default registry over plain HTTP on host:port (0 picks one), on a daemon thread;
    returns the port. Always the classic text format, as the gateway's /metrics: prometheus-client's own server
    answers Prometheus' OpenMetrics request with the names' colons escaped to underscores (0.26), so one metric
    would be stored under two names depending on which service exported it."""
    try:
        server = ThreadingHTTPServer((host, port), _MetricsHandler)
    except OSError as e:
        if e.errno == errno.EADDRINUSE:
            raise PortInUse("metrics", host, port) from e
        raise
    server.daemon_threads = True
    threading.Thread(target=server.serve_forever, name="metrics-http", daemon=True).start()
    return server.server_address[1]


class _MetricsHandler(BaseHTTPRequestHandler):
    def do_GET(self) -> None:  # noqa: N802 - http.server's name
        if self.path.split("?", 1)[0] not in ("/metrics", "/"):
            self.send_error(404)
            return
        body = generate_latest(REGISTRY)
        self.send_response(200)
        self.send_header("Content-Type", CONTENT_TYPE_LATEST)
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)

    def log_message(self, format, *args) -> None:  # noqa: A002 - scrapes are not worth a log line each
        pass


# ---- per-RPC latency and errors (every gRPC service) ----

_rpc: tuple[Histogram, Counter] | None = None


def _rpc_metrics() -> tuple[Histogram, Counter]:
    global _rpc
    if _rpc is None:  # once per process, whichever services it holds (tests start several)
        _rpc = (
            Histogram(
                PREFIX + "rpc_latency_seconds",
                "Latency of unary gRPC calls served, seconds (streams are long-lived and not timed).",
                ["service", "method"],
                buckets=REQUEST_BUCKETS,
            ),
            Counter(
                PREFIX + "rpc_errors",
                "gRPC calls served that ended with a status other than OK, by code.",
                ["service", "method", "code"],
            ),
        )
    return _rpc


class RpcMetrics(grpc.aio.ServerInterceptor):
    """Times each unary call and counts every call that ends in an error status, labelled by the service and the
    method's short name (a fixed set per service: bounded cardinality)."""

    _IGNORED = ("/grpc.health.v1.", "/grpc.reflection.")

    def __init__(self, service: str) -> None:
        self.service = service.rsplit(".", 1)[-1].lower()
        self.latency, self.errors = _rpc_metrics()

    async def intercept_service(self, continuation, handler_call_details):
        handler = await continuation(handler_call_details)
        if handler is None or handler_call_details.method.startswith(self._IGNORED):
            return handler
        method = handler_call_details.method.rsplit("/", 1)[-1]
        timed = not handler.response_streaming  # streams are long-lived: errors counted, not timed

        async def enter(context) -> float | None:
            return time.perf_counter() if timed else None

        def leave(started, context, error) -> None:
            self.record(method, context, started, error)

        return wrap_handler(handler, enter, leave)

    def record(self, method: str, context, started: float | None, error: BaseException | None) -> None:
        code = context.code()
        if code is None and error is not None:
            # a caller that went away cancels the handler; any other exception is grpc's UNKNOWN
            cancelled = isinstance(error, asyncio.CancelledError | GeneratorExit)
            code = grpc.StatusCode.CANCELLED if cancelled else grpc.StatusCode.UNKNOWN
        if code is not None and code != grpc.StatusCode.OK:
            name = code.name if isinstance(code, grpc.StatusCode) else str(code)
            self.errors.labels(self.service, method, name).inc()
        if started is not None:
            self.latency.labels(self.service, method).observe(time.perf_counter() - started)


_transfer: Histogram | None = None


def embedding_transfer_histogram() -> Histogram:
    """The worker's pulls of image embeddings from the vision service (by reference or by value)."""
    global _transfer
    if _transfer is None:
        _transfer = Histogram(
            PREFIX + "embedding_transfer_seconds",
            "Time of one pull of image embeddings from the vision service into the worker, seconds.",
            ["model_name", "service"],
            buckets=STEP_BUCKETS,
        )
    return _transfer


# ---- scrape-time collectors ----


class ScrapeCollector(Collector):
    """Metric families computed when Prometheus scrapes, from a core's own counters and gauges: the hot path keeps
    incrementing plain ints and nothing else. `key` names it, so a process that builds the same service again
    (tests) replaces the earlier one instead of registering a duplicate."""

    _live: dict[str, ScrapeCollector] = {}

    def __init__(self, key: str, collect: Callable[[], Iterable]):
        self._collect = collect
        old = self._live.pop(key, None)
        if old is not None:
            REGISTRY.unregister(old)
        REGISTRY.register(self)
        self._live[key] = self

    def collect(self):
        try:
            yield from self._collect()
        except Exception:  # noqa: BLE001 - a scrape must not fail because a core is mid-restart
            logger.exception("collecting metrics failed")

    def describe(self):
        return []  # computed families: no description at registration (so no collect() at import)


def counter(name: str, doc: str, labels: dict[str, str], value: float) -> CounterMetricFamily:
    m = CounterMetricFamily(PREFIX + name, doc, labels=list(labels))
    m.add_metric(list(labels.values()), value)
    return m


def gauge(name: str, doc: str, labels: dict[str, str], value: float) -> GaugeMetricFamily:
    m = GaugeMetricFamily(PREFIX + name, doc, labels=list(labels))
    m.add_metric(list(labels.values()), value)
    return m
