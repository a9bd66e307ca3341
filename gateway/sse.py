"""Server-sent events written straight to the ASGI server.

A streamed completion is one `send` per event, and per event Starlette's `StreamingResponse` passes through every
middleware's `send` wrapper (the exception handlers', the request context's), each an async call that only looks
for the response's start. `EventStreamResponse` sends the start through that chain, so headers, the request id and
the status count are what every other response gets, and writes the body's events with the server's own `send`,
which the app (`gateway.app.GatewayApp`) leaves in the scope under `RAW_SEND` before any middleware wraps it. A
client that goes away cancels the stream (its generator's cleanup aborts the request at the scheduler), as
Starlette's does."""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import AsyncIterator

from starlette.responses import StreamingResponse
from starlette.types import Receive, Scope, Send

RAW_SEND = "mirador.raw_send"  # scope key: the ASGI server's `send`, before any middleware wrapped it


class EventStreamResponse(StreamingResponse):
    def __init__(self, events: AsyncIterator[str]):
        super().__init__(
            events,
            media_type="text/event-stream",
            headers={"Cache-Control": "no-cache", "X-Accel-Buffering": "no"},
        )

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        await send({"type": "http.response.start", "status": self.status_code, "headers": self.raw_headers})
        pump = asyncio.ensure_future(self._write(scope.get(RAW_SEND, send)))
        watch = asyncio.ensure_future(_until_disconnect(receive))
        try:
            await asyncio.wait({pump, watch}, return_when=asyncio.FIRST_COMPLETED)
        finally:
            for task in (pump, watch):
                task.cancel()
            # the generator's cleanup (the scheduler's abort) runs before this response counts as done
            await asyncio.wait({pump, watch})
        if not pump.cancelled() and pump.exception() is not None:
            raise pump.exception()

    async def _write(self, send: Send) -> None:
        events = self.body_iterator
        try:
            async for event in events:
                await send({"type": "http.response.body", "body": event.encode(), "more_body": True})
            await send({"type": "http.response.body", "body": b"", "more_body": False})
        except OSError:  # the connection broke under a write: as a disconnect
            pass
        finally:
            with contextlib.suppress(Exception):
                await events.aclose()


async def _until_disconnect(receive: Receive) -> None:
    while (await receive())["type"] != "http.disconnect":
        pass
