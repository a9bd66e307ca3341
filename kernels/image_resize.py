"""Pillow's bicubic resize of uint8 RGB images, bit for bit, in torch (any device).

The fast image processor decodes on the host and can leave the resize to the vision device (a 1920x1080 photo's
resize to 1932x1092 is ~30 ms of single-threaded Pillow on a 2-core host, well under a millisecond on a GPU). Its
pixels must stay Pillow's, which transformers' processors use, so this replicates Pillow's `Resample.c` for 8-bit
images: the filter (Keys' cubic, a = -0.5, support 2 scaled by the downscale factor), the per-pixel bounds and
weights in float64, the weights rounded to 22-bit fixed point, and two passes (horizontal first, over the source
rows the vertical pass reads), each accumulating integers from half a unit and clipping to 0..255. The reference is
Pillow itself (tests/test_fast_preprocess.py compares every pixel)."""

from __future__ import annotations

import math
from functools import lru_cache

import numpy as np
import torch

PRECISION_BITS = 32 - 8 - 2
_SUPPORT = 2.0
_A = -0.5


def _bicubic(x: np.ndarray) -> np.ndarray:
    x = np.abs(x)
    near = ((_A + 2.0) * x - (_A + 3.0)) * x * x + 1
    far = (((x - 5) * x + 8) * x - 4) * _A
    return np.where(x < 1.0, near, np.where(x < 2.0, far, 0.0))


@lru_cache(maxsize=64)
def _coeffs(in_size: int, in0: float, in1: float, out_size: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Pillow's precompute_coeffs + normalize_coeffs_8bpc: per output pixel the first source index, the number of
    taps, and the fixed-point weights [out_size, ksize] (int64, zero past the taps)."""
    scale = (in1 - in0) / out_size
    filterscale = max(scale, 1.0)
    support = _SUPPORT * filterscale
    ksize = int(math.ceil(support)) * 2 + 1
    center = in0 + (np.arange(out_size, dtype=np.float64) + 0.5) * scale
    # C's (int) truncates toward zero; these are >= -support + 0.5 > -inf, and Pillow clamps below at 0 anyway
    xmin = np.maximum(np.trunc(center - support + 0.5).astype(np.int64), 0)
    xmax = np.minimum(np.trunc(center + support + 0.5).astype(np.int64), in_size) - xmin
    taps = np.arange(ksize, dtype=np.float64)
    w = _bicubic((taps[None, :] + xmin[:, None] - center[:, None] + 0.5) * (1.0 / filterscale))
    w = np.where(taps[None, :] < xmax[:, None], w, 0.0)
    total = w.sum(axis=1, keepdims=True)
    w = np.where(total != 0.0, w / np.where(total != 0.0, total, 1.0), w)
    scaled = w * (1 << PRECISION_BITS)
    fixed = np.where(scaled < 0, np.trunc(-0.5 + scaled), np.trunc(0.5 + scaled)).astype(np.int64)
    return xmin, xmax, fixed


def _pass(src: torch.Tensor, dim: int, xmin: np.ndarray, fixed: np.ndarray) -> torch.Tensor:
    """One direction of the resize: src int64 [H, W, C], resampled along `dim` (0 rows, 1 columns)."""
    device = src.device
    size = src.shape[dim]
    ksize = fixed.shape[1]
    idx = torch.from_numpy(xmin).to(device)
    weights = torch.from_numpy(fixed).to(device)
    acc = torch.full(
        (len(xmin), src.shape[1], src.shape[2]) if dim == 0 else (src.shape[0], len(xmin), src.shape[2]),
        1 << (PRECISION_BITS - 1),
        dtype=torch.int64,
        device=device,
    )
    for k in range(ksize):
        wk = weights[:, k]
        taps = (idx + k).clamp_(max=size - 1)  # past the taps the weight is 0: any in-range index will do
        if dim == 0:
            acc += src.index_select(0, taps) * wk[:, None, None]
        else:
            acc += src.index_select(1, taps) * wk[None, :, None]
    return acc.div_(1 << PRECISION_BITS, rounding_mode="floor").clamp_(0, 255)


def resize_bicubic(
    pixels: torch.Tensor, size: tuple[int, int], box: tuple[float, float, float, float] | None = None
) -> torch.Tensor:
    """uint8 [H, W, C] -> uint8 [size[1], size[0], C], as `Image.resize(size, Resampling.BICUBIC, box)` computes it
    for an 8-bit image of that mode (RGB here)."""
    if pixels.dtype != torch.uint8 or pixels.ndim != 3:
        raise ValueError(f"expected uint8 [H, W, C] pixels, got {pixels.dtype} {tuple(pixels.shape)}")
    height, width = int(pixels.shape[0]), int(pixels.shape[1])
    out_w, out_h = size
    x0, y0, x1, y1 = box if box is not None else (0.0, 0.0, float(width), float(height))
    need_h = out_w != width or x0 != 0 or x1 != width
    need_v = out_h != height or y0 != 0 or y1 != height
    if not (need_h or need_v):
        return pixels.clone()
    x = pixels.to(torch.int64)
    ymin, ylen, yfixed = _coeffs(height, float(y0), float(y1), out_h)
    xmin, xlen, xfixed = _coeffs(width, float(x0), float(x1), out_w)
    if need_h and need_v and vertical_first(width, height, out_w, out_h):
        first, last = int(xmin[0]), int(xmin[-1] + xlen[-1])  # the source columns the horizontal pass reads
        return _pass(_pass(x[:, first:last], 0, ymin, yfixed), 1, xmin - first, xfixed).to(torch.uint8)
    if need_h:
        first, last = int(ymin[0]), int(ymin[-1] + ylen[-1])  # the source rows the vertical pass reads
        x = _pass(x[first:last], 1, xmin, xfixed)
        ymin = ymin - first
    if need_v:
        x = _pass(x, 0, ymin, yfixed)
    return x.to(torch.uint8)


def vertical_first(width: int, height: int, out_w: int, out_h: int) -> bool:
    """Which pass the installed Pillow runs first when both are needed (its rounding between them makes the order
    part of the result). Pillow up to 12 always runs the horizontal one first; Pillow 13 runs the vertical one
    first when the height shrinks and the width grows by more than half the height's loss (found by comparison
    over random shapes, not from its documentation). Which of the two is installed is probed once; the parity
    tests and the vision service's start-up check (`matches_pillow`) compare against it."""
    return _pillow_may_go_vertical_first() and out_h < height and 2 * (out_w - width) > out_h - height


@lru_cache(maxsize=1)
def _pillow_may_go_vertical_first() -> bool:
    """Resize a small image whose two orders round differently, and see which one Pillow took."""
    from PIL import Image

    pixels = np.random.default_rng(0).integers(0, 256, (40, 60, 3), dtype=np.uint8)
    ref = np.asarray(Image.fromarray(pixels).resize((52, 20), resample=Image.Resampling.BICUBIC))
    x = torch.from_numpy(pixels).to(torch.int64)
    ymin, _, yfixed = _coeffs(40, 0.0, 40.0, 20)
    xmin, xlen, xfixed = _coeffs(60, 0.0, 60.0, 52)
    first, last = int(xmin[0]), int(xmin[-1] + xlen[-1])
    vertical = _pass(_pass(x[:, first:last], 0, ymin, yfixed), 1, xmin - first, xfixed).to(torch.uint8)
    return bool(np.array_equal(vertical.numpy(), ref))


def matches_pillow(seed: int = 0) -> bool:
    """This module against the installed Pillow on a few small images covering both pass orders, up and down."""
    from PIL import Image

    rng = np.random.default_rng(seed)
    for (w, h), size in (
        ((61, 47), (84, 56)),
        ((60, 90), (84, 56)),
        ((60, 40), (52, 20)),
        ((90, 60), (56, 28)),
        ((50, 40), (40, 50)),
    ):
        a = rng.integers(0, 256, (h, w, 3), dtype=np.uint8)
        ref = np.asarray(Image.fromarray(a).resize(size, resample=Image.Resampling.BICUBIC))
        if not np.array_equal(resize_bicubic(torch.from_numpy(a), size).numpy(), ref):
            return False
    return True
