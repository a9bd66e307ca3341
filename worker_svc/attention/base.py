"""The worker's KV tensors and the per-step attention metadata every backend reads.

Layout (fixed by the worker protocol): per layer, K and V are [num_pages, page_size, num_kv_heads, head_dim]; token
i of a sequence whose page table is P lives in page P[i // page_size], slot i % page_size. Page 0 is never handed
out, so it pads page tables and takes the writes of padding rows in CUDA graphs.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch


class KVCache:
    """K and V of every layer: [num_layers, num_pages, page_size, num_kv_heads, head_dim] each."""

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
        self.num_kv_heads = num_kv_heads
        self.head_dim = head_dim

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


@dataclass
class AttentionMetadata:
    """How the packed tokens of one step map onto sequences and KV pages.

    Device tensors are int32 and, in a CUDA graph, views of the graph's static input buffer; the host arrays carry
    the same per-sequence facts for backends that plan on the CPU (flashinfer) and for the torch reference.
    """

    num_tokens: int
    is_decode: bool  # every sequence computes exactly one token (and the batch may be padded for a graph)
    max_q_len: int
    max_seq_len: int
    slot_mapping: torch.Tensor  # [T] int32: where each new token's K/V is written (page * page_size + slot)
    rows: torch.Tensor  # [B] int32: each sequence's row of `block_table`
    seq_lens: torch.Tensor  # [B] int32: tokens in the cache once this step is written (0: padding)
    q_start: torch.Tensor  # [B] int32: offset of each sequence's first token in the packed batch
    q_lens: torch.Tensor  # [B] int32
    block_table: torch.Tensor  # [max_rows, max_pages_per_seq] int32: the runner's persistent page tables
    rows_host: np.ndarray  # [B] int32
    seq_lens_host: np.ndarray  # [B] int32
    q_lens_host: np.ndarray  # [B] int32
    page_tables_host: list[list[int]] | None = None  # per sequence, for backends that flatten page lists
    num_kv_splits: int = 0  # split-KV decode: fixed when a CUDA graph is captured; 0 lets the backend choose
    # per sequence, [start, end) of the bidirectional spans (Gemma 3's images) its queries of this step touch;
    # None: plain causal attention (every family but Gemma 3, and every decode step)
    image_spans_host: list[list[tuple[int, int]]] | None = None
    # cross-attention inputs of families with an encoder cache (the model's own type: mllama's CrossAttentionBatch);
    # None: no sequence of the step shows an image
    encoder: object = None

    @property
    def num_seqs(self) -> int:
        return int(self.rows_host.shape[0])
