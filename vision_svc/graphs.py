"""CUDA graphs of the vision tower, one per padded patch count (bucket): a batch of images is padded up to the
smallest bucket that holds it and replayed, so the ~300 kernels of a small batch cost one launch. A batch larger
than every bucket runs eagerly the first time its exact image sizes are seen; seen again, it is captured at its
exact shape (no padding) and replayed from then on, for the last `max_shapes` such shapes. Without graphs (on the
CPU, before `capture`) a bucket runs the same padded forward eagerly on the same static buffers, which is what the
CPU tests check.

All graphs share one memory pool (buckets captured largest first, exact shapes later); an output is valid until
the next replay of any graph, so `run` returns a copy.
"""

from __future__ import annotations

import logging
import time
from collections import OrderedDict
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
# Exact-shape graphs of batches past the buckets (large photos). Eager, such a batch is host-bound in places (a
# 1092x1932 photo on an H100: 36.4 ms eager, 34.0 ms replayed: the host issues ~400 launches, cuDNN's dispatch
# among them, and falls behind the device after the short kernels). Each keeps a static input and its output.
DEFAULT_MAX_SHAPES = 4
_MAX_SEEN = 256  # shapes seen once, remembered so that a second sighting captures


@dataclass
class _Bucket:
    shape: PaddedShape | None  # None: an exact shape
    pixels: torch.Tensor  # [rows, in_features] static input; rows past a batch keep stale values (padding)
    meta: VisionMetadata  # views of one static int32 buffer, refilled by each run
    out: torch.Tensor | None = None  # [rows / unit, out_hidden] the graph's output
    graph: torch.cuda.CUDAGraph | None = None


ShapeKey = tuple[int, tuple[Grid, ...]]  # (pixel features, the batch's grids in order)


class VisionGraphs:
    def __init__(
        self,
        model: Qwen2_5_VisionTransformer,
        buckets: Sequence[int] = DEFAULT_BUCKETS,
        max_frames: int = DEFAULT_MAX_FRAMES,
        still: bool = True,
        max_shapes: int = DEFAULT_MAX_SHAPES,
    ):
        """`buckets`: padded patch counts (multiples of merge^2); `max_frames`: images (frames) a bucket holds;
        `still`: the graphs take still-image patches [N, C*P*P], else [N, C*T*P*P]; `max_shapes`: exact-shape
        graphs kept for larger batches (0: those always run eagerly)."""
        cfg = model.cfg
        w = model.patch_embed.proj.weight  # [hidden, C, T, P, P]
        self.model = model
        self.device, self.dtype = w.device, w.dtype
        self.unit = cfg.spatial_merge_size**2
        self.in_features = w[0, :, 0].numel() if still else w[0].numel()
        self.max_frames = max_frames
        self.max_shapes = max_shapes
        self.shapes: OrderedDict[ShapeKey, _Bucket] = OrderedDict()  # least recently replayed first
        self._seen: OrderedDict[ShapeKey, None] = OrderedDict()
        self._pool = None  # the graphs' shared memory pool, once captured
        self._capture_stream: torch.cuda.Stream | None = None  # exact shapes are captured on it
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
        pool = self._pool = torch.cuda.graph_pool_handle()
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
            out = self._exact(pixels, grids)
            return self.model(pixels.to(self.device, self.dtype), grids) if out is None else out
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

    def graphed(self, grids: Sequence[Grid], num_patches: int, in_features: int) -> bool:
        """Whether `run` would replay a graph for this batch (a bucket, or a captured exact shape)."""
        num_frames = sum(t for t, _, _ in grids)
        if self.bucket_for(num_patches, num_frames, in_features) is not None:
            return True
        return (in_features, tuple(map(tuple, grids))) in self.shapes

    def _exact(self, pixels: torch.Tensor, grids: Sequence[Grid]) -> torch.Tensor | None:
        """The batch's embeddings from the graph of its exact shape: replayed once captured; on the second sighting,
        computed eagerly on the capture stream (warming that thread's and stream's library state: cuBLAS and cuDNN
        handles are per thread, and the first sighting may have run on another) and then captured. None: run it
        eagerly (a first sighting, exact graphs off, or a capture that failed)."""
        if self.max_shapes <= 0 or self._pool is None:
            return None
        key = (pixels.shape[1], tuple(map(tuple, grids)))
        hit = self.shapes.get(key)
        if hit is not None:
            self.shapes.move_to_end(key)
            hit.pixels.copy_(pixels, non_blocking=True)
            hit.graph.replay()
            return hit.out.clone()
        if key not in self._seen:
            self._seen[key] = None
            if len(self._seen) > _MAX_SEEN:
                self._seen.popitem(last=False)
            return None
        del self._seen[key]
        t0 = time.perf_counter()
        meta = build_vision_metadata(grids, self.model.cfg, self.device)
        b = _Bucket(
            shape=None, pixels=torch.empty_like(pixels, device=self.device, dtype=self.dtype), meta=meta
        )
        b.pixels.copy_(pixels)
        try:
            b.graph, b.out, out = self._capture(b.pixels, meta)
        except RuntimeError as e:  # never fail a request for a graph: this shape stays eager
            logger.warning("vision graph capture of %s failed (%s); it runs eagerly", list(key[1]), e)
            self.max_shapes = len(self.shapes)  # and no more captures: a failed capture may recur
            return None
        self.shapes[key] = b
        while len(self.shapes) > self.max_shapes:
            self.shapes.popitem(last=False)
        logger.info(
            "captured a vision graph for %d patches (%s) in %.0f ms; %d exact shapes kept",
            meta.num_rows,
            ",".join("x".join(map(str, g)) for g in key[1]),
            (time.perf_counter() - t0) * 1e3,
            len(self.shapes),
        )
        return out

    def _capture(
        self, pixels: torch.Tensor, meta: VisionMetadata
    ) -> tuple[torch.CUDAGraph, torch.Tensor, torch.Tensor]:
        """(graph, its output, this call's embeddings): one eager forward on the capture stream, then the capture
        of the same forward on these static buffers, in the shared pool. Unlike `torch.cuda.graph`, keeps the
        allocator's cache (no empty_cache while serving); thread_local: other threads of the service (embedding
        leases) may use the device meanwhile."""
        if self._capture_stream is None:
            self._capture_stream = torch.cuda.Stream(self.device)
        stream, main = self._capture_stream, torch.cuda.current_stream(self.device)
        graph = torch.cuda.CUDAGraph()
        stream.wait_stream(main)
        with torch.cuda.stream(stream):
            eager = self.model.forward_padded(pixels, meta)
            graph.capture_begin(self._pool, capture_error_mode="thread_local")
            try:
                out = self.model.forward_padded(pixels, meta)
            finally:
                graph.capture_end()
        main.wait_stream(stream)
        eager.record_stream(main)  # allocated on the capture stream, read on the caller's
        return graph, out, eager
