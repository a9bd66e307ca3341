"""Local streams (common/local_stream.py): framed protos on a Unix socket for the worker's Steps and the scheduler's
Connect when both ends share a host. Framing, end and error semantics, the hello's credentials, the socket's
private directory, each client's fallback to gRPC, and a worker killed mid-step failing the steps in flight."""

from __future__ import annotations

import asyncio
import os
import signal
import stat
import subprocess
import sys
import time
from pathlib import Path

import grpc
import pytest

from common.errors import InvalidRequestError, MiradorError, UnavailableError
from common.local_stream import (
    HEADER,
    MAX_FRAME_BYTES,
    LocalMethod,
    LocalStreamServer,
    _Frames,
    encode_frame,
    open_stream,
)
from common.security import InternalAuth
from common.socket_paths import socket_path
from common.types import SamplingParams, SeqInit, SeqStep, StepPlan
from protos import common_pb2
from tests.helpers import REPO, SERVED, Cluster, free_port
from worker_svc.client import WorkerClient

Status = common_pb2.LocalStreamStatus  # any small message serves as the payload of these tests
ECHO = "/test.Echo/Stream"


@pytest.fixture
def sock_dir(tmp_path) -> Path:
    d = tmp_path / "s"
    d.mkdir(mode=0o700)
    return d


@pytest.fixture
def short_tmp():
    """A short directory: a Unix socket's path holds at most 108 bytes, pytest's tmp_path can be longer."""
    import shutil
    import tempfile

    d = Path(tempfile.mkdtemp(prefix="ls-", dir="/tmp"))
    yield d
    shutil.rmtree(d, ignore_errors=True)


async def _echo(requests, context):
    """Echoes each message; "abort" ends the call with INVALID_ARGUMENT, "boom" with an exception."""
    async for msg in requests:
        if msg.code == "abort":
            await context.abort(grpc.StatusCode.INVALID_ARGUMENT, "asked to abort")
        if msg.code == "boom":
            raise RuntimeError("boom")
        yield msg


async def _client(path: str, auth: InternalAuth | None = None, method: str = ECHO):
    got: list = []
    ended: asyncio.Future = asyncio.get_running_loop().create_future()
    stream = await open_stream(
        path,
        method,
        lambda payload: got.append(Status.FromString(payload)),
        lambda s, error: ended.set_result(error),
        auth=auth or InternalAuth(),
    )
    return stream, got, ended


def test_frames_are_cut_from_any_split_of_the_bytes():
    seen = []

    class Collect(_Frames):
        def _frame(self, kind, payload):
            seen.append((kind, bytes(payload)))

    payloads = [b"", b"x", os.urandom(70_000), b"tail"]
    wire = b"".join(encode_frame(i % 3, p) for i, p in enumerate(payloads))
    for step in (1, 7, 4096, len(wire)):
        seen.clear()
        f = Collect()
        for i in range(0, len(wire), step):
            f.data_received(wire[i : i + step])
        assert seen == [(i % 3, p) for i, p in enumerate(payloads)], step
        assert not f._buf
    assert HEADER.unpack(encode_frame(1, b"abc")[:5]) == (3, 1)


def test_a_frame_over_the_limit_fails_the_connection():
    class Transport:
        closed = False

        def close(self):
            self.closed = True

    f = _Frames()
    f.transport = Transport()
    f.data_received(HEADER.pack(MAX_FRAME_BYTES + 1, 0) + b"x")
    assert f.transport.closed and isinstance(f._error, UnavailableError)


def test_round_trip_half_close_abort_and_errors(sock_dir):
    async def main():
        path = str(sock_dir / "echo.sock")
        server = LocalStreamServer(path, "test.Echo", {ECHO: LocalMethod(Status, _echo)}, InternalAuth())
        await server.start()
        assert stat.S_IMODE(os.stat(path).st_mode) == 0o600
        with pytest.raises(OSError, match="another process listens"):  # a live socket is never taken over
            await LocalStreamServer(path, "test.Echo", {}, InternalAuth()).start()
        try:
            stream, got, ended = await _client(path)
            big = "y" * 300_000  # many reads on the way
            for code in ("a", big, "c"):
                stream.put_nowait(Status(code=code))
            stream.put_nowait(None)  # half-close: the server's iterator ends, then it ends the stream with OK
            assert await asyncio.wait_for(ended, 10) is None
            assert [m.code for m in got] == ["a", big, "c"]

            stream, got, ended = await _client(path)
            stream.put_nowait(Status(code="abort"))
            error = await asyncio.wait_for(ended, 10)
            assert isinstance(error, InvalidRequestError) and "asked to abort" in error.message

            stream, got, ended = await _client(path)
            stream.put_nowait(Status(code="boom"))
            error = await asyncio.wait_for(ended, 10)
            assert type(error) is MiradorError and "RuntimeError: boom" in error.message

            with pytest.raises(MiradorError, match="no local stream"):
                await _client(path, method="/test.Echo/Missing")
            with pytest.raises(OSError):
                await _client(str(sock_dir / "absent.sock"))
        finally:
            await server.close()
        assert not os.path.exists(path)

    asyncio.run(main())


def test_a_client_that_goes_away_cancels_the_call(sock_dir):
    async def main():
        state = {"entered": asyncio.Event(), "cleaned": asyncio.Event()}

        async def forever(requests, context):
            state["entered"].set()
            try:
                async for msg in requests:
                    yield msg
            finally:
                state["cleaned"].set()

        path = str(sock_dir / "f.sock")
        server = LocalStreamServer(path, "test.Echo", {ECHO: LocalMethod(Status, forever)}, InternalAuth())
        await server.start()
        stream, _, _ = await _client(path)
        await asyncio.wait_for(state["entered"].wait(), 5)
        stream.close()
        await asyncio.wait_for(state["cleaned"].wait(), 5)
        assert not server.streams
        await server.close()

    asyncio.run(main())


def test_the_hello_carries_the_token_and_role(sock_dir):
    token = "t" * 32

    async def main():
        path = str(sock_dir / "auth.sock")
        server_auth = InternalAuth(role="worker", token=token, ca=b"ca")  # token and mutual TLS configured
        server = LocalStreamServer(
            path, "mirador.worker.v1.Worker", {ECHO: LocalMethod(Status, _echo)}, server_auth
        )
        await server.start()
        try:
            for auth, code in [
                (InternalAuth(role="scheduler"), "missing or wrong internal token"),
                (InternalAuth(role="scheduler", token="u" * 32), "missing or wrong internal token"),
                (InternalAuth(role="gateway", token=token), "may not open mirador.worker.v1.Worker"),
            ]:
                with pytest.raises(MiradorError, match=code):
                    await _client(path, auth)
            stream, got, ended = await _client(path, InternalAuth(role="scheduler", token=token))
            stream.put_nowait(Status(code="ok"))
            stream.put_nowait(None)
            assert await asyncio.wait_for(ended, 10) is None and got[0].code == "ok"
        finally:
            await server.close()

    asyncio.run(main())


def test_socket_paths_live_in_a_private_directory(short_tmp, monkeypatch):
    tmp_path = short_tmp
    runtime = tmp_path / "run"
    runtime.mkdir(mode=0o700)
    monkeypatch.setenv("XDG_RUNTIME_DIR", str(runtime))
    assert socket_path("none", "worker", 5) is None
    a, b = socket_path("auto", "worker", 5), socket_path("auto", "worker", 5)
    assert a != b and Path(a).parent == runtime / "mirador" and Path(a).name.startswith("worker-5-")
    assert stat.S_IMODE(os.stat(runtime / "mirador").st_mode) == 0o700
    (runtime / "mirador").chmod(0o755)  # anyone may enter: no socket there (gRPC only)
    assert socket_path("auto", "worker", 5) is None
    open_dir = tmp_path / "open"
    open_dir.mkdir(mode=0o755)
    with pytest.raises(ValueError, match="0700"):
        socket_path(str(open_dir / "w.sock"), "worker", 5)
    assert socket_path(str(runtime / "w.sock"), "worker", 5) == str(runtime / "w.sock")


def test_a_stale_socket_of_a_killed_process_is_removed(short_tmp, monkeypatch):
    tmp_path = short_tmp
    import socket

    runtime = tmp_path / "run"
    runtime.mkdir(mode=0o700)
    monkeypatch.setenv("XDG_RUNTIME_DIR", str(runtime))
    d = runtime / "mirador"
    d.mkdir(mode=0o700)
    stale = d / "worker-7-0.sock"
    with socket.socket(socket.AF_UNIX) as s:
        s.bind(str(stale))  # bound, never listening: what a killed process leaves
    other = d / "worker-8-0.sock"
    with socket.socket(socket.AF_UNIX) as s:
        s.bind(str(other))
    socket_path("auto", "worker", 7)
    assert not stale.exists() and other.exists()


# ---------------------------------------------------------------------- the worker's step stream


def _plan(step_id: int, seq: str, prompt: tuple[int, ...] = ()) -> StepPlan:
    if prompt:
        init = SeqInit((), SamplingParams(temperature=0.0), len(prompt))
        return StepPlan(step_id, (SeqStep(seq, 0, prompt, True, 0, (1, 2), init),))
    return StepPlan(step_id, (SeqStep(seq, 20, ()),))


@pytest.mark.parametrize("flag, transport", [("auto", "unix"), ("none", "grpc"), ("gone", "grpc")])
def test_the_step_stream_takes_the_socket_or_falls_back_to_grpc(default_model, flag, transport):
    """The same answers either way; a socket advertised but absent here (another host or container) is skipped."""
    from benchmarks.sim_worker import SimWorkerArgs, create_server

    async def main():
        args = SimWorkerArgs(
            model_path=str(default_model),
            port=0,
            step_ms=1.0,
            step_socket="none" if flag == "none" else "auto",
        )
        server, port, servicer = create_server(args)
        await server.start()
        await servicer.startup()
        try:
            if flag == "gone":
                os.unlink(servicer.local.path)
            client = WorkerClient(f"127.0.0.1:{port}")
            info = await client.info()
            assert bool(info.step_socket) == (flag != "none")
            assert client.needs_handshake
            await client.connect(info)
            assert client.transport == transport and client.needs_handshake == (transport == "grpc")
            prompt = tuple(range(1000, 1020))
            outs = [await client.submit(_plan(1, "a", prompt)), await client.submit(_plan(2, "a"))]
            assert client.transport == transport
            assert all(len(o.sampled()) == 1 for o in outs)
            await client.close()
        finally:
            await servicer.shutdown()
            await server.stop(0)

    asyncio.run(main())


def test_a_second_scheduler_is_refused_on_the_socket_too(default_model):
    from benchmarks.sim_worker import SimWorkerArgs, create_server

    async def main():
        server, port, servicer = create_server(
            SimWorkerArgs(model_path=str(default_model), port=0, step_ms=1.0)
        )
        await server.start()
        await servicer.startup()
        try:
            first, second = WorkerClient(f"127.0.0.1:{port}"), WorkerClient(f"127.0.0.1:{port}")
            await first.connect(await first.info())
            assert first.transport == "unix"
            await first.submit(_plan(1, "a", tuple(range(1000, 1020))))
            await second.connect(await second.info())
            with pytest.raises(MiradorError, match="another scheduler already drives this worker"):
                await asyncio.wait_for(second.submit(_plan(1, "b", (5, 6))), 10)
            assert second.needs_handshake  # the refused stream is gone; the next step opens a new one
            out = await first.submit(_plan(2, "a"))  # the first scheduler's stream lives on
            assert len(out.sampled()) == 1
            await first.close()
            await second.close()
        finally:
            await servicer.shutdown()
            await server.stop(0)

    asyncio.run(main())


def test_a_worker_killed_mid_step_fails_the_steps_in_flight_at_once(default_model):
    """SIGKILL during a 20 s step: the kernel closes the socket, and every step written fails within a second
    with UNAVAILABLE (nothing waits for a timeout)."""
    port = free_port()
    proc = subprocess.Popen(
        [
            sys.executable,
            "-m",
            "benchmarks.sim_worker",
            "--model-path",
            str(default_model),
            "--port",
            str(port),
        ]
        + ["--step-ms", "20000"],
        cwd=REPO,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    try:

        async def main():
            from common.grpc_utils import wait_serving

            await wait_serving(f"127.0.0.1:{port}", 120)
            client = WorkerClient(f"127.0.0.1:{port}")
            await client.connect(await client.info())
            assert client.transport == "unix"
            futs = [client.submit(_plan(1, "a", tuple(range(1000, 1020)))), client.submit(_plan(2, "a"))]
            await asyncio.sleep(0.5)
            assert not any(f.done() for f in futs)
            os.kill(proc.pid, signal.SIGKILL)
            t0 = time.monotonic()
            for f in futs:
                with pytest.raises(UnavailableError, match="worker at"):
                    await asyncio.wait_for(f, 5)
            assert time.monotonic() - t0 < 1.0
            assert client.needs_handshake
            await client.close()

        asyncio.run(main())
    finally:
        proc.kill()
        proc.wait()


# ---------------------------------------------------------------------- whole clusters


def _chat(c: Cluster) -> str:
    r = c.http.post(
        "/v1/chat/completions",
        json={
            "model": SERVED,
            "messages": [{"role": "user", "content": "hi"}],
            "max_tokens": 6,
            "temperature": 0,
        },
    )
    assert r.status_code == 200, r.text
    return r.json()["choices"][0]["message"]["content"]


@pytest.fixture(scope="module")
def grpc_only(default_model, log_dir):
    c = Cluster(
        default_model,
        "--page-size",
        "8",
        "--step-socket",
        "none",
        "--connect-socket",
        "none",
        log_dir=log_dir,
        name="grpc-only",
    )
    yield c
    c.stop()


@pytest.fixture(scope="module")
def local(default_model, log_dir):
    c = Cluster(default_model, "--page-size", "8", log_dir=log_dir, name="local-streams")
    yield c
    c.stop()


def test_a_cluster_on_one_host_takes_the_sockets_and_answers_as_over_grpc(local, grpc_only):
    assert _chat(local) == _chat(grpc_only)
    info = local.http.get("/server_info").json()
    assert (info["step_transport"], info["connect_transport"]) == ("unix", "unix")
    assert info["worker_info"]["step_socket"] and info["connect_socket"]
    off = grpc_only.http.get("/server_info").json()
    assert (off["step_transport"], off["connect_transport"]) == ("grpc", "grpc")
    assert off["worker_info"]["step_socket"] == "" and off["connect_socket"] == ""


# ---------------------------------------------------------------------- the gateway's request stream


def test_the_gateway_s_requests_fail_at_once_when_the_scheduler_s_socket_dies(sock_dir):
    """The gateway's client on a local Connect stream: outputs reach each request; when the scheduler's end goes
    away mid-request (what its death looks like here) every live request fails with UNAVAILABLE at once, and the
    next request opens a new stream."""
    from common.types import GenerateRequest, StoppingCriteria
    from protos import scheduler_pb2
    from scheduler_svc.client import CONNECT_METHOD, SchedulerClient

    async def connect(requests, context):  # answers each request with one delta, then keeps the stream open
        async for msg in requests:
            batch = scheduler_pb2.OutputBatch()
            batch.delta_request_ids.append(msg.generate.request_id)
            batch.delta_indexes.append(0)
            batch.delta_texts.append("hi")
            batch.delta_num_tokens.append(1)
            batch.delta_token_ids.append(7)
            yield batch

    async def main():
        path = str(sock_dir / "sched.sock")
        methods = {CONNECT_METHOD: LocalMethod(scheduler_pb2.ConnectRequest, connect)}
        server = LocalStreamServer(path, "mirador.scheduler.v1.Scheduler", methods, InternalAuth())
        await server.start()
        client = SchedulerClient(f"127.0.0.1:{free_port()}")  # nothing there: only GetServerInfo would use it

        async def info():
            return scheduler_pb2.ServerInfo(connect_socket=path)

        client.server_info = info
        req = GenerateRequest("r1", (1, 2, 3), stopping=StoppingCriteria(max_new_tokens=8))
        gen = client.generate(req)
        first = await asyncio.wait_for(gen.__anext__(), 10)
        assert (first.text, first.token_ids, client.transport) == ("hi", [7], "unix")
        await server.close()  # the scheduler's end is gone
        t0 = time.monotonic()
        with pytest.raises(UnavailableError, match="scheduler at"):
            await asyncio.wait_for(gen.__anext__(), 10)
        assert time.monotonic() - t0 < 1.0
        assert client._outbox is None  # the next request opens a new stream
        await client.close()

    asyncio.run(main())
