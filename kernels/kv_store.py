"""Writing a step's new keys and values into the paged KV cache: one Triton launch for both caches, and the
index_copy_ reference (kernels/paged_attention.py store_kv). Cache layout: [num_pages, page_size, num_kv_heads,
head_dim]; slot = page * page_size + offset."""

from __future__ import annotations

import torch

from kernels import paged_attention
from kernels._triton import HAS_TRITON, pdl_args, triton_enabled

# Elements of one token's heads a program copies at most (per cache).
MAX_TILE = 4096


def store_kv_ref(
    k: torch.Tensor,  # [num_tokens, num_kv_heads, head_dim]
    v: torch.Tensor,  # [num_tokens, num_kv_heads, head_dim]
    k_cache: torch.Tensor,  # [num_pages, page_size, num_kv_heads, head_dim]
    v_cache: torch.Tensor,  # [num_pages, page_size, num_kv_heads, head_dim]
    slot_mapping: torch.Tensor,  # [num_tokens] int32 or int64
) -> None:
    paged_attention.store_kv(k, v, k_cache, v_cache, slot_mapping.long())  # index_copy_ wants int64 slots


if HAS_TRITON:
    import triton
    import triton.language as tl

    from kernels._triton import pdl_prologue

    @triton.jit
    def _copy_heads(src, dst, heads, dims, mask, src_stride_h, src_stride_d, dst_stride_h, dst_stride_d):
        x = tl.load(src + heads[:, None] * src_stride_h + dims[None, :] * src_stride_d, mask=mask)
        dst_ptrs = dst + heads[:, None] * dst_stride_h + dims[None, :] * dst_stride_d
        tl.store(dst_ptrs, x.to(dst.dtype.element_ty), mask=mask)

    @triton.jit
    def _store_kv_kernel(
        k_ptr,
        v_ptr,
        kc_ptr,
        vc_ptr,
        slot_ptr,
        k_stride_t,
        k_stride_h,
        k_stride_d,
        v_stride_t,
        v_stride_h,
        v_stride_d,
        kc_stride_p,
        kc_stride_s,
        kc_stride_h,
        kc_stride_d,
        vc_stride_p,
        vc_stride_s,
        vc_stride_h,
        vc_stride_d,
        num_heads,
        head_dim,
        page_size,
        BLOCK_H: tl.constexpr,
        BLOCK_D: tl.constexpr,
        USE_PDL: tl.constexpr,
    ):
        pdl_prologue(USE_PDL)
        t = tl.program_id(0).to(tl.int64)
        slot = tl.load(slot_ptr + t).to(tl.int64)
        page, offset = slot // page_size, slot % page_size
        heads = tl.program_id(1) * BLOCK_H + tl.arange(0, BLOCK_H)
        dims = tl.arange(0, BLOCK_D)
        mask = (heads < num_heads)[:, None] & (dims < head_dim)[None, :]
        k_src = k_ptr + t * k_stride_t
        k_dst = kc_ptr + page * kc_stride_p + offset * kc_stride_s
        _copy_heads(k_src, k_dst, heads, dims, mask, k_stride_h, k_stride_d, kc_stride_h, kc_stride_d)
        v_src = v_ptr + t * v_stride_t
        v_dst = vc_ptr + page * vc_stride_p + offset * vc_stride_s
        _copy_heads(v_src, v_dst, heads, dims, mask, v_stride_h, v_stride_d, vc_stride_h, vc_stride_d)


def store_kv_triton(
    k: torch.Tensor,  # [num_tokens, num_kv_heads, head_dim]
    v: torch.Tensor,  # [num_tokens, num_kv_heads, head_dim]
    k_cache: torch.Tensor,  # [num_pages, page_size, num_kv_heads, head_dim]
    v_cache: torch.Tensor,  # [num_pages, page_size, num_kv_heads, head_dim]
    slot_mapping: torch.Tensor,  # [num_tokens] int32 or int64
) -> None:
    num_tokens, num_heads, head_dim = k.shape
    if num_tokens == 0:
        return
    block_d = triton.next_power_of_2(head_dim)
    block_h = min(triton.next_power_of_2(num_heads), max(1, MAX_TILE // block_d))
    grid = (num_tokens, triton.cdiv(num_heads, block_h))
    _store_kv_kernel[grid](
        k,
        v,
        k_cache,
        v_cache,
        slot_mapping,
        *k.stride(),
        *v.stride(),
        *k_cache.stride(),
        *v_cache.stride(),
        num_heads,
        head_dim,
        k_cache.shape[1],
        BLOCK_H=block_h,
        BLOCK_D=block_d,
        num_warps=min(max(block_h * block_d // 256, 1), 8),
        **pdl_args(k),
    )


def store_kv(
    k: torch.Tensor,
    v: torch.Tensor,
    k_cache: torch.Tensor,
    v_cache: torch.Tensor,
    slot_mapping: torch.Tensor,
) -> None:
    """k_cache/v_cache[slot_mapping[i]] = k/v[i] (cast to the cache dtype), in place; k and v may be strided views
    (slices of a fused qkv output)."""
    if triton_enabled(k):
        store_kv_triton(k, v, k_cache, v_cache, slot_mapping)
    else:
        store_kv_ref(k, v, k_cache, v_cache, slot_mapping)
