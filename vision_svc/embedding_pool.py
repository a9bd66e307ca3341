"""The vision service's embedding cache: one preallocated tensor [num_pages, page_rows, hidden] on the encoder's
device, entries of whole pages under LRU eviction, and leases that pin entries while a client copies them.

A worker on the same host maps the pool itself (CUDA IPC for a GPU pool, a shared-memory segment for a CPU pool)
and copies an image's rows straight into its own buffer: no bytes cross gRPC and no host copy is made. Page 0 holds
a probe pattern that lets a client prove it mapped the same memory; remote clients pull bytes as before.
"""

from __future__ import annotations

import contextlib
import itertools
import logging
import os
import secrets
import threading
import time
import uuid
from collections import OrderedDict
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import torch

from common.errors import ResourceExhaustedError
from common.types import EmbeddingLocation

logger = logging.getLogger(__name__)

PROBE_LEN = 64


@dataclass(frozen=True)
class SharedPoolInfo:
    """How to map a pool from another process (the fields of vision.v1.SharedPool)."""

    pool_id: str
    kind: str  # "cuda_ipc", "shared_memory", or "" (not shareable)
    num_pages: int
    page_rows: int
    hidden_size: int
    dtype: str
    device: str
    probe_scale: float
    shm_name: str = ""
    cuda_handle: bytes = b""
    storage_size_bytes: int = 0
    storage_offset_bytes: int = 0
    ref_counter_handle: bytes = b""
    ref_counter_offset: int = 0
    event_handle: bytes = b""
    event_sync_required: bool = False
    ready_event_handles: tuple[
        bytes, ...
    ] = ()  # cuda_ipc: the pool's ready events (EmbeddingLocation.ready_event)

    @property
    def shape(self) -> tuple[int, int, int]:
        return (self.num_pages, self.page_rows, self.hidden_size)


@dataclass
class _Entry:
    page_ids: list[int]
    num_rows: int
    pins: int = 0
    ready_event: int = 0  # while `written` has not completed: 1 + the ready event recorded after the write
    written: Any = None  # an event (query()) that completes once the rows are in the pool; None: they are


NUM_READY_EVENTS = 16  # a ring: a slot recorded again later only makes a reader wait for a later batch


def probe_pattern(n: int, scale: float, dtype: torch.dtype) -> torch.Tensor:
    return (torch.arange(n, dtype=torch.float32) * scale).to(dtype)


def page_runs(page_ids: Sequence[int]) -> list[tuple[int, int]]:
    """Maximal runs of consecutive pages as (first page, count)."""
    runs: list[tuple[int, int]] = []
    for p in page_ids:
        if runs and runs[-1][0] + runs[-1][1] == p:
            runs[-1] = (runs[-1][0], runs[-1][1] + 1)
        else:
            runs.append((p, 1))
    return runs


def row_runs(page_ids: Sequence[int], num_rows: int, rows_per_page: int) -> list[tuple[int, int, int]]:
    """An entry's rows as (first pool row, first entry row, count), one per run of consecutive pages."""
    runs, done = [], 0
    for first, count in page_runs(page_ids):
        n = min(count * rows_per_page, num_rows - done)
        runs.append((first * rows_per_page, done, n))
        done += n
    return runs


def copy_rows(pool: torch.Tensor, page_ids: Sequence[int], num_rows: int, out: torch.Tensor) -> int:
    """Copy an entry's rows from a pool [P, R, H] into out [num_rows, H], one copy per run of consecutive pages
    (each element is copied once). Returns the number of copy operations."""
    flat = pool.view(-1, pool.shape[2])
    runs = row_runs(page_ids, num_rows, pool.shape[1])
    for src, dst, n in runs:
        out[dst : dst + n].copy_(flat[src : src + n], non_blocking=True)
    return len(runs)


class EmbeddingPool:
    def __init__(
        self,
        budget_bytes: int,
        hidden_size: int,
        dtype: torch.dtype,
        device: torch.device,
        page_rows: int = 64,
        shareable: bool = True,
        lease_ttl_s: float = 60.0,
    ):
        row_bytes = hidden_size * torch.empty((), dtype=dtype).element_size()
        self.page_rows = page_rows
        self.hidden_size = hidden_size
        self.dtype = dtype
        self.device = device
        self.num_pages = max(2, budget_bytes // (page_rows * row_bytes)) + 1  # + the probe page
        self.budget_bytes = (self.num_pages - 1) * page_rows * row_bytes
        self.lease_ttl_s = lease_ttl_s
        self.pool_id = uuid.uuid4().hex
        self._shm = None
        shape = (self.num_pages, page_rows, hidden_size)
        self.kind = ""
        if device.type == "cpu" and shareable:
            self.data = self._shared_memory_tensor(shape)
        else:
            self.data = torch.empty(shape, dtype=dtype, device=device)
            if device.type == "cuda" and shareable:
                self.kind = "cuda_ipc"
        self.probe_scale = 1.0 + secrets.randbelow(1 << 20) / (1 << 21)
        self.data[0].zero_()
        n = min(PROBE_LEN, hidden_size)
        self.data[0, 0, :n] = probe_pattern(n, self.probe_scale, dtype).to(device)
        self._free = list(range(1, self.num_pages))  # sorted: allocations take runs of consecutive pages
        self._entries: OrderedDict[str, _Entry] = OrderedDict()
        self._leases: dict[int, tuple[list[str], float]] = {}
        self._lease_ids = itertools.count(1)
        self._lock = threading.Lock()
        # cuda_ipc: interprocess events recorded after a batch's rows are written, so an encode can be answered
        # while the device still computes them and a reader in another process waits on the device, not the host
        self.ready_events: list[torch.cuda.Event] = []
        if self.kind == "cuda_ipc":
            self.ready_events = [torch.cuda.Event(interprocess=True) for _ in range(NUM_READY_EVENTS)]
            for ev in self.ready_events:  # created now, on the pool's device (torch makes events lazily)
                ev.record(torch.cuda.current_stream(device))
        self._next_ready = 0
        self.evictions = 0
        self.pulls_by_reference = 0
        self.pulls_by_value = 0

    def _shared_memory_tensor(self, shape: tuple[int, int, int]) -> torch.Tensor:
        from multiprocessing import shared_memory

        nbytes = shape[0] * shape[1] * shape[2] * torch.empty((), dtype=self.dtype).element_size()
        try:
            st = os.statvfs("/dev/shm")
            room = st.f_bavail * st.f_frsize
        except OSError:
            room = 0
        if room < nbytes:  # a container's small /dev/shm would fail later, mid-write: share nothing instead
            logger.info(
                "/dev/shm has %d MiB free, the embedding pool needs %d MiB: clients pull bytes",
                room >> 20,
                nbytes >> 20,
            )
            return torch.empty(shape, dtype=self.dtype)
        try:
            self._shm = shared_memory.SharedMemory(
                name=f"mirador-emb-{self.pool_id[:16]}", create=True, size=nbytes
            )
        except OSError as e:
            logger.warning("no shared memory for the embedding pool (%s): clients on this host pull bytes", e)
            return torch.empty(shape, dtype=self.dtype)
        self.kind = "shared_memory"
        return torch.frombuffer(self._shm.buf, dtype=torch.uint8, count=nbytes).view(self.dtype).view(shape)

    def unlink(self) -> None:
        """Remove the shared-memory segment's name (at shutdown): mappings already made, here and in workers,
        stay valid until dropped, and /dev/shm keeps nothing once they are."""
        if self._shm is not None:
            with contextlib.suppress(FileNotFoundError):  # already removed
                self._shm.unlink()

    def close(self) -> None:
        if self._shm is not None:
            self.data = torch.empty(0, dtype=self.dtype)
            self.unlink()
            with contextlib.suppress(BufferError):  # a view still lives: its mapping goes with it
                self._shm.close()
            self._shm = None

    # ---- accounting ----

    def __len__(self) -> int:
        return len(self._entries)

    def __contains__(self, key: str) -> bool:
        return key in self._entries

    @property
    def num_bytes(self) -> int:
        used = sum(len(e.page_ids) for e in self._entries.values())
        return used * self.page_rows * self.hidden_size * self.data.element_size()

    @property
    def open_leases(self) -> int:
        return len(self._leases)

    # ---- entries ----

    def put(self, key: str, rows: torch.Tensor) -> None:
        """Store rows [n, hidden] under key (one device copy into the pool's pages)."""
        with self._lock:
            self._put(key, rows)

    def put_many(self, items: Sequence[tuple[str, torch.Tensor]], ready_event: bool = False) -> Any:
        """Store several entries. With `ready_event` (a cuda_ipc pool) also record the next ready event behind
        their copies on the current stream: until it completes, leases name it (EmbeddingLocation.ready_event)
        and a reader waits for it on its device instead of anyone waiting on a host. Returns an event that
        completes with the copies (None without `ready_event`). Under the lock: no lease sees an entry before
        it is marked."""
        stored: list[str] = []
        with self._lock:
            try:
                stored += [key for key, rows in items if self._put(key, rows)]
            finally:  # entries stored before a failure are marked too
                written = self._record_ready(stored) if ready_event else None
        return written

    def _record_ready(self, keys: list[str]) -> torch.cuda.Event:
        """Under the lock: record the next ready event (and a host-waitable one) and mark `keys` pending."""
        stream = torch.cuda.current_stream(self.device)
        slot = self._next_ready
        self._next_ready = (slot + 1) % len(self.ready_events)
        self.ready_events[slot].record(stream)
        written = torch.cuda.Event(blocking=True)  # a host waiting on it sleeps instead of spinning
        written.record(stream)
        for key in keys:
            e = self._entries[key]
            e.ready_event, e.written = slot + 1, written
        return written

    def _put(self, key: str, rows: torch.Tensor) -> bool:
        """Under the lock. False when the key's old rows are being copied (they stay)."""
        n = rows.shape[0]
        need = -(-n // self.page_rows)
        old = self._entries.pop(key, None)
        if old is not None:
            if old.pins:  # a client is copying the old rows: keep them until its lease ends
                self._entries[key] = old
                return False
            self._free_pages(old.page_ids)
        pages = self._alloc(need)
        self._entries[key] = _Entry(pages, n)
        flat = self.data.view(-1, self.hidden_size)
        for dst, src, m in row_runs(pages, n, self.page_rows):
            flat[dst : dst + m].copy_(rows[src : src + m])
        return True

    def clear(self) -> int:
        """Drop every entry no lease or copy holds; returns how many went."""
        with self._lock:
            keys = [k for k, e in self._entries.items() if not e.pins]
            for k in keys:
                self._free_pages(self._entries.pop(k).page_ids)
        return len(keys)

    def touch(self, key: str) -> bool:
        with self._lock:
            if key in self._entries:
                self._entries.move_to_end(key)
                return True
            return False

    def get(self, key: str, device: torch.device | None = None, dtype: torch.dtype | None = None):
        """A copy of the rows [n, hidden] on device (the pool's by default), or None. The copy is queued on the
        current stream; the caller synchronizes before the pool could reuse the pages (an in-process reader)."""
        with self._lock:
            e = self._entries.get(key)
            if e is None:
                return None
            self._entries.move_to_end(key)
            e.pins += 1  # a CPU pool copies right here: no put may take these pages meanwhile
        try:
            out = torch.empty((e.num_rows, self.hidden_size), dtype=self.dtype, device=device or self.device)
            copy_rows(self.data, e.page_ids, e.num_rows, out)
        finally:
            with self._lock:
                e.pins -= 1
        return out if dtype is None or dtype == self.dtype else out.to(dtype)

    def lease(self, keys: Sequence[str]) -> tuple[int, list[EmbeddingLocation], list[str]]:
        """Pin the entries found and say where they are; the client releases the lease after copying."""
        found: list[EmbeddingLocation] = []
        missing: list[str] = []
        with self._lock:
            pinned: list[str] = []
            for k in keys:
                e = self._entries.get(k)
                if e is None:
                    missing.append(k)
                    continue
                self._entries.move_to_end(k)
                e.pins += 1
                pinned.append(k)
                found.append(EmbeddingLocation(k, tuple(e.page_ids), e.num_rows, self._pending_event(e)))
            lease_id = 0
            if pinned:
                lease_id = next(self._lease_ids)
                self._leases[lease_id] = (pinned, time.monotonic() + self.lease_ttl_s)
            self.pulls_by_reference += len(found)
        return lease_id, found, missing

    @staticmethod
    def _pending_event(e: _Entry) -> int:
        """Under the lock: 1 + the ready event a reader must wait on before reading e's rows, 0 if none."""
        if e.written is not None and e.written.query():
            e.ready_event, e.written = 0, None
        return e.ready_event

    def release(self, lease_id: int) -> bool:
        with self._lock:
            return self._end_lease(lease_id)

    def count_value_pulls(self, n: int) -> None:
        with self._lock:
            self.pulls_by_value += n

    def _end_lease(self, lease_id: int) -> bool:
        lease = self._leases.pop(lease_id, None)
        if lease is None:
            return False
        for k in lease[0]:
            e = self._entries.get(k)
            if e is not None and e.pins:
                e.pins -= 1
        return True

    def _alloc(self, need: int) -> list[int]:
        if need > self.num_pages - 1:
            raise ResourceExhaustedError(
                f"an image of {need * self.page_rows} embedding rows exceeds the embedding cache "
                f"({self.budget_bytes >> 20} MiB); raise --embedding-cache-mb"
            )
        now = time.monotonic()
        for lease_id in [i for i, (_, deadline) in self._leases.items() if deadline < now]:
            logger.warning("embedding lease %d expired unreleased", lease_id)
            self._end_lease(lease_id)
        while len(self._free) < need:
            victim = next((k for k, e in self._entries.items() if not e.pins), None)
            if victim is None:
                raise ResourceExhaustedError(
                    "the embedding cache is full of embeddings being copied; retry, or raise --embedding-cache-mb"
                )
            self._free_pages(self._entries.pop(victim).page_ids)
            self.evictions += 1
        return self._take(need)

    def _take(self, need: int) -> list[int]:
        """The first run of `need` consecutive free pages, else the lowest free pages."""
        free = self._free
        run_start = 0
        for i in range(1, len(free) + 1):
            if i == len(free) or free[i] != free[i - 1] + 1:
                if i - run_start >= need:
                    pages = free[run_start : run_start + need]
                    del free[run_start : run_start + need]
                    return pages
                run_start = i
        pages = free[:need]
        del free[:need]
        return pages

    def _free_pages(self, pages: list[int]) -> None:
        self._free.extend(pages)
        self._free.sort()

    # ---- sharing ----

    def shared_info(self) -> SharedPoolInfo:
        base = SharedPoolInfo(
            pool_id=self.pool_id,
            kind=self.kind,
            num_pages=self.num_pages,
            page_rows=self.page_rows,
            hidden_size=self.hidden_size,
            dtype=str(self.dtype).removeprefix("torch."),
            device=str(self.device),
            probe_scale=self.probe_scale,
        )
        if self.kind == "shared_memory":
            return _replace(base, shm_name=self._shm.name)
        if self.kind == "cuda_ipc":
            (_, handle, size, offset, rc_handle, rc_offset, ev_handle, ev_sync) = (
                self.data.untyped_storage()._share_cuda_()
            )
            return _replace(
                base,
                cuda_handle=bytes(handle),
                storage_size_bytes=int(size),
                storage_offset_bytes=int(offset),
                ref_counter_handle=bytes(rc_handle),
                ref_counter_offset=int(rc_offset),
                event_handle=bytes(ev_handle or b""),
                event_sync_required=bool(ev_sync),
                ready_event_handles=tuple(bytes(e.ipc_handle()) for e in self.ready_events),
            )
        return base


def _replace(info: SharedPoolInfo, **kw) -> SharedPoolInfo:
    import dataclasses

    return dataclasses.replace(info, **kw)


def map_shared_pool(info: SharedPoolInfo) -> tuple[torch.Tensor, object]:
    """Map another process's pool: (tensor [P, R, H], a handle to keep alive). Raises if it cannot be mapped or
    the probe page does not match (another host, another IPC namespace)."""
    dtype = getattr(torch, info.dtype)
    if info.kind == "shared_memory":
        from multiprocessing import resource_tracker, shared_memory

        shm = shared_memory.SharedMemory(name=info.shm_name)
        # the segment is the vision service's: this process must not unlink it at exit
        with contextlib.suppress(Exception):  # tracking differs across Python versions
            resource_tracker.unregister(shm._name, "shared_memory")  # noqa: SLF001
        nbytes = (
            info.num_pages * info.page_rows * info.hidden_size * torch.empty((), dtype=dtype).element_size()
        )
        t = torch.frombuffer(shm.buf, dtype=torch.uint8, count=nbytes).view(dtype).view(info.shape)
        keep: object = shm
    elif info.kind == "cuda_ipc":
        device = torch.device(info.device)
        torch.cuda._lazy_init()  # noqa: SLF001
        storage = torch.UntypedStorage._new_shared_cuda(  # noqa: SLF001 - torch.multiprocessing's own path
            device.index or 0,
            info.cuda_handle,
            info.storage_size_bytes,
            info.storage_offset_bytes,
            info.ref_counter_handle,
            info.ref_counter_offset,
            info.event_handle or None,
            info.event_sync_required,
        )
        t = torch.empty(0, dtype=dtype, device=device).set_(
            torch.storage.TypedStorage(wrap_storage=storage, dtype=dtype, _internal=True),
            0,
            info.shape,
        )
        keep = storage
    else:
        raise ValueError(f"pool kind {info.kind!r} cannot be mapped")
    n = min(PROBE_LEN, info.hidden_size)
    seen = t[0, 0, :n].to("cpu")
    if not torch.equal(seen, probe_pattern(n, info.probe_scale, dtype)):
        raise ValueError("the mapped pool's probe page does not match (not the same memory)")
    return t, keep


def open_ready_events(info: SharedPoolInfo) -> list[torch.cuda.Event]:
    """The pool's ready events opened in this process (cuda_ipc; none for other kinds)."""
    if info.kind != "cuda_ipc":
        return []
    device = torch.device(info.device)
    return [torch.cuda.Event.from_ipc_handle(device, h) for h in info.ready_event_handles]
