"""Building blocks shared by model families; the element-wise work goes through kernels/ (Triton on a GPU, the
plain-torch references on the CPU)."""

from __future__ import annotations

import torch
from torch import nn

from kernels.activation import quick_gelu, silu_and_mul
from kernels.norm import fused_add_rms_norm, rms_norm

ACTIVATIONS = {
    "silu": nn.functional.silu,
    "gelu": nn.functional.gelu,
    "quick_gelu": quick_gelu,
    "gelu_pytorch_tanh": lambda x: nn.functional.gelu(x, approximate="tanh"),  # SigLIP's and Gemma's
}


class RMSNorm(nn.Module):
    """HF Qwen2's RMSNorm (float32 statistics, cast back before the weight). With a residual, adds it first and
    returns (normed, new residual) in one kernel."""

    def __init__(self, hidden_size: int, eps: float = 1e-6):
        super().__init__()
        self.weight = nn.Parameter(torch.ones(hidden_size))
        self.variance_epsilon = eps

    def forward(
        self, x: torch.Tensor, residual: torch.Tensor | None = None, shift: torch.Tensor | None = None
    ) -> torch.Tensor | tuple[torch.Tensor, torch.Tensor]:
        # shift: [hidden] float32 added to x first (kernels.norm.rms_norm); only without a residual
        if residual is None:
            return rms_norm(x, self.weight, self.variance_epsilon, shift)
        if shift is not None:
            raise ValueError("RMSNorm takes a residual or a shift, not both")
        return fused_add_rms_norm(x, residual, self.weight, self.variance_epsilon)


class MergedLinear(nn.Linear):
    """One GEMM for several projections of the same input (q/k/v, gate/up). `output_sizes` tells the loader
    where each checkpoint tensor goes along the output dimension."""

    def __init__(self, in_features: int, output_sizes: list[int], bias: bool):
        super().__init__(in_features, sum(output_sizes), bias=bias)
        self.output_sizes = list(output_sizes)


class KNLinear(nn.Module):
    """A linear layer whose weight is stored transposed, [in, out] (K x N), for `x @ W^T` as a plain NN GEMM. On an
    H100 with cuBLASLt this layout reads a 7B model's projection weights faster than nn.Linear's [out, in] at every
    row count measured (BENCHMARKS.md, issue 8, seventh session): 9% per decoder layer at 64 rows (the down
    projection 55 -> 47 us, gate/up 106 -> 98 us), 3% at one row, 6% at 320. `weight` stays readable as the
    [out, in] view."""

    def __init__(self, linear: nn.Linear):
        super().__init__()
        self.in_features, self.out_features = linear.in_features, linear.out_features
        self.weight_t = nn.Parameter(linear.weight.detach().t().contiguous(), requires_grad=False)
        self.bias = linear.bias

    @property
    def weight(self) -> torch.Tensor:
        return self.weight_t.t()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x2 = x.reshape(-1, self.in_features)
        out = torch.mm(x2, self.weight_t) if self.bias is None else torch.addmm(self.bias, x2, self.weight_t)
        return out.view(*x.shape[:-1], self.out_features)


def transpose_linears(module: nn.Module) -> int:
    """Replace every nn.Linear under `module` by a KNLinear holding the same weights (after loading: the loader
    writes [out, in] tensors). Returns how many were replaced."""
    replaced = 0
    for name, child in list(module.named_children()):
        if isinstance(child, nn.Linear):
            setattr(module, name, KNLinear(child))
            replaced += 1
        else:
            replaced += transpose_linears(child)
    return replaced


class GatedMLP(nn.Module):
    """down(act(gate(x)) * up(x)); parameter names follow HF (gate_proj, up_proj, down_proj)."""

    def __init__(self, hidden_size: int, intermediate_size: int, act: str, bias: bool):
        super().__init__()
        self.gate_proj = nn.Linear(hidden_size, intermediate_size, bias=bias)
        self.up_proj = nn.Linear(hidden_size, intermediate_size, bias=bias)
        self.down_proj = nn.Linear(intermediate_size, hidden_size, bias=bias)
        self.act = ACTIVATIONS[act]

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.down_proj(self.act(self.gate_proj(x)) * self.up_proj(x))


class MergedGatedMLP(nn.Module):
    """GatedMLP with gate and up in one GEMM (`gate_up_proj`, loaded from the checkpoint's gate_proj/up_proj) and
    the activation fused with the product."""

    def __init__(self, hidden_size: int, intermediate_size: int, act: str, bias: bool):
        super().__init__()
        self.gate_up_proj = MergedLinear(hidden_size, [intermediate_size, intermediate_size], bias)
        self.down_proj = nn.Linear(intermediate_size, hidden_size, bias=bias)
        self.act_name = act
        self.act = ACTIVATIONS[act]

    def pad_intermediate(self, multiple: int) -> None:
        """Zero-pad the intermediate width to a multiple (GEMMs with a K or N of, say, 3420 miss cuBLAS's aligned
        Hopper kernels): the added gate and up rows are zero, so SiLU(0) * 0 adds nothing, and down's added columns
        are zero too. Same outputs, faster GEMMs."""
        inter = self.down_proj.in_features
        padded = -(-inter // multiple) * multiple
        if padded == inter:
            return
        w, b = self.gate_up_proj.weight, self.gate_up_proj.bias
        new_w = w.new_zeros(2 * padded, w.shape[1])
        new_w[:inter], new_w[padded : padded + inter] = w[:inter], w[inter:]
        self.gate_up_proj.weight = nn.Parameter(new_w, requires_grad=False)
        if b is not None:
            new_b = b.new_zeros(2 * padded)
            new_b[:inter], new_b[padded : padded + inter] = b[:inter], b[inter:]
            self.gate_up_proj.bias = nn.Parameter(new_b, requires_grad=False)
        self.gate_up_proj.out_features = 2 * padded
        self.gate_up_proj.output_sizes = [padded, padded]
        d = self.down_proj.weight
        new_d = d.new_zeros(d.shape[0], padded)
        new_d[:, :inter] = d
        self.down_proj.weight = nn.Parameter(new_d, requires_grad=False)
        self.down_proj.in_features = padded

    def activate(self, x: torch.Tensor) -> torch.Tensor:
        """The down projection's input: act(gate) * up, [T, hidden] -> [T, intermediate]."""
        gate_up = self.gate_up_proj(x)  # [T, 2 * intermediate]
        if self.act_name == "silu":
            return silu_and_mul(gate_up)
        gate, up = gate_up.chunk(2, dim=-1)
        return self.act(gate) * up

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.down_proj(self.activate(x))


def rotate_half(x: torch.Tensor) -> torch.Tensor:
    x1, x2 = x.chunk(2, dim=-1)
    return torch.cat((-x2, x1), dim=-1)
