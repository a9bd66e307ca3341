"""The gateway's client of the scheduler."""

from __future__ import annotations

from collections.abc import AsyncIterator

import grpc

from common.convert import output_from_proto, request_to_proto
from common.errors import from_rpc_error
from common.grpc_utils import create_channel
from common.types import GenerateOutput, GenerateRequest
from protos import scheduler_pb2, scheduler_pb2_grpc


class SchedulerClient:
    def __init__(self, address: str, timeout_s: float = 3600.0):
        self.address = address
        self.timeout_s = timeout_s
        self._channel = create_channel(address)
        self._stub = scheduler_pb2_grpc.SchedulerStub(self._channel)

    async def close(self) -> None:
        await self._channel.close()

    async def generate(self, req: GenerateRequest) -> AsyncIterator[GenerateOutput]:
        """Stream outputs; closing the iterator early cancels the call, which aborts the request everywhere."""
        call = self._stub.Generate(request_to_proto(req), timeout=self.timeout_s)
        try:
            async for msg in call:
                yield output_from_proto(msg)
        except grpc.aio.AioRpcError as e:
            raise from_rpc_error(e, f"scheduler at {self.address}") from None
        finally:
            call.cancel()

    async def abort(self, request_id: str) -> bool:
        try:
            resp = await self._stub.Abort(scheduler_pb2.AbortRequest(request_id=request_id), timeout=10)
        except grpc.aio.AioRpcError as e:
            raise from_rpc_error(e, f"scheduler at {self.address}") from None
        return resp.found

    async def stats(self) -> scheduler_pb2.SchedulerStats:
        try:
            return await self._stub.GetStats(scheduler_pb2.GetStatsRequest(), timeout=5)
        except grpc.aio.AioRpcError as e:
            raise from_rpc_error(e, f"scheduler at {self.address}") from None

    async def server_info(self) -> scheduler_pb2.ServerInfo:
        try:
            return await self._stub.GetServerInfo(scheduler_pb2.GetServerInfoRequest(), timeout=5)
        except grpc.aio.AioRpcError as e:
            raise from_rpc_error(e, f"scheduler at {self.address}") from None
