"""`mirador up`: the four services as separate processes on loopback, started, watched and stopped together."""

from __future__ import annotations

import asyncio
import contextlib
import ctypes
import dataclasses
import logging
import os
import signal
import subprocess
import sys
import time
import typing
from dataclasses import dataclass

import httpx

from common.args import ArgsBase, arg
from common.grpc_utils import wait_serving
from common.ports import EXIT_PORT_IN_USE, can_bind, free_port
from common.security import TOKEN_ENV
from gateway.config import GatewayArgs
from scheduler_svc.config import SchedulerArgs
from vision_svc.config import VisionArgs
from worker_svc.config import WorkerArgs

logger = logging.getLogger("mirador.up")
# Start-ups of the whole cluster when a service finds a port `up` picked for it taken by another process in the
# moment between the pick and its bind (ports can only be checked, not reserved, across processes).
PORT_ATTEMPTS = 3


@dataclass(frozen=True)
class _UpOnly(ArgsBase):
    model_path: str = arg(
        "",
        "model directory or Hugging Face Hub id (default: the embedded tiny Qwen2.5-VL)",
        aliases=("--model",),
    )
    host: str = arg("127.0.0.1", "HTTP address of the gateway")
    port: int = arg(8000, "HTTP port of the gateway")
    grpc_host: str = arg("127.0.0.1", "address the internal gRPC services listen on")
    scheduler_port: int = arg(
        50051, "scheduler gRPC port (a free one is picked if it is taken; 0: always pick)"
    )
    worker_port: int = arg(50052, "worker gRPC port (a free one is picked if it is taken; 0: always pick)")
    vision_port: int = arg(50053, "vision gRPC port (a free one is picked if it is taken; 0: always pick)")
    startup_timeout_s: float = arg(900.0, "how long to wait for every service to be ready")
    max_restarts: int = arg(
        5,
        "a service that exits after start-up is started again (after 1, 2, 4 ... up to 30 s) while the others "
        "keep serving; past this many restarts of one service within 10 minutes, up stops the cluster "
        "(0: stop at the first exit, as SGLang's launcher does)",
    )
    metrics: bool = arg(
        True,
        "give each gRPC service a Prometheus metrics port (free ones, printed when the cluster is ready; the "
        "gateway serves /metrics on its HTTP port either way)",
    )
    vision_device: str = arg(
        "",
        "device of the vision encoder (default: --device). Another GPU, e.g. cuda:1, gives the encoder a card of "
        "its own (no memory share is then kept on the worker's card); on the same GPU it keeps "
        "--vision-mem-fraction of it",
    )


# Set by `up` itself for each service, so not flags of `up`.
_WIRED = {
    "host",
    "port",
    "scheduler_address",
    "worker_address",
    "vision_address",
    "connect_timeout_s",
    "metrics_port",
}
SERVICE_ARGS = {
    "vision": VisionArgs,
    "worker": WorkerArgs,
    "scheduler": SchedulerArgs,
    "gateway": GatewayArgs,
}


def _up_fields() -> list[tuple[str, type, dataclasses.Field]]:
    """`up` takes its own flags plus every service flag (first definition wins), so each new service flag is
    forwarded without being declared twice."""
    out, seen = [], set()
    for cls in (_UpOnly, *SERVICE_ARGS.values()):
        hints = typing.get_type_hints(cls)
        for f in dataclasses.fields(cls):
            if f.name in seen or (cls is not _UpOnly and f.name in _WIRED):
                continue
            seen.add(f.name)
            field = dataclasses.field(
                default=f.default, default_factory=f.default_factory, metadata=f.metadata
            )
            out.append((f.name, hints[f.name], field))
    return out


UpArgs = dataclasses.make_dataclass("UpArgs", _up_fields(), bases=(ArgsBase,), frozen=True)
UpArgs.__doc__ = (
    "`mirador up`: its own flags plus the four services' flags, forwarded to each that takes them."
)


def _port(host: str, preferred: int) -> int:
    """`preferred` if it can be bound now, else a free one (so a second `mirador up` does not collide)."""
    if preferred:
        if can_bind(host, preferred):
            return preferred
        logger.info("port %d is taken; picking a free one", preferred)
    return free_port(host)


def _pick(cls: type[ArgsBase], up: UpArgs, **overrides) -> ArgsBase:
    names = {f.name for f in dataclasses.fields(up)}
    values = {f.name: getattr(up, f.name) for f in dataclasses.fields(cls) if f.name in names}
    values.update(overrides)
    return cls(**values)


def _grpcurl_hint(up: UpArgs) -> str:
    """How an operator reaches the internal services with grpcurl under the cluster's authentication."""
    if up.tls_dir:
        d = up.tls_dir.rstrip("/")
        return f"grpcurl -cacert {d}/ca.pem -cert {d}/admin.pem -key {d}/admin-key.pem"
    if up.internal_token_file:
        return f'grpcurl -plaintext -H "authorization: Bearer $(cat {up.internal_token_file})"'
    if os.environ.get(TOKEN_ENV):
        return f'grpcurl -plaintext -H "authorization: Bearer ${TOKEN_ENV}"'
    return "grpcurl -plaintext"


def same_device(a: str, b: str) -> bool:
    """Whether two device flags name one device ("auto" and "cuda" mean the first GPU, or the CPU on both)."""

    def norm(d: str) -> str:
        d = d.strip().lower()
        return "cuda:0" if d in ("auto", "cuda", "") else d

    return norm(a) == norm(b)


def service_args(up: UpArgs) -> dict[str, ArgsBase]:
    gh = up.grpc_host
    ports = {
        name: _port(gh, p)
        for name, p in (
            ("scheduler", up.scheduler_port),
            ("worker", up.worker_port),
            ("vision", up.vision_port),
        )
    }
    addr = {name: f"{gh}:{p}" for name, p in ports.items()}
    mhost = up.metrics_host or gh
    metrics = {name: _port(mhost, 0) if up.metrics else 0 for name in ports}
    vision_device = up.vision_device or up.device
    share = up.vision_mem_fraction if same_device(vision_device, up.device) else 0.0
    return {
        "vision": _pick(
            VisionArgs,
            up,
            host=gh,
            port=ports["vision"],
            device=vision_device,
            vision_mem_fraction=share,
            metrics_port=metrics["vision"],
        ),
        "worker": _pick(
            WorkerArgs,
            up,
            host=gh,
            port=ports["worker"],
            metrics_port=metrics["worker"],
            vision_address=addr["vision"],
            vision_mem_fraction=share,
        ),
        "scheduler": _pick(
            SchedulerArgs,
            up,
            host=gh,
            port=ports["scheduler"],
            metrics_port=metrics["scheduler"],
            worker_address=addr["worker"],
            vision_address=addr["vision"],
            connect_timeout_s=up.startup_timeout_s,
        ),
        "gateway": _pick(GatewayArgs, up, scheduler_address=addr["scheduler"], vision_address=addr["vision"]),
    }


def _die_with_parent() -> None:
    """Children get SIGTERM if `mirador up` itself dies (Linux), so nothing is orphaned."""
    with contextlib.suppress(OSError):
        ctypes.CDLL("libc.so.6", use_errno=True).prctl(1, signal.SIGTERM)  # PR_SET_PDEATHSIG


class Cluster:
    def __init__(self, up: UpArgs):
        self.up = up
        self.args = service_args(up)
        self.procs: dict[str, subprocess.Popen] = {}
        self.output = None

    def start(self, output=None) -> None:
        """Start the four processes (their logs go to `output`, a file object, or inherit ours)."""
        self.output = output
        for name in self.args:
            self.spawn(name)

    def spawn(self, name: str) -> None:
        """Start one service (again, after it exited: same flags, same port)."""
        cmd = [sys.executable, "-m", "mirador", name, *self.args[name].to_cli()]
        logger.info("starting %s", name)
        self.procs[name] = subprocess.Popen(
            cmd,
            stdout=self.output,
            stderr=subprocess.STDOUT if self.output is not None else None,
            preexec_fn=_die_with_parent if os.name == "posix" else None,
        )

    def repick_ports(self) -> None:
        """Pick the ports again (a taken one is replaced; the preferred ones are kept where they are free)."""
        self.args = service_args(self.up)

    def new_metrics_port(self, name: str) -> None:
        """Another metrics port for `name`, before starting it again after it found its own taken. Its gRPC port
        stays: the other services are connected to it."""
        a = self.args[name]
        if getattr(a, "metrics_port", 0):
            self.args[name] = dataclasses.replace(a, metrics_port=_port(a.metrics_host or a.host, 0))
            logger.info("%s gets metrics port %d", name, self.args[name].metrics_port)

    def exited(self) -> tuple[str, int] | None:
        for name, p in self.procs.items():
            if p.poll() is not None:
                return name, p.returncode
        return None

    async def wait_ready(self) -> None:
        deadline = time.monotonic() + self.up.startup_timeout_s

        async def watch(coro, what: str):
            task = asyncio.ensure_future(coro)
            while not task.done():
                await asyncio.wait({task}, timeout=0.5)
                if (gone := self.exited()) is not None:
                    task.cancel()
                    raise ServiceExited(*gone, what)
            return task.result()

        a = self.args
        for name in ("vision", "worker", "scheduler"):
            remaining = max(1.0, deadline - time.monotonic())
            await watch(wait_serving(f"{a[name].host}:{a[name].port}", remaining), name)
            logger.info("%s is ready", name)
        url = f"http://{_http_host(self.up.host)}:{self.up.port}/health"
        async with httpx.AsyncClient(trust_env=False) as client:

            async def gateway_ok():
                while time.monotonic() < deadline:
                    try:
                        if (await client.get(url, timeout=2)).status_code == 200:
                            return
                    except httpx.HTTPError:
                        pass
                    await asyncio.sleep(0.2)
                raise TimeoutError(f"gateway not healthy at {url}")

            await watch(gateway_ok(), "gateway")

    def stop(self, grace_s: float | None = None) -> None:
        """SIGTERM the front first: the gateway and the scheduler drain (refuse new work, finish what is in
        flight, up to --graceful-shutdown-timeout) while the worker and the vision service still serve them;
        then the back. Whatever outlives its grace is killed."""
        if grace_s is None:
            grace_s = self.args["scheduler"].graceful_shutdown_timeout + 5.0
        front = [n for n in ("gateway", "scheduler") if n in self.procs]
        self._stop_group(front, grace_s)
        self._stop_group([n for n in self.procs if n not in front], 10.0)

    def _stop_group(self, names: list[str], grace_s: float) -> None:
        for name in names:
            if self.procs[name].poll() is None:
                self.procs[name].send_signal(signal.SIGTERM)
        deadline = time.monotonic() + grace_s
        for name in names:
            p = self.procs[name]
            try:
                p.wait(max(0.1, deadline - time.monotonic()))
            except subprocess.TimeoutExpired:
                logger.warning("%s did not stop in %.0f s; killing it", name, grace_s)
                p.kill()
                p.wait()


class ServiceExited(RuntimeError):
    def __init__(self, name: str, code: int, waiting_for: str):
        super().__init__(f"{name} exited with code {code} while waiting for {waiting_for}")
        self.name, self.code = name, code


def metrics_urls(up: UpArgs, args: dict[str, ArgsBase]) -> str:
    """Where each service serves /metrics (the gateway on its HTTP port, the others on their metrics ports)."""
    urls = [f"gateway http://{_http_host(up.host)}:{up.port}/metrics"]
    for name, a in args.items():
        if name != "gateway" and getattr(a, "metrics_port", 0):
            urls.append(f"{name} http://{_http_host(a.metrics_host or a.host)}:{a.metrics_port}/metrics")
    return ", ".join(urls)


def _http_host(host: str) -> str:
    if host in ("0.0.0.0", "::", ""):
        return "127.0.0.1"
    return f"[{host}]" if ":" in host else host


RESTART_WINDOW_S = 600  # restarts of one service counted over this window (--max-restarts)


def run_up(up: UpArgs) -> int:
    cluster = Cluster(up)
    stop = {"signal": None}

    def on_signal(signum, _frame):
        stop["signal"] = signum

    signal.signal(signal.SIGTERM, on_signal)
    signal.signal(signal.SIGINT, on_signal)
    cluster.start()
    try:
        t0 = time.monotonic()
        start_ready(cluster, stop)
        if stop["signal"] is None:
            base = f"http://{_http_host(up.host)}:{up.port}"
            name = cluster.args["gateway"].served_model_name or cluster.args["gateway"].model_path
            grpc = ", ".join(f"{n} {a.host}:{a.port}" for n, a in cluster.args.items() if n != "gateway")
            print(
                f"\nMirador is ready in {time.monotonic() - t0:.0f} s: {base}/v1 (model {name})\n"
                f"  metrics (Prometheus): {metrics_urls(up, cluster.args)}\n"
                f"  gRPC ({_grpcurl_hint(up)} ADDRESS list): {grpc}\n"
                f"  try: curl {base}/v1/chat/completions -H 'Content-Type: application/json' -d "
                f'\'{{"model": "{name}", "messages": [{{"role": "user", "content": "Hello"}}]}}\'\n'
                "  Ctrl-C stops every service.",
                flush=True,
            )
        restarts: dict[str, list[float]] = {}
        while stop["signal"] is None:
            if (gone := cluster.exited()) is not None:
                name, code = gone
                recent = [t for t in restarts.get(name, []) if time.monotonic() - t < RESTART_WINDOW_S]
                if len(recent) >= up.max_restarts:
                    logger.error(
                        "%s exited with code %d (%d restarts in the last %d min); stopping the cluster",
                        name,
                        code,
                        len(recent),
                        RESTART_WINDOW_S // 60,
                    )
                    return 1
                delay = min(30.0, 2.0 ** len(recent))
                logger.warning(
                    "%s exited with code %d; starting it again in %.0f s (the others keep serving; the scheduler "
                    "answers 503 meanwhile)",
                    name,
                    code,
                    delay,
                )
                deadline = time.monotonic() + delay
                while stop["signal"] is None and time.monotonic() < deadline:
                    time.sleep(0.2)
                if stop["signal"] is not None:
                    break
                if code == EXIT_PORT_IN_USE:
                    cluster.new_metrics_port(name)
                cluster.spawn(name)
                restarts[name] = [*recent, time.monotonic()]
            time.sleep(0.5)
        logger.info("stopping (signal %d)", stop["signal"])
        return 0
    except (RuntimeError, TimeoutError) as e:
        logger.error("startup failed: %s", e)
        return 1
    finally:
        cluster.stop()


def start_ready(cluster: Cluster, stop: dict) -> None:
    """Wait until the started cluster serves (or a signal comes). A service that exits because a port picked for
    it was taken in the meantime gets the whole cluster started again on other ports, up to PORT_ATTEMPTS
    times; any other exit raises ServiceExited."""
    for attempt in range(1, PORT_ATTEMPTS + 1):
        try:
            asyncio.run(_ready_or_signal(cluster, stop))
            return
        except ServiceExited as e:
            if e.code != EXIT_PORT_IN_USE or attempt == PORT_ATTEMPTS:
                raise
            logger.warning(
                "%s found a port taken between its pick and its bind; starting the cluster again on other ports "
                "(attempt %d of %d)",
                e.name,
                attempt + 1,
                PORT_ATTEMPTS,
            )
            cluster.stop(grace_s=10.0)
            cluster.repick_ports()
            cluster.start(cluster.output)


async def _ready_or_signal(cluster: Cluster, stop: dict) -> None:
    task = asyncio.ensure_future(cluster.wait_ready())
    while not task.done():
        await asyncio.wait({task}, timeout=0.3)
        if stop["signal"] is not None:
            task.cancel()
            return
    task.result()
