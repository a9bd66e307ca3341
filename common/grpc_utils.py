"""gRPC bootstrap shared by every service: server and channel options, health and reflection, graceful stop."""

from __future__ import annotations

import asyncio
import contextlib
import logging
import signal
from collections.abc import Awaitable, Callable

import grpc
from grpc_health.v1 import health, health_pb2, health_pb2_grpc
from grpc_reflection.v1alpha import reflection

from common.interceptors import Activity
from common.metrics import RpcMetrics
from common.ports import PortInUse, can_bind
from common.security import process_auth

logger = logging.getLogger(__name__)

# Image embeddings of a 12-megapixel photo on a 7B model are ~110 MB: raised on purpose, for every hop.
MAX_MESSAGE_BYTES = 1024 * 1024 * 1024 - 1
_COMMON_OPTIONS = [
    ("grpc.max_send_message_length", MAX_MESSAGE_BYTES),
    ("grpc.max_receive_message_length", MAX_MESSAGE_BYTES),
    ("grpc.keepalive_time_ms", 30_000),
    ("grpc.keepalive_timeout_ms", 10_000),
    ("grpc.http2.max_pings_without_data", 0),
    ("grpc.keepalive_permit_without_calls", 1),
]
SERVER_OPTIONS = [
    *_COMMON_OPTIONS,
    ("grpc.http2.min_ping_interval_without_data_ms", 10_000),
    ("grpc.so_reuseport", 0),
]
CHANNEL_OPTIONS = [*_COMMON_OPTIONS, ("grpc.enable_retries", 1)]


def create_channel(address: str) -> grpc.aio.Channel:
    """An aio channel carrying this process's internal credentials (common/security.py)."""
    return process_auth().aio_channel(address, CHANNEL_OPTIONS)


def create_sync_channel(address: str) -> grpc.Channel:
    """The blocking twin of `create_channel` (for calls made from a model thread)."""
    return process_auth().sync_channel(address, CHANNEL_OPTIONS)


class ServiceHealth:
    """grpc.health.v1 for one service: NOT_SERVING until `set_serving(True)` (after load and warm-up)."""

    def __init__(self, server: grpc.aio.Server, service_name: str):
        self.servicer = health.aio.HealthServicer()
        self.service_name = service_name
        health_pb2_grpc.add_HealthServicer_to_server(self.servicer, server)

    async def set_serving(self, serving: bool) -> None:
        status = (
            health_pb2.HealthCheckResponse.SERVING if serving else health_pb2.HealthCheckResponse.NOT_SERVING
        )
        for name in ("", self.service_name):
            await self.servicer.set(name, status)


class Fatal:
    """Where a service's background loops report their death: `serve_until_signal` then turns health NOT_SERVING,
    stops the server and raises, so the process logs the traceback and exits non-zero (and `mirador up`, compose or
    Kubernetes restart it) instead of serving on with a dead loop."""

    def __init__(self) -> None:
        self.error: BaseException | None = None
        self._event: asyncio.Event | None = None

    def report(self, error: BaseException, what: str) -> None:
        if self.error is not None:
            return
        logger.critical("%s died", what, exc_info=(type(error), error, error.__traceback__))
        self.error = RuntimeError(f"{what} died: {type(error).__name__}: {error}")
        self.error.__cause__ = error
        if self._event is not None:
            self._event.set()

    def watch(self, task: asyncio.Task, what: str, *, must_run: bool = True) -> asyncio.Task:
        """Report the task's exception, or its return when it was meant to run until cancelled."""

        def done(t: asyncio.Task) -> None:
            if t.cancelled():
                return
            if t.exception() is not None:
                self.report(t.exception(), what)
            elif must_run:
                self.report(RuntimeError("returned"), what)

        task.add_done_callback(done)
        return task

    async def wait(self) -> BaseException:
        if self._event is None:
            self._event = asyncio.Event()
            if self.error is not None:
                self._event.set()
        await self._event.wait()
        return self.error


def create_server(
    servicer, add_to_server: Callable, service_name: str, host: str, port: int
) -> tuple[grpc.aio.Server, int]:
    """An aio server with the servicer, health (NOT_SERVING, set on `servicer.health`), reflection and a count of
    calls in flight (`servicer.activity`, what a drain without its own condition waits on), bound to
    host:port (0 picks one). With internal authentication configured (common/security.py) it listens with TLS
    and/or checks the shared token, and admits only the roles that call `service_name`."""
    auth = process_auth()
    activity = Activity()
    server = grpc.aio.server(
        options=SERVER_OPTIONS,
        interceptors=[*auth.server_interceptors(service_name), activity, RpcMetrics(service_name)],
    )
    add_to_server(servicer, server)
    servicer.activity = activity
    servicer.health = ServiceHealth(server, service_name)
    servicer.fatal = Fatal()
    reflection.enable_server_reflection([service_name, health.SERVICE_NAME, reflection.SERVICE_NAME], server)
    address = f"{host}:{port}" if ":" not in host else f"[{host}]:{port}"
    creds = auth.server_credentials()
    try:
        bound = server.add_secure_port(address, creds) if creds else server.add_insecure_port(address)
    except RuntimeError:  # grpcio raises where older builds returned 0
        bound = 0
    if bound == 0:
        if port and not can_bind(host, port):
            raise PortInUse("gRPC", host, port)
        raise OSError(f"could not bind {host}:{port}")
    return server, bound


async def serve_until_signal(
    server: grpc.aio.Server,
    service_health: ServiceHealth,
    startup: Callable[[], Awaitable[None]],
    grace_s: float = 5.0,
    on_stop: Callable[[], Awaitable[None]] | None = None,
    fatal: Fatal | None = None,
    drain: Callable[[], Awaitable[None]] | None = None,
    drain_timeout_s: float = 30.0,
) -> None:
    """Start, run `startup` (load, warm up, then flip health to SERVING), and stop gracefully on SIGTERM/SIGINT:
    NOT_SERVING at once, then `drain` (refuse new work, let what is in flight finish) for up to `drain_timeout_s`,
    then `on_stop`. When a background loop reports to `fatal`, turn NOT_SERVING, stop at once and raise."""
    loop = asyncio.get_running_loop()
    stop = asyncio.Event()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, stop.set)
    await server.start()
    await service_health.set_serving(False)
    startup_task = asyncio.create_task(startup())
    stop_task = asyncio.create_task(stop.wait())
    fatal_task = asyncio.create_task((fatal or Fatal()).wait())
    done, _ = await asyncio.wait({startup_task, stop_task}, return_when=asyncio.FIRST_COMPLETED)
    if startup_task in done and startup_task.exception() is not None:
        stop_task.cancel()
        fatal_task.cancel()
        await server.stop(0)
        raise startup_task.exception()
    done, _ = await asyncio.wait({stop_task, fatal_task}, return_when=asyncio.FIRST_COMPLETED)
    if fatal_task in done:
        stop_task.cancel()
        startup_task.cancel()
        await service_health.set_serving(False)
        if on_stop is not None:
            with contextlib.suppress(Exception):
                await asyncio.wait_for(on_stop(), 5)
        await server.stop(1.0)
        raise fatal_task.result()
    fatal_task.cancel()
    logger.info("shutting down (grace %.0f s)", grace_s)
    startup_task.cancel()
    await service_health.set_serving(False)
    if drain is not None:
        logger.info(
            "draining: NOT_SERVING, so callers send no new work; waiting up to %.0f s for the work in flight",
            drain_timeout_s,
        )
        try:
            await asyncio.wait_for(drain(), drain_timeout_s)
            logger.info("drained")
        except (TimeoutError, asyncio.TimeoutError):
            logger.warning("work still in flight after %.0f s; stopping anyway", drain_timeout_s)
    if on_stop is not None:
        await on_stop()
    await server.stop(grace_s)


async def wait_serving(address: str, timeout_s: float, service: str = "") -> None:
    """Poll grpc.health.v1 until SERVING (used by `mirador up`, the scheduler and tests)."""
    deadline = asyncio.get_running_loop().time() + timeout_s
    async with create_channel(address) as channel:
        stub = health_pb2_grpc.HealthStub(channel)
        last = "no answer"
        while asyncio.get_running_loop().time() < deadline:
            try:
                resp = await stub.Check(health_pb2.HealthCheckRequest(service=service), timeout=2.0)
                if resp.status == health_pb2.HealthCheckResponse.SERVING:
                    return
                last = health_pb2.HealthCheckResponse.ServingStatus.Name(resp.status)
            except grpc.aio.AioRpcError as e:
                last = e.code().name
            await asyncio.sleep(0.1)
        raise TimeoutError(f"{address} not SERVING after {timeout_s:.0f} s (last: {last})")
