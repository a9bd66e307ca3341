"""Observability on a live cluster: every service's /metrics moves by what a request did, request ids travel from the
HTTP header through every service's log lines, JSON logs parse, /server_info speaks JSON numbers."""

from __future__ import annotations

import json
import logging
import sys
import time

import pytest

from common.log import JsonFormatter, request_id_var
from tests.helpers import SERVED, Cluster, image_part, noise_image, samples, value

SERVICES = ("gateway", "scheduler", "worker", "vision")


@pytest.fixture(scope="module")
def cluster(default_model, log_dir):
    c = Cluster(default_model, "--log-requests", "--log-format", "json", log_dir=log_dir, name="metrics")
    yield c
    c.stop()


def scrape_all(c: Cluster) -> dict[str, dict]:
    return {s: samples(c.scrape(s)) for s in SERVICES}


def test_every_service_serves_metrics(cluster):
    urls = cluster.metrics_urls()
    assert set(urls) == set(SERVICES)
    for service in SERVICES:
        snap = samples(cluster.scrape(service))
        names = {n for n, _ in snap}
        assert all(n.startswith("mirador:") for n in names if not n.startswith(("python_", "process_"))), (
            names
        )
        assert any(n.startswith("mirador:") for n in names), service
        assert not any(n.startswith("mirador_") for n in names), f"{service}: names escaped to underscores"


def test_metrics_move_by_what_requests_did(cluster):
    before = scrape_all(cluster)
    img = image_part(noise_image(56, 56, seed=12))
    body = {"model": SERVED, "max_tokens": 5, "min_tokens": 5, "temperature": 0}
    streamed = {
        **body,
        "stream": True,
        "messages": [{"role": "user", "content": [{"type": "text", "text": "first look"}, img]}],
    }
    with cluster.http.stream("POST", "/v1/chat/completions", json=streamed) as r:
        assert r.status_code == 200
        r.read()
    # the same image after other text: the prefix cache cannot cover it, the vision service's cache does
    usage = cluster.chat_ok(
        [{"role": "user", "content": [{"type": "text", "text": "look again"}, img]}], **body
    )["usage"]
    after = scrape_all(cluster)

    def delta(where: str, name: str, **labels: str) -> float:
        return value(after[where], name, **labels) - value(before[where], name, **labels)

    gw = {"model_name": SERVED, "service": "gateway"}
    assert (
        delta("gateway", "mirador:time_to_first_token_seconds_count", **gw) == 1
    )  # the streamed request only
    assert delta("gateway", "mirador:e2e_request_latency_seconds_count", **gw) == 2
    assert delta("gateway", "mirador:time_per_output_token_seconds_count", **gw) == 1
    assert delta("gateway", "mirador:inter_token_latency_seconds_count", **gw) >= 1
    chat_ok = {"endpoint": "/v1/chat/completions", "status": "200"}
    assert delta("gateway", "mirador:http_requests_total", **chat_ok) == 2
    sch = {"model_name": SERVED, "service": "scheduler"}
    assert delta("scheduler", "mirador:generation_tokens_total", **sch) == 10
    assert delta("scheduler", "mirador:prompt_tokens_total", **sch) >= 2 * usage["prompt_tokens"] - 4
    assert delta("scheduler", "mirador:num_requests_total", finish_reason="length", **sch) == 2
    assert delta("scheduler", "mirador:queue_time_seconds_count", **sch) == 2
    assert delta("scheduler", "mirador:forward_step_seconds_count", mode="decode", **sch) >= 4
    assert value(after["scheduler"], "mirador:kv_pages_total", **sch) > 0
    vis = {"model_name": SERVED, "service": "vision"}
    assert delta("vision", "mirador:embedding_cache_queries_total", **vis) == 2
    assert delta("vision", "mirador:embedding_cache_hits_total", **vis) == 1
    assert delta("vision", "mirador:vision_encode_seconds_count", **vis) == 1
    assert delta("vision", "mirador:rpc_latency_seconds_count", method="Encode") == 2
    # each request's gateway hinted the vision service to decode its image (fire and forget: may land late)
    deadline = time.monotonic() + 5
    while delta("vision", "mirador:rpc_latency_seconds_count", method="Prepare") < 2:
        if time.monotonic() > deadline:
            break
        time.sleep(0.05)
        after["vision"] = samples(cluster.scrape("vision"))
    assert delta("vision", "mirador:rpc_latency_seconds_count", method="Prepare") == 2
    assert delta("vision", "mirador:vision_images_prepared_ahead_total", **vis) <= 1  # the first, unless late
    assert value(after["vision"], "mirador:embedding_cache_bytes", **vis) > 0


def test_http_errors_are_counted_by_status(cluster):
    before = samples(cluster.scrape("gateway"))
    r = cluster.http.post("/v1/chat/completions", json={"model": "nope", "messages": []})
    assert r.status_code in (400, 404)
    cluster.http.get("/no/such/path/12345")
    after = samples(cluster.scrape("gateway"))
    status = str(r.status_code)
    key = {"endpoint": "/v1/chat/completions", "status": status}
    assert (
        value(after, "mirador:http_requests_total", **key)
        - value(before, "mirador:http_requests_total", **key)
        == 1
    )
    other = {"endpoint": "other", "status": "404"}  # an unknown path is one bounded label, not its own
    assert (
        value(after, "mirador:http_requests_total", **other)
        - value(before, "mirador:http_requests_total", **other)
        == 1
    )
    assert not any("/no/such" in str(lab) for _, lab in after)


def test_request_id_round_trip_and_in_every_service_log(cluster):
    rid = "trace-me-7f3a"
    img = image_part(noise_image(48, 48, seed=99))
    messages = [{"role": "user", "content": [{"type": "text", "text": "id check"}, img]}]
    r = cluster.http.post(
        "/v1/chat/completions",
        json={"model": SERVED, "max_tokens": 2, "messages": messages},
        headers={"X-Request-Id": rid},
    )
    assert r.status_code == 200, r.text
    assert r.headers["x-request-id"] == rid
    assert r.json()["id"] == f"chatcmpl-{rid}"
    lines = [json.loads(ln) for ln in cluster.log().splitlines() if ln.startswith("{")]
    services = {ln["service"] for ln in lines if ln.get("request_id") == rid}
    assert services == set(SERVICES), services
    # an id that is not a sane token is replaced by a fresh one, which the answer then carries
    r = cluster.http.post(
        "/v1/completions",
        json={"model": SERVED, "prompt": "hi", "max_tokens": 1},
        headers={"X-Request-Id": "bad id\twith spaces"},
    )
    assert r.status_code == 200
    new = r.headers["x-request-id"]
    assert new != "bad id\twith spaces" and r.json()["id"] == f"cmpl-{new}"
    # errors carry one too
    r = cluster.http.post("/v1/chat/completions", json={"model": "nope"}, headers={"X-Request-Id": "e-1"})
    assert r.status_code >= 400 and r.headers["x-request-id"] == "e-1"


def test_json_log_lines_parse(cluster):
    lines = [ln for ln in cluster.log().splitlines() if ln.startswith("{")]
    assert len(lines) > 20
    parsed = [json.loads(ln) for ln in lines]
    assert {p["service"] for p in parsed} >= set(SERVICES)
    assert all({"time", "level", "service", "logger", "message"} <= set(p) for p in parsed)
    # no service line escaped the JSON format (only `mirador up`'s own lines are text)
    text = [ln for ln in cluster.log().splitlines() if any(f" {s}]" in ln for s in SERVICES)]
    assert not text, text[:3]


def test_server_info_numbers_are_json_numbers(cluster):
    info = cluster.http.get("/server_info").json()
    stats = info["stats"]
    assert stats and all(isinstance(v, int | float) and not isinstance(v, bool) for v in stats.values()), (
        stats
    )
    assert stats["prompt_tokens_total"] > 0
    assert "page_size" not in stats and isinstance(
        info["page_size"], int
    )  # configuration stays outside stats


def test_json_formatter_carries_request_id_and_exception():
    fmt = JsonFormatter("svc")
    token = request_id_var.set("rid-1")
    try:
        try:
            raise ValueError("boom")
        except ValueError:
            record = logging.LogRecord("x", logging.ERROR, __file__, 1, "failed %d", (3,), sys.exc_info())
        record.request_id = request_id_var.get()
    finally:
        request_id_var.reset(token)
    out = json.loads(fmt.format(record))
    assert (
        out["message"] == "failed 3"
        and out["request_id"] == "rid-1"
        and "ValueError: boom" in out["exception"]
    )
    assert out["service"] == "svc" and out["level"] == "ERROR"


def test_batched_observations_expose_what_observe_would():
    """The gateway's inter-token latencies are counted per request and added to the histogram in batches: the
    exposition must equal one observe() per value (bucket edges, past the last bound), after each flush."""
    from prometheus_client import CollectorRegistry, Histogram
    from prometheus_client.parser import text_string_to_metric_families

    from common.metrics import STEP_BUCKETS
    from gateway.metrics import BatchedObservations

    def histogram() -> tuple[CollectorRegistry, Histogram]:
        registry = CollectorRegistry()
        return registry, Histogram("itl", "x", ["m"], buckets=STEP_BUCKETS, registry=registry).labels("a")

    def exposed(registry: CollectorRegistry) -> dict[tuple, float]:
        from prometheus_client import generate_latest

        text = generate_latest(registry).decode()
        return {
            (s.name, s.labels.get("le")): s.value
            for f in text_string_to_metric_families(text)
            for s in f.samples
            if not s.name.endswith("_created")
        }

    (reg_a, direct), (reg_b, batched_child) = histogram(), histogram()
    values = [0.0, 0.0005, 0.0004, 0.001, 0.0091, 0.25, 10.0, 11.0, *(i * 1e-3 for i in range(200))]
    batched = BatchedObservations(batched_child)
    for i, v in enumerate(values):
        direct.observe(v)
        batched.observe(v)
        if i == 100:  # 64 observations in, one flush happened on its own; the rest is held until the next
            assert exposed(reg_b)[("itl_count", None)] == 64
    batched.flush()
    a, b = exposed(reg_a), exposed(reg_b)
    assert a.keys() == b.keys() and a[("itl_count", None)] == len(values)
    for key in a:
        assert b[key] == pytest.approx(a[key], rel=1e-12), key
