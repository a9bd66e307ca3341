"""Continuous batching, chunked prefill, the image-aware prefix cache, preemption, cancellation and overlap,
through real clusters (issue 3)."""

from __future__ import annotations

import threading
import time
from concurrent.futures import ThreadPoolExecutor

import grpc
import httpx
import pytest

from protos import vision_pb2, vision_pb2_grpc
from tests.helpers import SERVED, Cluster, image_part, noise_image

SYSTEM = {
    "role": "system",
    "content": "You are a careful assistant who answers in exactly one short paragraph.",
}


def workload() -> list[list[dict]]:
    """Text and images mixed, different lengths, some sharing prefixes (the system prompt, an image)."""
    shared = noise_image(84, 84, 100)
    reqs = []
    for k in range(12):
        text = {"type": "text", "text": f"Question {k}: " + "tell me more " * (k % 4 * 5 + 1)}
        if k % 3 == 0:
            content = [text]
        elif k % 3 == 1:
            content = [image_part(shared), text]
        else:
            content = [image_part(noise_image(40 + 20 * k, 60 + 10 * k, k)), text]
        reqs.append(([SYSTEM] if k % 2 == 0 else []) + [{"role": "user", "content": content}])
    return reqs


def tokens(c: Cluster, messages, max_tokens: int = 24) -> list[int]:
    body = c.chat_ok(messages, max_tokens=max_tokens, temperature=0, return_token_ids=True)
    return body["choices"][0]["token_ids"]


def concurrently(c: Cluster, reqs, max_tokens: int = 24) -> list[list[int]]:
    with ThreadPoolExecutor(len(reqs)) as pool:
        return list(pool.map(lambda m: tokens(c, m, max_tokens), reqs))


CONFIGS = {
    "chunked-small": ["--chunked-prefill-size", "16", "--page-size", "4"],
    "chunking-off": ["--chunked-prefill-size", "-1", "--page-size", "8", "--disable-overlap-schedule"],
    "no-prefix-cache": ["--chunked-prefill-size", "64", "--disable-radix-cache", "--page-size", "4"],
    "tiny-kv-pool": ["--max-total-tokens", "640", "--page-size", "4", "--chunked-prefill-size", "32"],
}


@pytest.mark.parametrize("name", sorted(CONFIGS))
def test_batched_equals_alone(default_model, log_dir, name):
    c = Cluster(default_model, *CONFIGS[name], log_dir=log_dir, name=f"batch-{name}")
    try:
        reqs = workload()
        alone = [tokens(c, m) for m in reqs]
        together = concurrently(c, reqs)
        assert together == alone
        stats = c.stats()
        assert stats.num_running == 0 and stats.num_queued == 0
        if name == "tiny-kv-pool":
            assert stats.num_preemptions > 0, "the pool was meant to be too small for the batch"
        assert "Prefill batch." in c.log()
    finally:
        c.stop()


@pytest.fixture(scope="module")
def cluster(default_model, log_dir):
    c = Cluster(
        default_model, "--page-size", "4", "--decode-log-interval", "5", log_dir=log_dir, name="engine"
    )
    yield c
    c.stop()


def _vision_stats(c: Cluster) -> vision_pb2.VisionStats:
    with grpc.insecure_channel(f"127.0.0.1:{c.vision_port}") as ch:
        return vision_pb2_grpc.VisionStub(ch).GetStats(vision_pb2.GetStatsRequest(), timeout=10)


def test_the_warmup_request_ran_and_matches_no_user(cluster):
    """Before the cluster reported ready, one request with an image went through every service (SGLang's server
    warm-up); its cache salt keeps what it cached from ever matching a user's prompt, the same words included."""
    stats, vision = cluster.stats(), _vision_stats(cluster)
    assert stats.requests_finished >= 1 and stats.vision_images_requested >= 1
    assert vision.images_encoded >= 1
    assert stats.kv_pages_used == stats.kv_pages_cached  # no live sequence holds pages
    assert "warm-up request through the cluster" in cluster.log()
    first = cluster.chat_ok([{"role": "user", "content": "What is in this picture?"}], max_tokens=2)
    assert first["usage"]["prompt_tokens_details"]["cached_tokens"] == 0


def test_repeated_image_hits_prefix_cache_without_encoder(cluster):
    msgs = [
        {"role": "user", "content": [image_part(noise_image(120, 90, 55)), {"type": "text", "text": "Hi"}]}
    ]
    first = cluster.chat_ok(msgs, max_tokens=10, temperature=0)
    before, vision_before = cluster.stats(), _vision_stats(cluster)
    second = cluster.chat_ok(msgs, max_tokens=10, temperature=0)
    after, vision_after = cluster.stats(), _vision_stats(cluster)
    assert second["usage"]["prompt_tokens_details"]["cached_tokens"] > 0
    assert second["choices"][0]["message"]["content"] == first["choices"][0]["message"]["content"]
    assert after.vision_encode_calls == before.vision_encode_calls
    assert after.vision_skipped_images == before.vision_skipped_images + 1
    assert vision_after.encode_calls == vision_before.encode_calls
    assert vision_after.images_encoded == vision_before.images_encoded


def test_different_images_of_the_same_size_never_share_cache(cluster):
    text = {"type": "text", "text": "Describe it"}
    a = cluster.chat_ok(
        [{"role": "user", "content": [image_part(noise_image(112, 112, 1)), text]}],
        max_tokens=8,
        temperature=0,
        return_token_ids=True,
    )
    b = cluster.chat_ok(
        [{"role": "user", "content": [image_part(noise_image(112, 112, 2)), text]}],
        max_tokens=8,
        temperature=0,
        return_token_ids=True,
    )
    first_image_token = b["prompt_token_ids"].index(151655)
    assert b["usage"]["prompt_tokens_details"]["cached_tokens"] <= first_image_token
    assert a["choices"][0]["token_ids"] != b["choices"][0]["token_ids"]


def test_concurrent_requests_for_a_new_image_encode_it_once(cluster):
    img = image_part(noise_image(140, 70, 77))
    msgs = [[{"role": "user", "content": [img, {"type": "text", "text": f"variant {k}"}]}] for k in range(4)]
    before = _vision_stats(cluster)
    outs = concurrently(cluster, msgs, max_tokens=4)
    after = _vision_stats(cluster)
    assert len(outs) == 4
    assert after.images_encoded == before.images_encoded + 1


def test_disconnected_stream_frees_its_pages(cluster):
    stop = threading.Event()

    def read_a_little():
        with (
            httpx.Client(base_url=cluster.base_url, timeout=60, trust_env=False) as h,
            h.stream(
                "POST",
                "/v1/chat/completions",
                json={
                    "model": SERVED,
                    "stream": True,
                    "max_tokens": 20000,
                    "ignore_eos": True,
                    "messages": [{"role": "user", "content": "Talk forever"}],
                },
            ) as r,
        ):
            for n, _ in enumerate(r.iter_lines()):
                if n > 10:
                    break
        stop.set()

    before = cluster.stats()
    t = threading.Thread(target=read_a_little)
    t.start()
    t.join(60)
    assert stop.is_set()
    deadline = time.monotonic() + 30
    while time.monotonic() < deadline:
        s = cluster.stats()
        if s.num_running == 0 and s.kv_pages_used == s.kv_pages_cached:
            break
        time.sleep(0.1)
    s = cluster.stats()
    assert s.num_running == 0 and s.num_queued == 0
    assert s.kv_pages_used == s.kv_pages_cached  # no page held by a live sequence
    assert s.requests_aborted == before.requests_aborted + 1
    assert s.generated_tokens_total - before.generated_tokens_total < 20000


def test_scheduler_overlaps_planning_with_worker_steps(cluster):
    concurrently(cluster, workload()[:6], max_tokens=20)
    s = cluster.stats()
    assert s.steps_overlapped > 0
    assert 0 < s.scheduler_ns_overlapped <= s.scheduler_ns_total
    assert 0 < s.scheduler_ns_off_path <= s.scheduler_ns_total
    assert "Decode batch." in cluster.log()


def test_grpcurl_reflection_and_health(cluster):
    """Operators debug the services with grpcurl: reflection lists them, health answers, stats are readable."""
    import json as _json
    import shutil
    import subprocess
    import sys
    from pathlib import Path

    grpcurl = shutil.which("grpcurl", path=str(Path(sys.executable).parent)) or shutil.which("grpcurl")
    if grpcurl is None:
        pytest.skip("grpcurl is not installed")
    expected = {
        cluster.scheduler_port: "mirador.scheduler.v1.Scheduler",
        cluster.worker_port: "mirador.worker.v1.Worker",
        cluster.vision_port: "mirador.vision.v1.Vision",
    }
    for port, service in expected.items():
        listed = subprocess.run(
            [grpcurl, "-plaintext", f"127.0.0.1:{port}", "list"], capture_output=True, text=True, timeout=30
        )
        assert service in listed.stdout.split() and "grpc.health.v1.Health" in listed.stdout.split(), listed
        health = subprocess.run(
            [grpcurl, "-plaintext", f"127.0.0.1:{port}", "grpc.health.v1.Health/Check"],
            capture_output=True,
            text=True,
            timeout=30,
        )
        assert _json.loads(health.stdout)["status"] == "SERVING"
    stats = subprocess.run(
        [grpcurl, "-plaintext", cluster.scheduler_address, "mirador.scheduler.v1.Scheduler/GetStats"],
        capture_output=True,
        text=True,
        timeout=30,
    )
    assert _json.loads(stats.stdout)["kv_pages_total"] > 0
