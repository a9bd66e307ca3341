"""The services' event loop (common/event_loop.py) and the gateway's event stream response (gateway/sse.py)."""

from __future__ import annotations

import asyncio

import grpc
import pytest
from fastapi import Request
from grpc_health.v1 import health, health_pb2, health_pb2_grpc

from common import event_loop
from gateway.sse import RAW_SEND, EventStreamResponse


def test_auto_takes_uvloop_when_installed(monkeypatch):
    pytest.importorskip("uvloop")
    assert event_loop.resolve("auto") == "uvloop"
    assert event_loop.resolve("asyncio") == "asyncio"
    monkeypatch.setattr(event_loop.importlib.util, "find_spec", lambda name: None)
    assert event_loop.resolve("auto") == "asyncio"
    with pytest.raises(ValueError, match="uvloop is not installed"):
        event_loop.resolve("uvloop")
    with pytest.raises(ValueError, match="--event-loop must be one of"):
        event_loop.resolve("trio")


@pytest.mark.parametrize("choice", ["uvloop", "asyncio"])
def test_grpc_aio_serves_on_either_loop(choice):
    """A grpc.aio server and client in one process on the chosen loop: a unary call and a server stream."""
    if choice == "uvloop":
        pytest.importorskip("uvloop")

    async def main() -> tuple[str, int, int]:
        server = grpc.aio.server()
        servicer = health.aio.HealthServicer()
        health_pb2_grpc.add_HealthServicer_to_server(servicer, server)
        port = server.add_insecure_port("127.0.0.1:0")
        await server.start()
        try:
            await servicer.set("", health_pb2.HealthCheckResponse.SERVING)
            async with grpc.aio.insecure_channel(f"127.0.0.1:{port}") as channel:
                stub = health_pb2_grpc.HealthStub(channel)
                resp = await stub.Check(health_pb2.HealthCheckRequest(), timeout=10)
                watch = stub.Watch(health_pb2.HealthCheckRequest(), timeout=10)
                first = await watch.read()
                await servicer.set("", health_pb2.HealthCheckResponse.NOT_SERVING)
                second = await watch.read()
                watch.cancel()
            return type(asyncio.get_running_loop()).__module__, resp.status, first.status * 10 + second.status
        finally:
            await server.stop(None)

    module, status, watched = event_loop.run(main(), choice)
    assert module.startswith("uvloop" if choice == "uvloop" else "asyncio")
    assert status == health_pb2.HealthCheckResponse.SERVING
    assert watched == 10 * health_pb2.HealthCheckResponse.SERVING + health_pb2.HealthCheckResponse.NOT_SERVING


def _asgi_pair(disconnect: asyncio.Event):
    wrapped, raw = [], []

    async def send(message):
        wrapped.append(message)

    async def raw_send(message):
        raw.append(message)

    async def receive():
        await disconnect.wait()
        return {"type": "http.disconnect"}

    return send, raw_send, receive, wrapped, raw


def test_events_skip_the_middleware_chain_and_the_start_does_not():
    async def main():
        async def events():
            yield "data: 1\n\n"
            yield "data: 2\n\n"

        send, raw_send, receive, wrapped, raw = _asgi_pair(asyncio.Event())
        await EventStreamResponse(events())({"type": "http", RAW_SEND: raw_send}, receive, send)
        return wrapped, raw

    wrapped, raw = asyncio.run(main())
    assert [m["type"] for m in wrapped] == ["http.response.start"]  # headers, request id, status count
    assert dict(wrapped[0]["headers"])[b"content-type"].startswith(b"text/event-stream")
    assert [m["body"] for m in raw] == [b"data: 1\n\n", b"data: 2\n\n", b""]
    assert [m["more_body"] for m in raw] == [True, True, False]


def test_a_disconnect_cancels_the_stream_and_runs_its_cleanup():
    async def main():
        disconnect = asyncio.Event()
        cleaned = asyncio.Event()

        async def events():
            try:
                yield "data: first\n\n"
                disconnect.set()
                await asyncio.sleep(3600)  # a request that would run on
                yield "data: never\n\n"
            finally:
                cleaned.set()  # where the scheduler's abort goes

        send, raw_send, receive, _, raw = _asgi_pair(disconnect)
        await asyncio.wait_for(
            EventStreamResponse(events())({"type": "http", RAW_SEND: raw_send}, receive, send), 10
        )
        return cleaned.is_set(), raw

    cleaned, raw = asyncio.run(main())
    assert cleaned
    assert [m["body"] for m in raw] == [b"data: first\n\n"]


def test_an_error_in_the_stream_reaches_the_caller():
    async def main():
        async def events():
            yield "data: 1\n\n"
            raise RuntimeError("boom")

        send, raw_send, receive, _, _ = _asgi_pair(asyncio.Event())
        await EventStreamResponse(events())({"type": "http", RAW_SEND: raw_send}, receive, send)

    with pytest.raises(RuntimeError, match="boom"):
        asyncio.run(main())


def test_the_gateway_app_hands_streams_the_servers_own_send():
    """GatewayApp puts the ASGI server's `send` in the scope before Starlette's outermost middleware wraps it, so
    EventStreamResponse writes events without passing through any middleware's wrapper."""
    from gateway.app import GatewayApp
    from gateway.request_context import RequestContext

    app = GatewayApp()
    app.add_middleware(RequestContext, metrics=type("M", (), {"count_response": lambda *a: None})())
    seen = {}

    @app.get("/s")
    async def stream(request: Request):
        seen["raw"] = request.scope[RAW_SEND]

        async def events():
            yield "data: 1\n\n"

        return EventStreamResponse(events())

    sent = []

    async def server_send(message):
        sent.append(message)

    async def receive():
        await asyncio.sleep(10)
        return {"type": "http.disconnect"}

    scope = {
        "type": "http",
        "method": "GET",
        "path": "/s",
        "headers": [],
        "query_string": b"",
        "root_path": "",
    }
    asyncio.run(app(scope, receive, server_send))
    assert seen["raw"] is server_send
    assert [m["type"] for m in sent] == ["http.response.start", "http.response.body", "http.response.body"]
    assert sent[1]["body"] == b"data: 1\n\n"
