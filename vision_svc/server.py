"""Vision servicer: proto <-> domain around VisionEncoder, nothing else."""

from __future__ import annotations

import asyncio
import dataclasses
import logging

import grpc

from common.convert import encoded_to_proto, lease_to_proto, location_to_proto, mm_item_from_proto
from common.errors import UnavailableError, abort_with
from common.grpc_utils import Fatal, ServiceHealth
from common.grpc_utils import create_server as _create_server
from common.log import REQUEST_ID_METADATA, request_id_var
from common.metrics import model_label
from common.tensors import tensor_to_proto
from protos import vision_pb2, vision_pb2_grpc
from vision_svc.config import VisionArgs
from vision_svc.encoder import EncoderConfig, VisionEncoder
from vision_svc.metrics import install as install_metrics

logger = logging.getLogger(__name__)
SERVICE_NAME = vision_pb2.DESCRIPTOR.services_by_name["Vision"].full_name


class VisionServicer(vision_pb2_grpc.VisionServicer):
    def __init__(self, args: VisionArgs):
        self.args = args
        self.encoder: VisionEncoder | None = None
        self.health: ServiceHealth | None = None
        self.fatal: Fatal | None = None
        self.metrics = install_metrics(lambda: self.encoder, model_label(args))

    async def startup(self) -> None:
        a = self.args
        cfg = EncoderConfig(
            a.model_path,
            a.dtype,
            a.device,
            a.embedding_cache_mb << 20,
            a.max_batch_patches,
            a.load_format,
            a.vision_mem_fraction,
            share_embeddings=a.share_embeddings,
            fast_image_processor=not a.disable_fast_image_processor,
            attention_backend=a.vision_attention_backend,
            cuda_graph=not a.disable_cuda_graph,
            graph_max_shapes=a.vision_graph_shapes,
            preprocess_threads=a.preprocess_threads,
        )
        self.encoder = await asyncio.to_thread(VisionEncoder, cfg)
        self.encoder.on_fatal = self.fatal.report if self.fatal is not None else None
        self.metrics.hook(self.encoder)
        enc = self.encoder
        logger.info(
            "vision encoder ready (%s, %s, attention %s, %s preprocessing, %s, cache %d MiB %s)",
            enc.device,
            enc.dtype,
            enc.attention_backend,
            "fast" if enc.fast is not None else "exact",
            "CUDA graphs" if enc.graphs is not None else "eager",
            a.embedding_cache_mb,
            enc.cache.kind or "not shared",
        )
        await self.health.set_serving(True)

    async def shutdown(self) -> None:
        """After the drain: the embedding pool's shared-memory name goes (workers keep their mappings), so a
        stopped service leaves nothing in /dev/shm."""
        if self.encoder is not None:
            self.encoder.cache.unlink()

    def _ready(self) -> VisionEncoder:
        if self.encoder is None:
            raise UnavailableError("vision encoder is still loading")
        return self.encoder

    async def Encode(self, request, context):
        rid = dict(context.invocation_metadata() or ()).get(REQUEST_ID_METADATA, "")
        request_id_var.set(rid)  # this call's task: its log lines carry the request id
        if self.args.log_requests:
            logger.info(
                "encode: %d image(s) %s", len(request.items), [m.content_key[:12] for m in request.items]
            )
        try:
            enc = self._ready()
            done = await enc.encode([mm_item_from_proto(m) for m in request.items])
            lease = enc.lease_encoded([e.content_key for e in done]) if request.lease else None
        except Exception as e:  # noqa: BLE001 - every error becomes a status
            await abort_with(context, e)
        resp = vision_pb2.EncodeResponse(items=[encoded_to_proto(e) for e in done])
        if lease is not None:
            resp.lease.CopyFrom(lease_to_proto(lease))
        return resp

    async def Prepare(self, request, context):
        try:
            started = self._ready().prepare_ahead([mm_item_from_proto(m) for m in request.items])
        except Exception as e:  # noqa: BLE001
            await abort_with(context, e)
        return vision_pb2.PrepareResponse(num_started=started)

    async def GetEmbeddings(self, request, context):
        try:
            enc = self._ready()
            if request.by_reference:
                lease_id, found, missing = enc.lease_embeddings(list(request.content_keys))
                return vision_pb2.GetEmbeddingsResponse(
                    locations=[location_to_proto(loc) for loc in found],
                    missing_keys=missing,
                    lease_id=lease_id,
                    pool_id=enc.cache.pool_id,
                )
            found, missing = await asyncio.to_thread(enc.get_embeddings, list(request.content_keys))
            enc.cache.count_value_pulls(len(found))
        except Exception as e:  # noqa: BLE001
            await abort_with(context, e)
        return vision_pb2.GetEmbeddingsResponse(
            embeddings=[
                vision_pb2.Embedding(content_key=k, data=tensor_to_proto(t)) for k, t in found.items()
            ],
            missing_keys=missing,
        )

    async def GetSharedPool(self, request, context):
        try:
            info = self._ready().cache.shared_info()
        except Exception as e:  # noqa: BLE001
            await abort_with(context, e)
        return vision_pb2.SharedPool(**dataclasses.asdict(info))

    async def ReleaseEmbeddings(self, request, context):
        try:
            self._ready().release_embeddings(request.lease_id, request.pool_id)
        except Exception as e:  # noqa: BLE001
            await abort_with(context, e)
        return vision_pb2.ReleaseEmbeddingsResponse()

    async def GetInfo(self, request, context):
        try:
            enc = self._ready()
        except Exception as e:  # noqa: BLE001
            await abort_with(context, e)
        return vision_pb2.VisionInfo(
            architecture=enc.model_config.architecture,
            hidden_size=enc.hidden_size,
            dtype=str(enc.dtype).removeprefix("torch."),
            device=str(enc.device),
            cache_budget_bytes=enc.cache.budget_bytes,
            attention_backend=enc.attention_backend,
            image_processor="fast" if enc.fast is not None else "exact",
            cuda_graphs=enc.graphs is not None,
            embedding_sharing=enc.cache.kind,
        )

    async def FlushCache(self, request, context):
        try:
            return vision_pb2.FlushCacheResponse(num_freed=self._ready().cache.clear())
        except Exception as e:  # noqa: BLE001
            await abort_with(context, e)

    async def GetStats(self, request, context):
        enc = self.encoder
        if enc is None:
            return vision_pb2.VisionStats()
        s = enc.stats
        return vision_pb2.VisionStats(
            encode_calls=s.encode_calls,
            images_encoded=s.images_encoded,
            cache_hits=s.cache_hits,
            cache_entries=len(enc.cache),
            cache_bytes=enc.cache.num_bytes,
            evictions=enc.cache.evictions,
            encode_ns_total=s.encode_ns_total,
            pulls_by_reference=enc.cache.pulls_by_reference,
            pulls_by_value=enc.cache.pulls_by_value,
            open_leases=enc.cache.open_leases,
            batches=s.batches,
            graph_batches=s.graph_batches,
            images_prepared_ahead=s.prepared_ahead,
        )


def create_server(args: VisionArgs) -> tuple[grpc.aio.Server, int, VisionServicer]:
    servicer = VisionServicer(args)
    server, port = _create_server(
        servicer, vision_pb2_grpc.add_VisionServicer_to_server, SERVICE_NAME, args.host, args.port
    )
    return server, port, servicer
