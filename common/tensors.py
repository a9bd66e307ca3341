"""torch.Tensor <-> common.v1.Tensor. Imported only by torch-side code (worker, vision, engine)."""

from __future__ import annotations

import torch

from protos import common_pb2


def tensor_to_proto(t: torch.Tensor) -> common_pb2.Tensor:
    t = t.detach().to("cpu").contiguous()
    data = t.reshape(-1).view(torch.uint8).numpy().tobytes() if t.numel() else b""
    return common_pb2.Tensor(data=data, shape=list(t.shape), dtype=str(t.dtype).removeprefix("torch."))


def tensor_from_proto(p: common_pb2.Tensor) -> torch.Tensor:
    dtype = getattr(torch, p.dtype, None)
    if not isinstance(dtype, torch.dtype):
        raise ValueError(f"unknown tensor dtype {p.dtype!r}")
    shape = tuple(p.shape)
    if not p.data:
        return torch.empty(shape, dtype=dtype)
    return torch.frombuffer(bytearray(p.data), dtype=torch.uint8).view(dtype).reshape(shape)
