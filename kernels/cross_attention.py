"""Cross-attention of text queries over a sequence's fixed encoder K/V (Llama 3.2 Vision), the plain-torch
reference. HF's mask rule: a query sees the encoder tokens of the tiles its row marks visible; a query that sees no
tile at all attends to *every* encoder token unmasked (HF's inverted mask is multiplied by
full_text_row_masked_out_mask, which zeroes the whole row) and only the layer's MLP output is zeroed for it by the
caller. Imports nothing of ours."""

from __future__ import annotations

import torch


def cross_attention(
    q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, visible: torch.Tensor, scale: float
) -> tuple[torch.Tensor, torch.Tensor]:
    """q: [Tq, heads, head_dim]; k, v: [S, kv_heads, head_dim]; visible: [Tq, S] bool
    -> (out [Tq, heads, head_dim], has_image [Tq] bool: the row saw at least one encoder token)."""
    has_image = visible.any(dim=-1)
    mask = visible | ~has_image[:, None]
    out = torch.nn.functional.scaled_dot_product_attention(
        q.transpose(0, 1), k.transpose(0, 1), v.transpose(0, 1), attn_mask=mask, scale=scale, enable_gqa=True
    ).transpose(0, 1)
    return out, has_image


def tile_visibility(
    positions: torch.Tensor,
    ranges: list[tuple[int, int]],
    num_tiles: list[int],
    max_num_tiles: int,
    tokens_per_tile: int,
    prompt_len: int,
) -> torch.Tensor:
    """positions: [Tq] (token positions in the sequence) -> [Tq, images * max_num_tiles * tokens_per_tile] bool:
    token p sees image i's first num_tiles[i] tiles when ranges[i] holds p (tokens past the prompt use the prompt's
    last row, as HF's generate repeats the mask's last row)."""
    p = positions.clamp(max=prompt_len - 1)[:, None]
    tiles = torch.arange(max_num_tiles, device=positions.device)
    rows = []
    for (start, end), n in zip(ranges, num_tiles, strict=True):
        seen = (p >= start) & (p < end)  # [Tq, 1]
        rows.append(seen & (tiles < n)[None, :])  # [Tq, max_tiles]
    tile_mask = torch.cat(rows, dim=1)  # [Tq, images * max_tiles]
    return tile_mask.repeat_interleave(tokens_per_tile, dim=1)


def store_encoder_kv(
    k: torch.Tensor, v: torch.Tensor, k_cache: torch.Tensor, v_cache: torch.Tensor, page_table: torch.Tensor
) -> None:
    """Write one sequence's encoder K/V once (its first prefill) into its encoder pages.
    k, v: [S, kv_heads, head_dim]; k_cache, v_cache: [num_pages, page_size, kv_heads, head_dim]; page_table:
    [ceil(S / page_size)] int64 (row i goes to page page_table[i // page_size], slot i % page_size)."""
    page_size = k_cache.shape[1]
    rows = torch.arange(k.shape[0], device=k.device)
    slots = page_table[rows // page_size] * page_size + rows % page_size
    k_cache.view(-1, *k_cache.shape[2:]).index_copy_(0, slots, k)
    v_cache.view(-1, *v_cache.shape[2:]).index_copy_(0, slots, v)


def paged_cross_attention(
    q: torch.Tensor,
    k_cache: torch.Tensor,
    v_cache: torch.Tensor,
    page_table: torch.Tensor,
    encoder_len: int,
    visible: torch.Tensor,
    scale: float,
) -> tuple[torch.Tensor, torch.Tensor]:
    """cross_attention over a sequence's encoder pages (the layout a worker's encoder cache would use): gathers
    the first encoder_len rows of its pages. q: [Tq, heads, d]; visible: [Tq, encoder_len]."""
    k = k_cache[page_table].flatten(0, 1)[:encoder_len]
    v = v_cache[page_table].flatten(0, 1)[:encoder_len]
    return cross_attention(q, k, v, visible, scale)
