"""Kernel-level profile of the vision tower on one GPU: where a forward's device time goes, per kernel.

    python -m benchmarks.profile_vision --sizes 448x448,1092x1932,448x448*4 --output-dir /tmp/prof

A size WxH*N profiles one batch of N such images (the vision service batches up to four 448x448 images).

Prints, per image size, the top kernels by CUDA time (torch.profiler), the gaps between kernels on the timeline
(and how much of them the host caused by launching the next kernel after the device had drained), and writes a
Chrome trace per size.
"""

from __future__ import annotations

import argparse
import json
import tempfile
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from torch.profiler import ProfilerActivity, profile

from processor.hub import resolve_model_path
from vision_svc.encoder import EncoderConfig, VisionEncoder


def attention_micro(n: int, heads: int = 16, head_dim: int = 80, window: int = 64) -> None:
    """One layer's attention at the tower's shapes: flash varlen against dense SDPA per backend, for one full
    segment of n patches and for n / window windows."""
    from torch.nn.attention import SDPBackend, sdpa_kernel
    from torch.nn.attention.varlen import varlen_attn

    def ms(fn) -> float:
        for _ in range(3):
            fn()
        torch.cuda.synchronize()
        a, b = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        a.record()
        for _ in range(10):
            fn()
        b.record()
        b.synchronize()
        return a.elapsed_time(b) / 10

    q, k, v = (torch.randn(n, heads, head_dim, device="cuda", dtype=torch.bfloat16) for _ in range(3))
    for name, seg in (("full", n), ("windows", window)):
        m = n // seg * seg
        cu = torch.arange(0, m + 1, seg, device="cuda", dtype=torch.int32)
        row = {"varlen": ms(lambda cu=cu, seg=seg, m=m: varlen_attn(q[:m], k[:m], v[:m], cu, cu, seg, seg))}
        dense = [x[:m].view(m // seg, seg, heads, head_dim).transpose(1, 2) for x in (q, k, v)]
        for backend in (
            SDPBackend.CUDNN_ATTENTION,
            SDPBackend.FLASH_ATTENTION,
            SDPBackend.EFFICIENT_ATTENTION,
        ):
            try:
                with sdpa_kernel([backend]):
                    row[backend.name] = ms(lambda d=dense: F.scaled_dot_product_attention(*d))
            except Exception as e:  # noqa: BLE001
                row[backend.name] = f"{type(e).__name__}"
        print(
            f"attention {name} ({m} rows, segments of {seg}):",
            {name_: t if isinstance(t, str) else round(t, 3) for name_, t in row.items()},
        )


def timeline_gaps(trace_path: str, top: int = 8) -> None:
    """Idle time between consecutive device operations of a Chrome trace, by the pair of kernels around it, and the
    part where the next launch reached the driver only after the previous kernel had ended (the host was late)."""
    events = json.loads(Path(trace_path).read_text())["traceEvents"]
    ops = sorted(
        (e for e in events if e.get("cat") in ("kernel", "gpu_memcpy", "gpu_memset")), key=lambda e: e["ts"]
    )
    launches = {
        e["args"].get("correlation"): e for e in events if e.get("cat") == "cuda_runtime" and "args" in e
    }
    if len(ops) < 2:
        return
    total = late = 0.0
    pairs: dict[tuple[str, str], list[float]] = {}
    for a, b in zip(ops, ops[1:], strict=False):
        gap = max(0.0, b["ts"] - (a["ts"] + a["dur"]))
        launch = launches.get(b.get("args", {}).get("correlation"))
        if launch is not None:  # the launch call returned after the device went idle: the host was late
            late += min(gap, max(0.0, launch["ts"] + launch["dur"] - (a["ts"] + a["dur"])))
        total += gap
        pair = pairs.setdefault((a["name"][:34], b["name"][:34]), [0, 0.0])
        pair[0] += 1
        pair[1] += gap
    span = (ops[-1]["ts"] + ops[-1]["dur"] - ops[0]["ts"]) / 1e3
    print(
        f"timeline: {len(ops)} device operations over {span:.2f} ms; gaps {total / 1e3:.2f} ms, "
        f"of which the host launched late {late / 1e3:.2f} ms"
    )
    for (a, b), (n, t) in sorted(pairs.items(), key=lambda kv: -kv[1][1])[:top]:
        print(f"  {t / 1e3:7.3f} ms over {n:4d} gaps  {a} -> {b}")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", default="Qwen/Qwen2.5-VL-7B-Instruct")
    ap.add_argument("--load-format", default="dummy")
    ap.add_argument("--sizes", default="448x448,1092x1932")
    ap.add_argument("--backend", default="auto", help="vision attention backend")
    ap.add_argument("--top", type=int, default=22)
    ap.add_argument("--output-dir", default="")
    ap.add_argument(
        "--attention-micro", type=int, default=10764, help="patches of the attention microbench (0: skip)"
    )
    args = ap.parse_args()
    path = str(resolve_model_path(args.model, args.load_format))
    cfg = EncoderConfig(
        path, "bfloat16", "cuda", 1 << 28, load_format=args.load_format, cuda_graph=False, warmup=False
    )
    enc = VisionEncoder(cfg)
    enc.model.set_attention_backend(args.backend)
    if args.attention_micro:
        attention_micro(args.attention_micro)
    rng = np.random.default_rng(0)
    for size in args.sizes.split(","):
        dims, _, count = size.partition("*")
        w, h = (int(v) for v in dims.split("x"))
        rw, rh = enc.spec.resized_size(w, h)
        imgs = [rng.integers(0, 256, (rh, rw, 3), dtype=np.uint8) for _ in range(int(count or 1))]
        grids = [enc.spec.image_grid(rw, rh)] * len(imgs)
        with torch.inference_mode():
            for _ in range(3):
                enc.forward(imgs, grids)
            torch.cuda.synchronize()
            with profile(activities=[ProfilerActivity.CPU, ProfilerActivity.CUDA]) as prof:
                enc.forward(imgs, grids)
                torch.cuda.synchronize()
        table = prof.key_averages().table(
            sort_by="cuda_time_total", row_limit=args.top, max_name_column_width=70
        )
        total = sum(e.device_time_total for e in prof.key_averages() if e.device_type.name == "CUDA") / 1e3
        print(f"==== {size} ({grids[0]}): {total:.2f} ms of kernels ====")
        print(table)
        out_dir = Path(args.output_dir or tempfile.mkdtemp(prefix="mirador-profile-"))
        out_dir.mkdir(parents=True, exist_ok=True)
        trace = out_dir / f"vision_{size.replace('*', 'x')}.json"
        prof.export_chrome_trace(str(trace))
        timeline_gaps(str(trace))


if __name__ == "__main__":
    main()
