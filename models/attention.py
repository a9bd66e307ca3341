"""Attention backends for the language model over the paged KV cache, behind a registry.

The model runner builds one `AttentionMetadata` per step; every layer's attention reads it. Backends differ in
kernels, never in layout (see kernels/paged_attention.py).
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import torch

from kernels import paged_attention as ref


@dataclass
class AttentionMetadata:
    """How the packed tokens of one step map onto sequences and KV pages."""

    query_lens: list[int]  # per sequence: tokens computed this step
    kv_lens: list[int]  # per sequence: tokens in the cache once this step is written
    page_tables: list[torch.Tensor]  # per sequence: [num_pages] int64 on the device
    slot_mapping: torch.Tensor  # [num_tokens] int64: where each new token's K/V is written

    @property
    def num_tokens(self) -> int:
        return int(self.slot_mapping.shape[0])


class KVCache:
    """The worker's KV tensors: per layer [num_pages, page_size, num_kv_heads, head_dim] for K and for V."""

    def __init__(self, num_layers: int, num_pages: int, page_size: int, num_kv_heads: int, head_dim: int,
                 dtype: torch.dtype, device: torch.device):
        shape = (num_layers, num_pages, page_size, num_kv_heads, head_dim)
        self.k = torch.zeros(shape, dtype=dtype, device=device)
        self.v = torch.zeros(shape, dtype=dtype, device=device)
        self.num_pages = num_pages
        self.page_size = page_size

    @staticmethod
    def bytes_per_page(num_layers: int, page_size: int, num_kv_heads: int, head_dim: int, dtype: torch.dtype) -> int:
        return 2 * num_layers * page_size * num_kv_heads * head_dim * torch.empty((), dtype=dtype).element_size()

    @property
    def nbytes(self) -> int:
        return self.k.numel() * self.k.element_size() * 2


class TorchNativeAttention:
    """Reference backend: index_copy into pages, then per-sequence SDPA over the gathered pages."""

    name = "torch_native"

    def __init__(self, kv_cache: KVCache, scale: float):
        self.kv_cache = kv_cache
        self.scale = scale

    def forward(self, layer_idx: int, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor,
                meta: AttentionMetadata) -> torch.Tensor:
        # q: [num_tokens, num_heads, head_dim]; k, v: [num_tokens, num_kv_heads, head_dim]
        k_cache, v_cache = self.kv_cache.k[layer_idx], self.kv_cache.v[layer_idx]
        ref.store_kv(k, v, k_cache, v_cache, meta.slot_mapping)
        return ref.paged_attention(q, k_cache, v_cache, meta.page_tables, meta.query_lens, meta.kv_lens, self.scale)


ATTENTION_BACKENDS: dict[str, Callable[[KVCache, float], object]] = {
    "torch_native": TorchNativeAttention,
}


def create_attention_backend(name: str, kv_cache: KVCache, scale: float):
    if name not in ATTENTION_BACKENDS:
        raise ValueError(f"unknown attention backend {name!r}; choose from {sorted(ATTENTION_BACKENDS)}")
    return ATTENTION_BACKENDS[name](kv_cache, scale)
