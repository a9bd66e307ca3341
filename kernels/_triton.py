"""Whether our Triton kernels can run: on CUDA tensors when triton imports; on CPU tensors only under Triton's
interpreter (TRITON_INTERPRET=1, which the test suite sets on machines without a GPU)."""

from __future__ import annotations

import functools
import os

import torch

try:
    import triton  # noqa: F401

    HAS_TRITON = True
except ImportError:  # a CPU-only install: the torch references serve
    HAS_TRITON = False

INTERPRET = os.environ.get("TRITON_INTERPRET") == "1"
# Programmatic dependent launch (Hopper and later): on by default; MIRADOR_DISABLE_PDL=1 turns it off
PDL = os.environ.get("MIRADOR_DISABLE_PDL", "") not in ("1", "true")


def triton_enabled(t: torch.Tensor) -> bool:
    """Dispatch rule of the fast ops: Triton on CUDA tensors, the torch reference elsewhere."""
    return HAS_TRITON and t.is_cuda


def triton_testable() -> bool:
    """Tests can run the Triton kernels here: on a GPU, or on the CPU through the interpreter."""
    return HAS_TRITON and (torch.cuda.is_available() or INTERPRET)


@functools.cache
def _capability(index: int) -> int:
    return torch.cuda.get_device_capability(index)[0]


def pdl(t: torch.Tensor) -> bool:
    """Launch a kernel on t's device with programmatic dependent launch: it may start while the kernel before it
    on the stream drains, and waits for it (griddepcontrol.wait, `pdl_prologue`) before touching memory. This
    hides most of the launch gap between back-to-back kernels, also inside CUDA graphs. Hopper and later only."""
    return PDL and t.is_cuda and not INTERPRET and _capability(t.device.index or 0) >= 9


def pdl_args(t: torch.Tensor) -> dict:
    """Keyword arguments of a launch of a kernel that starts with `pdl_prologue(USE_PDL)`."""
    return {"USE_PDL": True, "launch_pdl": True} if pdl(t) else {"USE_PDL": False}


if HAS_TRITON:
    import triton
    import triton.language as tl

    @triton.jit
    def pdl_prologue(USE_PDL: tl.constexpr):
        """First statement of a kernel that may be launched with PDL: wait for the previous kernel's writes, then
        let the next kernel launch (it waits for ours in turn)."""
        if USE_PDL:
            tl.extra.cuda.gdc_wait()
            tl.extra.cuda.gdc_launch_dependents()
