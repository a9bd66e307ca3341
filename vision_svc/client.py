"""Clients of the vision service: async (the scheduler's encode calls) and sync (the worker's embedding pulls,
made from its model thread)."""

from __future__ import annotations

from collections.abc import Sequence

import grpc

from common.convert import encoded_from_proto, mm_item_to_proto
from common.errors import UnavailableError, from_rpc_error
from common.grpc_utils import CHANNEL_OPTIONS, create_channel
from common.types import EncodedItem, MultimodalItem
from protos import vision_pb2, vision_pb2_grpc


class VisionClient:
    def __init__(self, address: str, timeout_s: float = 300.0):
        self.address = address
        self.timeout_s = timeout_s
        self._channel = create_channel(address)
        self._stub = vision_pb2_grpc.VisionStub(self._channel)

    async def close(self) -> None:
        await self._channel.close()

    async def encode(self, items: Sequence[MultimodalItem]) -> list[EncodedItem]:
        try:
            resp = await self._stub.Encode(
                vision_pb2.EncodeRequest(items=[mm_item_to_proto(m) for m in items]), timeout=self.timeout_s
            )
        except grpc.aio.AioRpcError as e:
            raise from_rpc_error(e, f"vision service at {self.address}") from None
        return [encoded_from_proto(e) for e in resp.items]

    async def info(self) -> vision_pb2.VisionInfo:
        try:
            return await self._stub.GetInfo(vision_pb2.GetInfoRequest(), timeout=10)
        except grpc.aio.AioRpcError as e:
            raise from_rpc_error(e, f"vision service at {self.address}") from None

    async def stats(self) -> vision_pb2.VisionStats:
        try:
            return await self._stub.GetStats(vision_pb2.GetStatsRequest(), timeout=5)
        except grpc.aio.AioRpcError as e:
            raise from_rpc_error(e, f"vision service at {self.address}") from None


class VisionEmbeddingSource:
    """The worker's EmbeddingSource: pulls cached embeddings by content key over a blocking channel."""

    def __init__(self, address: str, timeout_s: float = 60.0):
        self.address = address
        self.timeout_s = timeout_s
        self._channel = grpc.insecure_channel(address, options=CHANNEL_OPTIONS)
        self._stub = vision_pb2_grpc.VisionStub(self._channel)

    def get_embeddings(self, keys: Sequence[str]):
        from common.tensors import tensor_from_proto

        try:
            resp = self._stub.GetEmbeddings(
                vision_pb2.GetEmbeddingsRequest(content_keys=list(keys)), timeout=self.timeout_s
            )
        except grpc.RpcError as e:
            if e.code() == grpc.StatusCode.UNAVAILABLE:
                raise UnavailableError(f"vision service at {self.address} is unavailable") from None
            raise from_rpc_error(e, f"vision service at {self.address}") from None
        return {e.content_key: tensor_from_proto(e.data) for e in resp.embeddings}, list(resp.missing_keys)

    def close(self) -> None:
        self._channel.close()
