"""Embeddings from the vision service to the worker: the pool (pages, LRU, leases), the mapped transport across
processes (shared memory here, CUDA IPC on a GPU: bit-equal to bytes, no gRPC bytes, one copy per image), the
worker's resident store (one upload per image, prefetch), and that a slow pull never stalls a running decode."""

from __future__ import annotations

import asyncio
import subprocess
import sys
import threading
import time

import grpc
import pytest
import torch

from common.errors import ResourceExhaustedError
from common.grpc_utils import wait_serving
from common.types import MultimodalItem, SamplingParams, SeqInit, SeqStep, StepPlan
from processor.media import content_key
from protos import vision_pb2, vision_pb2_grpc
from tests.helpers import REPO, free_port, noise_image, png_bytes
from vision_svc.embedding_pool import EmbeddingPool, copy_rows, map_shared_pool, page_runs
from worker_svc.embeddings import ResidentEmbeddings

# ---- the pool ----


def _pool(pages: int = 6, rows: int = 4, hidden: int = 8, **kw) -> EmbeddingPool:
    row_bytes = hidden * 4
    return EmbeddingPool(pages * rows * row_bytes, hidden, torch.float32, torch.device("cpu"), rows, **kw)


def _rows(n: int, hidden: int = 8, seed: int = 0) -> torch.Tensor:
    return torch.randn(n, hidden, generator=torch.Generator().manual_seed(seed))


def test_pool_round_trip_and_page_runs():
    pool = _pool(shareable=False)
    a, b = _rows(5), _rows(3, seed=1)
    pool.put("a", a)
    pool.put("b", b)
    assert torch.equal(pool.get("a"), a) and torch.equal(pool.get("b"), b)
    assert pool.get("nope") is None
    _, locs, missing = pool.lease(["a", "nope"])
    assert missing == ["nope"] and locs[0].num_rows == 5 and len(locs[0].page_ids) == 2
    assert page_runs([3, 4, 5, 9, 10, 2]) == [(3, 3), (9, 2), (2, 1)]
    out = torch.empty(5, 8)
    assert copy_rows(pool.data, locs[0].page_ids, 5, out) == 1  # consecutive pages: one copy
    assert torch.equal(out, a)


def test_pool_evicts_lru_but_never_a_leased_entry():
    pool = _pool(pages=4, shareable=False)  # 4 usable pages of 4 rows
    pool.put("a", _rows(8))  # 2 pages
    pool.put("b", _rows(8, seed=1))  # 2 pages: full
    lease_id, _, _ = pool.lease(["a"])
    pool.put("c", _rows(4, seed=2))  # must evict b (a is pinned although older)
    assert "a" in pool and "b" not in pool and "c" in pool and pool.evictions == 1
    with pytest.raises(ResourceExhaustedError):
        pool.put("d", _rows(12, seed=3))  # needs 3 pages; only c's page can go
    assert pool.release(lease_id) and pool.open_leases == 0
    pool.put("d", _rows(12, seed=3))
    assert "a" not in pool and torch.equal(pool.get("d"), _rows(12, seed=3))
    with pytest.raises(ResourceExhaustedError, match="embedding-cache-mb"):
        pool.put("huge", _rows(40))


def test_expired_leases_stop_pinning():
    pool = _pool(pages=2, shareable=False, lease_ttl_s=0.0)
    pool.put("a", _rows(8))
    pool.lease(["a"])  # never released: expires at once
    time.sleep(0.01)
    pool.put("b", _rows(8, seed=1))
    assert "b" in pool and "a" not in pool and pool.open_leases == 0


def test_shared_memory_pool_maps_in_place_and_checks_the_probe():
    pool = _pool()
    try:
        assert pool.kind == "shared_memory"
        info = pool.shared_info()
        view, keep = map_shared_pool(info)
        pool.put("a", _rows(6))
        loc = pool.lease(["a"])[1][0]
        out = torch.empty(6, 8)
        copy_rows(view, loc.page_ids, 6, out)
        assert torch.equal(out, _rows(6))
        assert view.data_ptr() != pool.data.data_ptr() or True  # another mapping of the same segment
        import dataclasses

        with pytest.raises(ValueError, match="probe"):
            map_shared_pool(dataclasses.replace(info, probe_scale=info.probe_scale + 1))
        del view, keep
    finally:
        pool.close()


def test_lease_names_the_ready_event_until_the_rows_are_written():
    """Entries written behind a ready event (an early encode answer) are leased with it until it completes."""

    class _Written:
        done = False

        def query(self):
            return self.done

    pool = _pool()
    pool.put_many([("a", _rows(4)), ("b", _rows(4, seed=1))])
    written = _Written()
    pool._entries["a"].ready_event, pool._entries["a"].written = 3, written  # noqa: SLF001
    lease_id, found, _ = pool.lease(["a", "b"])
    assert [loc.ready_event for loc in found] == [3, 0]
    written.done = True
    assert [loc.ready_event for loc in pool.lease(["a", "b"])[1]] == [0, 0]
    assert pool._entries["a"].written is None  # noqa: SLF001 - forgotten once complete


def test_location_ready_event_round_trips():
    from common.convert import lease_from_proto, lease_to_proto
    from common.types import EmbeddingLease, EmbeddingLocation

    lease = EmbeddingLease("p", 3, (EmbeddingLocation("a", (1, 2), 70, 5), EmbeddingLocation("b", (3,), 2)))
    assert lease_from_proto(lease_to_proto(lease)) == lease


# ---- across processes: the real vision service ----


@pytest.fixture(scope="module")
def vision_service(default_model, log_dir):
    port = free_port()
    log = open(log_dir / f"vision-transport-{port}.log", "wb")  # noqa: SIM115
    proc = subprocess.Popen(
        # on the CPU wherever the tests run: these are the shared-memory (host) transport's tests
        [
            sys.executable,
            "-m",
            "mirador",
            "vision",
            "--model",
            str(default_model),
            "--port",
            str(port),
            "--device",
            "cpu",
        ],  # fmt: skip
        stdout=log,
        stderr=subprocess.STDOUT,
        cwd=REPO,
    )
    address = f"127.0.0.1:{port}"
    try:
        asyncio.run(wait_serving(address, 120))
        yield address
    finally:
        proc.terminate()
        proc.wait(30)
        log.close()


def _encode(address: str, default_model, seed: int) -> tuple[str, int]:
    from processor.models.qwen2_vl import Qwen2VLMediaSpec
    from vision_svc.client import VisionClient

    spec = Qwen2VLMediaSpec.from_model_dir(str(default_model))
    img = noise_image(56, 84, seed)
    grid = spec.image_grid(*img.size)
    n = spec.num_image_tokens(grid)
    data = png_bytes(img)
    key = content_key(data, spec.fingerprint())

    async def go():
        client = VisionClient(address)
        try:
            await client.encode([MultimodalItem(key, 0, n, grid, "image", data)])
        finally:
            await client.close()

    asyncio.run(go())
    return key, n


def _vision_stats(address: str) -> vision_pb2.VisionStats:
    with grpc.insecure_channel(address) as ch:
        return vision_pb2_grpc.VisionStub(ch).GetStats(vision_pb2.GetStatsRequest(), timeout=10)


def _leases_closed(address: str) -> bool:
    """Leases are released without waiting for the answer: give the release a moment to land."""
    deadline = time.monotonic() + 5
    while _vision_stats(address).open_leases and time.monotonic() < deadline:
        time.sleep(0.02)
    return _vision_stats(address).open_leases == 0


def test_a_stopped_vision_service_leaves_nothing_in_dev_shm(default_model, log_dir):
    """SIGTERM: the service drains and removes its pool's name; a worker's mapping outlives it."""
    import os

    port = free_port()
    with open(log_dir / f"vision-shm-{port}.log", "wb") as log:
        proc = subprocess.Popen(
            [sys.executable, "-m", "mirador", "vision", "--model", str(default_model), "--port", str(port),
             "--device", "cpu", "--graceful-shutdown-timeout", "1"],
            stdout=log, stderr=subprocess.STDOUT, cwd=REPO,
        )  # fmt: skip
        try:
            asyncio.run(wait_serving(f"127.0.0.1:{port}", 120))
            from vision_svc.client import VisionEmbeddingSource

            source = VisionEmbeddingSource(f"127.0.0.1:{port}")
            assert source.connect() == "shared_memory"
            name = source._keep.name  # noqa: SLF001 - the mapped segment
            assert os.path.exists(f"/dev/shm/{name}")
            proc.terminate()
            assert proc.wait(30) == 0
            assert not os.path.exists(f"/dev/shm/{name}")
            assert len(source._pool.view(-1)[:8].tolist()) == 8  # noqa: SLF001 - still mapped and readable here
        finally:
            if proc.poll() is None:
                proc.kill()
                proc.wait()
    assert b"leaked shared_memory" not in (log_dir / f"vision-shm-{port}.log").read_bytes()


def test_mapped_pool_is_bit_equal_to_bytes_with_no_bytes_and_one_copy(vision_service, default_model):
    from vision_svc.client import VisionEmbeddingSource

    keys = [_encode(vision_service, default_model, seed)[0] for seed in (1, 2)]
    shared = VisionEmbeddingSource(vision_service)
    by_value = VisionEmbeddingSource(vision_service, share=False)
    try:
        assert shared.connect() == "shared_memory"
        assert by_value.connect() == "grpc"
        before = _vision_stats(vision_service)
        got, missing = shared.fetch(keys + ["absent"], torch.device("cpu"), torch.float32)
        assert missing == ["absent"] and set(got) == set(keys)
        after = _vision_stats(vision_service)
        # nothing crossed gRPC as bytes and nothing was copied on the way: one copy per image into our buffer
        assert shared.stats.images_by_value == 0 and shared.stats.bytes_by_value == 0
        assert shared.stats.images_by_reference == 2 and shared.stats.copy_ops == 2
        assert after.pulls_by_reference - before.pulls_by_reference == 2
        assert after.pulls_by_value == before.pulls_by_value
        assert _leases_closed(vision_service)
        ref, _ = by_value.fetch(keys, torch.device("cpu"), torch.float32)
        assert by_value.stats.bytes_by_value > 0
        for k in keys:
            assert torch.equal(got[k], ref[k])  # bit-equal
    finally:
        shared.close()
        by_value.close()


def _item(default_model, seed: int) -> MultimodalItem:
    from processor.models.qwen2_vl import Qwen2VLMediaSpec

    spec = Qwen2VLMediaSpec.from_model_dir(str(default_model))
    img = noise_image(56, 84, seed)
    grid = spec.image_grid(*img.size)
    data = png_bytes(img)
    return MultimodalItem(
        content_key(data, spec.fingerprint()), 0, spec.num_image_tokens(grid), grid, "image", data
    )


def test_a_lease_granted_with_the_encode_is_copied_without_a_request(vision_service, default_model):
    """Encode hands back a lease on the rows; the worker's source copies them from the mapped pool with no
    GetEmbeddings, bit-equal to the bytes path, and releases the lease once the copies are done. A release
    naming another pool (a restarted service numbers its leases anew) ends nothing."""
    from vision_svc.client import VisionClient, VisionEmbeddingSource

    items = [_item(default_model, seed) for seed in (11, 12)]
    keys = [m.content_key for m in items]

    async def encode(leased: bool):
        client = VisionClient(vision_service)
        try:
            return await (client.encode_leased(items) if leased else client.encode(items))
        finally:
            await client.close()

    shared = VisionEmbeddingSource(vision_service)
    by_value = VisionEmbeddingSource(vision_service, share=False)
    try:
        assert shared.connect() == "shared_memory" and by_value.connect() == "grpc"
        done, lease = asyncio.run(encode(leased=True))
        assert [e.content_key for e in done] == keys and lease is not None
        assert [loc.content_key for loc in lease.locations] == keys and lease.pool_id == shared.pool_id
        assert _vision_stats(vision_service).open_leases == 1
        with grpc.insecure_channel(vision_service) as ch:  # a stale pool id: the lease stays
            vision_pb2_grpc.VisionStub(ch).ReleaseEmbeddings(
                vision_pb2.ReleaseEmbeddingsRequest(lease_id=lease.lease_id, pool_id="another"), timeout=10
            )
        assert _vision_stats(vision_service).open_leases == 1
        before = _vision_stats(vision_service)
        got = shared.take(lease, {keys[1]}, torch.device("cpu"), torch.float32)  # keys[1]: already resident
        assert set(got) == {keys[0]} and shared.stats.images_by_lease == 1 and shared.stats.copy_ops == 1
        assert _leases_closed(vision_service)  # released although one key was skipped
        after = _vision_stats(vision_service)
        assert after.pulls_by_reference == before.pulls_by_reference  # no GetEmbeddings was made
        assert after.pulls_by_value == before.pulls_by_value and shared.stats.bytes_by_value == 0
        ref, _ = by_value.fetch(keys[:1], torch.device("cpu"), torch.float32)
        assert torch.equal(got[keys[0]], ref[keys[0]])  # bit-equal
        assert [e.content_key for e in asyncio.run(encode(leased=False))] == keys
        assert _vision_stats(vision_service).open_leases == 0  # no lease unless asked
    finally:
        shared.close()
        by_value.close()


def test_a_lease_on_a_pool_the_worker_has_not_mapped_is_only_released(vision_service, default_model):
    from common.types import EmbeddingLease, EmbeddingLocation
    from vision_svc.client import VisionClient, VisionEmbeddingSource

    item = _item(default_model, 13)

    async def encode():
        client = VisionClient(vision_service)
        try:
            return await client.encode_leased([item])
        finally:
            await client.close()

    lease = asyncio.run(encode())[1]
    by_value = VisionEmbeddingSource(vision_service, share=False)
    try:
        by_value.connect()
        assert by_value.take(lease, set(), torch.device("cpu"), torch.float32) == {}
        assert _leases_closed(vision_service)
        shared = VisionEmbeddingSource(vision_service)
        shared.connect()
        stale = EmbeddingLease("an-old-pool", 1, (EmbeddingLocation(item.content_key, (1,), 4),))
        assert shared.take(stale, set(), torch.device("cpu"), torch.float32) == {}  # not this pool's pages
        shared.close()
    finally:
        by_value.close()


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
def test_cuda_ipc_pool_is_bit_equal_to_bytes(default_model, log_dir):
    from vision_svc.client import VisionEmbeddingSource

    port = free_port()
    log = open(log_dir / f"vision-ipc-{port}.log", "wb")  # noqa: SIM115
    proc = subprocess.Popen(
        [
            sys.executable,
            "-m",
            "mirador",
            "vision",
            "--model",
            str(default_model),
            "--port",
            str(port),
            "--device",
            "cuda",
            "--dtype",
            "bfloat16",
            "--vision-mem-fraction",
            "0",
        ],
        stdout=log,
        stderr=subprocess.STDOUT,
        cwd=REPO,
    )
    address = f"127.0.0.1:{port}"
    try:
        asyncio.run(wait_serving(address, 300))
        keys = [_encode(address, default_model, seed)[0] for seed in (1, 2)]
        shared = VisionEmbeddingSource(address)
        by_value = VisionEmbeddingSource(address, share=False)
        assert shared.connect() == "cuda_ipc"
        by_value.connect()
        got, _ = shared.fetch(keys, torch.device("cuda"), torch.bfloat16)
        ref, _ = by_value.fetch(keys, torch.device("cuda"), torch.bfloat16)
        assert shared.stats.bytes_by_value == 0 and shared.stats.copy_ops == 2
        assert _leases_closed(address)
        for k in keys:
            assert got[k].device.type == "cuda" and torch.equal(got[k], ref[k])
        # a lease granted with the encode: copied on this stream with no request, released once the copies ran
        from vision_svc.client import VisionClient

        async def encode_leased():
            client = VisionClient(address)
            try:
                return await client.encode_leased([_item(default_model, seed) for seed in (1, 2)])
            finally:
                await client.close()

        lease = asyncio.run(encode_leased())[1]
        taken = shared.take(lease, set(), torch.device("cuda"), torch.bfloat16)
        assert set(taken) == set(keys) and shared.stats.images_by_lease == 2
        assert _leases_closed(address)
        for k in keys:
            assert torch.equal(taken[k], ref[k])
        shared.close()
        by_value.close()
    finally:
        proc.terminate()
        proc.wait(30)
        log.close()


def _early_writer(conn, hidden: int, num_rows: int) -> None:
    """Child process: a CUDA IPC pool whose rows are written behind ~1 s of device work, leased at once."""
    from vision_svc.embedding_pool import EmbeddingPool

    pool = EmbeddingPool(1 << 20, hidden, torch.bfloat16, torch.device("cuda"), page_rows=16)
    conn.send(pool.shared_info())
    conn.recv()  # mapped
    rows = (
        (torch.arange(num_rows * hidden, device="cuda") % 251 + 1).view(num_rows, hidden).to(torch.bfloat16)
    )
    torch.cuda.synchronize()
    torch.cuda._sleep(2_000_000_000)  # the device is busy for about a second before the rows are written
    pool.put_many([("k", rows)], ready_event=True)
    lease_id, found, _ = pool.lease(["k"])
    conn.send((lease_id, found, rows.cpu()))
    conn.recv()  # the reader is done: the pool may go
    torch.cuda.synchronize()


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
def test_lease_before_the_rows_are_written_waits_on_the_device():
    """An encode answered while the device still writes the rows: the lease names the pool's ready event and the
    reader's stream waits for it, so the copy sees the rows (without the wait it reads the unwritten pages)."""
    import multiprocessing

    from common.types import EmbeddingLease
    from vision_svc.client import VisionEmbeddingSource
    from vision_svc.embedding_pool import open_ready_events

    ctx = multiprocessing.get_context("spawn")
    parent, child = ctx.Pipe()
    proc = ctx.Process(target=_early_writer, args=(child, 64, 40))
    proc.start()
    try:
        info = parent.recv()
        assert len(info.ready_event_handles) > 0
        src = VisionEmbeddingSource(f"127.0.0.1:{free_port()}")  # nobody listens: the release just fails
        src._pool, src._keep = map_shared_pool(info)  # noqa: SLF001
        src._ready_events, src.pool_id = open_ready_events(info), info.pool_id  # noqa: SLF001
        parent.send("mapped")
        lease_id, found, want = parent.recv()
        t0 = time.perf_counter()
        assert found[0].ready_event > 0  # answered while the device is still busy
        got = src.take(
            EmbeddingLease(info.pool_id, lease_id, tuple(found)), set(), torch.device("cuda"), torch.bfloat16
        )
        assert time.perf_counter() - t0 < 0.5  # queued, not waited for on the host
        assert torch.equal(got["k"].cpu(), want)
        src.close()
        parent.send("done")
        proc.join(30)
        assert proc.exitcode == 0
    finally:
        if proc.is_alive():
            proc.kill()


# ---- the worker's resident store ----


class _Source:
    transport = "in_process"

    def __init__(self, table: dict[str, torch.Tensor], delay_s: float = 0.0):
        self.table, self.delay_s, self.calls = table, delay_s, []
        self.gate = threading.Event()
        self.gate.set()

    def fetch(self, keys, device, dtype):
        self.calls.append(list(keys))
        self.gate.wait(30)
        time.sleep(self.delay_s)
        return {k: self.table[k].to(device, dtype) for k in keys if k in self.table}, [
            k for k in keys if k not in self.table
        ]


def test_resident_store_uploads_once_and_keeps_idle_entries_under_budget():
    src = _Source({"a": _rows(4), "b": _rows(4, seed=1), "c": _rows(4, seed=2)})
    res = ResidentEmbeddings(src, torch.device("cpu"), torch.float32, budget_bytes=2 * 4 * 8 * 4)
    res.prefetch(["a", "a", "b"])
    res.wait(["a", "b"])
    assert src.calls == [["a", "b"]] and res.status("a") == res.status("b") == "ready"
    t1, t2 = res.acquire("a"), res.acquire("a")  # two sequences, one tensor
    assert t1 is t2
    res.prefetch(["a"])
    assert len(src.calls) == 1
    res.release("a")
    res.release("a")
    res.prefetch(["c"])
    res.wait(["c"])  # a, b, c idle: over budget, the longest idle (b) goes
    assert res.status("b") == "absent" and res.status("a") == res.status("c") == "ready"
    assert res.stats.evictions == 1
    res.wait(["zzz"])
    assert res.status("zzz") == "missing"
    res.prefetch(["zzz"])  # re-encoded: tried again
    res.wait(["zzz"])
    assert len(src.calls) == 4
    res.close()


class _LeasingSource(_Source):
    """A source that maps the pool: leased rows are copied at once, and every lease is handed back."""

    def __init__(self, table):
        super().__init__(table)
        self.released: list[int] = []

    def take(self, lease, skip, device, dtype):
        self.released.append(lease.lease_id)
        return {
            loc.content_key: self.table[loc.content_key].to(device, dtype)
            for loc in lease.locations
            if loc.content_key not in skip
        }


def test_resident_store_takes_leased_rows_at_once_and_pulls_the_rest():
    from common.types import EmbeddingLease, EmbeddingLocation

    src = _LeasingSource({"a": _rows(4), "b": _rows(4, seed=1)})
    res = ResidentEmbeddings(src, torch.device("cpu"), torch.float32, budget_bytes=1 << 20)
    lease = EmbeddingLease("pool", 7, (EmbeddingLocation("a", (1,), 4),))
    res.prefetch(["a", "b"], [lease])
    assert res.status("a") == "ready"  # no pull, no wait: ready as prefetch returns
    res.wait(["b"])
    assert src.calls == [["b"]] and res.stats.taken == 1 and src.released == [7]
    assert torch.equal(res.acquire("a"), _rows(4))
    res.prefetch(
        [], [EmbeddingLease("pool", 8, (EmbeddingLocation("a", (1,), 4),))]
    )  # resident: released only
    assert src.released == [7, 8] and res.stats.taken == 1
    res.close()


# ---- a slow pull never delays a running decode ----


def _runner(default_model, source):
    from worker_svc.model_runner import ModelRunner, RunnerConfig

    return ModelRunner(RunnerConfig(str(default_model), page_size=4, max_total_tokens=2048), source)


def test_worker_leaves_out_a_sequence_whose_embedding_is_still_coming(default_model):
    from processor.model_config import load_model_config

    hidden = load_model_config(str(default_model)).text.hidden_size
    src = _Source({"img": torch.randn(4, hidden)})
    runner = _runner(default_model, src)
    greedy = SamplingParams(temperature=0.0)
    runner.step(StepPlan(1, (SeqStep("a", 0, (1, 2, 3), True, 0, (1,), SeqInit((), greedy, 3)),)))
    item = MultimodalItem("img", 1, 4, (1, 4, 4))
    b = SeqStep("b", 0, (5, 9, 9, 9, 9, 6), True, 0, (2, 3), SeqInit((item,), greedy, 6))

    src.gate.clear()  # the vision service hangs (for up to 30 s)
    t0 = time.perf_counter()
    out = runner.step(StepPlan(2, (SeqStep("a", 3), b)))
    assert time.perf_counter() - t0 < 5.0  # the decode did not wait for the pull
    assert [r.seq_id for r in out.results] == ["a"]
    assert [(f.seq_id, f.reason) for f in out.failures] == [("b", "embedding_pending")]
    assert runner.embeddings.stats.deferred == 1

    src.gate.set()
    runner.embeddings.wait(["img"])
    out = runner.step(StepPlan(3, (SeqStep("a", 4, (), True, 1, (4,)), b)))  # b re-initialized
    assert {r.seq_id for r in out.results} == {"a", "b"} and not out.failures
    assert src.calls == [["img"]]  # pulled once


def test_a_step_with_nothing_else_waits_for_the_pull(default_model):
    from processor.model_config import load_model_config

    hidden = load_model_config(str(default_model)).text.hidden_size
    src = _Source({"img": torch.randn(4, hidden)}, delay_s=0.3)
    runner = _runner(default_model, src)
    item = MultimodalItem("img", 1, 4, (1, 4, 4))
    b = SeqStep(
        "b", 0, (5, 9, 9, 9, 9, 6), True, 0, (2, 3), SeqInit((item,), SamplingParams(temperature=0.0), 6)
    )
    out = runner.step(StepPlan(1, (b,)))
    assert [r.seq_id for r in out.results] == ["b"] and not out.failures
    assert runner.embeddings.stats.waited == 1


class _SlowVision:
    """The engine's encoder as an embedding source that takes `delay_s` per pull (a slow vision service)."""

    transport = "in_process"

    def __init__(self, encoder, delay_s: float):
        self.encoder, self.delay_s = encoder, delay_s

    def fetch(self, keys, device, dtype):
        time.sleep(self.delay_s)
        return self.encoder.fetch(keys, device, dtype)


def test_slow_embedding_pull_never_delays_a_running_decode(default_model):
    from mirador.engine import Engine
    from tests.helpers import data_uri

    delay = 2.0
    with Engine(str(default_model), page_size=4) as engine:
        engine.runner.embeddings.source = _SlowVision(engine.encoder, delay)
        image = data_uri(png_bytes(noise_image(56, 56, 3)))

        async def scenario():
            text = await engine.async_generate(
                "count", {"max_new_tokens": 3000, "ignore_eos": True, "temperature": 0}, stream=True
            )
            stamps, image_task = [], None
            async for _out in text:
                stamps.append(time.perf_counter())
                if len(stamps) == 5:  # the decode is running: now an image request arrives
                    image_task = asyncio.ensure_future(
                        engine.async_generate("what is it", {"max_new_tokens": 4}, image_data=image)
                    )
                    t_image = time.perf_counter()
                if image_task is not None and image_task.done() and len(stamps) > 5:
                    break
            await text.aclose()
            return stamps, t_image, await image_task

        stamps, t_image, image_out = engine._call(scenario())
        during = [b - a for a, b in zip(stamps, stamps[1:], strict=False) if b > t_image]
        assert image_out["meta_info"]["completion_tokens"] == 4
        assert stamps[-1] - t_image >= delay  # the text stream ran all through the slow pull...
        assert max(during) < delay / 2, max(during)  # ...without a gap anywhere near it
        assert engine.runner.embeddings.stats.pulls >= 1
