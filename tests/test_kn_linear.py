"""KNLinear (issue 8, seventh session): the decoder's projections with [in, out] weights give nn.Linear's outputs."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from models.layers import KNLinear, MergedGatedMLP, transpose_linears


@pytest.mark.parametrize("bias", [False, True])
def test_kn_linear_matches_linear(bias):
    torch.manual_seed(0)
    lin = nn.Linear(24, 40, bias=bias)
    kn = KNLinear(lin)
    assert kn.weight_t.shape == (24, 40) and kn.weight_t.is_contiguous()
    assert torch.equal(kn.weight, lin.weight)
    for shape in ((5, 24), (2, 3, 24), (1, 24)):
        x = torch.randn(*shape)
        torch.testing.assert_close(kn(x), lin(x), rtol=1e-6, atol=1e-6)


def test_transpose_linears_keeps_a_block_exact():
    torch.manual_seed(0)
    mlp = MergedGatedMLP(16, 48, "silu", bias=False)
    x = torch.randn(7, 16)
    want = mlp(x)
    assert transpose_linears(mlp) == 2
    assert isinstance(mlp.gate_up_proj, KNLinear) and isinstance(mlp.down_proj, KNLinear)
    torch.testing.assert_close(mlp(x), want, rtol=1e-6, atol=1e-6)
    assert not any(isinstance(m, nn.Linear) for m in mlp.modules())


def test_the_cpu_keeps_nn_linear(default_model):
    """The layout change is for cuBLAS: a model loaded on the CPU keeps nn.Linear (and its exact HF parity)."""
    from models.loader import load_model
    from models.registry import language_model_class
    from processor.model_config import load_model_config

    cfg = load_model_config(default_model)
    model = load_model(
        language_model_class(cfg.architecture), cfg, default_model, torch.float32, torch.device("cpu")
    )
    assert isinstance(model.model.layers[0].mlp.down_proj, nn.Linear)
