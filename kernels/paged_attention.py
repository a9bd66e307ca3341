"""Paged KV cache write and causal attention over pages: the plain-torch reference every fast kernel matches.

Layout (fixed by the worker protocol): per layer, k_cache and v_cache are [num_pages, page_size, num_kv_heads,
head_dim]; a token at sequence index i of a sequence with page table P lives in page P[i // page_size], slot
i % page_size. Page 0 is never handed out, so it can serve as padding.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F


def store_kv(
    k: torch.Tensor,  # [num_tokens, num_kv_heads, head_dim]
    v: torch.Tensor,  # [num_tokens, num_kv_heads, head_dim]
    k_cache: torch.Tensor,  # [num_pages, page_size, num_kv_heads, head_dim]
    v_cache: torch.Tensor,
    slot_mapping: torch.Tensor,  # [num_tokens] int64: page * page_size + offset
) -> None:
    num_pages, page_size = k_cache.shape[:2]
    k_cache.view(num_pages * page_size, *k_cache.shape[2:]).index_copy_(0, slot_mapping, k.to(k_cache.dtype))
    v_cache.view(num_pages * page_size, *v_cache.shape[2:]).index_copy_(0, slot_mapping, v.to(v_cache.dtype))


def paged_attention(
    q: torch.Tensor,  # [num_tokens, num_heads, head_dim], sequences packed back to back
    k_cache: torch.Tensor,  # [num_pages, page_size, num_kv_heads, head_dim]
    v_cache: torch.Tensor,
    page_tables: list[torch.Tensor],  # per sequence: [num_pages_of_seq] int64
    query_lens: list[int],  # per sequence: tokens of q belonging to it
    kv_lens: list[int],  # per sequence: tokens in the cache after this step (its queries are the last ones)
    scale: float,
) -> torch.Tensor:  # [num_tokens, num_heads, head_dim]
    page_size = k_cache.shape[1]
    num_kv_heads = k_cache.shape[2]
    num_heads = q.shape[1]
    out = torch.empty_like(q)
    start = 0
    for table, q_len, kv_len in zip(page_tables, query_lens, kv_lens, strict=True):
        num_pages = (kv_len + page_size - 1) // page_size
        pages = table[:num_pages]
        k = k_cache[pages].reshape(-1, num_kv_heads, k_cache.shape[-1])[:kv_len]
        v = v_cache[pages].reshape(-1, num_kv_heads, v_cache.shape[-1])[:kv_len]
        qs = q[start : start + q_len].transpose(0, 1)  # [num_heads, q_len, head_dim]
        ks, vs = k.transpose(0, 1), v.transpose(0, 1)  # [num_kv_heads, kv_len, head_dim]
        mask = None
        if q_len > 1:
            q_pos = torch.arange(kv_len - q_len, kv_len, device=q.device)
            mask = torch.arange(kv_len, device=q.device)[None, :] <= q_pos[:, None]
        o = F.scaled_dot_product_attention(
            qs,
            ks.to(qs.dtype),
            vs.to(qs.dtype),
            attn_mask=mask,
            scale=scale,
            enable_gqa=num_kv_heads != num_heads,
        )
        out[start : start + q_len] = o.transpose(0, 1)
        start += q_len
    return out


def paged_decode_attention(
    q: torch.Tensor,  # [batch, num_heads, head_dim]: one query token per sequence
    k_cache: torch.Tensor,  # [num_pages, page_size, num_kv_heads, head_dim]
    v_cache: torch.Tensor,
    block_table: torch.Tensor,  # [batch, max_pages] int64, padded with page 0
    kv_lens: torch.Tensor,  # [batch] int64
    scale: float,
) -> torch.Tensor:  # [batch, num_heads, head_dim]
    """All decode sequences of a step in one masked attention call (what the per-sequence loop costs in Python
    overhead, this pays in padding). Matches `paged_attention` for query_lens of 1."""
    batch, max_pages = block_table.shape
    page_size, num_kv_heads, head_dim = k_cache.shape[1:]
    k = k_cache[block_table].reshape(batch, max_pages * page_size, num_kv_heads, head_dim).transpose(1, 2)
    v = v_cache[block_table].reshape(batch, max_pages * page_size, num_kv_heads, head_dim).transpose(1, 2)
    mask = torch.arange(max_pages * page_size, device=q.device)[None, :] < kv_lens[:, None]  # [batch, L]
    o = F.scaled_dot_product_attention(
        q[:, :, None, :],
        k.to(q.dtype),
        v.to(q.dtype),
        attn_mask=mask[:, None, None, :],
        scale=scale,
        enable_gqa=q.shape[1] != num_kv_heads,
    )
    return o[:, :, 0, :]
