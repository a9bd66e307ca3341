"""Image preprocessing on the CPU: JPEG bytes -> what leaves the host, for Qwen2.5-VL's processor settings.

(a) transformers' Qwen2VLImageProcessorPil from bytes (PIL open + processor), (b) our exact path (decode_image +
Qwen2VLImagePreprocessor), (c) the fast host half (FastQwen2VLImagePreprocessor.load: bytes -> uint8 pixels) and
(d) the fast device half (to_patches) run on the CPU for reference (on a GPU it runs there). Photo-like JPEGs
(matplotlib's grace_hopper.jpg, scaled, with film-grain texture and sensor noise) at quality 90. Medians of warm
runs in one process, the paths taking turns; the CPU time beside each wall time is less skewed by other work on
the machine (the load average is printed).

    python -m benchmarks.bench_preprocess [--sizes 448x448,1920x1080,4000x3000] [--repeats 9]
"""

from __future__ import annotations

import argparse
import io
import os
import statistics
import sys
import time
import warnings
from collections.abc import Callable
from dataclasses import dataclass, replace
from pathlib import Path

import numpy as np
import torch
from PIL import Image

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))

from mirador.default_model import bundled_model_dir  # noqa: E402
from models.qwen2_vl_image import FastQwen2VLImagePreprocessor, Qwen2VLImagePreprocessor  # noqa: E402
from processor.media import decode_image  # noqa: E402
from processor.models.qwen2_vl import Qwen2VLMediaSpec  # noqa: E402

DEFAULT_SIZES = "448x448,1920x1080,4000x3000"
TARGET_MS = {(448, 448): 3.0, (1920, 1080): 40.0, (4000, 3000): 350.0}  # for (c) on the 2-core dev VM


def photo_jpeg(width: int, height: int, quality: int = 90, seed: int = 0) -> bytes:
    """A deterministic photo-like JPEG: a real photo scaled to cover the frame, plus texture at several scales
    and per-pixel noise, so the codec sees the detail a camera image has (not a smooth upscale)."""
    import matplotlib

    base = Image.open(Path(matplotlib.get_data_path()) / "sample_data" / "grace_hopper.jpg").convert("RGB")
    scale = max(width / base.width, height / base.height)
    cover = (max(width, round(base.width * scale)), max(height, round(base.height * scale)))
    left, top = (cover[0] - width) // 2, (cover[1] - height) // 2
    img = base.resize(cover, Image.Resampling.BICUBIC).crop((left, top, left + width, top + height))
    rng = np.random.default_rng(seed)
    texture = np.zeros((height, width), np.float32)
    for cell, amplitude in ((64, 10.0), (16, 8.0), (4, 8.0), (2, 6.0)):  # about 2 bits a pixel at q90
        small = rng.normal(0.0, amplitude, (height // cell + 2, width // cell + 2)).astype(np.float32)
        texture += np.asarray(Image.fromarray(small, "F").resize((width, height), Image.Resampling.BICUBIC))
    pixels = np.asarray(img, np.float32) + texture[..., None] + rng.normal(0.0, 3.0, (height, width, 3))
    buf = io.BytesIO()
    Image.fromarray(np.clip(pixels, 0, 255).astype(np.uint8)).save(buf, "JPEG", quality=quality)
    return buf.getvalue()


@dataclass(frozen=True)
class Timing:
    wall_ms: float  # median wall time
    cpu_ms: float  # median CPU time of the process (all its threads), which other tenants of the machine skew less

    def __str__(self) -> str:
        return f"{self.wall_ms:.1f} ({self.cpu_ms:.1f})"


def measure(paths: dict[str, tuple[Callable[[], object], int]], warmup: int = 2) -> dict[str, Timing]:
    """name -> (call, runs): the paths take turns run by run, so whatever else the machine does falls on all of
    them alike."""
    for fn, runs in paths.values():
        for _ in range(min(warmup, runs)):
            fn()
    wall: dict[str, list[float]] = {name: [] for name in paths}
    cpu: dict[str, list[float]] = {name: [] for name in paths}
    for i in range(max(runs for _, runs in paths.values())):
        for name, (fn, runs) in paths.items():
            if i < runs:
                t0, c0 = time.perf_counter(), time.process_time()
                fn()
                wall[name].append(time.perf_counter() - t0)
                cpu[name].append(time.process_time() - c0)
    return {n: Timing(statistics.median(wall[n]) * 1e3, statistics.median(cpu[n]) * 1e3) for n in paths}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--sizes", default=DEFAULT_SIZES, help="comma-separated WxH source sizes")
    ap.add_argument(
        "--repeats", type=int, default=9, help="timed runs per path and size (after 2 warm-up runs)"
    )
    ap.add_argument("--hf-repeats", type=int, default=3, help="timed runs of (a), the slowest path")
    ap.add_argument("--quality", type=int, default=90, help="JPEG quality of the generated photos")
    ap.add_argument(
        "--model",
        default="Qwen/Qwen2.5-VL-7B-Instruct",
        help="a bundled Hub id or a model directory: its preprocessor_config.json gives the settings",
    )
    ap.add_argument(
        "--pillow-blocks-max",
        type=int,
        default=0,
        help="freed Pillow image blocks (16 MiB each) kept for reuse, as PILLOW_BLOCKS_MAX (0: Pillow's default)",
    )
    ap.add_argument("--max-pixels", type=int, default=0, help="override the config's max_pixels (0: keep it)")
    ap.add_argument("--skip-hf", action="store_true", help="leave out (a)")
    args = ap.parse_args()

    if args.pillow_blocks_max:
        Image.core.set_blocks_max(args.pillow_blocks_max)
    model_dir = bundled_model_dir(args.model) or Path(args.model)
    spec = Qwen2VLMediaSpec.from_model_dir(model_dir)
    if args.max_pixels:
        spec = replace(spec, max_pixels=args.max_pixels)
    exact, fast = Qwen2VLImagePreprocessor(spec), FastQwen2VLImagePreprocessor(spec)
    deferred = FastQwen2VLImagePreprocessor(spec, defer_resize=True)  # what the vision service does on a GPU
    hf = None
    if not args.skip_hf:
        from transformers.models.qwen2_vl.image_processing_pil_qwen2_vl import Qwen2VLImageProcessorPil

        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            hf = Qwen2VLImageProcessorPil.from_pretrained(str(model_dir), max_pixels=spec.max_pixels)
    print(
        f"settings from {model_dir}: min_pixels {spec.min_pixels}, max_pixels {spec.max_pixels}, patch "
        f"{spec.patch_size}, merge {spec.merge_size}, temporal {spec.temporal_patch_size}; Pillow "
        f"{Image.__version__}, blocks_max {Image.core.get_blocks_max()}; torch threads {torch.get_num_threads()}"
    )
    load_before = os.getloadavg()[0]

    rows = []
    for size in args.sizes.split(","):
        w, h = (int(v) for v in size.lower().split("x"))
        data = photo_jpeg(w, h, args.quality)
        host = fast.load(data)
        ref, grid = exact(decode_image(data).image)
        ours = fast.to_patches_temporal([host.pixels], "cpu").numpy()
        if ours.shape != ref.shape or host.grid != grid:
            raise SystemExit(
                f"{size}: fast path shape {ours.shape} / grid {host.grid} != {ref.shape} / {grid}"
            )
        err = float(np.abs(ours - ref).max())
        paths = {
            "exact": (lambda d=data: exact(decode_image(d).image), args.repeats),
            "host": (lambda d=data: fast.load(d), args.repeats),
            "host_gpu": (lambda d=data: deferred.load(d), args.repeats),
            "device": (lambda p=host.pixels: fast.to_patches([p], "cpu"), args.repeats),
        }
        if hf is not None:
            paths["hf"] = (
                lambda d=data: hf(images=[Image.open(io.BytesIO(d))], return_tensors="np"),
                args.hf_repeats,
            )
        rows.append((w, h, len(data), host, ref.nbytes, err, measure(paths)))
    load_after = os.getloadavg()[0]

    print("\nms per image, median wall time (median CPU time of the process in brackets)\n")
    print(
        "| source | JPEG | resized | tokens | (a) HF | (b) exact | (c) fast host | (c') fast host, resize on the "
        "GPU | (d) device half on CPU | a/c | b/c | bytes out (a), (b) | bytes out (c) | max abs diff c+d vs b |"
    )
    print("| --- " * 14 + "|")
    for w, h, nbytes, host, ref_bytes, err, t in rows:
        rh, rw = host.pixels.shape[:2]
        draft = f" (draft 1/{host.draft_scale})" if host.draft_scale > 1 else ""
        target = TARGET_MS.get((w, h)) if not args.max_pixels else None
        hf, host_wall = t.get("hf"), t["host"].wall_ms
        a_c = f"{hf.wall_ms / host_wall:.1f}x" if hf else "-"
        print(
            f"| {w}x{h} | {nbytes / 1e6:.2f} MB | {rw}x{rh}{draft} | {host.num_tokens} | {hf or '-'} | "
            f"{t['exact']} | {t['host']}{f' (target {target:g})' if target else ''} | {t['host_gpu']} | {t['device']} | "
            f"{a_c} | {t['exact'].wall_ms / host_wall:.1f}x | {ref_bytes / 1e6:.1f} MB | "
            f"{host.pixels.nbytes / 1e6:.1f} MB ({ref_bytes / host.pixels.nbytes:.0f}x less) | {err:.1e} |"
        )
    print(
        f"\n1-minute load average {load_before:.2f} before, {load_after:.2f} after "
        f"(on {os.cpu_count()} CPUs; anything else running skews the figures)"
    )


if __name__ == "__main__":
    main()
