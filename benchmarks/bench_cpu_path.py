"""The CPU path at GPU step rates: the real gateway and scheduler over the simulated worker (benchmarks/sim_worker.py,
a fixed time per step), driven by `mirador bench` with streaming clients. Reports per-process CPU time per step
and per token, tokens delivered to clients against tokens the worker produced and what the step rate allows, and
checks that streamed text equals non-streamed text (no token lost or duplicated).

    python -m benchmarks.bench_cpu_path [--concurrency 64 128] [--step-ms 8] [--output-json F] [--py-spy DIR]
"""

from __future__ import annotations

import argparse
import asyncio
import concurrent.futures
import contextlib
import ctypes
import json
import os
import re
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import httpx

from common.ports import free_port as pick_port

REPO = Path(__file__).resolve().parent.parent
SERVED = "sim"
CLK_TCK = os.sysconf("SC_CLK_TCK")


def free_port() -> int:
    return pick_port("127.0.0.1")


def cpu_seconds(pid: int) -> float:
    """User + system CPU time of a live process, all its threads (/proc/<pid>/stat utime and stime)."""
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / CLK_TCK


def machine_busy_seconds() -> float:
    """CPU time spent by every process on the machine (/proc/stat, all cores, idle and iowait excluded)."""
    user, nice, system, _idle, _iowait, irq, softirq, steal = Path("/proc/stat").read_text().split()[1:9]
    return sum(int(x) for x in (user, nice, system, irq, softirq, steal)) / CLK_TCK


def _die_with_parent() -> None:
    """Children get SIGTERM if this script dies without cleaning up (Linux)."""
    with contextlib.suppress(OSError):
        ctypes.CDLL("libc.so.6", use_errno=True).prctl(1, signal.SIGTERM)  # PR_SET_PDEATHSIG


class Services:
    """Sim worker, scheduler and gateway as subprocesses on loopback; logs in log_dir."""

    def __init__(self, args: argparse.Namespace, model_dir: str, log_dir: Path):
        self.log_dir = log_dir
        self.worker_port, self.scheduler_port, self.http_port = free_port(), free_port(), free_port()
        self.base_url = f"http://127.0.0.1:{self.http_port}"
        self.stats_file = log_dir / "sim_worker_stats.json"
        worker = f"127.0.0.1:{self.worker_port}"
        scheduler = f"127.0.0.1:{self.scheduler_port}"
        self.cmds = {
            "worker": [
                *("-m", "benchmarks.sim_worker", "--model-path", model_dir, "--port", str(self.worker_port)),
                *("--step-ms", str(args.step_ms), "--prefill-us-per-token", str(args.prefill_us_per_token)),
                *("--stats-file", str(self.stats_file), "--num-pages", str(args.kv_pages)),
            ],
            "scheduler": [
                *(
                    "-m",
                    "mirador",
                    "scheduler",
                    "--model-path",
                    model_dir,
                    "--port",
                    str(self.scheduler_port),
                ),
                *("--worker-address", worker, "--vision-address", "", "--served-model-name", SERVED),
                # the scheduler takes CPU defaults (64 running, 2048-token chunks) for a worker not on "cuda"
                *("--max-running-requests", str(args.max_running_requests)),
                *("--chunked-prefill-size", str(args.chunked_prefill_size)),
                "--enable-mixed-chunk" if args.mixed_chunk else "--no-enable-mixed-chunk",
                *args.scheduler_flag,
            ],
            "gateway": [
                *("-m", "mirador", "gateway", "--model-path", model_dir, "--port", str(self.http_port)),
                *("--scheduler-address", scheduler, "--served-model-name", SERVED),
            ],
        }
        self.procs: dict[str, subprocess.Popen] = {}
        self._logs: list = []

    def start(self) -> None:
        for name, cmd in self.cmds.items():
            log = open(self.log_dir / f"{name}.log", "wb")  # noqa: SIM115 - closed in stop()
            self._logs.append(log)
            self.procs[name] = subprocess.Popen(
                [sys.executable, *cmd],
                stdout=log,
                stderr=subprocess.STDOUT,
                cwd=REPO,
                env={**os.environ, "PYTHONUNBUFFERED": "1"},
                preexec_fn=_die_with_parent,
            )

    def _check_alive(self) -> None:
        for name, p in self.procs.items():
            if p.poll() is not None:
                tail = (self.log_dir / f"{name}.log").read_text(errors="replace")[-3000:]
                raise RuntimeError(f"{name} exited with code {p.returncode}:\n{tail}")

    def wait_ready(self, timeout_s: float) -> None:
        """The gateway's /health is 200 once the scheduler serves, which it does once the worker does."""
        deadline = time.monotonic() + timeout_s
        with httpx.Client(base_url=self.base_url, trust_env=False) as http:
            while time.monotonic() < deadline:
                self._check_alive()
                with contextlib.suppress(httpx.HTTPError):
                    if http.get("/health", timeout=2).status_code == 200:
                        return
                time.sleep(0.2)
        raise TimeoutError(f"gateway not healthy in {timeout_s:.0f} s")

    def cpu(self) -> dict[str, float]:
        """CPU seconds of each service, and of the whole machine ("machine")."""
        return {
            **{name: cpu_seconds(p.pid) for name, p in self.procs.items()},
            "machine": machine_busy_seconds(),
        }

    def sim_stats(self) -> dict[str, Any]:
        time.sleep(0.6)  # the worker rewrites its counters every 0.25 s when they changed
        return json.loads(self.stats_file.read_text())

    def stop(self, grace_s: float = 10.0) -> None:
        for p in self.procs.values():
            if p.poll() is None:
                p.send_signal(signal.SIGTERM)
        deadline = time.monotonic() + grace_s
        for p in self.procs.values():
            try:
                p.wait(max(0.1, deadline - time.monotonic()))
            except subprocess.TimeoutExpired:
                p.kill()
                p.wait()
        for log in self._logs:
            log.close()


# ---- stream == non-stream ----


def _request(base_url: str, path: str, body: dict[str, Any]) -> tuple[str, int, str | None]:
    """(text, completion tokens, finish reason) of one request, streamed or not."""
    with httpx.Client(base_url=base_url, timeout=120, trust_env=False) as http:
        if not body.get("stream"):
            r = http.post(path, json=body)
            r.raise_for_status()
            out = r.json()
            choice = out["choices"][0]
            text = choice["message"]["content"] if "message" in choice else choice["text"]
            return text, out["usage"]["completion_tokens"], choice["finish_reason"]
        parts, tokens, finish = [], -1, None
        body = {**body, "stream_options": {"include_usage": True}}
        with http.stream("POST", path, json=body) as r:
            r.raise_for_status()
            for line in r.iter_lines():
                if not line.startswith("data: ") or line == "data: [DONE]":
                    continue
                chunk = json.loads(line[6:])
                if chunk.get("usage"):
                    tokens = chunk["usage"]["completion_tokens"]
                for c in chunk["choices"]:
                    parts.append((c.get("delta") or {}).get("content") or c.get("text") or "")
                    finish = c.get("finish_reason") or finish
        return "".join(parts), tokens, finish


def check_stream_equals_non_stream(base_url: str, num: int) -> dict[str, Any]:
    """`num` prompts (chat and completions alternately), each sent streamed and not streamed at the same time
    (greedy, different lengths); then a stop string taken from the middle of one answer, both ways."""
    jobs = []
    for k in range(num):
        body: dict[str, Any] = {"model": SERVED, "max_tokens": 40 + 12 * k, "temperature": 0}
        if k % 2 == 0:
            path, body["messages"] = (
                "/v1/chat/completions",
                [{"role": "user", "content": f"Check {k}: hello"}],
            )
        else:
            path, body["prompt"] = "/v1/completions", f"Check {k}: once upon a time"
        jobs += [(path, body), (path, {**body, "stream": True})]
    with concurrent.futures.ThreadPoolExecutor(len(jobs)) as pool:
        outs = list(pool.map(lambda j: _request(base_url, *j), jobs))
    mismatches = []
    for k in range(num):
        plain, streamed = outs[2 * k], outs[2 * k + 1]
        expected = jobs[2 * k][1]["max_tokens"]
        if plain != streamed or plain[1] != expected or not plain[0]:
            mismatches.append(
                {"check": k, "non_stream": plain, "stream": streamed, "expected_tokens": expected}
            )
    text = outs[0][0]
    stop = text[len(text) // 2 : len(text) // 2 + 4]
    path, body = jobs[0]
    body = {**body, "stop": [stop]}
    stopped = [_request(base_url, path, body), _request(base_url, path, {**body, "stream": True})]
    want = text[: text.find(stop)]
    stop_ok = all(s[0] == want and s[2] == "stop" for s in stopped)
    return {
        "requests": 2 * num,
        "mismatches": mismatches,
        "stop_string": stop,
        "stop_ok": stop_ok,
        "stop_results": stopped if not stop_ok else None,
        "ok": not mismatches and stop_ok,
    }


# ---- one timed run ----


def run_bench(args: argparse.Namespace, services: Services, tokenizer, concurrency: int) -> dict[str, Any]:
    """One timed `mirador bench` run, in this process so that every CPU reading brackets exactly the timed run."""
    from mirador.bench.args import BenchArgs
    from mirador.bench.client import fetch_json, run_server
    from mirador.bench.report import server_summary, summarize
    from mirador.bench.workload import build_workload

    bench_args = BenchArgs(
        base_url=services.base_url,
        model=SERVED,
        tokenizer=args.model_path,
        num_prompts=args.prompts_per_client * concurrency,
        random_input_len=args.input_len,
        random_output_len=args.output_len,
        max_concurrency=concurrency,
        dataset=args.dataset,
        gsp_num_groups=args.gsp_num_groups,
        gsp_system_prompt_len=args.gsp_system_prompt_len,
        warmup_requests=0,
        seed=concurrency,
        timeout_s=args.timeout_s,
        disable_progress=True,
    )
    requests = build_workload(bench_args, tokenizer, bench_args.num_prompts, stream=0)
    spies = _start_py_spy(services, args.py_spy, concurrency, args.py_spy_native) if args.py_spy else {}
    sim0, cpu0, client0 = services.sim_stats(), services.cpu(), time.process_time()
    try:
        results, duration, stats_before = asyncio.run(
            asyncio.wait_for(run_server(bench_args, SERVED, requests, []), args.timeout_s)
        )
    finally:
        cpu1, client1 = services.cpu(), time.process_time()
        for spy in spies.values():
            spy.send_signal(signal.SIGINT)
        for spy in spies.values():
            spy.wait(30)
    sim1 = services.sim_stats()
    stats_after = (asyncio.run(fetch_json(services.base_url, "/server_info")) or {}).get("stats")
    bench = {**summarize(results, duration), "server": server_summary(stats_before, stats_after, duration)}
    return figures(args, concurrency, bench, sim0, sim1, cpu0, cpu1, client1 - client0)


def _start_py_spy(
    services: Services, out_dir: Path, concurrency: int, native: bool
) -> dict[str, subprocess.Popen]:
    spy = Path(sys.executable).parent / "py-spy"
    out_dir.mkdir(parents=True, exist_ok=True)
    spies = {}
    for name in ("scheduler", "gateway", "worker"):
        out = out_dir / f"{name}-{concurrency}.txt"
        cmd = [str(spy), "record", "--pid", str(services.procs[name].pid), "--rate", "100"]
        # native stacks need py-spy to pause the process for each sample (slower); Python ones do not
        cmd += ["--format", "raw", "--output", str(out), *(["--native"] if native else ["--nonblocking"])]
        log = services.log_dir / f"py-spy-{name}-{concurrency}.log"
        with open(log, "wb") as f:
            spies[name] = subprocess.Popen(cmd, stdout=f, stderr=subprocess.STDOUT)
    return spies


def figures(
    args: argparse.Namespace,
    concurrency: int,
    bench: dict[str, Any],
    sim0: dict[str, Any],
    sim1: dict[str, Any],
    cpu0: dict[str, float],
    cpu1: dict[str, float],
    client_cpu_s: float,
) -> dict[str, Any]:
    """The run's figures from the bench summary and the counters and CPU times read around it."""
    d = {k: sim1[k] - sim0[k] for k in sim1 if isinstance(sim1[k], int | float) and k in sim0}
    cpu = {k: cpu1[k] - cpu0[k] for k in cpu1}
    duration = bench["duration_s"]
    delivered = bench["total_output_tokens"]
    steps = max(1, d["steps"])
    decode_steps = max(1, d["steps"] - d["prefill_steps"])
    ideal = concurrency * 1000.0 / args.step_ms if args.step_ms else float("inf")
    ours = cpu["worker"] + cpu["scheduler"] + cpu["gateway"] + client_cpu_s
    return {
        "concurrency": concurrency,
        "requests": bench["num_prompts"],
        "completed": bench["completed"],
        "failed": bench["failed"],
        "duration_s": duration,
        "delivered_tokens": delivered,
        "expected_tokens": bench["num_prompts"] * args.output_len,
        "produced_tokens": d["sampled_tokens"],
        "delivered_tok_s": delivered / duration,
        "produced_tok_s": d["sampled_tokens"] / duration,
        "ideal_tok_s": ideal,
        "delivered_share_of_ideal": delivered / duration / ideal,
        "steps": d["steps"],
        "steps_per_s": d["steps"] / duration,
        "mean_step_interval_ms": duration * 1e3 / steps,
        "mean_decode_batch": d["decode_tokens"] / decode_steps,
        "device_busy_share": d["busy_ns"] / 1e9 / duration,
        "device_starved_share": d["starved_ns"] / 1e9 / duration,
        "scheduler_cpu_s": cpu["scheduler"],
        "scheduler_cores": cpu["scheduler"] / duration,
        "scheduler_cpu_us_per_step": cpu["scheduler"] * 1e6 / steps,
        "scheduler_cpu_us_per_token": cpu["scheduler"] * 1e6 / max(1, d["sampled_tokens"]),
        "scheduler_loop_us_per_step": (bench.get("server") or {}).get("scheduler_us_per_step"),
        "gateway_cpu_s": cpu["gateway"],
        "gateway_cores": cpu["gateway"] / duration,
        "gateway_cpu_us_per_token": cpu["gateway"] * 1e6 / max(1, delivered),
        "worker_cpu_s": cpu["worker"],
        "worker_cpu_us_per_step": cpu["worker"] * 1e6 / steps,
        "client_cpu_s": client_cpu_s,
        "client_cores": client_cpu_s / duration,
        "total_cores": ours / duration,
        "other_cores": (cpu["machine"] - ours) / duration,
        "prefix_hit_share": (bench.get("server") or {}).get("prefix_hit_share", 0.0),
        "p50_ttft_ms": bench["p50_ttft_ms"],
        "p99_ttft_ms": bench["p99_ttft_ms"],
        "p50_tpot_ms": bench["p50_tpot_ms"],
        "p50_itl_ms": bench["p50_itl_ms"],
        "p99_itl_ms": bench["p99_itl_ms"],
        "tokens_ok": bench["failed"] == 0
        and delivered == bench["num_prompts"] * args.output_len == d["sampled_tokens"],
        "errors": bench["errors"],
    }


# ---- report ----

ROWS = [
    ("requests ok / sent", lambda r: f"{r['completed']}/{r['requests']}"),
    ("duration (s)", lambda r: f"{r['duration_s']:.1f}"),
    ("delivered tok/s (clients)", lambda r: f"{r['delivered_tok_s']:.0f}"),
    ("produced tok/s (sim worker)", lambda r: f"{r['produced_tok_s']:.0f}"),
    ("ideal tok/s (clients x steps/s)", lambda r: f"{r['ideal_tok_s']:.0f}"),
    ("delivered / ideal", lambda r: f"{r['delivered_share_of_ideal']:.2f}"),
    ("steps/s", lambda r: f"{r['steps_per_s']:.1f}"),
    ("mean step interval (ms)", lambda r: f"{r['mean_step_interval_ms']:.2f}"),
    ("mean decode batch", lambda r: f"{r['mean_decode_batch']:.1f}"),
    ("device busy share", lambda r: f"{r['device_busy_share']:.2f}"),
    ("device starved (waits on scheduler)", lambda r: f"{r['device_starved_share']:.2f}"),
    ("scheduler CPU (cores)", lambda r: f"{r['scheduler_cores']:.2f}"),
    ("scheduler CPU us/step", lambda r: f"{r['scheduler_cpu_us_per_step']:.0f}"),
    ("scheduler CPU us/token", lambda r: f"{r['scheduler_cpu_us_per_token']:.1f}"),
    ("scheduler core us/step (wall, own stats)", lambda r: f"{r['scheduler_loop_us_per_step'] or 0:.0f}"),
    ("gateway CPU (cores)", lambda r: f"{r['gateway_cores']:.2f}"),
    ("gateway CPU us/streamed token", lambda r: f"{r['gateway_cpu_us_per_token']:.1f}"),
    ("sim worker CPU us/step", lambda r: f"{r['worker_cpu_us_per_step']:.0f}"),
    ("bench client CPU (cores)", lambda r: f"{r['client_cores']:.2f}"),
    ("all four processes (cores)", lambda r: f"{r['total_cores']:.2f}"),
    ("other processes on the machine (cores)", lambda r: f"{r['other_cores']:.2f}"),
    ("prompt tokens served by the prefix cache", lambda r: f"{r['prefix_hit_share']:.2f}"),
    ("TTFT p50 / p99 (ms)", lambda r: f"{r['p50_ttft_ms']:.0f} / {r['p99_ttft_ms']:.0f}"),
    ("TPOT p50 (ms)", lambda r: f"{r['p50_tpot_ms']:.2f}"),
    ("ITL p50 / p99 (ms)", lambda r: f"{r['p50_itl_ms']:.1f} / {r['p99_itl_ms']:.1f}"),
    ("tokens: delivered = produced = expected", lambda r: "yes" if r["tokens_ok"] else "NO"),
]


def format_profile(path: Path, top: int = 15) -> str:
    """The heaviest functions of a py-spy raw (collapsed stacks) profile: self time and inclusive time."""
    from collections import Counter

    own, incl, total = Counter(), Counter(), 0
    for line in path.read_text().splitlines():
        stack, _, count = line.rpartition(" ")
        if not stack or not count.isdigit():
            continue
        frames = [re.sub(r":\d+\)$", ")", f) for f in stack.split(";")]
        n = int(count)
        total += n
        own[frames[-1]] += n
        for f in set(frames):
            incl[f] += n
    out = [f"--- {path.name}: {total} samples ---", "self %  incl %  function"]
    for f, n in own.most_common(top):
        out.append(f"{100 * n / total:6.1f}  {100 * incl[f] / total:6.1f}  {_short(f)}")
    out.append("heaviest inclusive, this repository's functions:")
    packages = {d.name for d in REPO.iterdir() if (d / "__init__.py").is_file()}
    ours = [
        (f, n)
        for f, n in incl.most_common()
        if f.rpartition("(")[2].split("/")[0] in packages and not _ENTRY.search(f)
    ]
    for f, n in ours[:top]:
        out.append(f"        {100 * n / total:6.1f}  {_short(f)}")
    return "\n".join(out)


_ENTRY = re.compile(r"^(<module>|main|run_grpc_service) \(")


def _short(frame: str) -> str:
    return frame.replace(str(REPO) + "/", "").replace(str(Path(sys.prefix)) + "/", "")


def format_table(report: dict[str, Any]) -> str:
    cfg, runs = report["config"], report["runs"]
    title = (
        f" CPU path over the sim worker: {cfg['step_ms']:g} ms/step, {cfg['input_len']} in / "
        f"{cfg['output_len']} out, {report['cpu_cores']} CPU cores "
    )
    width = max(40 + 14 * len(runs), len(title) + 4)
    lines = [
        f"{title:=^{width}}",
        f"{'streaming clients':<40}" + "".join(f"{r['concurrency']:>14}" for r in runs),
    ]
    lines += [f"{name:<40}" + "".join(f"{fmt(r):>14}" for r in runs) for name, fmt in ROWS]
    chk = report["checks"]
    lines.append(
        f"stream == non-stream: {chk['requests'] // 2 - len(chk['mismatches'])}/{chk['requests'] // 2} prompts equal; "
        f"stop string {chk['stop_string']!r}: {'ok' if chk['stop_ok'] else 'WRONG'}"
    )
    lines.append("=" * width)
    return "\n".join(lines)


def _interrupt(signum: int, _frame) -> None:
    raise KeyboardInterrupt(f"signal {signum}")


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(
        prog="python -m benchmarks.bench_cpu_path",
        description=__doc__,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    ap.add_argument("--concurrency", type=int, nargs="+", default=[64, 128], help="streaming clients per run")
    ap.add_argument("--prompts-per-client", type=int, default=2, help="requests per run = this x concurrency")
    ap.add_argument(
        "--input-len", type=int, default=128, help="prompt tokens per request (after any shared prefix)"
    )
    ap.add_argument(
        "--dataset",
        default="random",
        choices=("random", "generated-shared-prefix"),
        help="prompts: random ids, or one of --gsp-num-groups shared prefixes then --input-len random ids",
    )
    ap.add_argument(
        "--gsp-num-groups", type=int, default=16, help="shared prefixes (generated-shared-prefix)"
    )
    ap.add_argument("--gsp-system-prompt-len", type=int, default=1024, help="tokens of each shared prefix")
    ap.add_argument("--output-len", type=int, default=256, help="generated tokens per request")
    ap.add_argument("--step-ms", type=float, default=8.0, help="simulated device time per step")
    ap.add_argument(
        "--prefill-us-per-token", type=float, default=0.0, help="simulated prefill cost per token"
    )
    ap.add_argument("--max-running-requests", type=int, default=256, help="scheduler flag (its GPU default)")
    ap.add_argument(
        "--kv-pages", type=int, default=200_000, help="KV pages of the simulated worker (16 tokens each)"
    )
    ap.add_argument("--chunked-prefill-size", type=int, default=8192, help="scheduler flag (its GPU default)")
    ap.add_argument(
        "--mixed-chunk",
        action=argparse.BooleanOptionalAction,
        default=True,
        help="decodes and prompt chunks share steps (the scheduler's default with a GPU worker, which the sim "
        "worker stands in for); --no-mixed-chunk: prompt-only steps, its CPU default",
    )
    ap.add_argument(
        "--scheduler-flag",
        action="append",
        default=[],
        help="extra scheduler flag, repeatable (e.g. --scheduler-flag=--schedule-policy=lpm)",
    )
    ap.add_argument("--check-prompts", type=int, default=6, help="prompts of the stream == non-stream check")
    ap.add_argument("--model-path", default="", help="tokenizer and config (default: the embedded model)")
    ap.add_argument("--timeout-s", type=float, default=240.0, help="limit of each timed run")
    ap.add_argument(
        "--log-dir", type=Path, default=None, help="service logs and bench JSON (default: a temp dir)"
    )
    ap.add_argument(
        "--py-spy", type=Path, default=None, help="record scheduler, gateway and sim worker profiles here"
    )
    ap.add_argument("--py-spy-native", action="store_true", help="profiles include C frames (grpc's core)")
    ap.add_argument("--output-json", type=Path, default=None, help="write every figure here")
    args = ap.parse_args(argv)

    if not args.model_path:
        from mirador.default_model import default_model_dir

        args.model_path = str(default_model_dir())
    log_dir = args.log_dir or Path(tempfile.mkdtemp(prefix="bench-cpu-path-"))
    log_dir.mkdir(parents=True, exist_ok=True)
    # ctrl-C and SIGTERM unwind through the cleanup below from wherever they land (asyncio's own SIGINT handling
    # lets the bench client finish its run first)
    for sig in (signal.SIGINT, signal.SIGTERM):
        signal.signal(sig, _interrupt)
    services = Services(args, args.model_path, log_dir)
    print(f"logs: {log_dir}", flush=True)
    try:
        services.start()
        services.wait_ready(120)
        checks = check_stream_equals_non_stream(services.base_url, args.check_prompts)  # also the warm-up
        from processor.tokenizer import Tokenizer

        tokenizer = Tokenizer(args.model_path)
        runs = []
        for c in args.concurrency:
            print(f"running {args.prompts_per_client * c} requests at concurrency {c} ...", flush=True)
            runs.append(run_bench(args, services, tokenizer, c))
    finally:
        services.stop()
    report = {
        "config": {k: str(v) if isinstance(v, Path) else v for k, v in vars(args).items()},
        "cpu_cores": os.cpu_count(),
        "checks": checks,
        "runs": runs,
    }
    if args.output_json:
        args.output_json.write_text(json.dumps(report, indent=1) + "\n")
    if args.py_spy:
        for path in sorted(args.py_spy.glob("*.txt")):
            print(format_profile(path), flush=True)
    print(format_table(report), flush=True)
    return 0 if checks["ok"] and all(r["tokens_ok"] for r in runs) else 1


if __name__ == "__main__":
    try:
        sys.exit(main())
    except KeyboardInterrupt as e:
        print(f"interrupted ({e}); services stopped", file=sys.stderr)
        sys.exit(130)
