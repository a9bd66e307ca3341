"""The scheduler's client of the worker: GetInfo and the bidirectional step stream, where steps can be written
ahead of their results (the scheduler's overlap). The stream runs on the worker's Unix socket when it advertises
one that this host has (common/local_stream.py), else on gRPC."""

from __future__ import annotations

import asyncio
import logging
from collections import deque

import grpc

from common.convert import plan_to_proto, step_output_from_proto, worker_info_from_proto
from common.errors import MiradorError, UnavailableError, from_rpc_error
from common.grpc_utils import create_channel
from common.local_stream import LocalStream, open_stream
from common.types import StepOutput, StepPlan, WorkerInfo
from protos import worker_pb2, worker_pb2_grpc

logger = logging.getLogger(__name__)
STEPS_METHOD = f"/{worker_pb2.DESCRIPTOR.services_by_name['Worker'].full_name}/Steps"


class WorkerClient:
    def __init__(self, address: str):
        self.address = address
        self._channel = create_channel(address)
        self._stub = worker_pb2_grpc.WorkerStub(self._channel)
        # where steps are written: a gRPC call's request queue or a LocalStream (None half-closes either)
        self._outbox: asyncio.Queue | LocalStream | None = None
        self._pending: deque[asyncio.Future] = deque()
        self._reader: asyncio.Task | None = None
        self.transport = ""  # of the current (or last) step stream: "unix" or "grpc"

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

    async def connect(self, info: WorkerInfo) -> None:
        """Open the next step stream on the worker's Unix socket when it advertises one that exists here and
        accepts the hello; otherwise the first step opens it on gRPC."""
        if self._outbox is not None:
            return
        transport = "grpc"
        if info.step_socket:
            try:
                stream = await open_stream(
                    info.step_socket,
                    STEPS_METHOD,
                    self._on_result,
                    self._on_end,
                    what=f"worker at {self.address}",
                )
                if not stream.closed:
                    self._outbox, transport = stream, "unix"
            except (OSError, MiradorError, TimeoutError) as e:
                logger.info(
                    "the worker's socket %s is not usable here (%s): steps go on gRPC", info.step_socket, e
                )
        if transport != self.transport:
            logger.info("step stream to the worker at %s: %s", self.address, transport)
        self.transport = transport

    def _open(self) -> None:
        self._outbox = asyncio.Queue()
        outbox = self._outbox

        async def requests():
            while (item := await outbox.get()) is not None:
                yield item

        call = self._stub.Steps(requests())
        self._reader = asyncio.create_task(self._read(call))
        self.transport = "grpc"

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
        self._fail_pending(error)

    def _on_result(self, payload: memoryview) -> None:
        if self._pending:
            self._pending.popleft().set_result(
                step_output_from_proto(worker_pb2.StepResult.FromString(payload))
            )

    def _on_end(self, stream: LocalStream, error: Exception | None) -> None:
        if self._outbox is stream:
            self._outbox = None
        self._fail_pending(error or UnavailableError(f"worker at {self.address} closed the step stream"))

    def _fail_pending(self, error: Exception) -> None:
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
        try:
            self._outbox.put_nowait(plan_to_proto(plan))
        except MiradorError as e:  # the socket closed under us: this step fails like those in flight
            self._outbox = None
            self._fail_pending(e)
        return fut

    async def close(self) -> None:
        if isinstance(self._outbox, LocalStream):
            self._outbox.close()
        elif self._outbox is not None:
            self._outbox.put_nowait(None)
        if self._reader is not None:
            self._reader.cancel()
        await self._channel.close()
