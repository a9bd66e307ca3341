"""Server interceptors that run inside each call: the caller check of common/security.py, the per-RPC metrics of
common/metrics.py and the in-flight count a draining service waits on.

grpc aio interceptors see only the method name and metadata, not the call's context (the peer's certificate), and
cannot observe when a call ends; so each wraps the method handler's behavior in one of the same kind.
"""

from __future__ import annotations

import asyncio
import inspect
import time
from collections.abc import Awaitable, Callable
from typing import Any

import grpc

_KINDS = {
    (False, False): "unary_unary",
    (False, True): "unary_stream",
    (True, False): "stream_unary",
    (True, True): "stream_stream",
}


def wrap_handler(
    handler: grpc.RpcMethodHandler,
    enter: Callable[[grpc.aio.ServicerContext], Awaitable[Any]],
    leave: Callable[[Any, grpc.aio.ServicerContext, BaseException | None], None] | None = None,
) -> grpc.RpcMethodHandler:
    """The same handler, but each call first awaits `enter(context)` (which may abort the call), and once the call
    is over, however it ended, calls `leave(what enter returned, context, the exception that ended it or None)`."""

    def wrap(behavior, streaming: bool):
        if streaming and inspect.isasyncgenfunction(behavior):

            async def gen(request, context):
                state, error = await enter(context), None
                try:
                    async for item in behavior(request, context):
                        yield item
                except BaseException as e:
                    error = e
                    raise
                finally:
                    if leave is not None:
                        leave(state, context, error)

            return gen

        async def call(request, context):
            state, error = await enter(context), None
            try:
                return await behavior(request, context)
            except BaseException as e:
                error = e
                raise
            finally:
                if leave is not None:
                    leave(state, context, error)

        return call

    kind = _KINDS[(handler.request_streaming, handler.response_streaming)]
    factory = getattr(grpc, f"{kind}_rpc_method_handler")
    return factory(
        wrap(getattr(handler, kind), handler.response_streaming),
        request_deserializer=handler.request_deserializer,
        response_serializer=handler.response_serializer,
    )


class Activity(grpc.aio.ServerInterceptor):
    """Counts the service's calls in flight (health and reflection aside) and when the last one ended; a draining
    service without a drain of its own waits until it has been quiet for a moment."""

    _IGNORED = ("/grpc.health.v1.", "/grpc.reflection.")

    def __init__(self) -> None:
        self.in_flight = 0
        self.last_end = time.monotonic()

    async def intercept_service(self, continuation, handler_call_details):
        handler = await continuation(handler_call_details)
        if handler is None or handler_call_details.method.startswith(self._IGNORED):
            return handler
        return wrap_handler(handler, self._enter, self._leave)

    async def _enter(self, context) -> None:
        self.in_flight += 1

    def _leave(self, state, context, error) -> None:
        self.in_flight -= 1
        self.last_end = time.monotonic()

    async def wait_quiet(self, quiet_s: float) -> None:
        """Return once no call has been in flight for `quiet_s`, counted from now at the earliest: long enough for
        calls already on their way (a 16 MB Encode starts only once all of it has arrived) and for callers that
        saw NOT_SERVING to have stopped sending, and for follow-up calls of the work just done (embedding pulls)."""
        start = time.monotonic()
        while self.in_flight or time.monotonic() - max(self.last_end, start) < quiet_s:
            await asyncio.sleep(0.05)
