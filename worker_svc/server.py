"""Worker servicer: proto <-> domain around ModelRunner; steps run in order on one model thread."""

from __future__ import annotations

import asyncio
import dataclasses
import logging
import time
from concurrent.futures import ThreadPoolExecutor

import grpc

from common.convert import plan_from_proto, step_output_to_proto, worker_info_to_proto
from common.errors import MiradorError, UnavailableError, abort_with
from common.grpc_utils import Fatal, ServiceHealth, wait_serving
from common.grpc_utils import create_server as _create_server
from common.local_stream import LocalMethod, LocalStreamServer, serve_locally
from common.metrics import embedding_transfer_histogram, model_label
from common.types import StepPlan
from protos import worker_pb2, worker_pb2_grpc
from worker_svc.config import WorkerArgs
from worker_svc.model_runner import ModelRunner, RunnerConfig

logger = logging.getLogger(__name__)
SERVICE_NAME = worker_pb2.DESCRIPTOR.services_by_name["Worker"].full_name
STEPS_METHOD = f"/{SERVICE_NAME}/Steps"


class WorkerServicer(worker_pb2_grpc.WorkerServicer):
    def __init__(self, args: WorkerArgs):
        self.args = args
        self.runner: ModelRunner | None = None
        self.health: ServiceHealth | None = None
        self.fatal: Fatal | None = None
        # steps launch in order on one thread; their results are awaited on another, so step N+1 is prepared
        # and queued on the GPU while step N runs
        self._executor = ThreadPoolExecutor(1, thread_name_prefix="worker-step")
        self._collector = ThreadPoolExecutor(1, thread_name_prefix="worker-collect")
        self._stream_lock = asyncio.Lock()
        self._last_step = 0.0  # monotonic time the last step arrived
        self.port = 0  # the bound gRPC port (create_server)
        self.local: LocalStreamServer | None = None

    async def startup(self) -> None:
        a = self.args
        self.local = await serve_steps_locally(self, a.step_socket)
        source = None
        if a.vision_address:
            from vision_svc.client import VisionEmbeddingSource

            source = VisionEmbeddingSource(a.vision_address, share=a.embedding_transport == "auto")
        cfg = RunnerConfig(
            model_path=a.model_path,
            dtype=a.dtype,
            device=a.device,
            page_size=a.page_size,
            max_total_tokens=a.max_total_tokens,
            max_encoder_images=a.max_encoder_images,
            encoder_cache_fraction=a.encoder_cache_fraction,
            mem_fraction_static=a.mem_fraction_static,
            attention_backend=a.attention_backend,
            seed=a.random_seed,
            load_format=a.load_format,
            max_running_requests=a.max_running_requests,
            disable_cuda_graph=a.disable_cuda_graph,
            cuda_graph_max_bs=a.cuda_graph_max_bs,
            piecewise_cuda_graph_max_tokens=a.piecewise_cuda_graph_max_tokens,
            max_prefill_tokens=a.max_prefill_tokens,
            vision_mem_fraction=a.vision_mem_fraction if a.vision_address else 0.0,
            embedding_buffer_bytes=a.embedding_buffer_mb << 20,
        )
        loop = asyncio.get_running_loop()
        runner = await loop.run_in_executor(self._executor, ModelRunner, cfg, source)
        await loop.run_in_executor(self._executor, runner.warmup)
        if source is not None and runner.model_config.is_multimodal:
            # the transport is chosen once the vision service is up (it maps the pool only then)
            logger.info("waiting for the vision service at %s", a.vision_address)
            try:
                await wait_serving(a.vision_address, a.connect_timeout_s)
                await asyncio.to_thread(source.connect)
            except TimeoutError as e:  # serve text meanwhile; the first pull chooses the transport
                logger.warning("%s; image embeddings will connect on first use", e)
        runner.embeddings.on_transferred = (
            embedding_transfer_histogram().labels(model_label(a), "worker").observe
        )
        self.runner = runner
        await self.health.set_serving(True)

    async def shutdown(self) -> None:
        if self.local is not None:
            await self.local.close()

    def _fatal(self, error: BaseException, what: str) -> None:
        """A broken runner (a CUDA error is sticky) must not keep serving: NOT_SERVING, then exit non-zero."""
        if self.fatal is not None:
            self.fatal.report(error, f"the worker's step loop ({what})")

    async def drain(self, quiet_s: float = 0.5) -> None:
        """On SIGTERM (health is NOT_SERVING already, which the scheduler's health watch sees at once, so it sends
        no new requests here): return once no sequence lives on this worker and no step has come for `quiet_s`,
        i.e. the scheduler has finished and freed everything it had running or queued here."""
        while True:
            runner = self.runner
            if runner is None or (not runner.seqs and time.monotonic() - self._last_step >= quiet_s):
                return
            await asyncio.sleep(0.05)

    def _ready(self) -> ModelRunner:
        if self.runner is None:
            raise UnavailableError("worker is still loading the model")
        return self.runner

    async def GetInfo(self, request, context):
        try:
            info = self._ready().info()
            return worker_info_to_proto(dataclasses.replace(info, step_socket=_path(self.local)))
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
            # a new scheduler starts from scratch: free what an earlier one left
            await loop.run_in_executor(self._executor, runner.step, StepPlan(0, (), tuple(runner.seqs)))
            logger.info("scheduler connected: step stream open")
            launched: asyncio.Queue = asyncio.Queue()
            reader = asyncio.create_task(self._launch_all(request_iterator, runner, launched))
            try:
                while (item := await launched.get()) is not None:
                    if isinstance(item, BaseException):
                        await abort_with(context, item)
                    try:
                        out = await loop.run_in_executor(self._collector, runner.collect, item)
                    except Exception as e:  # noqa: BLE001 - the device or the runner broke: stop serving
                        self._fatal(e, "collecting a step")
                        await abort_with(context, UnavailableError(f"the worker failed: {e}"))
                    yield step_output_to_proto(out)
            finally:
                reader.cancel()
                logger.info("step stream closed")  # also when the scheduler went away (the call is cancelled)

    async def _launch_all(self, request_iterator, runner: ModelRunner, launched: asyncio.Queue) -> None:
        """Launch each step as it arrives, without waiting for the results of earlier ones."""
        loop = asyncio.get_running_loop()
        try:
            async for req in request_iterator:
                self._last_step = time.monotonic()
                plan = plan_from_proto(req)
                if self.args.log_requests:
                    _log_inits(plan)
                try:
                    launched.put_nowait(await loop.run_in_executor(self._executor, runner.launch, plan))
                except Exception as e:  # noqa: BLE001
                    if not isinstance(e, MiradorError):  # not a bad request: the runner or the device broke
                        self._fatal(e, f"launching step {plan.step_id}")
                        e = UnavailableError(f"the worker failed: {type(e).__name__}: {e}")
                    else:
                        logger.exception("step %d failed", plan.step_id)
                    launched.put_nowait(e)
                    return
        except asyncio.CancelledError:
            raise
        except Exception as e:  # noqa: BLE001 - the stream broke: end it
            launched.put_nowait(e)
            return
        launched.put_nowait(None)


def _log_inits(plan: StepPlan) -> None:
    """--log-requests: a line per sequence the step starts, under its request's id (sequence ids are
    `<request id>#<choice>`)."""
    for st in plan.seqs:
        if st.init is not None:
            rid = st.seq_id.rsplit("#", 1)[0]
            logger.info("sequence %s starts in step %d", st.seq_id, plan.step_id, extra={"request_id": rid})


async def serve_steps_locally(servicer, flag: str) -> LocalStreamServer | None:
    """The servicer's `Steps` also on a Unix socket (`--step-socket`), for a scheduler on this host: the same
    method, which sees a local stream's request iterator and context instead of gRPC's."""
    methods = {STEPS_METHOD: LocalMethod(worker_pb2.StepRequest, servicer.Steps)}
    return await serve_locally(flag, "worker", servicer.port, SERVICE_NAME, methods)


def _path(local: LocalStreamServer | None) -> str:
    return local.path if local is not None else ""


def create_server(args: WorkerArgs) -> tuple[grpc.aio.Server, int, WorkerServicer]:
    servicer = WorkerServicer(args)
    server, port = _create_server(
        servicer, worker_pb2_grpc.add_WorkerServicer_to_server, SERVICE_NAME, args.host, args.port
    )
    servicer.port = port
    return server, port, servicer
