"""Per-step overhead of grammar-constrained decoding at batch 1 and 64: the scheduler's mask fill (llguidance,
every constrained row of a step in one call), the worker's mask apply (one op over the batch), and the worker's
decode step with and without masks.

    python -m benchmarks.bench_grammar                      # CPU, the embedded tiny model
    python -m benchmarks.bench_grammar --device cuda --model Qwen/Qwen2.5-VL-7B-Instruct --load-format dummy

A constrained row cannot overlap its mask with the step before (the mask needs that step's token), so its
per-token overhead is fill + (masked step - plain step) + one scheduler round trip; unconstrained rows keep their
overlap. Prints a table last; --output-json writes every figure.
"""

from __future__ import annotations

import argparse
import json
import statistics
import time
from collections import deque

import numpy as np
import torch

from common.types import Constraint, SamplingParams, SeqInit, SeqStep, StepPlan
from kernels.grammar_mask import apply_token_bitmask
from processor.hub import resolve_model_path
from processor.tokenizer import Tokenizer
from scheduler_svc.grammar import GrammarBackend
from worker_svc.model_runner import ModelRunner, RunnerConfig

SCHEMA = {
    "type": "object",
    "properties": {
        "name": {"type": "string", "maxLength": 64},
        "tags": {"type": "array", "items": {"enum": ["a", "b", "c"]}, "maxItems": 8},
        "n": {"type": "integer", "minimum": 0, "maximum": 1000},
    },
    "required": ["name", "tags", "n"],
    "additionalProperties": False,
}
# where the matchers stand when their masks are filled: the start (few tokens allowed) and inside a free string
# (almost every token allowed, the costly case)
STATES = {"start": "", "in_string": '{"name":"abc'}


def _time(fn, reps: int, sync) -> float:
    """Median ms of fn() over reps runs (after one warm-up)."""
    fn()
    sync()
    times = []
    for _ in range(reps):
        t0 = time.perf_counter()
        fn()
        sync()
        times.append((time.perf_counter() - t0) * 1e3)
    return statistics.median(times)


def fill_rows(backend: GrammarBackend, tokenizer: Tokenizer, batches: list[int], reps: int) -> list[dict]:
    template = backend.compile(Constraint("json_schema", json.dumps(SCHEMA))).result()
    rows = []
    for state, prefix in STATES.items():
        ids = tokenizer.encode(prefix) if prefix else []
        for batch in batches:
            matchers = [template.deep_copy() for _ in range(batch)]
            for m in matchers:
                assert m.consume_tokens(ids), m.get_error()
            ms = _time(lambda ms_=matchers: backend.fill(ms_), reps, lambda: None)
            rows.append({"part": "fill", "state": state, "batch": batch, "ms": ms})
            print(json.dumps(rows[-1]), flush=True)
    return rows


def apply_rows(device: torch.device, vocab: int, batches: list[int], reps: int, sync) -> list[dict]:
    rows = []
    words = -(-vocab // 32)
    g = torch.Generator().manual_seed(0)
    for batch in batches:
        logits = torch.randn(batch, vocab, generator=g).to(device)
        bitmask = torch.randint(-(2**31), 2**31 - 1, (batch, words), dtype=torch.int32, generator=g)
        host_rows = np.arange(batch, dtype=np.int64)

        def run(bm=bitmask, lg=logits, hr=host_rows):  # as the sampler does: copy the masks, apply in one op
            apply_token_bitmask(lg, bm.to(device), torch.from_numpy(hr).to(device))

        rows.append({"part": "apply", "batch": batch, "ms": _time(run, reps, sync)})
        print(json.dumps(rows[-1]), flush=True)
    return rows


def step_rows(runner: ModelRunner, masks: np.ndarray, batches: list[int], args, sync) -> list[dict]:
    """ms per decode step (steps pipelined as the worker runs them) without and with a mask on every row."""
    rows = []
    params = SamplingParams(temperature=1.0)
    context, size = args.context, runner.page_size
    pages_per_seq = -(-(context + 3 * args.steps + 20) // size)
    for batch in batches:
        ids = [f"g{batch}-{i}" for i in range(batch)]
        g = torch.Generator().manual_seed(batch)
        for i, sid in enumerate(ids):
            pages = tuple(range(1 + i * pages_per_seq, 1 + (i + 1) * pages_per_seq))
            prompt = tuple(torch.randint(0, 150000, (context,), generator=g).tolist())
            init = SeqInit((), params, context)
            runner.step(StepPlan(0, (SeqStep(sid, 0, prompt, True, 0, pages, init),)))
        pos = context
        bitmask = np.repeat(masks[:1], batch, axis=0).astype("<i4").tobytes()
        for name, mask_ids, mask_bytes in (("plain", (), b""), ("masked", tuple(ids), bitmask)):

            def decode(n: int, mask_ids=mask_ids, mask_bytes=mask_bytes, ids=ids) -> None:
                nonlocal pos
                pending: deque = deque()
                for _ in range(n):
                    seqs = tuple(SeqStep(sid, pos, (), True) for sid in ids)
                    plan = StepPlan(pos, seqs, mask_seq_ids=mask_ids, token_bitmask=mask_bytes)
                    pos += 1
                    pending.append(runner.launch(plan))
                    if len(pending) > 1:
                        runner.collect(pending.popleft())
                while pending:
                    runner.collect(pending.popleft())

            decode(3)
            sync()
            t0 = time.perf_counter()
            decode(args.steps)
            sync()
            ms = (time.perf_counter() - t0) * 1e3 / args.steps
            rows.append({"part": "step", "mode": name, "batch": batch, "ms": ms})
            print(json.dumps(rows[-1]), flush=True)
        runner.step(StepPlan(0, (), tuple(ids)))
    return rows


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument(
        "--model", default="", help="model directory or bundled Hub id (default: the embedded model)"
    )
    p.add_argument("--load-format", default="auto", help="auto, or dummy (random weights)")
    p.add_argument("--device", default="cpu", help="cpu or cuda")
    p.add_argument("--batches", nargs="*", type=int, default=[1, 64])
    p.add_argument("--context", type=int, default=64, help="cached tokens per sequence before decoding")
    p.add_argument("--steps", type=int, default=20, help="decode steps timed per mode")
    p.add_argument("--reps", type=int, default=20, help="repetitions of the fill and apply timings")
    p.add_argument("--grammar-threads", type=int, default=2, help="llguidance threads of the mask fill")
    p.add_argument("--output-json", default="")
    args = p.parse_args()
    from mirador.default_model import default_model_dir

    model = str(resolve_model_path(args.model, args.load_format)) if args.model else str(default_model_dir())
    device = torch.device(args.device)
    sync = torch.cuda.synchronize if device.type == "cuda" else (lambda: None)
    runner = ModelRunner(
        RunnerConfig(
            model_path=model,
            device=args.device,
            dtype="bfloat16" if device.type == "cuda" else "auto",
            load_format=args.load_format,
            max_running_requests=max(args.batches),
            max_total_tokens=max(args.batches) * (args.context + 3 * args.steps + 64) + 1024,
        ),
        None,
    )
    runner.warmup()
    vocab = runner.sampler.vocab_size
    tokenizer = Tokenizer(model)
    backend = GrammarBackend(tokenizer.hf, vocab, (tokenizer.eos_token_id,), max_workers=args.grammar_threads)
    rows = fill_rows(backend, tokenizer, args.batches, args.reps)
    rows += apply_rows(device, vocab, args.batches, args.reps, sync)
    template = backend.compile(Constraint("json_schema", json.dumps(SCHEMA))).result()
    string_state = template.deep_copy()
    string_state.consume_tokens(tokenizer.encode(STATES["in_string"]))
    rows += step_rows(runner, backend.fill([string_state]), args.batches, args, sync)
    backend.close()
    name = torch.cuda.get_device_name() if device.type == "cuda" else "cpu"
    if args.output_json:
        with open(args.output_json, "w") as f:
            json.dump({"device": name, "model": model, "rows": rows}, f, indent=1)
    by = {(r["part"], r.get("state", r.get("mode", "")), r["batch"]): r["ms"] for r in rows}
    print(f"\n{name}, {model}")
    print(
        f"{'batch':>6}{'fill start':>12}{'fill string':>13}{'apply':>9}{'step':>9}{'masked':>9}{'overhead':>10}"
    )
    for b in args.batches:
        fill = by[("fill", "in_string", b)]
        plain, masked = by[("step", "plain", b)], by[("step", "masked", b)]
        print(
            f"{b:>6}{by[('fill', 'start', b)]:>12.3f}{fill:>13.3f}{by[('apply', '', b)]:>9.3f}"
            f"{plain:>9.2f}{masked:>9.2f}{fill + masked - plain:>10.2f}"
        )
    print("ms; overhead = fill (in a string) + masked step - plain step, per constrained token")


if __name__ == "__main__":
    main()
