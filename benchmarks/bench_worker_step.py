"""The worker's step in process on one GPU: decode ms/step at batch 1 and 64, prefill time, per backend and with
CUDA graphs on and off (decode graphs, piecewise prompt graphs), sampling variants, next to the floor (bytes a step
must read / copy bandwidth).

    python -m benchmarks.bench_worker_step --model Qwen/Qwen2.5-VL-7B-Instruct --load-format dummy

Prints a table last; --output-json writes every figure. Steps are pipelined as the worker service runs them
(step N+1 launched before step N is collected).
"""

from __future__ import annotations

import argparse
import gc
import json
import time
from collections import deque

import torch

from common.types import SamplingParams, SeqInit, SeqStep, StepPlan
from processor.hub import resolve_model_path
from worker_svc.model_runner import ModelRunner, RunnerConfig

GREEDY = SamplingParams(temperature=0.0)
SAMPLED = SamplingParams(temperature=0.8, top_p=0.9, top_k=50, repetition_penalty=1.1, frequency_penalty=0.2)


class Batch:
    """`batch` sequences with `context` cached tokens each, decoded step by step."""

    def __init__(self, runner: ModelRunner, batch: int, context: int, steps: int, params: SamplingParams):
        self.runner, self.batch, self.context = runner, batch, context
        size = runner.page_size
        pages_per_seq = -(-(context + steps + 1) // size)
        if 1 + batch * pages_per_seq > runner.kv_cache.num_pages:
            raise ValueError("KV cache too small for this batch")
        self.ids = [f"b{batch}-{i}" for i in range(batch)]
        self.pages = [tuple(range(1 + i * pages_per_seq, 1 + (i + 1) * pages_per_seq)) for i in range(batch)]
        self.params = params
        self.pos = context

    def prefill(self, chunk: int = 8192) -> float:
        """Prefill every sequence (random prompt tokens); seconds."""
        g = torch.Generator().manual_seed(0)
        t0 = time.perf_counter()
        for sid, pages in zip(self.ids, self.pages, strict=True):
            prompt = torch.randint(0, 150000, (self.context,), generator=g).tolist()
            prompt_ids = tuple(prompt) if self.params.needs_prompt_ids else ()
            init = SeqInit((), self.params, self.context, prompt_ids)
            for start in range(0, self.context, chunk):
                n = min(chunk, self.context - start)
                step = SeqStep(
                    sid, start, tuple(prompt[start : start + n]), start + n == self.context, 0,
                    pages if start == 0 else (), init if start == 0 else None,
                )  # fmt: skip
                self.runner.step(StepPlan(0, (step,)))
        return time.perf_counter() - t0

    def decode(self, steps: int) -> float:
        """ms per decode step, pipelined."""
        pending: deque = deque()
        torch.cuda.synchronize()
        t0 = time.perf_counter()
        for _ in range(steps):
            plan = StepPlan(self.pos, tuple(SeqStep(sid, self.pos, (), True) for sid in self.ids))
            self.pos += 1
            pending.append(self.runner.launch(plan))
            if len(pending) > 1:
                self.runner.collect(pending.popleft())
        while pending:
            self.runner.collect(pending.popleft())
        return (time.perf_counter() - t0) * 1e3 / steps

    def free(self) -> None:
        self.runner.step(StepPlan(0, (), tuple(self.ids)))


def floor_ms(runner: ModelRunner, batch: int, context: int, bandwidth: float) -> float:
    weights = sum(p.numel() * p.element_size() for p in runner.model.parameters())
    weights -= (
        runner.model.model.embed_tokens.weight.numel() * runner.model.model.embed_tokens.weight.element_size()
    )
    text = runner.model_config.text
    kv = 2 * text.num_hidden_layers * text.num_key_value_heads * text.head_dim * 2 * batch * context
    return (weights + kv) / bandwidth * 1e3


def copy_bandwidth() -> float:
    x = torch.empty(1 << 30, dtype=torch.uint8, device="cuda")
    y = torch.empty_like(x)
    for _ in range(3):
        y.copy_(x)
    torch.cuda.synchronize()
    t0 = time.perf_counter()
    for _ in range(20):
        y.copy_(x)
    torch.cuda.synchronize()
    return 2 * x.numel() * 20 / (time.perf_counter() - t0)


def run_config(
    model: str, backend: str, graphs: bool, args, rows: list[dict], bandwidth: float, piecewise: bool = True
) -> None:
    cfg = RunnerConfig(
        model_path=model,
        dtype="bfloat16",
        device="cuda",
        attention_backend=backend,
        load_format=args.load_format,
        max_running_requests=max(args.batches),
        disable_cuda_graph=not graphs,
        piecewise_cuda_graph_max_tokens=args.piecewise_max_tokens if piecewise else 0,
        max_total_tokens=args.kv_tokens or None,
    )
    t0 = time.perf_counter()
    runner = ModelRunner(cfg, None)
    runner.warmup()
    setup = time.perf_counter() - t0
    label = (
        f"{backend}{'' if graphs else ' (no graphs)'}{'' if piecewise or not graphs else ' (no piecewise)'}"
    )
    print(f"== {label}: runner ready in {setup:.1f} s", flush=True)
    for batch in args.batches:
        for name, params in (("greedy", GREEDY), ("sampled", SAMPLED)):
            if name == "sampled" and batch not in args.sampled_batches:
                continue
            b = Batch(runner, batch, args.context, args.steps + 10, params)
            prefill_s = b.prefill()
            b.decode(5)  # warm
            ms = b.decode(args.steps)
            b.free()
            row = {
                "backend": label,
                "batch": batch,
                "context": args.context,
                "sampling": name,
                "decode_ms": ms,
                "tokens_per_s": batch * 1e3 / ms,
                "floor_ms": floor_ms(runner, batch, args.context, bandwidth),
                "prefill_s_per_seq": prefill_s / batch,
            }
            rows.append(row)
            print(json.dumps(row), flush=True)
    # time to first token of one prompt, idle
    for n in args.ttft_lens:
        b = Batch(runner, 1, n, 2, GREEDY)
        b.prefill()
        b.free()
        times = []
        for _ in range(5):
            b = Batch(runner, 1, n, 2, GREEDY)
            times.append(b.prefill() * 1e3)
            b.free()
        replays = runner.piecewise.replays if runner.piecewise is not None else 0
        row = {
            "backend": label,
            "prefill_tokens": n,
            "ttft_ms": sorted(times)[len(times) // 2],
            "piecewise_replays": replays,
        }
        rows.append(row)
        print(json.dumps(row), flush=True)
    del runner, b
    gc.collect()
    torch.cuda.empty_cache()


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", default="Qwen/Qwen2.5-VL-7B-Instruct", help="model directory or bundled Hub id")
    p.add_argument("--load-format", default="dummy", help="dummy (random weights) or auto")
    p.add_argument(
        "--backends", nargs="*", default=["triton", "flashinfer"], help="attention backends to time"
    )
    p.add_argument(
        "--no-graph-backends", nargs="*", default=["triton"], help="also time these without graphs"
    )
    p.add_argument("--batches", nargs="*", type=int, default=[1, 64], help="decode batch sizes")
    p.add_argument("--sampled-batches", nargs="*", type=int, default=[64], help="batches also timed sampling")
    p.add_argument("--context", type=int, default=1024, help="cached tokens per sequence before decoding")
    p.add_argument("--steps", type=int, default=100, help="decode steps timed")
    p.add_argument("--ttft-lens", nargs="*", type=int, default=[1024], help="prompt lengths timed for TTFT")
    p.add_argument(
        "--no-piecewise-backends",
        nargs="*",
        default=["triton"],
        help="also time these without piecewise graphs",
    )
    p.add_argument(
        "--piecewise-max-tokens", type=int, default=2048, help="--piecewise-cuda-graph-max-tokens of the runs"
    )
    p.add_argument(
        "--kv-tokens", type=int, default=200_000, help="KV cache size in tokens (0: sized from GPU memory)"
    )
    p.add_argument("--output-json", default="", help="write every figure here")
    args = p.parse_args()
    model = str(resolve_model_path(args.model, args.load_format))
    bandwidth = copy_bandwidth()
    print(f"copy bandwidth {bandwidth / 1e12:.2f} TB/s", flush=True)
    rows: list[dict] = []
    for backend in args.backends:
        try:
            run_config(model, backend, True, args, rows, bandwidth)
            if backend in args.no_piecewise_backends:
                run_config(model, backend, True, args, rows, bandwidth, piecewise=False)
            if backend in args.no_graph_backends:
                run_config(model, backend, False, args, rows, bandwidth)
        except Exception as e:  # noqa: BLE001 - report and go on with the next backend
            print(f"!! {backend} failed: {type(e).__name__}: {e}", flush=True)
            rows.append({"backend": backend, "error": f"{type(e).__name__}: {e}"})
    if args.output_json:
        with open(args.output_json, "w") as f:
            json.dump(
                {"bandwidth": bandwidth, "rows": rows, "device": torch.cuda.get_device_name()}, f, indent=1
            )
    print(f"\n{'backend':<36}{'batch':>6}{'sampling':>9}{'ms/step':>9}{'floor':>7}{'tok/s':>9}")
    for r in rows:
        if "decode_ms" in r:
            print(
                f"{r['backend']:<36}{r['batch']:>6}{r['sampling']:>9}{r['decode_ms']:>9.2f}"
                f"{r['floor_ms']:>7.2f}{r['tokens_per_s']:>9.0f}"
            )
        elif "ttft_ms" in r:
            print(f"{r['backend']:<36} prefill {r['prefill_tokens']} tokens: {r['ttft_ms']:.1f} ms")
        else:
            print(f"{r['backend']:<36} {r['error']}")


if __name__ == "__main__":
    main()
