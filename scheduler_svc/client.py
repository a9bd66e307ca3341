"""The gateway's client of the scheduler. Its request stream (Connect) runs on the scheduler's Unix socket when it
advertises one that this host has (common/local_stream.py), else on gRPC."""

from __future__ import annotations

import asyncio
import contextlib
import logging
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
from common.local_stream import LocalStream, open_stream
from common.mailbox import Mailbox
from common.types import GenerateOutput, GenerateRequest
from protos import scheduler_pb2, scheduler_pb2_grpc

logger = logging.getLogger(__name__)
CONNECT_METHOD = f"/{scheduler_pb2.DESCRIPTOR.services_by_name['Scheduler'].full_name}/Connect"
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
        # where requests go: a gRPC call's request queue or a LocalStream (None half-closes either)
        self._outbox: asyncio.Queue | LocalStream | None = None
        self._opening: asyncio.Task | None = None
        self._queues: dict[str, Mailbox] = {}
        self._reader: asyncio.Task | None = None
        self.transport = ""  # of the current (or last) request stream: "unix" or "grpc"

    async def close(self) -> None:
        if isinstance(self._outbox, LocalStream):
            self._outbox.close()
        elif self._outbox is not None:
            self._outbox.put_nowait(None)
        if self._reader is not None:
            self._reader.cancel()
        await self._channel.close()

    async def _connect(self) -> asyncio.Queue | LocalStream:
        """The request stream, opened once for all the requests that find none."""
        if self._opening is None:
            self._opening = asyncio.create_task(self._open_any())
        opening = self._opening
        try:
            return await asyncio.shield(opening)
        finally:
            if opening.done() and self._opening is opening:
                self._opening = None

    async def _open_any(self) -> asyncio.Queue | LocalStream:
        """On the scheduler's Unix socket when it advertises one that exists here and accepts the hello, else on
        gRPC (also when the scheduler does not answer now: the stream then fails as it would have)."""
        transport, path = "grpc", ""
        with contextlib.suppress(MiradorError):
            path = (await self.server_info()).connect_socket
        if path:
            try:
                stream = await open_stream(
                    path, CONNECT_METHOD, self._on_batch, self._on_end, what=f"scheduler at {self.address}"
                )
                if not stream.closed:
                    self._outbox, transport = stream, "unix"
            except (OSError, MiradorError, TimeoutError) as e:
                logger.info("the scheduler's socket %s is not usable here (%s): requests go on gRPC", path, e)
        if transport != self.transport:
            logger.info("request stream to the scheduler at %s: %s", self.address, transport)
        self.transport = transport
        return self._outbox if transport == "unix" else self._open()

    def _open(self) -> asyncio.Queue:
        outbox: asyncio.Queue = asyncio.Queue()

        async def requests():
            while (item := await outbox.get()) is not None:
                yield item

        call = self._stub.Connect(requests())
        self._outbox = outbox
        self._reader = asyncio.create_task(self._read(call, outbox))
        return outbox

    def _dispatch(self, batch: scheduler_pb2.OutputBatch) -> None:
        for out in outputs_from_batch(batch):
            q = self._queues.get(out.request_id)
            if q is not None:
                q.put_nowait(out)
        for err in batch.errors:
            q = self._queues.get(err.request_id)
            if q is not None:
                q.put_nowait(err)

    def _on_batch(self, payload: memoryview) -> None:
        self._dispatch(scheduler_pb2.OutputBatch.FromString(payload))

    def _on_end(self, stream: LocalStream, error: Exception | None) -> None:
        self._end(stream, error or UnavailableError(f"scheduler at {self.address} closed the request stream"))

    def _end(self, outbox, error: Exception) -> None:
        if self._outbox is outbox:  # the next request opens a new stream
            self._outbox = None
            outbox.put_nowait(None)
        for q in self._queues.values():
            q.put_nowait(error)

    async def _read(self, call, outbox: asyncio.Queue) -> None:
        try:
            async for batch in call:
                self._dispatch(batch)
            error = UnavailableError(f"scheduler at {self.address} closed the request stream")
        except grpc.aio.AioRpcError as e:
            error = from_rpc_error(e, f"scheduler at {self.address}")
        except asyncio.CancelledError:
            error = UnavailableError("the request stream was closed")
        except Exception as e:  # noqa: BLE001 - a message this client cannot read fails the requests, never hangs them
            error = UnavailableError(f"reading the request stream failed: {type(e).__name__}: {e}")
        self._end(outbox, error)

    async def generate(self, req: GenerateRequest) -> AsyncIterator[GenerateOutput]:
        """Stream outputs; closing the iterator early aborts the request everywhere."""
        if req.request_id in self._queues:
            raise InvalidRequestError(f"request id {req.request_id!r} is already live", param="rid")
        queue = Mailbox()
        self._queues[req.request_id] = queue
        try:
            outbox = self._outbox or await self._connect()
            outbox.put_nowait(scheduler_pb2.ConnectRequest(generate=request_to_proto(req)))
        except BaseException:
            self._queues.pop(req.request_id, None)
            raise
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
    """Two consecutive outputs of one choice as one (the later one's finish and usage; the prompt's logprobs,
    which only a choice's first output carries, from whichever has them)."""
    b.text = a.text + b.text
    b.token_ids = a.token_ids + b.token_ids
    b.logprobs = a.logprobs + b.logprobs
    b.prompt_logprobs = a.prompt_logprobs + b.prompt_logprobs
    return b
