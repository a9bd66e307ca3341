"""Qwen2-VL image preprocessing: smart resize (PIL bicubic), rescale, normalize, patchify.

`Qwen2VLImagePreprocessor` is the exact path: transformers' Qwen2VLImageProcessorPil, step for step, on the CPU.
`FastQwen2VLImagePreprocessor` splits the same work: the host decodes and resizes to uint8, the vision device
rescales, normalizes and patchifies (an eighth of the bytes of the exact path's float32 patches cross to it).
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np
import torch
from PIL import Image

from kernels.image_resize import resize_bicubic
from processor.media import (
    SWAPS_AXES,
    MediaPolicy,
    decode_errors,
    exif_transpose_method,
    open_image,
    to_rgb,
)
from processor.models.qwen2_vl import Qwen2VLMediaSpec

DRAFT_FORMATS = ("JPEG", "MPO")
DRAFT_MARGIN = 2  # a JPEG is decoded at 1/2, 1/4 or 1/8 scale only if that leaves >= 2x the target per side


class Qwen2VLImagePreprocessor:
    def __init__(self, spec: Qwen2VLMediaSpec):
        self.spec = spec
        self._mean = np.array(spec.image_mean, dtype=np.float32)
        self._std = np.array(spec.image_std, dtype=np.float32)

    def __call__(
        self, image: Image.Image, grid: tuple[int, int, int] | None = None
    ) -> tuple[np.ndarray, tuple[int, int, int]]:
        """RGB image -> (patches [grid_t*grid_h*grid_w, C*T*P*P] float32, (t, h, w)). The requested `grid` does
        not change a Qwen-VL image's layout (it follows from the image alone)."""
        del grid
        s = self.spec
        width, height = s.resized_size(*image.size)
        if (width, height) != image.size:
            image = image.resize((width, height), resample=Image.Resampling(s.resample))
        pixels = np.asarray(image, dtype=np.uint8).transpose(2, 0, 1)  # [C, H, W]
        pixels = (pixels.astype(np.float64) * s.rescale_factor).astype(np.float32)
        pixels = ((pixels.T - self._mean) / self._std).T
        return self._patchify(pixels)

    def _patchify(self, pixels: np.ndarray) -> tuple[np.ndarray, tuple[int, int, int]]:
        s = self.spec
        c, h, w = pixels.shape
        p, m, tp = s.patch_size, s.merge_size, s.temporal_patch_size
        gh, gw = h // p, w // p
        x = pixels.reshape(c, gh // m, m, p, gw // m, m, p)
        x = x.transpose(1, 4, 2, 5, 0, 3, 6)  # [gh/m, gw/m, m, m, C, p, p]
        x = np.broadcast_to(x[:, :, :, :, :, None], (*x.shape[:5], tp, p, p))  # a still image repeats in time
        return np.ascontiguousarray(x.reshape(gh * gw, c * tp * p * p)), (1, gh, gw)


@dataclass(frozen=True)
class HostImage:
    """What the host half hands to the device: smart-resized RGB pixels and the geometry they imply."""

    pixels: np.ndarray  # [H, W, 3] uint8, read-only (it shares the bytes Pillow produced)
    grid: tuple[int, int, int]  # (t, h, w) in patches, as the exact path and HF report it
    num_tokens: int
    draft_scale: int = 1  # the JPEG was decoded at 1/draft_scale before the resize; 1: same pixels as HF
    # (width, height) the device half resizes `pixels` to (Pillow's bicubic, bit for bit: kernels/image_resize.py);
    # None: `pixels` are at the model's size already
    resize_to: tuple[int, int] | None = None


class FastQwen2VLImagePreprocessor:
    """Host half `load` (bytes -> uint8 pixels at the model's size) and device half `to_patches` (uint8 pixels ->
    normalized patch rows on any torch device). The reference is `Qwen2VLImagePreprocessor` after `decode_image`."""

    def __init__(self, spec: Qwen2VLMediaSpec, allow_draft: bool = True, defer_resize: bool = False):
        self.spec = spec
        self.allow_draft = allow_draft
        # leave a full decode's one resize to the device half (a GPU does a 2-megapixel bicubic in well under a
        # millisecond; Pillow takes ~30 ms of one host core): same pixels, less host time
        self.defer_resize = defer_resize
        self._stats: dict[torch.device, tuple[torch.Tensor, torch.Tensor]] = {}

    # ---- host half ----

    def load(self, data: bytes, policy: MediaPolicy | None = None, param: str = "image_url") -> HostImage:
        """Encoded image -> uint8 pixels at the smart-resized size, decoded with `decode_image`'s rules (format and
        size checks, EXIF orientation, transparency on white) and resized with the same single bicubic call."""
        s = self.spec
        resample = Image.Resampling(s.resample)
        with decode_errors(param):
            img = open_image(data, policy, param)
            method = exif_transpose_method(img)
            width, height = img.size[::-1] if method in SWAPS_AXES else img.size
            target = s.resized_size(width, height)
            stored_target = target[::-1] if method in SWAPS_AXES else target
            stored_width = img.width
            box = self._draft(img, stored_target)
            resize_to = None
            if box is None:  # full decode: the pixels HF computes, bit for bit
                if method is not None:
                    img = img.transpose(method)
                img = _rgb(img)
                if img.size != target and self.defer_resize and resample == Image.Resampling.BICUBIC:
                    resize_to = target
                elif img.size != target:
                    img = img.resize(target, resample=resample)
            else:  # DCT-scaled decode: resize in stored orientation (the box keeps the geometry exact), then turn
                img = _rgb(img).resize(stored_target, resample=resample, box=box)
                if method is not None:
                    img = img.transpose(method)
            pixels = np.asarray(img)
        grid = s.image_grid(width, height)
        draft_scale = round(stored_width / box[2]) if box else 1
        return HostImage(pixels, grid, s.num_image_tokens(grid), draft_scale, resize_to)

    def _draft(self, img: Image.Image, target: tuple[int, int]) -> tuple[float, float, float, float] | None:
        """Ask libjpeg for a DCT-domain downscale when the target is far smaller than the source; the box of the
        source inside the drafted image, or None when the image is decoded at full size."""
        if not self.allow_draft or img.format not in DRAFT_FORMATS:
            return None
        want = (target[0] * DRAFT_MARGIN, target[1] * DRAFT_MARGIN)
        if img.width // want[0] < 2 or img.height // want[1] < 2:
            return None
        drafted = img.draft(None, want)
        return drafted[1] if drafted is not None else None

    def warm_payload(self, pixels: np.ndarray) -> np.ndarray | HostImage:
        """What the host half hands on for pixels at the model's size, for a warm-up batch: with the resize left to
        the device, a slightly smaller image to resize (both of its passes), so its kernels are loaded too."""
        if not self.defer_resize:
            return pixels
        h, w = pixels.shape[:2]
        grid = self.spec.image_grid(w, h)
        src = np.ascontiguousarray(pixels[: max(1, h - 3), : max(1, w - 5)])
        return HostImage(src, grid, self.spec.num_image_tokens(grid), resize_to=(w, h))

    # ---- device half ----

    def to_patches(
        self,
        images: Sequence[np.ndarray | torch.Tensor | HostImage],
        device: torch.device | str,
        dtype: torch.dtype = torch.float32,
    ) -> torch.Tensor:
        """uint8 [H, W, 3] images -> normalized patch rows [sum(grid_h*grid_w), C*P*P] on `device`, each image's
        rows in merged-block-major order, images in order. A still image once: the exact layout repeats it over
        the temporal patch, which a patch embedding can fold into its weights (summed over T)."""
        device = torch.device(device)
        s = self.spec
        images = [_sized(img, device) for img in images]
        rows = self._patch_rows_u8(images, device)  # [N, C, P*P] uint8
        mean, std = self._mean_std(device)
        x = rows.to(torch.float32).mul_(s.rescale_factor).sub_(mean).div_(std)  # HF's order, in float32
        return x.flatten(1).to(dtype)

    def to_patches_temporal(
        self,
        images: Sequence[np.ndarray | torch.Tensor],
        device: torch.device | str,
        dtype: torch.dtype = torch.float32,
    ) -> torch.Tensor:
        """The exact path's layout [N, C*T*P*P] (each patch repeated over T inside its channel), for parity."""
        x = self.to_patches(images, device, dtype)
        c, t = 3, self.spec.temporal_patch_size
        n, pp = x.shape[0], x.shape[1] // c
        return x.view(n, c, 1, pp).expand(n, c, t, pp).reshape(n, c * t * pp)

    def _patch_rows_u8(
        self, images: Sequence[np.ndarray | torch.Tensor], device: torch.device
    ) -> torch.Tensor:
        p, m = self.spec.patch_size, self.spec.merge_size
        shapes = [self._check(img) for img in images]
        total = sum((h // p) * (w // p) for h, w in shapes)
        out = torch.empty((total, 3, p * p), dtype=torch.uint8, device=device)
        start = 0
        for img, (h, w) in zip(images, shapes, strict=True):
            n = (h // p) * (w // p)
            dst = out[start : start + n].view(h // p // m, w // p // m, m, m, 3, p, p)
            if isinstance(img, np.ndarray) and device.type == "cpu":  # numpy writes into the tensor: one copy
                np.copyto(
                    dst.numpy(), img.reshape(h // p // m, m, p, w // p // m, m, p, 3).transpose(_BLOCKS)
                )
            else:
                src = _upload(img, device).view(h // p // m, m, p, w // p // m, m, p, 3)
                dst.copy_(src.permute(_BLOCKS))
            start += n
        return out

    def _check(self, img: np.ndarray | torch.Tensor) -> tuple[int, int]:
        factor = self.spec.patch_size * self.spec.merge_size
        uint8 = img.dtype == (torch.uint8 if isinstance(img, torch.Tensor) else np.uint8)
        if img.ndim != 3 or img.shape[2] != 3 or not uint8:
            raise ValueError(f"expected uint8 [H, W, 3] pixels, got {img.dtype} {tuple(img.shape)}")
        h, w = int(img.shape[0]), int(img.shape[1])
        if h % factor or w % factor:
            raise ValueError(f"pixels {w}x{h} are not multiples of {factor}: resize them with `load` first")
        return h, w

    def _mean_std(self, device: torch.device) -> tuple[torch.Tensor, torch.Tensor]:
        if device not in self._stats:
            s = self.spec
            self._stats[device] = (
                torch.tensor(s.image_mean, dtype=torch.float32, device=device).view(3, 1),
                torch.tensor(s.image_std, dtype=torch.float32, device=device).view(3, 1),
            )
        return self._stats[device]


_BLOCKS = (0, 3, 1, 4, 6, 2, 5)  # [gh/m, m, p, gw/m, m, p, C] -> [gh/m, gw/m, m, m, C, p, p]


def _rgb(img: Image.Image) -> Image.Image:
    """`to_rgb` without its copy when the image is RGB already."""
    return img if img.mode == "RGB" and img.info.get("transparency") is None else to_rgb(img)


def _sized(img: np.ndarray | torch.Tensor | HostImage, device: torch.device) -> np.ndarray | torch.Tensor:
    """A host half's pixels at the model's size: resized on `device` when the host left the resize to it."""
    if not isinstance(img, HostImage):
        return img
    if img.resize_to is None:
        return img.pixels
    return resize_bicubic(_upload(img.pixels, device), img.resize_to)


def _upload(img: np.ndarray | torch.Tensor, device: torch.device) -> torch.Tensor:
    """uint8 pixels on `device`; host arrays go through pinned memory so the copy to a GPU is asynchronous."""
    if isinstance(img, torch.Tensor):
        return img.to(device, non_blocking=True)
    staging = torch.empty(img.shape, dtype=torch.uint8, pin_memory=device.type == "cuda")
    staging.numpy()[...] = img
    return staging.to(device, non_blocking=True)
