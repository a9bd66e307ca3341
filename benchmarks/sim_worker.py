"""A simulated worker: the Worker gRPC service without a model, so the real gateway and scheduler run at GPU step
rates on a machine without a GPU (benchmark tooling, not the product).

It keeps the real worker's per-sequence bookkeeping (inits, page tables, frees, the same failures) and a simulated
KV cache: each slot holds a hash of the tokens up to it, so a prefix-cache hit or a recompute after preemption
continues exactly as a model would. Each sampling sequence gets one token per step, a deterministic function of
that hash drawn from ordinary text tokens of the model's tokenizer (never EOS or a special id unless --eos-after
asks). Steps take --step-ms (+ --prefill-us-per-token) on a simulated device timeline: a step written ahead
queues behind the running one, as on a GPU.

    python -m benchmarks.sim_worker --port 50052 --step-ms 8 [--model-path DIR] [--stats-file F]
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import dataclasses
import functools
import hashlib
import json
import logging
import os
import time
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import grpc
import numpy as np

from common import event_loop
from common.args import ArgsBase, arg
from common.convert import plan_from_proto, step_output_to_proto, worker_info_to_proto
from common.errors import InvalidRequestError, UnavailableError, abort_with
from common.grpc_utils import Fatal, ServiceHealth, serve_until_signal
from common.grpc_utils import create_server as _create_server
from common.local_stream import LocalMethod, LocalStreamServer, serve_locally
from common.log import setup_logging
from common.types import (
    SamplingParams,
    SeqFailure,
    SeqResult,
    SeqStep,
    StepOutput,
    StepPlan,
    WorkerInfo,
    new_epoch,
)
from protos import worker_pb2, worker_pb2_grpc

logger = logging.getLogger(__name__)
SERVICE_NAME = worker_pb2.DESCRIPTOR.services_by_name["Worker"].full_name
STEPS_METHOD = f"/{SERVICE_NAME}/Steps"
MASK = (1 << 64) - 1


@dataclass(frozen=True)
class SimWorkerArgs(ArgsBase):
    model_path: str = arg(
        "", "model directory: tokenizer, vocabulary, context length (default: the embedded default model)"
    )
    host: str = arg("127.0.0.1", "address to listen on")
    port: int = arg(50052, "gRPC port (0 picks a free one)")
    step_ms: float = arg(8.0, "simulated device time of every step, ms (an H100 decode step: 6-8)")
    prefill_us_per_token: float = arg(0.0, "simulated device time added per prompt token a step computes, us")
    num_pages: int = arg(200_000, "KV pages reported (page 0 included)")
    page_size: int = arg(16, "tokens per KV page")
    max_running_requests: int = arg(512, "sequences the worker holds at once")
    eos_after: int = arg(
        -1, "sample EOS as output token N (0-based; min_tokens suppression honoured); -1: never"
    )
    all_scripts: bool = arg(
        False, "draw tokens from every clean text token, not only ASCII ones (CJK, accents)"
    )
    stats_file: str = arg("", "rewrite counters as JSON here while serving (every 0.25 s) and on exit")
    step_socket: str = arg(
        "auto", "also serve the step stream on a Unix socket, as the worker does: auto, a path, or none"
    )
    log_level: str = arg("info", "logging level")

    def __post_init__(self):
        if not self.model_path:
            raise ValueError("--model-path is required")
        if self.step_ms < 0 or self.prefill_us_per_token < 0:
            raise ValueError("--step-ms and --prefill-us-per-token must be >= 0")
        if self.num_pages < 2 or self.page_size < 1 or self.max_running_requests < 1:
            raise ValueError("--num-pages must be >= 2, --page-size and --max-running-requests >= 1")


def text_token_ids(tokenizer, all_scripts: bool = False) -> np.ndarray:
    """Ids of ordinary tokens: not added/special, bytes that are complete UTF-8 of printable text (ASCII only
    unless all_scripts), so any sequence of them detokenizes cleanly."""
    pieces = tokenizer.hf.convert_ids_to_tokens(list(range(tokenizer.vocab_size)))
    added = set(tokenizer.hf.added_tokens_decoder)
    out = []
    for i, piece in enumerate(pieces):
        if piece is None or i in added:
            continue
        raw = tokenizer.token_bytes(i)
        try:
            text = raw.decode()
        except UnicodeDecodeError:
            continue
        if not text or not all(c.isprintable() or c in " \n" for c in text):
            continue
        if all_scripts or text.isascii():
            out.append(i)
    return np.asarray(out, np.int64)


@functools.lru_cache(maxsize=2)
def _load_tokenizer(model_path: str):
    """Loaded once per process (tests start several sim workers)."""
    from processor.tokenizer import Tokenizer

    return Tokenizer(model_path)


def _mix(x: int) -> int:
    """splitmix64's finalizer."""
    x = (x ^ (x >> 30)) * 0xBF58476D1CE4E5B9 & MASK
    x = (x ^ (x >> 27)) * 0x94D049BB133111EB & MASK
    return x ^ (x >> 31)


def _mix_array(x: np.ndarray) -> np.ndarray:
    x = (x ^ (x >> np.uint64(30))) * np.uint64(0xBF58476D1CE4E5B9)
    x = (x ^ (x >> np.uint64(27))) * np.uint64(0x94D049BB133111EB)
    return x ^ (x >> np.uint64(31))


def _content_value(content_key: str) -> int:
    """The token value an image's placeholders take in the hash (40 bits of its content key)."""
    return int.from_bytes(hashlib.blake2b(content_key.encode(), digest_size=5).digest(), "little")


def _token_term(token: int, pos: int) -> int:
    """What a token at a position adds to the running hash a KV slot holds."""
    return _mix(((token & 0xFFFFFFFFFF) << 24) ^ pos ^ 0x5EED)


@dataclass
class _Seq:
    page_table: list[int]
    num_prompt: int
    sampling: SamplingParams
    spans: list[tuple[int, int, int]]  # (offset, tokens, value of every placeholder) per image
    last: int | None  # the last sampled token: what a decode step computes


@dataclass
class SimCounters:
    steps: int = 0
    prefill_steps: int = 0
    prefill_tokens: int = 0
    decode_tokens: int = 0
    sampled_tokens: int = 0
    failures: int = 0
    max_batch: int = 0
    busy_ns: int = 0  # simulated device time
    starved_ns: int = 0  # device idle while sequences were live: waiting for the scheduler's next step
    host_ns: int = 0  # this process's bookkeeping per step
    streams: int = 0
    live_seqs: int = 0


class SimCore:
    """The bookkeeping of a step, free of gRPC: validates like the real worker, writes the simulated KV, samples."""

    def __init__(self, args: SimWorkerArgs, pool: np.ndarray, eos_ids: Sequence[int], context_length: int):
        self.args = args
        self.pool = pool
        self.pool_list = [int(t) for t in pool]
        self.eos = eos_ids[0] if eos_ids else None
        self.page_size = args.page_size
        self.max_pages_per_seq = -(-context_length // args.page_size)
        self.kv = np.zeros(args.num_pages * args.page_size, np.uint64)
        self.seqs: dict[str, _Seq] = {}
        self.failed: dict[str, str] = {}
        self.counters = SimCounters()

    def reset(self) -> None:
        """A new scheduler starts from scratch."""
        self.seqs.clear()
        self.failed.clear()

    def duration_ns(self, num_prefill_tokens: int) -> int:
        a = self.args
        return int(a.step_ms * 1e6 + a.prefill_us_per_token * 1e3 * num_prefill_tokens)

    def step_request(self, req: worker_pb2.StepRequest) -> tuple[StepOutput, int]:
        """step(plan_from_proto(req)), with the plain decodes read from their columns (decode_seq_ids) without a
        SeqStep or SeqResult each when every one of them is well formed and wants no logprobs; the same output
        either way (tests/test_sim_worker.py). The simulated worker shares the benchmark machine's cores with the
        scheduler and the gateway it stands in for a GPU for, so its own CPU is kept small."""
        ids, starts = list(req.decode_seq_ids), list(req.decode_start_pos)
        if ids:
            states = self._plain_decodes(ids, starts)
            if states is not None:
                req.ClearField("decode_seq_ids")
                req.ClearField("decode_start_pos")
                return self.step(plan_from_proto(req), (ids, starts, states))
        return self.step(plan_from_proto(req))

    def _plain_decodes(self, ids: list[str], starts: list[int]) -> list[_Seq] | None:
        """The states of decodes that _apply_init_and_pages would pass; None if any would not."""
        seqs, failed, ps = self.seqs, self.failed, self.page_size
        states = []
        for sid, lo in zip(ids, starts, strict=True):
            st = seqs.get(sid)
            if st is None or sid in failed or st.last is None or (lo + ps) // ps > len(st.page_table):
                return None
            states.append(st)
        return states

    def step(self, plan: StepPlan, plain: tuple | None = None) -> tuple[StepOutput, int]:
        """The step's output (times unset) and its simulated device time. `plain`: (ids, start positions, states)
        of plain decodes that follow plan.seqs (step_request)."""
        t0 = time.perf_counter_ns()
        c = self.counters
        for seq_id in plan.free_seq_ids:
            self.seqs.pop(seq_id, None)
            self.failed.pop(seq_id, None)
        results: list[SeqResult] = []
        failures: list[SeqFailure] = []
        num_tokens = num_prefill = 0
        for s in plan.seqs:
            if s.seq_id in self.failed and s.init is None:
                failures.append(
                    SeqFailure(s.seq_id, self.failed[s.seq_id], "sequence failed in an earlier step")
                )
                continue
            self.failed.pop(s.seq_id, None)
            try:
                st = self._apply_init_and_pages(s)
            except InvalidRequestError as e:
                failures.append(SeqFailure(s.seq_id, "internal", e.message))
                self.failed[s.seq_id] = "internal"
                continue
            h = self._compute(st, s)
            num_tokens += s.num_tokens
            if s.input_ids:
                num_prefill += s.num_tokens
            if s.sample:
                results.append(self._sample(st, s, h))
        computed = len(plan.seqs) - len(failures)
        sampled_ids: list[str] = []
        sampled_tokens: list[int] = []
        num_sampled = len(results)
        if plain is not None:
            # the columns carry the plain results, then the decodes, in plan order, as the real worker sends them
            with_logprobs = []
            for r in results:
                if r.logprob or r.top_logprobs:
                    with_logprobs.append(r)
                else:
                    sampled_ids.append(r.seq_id)
                    sampled_tokens.append(r.token_id)
            results = with_logprobs
            ids, starts, states = plain
            self._decode_plain(ids, starts, states, sampled_ids, sampled_tokens, results)
            computed += len(ids)
            num_tokens += len(ids)
            num_sampled += len(ids)
        c.steps += 1
        c.prefill_steps += num_prefill > 0
        c.prefill_tokens += num_prefill
        c.decode_tokens += num_tokens - num_prefill
        c.sampled_tokens += num_sampled
        c.failures += len(failures)
        c.max_batch = max(c.max_batch, computed)
        c.live_seqs = len(self.seqs)
        prepare_ns = time.perf_counter_ns() - t0
        c.host_ns += prepare_ns
        duration = self.duration_ns(num_prefill) if computed else 0
        out = StepOutput(
            plan.step_id,
            tuple(results),
            tuple(failures),
            num_tokens,
            prepare_ns,
            duration,
            sampled_seq_ids=tuple(sampled_ids),
            sampled_token_ids=tuple(sampled_tokens),
        )
        return out, duration

    def _decode_plain(self, ids, starts, states, sampled_ids, sampled_tokens, results) -> None:
        """_compute and _sample of one-token decodes (checked by _plain_decodes), inline; tokens go to the columns,
        those of sequences that want logprobs to `results` (as step_output_to_proto would place them)."""
        kv, ps, pool, n_pool = self.kv, self.page_size, self.pool_list, len(self.pool_list)
        eos_after = self.args.eos_after
        for sid, lo, st in zip(ids, starts, states, strict=True):
            table = st.page_table
            prev = int(kv[table[(lo - 1) // ps] * ps + (lo - 1) % ps]) if lo > 0 else 0
            h = (prev + _token_term(st.last, lo)) & MASK
            kv[table[lo // ps] * ps + lo % ps] = h
            sp = st.sampling
            if sp.return_logprob:
                results.append(self._sample(st, SeqStep(sid, lo), h))
                continue
            token = pool[_mix(h ^ (sp.seed or 0)) % n_pool]
            index = lo + 1 - st.num_prompt  # which output token this is (0-based)
            if index == eos_after and self._eos_allowed(sp, index):
                token = self.eos
            st.last = token
            sampled_ids.append(sid)
            sampled_tokens.append(token)

    def _apply_init_and_pages(self, s: SeqStep) -> _Seq:
        if s.init is not None:
            self.seqs.pop(s.seq_id, None)
            if len(self.seqs) >= self.args.max_running_requests:
                raise InvalidRequestError(
                    f"the worker holds {self.args.max_running_requests} sequences already (--max-running-requests)"
                )
            i = s.init
            spans = [(m.offset, m.num_tokens, _content_value(m.content_key)) for m in i.mm_items]
            last = i.output_token_ids[-1] if i.output_token_ids else None
            self.seqs[s.seq_id] = _Seq([], i.num_prompt_tokens, i.sampling, spans, last)
        st = self.seqs.get(s.seq_id)
        if st is None:
            raise InvalidRequestError(
                f"sequence {s.seq_id} is unknown to the worker and the step carries no init"
            )
        if s.page_ids:
            end = s.page_table_start + len(s.page_ids)
            if end > self.max_pages_per_seq:
                raise InvalidRequestError(f"sequence {s.seq_id}: {end} pages exceed the context length")
            if not all(0 < p < self.args.num_pages for p in s.page_ids):
                raise InvalidRequestError(
                    f"sequence {s.seq_id}: a page id outside [1, {self.args.num_pages})"
                )
            if len(st.page_table) < end:
                st.page_table.extend([0] * (end - len(st.page_table)))
            st.page_table[s.page_table_start : end] = s.page_ids
        if not s.input_ids and st.last is None:
            raise InvalidRequestError(f"decode step for {s.seq_id} before any token was sampled")
        if (s.start_pos + s.num_tokens + self.page_size - 1) // self.page_size > len(st.page_table):
            raise InvalidRequestError(
                f"sequence {s.seq_id}: page table too short for {s.start_pos + s.num_tokens} tokens"
            )
        return st

    def _slot(self, st: _Seq, pos: int) -> int:
        return st.page_table[pos // self.page_size] * self.page_size + pos % self.page_size

    def _compute(self, st: _Seq, s: SeqStep) -> int:
        """Write the running hash of every computed position into its KV slot; return the last one."""
        lo = s.start_pos
        prev = int(self.kv[self._slot(st, lo - 1)]) if lo > 0 else 0
        if not s.input_ids:  # a decode: the token this worker sampled last
            h = (prev + _token_term(st.last, lo)) & MASK
            self.kv[self._slot(st, lo)] = h
            return h
        tokens = np.asarray(s.input_ids, np.uint64)
        n = len(tokens)
        for off, cnt, value in st.spans:  # image placeholders stand for their content, not their token id
            a, b = max(lo, off), min(lo + n, off + cnt)
            if a < b:
                tokens[a - lo : b - lo] = value
        pos = np.arange(lo, lo + n, dtype=np.uint64)
        terms = _mix_array(((tokens & np.uint64(0xFFFFFFFFFF)) << np.uint64(24)) ^ pos ^ np.uint64(0x5EED))
        hashes = np.cumsum(terms, dtype=np.uint64) + np.uint64(prev)
        table = np.asarray(st.page_table, np.int64)
        ipos = pos.astype(np.int64)
        self.kv[table[ipos // self.page_size] * self.page_size + ipos % self.page_size] = hashes
        return int(hashes[-1])

    def _eos_allowed(self, sp: SamplingParams, index: int) -> bool:
        """EOS may be output token `index` (0-based): the model has one and min_tokens does not suppress it."""
        return self.eos is not None and not (index < sp.min_tokens and self.eos in sp.min_tokens_suppress_ids)

    def _sample(self, st: _Seq, s: SeqStep, h: int) -> SeqResult:
        sp = st.sampling
        index = s.start_pos + s.num_tokens - st.num_prompt  # which output token this is (0-based)
        x = _mix(h ^ (sp.seed or 0))
        k = x % len(self.pool)
        token = int(self.pool[k])
        if index == self.args.eos_after and self._eos_allowed(sp, index):
            token = self.eos
        st.last = token
        if not sp.return_logprob:
            return SeqResult(s.seq_id, token)
        logprob = -((x >> 20) % 4096) / 1024.0 - 0.01
        top = tuple(
            (token if j == 0 else int(self.pool[(k + j) % len(self.pool)]), logprob - j)
            for j in range(sp.top_logprobs)
        )
        return SeqResult(s.seq_id, token, logprob, top)


class SimWorkerServicer(worker_pb2_grpc.WorkerServicer):
    def __init__(self, args: SimWorkerArgs):
        self.args = args
        self.core: SimCore | None = None
        self.tokenizer = None
        self.info: WorkerInfo | None = None
        self.health: ServiceHealth | None = None
        self.fatal: Fatal | None = None  # set by create_server
        self._stream_lock = asyncio.Lock()
        self._writer: asyncio.Task | None = None
        self.port = 0  # the bound gRPC port (create_server)
        self.local: LocalStreamServer | None = None

    async def startup(self) -> None:
        from processor.model_config import load_generation_eos, load_model_config

        a = self.args
        # the worker's transport code: the same Steps method on a Unix socket (worker_svc/server.py)
        methods = {STEPS_METHOD: LocalMethod(worker_pb2.StepRequest, self.Steps)}
        self.local = await serve_locally(a.step_socket, "worker", self.port, SERVICE_NAME, methods)
        config = load_model_config(a.model_path)
        self.tokenizer = await asyncio.to_thread(_load_tokenizer, a.model_path)
        pool = await asyncio.to_thread(text_token_ids, self.tokenizer, a.all_scripts)
        eos = load_generation_eos(a.model_path)
        self.core = SimCore(a, pool, eos, config.context_length)
        self.info = WorkerInfo(
            architecture=config.architecture,
            num_pages=a.num_pages,
            page_size=a.page_size,
            context_length=config.context_length,
            vocab_size=config.text.vocab_size,
            dtype="bfloat16",
            device="sim",
            kv_cache_bytes=self.core.kv.nbytes,
            attention_backend="sim",
            max_running_requests=a.max_running_requests,
            epoch=new_epoch(),
            step_socket=self.local.path if self.local is not None else "",
        )
        if a.stats_file:
            self._writer = self.fatal.watch(
                asyncio.create_task(self._write_stats_periodically()), "the stats writer"
            )
        logger.info(
            "sim worker ready: %d pages x %d, steps of %.2f ms + %.2f us per prompt token, %d tokens to draw",
            a.num_pages,
            a.page_size,
            a.step_ms,
            a.prefill_us_per_token,
            len(pool),
        )
        await self.health.set_serving(True)

    async def shutdown(self) -> None:
        if self._writer is not None:
            self._writer.cancel()
        if self.local is not None:
            await self.local.close()
        if self.core is not None:
            self.write_stats()
            logger.info("sim worker counters: %s", json.dumps(dataclasses.asdict(self.core.counters)))

    def write_stats(self) -> None:
        if not self.args.stats_file or self.core is None:
            return
        path = Path(self.args.stats_file)
        tmp = path.with_suffix(path.suffix + ".tmp")
        tmp.write_text(json.dumps({**dataclasses.asdict(self.core.counters), "unix_s": time.time()}))
        os.replace(tmp, path)

    async def _write_stats_periodically(self, period_s: float = 0.25) -> None:
        last = None
        while True:
            await asyncio.sleep(period_s)
            now = dataclasses.astuple(self.core.counters)
            if now != last:
                self.write_stats()
                last = now

    def _ready(self) -> SimCore:
        if self.core is None:
            raise UnavailableError("sim worker is still starting")
        return self.core

    async def GetInfo(self, request, context):
        try:
            self._ready()
            return worker_info_to_proto(self.info)
        except Exception as e:  # noqa: BLE001
            await abort_with(context, e)

    async def Steps(self, request_iterator, context):
        try:
            core = self._ready()
        except Exception as e:  # noqa: BLE001
            await abort_with(context, e)
        if self._stream_lock.locked():
            await context.abort(
                grpc.StatusCode.FAILED_PRECONDITION, "another scheduler already drives this worker"
            )
        async with self._stream_lock:
            core.reset()
            core.counters.streams += 1
            logger.info("scheduler connected: step stream open")
            done: asyncio.Queue = asyncio.Queue()
            reader = asyncio.create_task(self._run_all(request_iterator, core, done))
            try:
                while (item := await done.get()) is not None:
                    if isinstance(item, BaseException):
                        await abort_with(context, item)
                    end_ns, out = item
                    delay = (end_ns - time.monotonic_ns()) / 1e9
                    if delay > 0:
                        await asyncio.sleep(delay)
                    yield step_output_to_proto(out)
            finally:
                reader.cancel()
            logger.info("step stream closed")

    async def _run_all(self, request_iterator, core: SimCore, done: asyncio.Queue) -> None:
        """Each step runs its bookkeeping on arrival and is placed on the device timeline: it starts when both it
        and the device are there, so a step written ahead starts the moment the previous one ends."""
        to_unix = time.time_ns() - time.monotonic_ns()
        device_free = 0
        try:
            async for req in request_iterator:
                arrived = time.monotonic_ns()
                if arrived > device_free and core.seqs and device_free:
                    core.counters.starved_ns += arrived - device_free
                out, duration = core.step_request(req)
                start = max(arrived, device_free)
                device_free = start + duration
                core.counters.busy_ns += duration
                out = dataclasses.replace(
                    out, start_unix_ns=start + to_unix, end_unix_ns=device_free + to_unix
                )
                done.put_nowait((device_free, out))
        except asyncio.CancelledError:
            raise
        except Exception as e:  # noqa: BLE001 - the stream broke: end it
            logger.exception("step stream failed")
            done.put_nowait(e)
            return
        done.put_nowait(None)


def create_server(args: SimWorkerArgs) -> tuple[grpc.aio.Server, int, SimWorkerServicer]:
    servicer = SimWorkerServicer(args)
    server, port = _create_server(
        servicer, worker_pb2_grpc.add_WorkerServicer_to_server, SERVICE_NAME, args.host, args.port
    )
    servicer.port = port
    return server, port, servicer


def main(argv: Sequence[str] | None = None) -> None:
    parser = argparse.ArgumentParser(
        prog="python -m benchmarks.sim_worker",
        description=__doc__,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    SimWorkerArgs.add_cli_args(parser)
    ns = parser.parse_args(argv)
    if not ns.model_path:
        from mirador.default_model import default_model_dir

        ns.model_path = str(default_model_dir())
    try:
        args = SimWorkerArgs.from_cli_args(ns)
    except ValueError as e:
        parser.error(str(e))
    setup_logging("sim-worker", args.log_level)

    async def serve() -> None:
        server, port, servicer = create_server(args)
        logger.info("sim worker listening on %s:%d", args.host, port)
        await serve_until_signal(
            server, servicer.health, servicer.startup, on_stop=servicer.shutdown, fatal=servicer.fatal
        )

    with contextlib.suppress(KeyboardInterrupt):
        event_loop.run(serve())  # uvloop, as the services run: less of the benchmark machine's CPU here


if __name__ == "__main__":
    main()
