"""Our own Triton kernels (kernels/triton_attention.py): split-KV paged decode and causal extend over the paged
cache, both reading page tables from the runner's persistent block table. Capturable in CUDA graphs."""

from __future__ import annotations

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
        self.num_sms = (
            torch.cuda.get_device_properties(device).multi_processor_count if device.type == "cuda" else 8
        )

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
        if window > 0 or softcap > 0 or meta.image_spans_host:
            raise NotImplementedError(
                "the triton attention backend has no sliding windows, softcapping or bidirectional spans yet "
                "(Gemma 3): use --attention-backend torch_native"
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
        )
