"""The vision path on one GPU: the tower (ours: reference attention, varlen flash, Triton, CUDA graphs) next to
Hugging Face transformers' tower, and the device half of the fast image processor, per image size.

    python -m benchmarks.bench_vision --model Qwen/Qwen2.5-VL-7B-Instruct --load-format dummy

Each figure is the median of CUDA-event timings after warm-up. Parity: every variant of ours against our torch
reference forward (the one the CPU tests prove equal to transformers) with the same weights. Prints a table last;
--output-json writes every figure.
"""

from __future__ import annotations

import argparse
import json
import statistics

import numpy as np
import torch

from kernels import vision as kv
from processor.hub import resolve_model_path
from vision_svc.encoder import EncoderConfig, VisionEncoder


def timed(fn, warmup: int, iters: int) -> float:
    """Median ms of fn() by CUDA events."""
    for _ in range(warmup):
        fn()
    torch.cuda.synchronize()
    times = []
    for _ in range(iters):
        a, b = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        a.record()
        fn()
        b.record()
        b.synchronize()
        times.append(a.elapsed_time(b))
    return statistics.median(times)


def rel_err(x: torch.Tensor, ref: torch.Tensor) -> float:
    return float((x.float() - ref.float()).norm() / ref.float().norm().clamp(min=1e-12))


def hf_tower(model_path: str, dtype: torch.dtype):
    from transformers import AutoConfig
    from transformers.models.qwen2_5_vl.modeling_qwen2_5_vl import Qwen2_5_VisionTransformerPretrainedModel

    cfg = AutoConfig.from_pretrained(model_path).vision_config
    cfg._attn_implementation = "sdpa"  # noqa: SLF001 - flash-attn is not installed; sdpa is HF's default here
    with torch.device("cuda"):
        model = Qwen2_5_VisionTransformerPretrainedModel._from_config(cfg, dtype=dtype)
    return model.eval()


def measure(enc: VisionEncoder, hf, case: list[tuple[int, int]], rng, iters: int) -> dict:
    """Every variant on one batch of images of the given sizes."""
    model, fast, spec, dtype = enc.model, enc.fast, enc.spec, enc.dtype
    imgs, grids = [], []
    for w, h in case:
        rw, rh = spec.resized_size(w, h)
        imgs.append(rng.integers(0, 256, (rh, rw, 3), dtype=np.uint8))
        grids.append(spec.image_grid(rw, rh))
    patches = sum(t * h * w for t, h, w in grids)
    label = f"{len(case)}x {case[0][0]}x{case[0][1]}" if len(case) > 1 else f"{case[0][0]}x{case[0][1]}"
    iters = iters if patches <= 4096 else max(5, iters // 2)
    still = fast.to_patches(imgs, "cuda", dtype)
    full = fast.to_patches_temporal(imgs, "cuda", dtype)
    model.set_attention_backend("torch_native")
    ref = model(full, grids)
    r = {"case": label, "patches": patches}
    r["preprocess_device_ms"] = timed(lambda: fast.to_patches(imgs, "cuda", dtype), 2, iters)
    r["ours_reference_ms"] = timed(lambda: model(full, grids), 2, iters)
    for backend in ("fa4", "varlen", "triton"):
        if backend == "fa4" and not kv.fa4_usable(still.device):
            continue
        try:
            model.set_attention_backend(backend)
            out = model(still, grids)
            r[f"ours_{backend}_ms"] = timed(lambda: model(still, grids), 2, iters)
            r[f"ours_{backend}_rel_err"] = rel_err(out, ref)
        except Exception as e:  # noqa: BLE001 - report and go on
            r[f"ours_{backend}_error"] = f"{type(e).__name__}: {e}"[:300]
    model.set_attention_backend(enc.attention_backend)
    if enc.graphs is not None:
        out = enc.graphs.run(still, grids)
        r["graph_bucket"] = enc.graphs.bucket_for(patches, len(grids), enc.graphs.in_features)
        r["ours_served_ms"] = timed(lambda: enc.graphs.run(still, grids), 2, iters)
        r["ours_served_rel_err"] = rel_err(out, ref)
    r["ours_encoder_forward_ms"] = timed(lambda: enc.forward(imgs, grids), 2, iters)
    if hf is not None:
        grid_thw = torch.tensor(grids, device="cuda")
        r["hf_ms"] = timed(lambda: hf(full, grid_thw=grid_thw), 2, iters)
    return r


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", default="Qwen/Qwen2.5-VL-7B-Instruct")
    ap.add_argument("--load-format", default="dummy")
    ap.add_argument("--sizes", default="448x448,1092x1932", help="image sizes WxH, comma-separated")
    ap.add_argument(
        "--batch", type=int, default=4, help="also time this many images of the first size at once"
    )
    ap.add_argument("--iters", type=int, default=20)
    ap.add_argument("--skip-hf", action="store_true")
    ap.add_argument(
        "--vision-attention-backend",
        default="auto",
        help="the served (graph) path's backend, as the vision service's flag",
    )
    ap.add_argument("--output-json", default="")
    args = ap.parse_args()
    path = str(resolve_model_path(args.model, args.load_format))
    dtype = torch.bfloat16
    enc = VisionEncoder(
        EncoderConfig(
            path,
            "bfloat16",
            "cuda",
            1 << 28,
            load_format=args.load_format,
            attention_backend=args.vision_attention_backend,
        )
    )
    hf = None if args.skip_hf else hf_tower(path, dtype)
    rows = []
    rng = np.random.default_rng(0)
    cases = [tuple(int(v) for v in s.split("x")) for s in args.sizes.split(",")]
    cases = [[c] for c in cases] + [[cases[0]] * args.batch]
    with torch.inference_mode():
        for case in cases:
            r = measure(enc, hf, case, rng, args.iters)
            rows.append(r)
            print(json.dumps(r), flush=True)
    print(f"\n{'case':>16} {'patches':>7} {'HF':>8} {'ref':>8} {'fa4':>8} {'varlen':>8} {'triton':>8} {'served':>8} "
          f"{'+preproc':>8} {'vs HF':>6}  rel err (served)")  # fmt: skip
    for r in rows:
        served = r.get("ours_encoder_forward_ms")
        ratio = r["hf_ms"] / served if "hf_ms" in r and served else float("nan")

        def f(key: str, r: dict = r) -> str:
            return f"{r[key]:8.2f}" if key in r else f"{'-':>8}"

        print(
            f"{r['case']:>16} {r['patches']:>7} {f('hf_ms')} {f('ours_reference_ms')} {f('ours_fa4_ms')} "
            f"{f('ours_varlen_ms')} "
            f"{f('ours_triton_ms')} {f('ours_served_ms')} {f('ours_encoder_forward_ms')} {ratio:6.2f}  "
            f"{r.get('ours_served_rel_err', float('nan')):.2e}"
        )
    print(f"attention backend served: {enc.attention_backend}; graphs: {enc.graphs is not None}; "
          f"{torch.cuda.get_device_name()}")  # fmt: skip
    if args.output_json:
        with open(args.output_json, "w") as fh:
            json.dump({"rows": rows, "device": torch.cuda.get_device_name()}, fh, indent=1)


if __name__ == "__main__":
    main()
