"""The CPU floor under the scheduler's step on this machine: what one event-loop wake-up and one gRPC round trip on
a bidirectional stream cost a process when the gap between them is a device step, with no scheduling work at all.
The scheduler pays one worker round trip and one Connect write per step, so its CPU per step cannot go below
these figures whatever its Python does.

    python -m benchmarks.bench_grpc_floor [--gap-ms 8] [--iterations 300] [--payload 256]

Prints, per iteration (CPU time of this process from the kernel, all threads, and its main thread alone):
  idle wake       an `asyncio.sleep(gap)` on uvloop (the loop wakes once)
  round trip      a StepRequest written and its StepResult read on a Worker.Steps stream to an echo server in
                  another process, then the gap
  back to back    the same round trips without the gap (caches and threads stay warm)
  socket          the same bytes (the serialized StepRequest and StepResult) over a plain asyncio TCP stream, length
                  prefixed, then the gap: what a transport costs that wakes only the event-loop thread
  local stream    the same messages on the echo servicer's Steps served as a local stream (common/local_stream.py,
                  the Unix socket the worker and the scheduler serve beside gRPC), then the gap
"""

from __future__ import annotations

import argparse
import asyncio
import os
import subprocess
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
STEPS = "/mirador.worker.v1.Worker/Steps"


def _thread_cpu_s() -> float:
    return time.clock_gettime(time.CLOCK_THREAD_CPUTIME_ID)


async def _echo_server(port_file: Path) -> None:
    import grpc

    from protos import worker_pb2, worker_pb2_grpc

    class Echo(worker_pb2_grpc.WorkerServicer):
        async def Steps(self, request_iterator, context):
            async for req in request_iterator:
                res = worker_pb2.StepResult(step_id=req.step_id)
                res.sampled_token_ids.extend(req.decode_start_pos)
                yield res

    async def echo_bytes(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        while header := await reader.readexactly(4):
            req = worker_pb2.StepRequest.FromString(
                await reader.readexactly(int.from_bytes(header, "little"))
            )
            res = worker_pb2.StepResult(step_id=req.step_id)
            res.sampled_token_ids.extend(req.decode_start_pos)
            body = res.SerializeToString()
            writer.write(len(body).to_bytes(4, "little") + body)

    from common.local_stream import LocalMethod, serve_locally

    server = grpc.aio.server()
    echo = Echo()
    worker_pb2_grpc.add_WorkerServicer_to_server(echo, server)
    port = server.add_insecure_port("127.0.0.1:0")
    await server.start()
    sockets = await asyncio.start_server(echo_bytes, "127.0.0.1", 0)
    methods = {STEPS: LocalMethod(worker_pb2.StepRequest, echo.Steps)}
    local = await serve_locally("auto", "floor", port, "mirador.worker.v1.Worker", methods)
    port_file.write_text(f"{port} {sockets.sockets[0].getsockname()[1]} {local.path}")
    try:
        await server.wait_for_termination()
    finally:
        await local.close()


async def _measure(
    port: int, socket_port: int, local_path: str, args: argparse.Namespace
) -> dict[str, tuple[float, float]]:
    import grpc

    from protos import worker_pb2, worker_pb2_grpc

    gap = args.gap_ms / 1000
    ids = [f"{i:032x}#0" for i in range(args.payload)]
    positions = list(range(1000, 1000 + args.payload))
    async with grpc.aio.insecure_channel(f"127.0.0.1:{port}") as channel:
        call = worker_pb2_grpc.WorkerStub(channel).Steps()

        async def round_trip(i: int) -> None:
            req = worker_pb2.StepRequest(step_id=i)
            req.decode_seq_ids.extend(ids)
            req.decode_start_pos.extend(positions)
            await call.write(req)
            await call.read()

        async def timed(one) -> tuple[float, float]:
            for i in range(20):  # warm-up
                await one(i)
            cpu, thread = time.process_time(), _thread_cpu_s()
            for i in range(args.iterations):
                await one(i)
            n = args.iterations
            return (time.process_time() - cpu) / n * 1e6, (_thread_cpu_s() - thread) / n * 1e6

        async def idle(i: int) -> None:
            await asyncio.sleep(gap)

        async def gapped(i: int) -> None:
            await round_trip(i)
            await asyncio.sleep(gap)

        out = {
            "idle wake": await timed(idle),
            "round trip": await timed(gapped),
            "back to back": await timed(round_trip),
        }
        await call.done_writing()
    reader, writer = await asyncio.open_connection("127.0.0.1", socket_port)

    async def socket_round_trip(i: int) -> None:
        req = worker_pb2.StepRequest(step_id=i)
        req.decode_seq_ids.extend(ids)
        req.decode_start_pos.extend(positions)
        body = req.SerializeToString()
        writer.write(len(body).to_bytes(4, "little") + body)
        header = await reader.readexactly(4)
        worker_pb2.StepResult.FromString(await reader.readexactly(int.from_bytes(header, "little")))
        await asyncio.sleep(gap)

    out["socket"] = await timed(socket_round_trip)
    writer.close()

    from common.local_stream import open_stream

    results: list[asyncio.Future] = []
    stream = await open_stream(
        local_path,
        STEPS,
        lambda payload: results.pop(0).set_result(worker_pb2.StepResult.FromString(payload)),
        lambda s, error: None,
    )

    async def local_round_trip(i: int) -> None:
        req = worker_pb2.StepRequest(step_id=i)
        req.decode_seq_ids.extend(ids)
        req.decode_start_pos.extend(positions)
        fut = asyncio.get_running_loop().create_future()
        results.append(fut)
        stream.put_nowait(req)
        await fut
        await asyncio.sleep(gap)

    out["local stream"] = await timed(local_round_trip)
    stream.close()
    return out


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--gap-ms", type=float, default=8.0, help="idle time between round trips (a device step)")
    ap.add_argument("--iterations", type=int, default=300)
    ap.add_argument("--payload", type=int, default=256, help="decode ids and positions a StepRequest carries")
    ap.add_argument("--serve", type=Path, default=None, help=argparse.SUPPRESS)  # the echo server's port file
    args = ap.parse_args(argv)
    import uvloop

    if args.serve is not None:
        uvloop.run(_echo_server(args.serve))
        return
    port_file = Path(f"/tmp/bench-grpc-floor-{os.getpid()}.port")
    server = subprocess.Popen(
        [sys.executable, "-m", "benchmarks.bench_grpc_floor", "--serve", str(port_file)], cwd=REPO
    )
    try:
        deadline = time.monotonic() + 30
        while not port_file.exists() or not port_file.read_text():
            if server.poll() is not None or time.monotonic() > deadline:
                raise RuntimeError("the echo server did not start")
            time.sleep(0.05)
        grpc_port, socket_port, local_path = port_file.read_text().split()
        results = uvloop.run(_measure(int(grpc_port), int(socket_port), local_path, args))
    finally:
        server.terminate()
        server.wait(timeout=10)
        port_file.unlink(missing_ok=True)
    print(
        f"== gRPC floor: {args.gap_ms:g} ms gaps, {args.payload} decodes a message, {os.cpu_count()} CPUs =="
    )
    print(f"{'':<14}{'process CPU us':>16}{'main thread us':>16}")
    for name, (cpu, thread) in results.items():
        print(f"{name:<14}{cpu:>16.0f}{thread:>16.0f}")


if __name__ == "__main__":
    main()
