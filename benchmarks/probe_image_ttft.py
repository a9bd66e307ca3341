"""Where an image request's time to first token goes, in process (no gRPC): the in-process engine with timers on
each stage (request building, host preprocessing, the encoder batch, the embedding pull, the worker's steps).

    python -m benchmarks.probe_image_ttft --model Qwen/Qwen2.5-VL-7B-Instruct --load-format dummy

Prints the median TTFT of image and text requests one at a time, and the median time of each stage per request.
"""

from __future__ import annotations

import argparse
import base64
import io
import statistics
import time
from collections import defaultdict

import numpy as np
from PIL import Image

from mirador.engine import Engine
from processor.hub import resolve_model_path

STAGES: dict[str, list[float]] = defaultdict(list)


def timed(obj, name: str, label: str) -> None:
    fn = getattr(obj, name)

    def wrapper(*a, **kw):
        t0 = time.perf_counter()
        try:
            return fn(*a, **kw)
        finally:
            STAGES[label].append((time.perf_counter() - t0) * 1e3)

    setattr(obj, name, wrapper)


def atimed(obj, name: str, label: str) -> None:
    fn = getattr(obj, name)

    async def wrapper(*a, **kw):
        t0 = time.perf_counter()
        try:
            return await fn(*a, **kw)
        finally:
            STAGES[label].append((time.perf_counter() - t0) * 1e3)

    setattr(obj, name, wrapper)


def jpeg_uri(seed: int, size: int = 448) -> str:
    rng = np.random.default_rng(seed)
    base = rng.integers(0, 256, (size // 16, size // 16, 3), dtype=np.uint8)
    img = Image.fromarray(base).resize((size, size), Image.Resampling.BICUBIC)
    buf = io.BytesIO()
    img.save(buf, format="JPEG", quality=90)
    return "data:image/jpeg;base64," + base64.b64encode(buf.getvalue()).decode()


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", default="Qwen/Qwen2.5-VL-7B-Instruct")
    ap.add_argument("--load-format", default="dummy")
    ap.add_argument("--requests", type=int, default=12)
    args = ap.parse_args()
    path = str(resolve_model_path(args.model, args.load_format))
    engine = Engine(path, load_format=args.load_format, dtype="bfloat16")
    enc, runner = engine.encoder, engine.runner
    timed(enc, "prepare", "vision host prepare")
    timed(enc, "run_batch", "vision batch (device preprocess + tower + pool put)")
    timed(runner.embeddings.source, "fetch", "embedding pull")
    timed(runner, "launch", "worker launch")
    timed(runner, "collect", "worker collect")
    atimed(engine.builder, "from_messages", "request building")
    sp = {"max_new_tokens": 1, "temperature": 0}
    words = "describe the picture in a few words please and be brief about it ok"
    results = {}
    for kind in ("image", "text"):
        ttfts = []
        for i in range(args.requests + 2):
            content = [{"type": "text", "text": words}]
            if kind == "image":
                content.insert(0, {"type": "image_url", "image_url": {"url": jpeg_uri(i + 100)}})
            if i == 2:
                STAGES.clear()
            t0 = time.perf_counter()
            engine.chat([{"role": "user", "content": content}], sp)
            if i >= 2:
                ttfts.append((time.perf_counter() - t0) * 1e3)
        results[kind] = statistics.median(ttfts)
        print(f"{kind}: median TTFT {results[kind]:.1f} ms over {len(ttfts)} (in process)")
        for label, xs in STAGES.items():
            print(f"   {label:55s} n={len(xs):3d} median {statistics.median(xs):7.2f} ms  sum/request "
                  f"{sum(xs) / len(ttfts):7.2f} ms")  # fmt: skip
    engine.shutdown()


if __name__ == "__main__":
    main()
