"""The mirador backend: concurrent OpenAI streaming requests against a running gateway, timed per chunk.

TTFT is the time from sending a request to its first chunk with text. ITL is the gap between consecutive
chunks with text: when a chunk says how many tokens it carries (servers that honour
stream_options.continuous_usage_stats), the gap is split evenly over them; otherwise (Mirador's gateway) it is
recorded once, so a chunk that carries several tokens (a detokenizer holding back an incomplete character)
gives one longer gap. Token counts come from the usage of the last chunk (stream_options.include_usage).
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import json
import math
import multiprocessing as mp
import os
import re
import time
from collections.abc import AsyncIterator
from typing import Any

import aiohttp
import numpy as np

from common import event_loop
from mirador.bench.args import BenchArgs
from mirador.bench.progress import Progress
from mirador.bench.report import RequestResult
from mirador.bench.workload import BenchRequest

JSON_HEADERS = {"content-type": "application/json"}


class RequestFailed(Exception):
    pass


async def run_server(
    args: BenchArgs, model: str, requests: list[BenchRequest], warmup: list[BenchRequest]
) -> tuple[list[RequestResult], float, dict[str, Any] | None]:
    """Runs the warm-up, then the timed requests; returns their results, the timed run's duration and the
    server's counters just before it (None when /server_info has none)."""
    async with connect(args) as http:
        stats_before = await _warm_up(http, args, model, warmup)
        progress = Progress(len(requests), "requests", disabled=args.disable_progress)
        t0 = time.perf_counter()
        results = await _run_all(http, args, model, _extra(args), requests, args.request_rate, progress, t0)
        duration = time.perf_counter() - t0
        progress.close()
    return results, duration, stats_before


def run_server_processes(
    args: BenchArgs, model: str, requests: list[BenchRequest], warmup: list[BenchRequest]
) -> tuple[list[RequestResult], float, dict[str, Any] | None]:
    """run_server with the timed requests spread over `args.client_processes` processes (request i goes to
    process i mod N, each with its share of the concurrency and the request rate), so that the client's own
    CPU does not cap the figures. They start together on the system-wide monotonic clock (time.perf_counter),
    so every result's times stay relative to one t0; the warm-up runs here first."""
    n = args.client_processes
    if n == 1:
        return _run(run_server(args, model, requests, warmup))
    stats_before = _run(_warm_up_only(args, model, warmup))
    c = args.max_concurrency
    ctx = mp.get_context("fork" if "fork" in mp.get_all_start_methods() else "spawn")
    done = ctx.Value("i", 0)
    # the common start, once every process is up (a spawned one first unpickles its share of the requests)
    t0 = time.perf_counter() + (0.5 if ctx.get_start_method() == "fork" else 5.0)
    procs, conns = [], []
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")  # the children never tokenize
    for i in range(n):
        share = dataclasses.replace(
            args,
            max_concurrency=None if c is None else c // n + (1 if i < c % n else 0),
            request_rate=args.request_rate / n,
            num_client_processes=1,
        )
        recv, send_end = ctx.Pipe(duplex=False)
        proc = ctx.Process(
            target=_client_process, args=(share, model, requests[i::n], i, t0, done, send_end), daemon=True
        )
        proc.start()
        send_end.close()
        procs.append(proc)
        conns.append(recv)
    progress = Progress(len(requests), "requests", disabled=args.disable_progress)
    outcomes: dict[int, tuple[list[RequestResult], float] | str] = {}
    while len(outcomes) < n:
        for i, (proc, conn) in enumerate(zip(procs, conns, strict=True)):
            if i in outcomes:
                continue
            if conn.poll():
                try:
                    outcomes[i] = conn.recv()
                    continue
                except EOFError:
                    proc.join(5)  # its end of the pipe closed: it is exiting
            elif proc.is_alive():
                continue
            outcomes[i] = f"client process {i} exited with code {proc.exitcode} before its results"
        progress.update(done.value - progress.done)
        time.sleep(0.1)
    progress.update(done.value - progress.done)
    progress.close()
    for proc in procs:
        proc.join()
    failed = [o for o in outcomes.values() if isinstance(o, str)]
    if failed:
        raise RuntimeError("; ".join(failed))
    results = sorted((r for o in outcomes.values() for r in o[0]), key=lambda r: r.index)
    end = max(o[1] for o in outcomes.values())
    return results, end - t0, stats_before


def _client_process(
    args: BenchArgs, model: str, requests: list[BenchRequest], stream: int, t0: float, done, conn
) -> None:
    """One client process: waits for the common start t0, runs its share, sends (results, end time) back."""
    conn.send(_run(_timed_share(args, model, requests, stream, t0, done)))
    conn.close()


async def _timed_share(
    args: BenchArgs, model: str, requests: list[BenchRequest], stream: int, t0: float, done
) -> tuple[list[RequestResult], float]:
    async with connect(args) as http:
        await asyncio.sleep(max(0.0, t0 - time.perf_counter()))
        results = await _run_all(
            http, args, model, _extra(args), requests, args.request_rate, _Counter(done), t0, stream
        )
    return results, time.perf_counter()


class _Counter:
    """Stands in for the progress bar in a client process: counts finished requests in shared memory."""

    def __init__(self, value):
        self.value = value

    def update(self, n: int = 1) -> None:
        with self.value.get_lock():
            self.value.value += n


def _run(main):
    """asyncio.run on uvloop where it is installed: the client reads tens of thousands of events a second."""
    with asyncio.Runner(loop_factory=event_loop.loop_factory("auto")) as runner:
        return runner.run(main)


@dataclasses.dataclass
class Http:
    """The client's connection pool and the server's address. aiohttp rather than httpx: reading 128 streams of
    8 ms steps on this repository's 2-core VM, httpx took ~100 us of CPU per event and aiohttp ~50 (a raw asyncio
    protocol ~32): the client shares the machine with the server it measures (BENCHMARKS.md, issue 9)."""

    session: aiohttp.ClientSession
    base_url: str

    def url(self, path: str) -> str:
        return self.base_url.rstrip("/") + path


@contextlib.asynccontextmanager
async def connect(args: BenchArgs) -> AsyncIterator[Http]:
    connector = aiohttp.TCPConnector(limit=args.max_concurrency or 0)
    # one deadline a request (a per-read timeout re-arms a timer for every chunk: ~10% of the client's CPU)
    timeout = aiohttp.ClientTimeout(total=args.timeout_s, sock_connect=min(args.timeout_s, 60.0))
    async with aiohttp.ClientSession(connector=connector, timeout=timeout, trust_env=False) as session:
        yield Http(session, args.base_url)


def _extra(args: BenchArgs) -> dict[str, Any]:
    return json.loads(args.extra_request_body) if args.extra_request_body else {}


async def _warm_up(
    http: Http, args: BenchArgs, model: str, warmup: list[BenchRequest]
) -> dict[str, Any] | None:
    """Runs the warm-up requests (left out of the figures); returns the server's counters after them."""
    if warmup:
        warm = await _run_all(http, args, model, _extra(args), warmup, math.inf, None)
        failed = [r for r in warm if not r.success]
        if len(failed) == len(warm):
            print(f"warning: every warm-up request failed, e.g. {failed[0].error}", flush=True)
    return await _server_stats(http)


async def _warm_up_only(args: BenchArgs, model: str, warmup: list[BenchRequest]) -> dict[str, Any] | None:
    async with connect(args) as http:
        return await _warm_up(http, args, model, warmup)


async def _server_stats(http: Http) -> dict[str, Any] | None:
    try:
        async with http.session.get(http.url("/server_info")) as r:
            return (await r.json(content_type=None)).get("stats") if r.status == 200 else None
    except (aiohttp.ClientError, asyncio.TimeoutError, ValueError):
        return None


async def _run_all(
    http: Http,
    args: BenchArgs,
    model: str,
    extra: dict[str, Any],
    requests: list[BenchRequest],
    rate: float,
    progress: Progress | _Counter | None,
    t0: float | None = None,
    stream: int = 0,
) -> list[RequestResult]:
    t0 = time.perf_counter() if t0 is None else t0
    limit = asyncio.Semaphore(args.max_concurrency) if args.max_concurrency else None
    # each client process draws its own arrival gaps (process 0's are those of a single-process run)
    arrivals = np.random.default_rng([args.seed, 2] + ([stream] if stream else []))

    async def one(req: BenchRequest) -> RequestResult:
        if limit is None:
            result = await send(http, req, model, extra, t0)
        else:
            async with limit:
                result = await send(http, req, model, extra, t0)
        if progress is not None:
            progress.update()
        return result

    tasks = []
    for req in requests:
        tasks.append(asyncio.create_task(one(req)))
        if math.isfinite(rate):  # Poisson arrivals: exponential gaps of mean 1 / rate
            await asyncio.sleep(float(arrivals.exponential(1.0 / rate)))
    return list(await asyncio.gather(*tasks))


async def send(http: Http, req: BenchRequest, model: str, extra: dict[str, Any], t0: float) -> RequestResult:
    """One streamed request; any failure is recorded in the result, never raised."""
    path, body = req.openai_request(model, extra)
    content = json.dumps(body).encode()  # before the clock starts: megabytes of images take milliseconds
    result = RequestResult(req.index, len(req.image_urls), req.output_len)
    sent = time.perf_counter()
    result.start_s = sent - t0
    try:
        async with http.session.post(http.url(path), data=content, headers=JSON_HEADERS) as resp:
            if resp.status != 200:
                raise RequestFailed(f"HTTP {resp.status}: {_error_message(await resp.read())}")
            await _read_stream(resp, result, sent)
        result.e2e_s = time.perf_counter() - sent
        if result.num_chunks == 0:
            raise RequestFailed("the stream ended without any text")
        if not result.output_tokens:  # a server without include_usage: count chunks, and the prompt we sent
            result.output_tokens = result.num_chunks
            result.input_tokens = len(req.prompt_ids)
        result.success = True
    except Exception as e:  # noqa: BLE001 - a failed request is a figure of the run, not the end of it
        result.error = str(e) if isinstance(e, RequestFailed) else f"{type(e).__name__}: {e}"
    return result


async def _read_stream(resp: aiohttp.ClientResponse, result: RequestResult, sent: float) -> None:
    """Times each SSE event that carries text. At tens of thousands of events a second the client's own CPU would
    bound the figures, so plain text deltas and their running usage (continuous_usage_stats) are read from the
    bytes; only events carrying an error, or of a shape the byte reader is unsure of, are parsed as JSON."""
    last = 0.0
    tokens_seen = 0
    pending = b""
    async for raw in resp.content.iter_any():
        now = time.perf_counter()
        pending += raw
        *lines, pending = pending.split(b"\n")
        for line in lines:
            if not line.startswith(b"data:"):
                continue
            data = line[5:].strip()
            if data == b"[DONE]":
                return
            new_tokens = 0
            has_text = None if b'"error"' in data else _fast_has_text(data)
            usage = _fast_usage(data) if has_text is not None else None
            if has_text is None or usage is None:
                chunk = json.loads(data)
                if "error" in chunk:
                    raise RequestFailed(f"error in the stream: {_error_message(chunk)}")
                u = chunk.get("usage")
                usage = (u.get("prompt_tokens", 0), u.get("completion_tokens", 0)) if u else ()
                has_text = _has_text(chunk)
            if usage:
                result.input_tokens, result.output_tokens = usage
                new_tokens, tokens_seen = result.output_tokens - tokens_seen, result.output_tokens
            if not has_text:
                continue
            if result.num_chunks == 0:
                result.ttft_s = now - sent
            else:
                k = max(new_tokens, 1)
                result.itls_s.extend([(now - last) / k] * k)
            last = now
            result.num_chunks += 1


_USAGE_NULL = re.compile(rb'"usage":\s*null')
_PROMPT_TOKENS = re.compile(rb'"prompt_tokens":\s*(\d+)')
_COMPLETION_TOKENS = re.compile(rb'"completion_tokens":\s*(\d+)')


def _fast_usage(data: bytes) -> tuple[int, int] | tuple[()] | None:
    """(prompt_tokens, completion_tokens) of an event's usage read from its bytes; () when it has none (no
    "usage" key, or null); None when unsure (let the JSON decide)."""
    at = data.find(b'"usage":')
    if at < 0 or _USAGE_NULL.match(data, at):
        return ()
    prompt, completion = _PROMPT_TOKENS.search(data, at), _COMPLETION_TOKENS.search(data, at)
    if prompt is None or completion is None:
        return None
    return int(prompt[1]), int(completion[1])


_TEXT_KEYS = (b'"text":', b'"content":')


def _fast_has_text(data: bytes) -> bool | None:
    """Whether an OpenAI stream event's text delta is non-empty, read from the bytes; None when unsure."""
    for key in _TEXT_KEYS:
        at = data.find(key)
        if at >= 0:
            rest = data[at + len(key) :].lstrip()
            if rest.startswith(b'""'):
                return False
            if rest.startswith(b'"'):
                return True
            return None  # null or something else: let the JSON decide
    return None


def _has_text(chunk: dict[str, Any]) -> bool:
    for choice in chunk.get("choices") or ():
        if choice.get("text") or (choice.get("delta") or {}).get("content"):
            return True
    return False


def _error_message(raw: bytes | dict[str, Any]) -> str:
    try:
        body = json.loads(raw) if isinstance(raw, bytes) else raw
        return str(body["error"]["message"])
    except (ValueError, KeyError, TypeError):
        text = raw.decode(errors="replace") if isinstance(raw, bytes) else str(raw)
        return text[:300]


async def fetch_json(base_url: str, path: str, timeout_s: float = 30.0) -> dict[str, Any] | None:
    """GET a JSON endpoint of the server; None when it is not there."""
    try:
        timeout = aiohttp.ClientTimeout(total=timeout_s)
        async with (
            aiohttp.ClientSession(timeout=timeout, trust_env=False) as session,
            session.get(Http(session, base_url).url(path)) as resp,
        ):
            return await resp.json(content_type=None) if resp.status == 200 else None
    except (aiohttp.ClientError, asyncio.TimeoutError, ValueError):
        return None
