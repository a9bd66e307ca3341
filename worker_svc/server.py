"""Worker servicer: proto <-> domain around ModelRunner; steps run in order on one model thread."""

from __future__ import annotations

import asyncio
import logging
from concurrent.futures import ThreadPoolExecutor

import grpc

from common.convert import plan_from_proto, step_output_to_proto, worker_info_to_proto
from common.errors import UnavailableError, abort_with
from common.grpc_utils import ServiceHealth
from common.grpc_utils import create_server as _create_server
from common.types import SeqInit, SeqStep, StepPlan
from protos import worker_pb2, worker_pb2_grpc
from worker_svc.config import WorkerArgs
from worker_svc.model_runner import ModelRunner, RunnerConfig

logger = logging.getLogger(__name__)
SERVICE_NAME = worker_pb2.DESCRIPTOR.services_by_name["Worker"].full_name


def warmup(runner: ModelRunner) -> None:
    """One tiny prefill and decode, so the first request does not pay for lazy initialization."""
    from common.types import SamplingParams

    init = SeqInit((), SamplingParams(temperature=0.0), 1)
    runner.step(
        StepPlan(0, (SeqStep("warmup", 0, (1,), True, 0, (1, 1), init),))
    )  # its KV is garbage: unused
    runner.step(StepPlan(0, (SeqStep("warmup", 1, (), True),)))
    runner.seqs.clear()


class WorkerServicer(worker_pb2_grpc.WorkerServicer):
    def __init__(self, args: WorkerArgs):
        self.args = args
        self.runner: ModelRunner | None = None
        self.health: ServiceHealth | None = None
        self._executor = ThreadPoolExecutor(1, thread_name_prefix="worker-step")
        self._stream_lock = asyncio.Lock()

    async def startup(self) -> None:
        a = self.args
        source = None
        if a.vision_address:
            from vision_svc.client import VisionEmbeddingSource

            source = VisionEmbeddingSource(a.vision_address)
        cfg = RunnerConfig(
            a.model_path,
            a.dtype,
            a.device,
            a.page_size,
            a.max_total_tokens,
            a.mem_fraction_static,
            a.attention_backend,
            a.random_seed,
        )
        loop = asyncio.get_running_loop()
        runner = await loop.run_in_executor(self._executor, ModelRunner, cfg, source)
        await loop.run_in_executor(self._executor, warmup, runner)
        self.runner = runner
        await self.health.set_serving(True)

    def _ready(self) -> ModelRunner:
        if self.runner is None:
            raise UnavailableError("worker is still loading the model")
        return self.runner

    async def GetInfo(self, request, context):
        try:
            return worker_info_to_proto(self._ready().info())
        except Exception as e:  # noqa: BLE001
            await abort_with(context, e)

    async def Steps(self, request_iterator, context):
        try:
            runner = self._ready()
        except Exception as e:  # noqa: BLE001
            await abort_with(context, e)
        if self._stream_lock.locked():
            await context.abort(
                grpc.StatusCode.FAILED_PRECONDITION, "another scheduler already drives this worker"
            )
        loop = asyncio.get_running_loop()
        async with self._stream_lock:
            await loop.run_in_executor(
                self._executor, runner.seqs.clear
            )  # a new scheduler starts from scratch
            logger.info("scheduler connected: step stream open")
            async for req in request_iterator:
                plan = plan_from_proto(req)
                try:
                    out = await loop.run_in_executor(self._executor, runner.step, plan)
                except Exception as e:  # noqa: BLE001
                    logger.exception("step %d failed", plan.step_id)
                    await abort_with(context, e)
                yield step_output_to_proto(out)
            logger.info("step stream closed")


def create_server(args: WorkerArgs) -> tuple[grpc.aio.Server, int, WorkerServicer]:
    servicer = WorkerServicer(args)
    server, port = _create_server(
        servicer, worker_pb2_grpc.add_WorkerServicer_to_server, SERVICE_NAME, args.host, args.port
    )
    return server, port, servicer
