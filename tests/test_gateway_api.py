"""The OpenAI surface of the cluster: the official client, streaming, media sources, errors, info endpoints,
and the rule that gateway and scheduler never load torch (issue 2)."""

from __future__ import annotations

import base64
import contextlib
import json
import subprocess
import sys
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

import httpx
import openai
import pytest

from tests.helpers import (
    SERVED,
    Cluster,
    data_uri,
    free_port,
    image_part,
    noise_image,
    png_bytes,
    sample_photo,
)

JPEG = sample_photo("grace_hopper.jpg").read_bytes()
PNG = sample_photo("logo2.png").read_bytes()
TRUNCATED = png_bytes(noise_image(120, 90, 3))[:2000]


def _raw_chat(c, message_json: str, extra: str = ""):
    """A chat request written as JSON text (to spell what json.dumps would not, e.g. a lone surrogate escape)."""
    body = f'{{"model": "{SERVED}", "max_tokens": 2, "messages": [{message_json}]{extra}}}'
    return c.http.post(
        "/v1/chat/completions", content=body.encode(), headers={"content-type": "application/json"}
    )


def image_part_bytes(data: bytes) -> dict:
    return {"type": "image_url", "image_url": {"url": data_uri(data)}}


class _Media(BaseHTTPRequestHandler):
    routes = {"/photo.jpg": JPEG, "/logo.png": PNG, "/notimage.bin": b"this is not an image" * 10}

    def do_GET(self):  # noqa: N802
        if self.path == "/slow.png":
            time.sleep(3)
        if self.path == "/redirect":
            self.send_response(302)
            self.send_header("Location", "/photo.jpg")
            self.end_headers()
            return
        body = self.routes.get(self.path, PNG if self.path == "/slow.png" else None)
        if body is None:
            self.send_response(404)
            self.end_headers()
            return
        self.send_response(200)
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)

    def log_message(self, *args):
        pass


@pytest.fixture(scope="module")
def media_server():
    server = ThreadingHTTPServer(("127.0.0.1", 0), _Media)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    yield f"http://127.0.0.1:{server.server_address[1]}"
    server.shutdown()


@pytest.fixture(scope="module")
def local_media(tmp_path_factory) -> Path:
    d = tmp_path_factory.mktemp("allowed-media")
    (d / "photo.jpg").write_bytes(JPEG)
    return d


@pytest.fixture(scope="module")
def cluster(default_model, log_dir, local_media):
    c = Cluster(
        default_model,
        "--page-size",
        "8",
        "--allow-private-media-urls",
        "--allowed-local-media-path",
        str(local_media),
        "--media-fetch-timeout-s",
        "1",
        "--context-length",
        "2048",
        log_dir=log_dir,
        name="api",
    )
    yield c
    c.stop()


@contextlib.contextmanager
def _extra_gateway(cluster, default_model, log_dir, name: str, *flags: str):
    """A second gateway process on the cluster's scheduler, with its own flags."""
    port = free_port()
    log = open(log_dir / f"{name}.log", "wb")  # noqa: SIM115 - lives as long as the process
    proc = subprocess.Popen(
        [sys.executable, "-m", "mirador", "gateway", "--model", str(default_model), "--port", str(port),
         "--scheduler-address", cluster.scheduler_address, "--served-model-name", SERVED, *flags],
        stdout=log,
        stderr=subprocess.STDOUT,
    )  # fmt: skip
    url = f"http://127.0.0.1:{port}"
    deadline = time.monotonic() + 60
    while time.monotonic() < deadline:
        try:
            if httpx.get(url + "/health", timeout=1, trust_env=False).status_code == 200:
                break
        except httpx.HTTPError:
            time.sleep(0.2)
    try:
        yield httpx.Client(base_url=url, timeout=60, trust_env=False)
    finally:
        proc.terminate()
        proc.wait(20)
        log.close()


@pytest.fixture(scope="module")
def strict_gateway(cluster, default_model, log_dir):
    """A second gateway on the same scheduler with default media policy (private URLs refused) and a tiny
    image byte cap."""
    with _extra_gateway(
        cluster, default_model, log_dir, "strict-gateway", "--max-image-bytes", "100000"
    ) as c:
        yield c


@pytest.fixture(scope="module")
def client(cluster):
    return openai.OpenAI(base_url=cluster.base_url + "/v1", api_key="unused", max_retries=0)


def _user(*parts):
    return [{"role": "user", "content": list(parts)}]


TEXT = {"type": "text", "text": "What do you see?"}


# ---- the official client ----


def test_openai_client_non_streaming(client):
    r = client.chat.completions.create(
        model=SERVED,
        messages=_user({"type": "image_url", "image_url": {"url": data_uri(JPEG, "image/jpeg")}}, TEXT),
        max_tokens=6,
        temperature=0,
        extra_body={"return_token_ids": True},
    )
    assert r.object == "chat.completion"
    assert r.choices[0].message.role == "assistant"
    assert r.choices[0].finish_reason in ("stop", "length")
    prompt_ids = r.model_extra["prompt_token_ids"]
    assert prompt_ids.count(151655) == 378  # grace_hopper.jpg is 378 image tokens under Qwen2.5-VL
    assert r.usage.prompt_tokens == len(prompt_ids)
    assert r.usage.total_tokens == r.usage.prompt_tokens + r.usage.completion_tokens


def test_openai_client_streaming_equals_non_streaming(client):
    msgs = _user(image_part(noise_image(100, 80, 4)), TEXT)
    full = client.chat.completions.create(model=SERVED, messages=msgs, max_tokens=12, temperature=0)
    chunks = list(
        client.chat.completions.create(
            model=SERVED,
            messages=msgs,
            max_tokens=12,
            temperature=0,
            stream=True,
            stream_options={"include_usage": True},
        )
    )
    assert chunks[0].choices[0].delta.role == "assistant"
    content = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
    assert content == full.choices[0].message.content
    finals = [c for c in chunks if c.choices and c.choices[0].finish_reason]
    assert len(finals) == 1 and finals[0].choices[0].finish_reason == full.choices[0].finish_reason
    assert chunks[-1].usage.completion_tokens == full.usage.completion_tokens


def test_raw_sse_shape(cluster):
    with cluster.http.stream(
        "POST",
        "/v1/chat/completions",
        json={
            "model": SERVED,
            "messages": [{"role": "user", "content": "hi"}],
            "max_tokens": 5,
            "stream": True,
        },
    ) as r:
        assert r.status_code == 200
        assert r.headers["content-type"].startswith("text/event-stream")
        lines = [ln for ln in r.iter_lines() if ln]
    assert lines[-1] == "data: [DONE]"
    events = [json.loads(ln.removeprefix("data: ")) for ln in lines[:-1]]
    assert events[0]["choices"][0]["delta"] == {"role": "assistant", "content": ""}
    assert events[-1]["choices"][0]["finish_reason"] == "length"
    assert all(e["object"] == "chat.completion.chunk" for e in events)


def test_models_health_info(cluster):
    models = cluster.http.get("/v1/models").json()
    assert models["data"][0]["id"] == SERVED
    assert cluster.http.get("/health").status_code == 200
    info = cluster.http.get("/server_info").json()
    assert info["architecture"] == "Qwen2_5_VLForConditionalGeneration"
    assert info["context_length"] == 2048
    assert {
        "num_running",
        "num_queued",
        "kv_pages_used",
        "kv_pages_total",
        "num_preemptions",
        "prefix_cache_hit_tokens",
        "vision_encode_calls",
        "vision_cache_hits",
    } <= set(info["stats"])
    assert info["worker_info"]["page_size"] == 8
    # one host: the step stream and this gateway's request stream run on the Unix sockets (common/local_stream.py)
    assert (info["step_transport"], info["connect_transport"]) == ("unix", "unix")
    assert cluster.http.get("/get_server_info").status_code == 200


# ---- media sources ----


def test_http_url_on_loopback(cluster, media_server):
    for path in ("/photo.jpg", "/logo.png", "/redirect"):
        body = cluster.chat_ok(
            _user({"type": "image_url", "image_url": {"url": media_server + path}}, TEXT), max_tokens=3
        )
        assert body["usage"]["prompt_tokens"] > 100


def test_same_image_by_url_and_data_uri_share_cache(cluster, media_server):
    by_url = cluster.chat_ok(
        _user({"type": "image_url", "image_url": {"url": media_server + "/logo.png"}}, TEXT),
        max_tokens=4,
        temperature=0,
    )
    by_data = cluster.chat_ok(
        _user({"type": "image_url", "image_url": {"url": data_uri(PNG)}}, TEXT), max_tokens=4, temperature=0
    )
    assert by_data["usage"]["prompt_tokens_details"]["cached_tokens"] > 0
    assert by_data["choices"][0]["message"]["content"] == by_url["choices"][0]["message"]["content"]


def test_local_file_allowed(cluster, local_media):
    for url in (str(local_media / "photo.jpg"), (local_media / "photo.jpg").as_uri()):
        cluster.chat_ok(_user({"type": "image_url", "image_url": {"url": url}}, TEXT), max_tokens=2)


# ---- bad input: 4xx in OpenAI's shape, and the cluster still serves ----


def _assert_error(r: httpx.Response, status: int, param_part: str | None = None):
    assert r.status_code == status, r.text
    err = r.json()["error"]
    assert set(err) == {"message", "type", "param", "code"}
    assert err["message"]
    if param_part is not None:
        assert param_part in (err["param"] or ""), err


BAD = {
    "malformed_json": (
        lambda c, m, d: c.http.post(
            "/v1/chat/completions", content=b"{not json", headers={"content-type": "application/json"}
        ),
        400,
        None,
    ),
    "missing_messages": (
        lambda c, m, d: c.http.post("/v1/chat/completions", json={"model": SERVED}),
        400,
        "messages",
    ),
    "empty_messages": (lambda c, m, d: c.chat([]), 400, "messages"),
    "unknown_part": (
        lambda c, m, d: c.chat(_user({"type": "audio", "audio": "x"})),
        400,
        "messages[0].content[0]",
    ),
    "not_an_image": (
        lambda c, m, d: c.chat(
            _user({"type": "image_url", "image_url": {"url": data_uri(b"definitely not an image")}}, TEXT)
        ),
        400,
        "image_url",
    ),
    "bad_base64": (
        lambda c, m, d: c.chat(
            _user({"type": "image_url", "image_url": {"url": "data:image/png;base64,@@@notbase64@@@"}}, TEXT)
        ),
        400,
        "image_url",
    ),
    # the header passes the gateway (it reads only headers); the vision service refuses the body, and the error
    # comes back as a 400, streamed or not (a stream starts only with its first output)
    "truncated_image": (
        lambda c, m, d: c.chat(_user(image_part_bytes(TRUNCATED), TEXT)),
        400,
        None,
    ),
    "truncated_image_streamed": (
        lambda c, m, d: c.chat(_user(image_part_bytes(TRUNCATED), TEXT), stream=True),
        400,
        None,
    ),
    "too_long_after_images_streamed": (
        lambda c, m, d: c.chat(_user(image_part(noise_image(1400, 1400, 9)), TEXT), stream=True),
        400,
        "messages",
    ),
    # each of these was a 500 (and a dropped connection) once: parsers, protobuf ranges, idna, templates
    "json_nested_deep": (
        lambda c, m, d: c.http.post(
            "/v1/chat/completions",
            content=b"[" * 100_000 + b"]" * 100_000,
            headers={"content-type": "application/json"},
        ),
        400,
        None,
    ),
    "lone_surrogate_in_text": (
        lambda c, m, d: _raw_chat(c, '{"role": "user", "content": "a\\ud800b"}'),
        400,
        "messages[0].content",
    ),
    "lone_surrogate_in_stop": (
        lambda c, m, d: _raw_chat(c, '{"role": "user", "content": "hi"}', ', "stop": ["\\udfff"]'),
        400,
        "stop[0]",
    ),
    "token_id_over_int32": (
        lambda c, m, d: c.http.post(
            "/v1/completions", json={"model": SERVED, "prompt": [2**31], "max_tokens": 2}
        ),
        400,
        "prompt",
    ),
    "top_k_over_int32_streamed": (
        lambda c, m, d: c.chat([{"role": "user", "content": "hi"}], top_k=2**31, stream=True),
        400,
        "top_k",
    ),
    "min_tokens_over_int32": (
        lambda c, m, d: c.chat([{"role": "user", "content": "hi"}], min_tokens=2**31),
        400,
        "min_tokens",
    ),
    "stop_token_id_over_int32": (
        lambda c, m, d: c.chat([{"role": "user", "content": "hi"}], stop_token_ids=[2**31]),
        400,
        "stop_token_ids",
    ),
    "logit_bias_key_over_int32": (
        lambda c, m, d: c.chat([{"role": "user", "content": "hi"}], logit_bias={str(2**31): 1}),
        400,
        "logit_bias",
    ),
    "template_kwarg_tokenize": (
        lambda c, m, d: c.chat([{"role": "user", "content": "hi"}], chat_template_kwargs={"tokenize": True}),
        400,
        "chat_template_kwargs",
    ),
    "url_host_label_too_long": (  # refused before any name resolution
        lambda c, m, d: c.chat(
            _user({"type": "image_url", "image_url": {"url": "http://" + "a" * 300 + ".invalid/x.png"}}, TEXT)
        ),
        400,
        "image_url",
    ),
    "prompts_times_n": (
        lambda c, m, d: c.http.post(
            "/v1/completions", json={"model": SERVED, "prompt": ["a"] * 200, "n": 100, "max_tokens": 1}
        ),
        400,
        "prompt",
    ),
    # found by tests/test_schema_fuzz.py: SGLang sampling params that CompletionRequest refuses (what the fuzzer
    # sent, shrunk: top_p=false)
    "sglang_param_out_of_range": (
        lambda c, m, d: c.http.post(
            "/generate",
            json={
                "input_ids": [66350, 106, 662, 8925],
                "sampling_params": {
                    "top_k": False,
                    "top_p": False,
                    "frequency_penalty": 0.0,
                    "logit_bias": {},
                },
                "stream": False,
            },
        ),
        400,
        "sampling_params.top_p",
    ),
    "sglang_param_out_of_range_streamed": (
        lambda c, m, d: c.http.post(
            "/generate", json={"text": "hi", "sampling_params": {"max_new_tokens": -1}, "stream": True}
        ),
        400,
        "sampling_params.max_new_tokens",
    ),
    "url_not_image": (
        lambda c, m, d: c.chat(_user({"type": "image_url", "image_url": {"url": m + "/notimage.bin"}}, TEXT)),
        400,
        "image_url",
    ),
    "url_404": (
        lambda c, m, d: c.chat(_user({"type": "image_url", "image_url": {"url": m + "/missing.png"}}, TEXT)),
        400,
        "image_url",
    ),
    "unreachable_url": (
        lambda c, m, d: c.chat(
            _user({"type": "image_url", "image_url": {"url": f"http://127.0.0.1:{free_port()}/x.png"}}, TEXT)
        ),
        400,
        "image_url",
    ),
    "slow_url": (
        lambda c, m, d: c.chat(_user({"type": "image_url", "image_url": {"url": m + "/slow.png"}}, TEXT)),
        400,
        "image_url",
    ),
    "path_outside_allowed": (
        lambda c, m, d: c.chat(
            _user({"type": "image_url", "image_url": {"url": str(sample_photo("grace_hopper.jpg"))}}, TEXT)
        ),
        400,
        "image_url",
    ),
    "path_traversal": (
        lambda c, m, d: c.chat(
            _user({"type": "image_url", "image_url": {"url": str(d / ".." / "etc-passwd")}}, TEXT)
        ),
        400,
        "image_url",
    ),
    "too_long_after_images": (
        lambda c, m, d: c.chat(_user(image_part(noise_image(1400, 1400, 9)), TEXT)),
        400,
        "messages",
    ),
    "max_tokens_over_context": (
        lambda c, m, d: c.chat([{"role": "user", "content": "hi"}], max_tokens=5000),
        400,
        "max_tokens",
    ),
    "unknown_model": (
        lambda c, m, d: c.http.post(
            "/v1/chat/completions",
            json={"model": "no-such-model", "messages": [{"role": "user", "content": "hi"}]},
        ),
        404,
        "model",
    ),
    "negative_temperature": (
        lambda c, m, d: c.chat([{"role": "user", "content": "hi"}], temperature=-1),
        400,
        "temperature",
    ),
    "typed_placeholder": (
        lambda c, m, d: c.chat([{"role": "user", "content": "<|image_pad|> hi"}]),
        400,
        "messages",
    ),
}


@pytest.mark.parametrize("name", sorted(BAD))
def test_bad_input_is_4xx_and_cluster_still_serves(cluster, media_server, local_media, name):
    call, status, param = BAD[name]
    t0 = time.monotonic()
    _assert_error(call(cluster, media_server, local_media), status, param)
    assert time.monotonic() - t0 < 30
    ok = cluster.chat_ok([{"role": "user", "content": "still there?"}], max_tokens=2)
    assert ok["choices"][0]["finish_reason"] == "length"


def test_loopback_url_refused_without_flag(strict_gateway, media_server):
    r = strict_gateway.post(
        "/v1/chat/completions",
        json={
            "model": SERVED,
            "messages": _user({"type": "image_url", "image_url": {"url": media_server + "/photo.jpg"}}, TEXT),
        },
    )
    _assert_error(r, 400, "image_url")
    assert "allow-private-media-urls" in r.json()["error"]["message"]
    r = strict_gateway.post(
        "/v1/chat/completions",
        json={
            "model": SERVED,
            "messages": _user({"type": "image_url", "image_url": {"url": "http://localhost:9/x.png"}}, TEXT),
        },
    )
    _assert_error(r, 400, "image_url")


def test_image_over_byte_cap_is_413(strict_gateway):
    big = png_bytes(noise_image(400, 400, 1))
    assert len(big) > 100000
    r = strict_gateway.post(
        "/v1/chat/completions",
        json={
            "model": SERVED,
            "messages": _user({"type": "image_url", "image_url": {"url": data_uri(big)}}, TEXT),
        },
    )
    _assert_error(r, 413)


def test_local_paths_disabled_by_default(strict_gateway, local_media):
    r = strict_gateway.post(
        "/v1/chat/completions",
        json={
            "model": SERVED,
            "messages": _user(
                {"type": "image_url", "image_url": {"url": str(local_media / "photo.jpg")}}, TEXT
            ),
        },
    )
    _assert_error(r, 400, "image_url")


def test_gateway_and_scheduler_never_load_torch(cluster):
    """Checked on the running processes after they served image requests: torch's shared library is mapped
    into the worker and vision processes and into neither gateway nor scheduler."""
    cluster.chat_ok(_user(image_part(noise_image(64, 64, 8)), TEXT), max_tokens=2)
    pids = cluster.child_pids()
    assert set(pids) == {"gateway", "scheduler", "worker", "vision"}

    def maps_torch(pid: int) -> bool:
        return "libtorch" in Path(f"/proc/{pid}/maps").read_text()

    assert maps_torch(pids["worker"]) and maps_torch(pids["vision"])
    assert not maps_torch(pids["gateway"])
    assert not maps_torch(pids["scheduler"])


def test_torch_free_imports_in_a_fresh_interpreter(default_model):
    code = (
        "import sys\n"
        "from gateway.app import create_app\n"
        "from gateway.config import GatewayArgs\n"
        "import scheduler_svc.server, scheduler_svc.__main__, gateway.__main__\n"
        f"create_app(GatewayArgs(model_path={str(default_model)!r}))\n"
        "print('torch' in sys.modules)\n"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr
    assert out.stdout.strip() == "False"


def test_base64_roundtrip_sanity():
    assert base64.b64decode(data_uri(b"abc").split(",", 1)[1]) == b"abc"


def test_api_key(cluster, default_model, log_dir):
    """--api-key: every route but --open-paths needs the bearer key (401 in OpenAI's shape otherwise), streams
    included; /server_info does not print it."""
    key = "k-3f9a"
    flags = ("--api-key", key, "--open-paths", "/health", "/v1/models")
    with _extra_gateway(cluster, default_model, log_dir, "keyed-gateway", *flags) as http:
        chat = {"model": SERVED, "messages": [{"role": "user", "content": "hi"}], "max_tokens": 2}
        for headers in ({}, {"Authorization": "Bearer wrong"}, {"Authorization": key}):
            r = http.post("/v1/chat/completions", json=chat, headers=headers)
            _assert_error(r, 401)
            assert r.json()["error"]["code"] == "invalid_api_key"
        assert http.get("/server_info").status_code == 401
        assert http.get("/health").status_code == 200 and http.get("/v1/models").status_code == 200
        ok = {"Authorization": f"Bearer {key}"}
        assert http.post("/v1/chat/completions", json=chat, headers=ok).status_code == 200
        with http.stream("POST", "/v1/chat/completions", json={**chat, "stream": True}, headers=ok) as r:
            assert r.status_code == 200 and b"[DONE]" in r.read()
        client = openai.OpenAI(base_url=str(http.base_url).rstrip("/") + "/v1", api_key=key, max_retries=0)
        assert client.chat.completions.create(**chat).choices[0].finish_reason == "length"
        info = http.get("/server_info", headers=ok).json()
        assert info["gateway_args"]["api_key"] == "<set>" and key not in json.dumps(info)


def test_image_count_is_checked_before_anything_is_fetched(cluster):
    """33 URLs to a closed loopback port: refused for their count, not after 33 failed fetches."""
    url = f"http://127.0.0.1:{free_port()}/x.png"
    parts = [{"type": "image_url", "image_url": {"url": url}} for _ in range(33)]
    r = cluster.chat(_user(*parts, TEXT))
    _assert_error(r, 400, "messages")
    assert "at most 32 images" in r.json()["error"]["message"]


def test_a_huge_prompt_does_not_stall_the_gateway(cluster):
    """A 5.8 MB text prompt takes seconds to tokenize; meanwhile /health and other requests are answered."""
    big = "hello world, this is a test. " * 200_000
    with ThreadPoolExecutor(1) as pool:
        slow = pool.submit(
            cluster.http.post, "/v1/completions", json={"model": SERVED, "prompt": big, "max_tokens": 1}
        )
        time.sleep(0.5)  # it is being tokenized now
        t0 = time.monotonic()
        assert cluster.http.get("/health").status_code == 200
        health_s = time.monotonic() - t0
        r = slow.result(timeout=120)
    _assert_error(r, 400, "messages")  # far past the context
    assert health_s < 1.0, health_s


def test_overload_and_unavailable_responses_say_when_to_retry():
    from common.errors import InvalidRequestError, ResourceExhaustedError, UnavailableError
    from gateway.errors import error_response

    assert error_response(ResourceExhaustedError("busy")).status_code == 429
    assert error_response(ResourceExhaustedError("busy")).headers["retry-after"] == "1"
    assert error_response(UnavailableError("down")).headers["retry-after"] == "1"
    assert "retry-after" not in error_response(InvalidRequestError("bad")).headers


def test_request_timeout_aborts_the_request_everywhere(cluster, default_model, log_dir):
    """--request-timeout-s: past it the client gets a 504 (also while streaming: an error event) and the scheduler
    has aborted the request, its pages freed (issue 10 item 7)."""
    import grpc

    from protos import common_pb2, scheduler_pb2, scheduler_pb2_grpc

    body = {"model": SERVED, "messages": [{"role": "user", "content": "go on"}], "max_tokens": 2000,
            "ignore_eos": True}  # fmt: skip
    with _extra_gateway(
        cluster, default_model, log_dir, "timeout-gateway", "--request-timeout-s", "1"
    ) as http:
        t0 = time.monotonic()
        r = http.post("/v1/chat/completions", json=body)
        assert r.status_code == 504, r.text
        assert time.monotonic() - t0 < 10
        with http.stream("POST", "/v1/chat/completions", json={**body, "stream": True}) as s:
            text = s.read().decode()
        assert '"code": 504' in text and text.rstrip().endswith("[DONE]")
    with grpc.insecure_channel(cluster.scheduler_address) as channel:
        stub = scheduler_pb2_grpc.SchedulerStub(channel)
        deadline = time.monotonic() + 10
        while (
            stats := stub.GetStats(scheduler_pb2.GetStatsRequest())
        ).num_running and time.monotonic() < deadline:
            time.sleep(0.1)
        assert stats.num_running == 0 and stats.num_queued == 0
        # a direct gRPC caller's deadline does the same
        call = stub.Generate(
            scheduler_pb2.GenerateRequest(
                request_id="deadline-1",
                input_ids=[11, 12, 13],
                stopping=scheduler_pb2.StoppingCriteria(max_new_tokens=2000, ignore_eos=True),
                sampling=common_pb2.SamplingParams(temperature=0, top_p=1, repetition_penalty=1),
            ),
            timeout=0.5,
        )
        with pytest.raises(grpc.RpcError) as e:
            for _ in call:
                pass
        assert e.value.code() == grpc.StatusCode.DEADLINE_EXCEEDED
        deadline = time.monotonic() + 10
        while (
            stats := stub.GetStats(scheduler_pb2.GetStatsRequest())
        ).num_running and time.monotonic() < deadline:
            time.sleep(0.1)
        assert stats.num_running == 0


def _png_claiming(width: int, height: int) -> bytes:
    """A 1x1 PNG whose header claims width x height (only headers are read before the limits apply)."""
    import struct
    import zlib

    data = bytearray(png_bytes(noise_image(1, 1, 0)))
    ihdr = 8 + 8  # signature, then length + type of the IHDR chunk
    data[ihdr : ihdr + 8] = struct.pack(">II", width, height)
    data[ihdr + 13 : ihdr + 17] = struct.pack(">I", zlib.crc32(bytes(data[ihdr - 4 : ihdr + 13])))
    return bytes(data)


def test_total_pixels_of_a_request_are_capped_from_the_headers(cluster):
    """Three images of 81 MP each (under the per-image cap): 243 MP for the vision service to decode, over the
    per-request cap, so a 413 from their headers alone (issue 10 item 6)."""
    big = image_part_bytes(_png_claiming(9000, 9000))
    t0 = time.monotonic()
    r = cluster.chat(_user(big, big, big, TEXT))
    _assert_error(r, 413, "messages")
    assert "per request" in r.json()["error"]["message"]
    assert time.monotonic() - t0 < 5


def test_an_unhandled_error_is_a_500_in_openai_shape_and_keeps_the_connection(default_model):
    """Last resort (gateway/app.py `_InternalErrors`): a route that raises answers 500 in the error shape, and the
    keep-alive connection serves the next request (Starlette re-raised, and uvicorn dropped the connection)."""
    import socket
    import threading

    import uvicorn
    from fastapi import FastAPI
    from fastapi.responses import StreamingResponse

    from gateway.app import _InternalErrors, create_app
    from gateway.config import GatewayArgs
    from tests.helpers import free_port

    gateway = create_app(GatewayArgs(model_path=str(default_model)))
    assert any(m.cls is _InternalErrors for m in gateway.user_middleware), "the gateway must install it"
    app = FastAPI()
    app.add_middleware(_InternalErrors)

    @app.get("/boom")
    async def boom():
        raise RuntimeError("injected")

    @app.get("/half")
    async def half():  # fails after its response started
        async def events():
            yield b"data: 1\n\n"
            raise RuntimeError("injected mid-stream")

        return StreamingResponse(events(), media_type="text/event-stream")

    @app.get("/ok")
    async def ok():
        return {"ok": True}

    port = free_port()
    server = uvicorn.Server(uvicorn.Config(app, host="127.0.0.1", port=port, log_level="critical"))
    thread = threading.Thread(target=server.run, daemon=True)
    thread.start()
    try:
        deadline = time.monotonic() + 30
        while not server.started:
            assert time.monotonic() < deadline
            time.sleep(0.05)
        with socket.create_connection(("127.0.0.1", port), timeout=10) as s:
            request = "GET {} HTTP/1.1\r\nHost: 127.0.0.1\r\n\r\n"
            s.sendall((request.format("/boom") + request.format("/half") + request.format("/ok")).encode())
            data = b""
            while data.count(b"HTTP/1.1 ") < 3 or not data.endswith(b"}"):
                chunk = s.recv(65536)
                if not chunk:
                    break
                data += chunk
        first, _, rest = data.partition(b"HTTP/1.1 200")
        second, _, third = rest.partition(b"HTTP/1.1 200")
        assert first.startswith(b"HTTP/1.1 500") and b'"internal_error"' in first, data
        assert b"data: 1" in second and second.endswith(b"0\r\n\r\n"), data  # the stream ended cleanly
        assert third.endswith(b'{"ok":true}'), data
    finally:
        server.should_exit = True
        thread.join(10)


def test_request_models_from_bytes_equal_the_general_path():
    """Bodies go straight from bytes to the request model (pydantic's JSON parser); the result equals
    json.loads + model_validate (surrogate pairs, i.e. escaped emoji, included), and anything the fast path
    refuses (a lone-surrogate escape, bad JSON, a non-object, an invalid field) goes back to the general path,
    which gives the exact 400."""
    from gateway.app import _json_body, _validated_from_bytes
    from gateway.protocol import ChatCompletionRequest, CompletionRequest

    chat = {
        "model": "m",
        "messages": [
            {"role": "system", "content": "Be brief. \u00e9\u4e2d"},
            {"role": "user", "content": [
                {"type": "image_url", "image_url": {"url": "data:image/png;base64,iVBORw0KGgo=", "detail": "low"}},
                {"type": "text", "text": "what is this? \U0001f600"},
            ]},
        ],
        "tools": [{"type": "function", "function": {"name": "f", "parameters": {"type": "object", "properties": {}}}}],
        "response_format": {"type": "json_schema", "json_schema": {"name": "x", "schema": {"type": "object"}}},
        "temperature": 0.5, "top_p": 1, "max_tokens": 16, "stop": ["a", "b"], "logit_bias": {"5": -100},
        "stream": True, "stream_options": {"include_usage": True}, "seed": 12345678901234,
    }  # fmt: skip
    for model_cls, body in (
        (ChatCompletionRequest, chat),
        (CompletionRequest, {"model": "m", "prompt": [1, 2]}),
    ):
        for raw in (json.dumps(body).encode(), json.dumps(body, ensure_ascii=False).encode()):
            fast = _validated_from_bytes(model_cls, raw)
            assert fast is not None and fast == model_cls.model_validate(_json_body(raw))
    for raw in (
        b'{"model": "m", "prompt": "\\ud800"}',  # a lone surrogate: the general path refuses it by name
        b'{"model": "m", "prompt": "a\\udc00b"}',
        b'{"model": "m", "prompt": ',
        b"[1, 2]",
        b'{"model": "m", "prompt": "x", "max_tokens": "many"}',
    ):
        assert _validated_from_bytes(CompletionRequest, raw) is None


def test_stream_usage_running_totals_equal_a_recount():
    """continuous_usage_stats reads a stream's counts for every event, kept as running totals: after every output
    they equal a recount (finished choices by the scheduler's exact count, the others by the ids seen so far)."""
    import random

    from common.types import GenerateOutput, GenerateRequest
    from gateway.serving import _StreamUsage

    rng = random.Random(7)
    greqs = [GenerateRequest(f"r{k}", list(range(5 + k))) for k in range(3)]
    usage = _StreamUsage(greqs)
    choices: list[list[tuple[int, GenerateOutput]]] = []
    for k in range(3):
        for index in range(2):
            one = [
                (k, GenerateOutput(f"r{k}", index, "x", [1] * rng.randrange(0, 3)))
                for _ in range(rng.randrange(5))
            ]
            last = GenerateOutput(f"r{k}", index, "", [1] * rng.randrange(0, 2), finish_reason="length")
            last.completion_tokens, last.cached_tokens = rng.randrange(1, 9), rng.randrange(0, 4)
            choices.append([*one, (k, last)])
    outs = []  # the choices interleave at random, each in its own order (its finish last)
    while choices:
        one = rng.choice(choices)
        outs.append(one.pop(0))
        if not one:
            choices.remove(one)
    seen: dict[tuple[int, int], int] = {}
    done: dict[tuple[int, int], int] = {}
    cached: dict[int, int] = {}
    for k, out in outs:
        usage.add(k, out)
        key = (k, out.index)
        seen[key] = seen.get(key, 0) + len(out.token_ids)
        if out.finish_reason is not None:
            done[key] = out.completion_tokens
            cached[k] = max(cached.get(k, 0), out.cached_tokens)
        expect = sum(done.get(key, n) for key, n in seen.items())
        assert usage.counts() == (sum(len(g.input_ids) for g in greqs), expect, sum(cached.values()))
