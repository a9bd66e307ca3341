"""Parses the flags, builds the workload, runs one backend and reports (table, JSON, plot)."""

from __future__ import annotations

import argparse
import asyncio
import dataclasses
import subprocess
import sys
from collections.abc import Sequence
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

from mirador.bench.args import BenchArgs

DESCRIPTION = """\
Benchmark a running Mirador gateway (or any OpenAI-compatible server) with concurrent streaming requests, as
SGLang's bench_serving does, or run the same workload through Hugging Face transformers (--backend hf).

Every request generates exactly its output length (ignore_eos, min_tokens = max_tokens, greedy). Text requests go
to /v1/completions as token ids, so their input length is exact; image requests go to /v1/chat/completions (chat
template + image tokens + the text), and their token counts are read from the server's usage.
"""

EPILOG = """\
figures (ms; mean, p50, p90, p99, std, max over successful requests):
  TTFT   time from sending a request to its first chunk with text (hf: from the start of its batch's
         input building to the first step's logits)
  TPOT   per request, (e2e - TTFT) / (output tokens - 1)
  ITL    gaps between consecutive chunks with text; a gap is split evenly over the chunk's tokens when the
         server reports per-chunk usage, else recorded once (hf: every decode step)
  E2E    time from sending a request to the end of its stream
  concurrency = sum of E2E latencies / duration (the load actually reached)

examples:
  mirador bench --num-prompts 64 --max-concurrency 64 --random-input-len 128 --random-output-len 128
  mirador bench --num-prompts 32 --num-images 1 --image-size 1024x768 --request-rate 4 --output-json r.json
  mirador bench --backend hf --model-path /models/Qwen2.5-VL-7B-Instruct --hf-batch-size 8 --num-prompts 32
"""


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="mirador bench",
        description=DESCRIPTION,
        epilog=EPILOG,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    BenchArgs.add_cli_args(parser)
    ns = parser.parse_args(list(sys.argv[1:] if argv is None else argv))
    try:
        args = BenchArgs.from_cli_args(ns)
    except ValueError as e:
        parser.error(str(e))
    return run(args)


def run(args: BenchArgs) -> int:
    from mirador.bench.report import format_table, plot, server_summary, summarize, write_json
    from mirador.bench.workload import build_workload
    from processor.tokenizer import Tokenizer

    model, served_dir, server_info = args.model, None, None
    if args.backend == "mirador":
        listing = _get(args.base_url, "/v1/models")
        if not listing or not listing.get("data"):
            print(
                f"mirador bench: no model list at {args.base_url}/v1/models; is the server up?",
                file=sys.stderr,
            )
            return 2
        model = model or listing["data"][0]["id"]
        served_dir = next((m.get("root") for m in listing["data"] if m.get("id") == model), None)
        server_info = _get(args.base_url, "/server_info")
    tokenizer_dir = _tokenizer_dir(args, served_dir)
    tokenizer = Tokenizer(tokenizer_dir)
    requests = build_workload(args, tokenizer, args.num_prompts, stream=0)
    warmup = build_workload(args, tokenizer, args.warmup_requests, stream=1)
    hf_info, server_after, stats_before = None, None, None
    if args.backend == "mirador":
        from mirador.bench.client import run_server_processes

        results, duration, stats_before = run_server_processes(args, model, requests, warmup)
        server_after = _get(args.base_url, "/server_info")
    else:
        from mirador.bench.hf import run_hf

        model = model or Path(args.model_path).name
        results, duration, hf_info = run_hf(args, requests, warmup)
    report: dict[str, Any] = {
        "backend": args.backend,
        "model": model,
        "client_processes": args.client_processes if args.backend == "mirador" else 1,
        "date": datetime.now(timezone.utc).isoformat(timespec="seconds"),
        "commit": _commit(),
        **summarize(results, duration),
        "config": dataclasses.asdict(args),
        "tokenizer": str(tokenizer_dir),
        "hf": hf_info,
        "server_info": server_info,
        "server_stats_before": stats_before,
        "server_stats_after": (server_after or {}).get("stats"),
        "server": server_summary(stats_before, (server_after or {}).get("stats"), duration),
        "requests": [r.to_json(args.output_details) for r in results],
    }
    print(format_table(report), flush=True)
    if args.output_json:
        write_json(args.output_json, report)
    if args.plot:
        why_not = plot(args.plot, results, f"{args.backend} · {model} · {args.dataset}")
        if why_not:
            print(f"mirador bench: {why_not}", file=sys.stderr)
    return 0 if report["completed"] else 1


def _get(base_url: str, path: str) -> dict[str, Any] | None:
    from mirador.bench.client import fetch_json

    return asyncio.run(fetch_json(base_url, path))


def _tokenizer_dir(args: BenchArgs, served_dir: str | None) -> Path:
    """--tokenizer, else --model-path, else the served model's directory when it is on this machine, else the
    embedded default model's (the Qwen2.5-VL tokenizer)."""
    for candidate in (args.tokenizer, args.model_path, served_dir):
        if candidate and (Path(candidate) / "tokenizer.json").is_file():
            return Path(candidate)
    if args.tokenizer:
        raise SystemExit(f"mirador bench: {args.tokenizer}/tokenizer.json not found")
    from mirador.default_model import default_model_dir

    print(
        "mirador bench: the served model's directory is not on this machine; prompts use the embedded "
        "default model's tokenizer (Qwen2.5-VL's); pass --tokenizer for another",
        file=sys.stderr,
    )
    return default_model_dir()


def _commit() -> str | None:
    try:
        out = subprocess.run(
            ["git", "rev-parse", "--short", "HEAD"],
            cwd=Path(__file__).resolve().parent,
            capture_output=True,
            text=True,
            timeout=5,
        )
    except (OSError, subprocess.SubprocessError):
        return None
    return out.stdout.strip() or None
