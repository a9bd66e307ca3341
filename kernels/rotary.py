"""Qwen2-VL multimodal rotary embedding (M-RoPE) applied in place to q and k: one Triton launch that computes
cos/sin from the three position rows on the fly, and the torch reference (HF Qwen2.5-VL's cos/sin + rotate_half).

Frequency band j of head_dim/2 takes its position from axis t, h or w: the first mrope_section[0] bands from t,
the next mrope_section[1] from h, the rest from w. cos/sin are rounded to the activations' dtype and each product
is rounded before the sum, as the reference computes them, so the two agree bit for bit given equal cos/sin.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch

from kernels._triton import HAS_TRITON, pdl_args, triton_enabled

# Elements of one token's heads (times head_dim / 2) a program rotates at most.
MAX_TILE = 2048


def mrope_cos_sin(
    positions: torch.Tensor,  # [3, num_tokens]
    inv_freq: torch.Tensor,  # [head_dim / 2] float32
    mrope_section: Sequence[int],
    dtype: torch.dtype,
) -> tuple[torch.Tensor, torch.Tensor]:  # cos, sin: [num_tokens, head_dim]
    freqs = positions[..., None].float() * inv_freq  # [3, num_tokens, head_dim / 2]
    freqs = torch.cat(
        [part[i % 3] for i, part in enumerate(freqs.split(list(mrope_section), dim=-1))], dim=-1
    )
    emb = torch.cat((freqs, freqs), dim=-1)
    return emb.cos().to(dtype), emb.sin().to(dtype)


def _rotate_half(x: torch.Tensor) -> torch.Tensor:
    x1, x2 = x.chunk(2, dim=-1)
    return torch.cat((-x2, x1), dim=-1)


def apply_mrope_ref(
    q: torch.Tensor,  # [num_tokens, num_heads, head_dim]
    k: torch.Tensor,  # [num_tokens, num_kv_heads, head_dim]
    positions: torch.Tensor,  # [3, num_tokens] int32 or int64
    inv_freq: torch.Tensor,  # [head_dim / 2] float32
    mrope_section: Sequence[int],
) -> None:
    for x in (q, k):
        cos, sin = mrope_cos_sin(positions, inv_freq, mrope_section, x.dtype)
        cos, sin = cos[:, None, :], sin[:, None, :]
        x.copy_(x * cos + _rotate_half(x) * sin)


if HAS_TRITON:
    import triton
    import triton.language as tl

    from kernels._triton import pdl_prologue

    @triton.jit
    def _rotate_heads(
        x_row, head0, num_heads, stride_h, stride_d, cos, sin, j, j_mask, half, BLOCK_H: tl.constexpr
    ):
        """Rotates heads [head0, head0 + BLOCK_H) of one token; cos/sin: [BLOCK_HALF] float32."""
        heads = head0 + tl.arange(0, BLOCK_H)
        mask = (heads < num_heads)[:, None] & j_mask[None, :]
        p1 = x_row + heads[:, None] * stride_h + j[None, :] * stride_d
        p2 = p1 + half * stride_d
        dtype = x_row.dtype.element_ty
        c = cos.to(dtype).to(tl.float32)[None, :]
        s = sin.to(dtype).to(tl.float32)[None, :]
        x1 = tl.load(p1, mask=mask, other=0.0).to(tl.float32)
        x2 = tl.load(p2, mask=mask, other=0.0).to(tl.float32)
        # each product rounded to the dtype, then the sum: the reference's x * cos + rotate_half(x) * sin
        o1 = (x1 * c).to(dtype).to(tl.float32) - (x2 * s).to(dtype).to(tl.float32)
        o2 = (x2 * c).to(dtype).to(tl.float32) + (x1 * s).to(dtype).to(tl.float32)
        tl.store(p1, o1.to(dtype), mask=mask)
        tl.store(p2, o2.to(dtype), mask=mask)

    # positions' row stride is num_tokens: specialising on it would compile a variant per batch-size class
    @triton.jit(do_not_specialize=["pos_stride_axis"])
    def _mrope_kernel(
        q_ptr,
        k_ptr,
        pos_ptr,
        inv_freq_ptr,
        q_stride_t,
        q_stride_h,
        q_stride_d,
        k_stride_t,
        k_stride_h,
        k_stride_d,
        pos_stride_axis,
        pos_stride_t,
        num_q_heads,
        num_k_heads,
        half,
        SECTION_T: tl.constexpr,  # bands [0, SECTION_T) take t
        SECTION_TH: tl.constexpr,  # bands [SECTION_T, SECTION_TH) take h, the rest w
        BLOCK_H: tl.constexpr,
        BLOCK_HALF: tl.constexpr,
        USE_PDL: tl.constexpr,
    ):
        pdl_prologue(USE_PDL)
        t = tl.program_id(0).to(tl.int64)
        head_block = tl.program_id(1)
        j = tl.arange(0, BLOCK_HALF)
        j_mask = j < half
        pos_row = pos_ptr + t * pos_stride_t
        pos_t = tl.load(pos_row)
        pos_h = tl.load(pos_row + pos_stride_axis)
        pos_w = tl.load(pos_row + 2 * pos_stride_axis)
        pos = tl.where(j < SECTION_T, pos_t, tl.where(j < SECTION_TH, pos_h, pos_w)).to(tl.float32)
        angle = pos * tl.load(inv_freq_ptr + j, mask=j_mask, other=0.0)
        cos = tl.cos(angle)  # __nv_cosf on NVIDIA: exact range reduction, so large positions stay accurate
        sin = tl.sin(angle)
        num_q_blocks = tl.cdiv(num_q_heads, BLOCK_H)
        if head_block < num_q_blocks:
            q_row = q_ptr + t * q_stride_t
            head0 = head_block * BLOCK_H
            _rotate_heads(
                q_row, head0, num_q_heads, q_stride_h, q_stride_d, cos, sin, j, j_mask, half, BLOCK_H
            )
        else:
            k_row = k_ptr + t * k_stride_t
            head0 = (head_block - num_q_blocks) * BLOCK_H
            _rotate_heads(
                k_row, head0, num_k_heads, k_stride_h, k_stride_d, cos, sin, j, j_mask, half, BLOCK_H
            )


def apply_mrope_triton(
    q: torch.Tensor,  # [num_tokens, num_heads, head_dim], any strides
    k: torch.Tensor,  # [num_tokens, num_kv_heads, head_dim], any strides
    positions: torch.Tensor,  # [3, num_tokens] int32 or int64
    inv_freq: torch.Tensor,  # [head_dim / 2] float32, on q's device
    mrope_section: Sequence[int],
) -> None:
    num_tokens, num_q_heads, head_dim = q.shape
    num_k_heads = k.shape[1]
    if num_tokens == 0:
        return
    half = head_dim // 2
    block_half = triton.next_power_of_2(half)
    block_h = min(triton.next_power_of_2(max(num_q_heads, num_k_heads)), max(1, MAX_TILE // block_half))
    grid = (num_tokens, triton.cdiv(num_q_heads, block_h) + triton.cdiv(num_k_heads, block_h))
    _mrope_kernel[grid](
        q,
        k,
        positions,
        inv_freq,
        *q.stride(),
        *k.stride(),
        *positions.stride(),
        num_q_heads,
        num_k_heads,
        half,
        SECTION_T=mrope_section[0],
        SECTION_TH=mrope_section[0] + mrope_section[1],
        BLOCK_H=block_h,
        BLOCK_HALF=block_half,
        num_warps=min(max(block_h * block_half // 256, 1), 8),
        **pdl_args(q),
    )


def apply_mrope(
    q: torch.Tensor,
    k: torch.Tensor,
    positions: torch.Tensor,
    inv_freq: torch.Tensor,
    mrope_section: Sequence[int],
) -> None:
    """Rotates q [num_tokens, num_heads, head_dim] and k [num_tokens, num_kv_heads, head_dim] in place by the
    3-axis positions [3, num_tokens]; q and k may be strided views (slices of a fused qkv output)."""
    if triton_enabled(q):
        apply_mrope_triton(q, k, positions, inv_freq, mrope_section)
    else:
        apply_mrope_ref(q, k, positions, inv_freq, mrope_section)
