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
    # decode sequences (one query token each), batched: their rows in the packed tokens, padded page tables
    decode_rows: torch.Tensor | None = None  # [num_decode] int64
    decode_block_table: torch.Tensor | None = None  # [num_decode, max_pages] int64
    decode_kv_lens: torch.Tensor | None = None  # [num_decode] int64
    prefill_seqs: list[int] | None = None  # indices of the other sequences

    @property
    def num_tokens(self) -> int:
        return int(self.slot_mapping.shape[0])

    @classmethod
    def build(
        cls,
        query_lens: list[int],
        kv_lens: list[int],
        tables: list[list[int]],
        page_size: int,
        slot_mapping: torch.Tensor,
        device: torch.device,
    ) -> AttentionMetadata:
        decode = [i for i, n in enumerate(query_lens) if n == 1]
        meta = cls(
            query_lens,
            kv_lens,
            [torch.tensor(t, dtype=torch.long, device=device) for t in tables],
            slot_mapping,
            prefill_seqs=[i for i, n in enumerate(query_lens) if n != 1],
        )
        if decode:
            starts = [0]
            for n in query_lens[:-1]:
                starts.append(starts[-1] + n)
            width = max(len(tables[i]) for i in decode)
            padded = [tables[i] + [0] * (width - len(tables[i])) for i in decode]
            meta.decode_rows = torch.tensor([starts[i] for i in decode], dtype=torch.long, device=device)
            meta.decode_block_table = torch.tensor(padded, dtype=torch.long, device=device)
            meta.decode_kv_lens = torch.tensor([kv_lens[i] for i in decode], dtype=torch.long, device=device)
        return meta


class KVCache:
    """The worker's KV tensors: per layer [num_pages, page_size, num_kv_heads, head_dim] for K and for V."""

    def __init__(
        self,
        num_layers: int,
        num_pages: int,
        page_size: int,
        num_kv_heads: int,
        head_dim: int,
        dtype: torch.dtype,
        device: torch.device,
    ):
        shape = (num_layers, num_pages, page_size, num_kv_heads, head_dim)
        self.k = torch.zeros(shape, dtype=dtype, device=device)
        self.v = torch.zeros(shape, dtype=dtype, device=device)
        self.num_pages = num_pages
        self.page_size = page_size

    @staticmethod
    def bytes_per_page(
        num_layers: int, page_size: int, num_kv_heads: int, head_dim: int, dtype: torch.dtype
    ) -> int:
        return (
            2 * num_layers * page_size * num_kv_heads * head_dim * torch.empty((), dtype=dtype).element_size()
        )

    @property
    def nbytes(self) -> int:
        return self.k.numel() * self.k.element_size() * 2


class TorchNativeAttention:
    """Reference backend: index_copy into pages, then per-sequence SDPA over the gathered pages."""

    name = "torch_native"

    def __init__(self, kv_cache: KVCache, scale: float):
        self.kv_cache = kv_cache
        self.scale = scale

    def forward(
        self, layer_idx: int, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, meta: AttentionMetadata
    ) -> torch.Tensor:
        # q: [num_tokens, num_heads, head_dim]; k, v: [num_tokens, num_kv_heads, head_dim]
        k_cache, v_cache = self.kv_cache.k[layer_idx], self.kv_cache.v[layer_idx]
        ref.store_kv(k, v, k_cache, v_cache, meta.slot_mapping)
        if meta.decode_rows is None:
            return ref.paged_attention(
                q, k_cache, v_cache, meta.page_tables, meta.query_lens, meta.kv_lens, self.scale
            )
        out = torch.empty_like(q)
        out[meta.decode_rows] = ref.paged_decode_attention(
            q[meta.decode_rows], k_cache, v_cache, meta.decode_block_table, meta.decode_kv_lens, self.scale
        )
        if meta.prefill_seqs:
            starts = [0]
            for n in meta.query_lens:
                starts.append(starts[-1] + n)
            for i in meta.prefill_seqs:
                lo, hi = starts[i], starts[i + 1]
                out[lo:hi] = ref.paged_attention(
                    q[lo:hi],
                    k_cache,
                    v_cache,
                    [meta.page_tables[i]],
                    [meta.query_lens[i]],
                    [meta.kv_lens[i]],
                    self.scale,
                )
        return out


ATTENTION_BACKENDS: dict[str, Callable[[KVCache, float], object]] = {
    "torch_native": TorchNativeAttention,
}


def create_attention_backend(name: str, kv_cache: KVCache, scale: float):
    if name not in ATTENTION_BACKENDS:
        raise ValueError(f"unknown attention backend {name!r}; choose from {sorted(ATTENTION_BACKENDS)}")
    return ATTENTION_BACKENDS[name](kv_cache, scale)
