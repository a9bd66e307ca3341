"""CPU serving benchmark: 32 concurrent clients against the Mirador cluster vs the same requests through
Hugging Face transformers' generate, one by one, on the same machine in one run.

The model is a dummy-weight Qwen2.5-VL of about 100M parameters (built offline), big enough that compute, not
Python overhead, dominates. Every request generates exactly --max-tokens tokens (ignore_eos / min_new_tokens), so
both sides produce the same number of tokens; greedy outputs are compared as a sanity check.

    python -m benchmarks.bench_cpu_serving [--clients 32] [--max-tokens 64] [--hf-requests 32]
"""

from __future__ import annotations

import argparse
import json
import math
import os
import sys
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))

from mirador.default_model import cache_root, config_with, ensure_model  # noqa: E402
from tests.helpers import SERVED, Cluster, HFReference, data_uri, noise_image, png_bytes  # noqa: E402

BENCH_CONFIG = config_with(
    hidden_size=512,
    intermediate_size=1536,
    num_hidden_layers=6,
    num_attention_heads=8,
    num_key_value_heads=4,
    tie_word_embeddings=True,
    rope_scaling={"type": "mrope", "mrope_section": [8, 12, 12]},
    vision_depth=2,
    vision_hidden_size=64,
    vision_num_heads=2,
    vision_intermediate_size=128,
    vision_out_hidden_size=512,
    vision_fullatt_block_indexes=[1],
)


def count_params(model_dir: Path) -> int:
    from safetensors import safe_open

    with safe_open(str(model_dir / "model.safetensors"), framework="pt") as f:
        return sum(math.prod(f.get_slice(k).get_shape()) for k in f.keys())  # noqa: SIM118 - not a dict


def requests(n: int) -> list[tuple[list[dict], list[dict], list]]:
    """(OpenAI messages, HF messages, images): a shared system prompt, varied questions, an image in every 4th."""
    system = {"role": "system", "content": "You are a helpful assistant. Answer precisely and completely."}
    out = []
    for k in range(n):
        text = f"Request {k}: explain topic number {k * 7 % 31} " + "in more depth " * (k % 5 + 2)
        if k % 4 == 3:
            img = noise_image(112, 112, k)
            ours = [
                system,
                {
                    "role": "user",
                    "content": [
                        {"type": "image_url", "image_url": {"url": data_uri(png_bytes(img))}},
                        {"type": "text", "text": text},
                    ],
                },
            ]
            ref = [system, {"role": "user", "content": [{"type": "image"}, {"type": "text", "text": text}]}]
            out.append((ours, ref, [img]))
        else:
            m = [system, {"role": "user", "content": text}]
            out.append((m, m, []))
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--clients", type=int, default=32)
    ap.add_argument("--max-tokens", type=int, default=64)
    ap.add_argument(
        "--hf-requests",
        type=int,
        default=None,
        help="HF runs on this many of the requests (default all) and is scaled to all",
    )
    ap.add_argument("--json", type=Path, default=None, help="also write the figures here")
    args = ap.parse_args()

    model_dir = ensure_model(cache_root() / "models", "qwen2.5-vl-bench-100m", BENCH_CONFIG, seed=3)
    n_params = count_params(model_dir)
    reqs = requests(args.clients)
    log_dir = Path(os.environ.get("TMPDIR", "/tmp"))
    print(
        f"model: {model_dir.name}, {n_params / 1e6:.0f}M parameters; {args.clients} requests x "
        f"{args.max_tokens} tokens; torch threads: {os.cpu_count()} cores",
        flush=True,
    )

    cluster = Cluster(model_dir, "--max-running-requests", str(args.clients), log_dir=log_dir, name="bench")
    try:

        def one(m):
            r = cluster.http.post(
                "/v1/chat/completions",
                json={
                    "model": SERVED,
                    "messages": m,
                    "max_tokens": args.max_tokens,
                    "temperature": 0,
                    "ignore_eos": True,
                    "return_token_ids": True,
                },
                timeout=3600,
            )
            r.raise_for_status()
            return r.json()

        one(reqs[0][0])  # warm-up (not timed)
        t0 = time.perf_counter()
        with ThreadPoolExecutor(args.clients) as pool:
            results = list(pool.map(one, [r[0] for r in reqs]))
        cluster_s = time.perf_counter() - t0
        stats = cluster.stats()
    finally:
        cluster.stop()
    ours = [r["choices"][0]["token_ids"] for r in results]
    n_tokens = sum(len(t) for t in ours)

    hf = HFReference(model_dir)
    n_hf = args.hf_requests or args.clients
    hf.generate(reqs[0][1], reqs[0][2], 2)  # warm-up
    t0 = time.perf_counter()
    same = 0
    for k in range(n_hf):
        _, ref = hf.generate(reqs[k][1], reqs[k][2], args.max_tokens, min_new_tokens=args.max_tokens)
        same += ref == ours[k]
    hf_s = (time.perf_counter() - t0) * args.clients / n_hf

    per_step_sched_us = stats.scheduler_ns_total / max(1, stats.num_steps) / 1e3
    hidden_us = stats.scheduler_ns_overlapped / max(1, stats.num_steps) / 1e3
    off_path_us = stats.scheduler_ns_off_path / max(1, stats.num_steps) / 1e3
    figures = {
        "params_m": round(n_params / 1e6, 1),
        "clients": args.clients,
        "max_tokens": args.max_tokens,
        "cluster_s": round(cluster_s, 2),
        "cluster_tok_s": round(n_tokens / cluster_s, 1),
        "hf_s": round(hf_s, 2),
        "hf_tok_s": round(n_tokens / hf_s, 1),
        "speedup": round(hf_s / cluster_s, 2),
        "greedy_equal": f"{same}/{n_hf}",
        "steps": stats.num_steps,
        "scheduler_us_per_step": round(per_step_sched_us, 1),
        "scheduler_us_in_worker_compute": round(hidden_us, 1),
        "scheduler_us_off_critical_path": round(off_path_us, 1),
        "steps_overlapped": stats.steps_overlapped,
        "prefix_cache_hit_tokens": stats.prefix_cache_hit_tokens,
    }
    print("\n" + "\n".join(f"{k:>32}: {v}" for k, v in figures.items()))
    print(
        f"\nMirador {figures['cluster_tok_s']} tok/s vs HF generate one by one {figures['hf_tok_s']} tok/s: "
        f"{figures['speedup']}x"
    )
    if args.json:
        args.json.write_text(json.dumps(figures, indent=2))


if __name__ == "__main__":
    main()
