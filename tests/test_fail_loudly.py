"""A loop that dies must not leave a service serving: faults injected into the scheduler loop, the worker's step
loop and the vision batch loop end every request in flight at once with an error, turn health NOT_SERVING, log
the traceback and make the process exit non-zero."""

from __future__ import annotations

import asyncio
import subprocess
import sys
import textwrap
import time

import pytest
from grpc_health.v1 import health_pb2

from common.errors import InvalidRequestError, UnavailableError
from common.grpc_utils import Fatal, ServiceHealth, serve_until_signal
from common.types import GenerateRequest, SamplingParams, StepPlan, StoppingCriteria
from scheduler_svc.loop import SchedulerLoop
from tests.helpers import REPO
from tests.test_scheduler_core import FakeWorker, small_scheduler


class _AsyncWorker:
    def __init__(self):
        self.worker = FakeWorker(4)

    def submit(self, plan):
        fut = asyncio.get_running_loop().create_future()
        fut.set_result(self.worker.step(plan))
        return fut


def test_a_dying_scheduler_loop_ends_every_request_at_once_and_is_reported():
    core = small_scheduler(num_pages=200)
    calls = {"n": 0}
    original = core.process_output

    def faulty(out):
        calls["n"] += 1
        if calls["n"] == 6:
            raise RuntimeError("injected fault")
        return original(out)

    core.process_output = faulty
    fatal = Fatal()

    async def scenario():
        loop = SchedulerLoop(core, _AsyncWorker(), None)
        loop.start()
        fatal.watch(loop.task, "the scheduler loop", must_run=False)
        stop = StoppingCriteria(max_new_tokens=10_000, ignore_eos=True)

        async def consume(rid: str):
            req = GenerateRequest(rid, (11, 12, 13), sampling=SamplingParams(temperature=0.0), stopping=stop)
            try:
                async for _ in loop.generate(req):
                    pass
            except UnavailableError as e:
                return str(e)
            return "finished"

        t0 = time.monotonic()
        results = await asyncio.wait_for(asyncio.gather(consume("a"), consume("b")), 5)
        elapsed = time.monotonic() - t0
        error = await asyncio.wait_for(fatal.wait(), 1)
        with pytest.raises(UnavailableError):  # a new request is refused at once
            async for _ in loop.generate(GenerateRequest("c", (1,), stopping=stop)):
                pass
        return results, elapsed, error

    results, elapsed, error = asyncio.run(scenario())
    assert all("injected fault" in r for r in results), results
    assert elapsed < 2
    assert "scheduler loop died" in str(error) and "injected fault" in str(error.__cause__)


def test_serve_until_signal_turns_not_serving_stops_and_raises_on_a_fatal_report():
    import grpc

    async def scenario():
        server = grpc.aio.server()
        health = ServiceHealth(server, "test.Service")
        port = server.add_insecure_port("127.0.0.1:0")
        fatal = Fatal()
        seen = {}

        async def startup():
            await health.set_serving(True)

            async def background():
                await asyncio.sleep(0.2)
                seen["serving_before"] = await _status(port)
                raise ValueError("loop fault")

            fatal.watch(asyncio.create_task(background()), "the test loop")

        stopped = {}

        async def on_stop():
            stopped["status"] = await _status(port)

        t0 = time.monotonic()
        with pytest.raises(RuntimeError, match="the test loop died: ValueError: loop fault"):
            await serve_until_signal(server, health, startup, on_stop=on_stop, fatal=fatal)
        return seen, stopped, time.monotonic() - t0

    seen, stopped, elapsed = asyncio.run(scenario())
    assert seen["serving_before"] == health_pb2.HealthCheckResponse.SERVING
    assert stopped["status"] == health_pb2.HealthCheckResponse.NOT_SERVING
    assert elapsed < 5


async def _status(port: int) -> int:
    from grpc_health.v1 import health_pb2_grpc

    from common.grpc_utils import create_channel

    async with create_channel(f"127.0.0.1:{port}") as ch:
        resp = await health_pb2_grpc.HealthStub(ch).Check(health_pb2.HealthCheckRequest(), timeout=2)
        return resp.status


def test_a_service_whose_loop_dies_logs_the_traceback_and_exits_non_zero():
    script = textwrap.dedent(
        """
        import asyncio
        from dataclasses import dataclass
        from common.args import ArgsBase, arg
        from common.grpc_utils import create_server
        from common.service_main import run_grpc_service
        from protos import worker_pb2, worker_pb2_grpc

        @dataclass(frozen=True)
        class Args(ArgsBase):
            host: str = arg("127.0.0.1", "host")
            port: int = arg(0, "port")
            log_level: str = arg("info", "level")

        class Servicer(worker_pb2_grpc.WorkerServicer):
            async def startup(self):
                await self.health.set_serving(True)

                async def loop():
                    await asyncio.sleep(0.3)
                    raise KeyError("injected")

                self.fatal.watch(asyncio.create_task(loop()), "the demo loop")

        def make(args):
            s = Servicer()
            server, port = create_server(s, worker_pb2_grpc.add_WorkerServicer_to_server, "demo", args.host, 0)
            return server, port, s

        run_grpc_service("demo", "demo", Args, make, [])
        """
    )
    t0 = time.monotonic()
    proc = subprocess.run(
        [sys.executable, "-c", script], cwd=REPO, capture_output=True, text=True, timeout=60
    )
    assert proc.returncode == 1, proc.stderr[-2000:]
    assert "Traceback" in proc.stderr and "the demo loop died" in proc.stderr
    assert "KeyError: 'injected'" in proc.stderr
    assert time.monotonic() - t0 < 30


class _BrokenRunner:
    """Launches fine twice, then the 'device' breaks (or a request is bad, for the domain error case)."""

    def __init__(self, error: Exception):
        self.error, self.calls, self.seqs = error, 0, {}

    def step(self, plan):
        return self.collect(self.launch(plan))

    def launch(self, plan):
        self.calls += 1
        if self.calls > 2:
            raise self.error
        return plan

    def collect(self, plan):
        from common.types import StepOutput

        return StepOutput(plan.step_id, (), (), 0)


@pytest.mark.parametrize("error, fatal", [(RuntimeError("CUDA error: an illegal memory access"), True),
                                          (InvalidRequestError("bad step"), False)])  # fmt: skip
def test_the_worker_stops_serving_when_its_step_loop_breaks(error, fatal):
    from worker_svc.client import WorkerClient
    from worker_svc.config import WorkerArgs
    from worker_svc.server import create_server

    async def scenario():
        server, port, servicer = create_server(WorkerArgs(model_path="unused", port=0))
        await server.start()
        servicer.runner = _BrokenRunner(error)
        client = WorkerClient(f"127.0.0.1:{port}")
        try:
            ok = await asyncio.wait_for(client.submit(StepPlan(1, ())), 5)
            with pytest.raises((UnavailableError, InvalidRequestError)):
                await asyncio.wait_for(client.submit(StepPlan(2, ())), 5)
            return ok, servicer.fatal.error
        finally:
            await client.close()
            await server.stop(0)

    ok, reported = asyncio.run(scenario())
    assert ok.step_id == 1
    assert (reported is not None) == fatal
    if fatal:
        assert "illegal memory access" in str(reported)


def test_a_dying_vision_batch_loop_fails_its_requests_and_is_reported(default_model):
    from common.types import MultimodalItem
    from processor.media import content_key, decode_image
    from tests.helpers import noise_image, png_bytes
    from vision_svc.encoder import EncoderConfig, VisionEncoder

    enc = VisionEncoder(EncoderConfig(str(default_model), share_embeddings=False, warmup=False))
    fatal = Fatal()
    enc.on_fatal = fatal.report

    async def broken_drain():
        raise MemoryError("injected")

    enc._drain = broken_drain  # noqa: SLF001
    data = png_bytes(noise_image(56, 56, seed=4))
    img = decode_image(data).image
    grid = enc.spec.image_grid(*img.size)
    item = MultimodalItem(content_key(data, enc.spec.fingerprint()), 0, enc.spec.num_image_tokens(grid), grid,
                          "image", data)  # fmt: skip
    with pytest.raises(MemoryError):
        asyncio.run(asyncio.wait_for(enc.encode([item]), 10))
    assert fatal.error is not None and "vision batch loop died" in str(fatal.error)
    enc.close()
