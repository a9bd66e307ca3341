"""LRU cache of image embeddings by content key under a byte budget."""

from __future__ import annotations

import threading
from collections import OrderedDict

import torch


class EmbeddingCache:
    def __init__(self, budget_bytes: int):
        self.budget_bytes = budget_bytes
        self._entries: OrderedDict[str, torch.Tensor] = OrderedDict()
        self.num_bytes = 0
        self.evictions = 0
        self._lock = (
            threading.Lock()
        )  # the encoder thread puts while a worker thread (in-process engine) gets

    def __len__(self) -> int:
        return len(self._entries)

    def __contains__(self, key: str) -> bool:
        return key in self._entries

    def get(self, key: str) -> torch.Tensor | None:
        with self._lock:
            t = self._entries.get(key)
            if t is not None:
                self._entries.move_to_end(key)
            return t

    def put(self, key: str, t: torch.Tensor) -> None:
        with self._lock:
            self._put(key, t)

    def _put(self, key: str, t: torch.Tensor) -> None:
        size = t.numel() * t.element_size()
        if key in self._entries:
            self.num_bytes -= self._size(self._entries.pop(key))
        self._entries[key] = t
        self.num_bytes += size
        # keep the newest entry even when it alone exceeds the budget: it is about to be pulled by the worker
        while self.num_bytes > self.budget_bytes and len(self._entries) > 1:
            _, old = self._entries.popitem(last=False)
            self.num_bytes -= self._size(old)
            self.evictions += 1

    @staticmethod
    def _size(t: torch.Tensor) -> int:
        return t.numel() * t.element_size()
