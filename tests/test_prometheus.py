"""Acceptance with a real Prometheus (Debian's `prometheus`, installed here when missing): it scrapes a live cluster
with deploy/prometheus.yml, its targets moved to the test's ports, and what it stored moves by what the requests did.
Every metric the Grafana dashboard queries is one Prometheus holds."""

from __future__ import annotations

import contextlib
import json
import os
import re
import shutil
import signal
import subprocess
import time
from pathlib import Path
from urllib.parse import urlparse

import grpc
import httpx
import pytest
import yaml

from protos import common_pb2, scheduler_pb2
from tests.helpers import SERVED, Cluster, free_port, image_part, noise_image

REPO = Path(__file__).resolve().parent.parent
PROMETHEUS_YML = REPO / "deploy" / "prometheus.yml"
DASHBOARD = REPO / "deploy" / "grafana" / "mirador-dashboard.json"
SERVICES = {"gateway", "scheduler", "worker", "vision"}

pytestmark = pytest.mark.slow


def prometheus_binary() -> str:
    """The `prometheus` binary; installed with apt-get (Debian's package) when missing, or the test is skipped."""
    found = shutil.which("prometheus")
    if found:
        return found
    if not shutil.which("apt-get") or os.geteuid() != 0:
        pytest.skip("prometheus is not installed and apt-get cannot install it here (needs root and apt-get)")
    env = {**os.environ, "DEBIAN_FRONTEND": "noninteractive"}

    def install() -> subprocess.CompletedProcess:
        return subprocess.run(
            ["apt-get", "install", "-y", "--no-install-recommends", "prometheus"],
            capture_output=True,
            text=True,
            env=env,
            timeout=900,
        )

    proc = install()
    if proc.returncode != 0:  # a fresh machine has no package lists yet
        subprocess.run(["apt-get", "update"], capture_output=True, text=True, env=env, timeout=600)
        proc = install()
    found = shutil.which("prometheus") or (
        "/usr/bin/prometheus" if Path("/usr/bin/prometheus").exists() else None
    )
    if proc.returncode != 0 or not found:
        pytest.skip(f"apt-get install prometheus failed ({proc.returncode}): {proc.stderr[-600:]}")
    return found


def test_config_scrapes_every_service():
    """deploy/prometheus.yml names each service once, by its compose host name."""
    hosts = [
        t.split(":")[0] for sc in _scrape_configs() for st in sc["static_configs"] for t in st["targets"]
    ]
    assert sorted(hosts) == sorted(SERVICES)


def _scrape_configs() -> list[dict]:
    return yaml.safe_load(PROMETHEUS_YML.read_text())["scrape_configs"]


class Prometheus:
    """A Prometheus server on loopback scraping the cluster every second, with deploy/prometheus.yml's jobs."""

    def __init__(self, binary: str, cluster: Cluster, workdir: Path):
        urls = cluster.metrics_urls()
        config = yaml.safe_load(PROMETHEUS_YML.read_text())
        config["global"] = {"scrape_interval": "1s", "evaluation_interval": "1s"}
        for sc in config["scrape_configs"]:
            for st in sc["static_configs"]:
                st["targets"] = [urlparse(urls[t.split(":")[0]]).netloc for t in st["targets"]]
        cfg = workdir / "prometheus.yml"
        cfg.write_text(yaml.safe_dump(config))
        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        self.log = open(workdir / "prometheus.log", "wb")  # noqa: SIM115 - lives as long as the server
        self.proc = subprocess.Popen(
            [
                binary,
                f"--config.file={cfg}",
                f"--storage.tsdb.path={workdir / 'data'}",
                f"--web.listen-address=127.0.0.1:{self.port}",
            ],
            stdout=self.log,
            stderr=subprocess.STDOUT,
        )
        self.http = httpx.Client(base_url=self.url, timeout=30, trust_env=False)
        self._wait(lambda: self.http.get("/-/ready").status_code == 200, 60, "Prometheus ready")

    def _wait(self, ok, timeout_s: float, what: str) -> None:
        deadline = time.monotonic() + timeout_s
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                raise RuntimeError(f"prometheus exited with {self.proc.returncode}")
            try:
                if ok():
                    return
            except httpx.HTTPError:
                pass
            time.sleep(0.5)
        raise TimeoutError(f"{what}: not within {timeout_s} s")

    def targets(self) -> list[dict]:
        return self.http.get("/api/v1/targets").json()["data"]["activeTargets"]

    def query(self, expr: str) -> float:
        r = self.http.get("/api/v1/query", params={"query": expr})
        assert r.status_code == 200, r.text
        result = r.json()["data"]["result"]
        return float(result[0]["value"][1]) if result else 0.0

    def names(self) -> set[str]:
        return set(self.http.get("/api/v1/label/__name__/values").json()["data"])

    def stop(self) -> None:
        self.proc.send_signal(signal.SIGTERM)
        try:
            self.proc.wait(30)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.proc.wait()
        self.http.close()
        self.log.close()


@pytest.fixture(scope="module")
def stack(default_model, log_dir, tmp_path_factory):
    binary = prometheus_binary()
    cluster = Cluster(default_model, log_dir=log_dir, name="prometheus")
    try:
        prom = Prometheus(binary, cluster, tmp_path_factory.mktemp("prometheus"))
    except BaseException:
        cluster.stop()
        raise
    yield cluster, prom
    prom.stop()
    cluster.stop()


def test_prometheus_sees_what_requests_did(stack):
    cluster, prom = stack
    prom._wait(
        lambda: len(prom.targets()) == 4 and all(t["health"] == "up" for t in prom.targets()),
        60,
        "every target up",
    )
    assert {t["labels"]["component"] for t in prom.targets()} == SERVICES
    sums = {
        "ttft": "sum(mirador:time_to_first_token_seconds_count)",
        "generated": "sum(mirador:generation_tokens_total)",
        "prompt": "sum(mirador:prompt_tokens_total)",
        "cached": "sum(mirador:cached_tokens_total)",
        "emb_hits": "sum(mirador:embedding_cache_hits_total)",
        "emb_queries": "sum(mirador:embedding_cache_queries_total)",
        "finished": 'sum(mirador:num_requests_total{finish_reason="length"})',
    }
    # the baseline is what the targets held once every target has been scraped after start-up
    time.sleep(2)
    before = {k: prom.query(q) for k, q in sums.items()}
    skipped_before = cluster.http.get("/server_info").json()["stats"]["vision_skipped_images"]

    img = image_part(noise_image(56, 56, seed=21))
    body = {"model": SERVED, "max_tokens": 5, "min_tokens": 5, "temperature": 0}
    streamed = {
        **body,
        "stream": True,
        "messages": [{"role": "user", "content": [{"type": "text", "text": "one"}, img]}],
    }
    with cluster.http.stream("POST", "/v1/chat/completions", json=streamed) as r:
        assert r.status_code == 200
        r.read()
    again = [{"role": "user", "content": [{"type": "text", "text": "two, other words"}, img]}]
    usages = [
        cluster.chat_ok(again, **body)["usage"]
    ]  # the image again after other text: an embedding-cache hit
    usages.append(cluster.chat_ok(again, **body)["usage"])  # the same prompt: served from the prefix cache
    assert usages[1]["prompt_tokens_details"]["cached_tokens"] > 0
    prompt_tokens = usages[0]["prompt_tokens"] + sum(
        u["prompt_tokens"] for u in usages
    )  # the first has as many

    # the third finds the image in the prefix cache only if a whole page past it was cached (page alignment): then
    # the scheduler does not ask vision at all
    skipped = cluster.http.get("/server_info").json()["stats"]["vision_skipped_images"] - skipped_before
    assert skipped in (0, 1)
    expected = {
        "ttft": 1,
        "generated": 15,
        "emb_queries": 3 - skipped,  # every image the scheduler asked for
        "emb_hits": 2 - skipped,  # all but the first: the repeated image is answered from the embedding cache
        "finished": 3,
        "cached": sum(u["prompt_tokens_details"]["cached_tokens"] for u in usages),
    }

    def moved() -> dict[str, float]:
        return {k: prom.query(q) - before[k] for k, q in sums.items()}

    with contextlib.suppress(TimeoutError):  # the assertion below says which one did not move as it should
        prom._wait(lambda: all(moved()[k] == v for k, v in expected.items()), 30, "counters moved")
    now = moved()
    assert {k: now[k] for k in expected} == expected
    # the first prompt differs from the others only in its text: count what the scheduler was given
    assert abs(now["prompt"] - prompt_tokens) <= 4, (now["prompt"], prompt_tokens)
    assert prom.query("histogram_quantile(0.5, sum by (le) (mirador:time_to_first_token_seconds_bucket))") > 0


def test_every_dashboard_metric_is_in_prometheus(stack):
    cluster, prom = stack
    # an RPC that fails (an empty prompt straight to the scheduler), so the error counter has a sample too
    with grpc.insecure_channel(cluster.scheduler_address) as channel:
        stub = channel.unary_stream(
            "/mirador.scheduler.v1.Scheduler/Generate",
            request_serializer=scheduler_pb2.GenerateRequest.SerializeToString,
            response_deserializer=scheduler_pb2.GenerateResponse.FromString,
        )
        with pytest.raises(grpc.RpcError) as e:
            list(
                stub(
                    scheduler_pb2.GenerateRequest(request_id="bad", sampling=common_pb2.SamplingParams()),
                    timeout=30,
                )
            )
        assert e.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    cluster.chat_ok([{"role": "user", "content": "hello"}], max_tokens=2, stream=False)
    dashboard = json.loads(DASHBOARD.read_text())
    exprs = [t["expr"] for p in dashboard["panels"] for t in p["targets"]]
    used = {m for e in exprs for m in re.findall(r"mirador:[a-z0-9_]+", e)}
    assert len(used) >= 15, used
    prom._wait(lambda: used <= prom.names(), 30, "every dashboard metric scraped")
    assert used <= prom.names(), sorted(used - prom.names())
    # and every panel's query is one Prometheus accepts
    for e in exprs:
        q = e.replace("$__rate_interval", "1m").replace("$model", ".*")
        r = prom.http.get("/api/v1/query", params={"query": q})
        assert r.status_code == 200 and r.json()["status"] == "success", (e, r.text)
