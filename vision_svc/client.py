"""Clients of the vision service: async (the scheduler's encode calls) and sync (the worker's embedding pulls,
made from its model thread)."""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Collection, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass

import grpc

from common.convert import encoded_from_proto, lease_from_proto, mm_item_to_proto
from common.errors import UnavailableError, from_rpc_error
from common.grpc_utils import create_channel, create_sync_channel
from common.log import REQUEST_ID_METADATA, request_id_var
from common.types import EmbeddingLease, EncodedItem, MultimodalItem
from protos import vision_pb2, vision_pb2_grpc

logger = logging.getLogger(__name__)


class VisionClient:
    def __init__(self, address: str, timeout_s: float = 300.0):
        self.address = address
        self.timeout_s = timeout_s
        self._channel = create_channel(address)
        self._stub = vision_pb2_grpc.VisionStub(self._channel)

    async def close(self) -> None:
        await self._channel.close()

    async def encode(self, items: Sequence[MultimodalItem]) -> list[EncodedItem]:
        return (await self._encode(items, lease=False))[0]

    async def encode_leased(
        self, items: Sequence[MultimodalItem]
    ) -> tuple[list[EncodedItem], EmbeddingLease | None]:
        """Encode, and pin the embeddings for a worker that maps the pool: the lease (None when the pool is not
        shared) must reach a worker, which releases it."""
        return await self._encode(items, lease=True)

    async def _encode(
        self, items: Sequence[MultimodalItem], lease: bool
    ) -> tuple[list[EncodedItem], EmbeddingLease | None]:
        request = vision_pb2.EncodeRequest(items=[mm_item_to_proto(m) for m in items], lease=lease)
        try:
            rid = request_id_var.get()  # the request this encode is for (set by the scheduler's encode task)
            metadata = ((REQUEST_ID_METADATA, rid),) if rid else None
            resp = await self._stub.Encode(request, timeout=self.timeout_s, metadata=metadata)
        except grpc.aio.AioRpcError as e:
            raise from_rpc_error(e, f"vision service at {self.address}") from None
        granted = lease_from_proto(resp.lease) if resp.HasField("lease") else None
        return [encoded_from_proto(e) for e in resp.items], granted

    def prepare(self, items: Sequence[MultimodalItem], timeout_s: float = 5.0) -> asyncio.Task:
        """Hint that these items' Encode is coming: the vision service decodes them now. The call starts at the
        event loop's next turn (a caller that goes on computing should yield once); the task returns how many
        started. A hint is best effort: failures are logged, not raised."""
        request = vision_pb2.PrepareRequest(items=[mm_item_to_proto(m) for m in items])
        call = self._stub.Prepare(request, timeout=timeout_s)  # queued now, ahead of the task below

        async def answered() -> int:
            try:
                return (await call).num_started
            except grpc.aio.AioRpcError as e:
                logger.debug("prepare hint to %s failed: %s", self.address, e.code())
                return 0

        return asyncio.get_running_loop().create_task(answered())

    async def info(self) -> vision_pb2.VisionInfo:
        try:
            return await self._stub.GetInfo(vision_pb2.GetInfoRequest(), timeout=10)
        except grpc.aio.AioRpcError as e:
            raise from_rpc_error(e, f"vision service at {self.address}") from None

    async def flush_cache(self) -> int:
        """Drop the cached embeddings no lease holds; returns how many."""
        try:
            resp = await self._stub.FlushCache(vision_pb2.FlushCacheRequest(), timeout=10)
        except grpc.aio.AioRpcError as e:
            raise from_rpc_error(e, f"vision service at {self.address}") from None
        return resp.num_freed

    async def stats(self) -> vision_pb2.VisionStats:
        try:
            return await self._stub.GetStats(vision_pb2.GetStatsRequest(), timeout=5)
        except grpc.aio.AioRpcError as e:
            raise from_rpc_error(e, f"vision service at {self.address}") from None


class VisionEmbeddingSource:
    """The worker's EmbeddingSource: pulls cached embeddings by content key over a blocking channel.

    At connect time it tries to map the vision service's embedding pool (CUDA IPC, or shared memory on the CPU)
    and checks the pool's probe page; on success an embedding costs one copy from the pool into the worker's
    buffer under a lease, otherwise its rows come as bytes over gRPC. `transport` says which. A lease granted with
    the encode (`take`) saves even the lease request: the rows are copied at once from where it says they are.
    """

    def __init__(self, address: str, timeout_s: float = 60.0, share: bool = True):
        self.address = address
        self.timeout_s = timeout_s
        self.share = share
        self._channel = create_sync_channel(address)
        self._stub = vision_pb2_grpc.VisionStub(self._channel)
        self.transport = "grpc"
        self.connected = False
        self.pool_id = ""
        self._pool = None
        self._keep = None
        self._ready_events: list = []  # the pool's ready events, opened in this process (cuda_ipc)
        self._streams: dict = {}
        self._releaser = ThreadPoolExecutor(1, thread_name_prefix="embedding-release")
        self.stats = TransferStats()

    def connect(self) -> str:
        """Choose the transport (logged); returns it."""
        self.transport, self.pool_id, self._pool, self._keep = "grpc", "", None, None
        self._ready_events = []
        self.connected = True
        why = "sharing disabled (--no-share-embeddings)"
        if self.share:
            try:
                info = self._call(self._stub.GetSharedPool, vision_pb2.GetSharedPoolRequest())
                why = self._map(info)
            except UnavailableError as e:  # not up yet: decide on a later pull
                self.connected = False
                why = str(e)
            except Exception as e:  # noqa: BLE001 - any other failure means: pull bytes
                why = f"{type(e).__name__}: {e}"
        if self._pool is not None:
            logger.info(
                "embeddings from %s by %s: one copy per image from its pool", self.address, self.transport
            )
        else:
            logger.info("embeddings from %s as gRPC bytes (%s)", self.address, why)
        return self.transport

    def _map(self, info) -> str:
        from vision_svc.embedding_pool import SharedPoolInfo, map_shared_pool, open_ready_events

        if not info.kind:
            return "the vision service does not share its pool"
        fields = {f: getattr(info, f) for f in SharedPoolInfo.__dataclass_fields__}
        fields["ready_event_handles"] = tuple(fields["ready_event_handles"])
        pool_info = SharedPoolInfo(**fields)
        try:
            self._pool, self._keep = map_shared_pool(pool_info)
            self._ready_events = open_ready_events(pool_info)
        except Exception as e:  # noqa: BLE001 - another host, another IPC namespace, no CUDA here
            self._pool = self._keep = None
            return f"cannot map its {info.kind} pool: {type(e).__name__}: {e}"
        self.transport, self.pool_id = info.kind, info.pool_id
        return ""

    def _call(self, method, request):
        try:
            return method(request, timeout=self.timeout_s)
        except grpc.RpcError as e:
            if e.code() == grpc.StatusCode.UNAVAILABLE:
                raise UnavailableError(f"vision service at {self.address} is unavailable") from None
            raise from_rpc_error(e, f"vision service at {self.address}") from None

    def fetch(self, keys: Sequence[str], device, dtype) -> tuple[dict, list[str]]:
        """Embeddings [num_tokens, hidden] on `device` in `dtype` by content key (copies owned by the caller and
        complete on return), and the keys the vision service no longer holds."""
        if not self.connected:
            self.connect()
        if self._pool is not None:
            resp = self._call(
                self._stub.GetEmbeddings,
                vision_pb2.GetEmbeddingsRequest(content_keys=list(keys), by_reference=True),
            )
            if resp.pool_id != self.pool_id:  # the vision service restarted: map its new pool, then retry
                if resp.lease_id:
                    self._call(
                        self._stub.ReleaseEmbeddings,
                        vision_pb2.ReleaseEmbeddingsRequest(lease_id=resp.lease_id),
                    )
                self.connect()
                return self.fetch(keys, device, dtype)
            try:
                found = {
                    loc.content_key: self._copy(loc.page_ids, loc.num_rows, loc.ready_event, device, dtype)
                    for loc in resp.locations
                }
                self._sync(device, found.values())
            finally:
                if resp.lease_id:  # the copies are done: end the lease without waiting for the answer
                    self._release_later(resp.lease_id, resp.pool_id)
            return found, list(resp.missing_keys)
        from common.tensors import tensor_from_proto

        resp = self._call(self._stub.GetEmbeddings, vision_pb2.GetEmbeddingsRequest(content_keys=list(keys)))
        found = {}
        for e in resp.embeddings:
            self.stats.bytes_by_value += len(e.data.data)
            found[e.content_key] = tensor_from_proto(e.data).to(device, dtype)
        self.stats.images_by_value += len(found)
        return found, list(resp.missing_keys)

    def take(self, lease: EmbeddingLease, skip: Collection[str], device, dtype) -> dict:
        """Copy the rows of a lease granted with an encode (keys in `skip` excepted) from the mapped pool into
        fresh buffers on `device`: no request to the vision service. The copies are queued on the current
        stream, in order with the step that reads them; the lease ends once they are done. Returns {} when this
        process has not mapped that pool (the keys are then pulled by key); the lease is released either way."""
        import torch

        from vision_svc.embedding_pool import copy_rows

        found: dict = {}
        if self._pool is not None and lease.pool_id == self.pool_id:
            pool = self._pool
            waited: set[int] = set()
            for loc in lease.locations:
                if loc.content_key in skip:
                    continue
                if (
                    loc.ready_event and loc.ready_event not in waited
                ):  # still being written: wait on the device
                    waited.add(loc.ready_event)
                    torch.cuda.current_stream(device).wait_event(self._ready_event(loc.ready_event))
                out = torch.empty((loc.num_rows, pool.shape[2]), dtype=pool.dtype, device=device)
                self.stats.copy_ops += copy_rows(pool, loc.page_ids, loc.num_rows, out)
                found[loc.content_key] = out if dtype == pool.dtype else out.to(dtype)
                self.stats.images_by_reference += 1
                self.stats.images_by_lease += 1
        done = None
        if found and torch.device(device).type == "cuda":
            # a blocking event: the release thread sleeps until the copies ran instead of spinning on a core
            done = torch.cuda.Event(blocking=True)
            done.record()
        self._releaser.submit(self._release_when_done, lease.lease_id, lease.pool_id, done)
        return found

    def _release_when_done(self, lease_id: int, pool_id: str, done) -> None:
        if done is not None:
            done.synchronize()  # the pages may be reused only after our copies have read them
        self._release_later(lease_id, pool_id)

    def _release_later(self, lease_id: int, pool_id: str) -> None:
        fut = self._stub.ReleaseEmbeddings.future(
            vision_pb2.ReleaseEmbeddingsRequest(lease_id=lease_id, pool_id=pool_id), timeout=self.timeout_s
        )
        fut.add_done_callback(
            lambda f: f.exception() and logger.warning("lease %d: %s", lease_id, f.exception())
        )

    def _ready_event(self, ready_event: int):
        if not 0 < ready_event <= len(self._ready_events):
            raise ValueError(f"ready event {ready_event} of a pool with {len(self._ready_events)}")
        return self._ready_events[ready_event - 1]

    def _copy(self, page_ids, num_rows: int, ready_event: int, device, dtype):
        """One copy per run of pages from the mapped pool into a fresh buffer on the worker's device (a side
        stream on a GPU, so the copy never waits behind a running step), after the rows' ready event if any."""
        import torch

        from vision_svc.embedding_pool import copy_rows

        pool = self._pool
        with self._stream(device):
            if ready_event:
                torch.cuda.current_stream(device).wait_event(self._ready_event(ready_event))
            out = torch.empty((num_rows, pool.shape[2]), dtype=pool.dtype, device=device)
            self.stats.copy_ops += copy_rows(pool, page_ids, num_rows, out)
            if dtype != pool.dtype:
                out = out.to(dtype)
                self.stats.copy_ops += 1
        self.stats.images_by_reference += 1
        return out

    def _stream(self, device):
        import contextlib

        import torch

        if torch.device(device).type != "cuda":
            return contextlib.nullcontext()
        key = str(device)
        if key not in self._streams:
            self._streams[key] = torch.cuda.Stream(device)
        return torch.cuda.stream(self._streams[key])

    def _sync(self, device, tensors) -> None:
        """Wait for the copies; the buffers, made on the side stream, are then used on the default stream."""
        import torch

        s = self._streams.get(str(device))
        if s is not None:
            s.synchronize()
            main = torch.cuda.default_stream(device)
            for t in tensors:
                t.record_stream(main)

    def close(self) -> None:
        self._releaser.shutdown(wait=True)  # leases already taken still end
        self._pool = self._keep = None
        self._channel.close()


@dataclass
class TransferStats:
    """What embedding pulls cost: copies from a mapped pool, or bytes through gRPC."""

    images_by_reference: int = 0
    images_by_lease: int = 0  # of them, copied from a lease granted with the encode (no GetEmbeddings)
    copy_ops: int = 0  # copy operations into worker buffers (one per run of consecutive pages)
    images_by_value: int = 0
    bytes_by_value: int = 0
