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
    window: int = 0,  # > 0: a query at index i sees keys j > i - window only (sliding-window layers)
    spans: list[list[tuple[int, int]]] | None = None,  # per sequence: [start, end) of bidirectional spans
    softcap: float = 0.0,  # > 0: scores become softcap * tanh(scores / softcap) before the mask
) -> torch.Tensor:  # [num_tokens, num_heads, head_dim]
    """Causal attention; a query inside a bidirectional span (Gemma 3's image tokens) also sees the span's later
    keys: allowed(i, j) = (j <= i or span(i) == span(j)) and j > i - window, HF's token_type_ids mask."""
    page_size = k_cache.shape[1]
    num_kv_heads = k_cache.shape[2]
    num_heads = q.shape[1]
    out = torch.empty_like(q)
    start = 0
    for i, (table, q_len, kv_len) in enumerate(zip(page_tables, query_lens, kv_lens, strict=True)):
        num_pages = (kv_len + page_size - 1) // page_size
        pages = table[:num_pages]
        k = k_cache[pages].reshape(-1, num_kv_heads, k_cache.shape[-1])[:kv_len]
        v = v_cache[pages].reshape(-1, num_kv_heads, v_cache.shape[-1])[:kv_len]
        qs = q[start : start + q_len].transpose(0, 1)  # [num_heads, q_len, head_dim]
        ks, vs = k.transpose(0, 1), v.transpose(0, 1)  # [num_kv_heads, kv_len, head_dim]
        mask = None
        if q_len > 1 or window > 0 or (spans and spans[i]):
            mask = attention_mask(kv_len - q_len, kv_len, window, spans[i] if spans else (), q.device)
        if softcap > 0:
            o = _softcapped_attention(qs, ks.to(qs.dtype), vs.to(qs.dtype), mask, scale, softcap)
        else:
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


def attention_mask(
    q_lo: int, kv_len: int, window: int, spans, device: torch.device | str = "cpu"
) -> torch.Tensor:  # [kv_len - q_lo, kv_len] bool
    """Queries at indices [q_lo, kv_len) over keys [0, kv_len): causal, each query's upper bound raised to its
    span's last index, the lower bound kept inside the window."""
    q_pos = torch.arange(q_lo, kv_len, device=device)
    hi = q_pos.clone()  # last visible key per query
    for s, e in spans:
        inside = (q_pos >= s) & (q_pos < e)
        hi = torch.where(inside, torch.clamp(hi, min=min(e, kv_len) - 1), hi)
    keys = torch.arange(kv_len, device=device)[None, :]
    mask = keys <= hi[:, None]
    if window > 0:
        mask &= keys > q_pos[:, None] - window
    return mask


def _softcapped_attention(q, k, v, mask, scale: float, softcap: float) -> torch.Tensor:
    # q: [heads, q_len, d]; k, v: [kv_heads, kv_len, d]
    rep = q.shape[0] // k.shape[0]
    k, v = k.repeat_interleave(rep, 0), v.repeat_interleave(rep, 0)
    scores = torch.matmul(q, k.transpose(1, 2)) * scale
    scores = torch.tanh(scores / softcap) * softcap
    if mask is not None:
        scores = scores.masked_fill(~mask, float("-inf"))
    return torch.matmul(torch.softmax(scores.float(), dim=-1).to(q.dtype), v)


def paged_decode_attention(
    q: torch.Tensor,  # [batch, num_heads, head_dim]: one query token per sequence
    k_cache: torch.Tensor,  # [num_pages, page_size, num_kv_heads, head_dim]
    v_cache: torch.Tensor,
    block_table: torch.Tensor,  # [batch, max_pages] int64, padded with page 0
    kv_lens: torch.Tensor,  # [batch] int64
    scale: float,
    window: int = 0,  # > 0: only the last `window` keys (the query is the newest token)
) -> torch.Tensor:  # [batch, num_heads, head_dim]
    """All decode sequences of a step in one masked attention call (what the per-sequence loop costs in Python
    overhead, this pays in padding). Matches `paged_attention` for query_lens of 1."""
    batch, max_pages = block_table.shape
    page_size, num_kv_heads, head_dim = k_cache.shape[1:]
    k = k_cache[block_table].reshape(batch, max_pages * page_size, num_kv_heads, head_dim).transpose(1, 2)
    v = v_cache[block_table].reshape(batch, max_pages * page_size, num_kv_heads, head_dim).transpose(1, 2)
    keys = torch.arange(max_pages * page_size, device=q.device)[None, :]
    mask = keys < kv_lens[:, None]  # [batch, L]
    if window > 0:
        mask &= keys >= kv_lens[:, None] - window
    o = F.scaled_dot_product_attention(
        q[:, :, None, :],
        k.to(q.dtype),
        v.to(q.dtype),
        attn_mask=mask[:, None, None, :],
        scale=scale,
        enable_gqa=q.shape[1] != num_kv_heads,
    )
    return o[:, :, 0, :]
