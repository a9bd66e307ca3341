"""Per-request context at the HTTP edge: the request id (the client's X-Request-Id when it is a sane token, else a
new one; returned in the response's X-Request-Id and carried by every log line and internal call about the request),
the arrival time latency metrics start from, and the count of responses by status."""

from __future__ import annotations

import contextvars
import re
import time
import uuid

from common.log import request_id_var
from gateway.metrics import GatewayMetrics

# when the gateway received the request (time.perf_counter()); 0.0 outside a request
arrival_var: contextvars.ContextVar[float] = contextvars.ContextVar("arrival", default=0.0)
# what a client may choose as its id: it becomes part of the OpenAI `id`, of internal sequence ids and log lines
_VALID_ID = re.compile(r"[A-Za-z0-9._:\-]{1,128}")


def request_id_from(header: bytes | None) -> str:
    if header:
        text = header.decode("latin-1")
        if _VALID_ID.fullmatch(text):
            return text
    return uuid.uuid4().hex


class RequestContext:
    """Pure ASGI middleware (streamed responses pass untouched)."""

    def __init__(self, app, metrics: GatewayMetrics):
        self.app = app
        self.metrics = metrics

    async def __call__(self, scope, receive, send):
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        header = next((v for k, v in scope["headers"] if k == b"x-request-id"), None)
        rid = request_id_from(header)
        rid_token = request_id_var.set(rid)
        arrival_token = arrival_var.set(time.perf_counter())
        path = scope.get("path", "")

        async def tagged(message):
            if message["type"] == "http.response.start":
                message["headers"] = [*message.get("headers", []), (b"x-request-id", rid.encode())]
                self.metrics.count_response(path, message["status"])
            await send(message)

        try:
            await self.app(scope, receive, tagged)
        finally:
            request_id_var.reset(rid_token)
            arrival_var.reset(arrival_token)
