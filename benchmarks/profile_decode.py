# ruff: noqa: B023 - the sweep closure is called within the iteration that defines it
"""Where a decode step's time goes on the GPU: kernel time per step by kernel (torch profiler over CUDA-graph
replays), the achieved bandwidth of each projection GEMM alone, and a sweep of the Triton decode-attention tile
parameters at the model's shapes.

    python -m benchmarks.profile_decode --batches 1 64 --output-dir /tmp/prof
"""

from __future__ import annotations

import argparse
import json
import time
from collections import defaultdict
from pathlib import Path

import torch

from benchmarks.bench_worker_step import GREEDY, Batch
from processor.hub import resolve_model_path
from worker_svc.model_runner import ModelRunner, RunnerConfig


def kernel_table(runner: ModelRunner, batch: int, context: int, steps: int, out_dir: Path) -> dict:
    b = Batch(runner, batch, context, steps + 20, GREEDY)
    b.prefill()
    b.decode(10)
    wall_ms = b.decode(steps)
    from torch.profiler import ProfilerActivity, profile

    with profile(activities=[ProfilerActivity.CPU, ProfilerActivity.CUDA]) as prof:
        b.decode(steps)
    b.free()
    per_kernel: dict[str, list[float]] = defaultdict(lambda: [0.0, 0])
    total = 0.0
    for e in prof.events():
        if e.device_type == torch.autograd.DeviceType.CUDA:
            us = e.device_time
            per_kernel[e.name][0] += us
            per_kernel[e.name][1] += 1
            total += us
    rows = sorted(((n, t / steps, c / steps) for n, (t, c) in per_kernel.items()), key=lambda r: -r[1])
    prof.export_chrome_trace(str(out_dir / f"decode_b{batch}.json"))
    print(f"\n-- batch {batch}, context {context}: wall {wall_ms:.3f} ms/step, GPU kernels {total / steps / 1e3:.3f} "
          f"ms/step, {sum(c for _, _, c in rows):.0f} kernels/step")  # fmt: skip
    for name, us, count in rows[:18]:
        print(f"{us:9.1f} us {count:6.1f}x  {name[:110]}")
    return {"batch": batch, "wall_ms": wall_ms, "gpu_ms": total / steps / 1e3, "kernels": rows[:40]}


def gemm_bandwidth(runner: ModelRunner) -> list[dict]:
    from triton.testing import do_bench

    layer = runner.model.model.layers[0]
    weights = {
        "qkv_proj": layer.self_attn.qkv_proj.weight,
        "o_proj": layer.self_attn.o_proj.weight,
        "gate_up_proj": layer.mlp.gate_up_proj.weight,
        "down_proj": layer.mlp.down_proj.weight,
        "lm_head": runner.model.lm_head.weight,
    }
    out = []
    for m in (1, 64):
        for name, w in weights.items():
            x = torch.randn(m, w.shape[1], dtype=w.dtype, device=w.device)
            ms = do_bench(lambda x=x, w=w: torch.nn.functional.linear(x, w), warmup=20, rep=100)
            tb = w.numel() * w.element_size() / ms / 1e9
            out.append({"m": m, "gemm": name, "shape": list(w.shape), "ms": ms, "TB/s": tb})
            print(f"GEMM m={m:3d} {name:13s} {tuple(w.shape)}: {ms * 1e3:7.1f} us  {tb:.2f} TB/s")
    return out


def attention_sweep(runner: ModelRunner, cases: list[tuple[int, int]]) -> list[dict]:
    from triton.testing import do_bench

    from kernels.triton_attention import decode_attention, decode_num_splits

    text = runner.model_config.text
    hk, hq, d = text.num_key_value_heads, text.num_attention_heads, text.head_dim
    size = 16
    out = []
    for batch, context in cases:
        pages = batch * (-(-context // size)) + 1
        k = torch.randn(pages, size, hk, d, dtype=torch.bfloat16, device="cuda")
        v = torch.randn_like(k)
        table = torch.arange(1, pages, dtype=torch.int32, device="cuda").view(batch, -1)
        rows = torch.arange(batch, dtype=torch.int32, device="cuda")
        lens = torch.full((batch,), context, dtype=torch.int32, device="cuda")
        q = torch.randn(batch, hq, d, dtype=torch.bfloat16, device="cuda")
        o = torch.empty_like(q)
        floor_us = 2 * k.numel() * 2 / 3.0e12 * 1e6
        best = None
        default_splits = decode_num_splits(context, batch, hk, 132)

        def time_it(splits, block_n=64, warps=4, stages=2):
            nonlocal best
            try:
                ms = do_bench(
                    lambda: decode_attention(q, k, v, table, rows, lens, 0.088, o, num_splits=splits,
                                             block_n=block_n, num_warps=warps, num_stages=stages),
                    warmup=5, rep=25,
                )  # fmt: skip
            except Exception as e:  # noqa: BLE001 - a tile that does not fit
                print("skip", splits, block_n, warps, stages, type(e).__name__)
                return
            row = {"batch": batch, "context": context, "splits": splits, "block_n": block_n, "warps": warps,
                   "stages": stages, "us": ms * 1e3, "floor_us": floor_us}  # fmt: skip
            out.append(row)
            if best is None or row["us"] < best["us"]:
                best = row

        for splits in sorted(
            {1, 2, 4, 8, 16, 32, default_splits} if batch == 1 else {1, 2, 4, default_splits}
        ):
            time_it(splits)
        splits = best["splits"]
        for block_n, warps, stages in (
            (32, 4, 2),
            (128, 4, 2),
            (64, 2, 2),
            (64, 8, 2),
            (64, 4, 3),
            (64, 4, 1),
        ):
            time_it(splits, block_n, warps, stages)
        default = [r for r in out if r["batch"] == batch and r["context"] == context and r["splits"] ==
                   default_splits and r["block_n"] == 64 and r["warps"] == 4 and r["stages"] == 2]  # fmt: skip
        print(f"attention b={batch} ctx={context}: floor {floor_us:.1f} us, default "
              f"{default[0]['us'] if default else float('nan'):.1f} us ({default_splits} splits), best {best}")  # fmt: skip
    return out


def split_sweep(cases: list[tuple[int, int]], layers: int = 28) -> list[dict]:
    """Decode attention per split count and stage count, graph-replayed over `layers` layers' caches (so the KV
    comes from HBM as in a step, not from L2): us a layer call, 7B shapes (28 query / 4 KV heads, head_dim 128)."""
    from kernels.triton_attention import decode_attention, decode_num_splits

    hk, hq, d, size = 4, 28, 128, 16
    out = []
    for batch, ctx in cases:
        per = -(-ctx // size)
        pages = batch * per + 1
        k = torch.randn(layers, pages, size, hk, d, dtype=torch.bfloat16, device="cuda")
        v = torch.randn_like(k)
        table = (torch.randperm(pages - 1, device="cuda")[: batch * per] + 1).int().view(batch, per)
        rows = torch.arange(batch, dtype=torch.int32, device="cuda")
        lens = torch.full((batch,), ctx, dtype=torch.int32, device="cuda")
        q = torch.randn(batch, hq, d, dtype=torch.bfloat16, device="cuda")
        o = torch.empty_like(q)
        row = {"batch": batch, "context": ctx, "policy": decode_num_splits(ctx, batch, hk, 132)}
        for splits in (1, 2, 3, 4, 6):
            ws = torch.empty(batch, hq, splits, d + 1, dtype=torch.float32, device="cuda")
            for stages in (2, 3):

                def run(splits=splits, stages=stages, ws=ws):
                    for i in range(layers):
                        decode_attention(q, k[i], v[i], table, rows, lens, 0.088, o, num_splits=splits,
                                         workspace=ws, num_stages=stages)  # fmt: skip

                run()
                g = torch.cuda.CUDAGraph()
                with torch.cuda.graph(g):
                    run()
                for _ in range(3):
                    g.replay()
                a, b = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
                a.record()
                for _ in range(10):
                    g.replay()
                b.record()
                b.synchronize()
                row[f"{splits}/{stages}"] = a.elapsed_time(b) / 10 / layers * 1e3
        out.append(row)
        print("splits/stages, us a layer:", {key: round(val, 1) for key, val in row.items()}, flush=True)
    return out


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", default="Qwen/Qwen2.5-VL-7B-Instruct")
    p.add_argument("--backend", default="triton")
    p.add_argument("--batches", nargs="*", type=int, default=[1, 64])
    p.add_argument("--context", type=int, default=1024)
    p.add_argument("--steps", type=int, default=20)
    p.add_argument("--skip", nargs="*", default=[], help="parts to skip: kernels gemm attention")
    p.add_argument(
        "--attention-cases",
        default="1x1024,1x8192,64x1024,64x256,256x256",
        help="decode attention sweep: BATCHxCONTEXT, comma-separated",
    )
    p.add_argument(
        "--split-cases",
        default="",
        help="also time the decode attention per split and stage count, graph-replayed: BATCHxCONTEXT, comma-separated",
    )
    p.add_argument("--output-dir", default=".")
    args = p.parse_args()
    out_dir = Path(args.output_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    model = str(resolve_model_path(args.model, "dummy"))
    t0 = time.perf_counter()
    runner = ModelRunner(
        RunnerConfig(model_path=model, dtype="bfloat16", device="cuda", attention_backend=args.backend,
                     load_format="dummy", max_running_requests=max(args.batches), max_total_tokens=300_000),
        None,
    )  # fmt: skip
    runner.warmup()
    print(f"runner ready in {time.perf_counter() - t0:.1f} s", flush=True)
    report: dict = {}
    if "kernels" not in args.skip:
        report["kernels"] = [kernel_table(runner, b, args.context, args.steps, out_dir) for b in args.batches]
    if "gemm" not in args.skip:
        report["gemm"] = gemm_bandwidth(runner)
    if "attention" not in args.skip:
        cases = [tuple(int(v) for v in c.split("x")) for c in args.attention_cases.split(",")]
        report["attention"] = attention_sweep(runner, cases)
    if args.split_cases:
        cases = [tuple(int(v) for v in c.split("x")) for c in args.split_cases.split(",")]
        report["splits"] = split_sweep(cases)
    (out_dir / "profile_decode.json").write_text(json.dumps(report, indent=1))


if __name__ == "__main__":
    main()
