"""The gateway's client of the scheduler."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator

import grpc

from common.convert import outputs_from_batch, request_to_proto
from common.errors import (
    DeadlineExceededError,
    InvalidRequestError,
    MiradorError,
    NotFoundError,
    ResourceExhaustedError,
    UnavailableError,
    from_rpc_error,
)
from common.grpc_utils import create_channel
from common.mailbox import Mailbox
from common.types import GenerateOutput, GenerateRequest
from protos import scheduler_pb2, scheduler_pb2_grpc

_CLOSE = object()
_ERRORS: dict[str, type[MiradorError]] = {
    "INVALID_ARGUMENT": InvalidRequestError,
    "NOT_FOUND": NotFoundError,
    "RESOURCE_EXHAUSTED": ResourceExhaustedError,
    "UNAVAILABLE": UnavailableError,
    "DEADLINE_EXCEEDED": DeadlineExceededError,
}


class SchedulerClient:
    """All of this process's requests share one `Connect` stream: requests and aborts go out on it, and a step's
    outputs for all of them come back in one message, which a reader task hands to each request's queue."""

    def __init__(self, address: str, timeout_s: float = 3600.0):
        self.address = address
        self.timeout_s = timeout_s
        self._channel = create_channel(address)
        self._stub = scheduler_pb2_grpc.SchedulerStub(self._channel)
        self._outbox: asyncio.Queue | None = None
        self._queues: dict[str, Mailbox] = {}
        self._reader: asyncio.Task | None = None

    async def close(self) -> None:
        if self._outbox is not None:
            self._outbox.put_nowait(_CLOSE)
        if self._reader is not None:
            self._reader.cancel()
        await self._channel.close()

    def _open(self) -> asyncio.Queue:
        outbox: asyncio.Queue = asyncio.Queue()

        async def requests():
            while (item := await outbox.get()) is not _CLOSE:
                yield item

        call = self._stub.Connect(requests())
        self._outbox = outbox
        self._reader = asyncio.create_task(self._read(call, outbox))
        return outbox

    async def _read(self, call, outbox: asyncio.Queue) -> None:
        try:
            async for batch in call:
                for out in outputs_from_batch(batch):
                    q = self._queues.get(out.request_id)
                    if q is not None:
                        q.put_nowait(out)
                for err in batch.errors:
                    q = self._queues.get(err.request_id)
                    if q is not None:
                        q.put_nowait(err)
            error = UnavailableError(f"scheduler at {self.address} closed the request stream")
        except grpc.aio.AioRpcError as e:
            error = from_rpc_error(e, f"scheduler at {self.address}")
        except asyncio.CancelledError:
            error = UnavailableError("the request stream was closed")
        except Exception as e:  # noqa: BLE001 - a message this client cannot read fails the requests, never hangs them
            error = UnavailableError(f"reading the request stream failed: {type(e).__name__}: {e}")
        if self._outbox is outbox:  # the next request opens a new stream
            self._outbox = None
            outbox.put_nowait(_CLOSE)
        for q in self._queues.values():
            q.put_nowait(error)

    async def generate(self, req: GenerateRequest) -> AsyncIterator[GenerateOutput]:
        """Stream outputs; closing the iterator early aborts the request everywhere."""
        if req.request_id in self._queues:
            raise InvalidRequestError(f"request id {req.request_id!r} is already live", param="rid")
        queue = Mailbox()
        self._queues[req.request_id] = queue
        outbox = self._outbox or self._open()
        outbox.put_nowait(scheduler_pb2.ConnectRequest(generate=request_to_proto(req)))
        remaining = max(1, req.n)
        timer = asyncio.get_running_loop().call_later(
            self.timeout_s,
            queue.put_nowait,
            DeadlineExceededError(f"the request ran longer than {self.timeout_s:g} s"),
        )
        try:
            while remaining:
                out = None
                # when this caller fell behind, one output carries them all
                for item in await queue.take_all():
                    if isinstance(item, Exception):
                        raise item
                    if isinstance(item, scheduler_pb2.RequestError):
                        remaining = 0
                        raise _ERRORS.get(item.code, MiradorError)(item.message)
                    nxt = item
                    if out is not None and (out.index != nxt.index or out.finish_reason is not None):
                        yield out
                        out = None
                    out = nxt if out is None else _merge(out, nxt)
                    if nxt.finish_reason is not None:
                        remaining -= 1
                if out is not None:
                    yield out
        finally:
            timer.cancel()
            self._queues.pop(req.request_id, None)
            if remaining and self._outbox is outbox:
                outbox.put_nowait(
                    scheduler_pb2.ConnectRequest(abort=scheduler_pb2.AbortRequest(request_id=req.request_id))
                )

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

    async def flush_cache(self) -> scheduler_pb2.FlushCacheResponse:
        try:
            return await self._stub.FlushCache(scheduler_pb2.FlushCacheRequest(), timeout=30)
        except grpc.aio.AioRpcError as e:
            raise from_rpc_error(e, f"scheduler at {self.address}") from None

    async def server_info(self) -> scheduler_pb2.ServerInfo:
        try:
            return await self._stub.GetServerInfo(scheduler_pb2.GetServerInfoRequest(), timeout=5)
        except grpc.aio.AioRpcError as e:
            raise from_rpc_error(e, f"scheduler at {self.address}") from None


def _merge(a: GenerateOutput, b: GenerateOutput) -> GenerateOutput:
    """Two consecutive outputs of one choice as one (the later one's finish and usage)."""
    b.text = a.text + b.text
    b.token_ids = a.token_ids + b.token_ids
    b.logprobs = a.logprobs + b.logprobs
    return b
