"""Several gateway processes in front of one scheduler: every request is served once, by any of them, and an
abandoned stream is aborted from the process that held it."""

from __future__ import annotations

import concurrent.futures
import time

import httpx

from tests.helpers import SERVED, Cluster, samples, value


def test_two_gateway_workers_share_one_scheduler(default_model, log_dir):
    c = Cluster(
        default_model, "--gateway-workers", "2", "--page-size", "4", log_dir=log_dir, name="gw-workers"
    )
    try:
        gateway_pid = c.child_pids()["gateway"]
        workers = [p for p in _children(gateway_pid) if b"spawn_main" in _cmdline(p)]  # uvicorn's processes
        assert len(workers) == 2, workers

        def ask(i: int) -> str:
            r = c.chat([{"role": "user", "content": f"count {i}"}], max_tokens=8, temperature=0)
            assert r.status_code == 200, r.text
            return r.json()["choices"][0]["message"]["content"]

        with concurrent.futures.ThreadPoolExecutor(8) as pool:
            texts = list(pool.map(ask, range(16)))
        assert all(isinstance(t, str) for t in texts)
        assert texts[3] == ask(3)  # greedy: the same answer whichever process served it
        # each scrape, on a new connection, is answered by either process with the figures of both
        for _ in range(6):
            snap = samples(httpx.get(f"{c.base_url}/metrics", timeout=30, trust_env=False).text)
            chats = {"endpoint": "/v1/chat/completions", "status": "200"}
            assert value(snap, "mirador:http_requests_total", **chats) == 17
            assert value(snap, "mirador:e2e_request_latency_seconds_count", service="gateway") == 17

        body = {"model": SERVED, "messages": [{"role": "user", "content": "go"}], "max_tokens": 4000,
                "ignore_eos": True, "stream": True}  # fmt: skip
        client = httpx.Client(base_url=c.base_url, timeout=60, trust_env=False)
        with client, client.stream("POST", "/v1/chat/completions", json=body) as r:
            for i, _line in enumerate(r.iter_lines()):
                if i > 5:
                    break  # the client goes away mid-stream
        deadline = time.monotonic() + 10
        while c.stats().num_running and time.monotonic() < deadline:
            time.sleep(0.1)
        assert c.stats().num_running == 0
    finally:
        c.stop()


def _children(pid: int) -> list[int]:
    from pathlib import Path

    out = []
    for entry in Path("/proc").iterdir():
        if entry.name.isdigit():
            try:
                if int((entry / "stat").read_text().rsplit(")", 1)[1].split()[1]) == pid:
                    out.append(int(entry.name))
            except (OSError, ValueError, IndexError):
                continue
    return out


def _cmdline(pid: int) -> bytes:
    try:
        with open(f"/proc/{pid}/cmdline", "rb") as fh:
            return fh.read()
    except OSError:
        return b""
