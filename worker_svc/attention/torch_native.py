"""The reference backend (and the CPU path): K/V written with index_copy_, attention by SDPA over gathered pages
(kernels/paged_attention.py). Not capturable in CUDA graphs."""

from __future__ import annotations

import torch

from kernels import paged_attention as ref
from worker_svc.attention.base import AttentionMetadata, KVCache


class TorchNativeAttention:
    name = "torch_native"
    supports_cuda_graph = False

    def __init__(self, kv_cache: KVCache, num_heads: int, scale: float, max_batch: int, device: torch.device):
        self.kv_cache = kv_cache
        self.scale = scale

    def prepare(self, meta: AttentionMetadata) -> None:
        pass

    def forward(
        self,
        layer_idx: int,
        q: torch.Tensor,
        k: torch.Tensor,
        v: torch.Tensor,
        meta: AttentionMetadata,
        out: torch.Tensor | None = None,
        window: int = 0,
        softcap: float = 0.0,
    ) -> torch.Tensor:
        # q: [T, heads, head_dim]; k, v: [T, kv_heads, head_dim] -> [T, heads, head_dim] (into `out` if given);
        # window > 0: a sliding-window layer; softcap > 0: tanh-capped scores (Gemma 2's attn_logit_softcapping)
        k_cache, v_cache = self.kv_cache.k[layer_idx], self.kv_cache.v[layer_idx]
        ref.store_kv(k, v, k_cache, v_cache, meta.slot_mapping.long())
        page_size = self.kv_cache.page_size
        if meta.is_decode and softcap <= 0:
            width = max(1, -(-meta.max_seq_len // page_size))
            table = meta.block_table[meta.rows.long(), :width].long()
            o = ref.paged_decode_attention(
                q, k_cache, v_cache, table, meta.seq_lens.long(), self.scale, window=window
            )
            return o if out is None else out.copy_(o)
        if out is None:
            out = torch.empty_like(q)
        spans = meta.image_spans_host
        start = 0
        for i, (row, q_len, kv_len) in enumerate(
            zip(meta.rows_host, meta.q_lens_host, meta.seq_lens_host, strict=True)
        ):
            q_len, kv_len = int(q_len), int(kv_len)
            if kv_len == 0:  # a padding row of a decode graph batch
                start += q_len
                continue
            table = meta.block_table[int(row), : -(-kv_len // page_size)].long()
            out[start : start + q_len] = ref.paged_attention(
                q[start : start + q_len],
                k_cache,
                v_cache,
                [table],
                [q_len],
                [kv_len],
                self.scale,
                window=window,
                spans=[spans[i]] if spans else None,
                softcap=softcap,
            )
            start += q_len
        return out
