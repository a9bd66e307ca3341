"""Scheduler servicer: proto <-> domain around SchedulerLoop; startup connects to the worker and vision."""

from __future__ import annotations

import asyncio
import dataclasses
import json
import logging
from pathlib import Path

import grpc

from common.convert import output_to_proto, outputs_to_batch, request_from_proto, worker_info_json
from common.errors import MiradorError, UnavailableError, abort_with
from common.grpc_utils import Fatal, ServiceHealth, wait_serving
from common.grpc_utils import create_server as _create_server
from common.local_stream import LocalMethod, LocalStreamServer, serve_locally
from common.mailbox import Mailbox
from common.metrics import model_label
from common.service_main import settle_gc
from common.types import DeltaColumns, WorkerInfo
from models.registry import get_entry
from processor.model_config import load_generation_eos, load_model_config
from processor.text_stream import prepare_detokenizer
from processor.tokenizer import Tokenizer
from protos import scheduler_pb2, scheduler_pb2_grpc
from scheduler_svc.config import SchedulerArgs
from scheduler_svc.grammar import GrammarBackend
from scheduler_svc.loop import SchedulerLoop, output_error
from scheduler_svc.metrics import PrometheusObserver
from scheduler_svc.metrics import install as install_metrics
from scheduler_svc.scheduler import Scheduler, SchedulerPolicy

logger = logging.getLogger(__name__)
SERVICE_NAME = scheduler_pb2.DESCRIPTOR.services_by_name["Scheduler"].full_name
CONNECT_METHOD = f"/{SERVICE_NAME}/Connect"


def resolve_policy(
    args: SchedulerArgs,
    worker: WorkerInfo,
    eos: tuple[int, ...],
    architecture: str = "",
    image_token_id: int | None = None,
) -> SchedulerPolicy:
    gpu = worker.device.startswith("cuda")
    context = worker.context_length
    if args.context_length is not None:
        if args.context_length > context:
            raise ValueError(f"--context-length {args.context_length} exceeds the model's {context}")
        context = args.context_length
    chunk = args.chunked_prefill_size if args.chunked_prefill_size is not None else (8192 if gpu else 2048)
    return SchedulerPolicy(
        page_size=worker.page_size,
        num_pages=worker.num_pages,
        context_length=context,
        max_running_requests=min(
            args.max_running_requests or (256 if gpu else 64), worker.max_running_requests or 1 << 30
        ),
        chunked_prefill_size=chunk,
        max_prefill_tokens=args.max_prefill_tokens,
        enable_prefix_cache=not args.disable_radix_cache,
        enable_mixed_chunk=gpu if args.enable_mixed_chunk is None else args.enable_mixed_chunk,
        mixed_prefill_tokens=min(
            args.mixed_prefill_tokens or args.max_prefill_tokens, args.max_prefill_tokens
        ),
        max_queued_requests=args.max_queued_requests,
        stream_interval=args.stream_interval,
        schedule_policy=args.schedule_policy,
        eos_token_ids=eos,
        decode_log_interval=args.decode_log_interval,
        vocab_size=worker.vocab_size,
        image_token_id=image_token_id,
        whole_image_spans=bool(architecture) and get_entry(architecture).bidirectional_image_spans,
        num_encoder_pages=worker.num_encoder_pages,
    )


class SchedulerServicer(scheduler_pb2_grpc.SchedulerServicer):
    def __init__(self, args: SchedulerArgs):
        self.args = args
        self.loop: SchedulerLoop | None = None
        self.health: ServiceHealth | None = None
        self.fatal: Fatal | None = None  # set by create_server
        self.worker_info: WorkerInfo | None = None
        self.vision_info_json = "{}"
        self._clients: list = []
        self._draining = False
        self.port = 0  # the bound gRPC port (create_server)
        self.local: LocalStreamServer | None = None
        self.worker = None
        self.model_name = model_label(args)
        install_metrics(lambda: self.loop.core if self.loop is not None else None, self.model_name)

    async def startup(self) -> None:
        from vision_svc.client import VisionClient
        from worker_svc.client import WorkerClient

        a = self.args
        methods = {CONNECT_METHOD: LocalMethod(scheduler_pb2.ConnectRequest, self.Connect)}
        self.local = await serve_locally(a.connect_socket, "scheduler", self.port, SERVICE_NAME, methods)
        self.model_config = model_config = load_model_config(a.model_path)
        tokenizer = Tokenizer(a.model_path)
        eos = load_generation_eos(a.model_path)
        # llguidance builds its tokenizer in ~3 s of CPU and holds the GIL meanwhile: started now, on its thread,
        # it overlaps the wait for the worker instead of coming after it (the vocabulary is the config's, the
        # worker's logits width, which Scheduler.use_grammar checks)
        grammar = GrammarBackend(tokenizer.hf, model_config.text.vocab_size, eos)
        prepare_detokenizer(tokenizer)
        logger.info("waiting for the worker at %s", a.worker_address)
        await wait_serving(a.worker_address, a.connect_timeout_s)
        self.worker = worker = WorkerClient(a.worker_address)
        self._clients.append(worker)
        self.worker_info = await worker.info()
        vision = None
        if a.vision_address and model_config.is_multimodal:
            logger.info("waiting for the vision service at %s", a.vision_address)
            await wait_serving(a.vision_address, a.connect_timeout_s)
            vision = VisionClient(a.vision_address)
            self._clients.append(vision)
            info = await vision.info()
            self.vision_info_json = json.dumps(
                {f.name: getattr(info, f.name) for f in info.DESCRIPTOR.fields}
            )
        policy = resolve_policy(
            a, self.worker_info, eos, model_config.architecture, model_config.image_token_id
        )
        self.policy = policy
        core = Scheduler(policy, tokenizer)
        core.use_grammar(grammar)
        self.loop = SchedulerLoop(
            core,
            worker,
            vision,
            overlap=not a.disable_overlap_schedule,
            step_timeout_s=a.step_timeout_s,
            # a worker that maps the vision pool copies leased rows itself: no pull in the prefill's path
            lease_embeddings=self.worker_info.embedding_transport in ("cuda_ipc", "shared_memory"),
            log_requests=a.log_requests,
        )
        self.loop.core.observer = PrometheusObserver(self.model_name)
        # serving starts once the grammar tokenizer is built: it holds the GIL while it builds
        await core.grammar_backend().ready()
        self.loop.start()
        self.fatal.watch(self.loop.task, "the scheduler loop", must_run=False)  # it returns only when stopped
        logger.info(
            "scheduler ready: %d KV pages x %d tokens, context %d, max running %d, chunked prefill %d, "
            "prefix cache %s, overlap %s",
            policy.num_pages,
            policy.page_size,
            policy.context_length,
            policy.max_running_requests,
            policy.chunked_prefill_size,
            "on" if policy.enable_prefix_cache else "off",
            "on" if self.loop.depth else "off",
        )
        settle_gc()
        await self.health.set_serving(True)
        backends = {"worker": a.worker_address, **({"vision": a.vision_address} if vision else {})}
        self._monitor = self.fatal.watch(
            asyncio.create_task(self._watch_backends(backends)), "the backend health monitor"
        )

    async def _watch_backends(self, backends: dict[str, str]) -> None:
        """Follow each backend's grpc.health.v1 Watch, so a change arrives at once: the scheduler is SERVING only
        while every backend is (the gateway's /health and Kubernetes readiness see an outage through it), and a
        backend that is NOT_SERVING (draining on SIGTERM, or still loading) gets no new requests."""
        serving = dict.fromkeys(backends, True)

        async def follow(name: str, address: str) -> None:
            from grpc_health.v1 import health_pb2, health_pb2_grpc

            from common.grpc_utils import create_channel

            async with create_channel(address) as channel:
                stub = health_pb2_grpc.HealthStub(channel)
                while True:
                    try:
                        async for resp in stub.Watch(health_pb2.HealthCheckRequest()):
                            await changed(name, resp.status == health_pb2.HealthCheckResponse.SERVING)
                    except grpc.aio.AioRpcError:
                        pass
                    await changed(name, False)  # unreachable: watch again shortly
                    await asyncio.sleep(0.5)

        async def changed(name: str, ok: bool) -> None:
            if serving[name] == ok:
                return
            serving[name] = ok
            logger.warning(
                "%s is %s", name, "SERVING again" if ok else "not serving: it gets no new requests"
            )
            self.loop.set_backend_serving(name, ok)
            if not self._draining:
                await self.health.set_serving(all(serving.values()))

        await asyncio.gather(*(follow(name, address) for name, address in backends.items()))

    async def drain(self) -> None:
        self._draining = True  # the backend monitor no longer turns health back to SERVING
        if self.loop is not None:
            await self.loop.drain()

    async def shutdown(self) -> None:
        if getattr(self, "_monitor", None) is not None:
            self._monitor.cancel()
        if self.loop is not None:
            await self.loop.stop()
        for c in self._clients:
            await c.close()
        if self.local is not None:
            await self.local.close()

    def _ready(self) -> SchedulerLoop:
        if self.loop is None:
            raise UnavailableError("scheduler is still connecting to the worker and vision services")
        return self.loop

    async def Generate(self, request, context):
        try:
            loop = self._ready()
            async for out in loop.generate(request_from_proto(request)):
                yield output_to_proto(out)
        except Exception as e:  # noqa: BLE001 - every error becomes a status
            await abort_with(context, e)

    async def Connect(self, request_iterator, context):
        """One gateway's requests on one stream; outputs ready together travel in one OutputBatch."""
        try:
            loop = self._ready()
        except Exception as e:  # noqa: BLE001
            await abort_with(context, e)
        outbox = Mailbox()  # every request of this stream outputs here: its plain deltas as DeltaColumns
        loop.open_route(outbox)
        live: dict[str, int] = {}  # request id -> choices not finished

        async def read() -> None:
            async for msg in request_iterator:
                kind = msg.WhichOneof("kind")
                if kind == "generate":
                    rid = msg.generate.request_id
                    try:
                        loop.attach(request_from_proto(msg.generate), outbox)
                        live[rid] = max(1, msg.generate.n)
                    except Exception as e:  # noqa: BLE001 - this request fails, the stream lives on
                        outbox.put_nowait(_request_error(rid, e))
                elif kind == "abort" and live.pop(msg.abort.request_id, None) is not None:
                    loop.detach(msg.abort.request_id)

        reader = asyncio.create_task(read())
        try:
            while True:
                items = await outbox.take_all()
                batch = scheduler_pb2.OutputBatch()
                outs = []
                for item in items:
                    if type(item) is DeltaColumns:
                        outs.append(item)
                        continue
                    if isinstance(item, scheduler_pb2.RequestError):
                        batch.errors.append(item)
                        continue
                    if item.error is not None:  # the loop ended it (a failure, or shutdown)
                        batch.errors.append(_request_error(item.request_id, output_error(item)))
                        if live.pop(item.request_id, None) is not None:
                            loop.detach(item.request_id)
                        continue
                    outs.append(item)
                    if item.finish_reason is not None and item.request_id in live:
                        live[item.request_id] -= 1
                        if not live[item.request_id]:
                            del live[item.request_id]
                            loop.detach(item.request_id)
                yield outputs_to_batch(outs, batch)
        finally:
            reader.cancel()
            loop.close_route(outbox)
            for rid in list(live):
                loop.detach(rid)

    async def Abort(self, request, context):
        try:
            return scheduler_pb2.AbortResponse(found=self._ready().abort(request.request_id))
        except Exception as e:  # noqa: BLE001
            await abort_with(context, e)

    async def GetStats(self, request, context):
        if self.loop is None:
            return scheduler_pb2.SchedulerStats()
        core = self.loop.core
        return scheduler_pb2.SchedulerStats(**core.snapshot(), **core.stats.counters())

    async def FlushCache(self, request, context):
        try:
            flushed, live, pages, embeddings = await self._ready().flush_cache()
        except Exception as e:  # noqa: BLE001
            await abort_with(context, e)
        return scheduler_pb2.FlushCacheResponse(
            flushed=flushed, num_requests=live, num_pages_freed=pages, num_embeddings_freed=embeddings
        )

    async def GetServerInfo(self, request, context):
        try:
            self._ready()
        except Exception as e:  # noqa: BLE001
            await abort_with(context, e)
        a, p = self.args, self.policy
        config = self.model_config
        return scheduler_pb2.ServerInfo(
            model_path=str(Path(a.model_path)),
            served_model_name=a.served_model_name or a.model_path,
            architecture=config.architecture,
            is_multimodal=config.is_multimodal,
            context_length=p.context_length,
            page_size=p.page_size,
            num_pages=p.num_pages,
            max_running_requests=p.max_running_requests,
            chunked_prefill_size=p.chunked_prefill_size,
            max_prefill_tokens=p.max_prefill_tokens,
            enable_prefix_cache=p.enable_prefix_cache,
            scheduler_args_json=json.dumps(dataclasses.asdict(a)),
            worker_info_json=worker_info_json(self.worker_info),
            vision_info_json=self.vision_info_json,
            enable_overlap=bool(self.loop.depth),
            eos_token_ids=list(p.eos_token_ids),
            grammar_info_json=json.dumps(self.loop.core.grammar_backend().info()),
            connect_socket=self.local.path if self.local is not None else "",
            step_transport=self.worker.transport,
        )


def create_server(args: SchedulerArgs) -> tuple[grpc.aio.Server, int, SchedulerServicer]:
    servicer = SchedulerServicer(args)
    server, port = _create_server(
        servicer, scheduler_pb2_grpc.add_SchedulerServicer_to_server, SERVICE_NAME, args.host, args.port
    )
    servicer.port = port
    return server, port, servicer


def _request_error(request_id: str, error: Exception) -> scheduler_pb2.RequestError:
    if isinstance(error, MiradorError):
        code, message = error.grpc_code.name, error.message
    elif isinstance(error, ValueError):
        code, message = "INVALID_ARGUMENT", str(error)
    else:
        logger.error("internal error in request %s", request_id, exc_info=error)
        code, message = "INTERNAL", f"{type(error).__name__}: {error}"
    return scheduler_pb2.RequestError(request_id=request_id, code=code, message=message)
