"""CUDA graphs of the vision tower, one per padded patch count (bucket): a batch of images is padded up to the
smallest bucket that holds it and replayed, so the ~300 kernels of a small batch cost one launch; larger batches
(or other pixel layouts) run eagerly. Without graphs (on the CPU, before `capture`) a bucket runs the same padded
forward eagerly on the same static buffers, which is what the CPU tests check.

All graphs share one memory pool (captured largest first); an output is valid until the next replay of any
bucket, so `run` returns a copy.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Sequence
from dataclasses import dataclass

import torch

from kernels.vision import VISION_ATTENTION_BACKENDS
from models.qwen2_5_vl_vision import (
    Grid,
    PaddedShape,
    Qwen2_5_VisionTransformer,
    VisionMetadata,
    build_vision_metadata,
)

logger = logging.getLogger(__name__)

# Graphs pay off while launches dominate (about 2,000 patches on an H100 at 7B sizes); past that a bucket's
# padding costs more GEMM time than the launches it saves, so the default stops at 4,096.
DEFAULT_BUCKETS = (256, 512, 1024, 1536, 2048, 3072, 4096)
DEFAULT_MAX_FRAMES = 16


@dataclass
class _Bucket:
    shape: PaddedShape
    pixels: torch.Tensor  # [rows, in_features] static input; rows past a batch keep stale values (padding)
    meta: VisionMetadata  # views of one static int32 buffer, refilled by each run
    out: torch.Tensor | None = None  # [rows / unit, out_hidden] the graph's output
    graph: torch.cuda.CUDAGraph | None = None


class VisionGraphs:
    def __init__(
        self,
        model: Qwen2_5_VisionTransformer,
        buckets: Sequence[int] = DEFAULT_BUCKETS,
        max_frames: int = DEFAULT_MAX_FRAMES,
        still: bool = True,
    ):
        """`buckets`: padded patch counts (multiples of merge^2); `max_frames`: images (frames) a bucket holds;
        `still`: the graphs take still-image patches [N, C*P*P], else [N, C*T*P*P]."""
        cfg = model.cfg
        w = model.patch_embed.proj.weight  # [hidden, C, T, P, P]
        self.model = model
        self.device, self.dtype = w.device, w.dtype
        self.unit = cfg.spatial_merge_size**2
        self.in_features = w[0, :, 0].numel() if still else w[0].numel()
        self.max_frames = max_frames
        self.buckets: dict[int, _Bucket] = {}
        with torch.inference_mode():
            for rows in sorted(set(buckets)):
                shape = PaddedShape.for_rows(cfg, rows, max_frames)
                self.buckets[rows] = _Bucket(
                    shape=shape,
                    pixels=torch.zeros(rows, self.in_features, dtype=self.dtype, device=self.device),
                    meta=build_vision_metadata([], cfg, self.device, shape),  # all padding
                )

    def bucket_for(self, num_patches: int, num_frames: int, in_features: int) -> int | None:
        """The smallest bucket for this batch; None when it must run eagerly."""
        if in_features != self.in_features or num_frames > self.max_frames:
            return None
        return next((rows for rows in self.buckets if rows >= num_patches), None)

    @torch.inference_mode()
    def capture(self) -> None:
        """Captures every bucket (CUDA only; the model's attention backend must be graph-safe)."""
        if self.device.type != "cuda":
            raise RuntimeError("CUDA graphs need the model on a CUDA device")
        backend = self.model.set_attention_backend(self.model.attention_backend)
        if not VISION_ATTENTION_BACKENDS[backend].graph_safe:
            raise ValueError(f"vision attention backend {backend!r} cannot be captured in a CUDA graph")
        t0 = time.perf_counter()
        pool = torch.cuda.graph_pool_handle()
        for rows in sorted(self.buckets, reverse=True):  # largest first: the smaller graphs reuse its blocks
            b = self.buckets[rows]
            b.pixels.zero_()
            b.meta = build_vision_metadata([], self.model.cfg, self.device, b.shape, out=b.meta.packed)
            for _ in range(2):  # warm-up: Triton compiles, cuBLAS settles, inv_freq moves, outside the graph
                self.model.forward_padded(b.pixels, b.meta)
            torch.cuda.synchronize(self.device)
            graph = torch.cuda.CUDAGraph()
            with torch.cuda.graph(graph, pool=pool):
                b.out = self.model.forward_padded(b.pixels, b.meta)
            b.graph = graph
        torch.cuda.synchronize(self.device)
        logger.info(
            "captured %d vision CUDA graphs (patches %s) in %.1f s",
            len(self.buckets),
            ",".join(map(str, self.buckets)),
            time.perf_counter() - t0,
        )

    @torch.inference_mode()
    def run(self, pixels: torch.Tensor, grids: Sequence[Grid]) -> torch.Tensor:
        """Merged embeddings [N / merge^2, out_hidden] of pixel patches [N, in_features] (any device and dtype;
        copied into the bucket's buffer) for `grids`, in order: a replay when a bucket fits, else eager."""
        num_frames = sum(t for t, _, _ in grids)
        rows = self.bucket_for(pixels.shape[0], num_frames, pixels.shape[1])
        if rows is None:
            return self.model(pixels.to(self.device, self.dtype), grids)
        b = self.buckets[rows]
        meta = build_vision_metadata(grids, self.model.cfg, self.device, b.shape, out=b.meta.packed)
        if meta.num_patches != pixels.shape[0]:
            raise ValueError(f"{pixels.shape[0]} pixel patches for grids of {meta.num_patches}")
        b.pixels[: pixels.shape[0]].copy_(pixels, non_blocking=True)
        if b.graph is not None:
            b.graph.replay()
            out = b.out
        else:
            out = self.model.forward_padded(b.pixels, meta)
        return out[: meta.num_tokens].clone()
