"""The `mirador` command: default-model, --help, Hub ids through the local cache, sharded checkpoints, and
`mirador up` stopping every service on SIGTERM or Ctrl-C (issue 2)."""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

from tests.helpers import REPO, Cluster


def test_default_model_prints_the_directory(default_model):
    out = subprocess.run(
        [sys.executable, "-m", "mirador", "default-model"],
        capture_output=True,
        text=True,
        cwd=REPO,
        timeout=120,
    )
    assert out.returncode == 0, out.stderr
    assert Path(out.stdout.strip()) == default_model
    for name in (
        "config.json",
        "model.safetensors",
        "tokenizer.json",
        "preprocessor_config.json",
        "generation_config.json",
        "chat_template.json",
    ):
        assert (default_model / name).is_file()
    gen = json.loads((default_model / "generation_config.json").read_text())
    assert set(gen) == {"eos_token_id", "pad_token_id"}  # no sampling defaults: greedy parity stays greedy


@pytest.mark.parametrize("cmd", [["--help"], ["up", "--help"], ["worker", "--help"], ["gateway", "--help"]])
def test_help_explains(cmd):
    out = subprocess.run(
        [sys.executable, "-m", "mirador", *cmd], capture_output=True, text=True, cwd=REPO, timeout=60
    )
    assert out.returncode == 0, out.stderr
    assert "--model" in out.stdout or "commands:" in out.stdout


def test_hub_id_resolves_through_the_local_cache_offline(tmp_path, default_model):
    """A Hub id is resolved by huggingface_hub from a cache this test fills (HF_HUB_OFFLINE=1: no network)."""
    cache = tmp_path / "hub"
    snap = cache / "models--acme--tiny-vl" / "snapshots" / "0123456789abcdef0123456789abcdef01234567"
    snap.mkdir(parents=True)
    for f in default_model.iterdir():
        shutil.copy(f, snap / f.name)
    (cache / "models--acme--tiny-vl" / "refs").mkdir()
    (cache / "models--acme--tiny-vl" / "refs" / "main").write_text(snap.name)
    code = "from processor.hub import resolve_model_path; print(resolve_model_path('acme/tiny-vl'))"
    env = {**os.environ, "HF_HUB_CACHE": str(cache), "HF_HUB_OFFLINE": "1"}
    out = subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, env=env, cwd=REPO, timeout=60
    )
    assert out.returncode == 0, out.stderr
    assert Path(out.stdout.strip()) == snap
    missing = subprocess.run(
        [sys.executable, "-c", code.replace("acme/tiny-vl", "acme/absent")],
        capture_output=True,
        text=True,
        env=env,
        cwd=REPO,
        timeout=60,
    )
    assert missing.returncode != 0 and "HF_HUB_OFFLINE" in missing.stderr


def test_sharded_checkpoint_with_index_loads_the_same(tmp_path, default_model):
    from safetensors.torch import load_file, save_file

    from models.loader import load_model
    from models.qwen2_5_vl import Qwen2_5_VLForCausalLM
    from models.qwen2_5_vl_vision import Qwen2_5_VisionTransformer
    from processor.model_config import load_model_config

    for f in default_model.iterdir():
        if f.suffix != ".safetensors":
            shutil.copy(f, tmp_path / f.name)
    tensors = load_file(str(default_model / "model.safetensors"))
    names = sorted(tensors)
    shards = {"model-00001-of-00002.safetensors": names[::2], "model-00002-of-00002.safetensors": names[1::2]}
    weight_map = {}
    for shard, keys in shards.items():
        save_file({k: tensors[k] for k in keys}, str(tmp_path / shard), metadata={"format": "pt"})
        weight_map.update(dict.fromkeys(keys, shard))
    (tmp_path / "model.safetensors.index.json").write_text(
        json.dumps({"metadata": {}, "weight_map": weight_map})
    )
    cfg = load_model_config(default_model)
    for cls in (Qwen2_5_VLForCausalLM, Qwen2_5_VisionTransformer):
        a = load_model(cls, cfg, default_model, torch.float32, torch.device("cpu")).state_dict()
        b = load_model(cls, cfg, tmp_path, torch.float32, torch.device("cpu")).state_dict()
        assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


def _alive(pid: int) -> bool:
    try:
        state = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0]
    except OSError:
        return False
    return state != "Z"


@pytest.mark.parametrize("sig", [signal.SIGTERM, signal.SIGINT])
def test_up_stops_every_service_on_signal(default_model, log_dir, sig):
    c = Cluster(default_model, log_dir=log_dir, name=f"signal-{sig.name}")
    try:
        pids = c.child_pids()
        assert set(pids) == {"gateway", "scheduler", "worker", "vision"}
        c.proc.send_signal(sig)
        assert c.proc.wait(60) == 0
        deadline = time.monotonic() + 30
        while any(_alive(p) for p in pids.values()) and time.monotonic() < deadline:
            time.sleep(0.1)
        assert not [name for name, p in pids.items() if _alive(p)], "orphaned services"
    finally:
        c.stop()


def test_up_reports_a_service_that_cannot_start(tmp_path, log_dir):
    bad = tmp_path / "not-a-model"
    bad.mkdir()
    out = subprocess.run(
        [sys.executable, "-m", "mirador", "up", "--model", str(bad), "--port", "0"],
        capture_output=True,
        text=True,
        cwd=REPO,
        timeout=120,
    )
    assert out.returncode != 0
    assert "config.json" in out.stderr


def test_up_places_the_encoder_on_its_own_device():
    from mirador.launcher import UpArgs, same_device, service_args

    assert same_device("auto", "cuda:0") and same_device("cpu", "cpu") and not same_device("cuda:1", "auto")
    shared = service_args(UpArgs(model_path="m", vision_port=0, worker_port=0, scheduler_port=0))
    assert shared["vision"].vision_mem_fraction == shared["worker"].vision_mem_fraction > 0
    own = service_args(
        UpArgs(model_path="m", vision_device="cuda:1", vision_port=0, worker_port=0, scheduler_port=0)
    )
    assert own["vision"].device == "cuda:1" and own["worker"].device == "auto"
    assert own["vision"].vision_mem_fraction == own["worker"].vision_mem_fraction == 0.0
    assert "--vision-device" not in own["vision"].to_cli()  # `up`'s own flag, not a service flag


def test_picked_ports_stay_out_of_the_kernels_ephemeral_range():
    """A port picked for a service must not be one an outgoing connection can take before the service binds it
    (a start-up that failed with "Failed to bind" in CI); a taken preferred port is replaced."""
    import socket

    from common.ports import _ephemeral_start, can_bind, free_port
    from mirador.launcher import _port

    start = _ephemeral_start()
    ports = {free_port("127.0.0.1") for _ in range(20)}
    assert all(10000 <= p < start and can_bind("127.0.0.1", p) for p in ports)
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        s.listen()
        taken = s.getsockname()[1]
        assert _port("127.0.0.1", taken) != taken
    assert 10000 <= _port("127.0.0.1", 0) < start


@pytest.mark.parametrize("which", ["--port", "--metrics-port"])
def test_a_service_whose_port_is_taken_exits_with_its_own_code(default_model, which):
    """A service told to listen on a port another socket holds says so and exits with EXIT_PORT_IN_USE, the code
    `mirador up` answers by picking other ports (a start-up that failed in CI when a picked port was taken)."""
    import socket

    from common.ports import EXIT_PORT_IN_USE, free_port

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        s.listen()
        taken = str(s.getsockname()[1])
        ports = {"--port": str(free_port()), "--metrics-port": str(free_port()), which: taken}
        out = subprocess.run(
            [sys.executable, "-m", "mirador", "vision", "--model-path", str(default_model), "--device", "cpu",
             "--host", "127.0.0.1", *(x for kv in ports.items() for x in kv)],
            capture_output=True, text=True, cwd=REPO, timeout=120,
        )  # fmt: skip
    assert out.returncode == EXIT_PORT_IN_USE, out.stderr[-2000:]
    assert f"127.0.0.1:{taken} is already in use" in out.stderr


def test_up_starts_again_on_other_ports_when_one_was_taken():
    """start_ready: a service exiting with EXIT_PORT_IN_USE during start-up restarts the cluster on freshly
    picked ports, at most PORT_ATTEMPTS times; any other exit fails the start-up at once."""
    from common.ports import EXIT_PORT_IN_USE
    from mirador.launcher import PORT_ATTEMPTS, ServiceExited, start_ready

    class FakeCluster:
        output = None

        def __init__(self, codes):
            self.codes, self.calls = list(codes), []

        async def wait_ready(self):
            if self.codes:
                raise ServiceExited("worker", self.codes.pop(0), "worker")

        def stop(self, grace_s=None):
            self.calls.append("stop")

        def repick_ports(self):
            self.calls.append("repick")

        def start(self, output=None):
            self.calls.append("start")

    c = FakeCluster([EXIT_PORT_IN_USE])
    start_ready(c, {"signal": None})
    assert c.calls == ["stop", "repick", "start"]
    c = FakeCluster([EXIT_PORT_IN_USE] * PORT_ATTEMPTS)
    with pytest.raises(ServiceExited):
        start_ready(c, {"signal": None})
    assert c.calls.count("start") == PORT_ATTEMPTS - 1
    c = FakeCluster([1])
    with pytest.raises(ServiceExited, match="code 1"):
        start_ready(c, {"signal": None})
    assert c.calls == []
