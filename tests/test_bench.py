"""`mirador bench` (issue 7, item 8): a tiny load against a CPU cluster and the same workload through Hugging Face
transformers; every figure of the JSON is present and sane; the stream timing, the workload and --help."""

from __future__ import annotations

import asyncio
import dataclasses
import http.server
import json
import shutil
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest

from mirador.bench.args import BenchArgs
from mirador.bench.client import _fast_usage, connect, run_server_processes, send
from mirador.bench.report import METRICS, STATS, RequestResult, summarize
from mirador.bench.workload import BenchRequest, base_vocab_size, build_workload, has_images
from processor.tokenizer import Tokenizer
from tests.helpers import REPO, SERVED, Cluster

NUM, IN_LEN, OUT_LEN = 8, 32, 8
# 8 prompts, 4 at a time; requests 3 and 7 carry one 64x64 image each (4 image tokens)
WORKLOAD = [
    "--num-prompts", str(NUM), "--random-input-len", str(IN_LEN), "--random-output-len", str(OUT_LEN),
    "--max-concurrency", "4", "--num-images", "1", "--image-size", "64x64", "--image-ratio", "0.25",
]  # fmt: skip
TOP_FIELDS = (
    "backend", "model", "date", "commit", "num_prompts", "completed", "failed", "duration_s",
    "total_input_tokens", "total_output_tokens", "expected_output_tokens", "total_images", "total_chunks",
    "request_throughput", "input_throughput", "output_throughput", "total_throughput", "concurrency", "errors",
    "config", "tokenizer", "hf", "server_info", "server_stats_before", "server_stats_after", "server", "requests",
)  # fmt: skip
REQUEST_FIELDS = (
    "index", "success", "error", "num_images", "input_tokens", "output_tokens", "expected_output_tokens",
    "num_chunks", "start_s", "ttft_ms", "tpot_ms", "e2e_latency_ms", "itls_ms",
)  # fmt: skip


def bench(tmp_path: Path, *flags: str) -> dict:
    out = tmp_path / "report.json"
    cmd = [sys.executable, "-m", "mirador", "bench", *flags, "--output-json", str(out), "--disable-progress"]
    proc = subprocess.run(cmd, cwd=REPO, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    assert "Serving Benchmark Result" in proc.stdout and "P99 ITL (ms)" in proc.stdout
    return json.loads(out.read_text())


def check_report(r: dict) -> None:
    """Every field present; counts add up; every latency positive and its percentiles ordered."""
    assert set(TOP_FIELDS) <= set(r)
    assert (r["num_prompts"], r["completed"], r["failed"], r["errors"]) == (NUM, NUM, 0, [])
    assert r["total_output_tokens"] == r["expected_output_tokens"] == NUM * OUT_LEN
    assert r["total_images"] == 2
    assert (r["config"]["num_prompts"], r["config"]["random_input_len"]) == (NUM, IN_LEN)
    assert r["total_input_tokens"] == sum(q["input_tokens"] for q in r["requests"])
    assert r["output_throughput"] == pytest.approx(NUM * OUT_LEN / r["duration_s"])
    assert r["request_throughput"] == pytest.approx(NUM / r["duration_s"])
    assert r["total_throughput"] == pytest.approx(r["input_throughput"] + r["output_throughput"])
    for name in METRICS:
        v = {s: r[f"{s}_{name}_ms"] for s in STATS}
        assert all(x is not None and x >= 0 for x in v.values()), (name, v)
        assert 0 < v["p50"] <= v["p90"] <= v["p99"] <= v["max"], (name, v)
        assert v["mean"] <= v["max"]
    assert r["p50_ttft_ms"] < r["p50_e2e_latency_ms"]
    for q in r["requests"]:
        assert set(REQUEST_FIELDS) <= set(q)
        assert q["success"] and q["output_tokens"] == q["expected_output_tokens"] == OUT_LEN
        assert 0 < q["ttft_ms"] < q["e2e_latency_ms"]
        assert q["num_images"] == (1 if q["index"] in (3, 7) else 0)
        # text requests are token ids: exact; image requests add the chat template and 4 image tokens
        assert q["input_tokens"] == IN_LEN if not q["num_images"] else q["input_tokens"] > IN_LEN + 4
        assert len(q["itls_ms"]) == q["num_chunks"] - 1 and all(x >= 0 for x in q["itls_ms"])
    sum_e2e = sum(q["e2e_latency_ms"] for q in r["requests"]) / 1e3
    assert r["concurrency"] == pytest.approx(sum_e2e / r["duration_s"])


@pytest.fixture(scope="module")
def cluster_report(default_model, log_dir, tmp_path_factory):
    c = Cluster(default_model, "--page-size", "4", log_dir=log_dir, name="bench")
    try:
        tmp = tmp_path_factory.mktemp("bench")
        before = c.http.get("/server_info").json()["stats"]
        report = bench(
            tmp, "--base-url", c.base_url, *WORKLOAD, "--output-details", "--plot", str(tmp / "p.png")
        )
        return report, before, (tmp / "p.png").read_bytes()
    finally:
        c.stop()


@pytest.mark.slow
def test_bench_against_the_cluster(cluster_report):
    report, before, png = cluster_report
    check_report(report)
    assert report["backend"] == "mirador" and report["model"] == SERVED
    assert 0 < report["concurrency"] <= 4.01
    assert report["server_info"]["served_model_name"] == SERVED
    after = report["server_stats_after"]
    # the server generated exactly the timed tokens plus the warm-up request's
    assert int(after["generated_tokens_total"]) - int(before["generated_tokens_total"]) == (NUM + 1) * OUT_LEN
    assert int(after["vision_images_requested"]) - int(before["vision_images_requested"]) == 2
    # the timed run alone, as the scheduler counted it
    server = report["server"]
    assert server["generated_tokens"] == NUM * OUT_LEN
    assert server["steps"] >= OUT_LEN and 0 < server["device_busy"] <= 1.5
    assert png.startswith(b"\x89PNG")


@pytest.mark.slow
def test_bench_hf_runs_the_same_workload(cluster_report, default_model, tmp_path):
    hf = ["--backend", "hf", "--model-path", str(default_model), "--device", "cpu", "--hf-batch-size", "4"]
    report = bench(tmp_path, *hf, *WORKLOAD, "--output-details")
    check_report(report)
    assert report["hf"]["device"] == "cpu" and report["hf"]["dtype"] == "float32"
    assert report["hf"]["batch_size"] == 4 and not report["hf"]["random_weights"]
    assert 3.0 < report["concurrency"] <= 4.01  # two batches of four
    # the same prompts as the cluster got, image requests included (same chat template, same image grids)
    served = [q["input_tokens"] for q in cluster_report[0]["requests"]]
    assert [q["input_tokens"] for q in report["requests"]] == served
    assert all(len(q["itls_ms"]) == OUT_LEN - 1 for q in report["requests"])


def test_hf_builds_random_weights_from_config_alone(default_model, tmp_path):
    from mirador.bench.hf import load_model

    for f in default_model.iterdir():
        if f.suffix != ".safetensors":
            shutil.copy(f, tmp_path / f.name)
    model, random_weights = load_model(tmp_path, "cpu", "float32")
    reference, from_checkpoint = load_model(default_model, "cpu", "float32")
    assert random_weights and not from_checkpoint
    ours, theirs = model.state_dict(), reference.state_dict()
    assert ours.keys() == theirs.keys()
    name = "lm_head.weight"
    assert ours[name].shape == theirs[name].shape and not ours[name].equal(theirs[name])


def test_help_documents_every_option():
    out = subprocess.run(
        [sys.executable, "-m", "mirador", "bench", "--help"],
        cwd=REPO,
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert out.returncode == 0, out.stderr
    for f in dataclasses.fields(BenchArgs):
        flag = "--" + f.name.replace("_", "-")
        assert flag in out.stdout, flag
        assert f.metadata["help"].split()[0] in out.stdout
    assert "TPOT" in out.stdout and "ITL" in out.stdout
    top = subprocess.run(
        [sys.executable, "-m", "mirador", "--help"], cwd=REPO, capture_output=True, text=True
    )
    assert "bench" in top.stdout


def test_bad_flags_are_refused():
    for flags in (
        ["--image-size", "64"],
        ["--request-rate", "0"],
        ["--extra-request-body", "[1]"],
        ["--backend", "hf"],
    ):
        out = subprocess.run(
            [sys.executable, "-m", "mirador", "bench", *flags], cwd=REPO, capture_output=True, text=True
        )
        assert out.returncode == 2 and "error:" in out.stderr, (flags, out.stderr)


# ---- the workload ----


@pytest.fixture(scope="module")
def tokenizer(default_model) -> Tokenizer:
    return Tokenizer(default_model)


def test_workload_is_exact_and_reproducible(tokenizer):
    args = BenchArgs(
        num_prompts=12, random_input_len=40, random_output_len=9, num_images=2, image_size="30x20"
    )
    a, b = build_workload(args, tokenizer, 12, 0), build_workload(args, tokenizer, 12, 0)
    assert [(r.prompt_ids, r.image_urls) for r in a] == [(r.prompt_ids, r.image_urls) for r in b]
    assert build_workload(args, tokenizer, 12, 1)[0].prompt_ids != a[0].prompt_ids  # warm-up differs
    assert all(len(r.prompt_ids) == 40 and r.output_len == 9 and len(r.image_urls) == 2 for r in a)
    assert all(max(r.prompt_ids) < base_vocab_size(tokenizer) for r in a)  # no special or image tokens
    assert len({u for r in a for u in r.image_urls}) == 24  # a new image each time
    assert a[0].image_urls[0].startswith("data:image/jpeg;base64,")
    path, body = a[0].openai_request("m", {"temperature": 0.5})
    assert path == "/v1/chat/completions" and body["temperature"] == 0.5 and body["ignore_eos"]
    assert body["max_tokens"] == body["min_tokens"] == 9 and body["stream_options"]["include_usage"]
    # the text of an image request is the prompt ids' text; adding images leaves the prompts unchanged
    text_only = build_workload(dataclasses.replace(args, num_images=0), tokenizer, 12, 0)
    assert [r.prompt_ids for r in text_only] == [r.prompt_ids for r in a]
    path, body = text_only[0].openai_request("m", {})
    assert path == "/v1/completions" and body["prompt"] == a[0].prompt_ids


def test_workload_shapes(tokenizer):
    args = BenchArgs(
        dataset="sharegpt-like", random_input_len=100, random_output_len=20, random_range_ratio=0.5
    )
    reqs = build_workload(args, tokenizer, 50, 0)
    assert all(50 <= len(r.prompt_ids) <= 100 and 10 <= r.output_len <= 20 for r in reqs)
    assert len({len(r.prompt_ids) for r in reqs}) > 5
    assert "User:" in tokenizer.decode(reqs[0].prompt_ids)
    same = build_workload(dataclasses.replace(args, num_images=1, same_image=True), tokenizer, 4, 0)
    assert len({r.image_urls[0] for r in same}) == 1
    assert [i for i in range(8) if has_images(i, 1, 0.25)] == [3, 7]
    assert [i for i in range(4) if has_images(i, 1, 1.0)] == [0, 1, 2, 3]
    assert not any(has_images(i, 0, 1.0) for i in range(4))


def test_shared_prefix_workload(tokenizer):
    """SGLang's generated-shared-prefix: every prompt is one of the groups' prefixes, then ids of its own; the
    groups interleave, and the warm-up shares the timed run's prefixes (so it may cache them)."""
    args = BenchArgs(
        dataset="generated-shared-prefix",
        gsp_num_groups=4,
        gsp_system_prompt_len=30,
        random_input_len=10,
        random_output_len=5,
    )
    reqs = build_workload(args, tokenizer, 40, 0)
    assert all(len(r.prompt_ids) == 40 for r in reqs)
    prefixes = {tuple(r.prompt_ids[:30]) for r in reqs}
    assert len(prefixes) == 4
    groups = [tuple(r.prompt_ids[:30]) for r in reqs]
    assert any(groups[i] != groups[i + 1] for i in range(39))  # interleaved, not in blocks
    assert len({tuple(r.prompt_ids[30:]) for r in reqs}) == 40
    warm = build_workload(args, tokenizer, 8, 1)
    assert {tuple(r.prompt_ids[:30]) for r in warm} <= prefixes
    with pytest.raises(ValueError):
        build_workload(dataclasses.replace(args, gsp_num_groups=0), tokenizer, 4, 0)


# ---- stream timing and the figures ----


def _sse(*chunks: dict) -> bytes:
    return b"".join(f"data: {json.dumps(c)}\n\n".encode() for c in chunks) + b"data: [DONE]\n\n"


def _text(t: str, usage: dict | None = None) -> dict:
    return {"choices": [{"index": 0, "text": t, "finish_reason": None}], "usage": usage}


def _run_send(status: int = 200, body: bytes = b"", listen: bool = True) -> RequestResult:
    """One `send` against a loopback server that answers `status` with `body`, or against a port where nothing
    listens."""

    class Handler(http.server.BaseHTTPRequestHandler):
        def do_POST(self):  # noqa: N802 - http.server's name
            self.rfile.read(int(self.headers["content-length"]))
            self.send_response(status)
            self.send_header("content-type", "text/event-stream" if status == 200 else "application/json")
            self.send_header("content-length", str(len(body)))
            self.end_headers()
            self.wfile.write(body)

        def log_message(self, *args):
            pass

    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Handler)
    port = server.server_address[1]
    if listen:
        threading.Thread(target=server.serve_forever, daemon=True).start()
    else:
        server.server_close()
    args = BenchArgs(base_url=f"http://127.0.0.1:{port}", disable_progress=True, timeout_s=10.0)

    async def go():
        async with connect(args) as client:
            return await send(client, BenchRequest(0, [1, 2, 3], "", 4), "m", {}, 0.0)

    try:
        return asyncio.run(go())
    finally:
        if listen:
            server.shutdown()
            server.server_close()


def test_send_reads_the_stream():
    usage = {"prompt_tokens": 3, "completion_tokens": 4, "total_tokens": 7}
    # the gateway's shape: a chunk may carry two tokens (here "cd"), usage only at the end
    body = _sse(_text("a"), _text(""), _text("b"), _text("cd"), {"choices": [], "usage": usage})
    r = _run_send(body=body)
    assert r.success and (r.input_tokens, r.output_tokens, r.num_chunks) == (3, 4, 3)
    assert len(r.itls_s) == 2 and 0 < r.ttft_s <= r.e2e_s and r.tpot_s == (r.e2e_s - r.ttft_s) / 3
    # per-chunk usage (continuous_usage_stats): the gap before a two-token chunk counts twice, halved
    u = [{"prompt_tokens": 3, "completion_tokens": n} for n in (1, 2, 4)]
    body = _sse(_text("a", u[0]), _text("b", u[1]), _text("cd", u[2]))
    r = _run_send(body=body)
    assert r.success and r.output_tokens == 4 and len(r.itls_s) == 3 and r.itls_s[1] == r.itls_s[2]


def test_send_records_failures():
    err = {"error": {"message": "the model `m` does not exist", "type": "x", "param": None, "code": 404}}
    r = _run_send(404, json.dumps(err).encode())
    assert not r.success and r.error == "HTTP 404: the model `m` does not exist"
    r = _run_send(body=_sse(_text("a"), {"error": {"message": "boom"}}))
    assert not r.success and "boom" in r.error
    r = _run_send(body=_sse())
    assert not r.success and "without any text" in r.error
    r = _run_send(listen=False)
    assert not r.success and r.error.startswith("ClientConnectorError"), r.error


@pytest.mark.parametrize(
    "event",
    [
        _text("a", {"prompt_tokens": 3, "completion_tokens": 12, "total_tokens": 15}),
        _text(
            "a", {"completion_tokens": 12, "prompt_tokens": 3, "prompt_tokens_details": {"cached_tokens": 2}}
        ),
        _text("a", None),
        _text("a"),
        {"choices": [{"index": 0, "delta": {"content": '"usage": {"prompt_tokens": 9}'}}], "usage": None},
        {"choices": [], "usage": {"prompt_tokens": 3, "completion_tokens": 0, "total_tokens": 3}},
        {"choices": [{"index": 0, "text": "x"}]},
    ],
)
def test_usage_read_from_the_bytes_agrees_with_the_json(event):
    for data in (json.dumps(event).encode(), json.dumps(event, separators=(",", ":")).encode()):
        fast = _fast_usage(data)
        usage = event.get("usage")
        assert fast is None or fast == ((usage["prompt_tokens"], usage["completion_tokens"]) if usage else ())
        if usage:  # the gateway's and vLLM's shapes are read without the JSON fallback
            assert fast is not None


def test_summarize_figures():
    def done(i, start, ttft, e2e, itls):
        return RequestResult(i, 0, 5, True, "", start, ttft, e2e, 10, 5, 5, itls)

    results = [
        done(0, 0.0, 0.1, 0.5, [0.1] * 4),
        done(1, 0.0, 0.3, 1.5, [0.3] * 4),
        RequestResult(2, 1, 5, error="HTTP 500: x"),
    ]
    r = summarize(results, 2.0)
    assert (r["completed"], r["failed"], r["errors"]) == (2, 1, ["request 2: HTTP 500: x"])
    assert (r["total_input_tokens"], r["total_output_tokens"], r["total_images"]) == (20, 10, 0)
    assert r["output_throughput"] == 5.0 and r["concurrency"] == pytest.approx(1.0)
    assert r["mean_ttft_ms"] == pytest.approx(200) and r["max_e2e_latency_ms"] == pytest.approx(1500)
    assert r["mean_tpot_ms"] == pytest.approx((100 + 300) / 2) and r["p50_itl_ms"] == pytest.approx(200)
    empty = summarize([RequestResult(0, 0, 5, error="x")], 1.0)
    assert empty["completed"] == 0 and empty["p99_ttft_ms"] is None


# ---- several client processes ----


class _StreamingHandler(http.server.BaseHTTPRequestHandler):
    """A loopback stand-in for the gateway: each completion streams 4 one-token chunks, 30 ms apart for an even
    first prompt token and 5 ms apart for an odd one."""

    def do_POST(self):  # noqa: N802 - http.server's name
        body = json.loads(self.rfile.read(int(self.headers["content-length"])))
        gap = 0.03 if body["prompt"][0] % 2 == 0 else 0.005
        self.send_response(200)
        self.send_header("content-type", "text/event-stream")
        self.end_headers()
        usage = {"prompt_tokens": 3, "completion_tokens": 4, "total_tokens": 7}
        for i, c in enumerate(("a", "b", "c", "d")):
            time.sleep(gap)
            self.wfile.write(
                _sse(_text(c, {**usage, "completion_tokens": i + 1}))[: -len(b"data: [DONE]\n\n")]
            )
            self.wfile.flush()
        self.wfile.write(_sse({"choices": [], "usage": usage}))

    def log_message(self, *args):
        pass


def test_client_processes_share_the_requests_and_the_concurrency():
    """Two client processes with one stream each: request i runs in process i mod 2, so the even requests never
    overlap each other (nor the odd ones), while the two processes overlap; all results come back in order,
    on one clock. (One process with two streams would start request 2 when the short request 1 ends, while the
    long request 0 still runs.)"""
    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), _StreamingHandler)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    try:
        args = BenchArgs(
            base_url=f"http://127.0.0.1:{server.server_address[1]}",
            num_prompts=8,
            random_output_len=4,
            max_concurrency=2,
            num_client_processes=2,
            disable_progress=True,
        )
        requests = [BenchRequest(i, [i, 2, 3], "", 4) for i in range(8)]
        results, duration, _ = run_server_processes(args, "m", requests, [])
    finally:
        server.shutdown()
    assert [r.index for r in results] == list(range(8)) and all(r.success for r in results), results
    assert all(r.output_tokens == 4 for r in results)
    spans = [(r.start_s, r.start_s + r.e2e_s) for r in results]
    assert max(b for _, b in spans) <= duration + 1e-6 and min(a for a, _ in spans) >= 0

    def overlap(x, y):
        return x[0] < y[1] and y[0] < x[1]

    for parity in (0, 1):  # one stream per process: its requests run one after another
        mine = spans[parity::2]
        assert not any(overlap(a, b) for i, a in enumerate(mine) for b in mine[i + 1 :])
    assert any(overlap(a, b) for a in spans[0::2] for b in spans[1::2])  # the processes ran side by side


def test_client_processes_default_to_one_per_32_streams(monkeypatch):
    monkeypatch.setattr("os.cpu_count", lambda: 16)
    assert BenchArgs(max_concurrency=64).client_processes == 2
    assert BenchArgs(max_concurrency=32).client_processes == 1
    assert BenchArgs(max_concurrency=1024).client_processes == 16  # at most one per core
    assert BenchArgs().client_processes == 1  # no concurrency limit: one process
    assert (
        BenchArgs(max_concurrency=2, num_client_processes=4).client_processes == 2
    )  # a stream each at least
    assert BenchArgs(num_prompts=3, num_client_processes=8).client_processes == 3
    with pytest.raises(ValueError):
        BenchArgs(num_client_processes=-1)
