"""Our own Triton kernels (kernels/triton_attention.py): split-KV paged decode and causal extend over the paged
cache, both reading page tables from the runner's persistent block table. Capturable in CUDA graphs."""

from __future__ import annotations

import numpy as np
import torch

from kernels.kv_store import store_kv
from kernels.triton_attention import decode_attention, decode_num_splits, extend_attention
from worker_svc.attention.base import AttentionMetadata, KVCache


class TritonAttention:
    name = "triton"
    supports_cuda_graph = True

    def __init__(self, kv_cache: KVCache, num_heads: int, scale: float, max_batch: int, device: torch.device):
        self.kv_cache = kv_cache
        self.scale = scale
        # on the CPU only under Triton's interpreter (tests): any count will do
        self.kv_last: torch.Tensor | None = None
        self.num_sms = (
            torch.cuda.get_device_properties(device).multi_processor_count if device.type == "cuda" else 8
        )

    def prepare(self, meta: AttentionMetadata) -> None:
        # bidirectional spans (Gemma 3's images): the last key each new token sees, once per step for every layer
        self.kv_last = None if meta.is_decode or not meta.image_spans_host else self._kv_last(meta)

    def _kv_last(self, meta: AttentionMetadata) -> torch.Tensor:
        """[num_tokens] int32: each token's position, raised to its image's last index inside a span."""
        parts = []
        for q_len, seq_len, spans in zip(
            meta.q_lens_host, meta.seq_lens_host, meta.image_spans_host, strict=True
        ):
            pos = np.arange(int(seq_len) - int(q_len), int(seq_len), dtype=np.int32)
            last = pos.copy()
            for s, e in spans:
                inside = (pos >= s) & (pos < e)
                last[inside] = np.maximum(last[inside], min(e, int(seq_len)) - 1)
            parts.append(last)
        host = np.concatenate(parts) if parts else np.zeros(0, np.int32)
        return torch.from_numpy(host).to(self.kv_cache.k.device, non_blocking=True)

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
        if softcap > 0:
            raise NotImplementedError(
                "the triton attention backend has no logit softcapping: use --attention-backend torch_native"
            )
        # q: [T, heads, head_dim]; k, v: [T, kv_heads, head_dim] (views of the fused projection)
        k_cache, v_cache = self.kv_cache.k[layer_idx], self.kv_cache.v[layer_idx]
        store_kv(k, v, k_cache, v_cache, meta.slot_mapping)
        if out is None:
            out = torch.empty(q.shape, dtype=q.dtype, device=q.device)
        if meta.is_decode:
            splits = meta.num_kv_splits or decode_num_splits(
                meta.max_seq_len, meta.num_tokens, self.kv_cache.num_kv_heads, self.num_sms
            )
            return decode_attention(
                q,
                k_cache,
                v_cache,
                meta.block_table,
                meta.rows,
                meta.seq_lens,
                self.scale,
                out,
                num_splits=splits,
                window=window,
            )
        return extend_attention(
            q,
            k_cache,
            v_cache,
            meta.block_table,
            meta.rows,
            meta.seq_lens,
            meta.q_start,
            meta.q_lens,
            meta.max_q_len,
            self.scale,
            out,
            window=window,
            kv_last=self.kv_last,
        )
