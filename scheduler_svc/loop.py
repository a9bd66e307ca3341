"""The event loop around the scheduler core: takes requests, sends steps to a worker backend (one step ahead
when overlapping), feeds results back, runs vision encodes, and streams outputs to each request's caller.

Backends are duck-typed: the gRPC clients in a cluster, in-process adapters in the engine.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from collections import deque
from collections.abc import AsyncIterator, Sequence
from typing import Protocol

from common.errors import InvalidRequestError, MiradorError, UnavailableError
from common.log import request_id_var
from common.types import (
    DeltaColumns,
    EncodedItem,
    GenerateOutput,
    GenerateRequest,
    MultimodalItem,
    StepOutput,
    StepPlan,
)
from scheduler_svc.scheduler import Scheduler

logger = logging.getLogger(__name__)


class WorkerBackend(Protocol):
    """A worker behind a stream may also have `needs_handshake` (its next step opens a new stream) and
    `async info()` (whose `epoch` says which process answers); in-process backends need neither."""

    def submit(self, plan: StepPlan) -> asyncio.Future[StepOutput]: ...


class VisionBackend(Protocol):
    """One that can also pin what it encoded for the worker has `async encode_leased(items)`, returning the items
    and an EmbeddingLease (or None); the loop uses it when the worker maps the vision service's pool."""

    async def encode(self, items: Sequence[MultimodalItem]) -> list[EncodedItem]: ...


class SchedulerLoop:
    def __init__(
        self,
        core: Scheduler,
        worker: WorkerBackend,
        vision: VisionBackend | None,
        *,
        overlap: bool = True,
        step_timeout_s: float = 600.0,
        lease_embeddings: bool = False,
        log_requests: bool = False,
    ):
        self.core = core
        self.log_requests = log_requests
        self.worker = worker
        self.vision = vision
        # the worker copies leased rows from the vision service's pool itself: ask for a lease with each encode
        self.lease_embeddings = lease_embeddings and hasattr(vision, "encode_leased")
        self.depth = 1 if overlap else 0
        self.step_timeout_s = step_timeout_s
        self._queues: dict[str, asyncio.Queue[GenerateOutput]] = {}
        # sinks whose requests' plain deltas the core appends to columns: handed over whole once per step
        self._routes: dict[int, tuple[object, DeltaColumns]] = {}
        self._wake = asyncio.Event()
        self._encoding: dict[str, asyncio.Future] = {}
        self._intervals: deque[tuple[int, int]] = deque(maxlen=64)  # recent scheduler work, unix ns
        self._task: asyncio.Task | None = None
        self._stopping = False
        self._worker_epoch: int | None = None
        self._draining = False
        self._not_serving: set[str] = set()  # backends that are draining, loading or unreachable

    def start(self) -> None:
        self._task = asyncio.create_task(self._run(), name="scheduler-loop")

    @property
    def task(self) -> asyncio.Task | None:
        return self._task

    async def drain(self) -> None:
        """Refuse new requests (UNAVAILABLE, a 503 with Retry-After at the gateway) and return once every request
        in flight has finished."""
        self._draining = True
        while self._queues:
            await asyncio.sleep(0.05)

    def set_backend_serving(self, name: str, serving: bool) -> None:
        """The scheduler's health watch: a backend ("worker" or "vision") that is not SERVING gets no new requests
        (they are refused with UNAVAILABLE, a 503 with Retry-After), while those already here, queued or running,
        go on, so a backend stopped gracefully finishes them before it exits."""
        (self._not_serving.discard if serving else self._not_serving.add)(name)

    async def stop(self) -> None:
        self._stopping = True
        self._wake.set()
        if self._task is not None:
            self._task.cancel()
            with contextlib.suppress(asyncio.CancelledError, Exception):
                await self._task
        self._end_all("the scheduler is shutting down")

    # ---- callers ----

    async def generate(self, req: GenerateRequest) -> AsyncIterator[GenerateOutput]:
        """Outputs of every choice until each has finished; leaving early (cancel, disconnect) aborts."""
        self._check_open(req)
        queue: asyncio.Queue[GenerateOutput] = asyncio.Queue()
        if req.request_id in self._queues:
            raise InvalidRequestError(f"request id {req.request_id!r} is already live", param="rid")
        self._add(req)
        self._queues[req.request_id] = queue
        self._wake.set()
        remaining = max(1, req.n)
        try:
            while remaining:
                out = await queue.get()
                if out.error is not None:
                    raise output_error(out)
                if out.finish_reason is not None:
                    remaining -= 1
                yield out
        finally:
            self._queues.pop(req.request_id, None)
            if remaining and self.core.abort_request(req.request_id):
                logger.info("request %s aborted by its caller", req.request_id)
                self._wake.set()

    def _add(self, req: GenerateRequest, deltas: DeltaColumns | None = None) -> None:
        self.core.add_request(req, time.monotonic(), deltas)
        self._start_compiles()
        if self.log_requests:
            logger.info(
                "request: %d prompt tokens, %d image(s), n=%d, max_new_tokens=%d",
                len(req.input_ids),
                len(req.mm_items),
                req.n,
                req.stopping.max_new_tokens,
                extra={"request_id": req.request_id},
            )

    def attach(self, req: GenerateRequest, sink) -> None:
        """Start a request whose outputs go to `sink.put_nowait` (a multiplexed stream's outbox) instead of a
        generator; the caller counts finished choices and calls `detach` (which aborts what is unfinished).
        A sink opened with `open_route` also gets DeltaColumns: its requests' plain deltas of a step, all in one."""
        self._check_open(req)
        if req.request_id in self._queues:
            raise InvalidRequestError(f"request id {req.request_id!r} is already live", param="rid")
        route = self._routes.get(id(sink))
        self._add(req, route[1] if route is not None else None)
        self._queues[req.request_id] = sink
        self._wake.set()

    def open_route(self, sink) -> None:
        """Requests attached to `sink` from now on send their plain deltas as DeltaColumns (one put per step for
        all of them) instead of one GenerateOutput each; the sink then takes both kinds, in order."""
        self._routes[id(sink)] = (sink, DeltaColumns())

    def close_route(self, sink) -> None:
        self._routes.pop(id(sink), None)

    def _check_open(self, req: GenerateRequest) -> None:
        if self._task is None or self._task.done() or self._stopping:
            raise UnavailableError("the scheduler loop is not running")
        if self._draining:
            raise UnavailableError("the scheduler is shutting down; retry on another replica or shortly")
        if self._not_serving and ("worker" in self._not_serving or req.mm_items):
            down = "worker" if "worker" in self._not_serving else "vision service"
            raise UnavailableError(f"the {down} is not serving (restarting or stopping); retry shortly")

    def detach(self, request_id: str) -> None:
        if self._queues.pop(request_id, None) is not None and self.core.abort_request(request_id):
            logger.info("request %s aborted by its caller", request_id)
            self._wake.set()

    async def flush_cache(self) -> tuple[bool, int, int, int]:
        """(flushed, live requests, KV pages freed, embeddings dropped): the prefix cache and the vision service's
        embeddings are emptied only while no request is live, as SGLang's flush_cache."""
        live = len(self.core.requests)
        if live:
            return False, live, 0, 0
        pages = self.core.cache.reset()
        embeddings = await self.vision.flush_cache() if self.vision is not None else 0
        logger.info("cache flushed: %d KV pages, %d image embeddings", pages, embeddings)
        return True, 0, pages, embeddings

    def abort(self, request_id: str) -> bool:
        found = self.core.abort_request(request_id)
        self._deliver()
        self._wake.set()
        return found

    # ---- the loop ----

    async def _run(self) -> None:
        """The loop; if it dies, every live request ends at once with an error and the exception propagates
        (the service's Fatal watcher turns it NOT_SERVING and exits)."""
        try:
            await self._loop()
        except asyncio.CancelledError:
            raise
        except BaseException as e:
            logger.critical("the scheduler loop died; ending %d live request(s)", len(self._queues))
            self._end_all(f"the scheduler failed: {type(e).__name__}: {e}")
            raise

    def _end_all(self, error: str) -> None:
        """An error output to every caller, straight to its queue (the core may be what broke)."""
        for request_id, q in self._queues.items():
            q.put_nowait(GenerateOutput(request_id, 0, error=error, error_code="unavailable"))

    async def _loop(self) -> None:
        inflight: deque[tuple[StepPlan, asyncio.Future]] = deque()
        while not self._stopping:
            plan = None
            handshake = not inflight and getattr(self.worker, "needs_handshake", False) and self.core.has_work
            if handshake and not await self._handshake():
                continue
            if len(inflight) <= self.depth:
                a = time.time_ns()
                plan = self.core.schedule()
                self._start_encodes()  # images admission found missing go to vision now, not next wake-up
                self._account(a, time.time_ns(), off_path=bool(inflight))
                if plan is not None:
                    if inflight:
                        self.core.stats.steps_overlapped += 1
                    inflight.append((plan, self.worker.submit(plan)))
            if inflight and (len(inflight) > self.depth or plan is None):
                _, fut = inflight.popleft()
                try:
                    out = await asyncio.wait_for(fut, self.step_timeout_s)
                except (MiradorError, TimeoutError, asyncio.TimeoutError, ConnectionError) as e:
                    self._worker_failed(e, inflight)
                    continue
                a = time.time_ns()
                self.core.process_output(out)
                self._deliver()
                self._account(a, time.time_ns(), off_path=bool(inflight))
                self.core.stats.scheduler_ns_overlapped += self._overlap(out.start_unix_ns, out.end_unix_ns)
                continue
            self._deliver()
            if plan is None and not inflight:
                await self._wake.wait()
                self._wake.clear()

    async def _handshake(self) -> bool:
        """Before a new step stream: which worker process answers? One with another epoch restarted, and holds
        none of the KV the prefix cache and the running sequences rely on. False: no worker answered (the live
        requests failed; the loop waits for new work)."""
        try:
            info = await self.worker.info()
        except (MiradorError, ConnectionError) as e:
            self._worker_failed(e, deque())
            await asyncio.sleep(0.05)  # no spinning on a worker that is down
            return False
        if self._worker_epoch is not None and info.epoch != self._worker_epoch:
            logger.warning(
                "the worker restarted (epoch %x -> %x): dropping the prefix cache and failing running requests",
                self._worker_epoch,
                info.epoch,
            )
            self.core.on_worker_restarted("the worker restarted; the request lost its state")
            self._deliver()
        self._worker_epoch = info.epoch
        connect = getattr(self.worker, "connect", None)  # a client that picks the stream's transport
        if connect is not None:
            await connect(info)
        return True

    def _account(self, a: int, b: int, off_path: bool) -> None:
        """Scheduler work [a, b]; off the critical path when the worker already holds a later step."""
        self._intervals.append((a, b))
        self.core.stats.scheduler_ns_total += b - a
        if off_path:
            self.core.stats.scheduler_ns_off_path += b - a

    def _overlap(self, start: int, end: int) -> int:
        """Scheduler work done while the worker was computing [start, end]."""
        total = 0
        for a, b in reversed(self._intervals):  # in time order, one after another: the recent ones only
            if b <= start:
                break
            total += max(0, min(b, end) - max(a, start))
        return total

    def _worker_failed(self, error: BaseException, inflight: deque) -> None:
        logger.error("worker step failed (%s); failing the running requests", error)
        inflight.clear()
        self.core.on_worker_lost(f"worker unavailable: {error}")
        self._deliver()

    def _deliver(self) -> None:
        for sink, deltas in self._routes.values():  # deltas first: each came before any message of this cycle
            if deltas.request_ids:
                sink.put_nowait(deltas.take())
        outs, self.core.outputs = self.core.outputs, []
        for out in outs:
            q = self._queues.get(out.request_id)
            if q is not None:
                q.put_nowait(out)

    # ---- grammars ----

    def _start_compiles(self) -> None:
        requests, self.core.grammar_requests = self.core.grammar_requests, []
        for request_id, constraint in requests:
            asyncio.create_task(self._compile(request_id, constraint))

    async def _compile(self, request_id: str, constraint) -> None:
        """Compile a request's grammar on the backend's threads (or find it cached); the request is admitted when
        it is ready, and fails with INVALID_ARGUMENT (a 400 before any output) when it does not compile."""
        request_id_var.set(request_id)
        try:
            compiled = await asyncio.wrap_future(self.core.grammar_backend().compile(constraint))
            self.core.on_grammar(request_id, compiled)
        except Exception as e:  # noqa: BLE001 - the request fails, the loop lives on
            logger.info("grammar of %s rejected: %s", request_id, e)
            self.core.fail_request(request_id, str(getattr(e, "message", e)), _code(e))
            self._deliver()
        finally:
            self._wake.set()

    # ---- vision ----

    def _start_encodes(self) -> None:
        requests, self.core.encode_requests = self.core.encode_requests, []
        for request_id, items in requests:
            asyncio.create_task(self._encode(request_id, items))

    async def _encode(self, request_id: str, items: list[MultimodalItem]) -> None:
        """Encode a request's images not already being encoded for another request, then wait for all of them."""
        request_id_var.set(request_id)  # this task's log lines and its Encode call carry the request's id
        mine = [m for m in items if m.content_key not in self._encoding]
        others = [self._encoding[m.content_key] for m in items if m.content_key in self._encoding]
        fut = asyncio.get_running_loop().create_future()
        for m in mine:
            self._encoding[m.content_key] = fut
        hits = calls = 0
        lease = None
        try:
            if mine:
                if self.vision is None:
                    raise UnavailableError("this scheduler has no vision service for image requests")
                calls = 1
                if self.lease_embeddings:
                    done, lease = await self.vision.encode_leased(mine)
                else:
                    done = await self.vision.encode(mine)
                hits = sum(1 for e in done if e.cache_hit)
                fut.set_result(True)
            for other in others:
                await other
            self.core.on_encoded(request_id, [m.content_key for m in items], calls, len(mine), hits, lease)
        except Exception as e:  # noqa: BLE001 - the request fails, the loop lives on
            if not fut.done():
                fut.set_exception(e)
                fut.exception()
            if lease is not None:  # granted before another request's encode failed: the worker ends it
                self.core.hand_back(lease)
            logger.warning("encoding images of %s failed: %s", request_id, e)
            self.core.fail_request(request_id, f"image encoding failed: {e}", _code(e))
            self._deliver()
        finally:
            for m in mine:
                if self._encoding.get(m.content_key) is fut:
                    del self._encoding[m.content_key]
            self._wake.set()


def _code(e: BaseException) -> str:
    if isinstance(e, MiradorError):
        return {
            "INVALID_ARGUMENT": "invalid_argument",
            "UNAVAILABLE": "unavailable",
            "RESOURCE_EXHAUSTED": "resource_exhausted",
        }.get(e.grpc_code.name, "internal")
    return "internal"


def output_error(out: GenerateOutput) -> MiradorError:
    from common.errors import InvalidRequestError as Invalid
    from common.errors import ResourceExhaustedError

    cls = {
        "invalid_argument": Invalid,
        "unavailable": UnavailableError,
        "resource_exhausted": ResourceExhaustedError,
    }.get(out.error_code, MiradorError)
    return cls(out.error or "request failed")
