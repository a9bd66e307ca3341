"""Attention backends over the worker's paged KV cache, behind a registry (imported lazily: flashinfer and
Triton are optional; KVCache and AttentionMetadata are in base.py)."""

from __future__ import annotations

import importlib
import importlib.util
import os
from typing import TYPE_CHECKING

if TYPE_CHECKING:  # this module stays torch-free: flag parsing imports it
    import torch

    from worker_svc.attention.base import KVCache

ATTENTION_BACKENDS: dict[str, str] = {
    "torch_native": "worker_svc.attention.torch_native:TorchNativeAttention",
    "triton": "worker_svc.attention.triton_backend:TritonAttention",
    "flashinfer": "worker_svc.attention.flashinfer_backend:FlashInferAttention",
}

# What `auto` takes on a GPU, fastest first, as measured on an H100 (BENCHMARKS.md, "Attention backends").
GPU_PREFERENCE = ("triton", "flashinfer", "torch_native")
_NEEDS = {"triton": "triton", "flashinfer": "flashinfer"}


def installed(name: str, device: torch.device) -> bool:
    if name == "torch_native":
        return True
    if importlib.util.find_spec(_NEEDS[name]) is None:
        return False
    # Triton's interpreter (TRITON_INTERPRET=1) runs our kernels on CPU tensors: a debugging aid, used by tests
    return device.type == "cuda" or (name == "triton" and os.environ.get("TRITON_INTERPRET") == "1")


def resolve_backend(name: str, device: torch.device) -> str:
    """`auto`: the fastest installed backend on a GPU, the reference on the CPU; a named one must be usable."""
    if name == "auto":
        if device.type != "cuda":
            return "torch_native"
        return next(n for n in GPU_PREFERENCE if installed(n, device))
    if name not in ATTENTION_BACKENDS:
        raise ValueError(
            f"unknown attention backend {name!r}; choose auto or one of {sorted(ATTENTION_BACKENDS)}"
        )
    if not installed(name, device):
        hint = (
            "it needs a CUDA device"
            if device.type != "cuda"
            else f"pip install {_NEEDS[name]} (mirador[gpu])"
        )
        raise ValueError(f"attention backend {name!r} is not usable here: {hint}")
    return name


def create_attention_backend(
    name: str, kv_cache: KVCache, num_heads: int, scale: float, max_batch: int, device: torch.device
):
    module, _, cls = ATTENTION_BACKENDS[name].partition(":")
    return getattr(importlib.import_module(module), cls)(kv_cache, num_heads, scale, max_batch, device)
