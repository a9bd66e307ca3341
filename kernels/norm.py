"""RMSNorm, alone and fused with the residual add before it: Triton kernels and the Hugging Face Qwen2RMSNorm
reference they match (float32 statistics; the normalised row is rounded to the input dtype before the weight)."""

from __future__ import annotations

import torch

from kernels._triton import HAS_TRITON, pdl_args, triton_enabled

# Widest row held in registers in one pass; wider rows take two passes over memory (statistics, then output).
MAX_BLOCK = 8192


def rms_norm_ref(
    x: torch.Tensor,  # [num_tokens, hidden]
    weight: torch.Tensor,  # [hidden]
    eps: float,
    shift: torch.Tensor | None = None,  # [hidden] float32, added to every row first (rounded to x's dtype)
) -> torch.Tensor:  # [num_tokens, hidden], dtype promote(weight, x)
    h = x.float() if shift is None else (x.float() + shift).to(x.dtype).float()
    h = h * torch.rsqrt(h.pow(2).mean(-1, keepdim=True) + eps)
    return weight * h.to(x.dtype)


def fused_add_rms_norm_ref(
    x: torch.Tensor,  # [num_tokens, hidden]
    residual: torch.Tensor,  # [num_tokens, hidden], overwritten with x + residual
    weight: torch.Tensor,  # [hidden]
    eps: float,
) -> tuple[torch.Tensor, torch.Tensor]:  # (rms_norm(x + residual), residual)
    residual.add_(x)
    return rms_norm_ref(residual, weight, eps), residual


if HAS_TRITON:
    import triton
    import triton.language as tl

    from kernels._triton import pdl_prologue

    @triton.jit
    def _load_row(x_row, r_row, cols, mask, stride_xd, stride_rd, HAS_RESIDUAL: tl.constexpr):
        """A block of the row in float32; with a residual, the sum is rounded to its dtype and stored back."""
        h = tl.load(x_row + cols * stride_xd, mask=mask, other=0.0).to(tl.float32)
        if HAS_RESIDUAL:
            h = h + tl.load(r_row + cols * stride_rd, mask=mask, other=0.0).to(tl.float32)
            h = h.to(r_row.dtype.element_ty)
            tl.store(r_row + cols * stride_rd, h, mask=mask)
            h = h.to(tl.float32)
        return h

    @triton.jit
    def _shifted(h, s_ptr, cols, mask, HAS_SHIFT: tl.constexpr, IN_DTYPE: tl.constexpr):
        """h + shift, rounded to the input dtype (the stream it stands for is stored in that dtype)."""
        if HAS_SHIFT:
            h = (h + tl.load(s_ptr + cols, mask=mask, other=0.0)).to(IN_DTYPE).to(tl.float32)
        return h

    @triton.jit
    def _store_normed(o_row, w_ptr, h, rstd, cols, mask, IN_DTYPE: tl.constexpr):
        w = tl.load(w_ptr + cols, mask=mask, other=0.0).to(tl.float32)
        normed = (h * rstd).to(IN_DTYPE).to(tl.float32)  # HF rounds to the input dtype before the weight
        tl.store(o_row + cols, (normed * w).to(o_row.dtype.element_ty), mask=mask)

    @triton.jit
    def _rms_norm_kernel(
        x_ptr,
        r_ptr,
        w_ptr,
        s_ptr,
        o_ptr,
        stride_xt,
        stride_xd,
        stride_rt,
        stride_rd,
        stride_ot,
        hidden,
        eps,
        HAS_RESIDUAL: tl.constexpr,
        HAS_SHIFT: tl.constexpr,
        BLOCK: tl.constexpr,
        NUM_BLOCKS: tl.constexpr,
        USE_PDL: tl.constexpr,
    ):
        pdl_prologue(USE_PDL)
        row = tl.program_id(0).to(tl.int64)
        x_row = x_ptr + row * stride_xt
        r_row = r_ptr + row * stride_rt
        o_row = o_ptr + row * stride_ot
        in_dtype = r_ptr.dtype.element_ty if HAS_RESIDUAL else x_ptr.dtype.element_ty
        cols = tl.arange(0, BLOCK)
        if NUM_BLOCKS == 1:
            mask = cols < hidden
            h = _load_row(x_row, r_row, cols, mask, stride_xd, stride_rd, HAS_RESIDUAL)
            h = _shifted(h, s_ptr, cols, mask, HAS_SHIFT, in_dtype)
            rstd = tl.rsqrt(tl.sum(h * h, axis=0) / hidden + eps)
            _store_normed(o_row, w_ptr, h, rstd, cols, mask, in_dtype)
        else:
            acc = tl.zeros([BLOCK], dtype=tl.float32)
            for b in range(NUM_BLOCKS):
                c = b * BLOCK + cols
                h = _load_row(x_row, r_row, c, c < hidden, stride_xd, stride_rd, HAS_RESIDUAL)
                h = _shifted(h, s_ptr, c, c < hidden, HAS_SHIFT, in_dtype)
                acc += h * h
            rstd = tl.rsqrt(tl.sum(acc, axis=0) / hidden + eps)
            # the second pass reads back sums other threads of this program stored
            tl.debug_barrier()
            for b in range(NUM_BLOCKS):
                c = b * BLOCK + cols
                mask = c < hidden
                if HAS_RESIDUAL:
                    h = tl.load(r_row + c * stride_rd, mask=mask, other=0.0).to(tl.float32)
                else:
                    h = tl.load(x_row + c * stride_xd, mask=mask, other=0.0).to(tl.float32)
                h = _shifted(h, s_ptr, c, mask, HAS_SHIFT, in_dtype)
                _store_normed(o_row, w_ptr, h, rstd, c, mask, in_dtype)


def _rms_norm_launch(
    x: torch.Tensor,  # [num_tokens, hidden]
    residual: torch.Tensor | None,  # [num_tokens, hidden]
    weight: torch.Tensor,  # [hidden], contiguous
    eps: float,
    out: torch.Tensor | None,  # [num_tokens, hidden], contiguous rows
    max_block: int,
    shift: torch.Tensor | None = None,  # [hidden] float32, contiguous
) -> torch.Tensor:
    num_tokens, hidden = x.shape
    in_dtype = x.dtype if residual is None else residual.dtype
    if out is None:
        out = torch.empty(
            num_tokens, hidden, dtype=torch.promote_types(weight.dtype, in_dtype), device=x.device
        )
    if num_tokens == 0:
        return out
    block = min(triton.next_power_of_2(hidden), max_block)
    r = x if residual is None else residual
    _rms_norm_kernel[(num_tokens,)](
        x,
        r,
        weight,
        weight if shift is None else shift,
        out,
        x.stride(0),
        x.stride(1),
        r.stride(0),
        r.stride(1),
        out.stride(0),
        hidden,
        eps,
        HAS_RESIDUAL=residual is not None,
        HAS_SHIFT=shift is not None,
        BLOCK=block,
        NUM_BLOCKS=triton.cdiv(hidden, block),
        num_warps=min(max(block // 256, 1), 16),
        **pdl_args(x),
    )
    return out


def rms_norm_triton(
    x: torch.Tensor,  # [num_tokens, hidden]
    weight: torch.Tensor,  # [hidden]
    eps: float,
    out: torch.Tensor | None = None,  # [num_tokens, hidden]: written instead of a new tensor
    max_block: int = MAX_BLOCK,
    shift: torch.Tensor | None = None,  # [hidden] float32
) -> torch.Tensor:  # [num_tokens, hidden]
    return _rms_norm_launch(x, None, weight, eps, out, max_block, shift)


def fused_add_rms_norm_triton(
    x: torch.Tensor,  # [num_tokens, hidden]
    residual: torch.Tensor,  # [num_tokens, hidden], overwritten with x + residual
    weight: torch.Tensor,  # [hidden]
    eps: float,
    out: torch.Tensor | None = None,
    max_block: int = MAX_BLOCK,
) -> tuple[torch.Tensor, torch.Tensor]:
    return _rms_norm_launch(x, residual, weight, eps, out, max_block), residual


def rms_norm(
    x: torch.Tensor, weight: torch.Tensor, eps: float, shift: torch.Tensor | None = None
) -> torch.Tensor:
    """weight * rmsnorm(x), as Qwen2RMSNorm: [num_tokens, hidden] -> [num_tokens, hidden]. With `shift`
    ([hidden] float32), of x + shift rounded to x's dtype: a residual stream kept without the biases that were
    folded out of its updates (so that each update is one GEMM accumulating into the stream in place)."""
    if triton_enabled(x):
        return rms_norm_triton(x, weight, eps, shift=shift)
    return rms_norm_ref(x, weight, eps, shift)


def fused_add_rms_norm(
    x: torch.Tensor, residual: torch.Tensor, weight: torch.Tensor, eps: float
) -> tuple[torch.Tensor, torch.Tensor]:
    """The residual boundary of a decoder layer in one pass: `residual += x` in place (rounded to residual's
    dtype, as HF's `hidden = residual + out`), then returns (rms_norm(residual), residual)."""
    if triton_enabled(x):
        return fused_add_rms_norm_triton(x, residual, weight, eps)
    return fused_add_rms_norm_ref(x, residual, weight, eps)
