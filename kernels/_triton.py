"""Whether our Triton kernels can run: on CUDA tensors when triton imports; on CPU tensors only under Triton's
interpreter (TRITON_INTERPRET=1, which the test suite sets on machines without a GPU)."""

from __future__ import annotations

import os

import torch

try:
    import triton  # noqa: F401

    HAS_TRITON = True
except ImportError:  # a CPU-only install: the torch references serve
    HAS_TRITON = False

INTERPRET = os.environ.get("TRITON_INTERPRET") == "1"


def triton_enabled(t: torch.Tensor) -> bool:
    """Dispatch rule of the fast ops: Triton on CUDA tensors, the torch reference elsewhere."""
    return HAS_TRITON and t.is_cuda


def triton_testable() -> bool:
    """Tests can run the Triton kernels here: on a GPU, or on the CPU through the interpreter."""
    return HAS_TRITON and (torch.cuda.is_available() or INTERPRET)
