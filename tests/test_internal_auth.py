"""Internal trust (issue 10, item 5): the gRPC services authenticate their callers.

Through real processes on loopback: a cluster with mutual TLS (`mirador certs`, `--tls-dir`) admits each service's
callers by certificate name only, so the gateway's key cannot drive the worker; a cluster with a shared token
refuses calls without it. Health stays open for probes. A service refuses to listen beyond loopback with neither.
"""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import grpc
import pytest
from grpc_health.v1 import health_pb2, health_pb2_grpc
from grpc_reflection.v1alpha import reflection_pb2, reflection_pb2_grpc

from common.security import TOKEN_ENV, InternalAuth, is_loopback
from mirador.certs import write_certs
from protos import scheduler_pb2, scheduler_pb2_grpc, vision_pb2, vision_pb2_grpc, worker_pb2, worker_pb2_grpc
from tests.helpers import REPO, Cluster, image_part, noise_image
from worker_svc.config import WorkerArgs

TOKEN = "5f0c1c7e2a9b4d3e8f6a7b1c2d3e4f50"

# One cheap call per service, and the worker's step stream (what a hijacker would open).
CALLS = {
    "worker": lambda ch, **kw: worker_pb2_grpc.WorkerStub(ch).GetInfo(
        worker_pb2.GetInfoRequest(), timeout=10, **kw
    ),
    "scheduler": lambda ch, **kw: scheduler_pb2_grpc.SchedulerStub(ch).GetStats(
        scheduler_pb2.GetStatsRequest(), timeout=10, **kw
    ),
    "vision": lambda ch, **kw: vision_pb2_grpc.VisionStub(ch).GetInfo(
        vision_pb2.GetInfoRequest(), timeout=10, **kw
    ),
}


def open_steps(ch: grpc.Channel, **kw) -> None:
    """Open the worker's step stream and read its first answer (an empty step, or the refusal)."""
    next(iter(worker_pb2_grpc.WorkerStub(ch).Steps(iter([worker_pb2.StepRequest()]), timeout=10, **kw)))


def code_of(fn, *args, **kw) -> grpc.StatusCode:
    try:
        fn(*args, **kw)
    except grpc.RpcError as e:
        return e.code()
    return grpc.StatusCode.OK


def health(ch: grpc.Channel) -> int:
    return health_pb2_grpc.HealthStub(ch).Check(health_pb2.HealthCheckRequest(), timeout=10).status


def ports(c: Cluster) -> dict[str, int]:
    return {"worker": c.worker_port, "scheduler": c.scheduler_port, "vision": c.vision_port}


def chat_with_image_works(c: Cluster) -> None:
    """The services reach each other: the scheduler encodes on vision, the worker pulls embeddings, and so on."""
    messages = [
        {"role": "user", "content": [image_part(noise_image(64, 64, seed=3)), {"type": "text", "text": "hi"}]}
    ]
    out = c.chat_ok(messages, max_tokens=4, temperature=0)
    assert out["usage"]["completion_tokens"] == 4


# ---------------------------------------------------------------------------------------------- pure parts


def test_loopback_addresses():
    for host in ("127.0.0.1", "127.3.4.5", "::1", "[::1]", "localhost", "LOCALHOST"):
        assert is_loopback(host), host
    for host in ("0.0.0.0", "::", "10.0.0.1", "192.168.1.2", "example.com", "worker", ""):
        assert not is_loopback(host), host


def test_a_service_refuses_to_listen_beyond_loopback_without_authentication(
    default_model, tmp_path, monkeypatch
):
    monkeypatch.delenv(TOKEN_ENV, raising=False)
    with pytest.raises(ValueError, match="--tls-dir .* --internal-token-file"):
        WorkerArgs(model_path=str(default_model), host="0.0.0.0")
    WorkerArgs(model_path=str(default_model), host="127.0.0.1")
    WorkerArgs(model_path=str(default_model), host="0.0.0.0", internal_token_file=str(tmp_path / "t"))
    WorkerArgs(model_path=str(default_model), host="0.0.0.0", tls_dir=str(tmp_path))
    WorkerArgs(model_path=str(default_model), host="0.0.0.0", allow_unauthenticated_internal=True)
    monkeypatch.setenv(TOKEN_ENV, TOKEN)
    WorkerArgs(model_path=str(default_model), host="0.0.0.0")
    # the command line says what to do, and exits before loading anything
    monkeypatch.delenv(TOKEN_ENV)
    proc = subprocess.run(
        [sys.executable, "-m", "mirador", "worker", "--model-path", str(default_model), "--host", "0.0.0.0"],
        capture_output=True,
        text=True,
        timeout=120,
        cwd=REPO,
    )
    assert proc.returncode == 2 and "beyond loopback" in proc.stderr, proc.stderr


def test_credentials_are_checked_when_loaded(tmp_path, monkeypatch):
    monkeypatch.delenv(TOKEN_ENV, raising=False)
    args = WorkerArgs(model_path="m", internal_token_file=str(tmp_path / "missing"))
    with pytest.raises(ValueError, match="--internal-token-file"):
        InternalAuth.from_args(args, "worker")
    (tmp_path / "short").write_text("abc\n")
    with pytest.raises(ValueError, match="at least 16"):
        InternalAuth.from_args(
            WorkerArgs(model_path="m", internal_token_file=str(tmp_path / "short")), "worker"
        )
    (tmp_path / "token").write_text(TOKEN + "\n")
    auth = InternalAuth.from_args(
        WorkerArgs(model_path="m", internal_token_file=str(tmp_path / "token")), "worker"
    )
    assert auth.token == TOKEN and not auth.tls
    with pytest.raises(ValueError, match="mirador certs"):
        InternalAuth.from_args(WorkerArgs(model_path="m", tls_dir=str(tmp_path)), "worker")


# ---------------------------------------------------------------------------------------------- mutual TLS


@pytest.fixture(scope="module")
def tls_dir(tmp_path_factory) -> Path:
    d = tmp_path_factory.mktemp("tls")
    proc = subprocess.run(
        [sys.executable, "-m", "mirador", "certs", "--out", str(d)],
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert proc.returncode == 0, proc.stderr
    return d


@pytest.fixture(scope="module")
def tls_cluster(default_model, log_dir, tls_dir):
    c = Cluster(default_model, "--tls-dir", str(tls_dir), log_dir=log_dir, name="mtls")
    yield c
    c.stop()


def tls_channel(port: int, d: Path, role: str | None) -> grpc.Channel:
    ca = (d / "ca.pem").read_bytes()
    if role is None:  # a TLS client with no certificate of its own
        return grpc.secure_channel(f"127.0.0.1:{port}", grpc.ssl_channel_credentials(ca))
    key, cert = (d / f"{role}-key.pem").read_bytes(), (d / f"{role}.pem").read_bytes()
    return grpc.secure_channel(f"127.0.0.1:{port}", grpc.ssl_channel_credentials(ca, key, cert))


def test_mtls_cluster_serves(tls_cluster):
    chat_with_image_works(tls_cluster)
    assert "callers authenticated by: mutual TLS as 'worker'" in tls_cluster.log()
    info = tls_cluster.http.get("/server_info").json()  # on one host the hot streams take the Unix sockets
    assert (info["step_transport"], info["connect_transport"]) == ("unix", "unix")


def test_mtls_admits_each_service_s_callers_by_certificate_name(tls_cluster, tls_dir):
    allowed = {
        "worker": {"scheduler", "admin"},
        "scheduler": {"gateway", "admin"},
        "vision": {"scheduler", "worker", "gateway", "admin"},
    }
    for service, port in ports(tls_cluster).items():
        for role in ("gateway", "scheduler", "worker", "vision", "admin"):
            with tls_channel(port, tls_dir, role) as ch:
                want = grpc.StatusCode.OK if role in allowed[service] else grpc.StatusCode.PERMISSION_DENIED
                assert code_of(CALLS[service], ch) == want, (service, role)
                assert health(ch) == health_pb2.HealthCheckResponse.SERVING  # probes need no role
                names = reflection_pb2_grpc.ServerReflectionStub(ch).ServerReflectionInfo(
                    iter([reflection_pb2.ServerReflectionRequest(list_services="")]), timeout=10
                )
                assert next(iter(names)).list_services_response.service  # any cluster certificate may list


def test_only_the_scheduler_can_open_the_worker_s_step_stream(tls_cluster, tls_dir):
    for role in ("gateway", "vision", "worker"):
        with tls_channel(tls_cluster.worker_port, tls_dir, role) as ch:
            assert code_of(open_steps, ch) == grpc.StatusCode.PERMISSION_DENIED, role
    # the scheduler's certificate gets past authentication (and then finds the stream taken by the real scheduler)
    with tls_channel(tls_cluster.worker_port, tls_dir, "scheduler") as ch:
        assert code_of(open_steps, ch) == grpc.StatusCode.FAILED_PRECONDITION
    chat_with_image_works(tls_cluster)


def test_mtls_refuses_plaintext_no_certificate_and_another_ca(tls_cluster, tls_dir, tmp_path):
    other = tmp_path / "other"
    write_certs(other)  # a CA the cluster does not trust, with the right role names
    for port in ports(tls_cluster).values():
        with grpc.insecure_channel(f"127.0.0.1:{port}") as ch:
            assert code_of(health, ch) == grpc.StatusCode.UNAVAILABLE
        with tls_channel(port, tls_dir, None) as ch:
            assert code_of(health, ch) == grpc.StatusCode.UNAVAILABLE
        ca = (tls_dir / "ca.pem").read_bytes()  # trusts the server, presents a foreign client certificate
        creds = grpc.ssl_channel_credentials(
            ca, (other / "admin-key.pem").read_bytes(), (other / "admin.pem").read_bytes()
        )
        with grpc.secure_channel(f"127.0.0.1:{port}", creds) as ch:
            assert code_of(open_steps, ch) == grpc.StatusCode.UNAVAILABLE


# ---------------------------------------------------------------------------------------------- shared token


@pytest.fixture(scope="module")
def token_cluster(default_model, log_dir, tmp_path_factory):
    f = tmp_path_factory.mktemp("token") / "token"
    f.write_text(TOKEN + "\n")
    c = Cluster(default_model, "--internal-token-file", str(f), log_dir=log_dir, name="token")
    yield c
    c.stop()


def test_token_cluster_serves_and_refuses_calls_without_the_token(token_cluster):
    chat_with_image_works(token_cluster)
    info = token_cluster.http.get("/server_info").json()  # the local streams' hellos carried the token
    assert (info["step_transport"], info["connect_transport"]) == ("unix", "unix")
    good = (("authorization", f"Bearer {TOKEN}"),)
    bad = [None, (("authorization", "Bearer " + "0" * 32),), (("authorization", TOKEN),)]
    for service, port in ports(token_cluster).items():
        call = CALLS[service]
        with grpc.insecure_channel(f"127.0.0.1:{port}") as ch:
            for md in bad:
                assert code_of(call, ch, metadata=md) == grpc.StatusCode.UNAUTHENTICATED, md
            assert code_of(call, ch, metadata=good) == grpc.StatusCode.OK, service
            assert health(ch) == health_pb2.HealthCheckResponse.SERVING  # probes carry no token
    with grpc.insecure_channel(f"127.0.0.1:{token_cluster.worker_port}") as ch:
        assert code_of(open_steps, ch) == grpc.StatusCode.UNAUTHENTICATED
        assert code_of(open_steps, ch, metadata=good) == grpc.StatusCode.FAILED_PRECONDITION
    chat_with_image_works(token_cluster)
