"""FlashInfer's paged kernels (pip install mirador[gpu]): tensor-core decode (it handles GQA groups such as
Qwen2.5-VL-7B's 7, which its plain decode kernel rejects) and paged prefill over a cached prefix, each planned
once per step on the host. Decode graphs get a wrapper of their own per batch size with fixed buffers, planned
before every replay. K/V are written by our store kernel; the cache layout is flashinfer's "NHD"."""

from __future__ import annotations

import numpy as np
import torch

from kernels.kv_store import store_kv
from worker_svc.attention.base import AttentionMetadata, KVCache

WORKSPACE_BYTES = 256 << 20


class FlashInferAttention:
    name = "flashinfer"
    supports_cuda_graph = True

    def __init__(self, kv_cache: KVCache, num_heads: int, scale: float, max_batch: int, device: torch.device):
        if kv_cache.k.dtype not in (torch.float16, torch.bfloat16):
            raise ValueError(
                f"the flashinfer attention backend has no {kv_cache.k.dtype} kernels: serve in float16 or bfloat16 "
                "(--dtype), or use --attention-backend triton"
            )
        import flashinfer

        self.flashinfer = flashinfer
        self.kv_cache = kv_cache
        self.num_heads = num_heads
        self.scale = scale
        self.device = device
        self.workspace = torch.empty(WORKSPACE_BYTES, dtype=torch.uint8, device=device)
        self.prefill = flashinfer.BatchPrefillWithPagedKVCacheWrapper(self.workspace, "NHD")
        self.decode = flashinfer.BatchDecodeWithPagedKVCacheWrapper(
            self.workspace, "NHD", use_tensor_cores=True
        )
        self.graph_decode: dict[int, object] = {}
        self.active = self.decode

    def _pages(
        self, meta: AttentionMetadata, pad_to: int = 0
    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """(kv indptr, page indices, last page lengths) on the host; padding entries get page 0 and one token."""
        size = self.kv_cache.page_size
        counts = [max(1, -(-int(n) // size)) for n in meta.seq_lens_host]
        if meta.page_tables_host is None:  # graph capture and the memory warm-up: everything on page 0
            indices = [[0] * c for c in counts]
        else:
            indices = [t[:c] for t, c in zip(meta.page_tables_host, counts, strict=True)]
        last = [int(n) - (c - 1) * size if n else 1 for n, c in zip(meta.seq_lens_host, counts, strict=True)]
        pad = max(0, pad_to - len(counts))
        counts += [1] * pad
        indices += [[0]] * pad
        last += [1] * pad
        indptr = np.zeros(len(counts) + 1, np.int32)
        np.cumsum(counts, out=indptr[1:])
        flat = np.fromiter((p for t in indices for p in t), np.int32, int(indptr[-1]))
        return (
            torch.from_numpy(indptr),
            torch.from_numpy(flat).to(self.device, non_blocking=True),
            torch.tensor(last, dtype=torch.int32),
        )

    def _shape(self) -> tuple[int, int, int, int]:
        c = self.kv_cache
        return self.num_heads, c.num_kv_heads, c.head_dim, c.page_size

    def _types(self) -> dict:
        return {
            "q_data_type": self.kv_cache.k.dtype,
            "kv_data_type": self.kv_cache.k.dtype,
            "sm_scale": self.scale,
        }

    def _plan_decode(self, wrapper, meta: AttentionMetadata, pad_to: int = 0) -> None:
        wrapper.plan(*self._pages(meta, pad_to), *self._shape(), **self._types())

    def prepare(self, meta: AttentionMetadata) -> None:
        if meta.is_decode:
            self._plan_decode(self.decode, meta)
            self.active = self.decode
            return
        qo = np.zeros(len(meta.q_lens_host) + 1, np.int32)
        np.cumsum(meta.q_lens_host, out=qo[1:])
        self.prefill.plan(
            torch.from_numpy(qo), *self._pages(meta), *self._shape(), causal=True, **self._types()
        )
        self.active = self.prefill

    def prepare_graph(self, g: int, meta: AttentionMetadata) -> None:
        wrapper = self.graph_decode.get(g)
        if wrapper is None:
            max_pages = self.kv_cache.num_pages * 2 + g  # every page at most once per sequence, plus padding
            wrapper = self.flashinfer.BatchDecodeWithPagedKVCacheWrapper(
                self.workspace,
                "NHD",
                use_cuda_graph=True,
                use_tensor_cores=True,
                paged_kv_indptr_buffer=torch.zeros(g + 1, dtype=torch.int32, device=self.device),
                paged_kv_indices_buffer=torch.zeros(max_pages, dtype=torch.int32, device=self.device),
                paged_kv_last_page_len_buffer=torch.ones(g, dtype=torch.int32, device=self.device),
            )
            self.graph_decode[g] = wrapper
        self._plan_decode(wrapper, meta, pad_to=g)
        self.active = wrapper

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
                "the flashinfer attention backend has no sliding windows, softcapping or bidirectional spans yet "
                "(Gemma 3): use --attention-backend torch_native"
            )
        # q: [T, heads, head_dim]; k, v: [T, kv_heads, head_dim]
        k_cache, v_cache = self.kv_cache.k[layer_idx], self.kv_cache.v[layer_idx]
        store_kv(k, v, k_cache, v_cache, meta.slot_mapping)
        o = self.active.run(q.contiguous(), (k_cache, v_cache))
        return o if out is None else out.copy_(o)
