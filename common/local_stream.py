"""Local streams: the protobuf messages of a bidirectional gRPC stream, length-prefixed on a Unix socket that the
event loop reads and writes itself. The two hot streams (the worker's Steps, the scheduler's Connect) use one when
both ends share a host: a gRPC message wakes an event-engine thread, grpc's poller and then the loop; a frame here
wakes only the loop (BENCHMARKS.md, issue 9). gRPC stays for everything else and across hosts.

A frame is a 4-byte little-endian payload length, a kind byte and the payload. The client's first frame is a
HELLO (common.v1.LocalStreamHello: method and credentials); the server answers with a STATUS (OK opens the
stream), then both sides send MESSAGE frames; the server's last frame is a STATUS (OK: the stream ended normally,
else its error, which the client raises as the same domain error a gRPC status gives). The client ends its side
with a half-close; a connection that ends without a STATUS fails as UNAVAILABLE.
"""

from __future__ import annotations

import asyncio
import atexit
import contextlib
import logging
import os
import stat
import struct
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass

import grpc

from common.errors import UnavailableError, from_status
from common.grpc_utils import MAX_MESSAGE_BYTES
from common.mailbox import Mailbox
from common.security import InternalAuth, process_auth
from common.socket_paths import is_stale, socket_path
from protos import common_pb2

logger = logging.getLogger(__name__)

HEADER = struct.Struct("<IB")  # payload bytes, frame kind
MESSAGE, STATUS, HELLO = 0, 1, 2
MAX_FRAME_BYTES = MAX_MESSAGE_BYTES  # what gRPC carries here carries on the socket too
HELLO_TIMEOUT_S = 10.0
_END = object()


def encode_frame(kind: int, payload: bytes) -> bytes:
    if len(payload) > MAX_FRAME_BYTES:
        raise ValueError(f"a frame of {len(payload)} bytes is over the {MAX_FRAME_BYTES}-byte limit")
    return HEADER.pack(len(payload), kind) + payload


# ---------------------------------------------------------------------- frames on a connection


class _Frames(asyncio.Protocol):
    """Cuts the byte stream into frames for `_frame(kind, payload)`; `_ended(error or None)` runs once when the
    connection is gone. Writes are non-blocking; `drain()` waits while the socket's buffer is full."""

    def __init__(self) -> None:
        self.transport: asyncio.Transport | None = None
        self.closed = False
        self._buf = bytearray()
        self._error: Exception | None = None
        self._paused = False
        self._resumed: asyncio.Future | None = None

    def connection_made(self, transport) -> None:
        self.transport = transport
        transport.set_write_buffer_limits(high=4 << 20)

    def data_received(self, data: bytes) -> None:
        if self._buf:
            self._buf += data
            data = self._buf
        view, n, off = memoryview(data), len(data), 0
        while n - off >= HEADER.size:
            size, kind = HEADER.unpack_from(data, off)
            if size > MAX_FRAME_BYTES:
                self.fail(
                    UnavailableError(f"a frame of {size} bytes is over the {MAX_FRAME_BYTES}-byte limit")
                )
                return
            end = off + HEADER.size + size
            if end > n:
                break
            self._frame(kind, view[off + HEADER.size : end])
            off = end
            if self.closed:
                return
        self._buf = bytearray(data[off:]) if off < n else bytearray()

    def send(self, kind: int, payload: bytes) -> None:
        if self.closed:
            raise UnavailableError("the local stream is closed")
        self.transport.write(encode_frame(kind, payload))

    def fail(self, error: Exception) -> None:
        """End the connection with this error (a broken frame, a refusal)."""
        if self._error is None:
            self._error = error
        if self.transport is not None:
            self.transport.close()

    def pause_writing(self) -> None:
        self._paused = True

    def resume_writing(self) -> None:
        self._paused = False
        if self._resumed is not None and not self._resumed.done():
            self._resumed.set_result(None)

    async def drain(self) -> None:
        while self._paused and not self.closed:
            self._resumed = asyncio.get_running_loop().create_future()
            await self._resumed

    def connection_lost(self, exc: Exception | None) -> None:
        self.closed = True
        self.resume_writing()
        self._ended(self._error or (UnavailableError(f"connection lost: {exc}") if exc else None))

    def _frame(self, kind: int, payload: memoryview) -> None:
        raise NotImplementedError

    def _ended(self, error: Exception | None) -> None:
        raise NotImplementedError


# ---------------------------------------------------------------------- client


class LocalStream(_Frames):
    """The client's end: `put_nowait(message)` writes (None half-closes), each message frame goes to
    `on_message(payload)` (the caller parses it), and `on_end(stream, error)` runs once with the domain error
    that ended the stream (None: the server ended it normally)."""

    def __init__(self, what: str, on_message: Callable[[memoryview], None], on_end: Callable[..., None]):
        super().__init__()
        self.what = what
        self.on_message = on_message
        self.on_end = on_end
        self._accepted: asyncio.Future = asyncio.get_running_loop().create_future()
        self._status: common_pb2.LocalStreamStatus | None = None

    def put_nowait(self, message) -> None:
        if message is None:
            if not self.closed and self.transport.can_write_eof():
                self.transport.write_eof()
            return
        self.send(MESSAGE, message.SerializeToString())

    def close(self) -> None:
        if self.transport is not None:
            self.transport.close()

    def _frame(self, kind: int, payload: memoryview) -> None:
        if kind == MESSAGE and self._accepted.done():
            try:
                self.on_message(payload)
            except Exception as e:  # noqa: BLE001 - a message the caller cannot read ends the stream, loudly
                self.fail(UnavailableError(f"{self.what}: reading a message failed: {type(e).__name__}: {e}"))
        elif kind == STATUS:
            status = common_pb2.LocalStreamStatus.FromString(payload)
            if not self._accepted.done():
                self._accepted.set_result(status)
            else:
                self._status = status
                self.transport.close()
        else:
            self.fail(UnavailableError(f"{self.what}: unexpected frame of kind {kind}"))

    def _ended(self, error: Exception | None) -> None:
        if self._status is not None:
            error = _status_error(self._status, self.what)
        elif error is None:
            error = UnavailableError(f"{self.what}: the connection ended without a status")
        if not self._accepted.done():
            self._accepted.set_exception(error)
            self._accepted.exception()  # retrieved: open_stream raises it, if it still waits
            return
        self.on_end(self, error)


def _status_error(status: common_pb2.LocalStreamStatus, what: str) -> Exception | None:
    if status.code == "OK":
        return None
    code = getattr(grpc.StatusCode, status.code, grpc.StatusCode.UNKNOWN)
    return from_status(code, status.message, what)


async def open_stream(
    path: str,
    method: str,
    on_message: Callable[[memoryview], None],
    on_end: Callable[[LocalStream, Exception | None], None],
    *,
    what: str = "",
    auth: InternalAuth | None = None,
    timeout_s: float = HELLO_TIMEOUT_S,
) -> LocalStream:
    """Connect to a local stream server and open `method` with this process's credentials. Raises OSError when
    nothing listens at `path`, a domain error when the server refuses, TimeoutError when it does not answer."""
    auth = auth or process_auth()
    what = what or path
    loop = asyncio.get_running_loop()
    transport, stream = await asyncio.wait_for(
        loop.create_unix_connection(lambda: LocalStream(what, on_message, on_end), path), timeout_s
    )
    hello = common_pb2.LocalStreamHello(method=method, token=auth.token, role=auth.role)
    stream.send(HELLO, hello.SerializeToString())
    try:
        status = await asyncio.wait_for(asyncio.shield(stream._accepted), timeout_s)
    except BaseException:
        transport.close()
        raise
    error = _status_error(status, what)
    if error is not None:
        transport.close()
        raise error
    return stream


# ---------------------------------------------------------------------- server


class LocalAbort(Exception):
    """Raised by `LocalContext.abort`: the stream ends with this status (what grpc.aio's abort does)."""

    def __init__(self, code: grpc.StatusCode, details: str):
        super().__init__(details)
        self.code = code
        self.details = details


class LocalContext:
    """The part of grpc.aio.ServicerContext the stream servicers use, so one servicer method serves both."""

    async def abort(self, code: grpc.StatusCode, details: str = "") -> None:
        raise LocalAbort(code, details)


@dataclass(frozen=True)
class LocalMethod:
    """A bidirectional stream method: `handler(request_iterator, context)` is the servicer's async generator."""

    request_type: type
    handler: Callable[[AsyncIterator, LocalContext], AsyncIterator]


class _ServerStream(_Frames):
    def __init__(self, server: LocalStreamServer):
        super().__init__()
        self.server = server
        self._method: LocalMethod | None = None
        self._requests = Mailbox()
        self._task: asyncio.Task | None = None
        self._hello_timer: asyncio.TimerHandle | None = None

    def connection_made(self, transport) -> None:
        super().connection_made(transport)
        self._hello_timer = asyncio.get_running_loop().call_later(
            HELLO_TIMEOUT_S, self.fail, UnavailableError("no hello")
        )

    def _frame(self, kind: int, payload: memoryview) -> None:
        if self._method is not None and kind == MESSAGE:
            try:
                self._requests.put_nowait(self._method.request_type.FromString(payload))
            except Exception as e:  # noqa: BLE001 - a message we cannot read ends the stream
                self._finish(grpc.StatusCode.INVALID_ARGUMENT, f"unreadable message: {e}")
        elif self._method is None and kind == HELLO:
            self._hello_timer.cancel()
            try:
                hello = common_pb2.LocalStreamHello.FromString(payload)
            except Exception:  # noqa: BLE001 - not a hello of ours
                self._finish(grpc.StatusCode.INVALID_ARGUMENT, "unreadable hello")
                return
            self._open(hello)
        else:
            self._finish(grpc.StatusCode.INVALID_ARGUMENT, f"unexpected frame of kind {kind}")

    def _open(self, hello: common_pb2.LocalStreamHello) -> None:
        method = self.server.methods.get(hello.method)
        refusal = (
            (grpc.StatusCode.UNIMPLEMENTED, f"no local stream {hello.method!r} here")
            if method is None
            else self.server.auth.local_refusal(self.server.service_name, hello.token, hello.role)
        )
        if refusal is not None:
            logger.warning("refused a local stream of %s: %s", hello.method, refusal[1])
            self._finish(*refusal)
            return
        self.send(STATUS, common_pb2.LocalStreamStatus(code="OK").SerializeToString())
        self._method = method
        self._task = asyncio.create_task(self._serve(method))
        self.server.streams.add(self)

    async def _serve(self, method: LocalMethod) -> None:
        code, details = grpc.StatusCode.OK, ""
        responses = method.handler(self._read(), LocalContext())
        try:
            async for resp in responses:
                self.send(MESSAGE, resp.SerializeToString())
                if self._paused:
                    await self.drain()
        except LocalAbort as e:
            code, details = e.code, e.details
        except UnavailableError as e:  # written into a connection that is gone
            code, details = e.grpc_code, e.message
        except Exception as e:  # noqa: BLE001 - the call fails, the server lives on
            logger.exception("local stream %s failed", self.server.service_name)
            code, details = grpc.StatusCode.INTERNAL, f"{type(e).__name__}: {e}"
        finally:
            await responses.aclose()  # its cleanup (a lock, a reader task) runs now, also when cancelled
        self._finish(code, details)

    async def _read(self) -> AsyncIterator:
        requests = self._requests
        while True:
            for item in await requests.take_all():
                if item is _END:
                    return
                yield item

    def _finish(self, code: grpc.StatusCode, details: str) -> None:
        if not self.closed:
            status = common_pb2.LocalStreamStatus(code=code.name, message=details)
            self.send(STATUS, status.SerializeToString())
            self.transport.close()

    def eof_received(self) -> bool:
        if self._method is None:
            return False  # gone before opening a stream: close
        self._requests.put_nowait(_END)  # the client half-closed: the request iterator ends; answers go on
        return True

    def _ended(self, error: Exception | None) -> None:
        if self._hello_timer is not None:
            self._hello_timer.cancel()
        self.server.streams.discard(self)
        if self._task is not None and not self._task.done():
            self._task.cancel()  # the client is gone: cancel the call, as gRPC does


class LocalStreamServer:
    """Serves the stream methods of one service on a Unix socket (`path`, created 0600 inside a private directory),
    checking each hello with `auth` (this process's credentials by default)."""

    def __init__(
        self, path: str, service_name: str, methods: dict[str, LocalMethod], auth: InternalAuth | None = None
    ):
        self.path = path
        self.service_name = service_name
        self.methods = methods
        self.auth = auth or process_auth()
        self.streams: set[_ServerStream] = set()
        self._server: asyncio.AbstractServer | None = None

    async def start(self) -> None:
        with contextlib.suppress(FileNotFoundError):
            if stat.S_ISSOCK(os.lstat(self.path).st_mode):
                if not is_stale(self.path):
                    raise OSError(f"another process listens on {self.path}")
                os.unlink(self.path)  # a socket left by a process that was killed
        loop = asyncio.get_running_loop()
        self._server = await loop.create_unix_server(lambda: _ServerStream(self), self.path)
        os.chmod(self.path, 0o600)  # inside a 0700 directory already: this user only
        atexit.register(_unlink, self.path)
        logger.info("local streams of %s on %s", self.service_name, self.path)

    async def close(self) -> None:
        if self._server is not None:
            self._server.close()
            for s in list(self.streams):
                s.transport.close()
            self._server = None
        _unlink(self.path)


def _unlink(path: str) -> None:
    with contextlib.suppress(OSError):
        os.unlink(path)


async def serve_locally(
    flag: str, name: str, port: int, service_name: str, methods: dict[str, LocalMethod]
) -> LocalStreamServer | None:
    """Start serving `methods` on the socket that `flag` names (`socket_path`); None when it is "none" or no
    private directory could be had."""
    path = socket_path(flag, name, port)
    if path is None:
        return None
    server = LocalStreamServer(path, service_name, methods)
    await server.start()
    return server
