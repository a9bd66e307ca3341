"""Per-request results -> throughput and latency figures, printed as SGLang's bench_serving prints them, written
as JSON, and drawn as a PNG (TTFT and ITL distributions, per-request timelines)."""

from __future__ import annotations

import json
import math
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

STATS = ("mean", "p50", "p90", "p99", "std", "max")
METRICS = {  # JSON name -> title in the table
    "ttft": "Time to First Token",
    "tpot": "Time per Output Token (excl. 1st token)",
    "itl": "Inter-Token Latency",
    "e2e_latency": "End-to-End Latency",
}
MAX_ERRORS = 10


@dataclass
class RequestResult:
    index: int
    num_images: int
    expected_output_tokens: int
    success: bool = False
    error: str = ""
    start_s: float = 0.0  # when the request was sent (hf: when its batch began), after the timed run began
    ttft_s: float = 0.0
    e2e_s: float = 0.0
    input_tokens: int = 0
    output_tokens: int = 0
    num_chunks: int = 0  # content-carrying stream chunks (hf: decode steps it took part in)
    itls_s: list[float] = field(default_factory=list)

    @property
    def tpot_s(self) -> float | None:
        """Decode time per token after the first: (e2e - ttft) / (output_tokens - 1)."""
        if self.output_tokens < 2:
            return None
        return (self.e2e_s - self.ttft_s) / (self.output_tokens - 1)

    def to_json(self, details: bool) -> dict[str, Any]:
        out = {
            "index": self.index,
            "success": self.success,
            "error": self.error,
            "num_images": self.num_images,
            "input_tokens": self.input_tokens,
            "output_tokens": self.output_tokens,
            "expected_output_tokens": self.expected_output_tokens,
            "num_chunks": self.num_chunks,
            "start_s": self.start_s,
            "ttft_ms": self.ttft_s * 1e3,
            "tpot_ms": None if self.tpot_s is None else self.tpot_s * 1e3,
            "e2e_latency_ms": self.e2e_s * 1e3,
        }
        if details:
            out["itls_ms"] = [x * 1e3 for x in self.itls_s]
        return out


def summarize(results: list[RequestResult], duration_s: float) -> dict[str, Any]:
    """The figures of one run; latency statistics over successful requests only, in ms."""
    ok = [r for r in results if r.success]
    num_in = sum(r.input_tokens for r in ok)
    num_out = sum(r.output_tokens for r in ok)
    out: dict[str, Any] = {
        "num_prompts": len(results),
        "completed": len(ok),
        "failed": len(results) - len(ok),
        "duration_s": duration_s,
        "total_input_tokens": num_in,
        "total_output_tokens": num_out,
        "expected_output_tokens": sum(r.expected_output_tokens for r in ok),
        "total_images": sum(r.num_images for r in ok),
        "total_chunks": sum(r.num_chunks for r in ok),
        "request_throughput": len(ok) / duration_s,
        "input_throughput": num_in / duration_s,
        "output_throughput": num_out / duration_s,
        "total_throughput": (num_in + num_out) / duration_s,
        "concurrency": sum(r.e2e_s for r in ok) / duration_s,
    }
    samples = {
        "ttft": [r.ttft_s for r in ok],
        "tpot": [r.tpot_s for r in ok if r.tpot_s is not None],
        "itl": [x for r in ok for x in r.itls_s],
        "e2e_latency": [r.e2e_s for r in ok],
    }
    for name, values in samples.items():
        out.update(_stats(name, np.asarray(values, dtype=np.float64) * 1e3))
    errors = [f"request {r.index}: {r.error}" for r in results if not r.success]
    out["errors"] = errors[:MAX_ERRORS]
    return out


def _stats(name: str, ms: np.ndarray) -> dict[str, float | None]:
    if ms.size == 0:
        return {f"{s}_{name}_ms": None for s in STATS}
    p50, p90, p99 = np.percentile(ms, [50, 90, 99])
    values = (ms.mean(), p50, p90, p99, ms.std(), ms.max())
    return {f"{s}_{name}_ms": float(v) for s, v in zip(STATS, values, strict=True)}


def format_table(report: dict[str, Any]) -> str:
    cfg = report["config"]
    rows = [
        ("Backend", report["backend"]),
        ("Model", report["model"]),
        ("Dataset", f"{cfg['dataset']}, {cfg['num_images']} image(s) x {cfg['image_ratio']:g} of requests"),
        ("Traffic request rate", cfg["request_rate"]),
        ("Max request concurrency", cfg["max_concurrency"] or "not set"),
        ("Client processes", report.get("client_processes", 1)),
        ("Successful requests", report["completed"]),
        ("Failed requests", report["failed"]),
        ("Benchmark duration (s)", report["duration_s"]),
        ("Total input tokens", report["total_input_tokens"]),
        ("Total generated tokens", report["total_output_tokens"]),
        ("Total images", report["total_images"]),
        ("Request throughput (req/s)", report["request_throughput"]),
        ("Input token throughput (tok/s)", report["input_throughput"]),
        ("Output token throughput (tok/s)", report["output_throughput"]),
        ("Total token throughput (tok/s)", report["total_throughput"]),
        ("Concurrency", report["concurrency"]),
    ]
    lines = ["{s:{c}^50}".format(s=" Serving Benchmark Result ", c="=")]
    lines += [_row(k, v) for k, v in rows]
    for name, title in METRICS.items():
        lines.append("{s:{c}^50}".format(s=title, c="-"))
        short = {"e2e_latency": "E2E Latency"}.get(name, name.upper())
        lines += [_row(f"{s.capitalize()} {short} (ms)", report[f"{s}_{name}_ms"]) for s in STATS]
    server = report.get("server")
    if server:
        lines.append("{s:{c}^50}".format(s="Server (scheduler counters)", c="-"))
        lines += [
            _row("Steps", server["steps"]),
            _row("Generated tokens per step", round(server["tokens_per_step"], 2)),
            _row("Scheduler time per step (us)", round(server["scheduler_us_per_step"], 1)),
            _row("Device busy (share of wall time)", round(server["device_busy"], 3)),
        ]
        if server.get("embedding_prefetches"):
            lines += [
                _row("Image embeddings prefetched", server["embedding_prefetches"]),
                _row("Prefills deferred (pull still running)", server["embedding_deferrals"]),
            ]
    lines.append("=" * 50)
    if report["errors"]:
        lines.append(f"{report['failed']} request(s) failed; the first errors:")
        lines += [f"  {e}" for e in report["errors"][:5]]
    return "\n".join(lines)


def _row(key: str, value: Any) -> str:
    if value is None:
        value = "n/a"
    elif isinstance(value, float) and math.isfinite(value):
        value = f"{value:.2f}"
    return f"{key + ':':<42}{value}"


def write_json(path: str | Path, report: dict[str, Any]) -> None:
    Path(path).write_text(json.dumps(_jsonable(report), indent=1) + "\n")


def _jsonable(value: Any) -> Any:
    """Strict JSON: inf and nan (e.g. --request-rate inf) become strings."""
    if isinstance(value, float) and not math.isfinite(value):
        return str(value)
    if isinstance(value, dict):
        return {k: _jsonable(v) for k, v in value.items()}
    if isinstance(value, list | tuple):
        return [_jsonable(v) for v in value]
    return value


def plot(path: str | Path, results: list[RequestResult], title: str) -> str | None:
    """Draws the PNG; returns why it could not (matplotlib missing), else None."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return "matplotlib is not installed: no plot (pip install matplotlib)"
    ok = sorted((r for r in results if r.success), key=lambda r: r.start_s)
    fig, (ax_ttft, ax_itl, ax_time) = plt.subplots(1, 3, figsize=(18, 5))
    ax_ttft.hist([r.ttft_s * 1e3 for r in ok], bins=50, color="tab:blue")
    ax_ttft.set(title="TTFT", xlabel="ms", ylabel="requests")
    ax_itl.hist([x * 1e3 for r in ok for x in r.itls_s], bins=100, color="tab:orange")
    ax_itl.set(title="Inter-token latency", xlabel="ms", ylabel="gaps", yscale="log")
    rows = np.arange(len(ok))
    starts = np.array([r.start_s for r in ok])
    firsts = starts + np.array([r.ttft_s for r in ok])
    ends = starts + np.array([r.e2e_s for r in ok])
    ax_time.hlines(rows, starts, firsts, color="tab:blue", label="waiting for the first token")
    ax_time.hlines(rows, firsts, ends, color="tab:orange", label="decoding")
    ax_time.set(title="Requests over time", xlabel="s since the start", ylabel="request (by send time)")
    ax_time.legend(loc="lower right")
    fig.suptitle(title)
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)
    return None


def server_summary(before: dict | None, after: dict | None, duration: float) -> dict[str, float] | None:
    """What the scheduler saw during the timed run: steps, tokens per step, scheduler time per step, and how busy
    the worker's device was (its steps' device time over the run's wall time)."""
    if not before or not after or duration <= 0:
        return None

    def delta(key: str) -> int:
        return int(after.get(key, 0)) - int(before.get(key, 0))

    steps = delta("num_steps")
    return {
        "steps": steps,
        "generated_tokens": delta("generated_tokens_total"),
        "tokens_per_step": delta("generated_tokens_total") / steps if steps else 0.0,
        "scheduler_us_per_step": delta("scheduler_ns_total") / 1e3 / steps if steps else 0.0,
        "device_busy": delta("worker_forward_ns_total") / 1e9 / duration,
        "embedding_prefetches": delta("embedding_prefetches"),
        "embedding_deferrals": delta("embedding_deferrals"),
        # prompt tokens the prefix cache served instead of computing
        "prefix_hit_share": delta("prefix_cache_hit_tokens") / max(1, delta("prompt_tokens_total")),
    }
