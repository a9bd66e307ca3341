"""The scheduler's CPU work per step in one process, without gRPC or an event loop: plan a step and build its
StepRequest, read a StepResult of one token per sampling sequence, apply it (stop checks, detokenization) and
build the OutputBatch the gateway's stream carries, with `--concurrency` sequences running (finished ones are
replaced at once, as closed-loop clients do). The worker's side (reading the plan, writing the result) is not
timed. Steps run one ahead of their results, as in the service.

    python -m benchmarks.bench_scheduler_step [--concurrency 256] [--steps 600] [--profile F]
"""

from __future__ import annotations

import argparse
import cProfile
import pstats
import random
import time
from collections import deque

from common.convert import (
    outputs_to_batch,
    plan_from_proto,
    plan_to_proto,
    step_output_from_proto,
    step_output_to_proto,
)
from common.service_main import settle_gc
from common.types import (
    DeltaColumns,
    GenerateRequest,
    SamplingParams,
    SeqResult,
    StepOutput,
    StoppingCriteria,
)
from protos import worker_pb2
from scheduler_svc.scheduler import Scheduler, SchedulerPolicy


class Bench:
    def __init__(self, args: argparse.Namespace, tokenizer, pool: list[int], eos: tuple[int, ...]):
        self.args = args
        self.rng = random.Random(0)
        self.pool = pool
        self.core = Scheduler(
            SchedulerPolicy(
                page_size=16,
                num_pages=200_000,
                context_length=32768,
                max_running_requests=args.concurrency,
                chunked_prefill_size=8192,
                max_prefill_tokens=16384,
                eos_token_ids=eos,
                decode_log_interval=1 << 30,
            ),
            tokenizer,
        )
        self.num_requests = 0
        self.live = 0
        self.timed_ns = 0
        self.parts_ns = dict.fromkeys(("plan", "plan proto", "read result", "apply", "outputs"), 0)
        self.num_tokens = 0
        self.num_steps = 0
        self.inflight: deque[bytes] = deque()  # results of steps sent, not yet applied
        self.deltas = DeltaColumns()  # one Connect stream's columns, as the service routes streamed deltas

    def add_request(self) -> None:
        self.num_requests += 1
        a = self.args
        self.core.add_request(
            GenerateRequest(
                f"r{self.num_requests}",
                tuple(self.rng.choice(self.pool) for _ in range(a.input_len)),
                sampling=SamplingParams(temperature=0.0, return_logprob=a.logprobs, top_logprobs=a.logprobs),
                stopping=StoppingCriteria(max_new_tokens=a.output_len, stop=tuple(a.stop)),
                stream=True,
            ),
            deltas=self.deltas,
        )
        self.live += 1

    def fake_worker(self, wire: bytes) -> bytes:
        """The worker's answer: a token for every sampling sequence (not timed)."""
        plan = plan_from_proto(worker_pb2.StepRequest.FromString(wire))
        results = []
        for s in plan.seqs:
            if s.sample:
                token = self.pool[self.rng.randrange(len(self.pool))]
                lp = ((token, -0.5), (token + 1, -1.5)) if self.args.logprobs else ()
                results.append(SeqResult(s.seq_id, token, -0.5 if lp else 0.0, lp))
        out = StepOutput(plan.step_id, tuple(results), (), plan.num_tokens, forward_ns=1)
        return step_output_to_proto(out).SerializeToString()

    def plan(self) -> bytes | None:
        t0 = time.perf_counter_ns()
        plan = self.core.schedule()
        t1 = time.perf_counter_ns()
        wire = plan_to_proto(plan).SerializeToString() if plan is not None else None
        t2 = time.perf_counter_ns()
        self._account(("plan", t1 - t0), ("plan proto", t2 - t1))
        return wire

    def _account(self, *parts: tuple[str, int]) -> None:
        for name, ns in parts:
            self.parts_ns[name] += ns
            self.timed_ns += ns

    def apply(self, result: bytes) -> None:
        before = self.core.stats.generated_tokens_total
        t0 = time.perf_counter_ns()
        out = step_output_from_proto(worker_pb2.StepResult.FromString(result))
        t1 = time.perf_counter_ns()
        self.core.process_output(out)
        t2 = time.perf_counter_ns()
        outs, self.core.outputs = self.core.outputs, []
        outputs_to_batch([self.deltas.take(), *outs]).SerializeToString()
        t3 = time.perf_counter_ns()
        self._account(("read result", t1 - t0), ("apply", t2 - t1), ("outputs", t3 - t2))
        self.num_tokens += self.core.stats.generated_tokens_total - before
        self.num_steps += 1
        self.live -= sum(1 for o in outs if o.finish_reason is not None)

    def run(self, num_steps: int) -> None:
        inflight = self.inflight
        while self.num_steps < num_steps:
            while self.live < self.args.concurrency:
                self.add_request()
            wire = self.plan()
            if wire is not None:
                inflight.append(self.fake_worker(wire))
            if inflight and (len(inflight) > 1 or wire is None):
                self.apply(inflight.popleft())

    def reset_counters(self) -> None:
        self.timed_ns = self.num_tokens = self.num_steps = 0
        self.parts_ns = dict.fromkeys(self.parts_ns, 0)


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(prog="python -m benchmarks.bench_scheduler_step", description=__doc__)
    ap.add_argument("--concurrency", type=int, default=256, help="sequences running")
    ap.add_argument("--steps", type=int, default=600, help="timed steps (after as many warm-up steps)")
    ap.add_argument("--input-len", type=int, default=128, help="prompt tokens per request")
    ap.add_argument("--output-len", type=int, default=256, help="generated tokens per request")
    ap.add_argument("--stop", action="append", default=[], help="a stop string, repeatable")
    ap.add_argument("--logprobs", type=int, default=0, help="top logprobs per token (0: none)")
    ap.add_argument("--model-path", default="", help="tokenizer (default: the embedded model)")
    ap.add_argument("--profile", default="", help="write a cProfile of the timed steps here")
    args = ap.parse_args(argv)

    from benchmarks.sim_worker import text_token_ids
    from processor.model_config import load_generation_eos
    from processor.text_stream import prepare_detokenizer
    from processor.tokenizer import Tokenizer

    if not args.model_path:
        from mirador.default_model import default_model_dir

        args.model_path = str(default_model_dir())
    tokenizer = Tokenizer(args.model_path)
    pool = [int(t) for t in text_token_ids(tokenizer)]
    bench = Bench(args, tokenizer, pool, load_generation_eos(args.model_path))
    prepare_detokenizer(tokenizer)  # as the scheduler service does at start-up
    settle_gc()
    bench.run(args.steps)
    bench.reset_counters()
    profiler = cProfile.Profile() if args.profile else None
    cpu0 = time.process_time()
    if profiler:
        profiler.enable()
    bench.run(args.steps)
    if profiler:
        profiler.disable()
        profiler.dump_stats(args.profile)
        pstats.Stats(args.profile).sort_stats("tottime").print_stats(25)
    cpu = time.process_time() - cpu0
    steps, tokens = max(1, bench.num_steps), max(1, bench.num_tokens)
    print(
        f"concurrency {args.concurrency}: {bench.num_steps} steps, {bench.num_tokens} tokens; timed scheduler "
        f"work {bench.timed_ns / 1e3 / steps:.0f} us/step, {bench.timed_ns / 1e3 / tokens:.2f} us/token "
        f"(process CPU incl. the fake worker: {cpu * 1e6 / steps:.0f} us/step)"
    )
    print("  " + ", ".join(f"{k} {ns / 1e3 / steps:.0f}" for k, ns in bench.parts_ns.items()) + " (us/step)")


if __name__ == "__main__":
    main()
