"""Image embeddings resident on the worker's device: one upload per image however many sequences show it, pulled
ahead of time on a thread of their own so that a step never waits on the vision service while others are ready.

Keys move absent -> pending (a pull in flight) -> ready (or missing: the vision service no longer held them).
Sequences acquire ready entries and release them once their prefill has passed the span; entries nobody holds
stay cached (LRU) under a byte budget, so a prefetched image or a popular one is not pulled twice.
"""

from __future__ import annotations

import logging
import threading
import time
from collections import OrderedDict
from collections.abc import Callable, Iterable, Sequence
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass
from typing import Protocol

import torch

from common.types import EmbeddingLease

logger = logging.getLogger(__name__)


class EmbeddingSource(Protocol):
    transport: str  # "cuda_ipc", "shared_memory", "grpc" or "in_process"

    def fetch(
        self, keys: Sequence[str], device: torch.device, dtype: torch.dtype
    ) -> tuple[dict[str, torch.Tensor], list[str]]:
        """Embeddings [num_tokens, hidden] on device by content key (copies the caller owns, complete on
        return), and the keys not found."""
        ...


@dataclass
class ResidentStats:
    pulls: int = 0  # fetch calls made
    images_pulled: int = 0
    taken: int = 0  # of them, copied from a lease that came with the step (no request to the vision service)
    prefetched: int = 0  # keys pulled ahead of the step that needed them
    waited: int = 0  # keys a step had to wait for (nothing else in it was ready)
    deferred: int = 0  # sequences a step left out because their embeddings were still coming
    evictions: int = 0


class ResidentEmbeddings:
    def __init__(
        self, source: EmbeddingSource | None, device: torch.device, dtype: torch.dtype, budget_bytes: int
    ):
        self.source = source
        self.device = device
        self.dtype = dtype
        self.budget_bytes = budget_bytes
        self.stats = ResidentStats()
        self.on_transferred: Callable[[float], None] = lambda _seconds: (
            None
        )  # per pull (the server's histogram)
        self._ready: dict[str, torch.Tensor] = {}
        self._refs: dict[str, int] = {}
        self._idle: OrderedDict[str, int] = OrderedDict()  # ready keys nobody holds, oldest first -> bytes
        self._idle_bytes = 0
        self._pending: dict[str, Future] = {}
        self._missing: set[str] = set()
        self._lock = threading.Lock()
        self._executor = ThreadPoolExecutor(1, thread_name_prefix="embedding-pull")

    @property
    def transport(self) -> str:
        return self.source.transport if self.source is not None else ""

    def close(self) -> None:
        self._executor.shutdown(wait=False, cancel_futures=True)

    # ---- pulling ----

    def prefetch(self, keys: Iterable[str], leases: Sequence[EmbeddingLease] = ()) -> None:
        """Start pulling the keys that are neither ready nor on their way (returns at once). The scheduler sends
        keys whose encode just finished: ones an earlier pull missed are tried again. Keys under a lease granted
        with the encode are copied from the vision service's pool right here (queued on the current stream, so
        the step that reads them needs no wait) when the source maps that pool; every lease is handed back."""
        keys = list(keys)
        self.forget_missing(keys)
        take = getattr(self.source, "take", None)
        for lease in leases:
            if take is None:
                continue
            with self._lock:
                skip = set(self._ready) | set(self._pending)
            found = take(lease, skip, self.device, self.dtype)
            with self._lock:
                self.stats.taken += len(found)
                self._add_ready(found)
        self._start(keys, prefetch=True)

    def request(self, keys: Iterable[str]) -> None:
        """Start pulling the keys a step needs that are neither ready nor on their way (returns at once)."""
        self._start(keys)

    def _start(self, keys: Iterable[str], prefetch: bool = False) -> None:
        with self._lock:
            todo = [
                k
                for k in dict.fromkeys(keys)
                if k not in self._ready and k not in self._pending and k not in self._missing
            ]
            if not todo:
                return
            fut = self._executor.submit(self._pull, todo)
            for k in todo:
                self._pending[k] = fut
            if prefetch:
                self.stats.prefetched += len(todo)

    def _pull(self, keys: list[str]) -> None:
        t0 = time.perf_counter()
        try:
            found = self.source.fetch(keys, self.device, self.dtype)[0] if self.source is not None else {}
            self.on_transferred(time.perf_counter() - t0)
        except Exception as e:  # noqa: BLE001 - the keys fail; the steps that need them report it
            logger.warning("pulling %d embedding(s) failed: %s", len(keys), e)
            found = {}
        with self._lock:
            self.stats.pulls += 1
            self._add_ready(found)
            self._missing.update(k for k in keys if k not in found)
            for k in keys:
                self._pending.pop(k, None)

    def _add_ready(self, found: dict[str, torch.Tensor]) -> None:
        """Under the lock."""
        self.stats.images_pulled += len(found)
        for k, t in found.items():
            self._ready[k] = t
            self._missing.discard(k)
            self._refs.setdefault(k, 0)
            if not self._refs[k]:
                self._add_idle(k)
        self._evict()

    def status(self, key: str) -> str:
        """ready, pending, missing or absent."""
        with self._lock:
            if key in self._ready:
                return "ready"
            if key in self._pending:
                return "pending"
            return "missing" if key in self._missing else "absent"

    def wait(self, keys: Iterable[str], timeout_s: float | None = None) -> None:
        """Pull the absent keys now and block until none of the keys is pending."""
        keys = list(keys)
        self._start(keys)
        with self._lock:
            futs = {id(f): f for k in keys if (f := self._pending.get(k)) is not None}
            self.stats.waited += sum(1 for k in keys if k in self._pending)
        for f in futs.values():
            f.result(timeout_s)

    def forget_missing(self, keys: Iterable[str]) -> None:
        """The scheduler re-encodes these: a later pull may find them."""
        with self._lock:
            self._missing.difference_update(keys)

    def put(self, key: str, rows: torch.Tensor) -> None:
        """Make rows resident under key without a pull (warm-up)."""
        with self._lock:
            self._ready[key] = rows
            self._refs[key] = 0
            self._add_idle(key)

    def discard(self, key: str) -> None:
        with self._lock:
            if self._refs.get(key):
                return
            if key in self._idle:
                self._idle_bytes -= self._idle.pop(key)
            self._ready.pop(key, None)
            self._refs.pop(key, None)

    # ---- holding ----

    def peek_rows(self, key: str) -> int:
        """Rows of a ready entry (-1 if it is not ready)."""
        with self._lock:
            t = self._ready.get(key)
            return -1 if t is None else int(t.shape[0])

    def acquire(self, key: str) -> torch.Tensor:
        with self._lock:
            t = self._ready[key]
            if self._refs[key] == 0:
                self._idle_bytes -= self._idle.pop(key)
            self._refs[key] += 1
            return t

    def release(self, key: str) -> None:
        with self._lock:
            if self._refs.get(key, 0) <= 0:
                return
            self._refs[key] -= 1
            if self._refs[key] == 0:
                self._add_idle(key)
                self._evict()

    def _add_idle(self, key: str) -> None:
        t = self._ready[key]
        size = t.numel() * t.element_size()
        self._idle[key] = size
        self._idle_bytes += size

    def _evict(self) -> None:
        while self._idle_bytes > self.budget_bytes and self._idle:
            key, size = self._idle.popitem(last=False)
            self._idle_bytes -= size
            del self._ready[key], self._refs[key]
            self.stats.evictions += 1

    @property
    def num_bytes(self) -> int:
        with self._lock:
            return sum(t.numel() * t.element_size() for t in self._ready.values())
