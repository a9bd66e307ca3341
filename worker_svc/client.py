"""The scheduler's client of the worker: GetInfo and the bidirectional step stream, where steps can be written
ahead of their results (the scheduler's overlap)."""

from __future__ import annotations

import asyncio
from collections import deque

import grpc

from common.convert import plan_to_proto, step_output_from_proto, worker_info_from_proto
from common.errors import UnavailableError, from_rpc_error
from common.grpc_utils import create_channel
from common.types import StepOutput, StepPlan, WorkerInfo
from protos import worker_pb2, worker_pb2_grpc

_CLOSE = object()


class WorkerClient:
    def __init__(self, address: str):
        self.address = address
        self._channel = create_channel(address)
        self._stub = worker_pb2_grpc.WorkerStub(self._channel)
        self._outbox: asyncio.Queue | None = None
        self._pending: deque[asyncio.Future] = deque()
        self._reader: asyncio.Task | None = None

    async def info(self) -> WorkerInfo:
        try:
            return worker_info_from_proto(await self._stub.GetInfo(worker_pb2.GetInfoRequest(), timeout=10))
        except grpc.aio.AioRpcError as e:
            raise from_rpc_error(e, f"worker at {self.address}") from None

    @property
    def needs_handshake(self) -> bool:
        """The next step opens a new stream (first use, or the last one broke): the scheduler checks first which
        worker process answers."""
        return self._outbox is None

    def _open(self) -> None:
        self._outbox = asyncio.Queue()
        outbox = self._outbox

        async def requests():
            while (item := await outbox.get()) is not _CLOSE:
                yield item

        call = self._stub.Steps(requests())
        self._reader = asyncio.create_task(self._read(call))

    async def _read(self, call) -> None:
        try:
            async for resp in call:
                if self._pending:
                    self._pending.popleft().set_result(step_output_from_proto(resp))
            error: Exception = UnavailableError(f"worker at {self.address} closed the step stream")
        except grpc.aio.AioRpcError as e:
            error = from_rpc_error(e, f"worker at {self.address}")
        except asyncio.CancelledError:
            error = UnavailableError("step stream cancelled")
        except Exception as e:  # noqa: BLE001 - a result this client cannot read fails the steps, never hangs them
            error = UnavailableError(
                f"reading the step stream of {self.address} failed: {type(e).__name__}: {e}"
            )
        self._outbox = None
        while self._pending:
            fut = self._pending.popleft()
            if not fut.done():
                fut.set_exception(error)

    def submit(self, plan: StepPlan) -> asyncio.Future[StepOutput]:
        """Write a step; the future resolves with its result. Steps are answered in the order written."""
        if self._outbox is None:
            self._open()
        fut = asyncio.get_running_loop().create_future()
        self._pending.append(fut)
        self._outbox.put_nowait(plan_to_proto(plan))
        return fut

    async def close(self) -> None:
        if self._outbox is not None:
            self._outbox.put_nowait(_CLOSE)
        if self._reader is not None:
            self._reader.cancel()
        await self._channel.close()
