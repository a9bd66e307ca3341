"""SiLU-and-multiply over a merged gate-up projection (HF's act(gate_proj(x)) * up_proj(x)) and QuickGELU (Qwen2-VL's
vision MLP, x * sigmoid(1.702 x)): each Triton kernel and its torch reference, in the activations' dtype."""

from __future__ import annotations

import torch
import torch.nn.functional as F

from kernels._triton import HAS_TRITON, pdl_args, triton_enabled

BLOCK = 1024


def silu_and_mul_ref(x: torch.Tensor) -> torch.Tensor:  # [num_tokens, 2 * inter] -> [num_tokens, inter]
    gate, up = x.chunk(2, dim=-1)
    return F.silu(gate) * up


if HAS_TRITON:
    import triton
    import triton.language as tl

    from kernels._triton import pdl_prologue

    @triton.jit
    def _silu_and_mul_kernel(
        x_ptr, o_ptr, stride_xt, stride_ot, inter, BLOCK: tl.constexpr, USE_PDL: tl.constexpr
    ):
        pdl_prologue(USE_PDL)
        row = tl.program_id(0).to(tl.int64)
        cols = tl.program_id(1) * BLOCK + tl.arange(0, BLOCK)
        mask = cols < inter
        x_row = x_ptr + row * stride_xt
        gate = tl.load(x_row + cols, mask=mask, other=0.0).to(tl.float32)
        up = tl.load(x_row + inter + cols, mask=mask, other=0.0).to(tl.float32)
        dtype = o_ptr.dtype.element_ty
        # the reference rounds silu(gate) to the dtype before the product; so do we
        act = (gate / (1.0 + tl.exp(-gate))).to(dtype).to(tl.float32)
        tl.store(o_ptr + row * stride_ot + cols, (act * up).to(dtype), mask=mask)


def silu_and_mul_triton(
    x: torch.Tensor,  # [num_tokens, 2 * inter]
    out: torch.Tensor
    | None = None,  # [num_tokens, inter] with contiguous rows: written instead of a new tensor
) -> torch.Tensor:  # [num_tokens, inter]
    num_tokens, inter = x.shape[0], x.shape[1] // 2
    if out is None:
        out = torch.empty(num_tokens, inter, dtype=x.dtype, device=x.device)
    if num_tokens == 0:
        return out
    if x.stride(1) != 1:
        x = x.contiguous()
    grid = (num_tokens, triton.cdiv(inter, BLOCK))
    _silu_and_mul_kernel[grid](
        x, out, x.stride(0), out.stride(0), inter, BLOCK=BLOCK, num_warps=4, **pdl_args(x)
    )
    return out


def silu_and_mul(x: torch.Tensor) -> torch.Tensor:
    """silu(x[:, :inter]) * x[:, inter:]: [num_tokens, 2 * inter] -> [num_tokens, inter]."""
    if triton_enabled(x):
        return silu_and_mul_triton(x)
    return silu_and_mul_ref(x)


QUICK_GELU_ALPHA = 1.702


def quick_gelu_ref(x: torch.Tensor) -> torch.Tensor:  # [num_tokens, width] -> same
    """HF's QuickGELUActivation: three element-wise ops, each rounded to x's dtype."""
    return x * torch.sigmoid(QUICK_GELU_ALPHA * x)


if HAS_TRITON:

    @triton.jit
    def _quick_gelu_kernel(x_ptr, o_ptr, stride_xt, stride_ot, width, alpha, BLOCK: tl.constexpr):
        row = tl.program_id(0).to(tl.int64)
        cols = tl.program_id(1) * BLOCK + tl.arange(0, BLOCK)
        mask = cols < width
        x = tl.load(x_ptr + row * stride_xt + cols, mask=mask, other=0.0)
        dtype = o_ptr.dtype.element_ty
        xf = x.to(tl.float32)
        # round where the reference rounds: the scaled input and the sigmoid, before the product
        z = (xf * alpha).to(dtype).to(tl.float32)
        s = (1.0 / (1.0 + tl.exp(-z))).to(dtype).to(tl.float32)
        tl.store(o_ptr + row * stride_ot + cols, (xf * s).to(dtype), mask=mask)


def quick_gelu_triton(x: torch.Tensor) -> torch.Tensor:  # [num_tokens, width] -> [num_tokens, width]
    """One pass over x instead of the reference's three."""
    num_tokens, width = x.shape
    out = torch.empty(num_tokens, width, dtype=x.dtype, device=x.device)
    if num_tokens == 0:
        return out
    if x.stride(1) != 1:
        x = x.contiguous()
    grid = (num_tokens, triton.cdiv(width, BLOCK))
    _quick_gelu_kernel[grid](
        x, out, x.stride(0), out.stride(0), width, QUICK_GELU_ALPHA, BLOCK=BLOCK, num_warps=4
    )
    return out


def quick_gelu(x: torch.Tensor) -> torch.Tensor:
    """x * sigmoid(1.702 x) over [num_tokens, width] (other shapes: the reference)."""
    if x.dim() == 2 and triton_enabled(x):
        return quick_gelu_triton(x)
    return quick_gelu_ref(x)
