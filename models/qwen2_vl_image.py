"""Qwen2-VL image preprocessing: smart resize (PIL bicubic), rescale, normalize, patchify.

Follows the order of operations of transformers' Qwen2VLImageProcessorPil so pixel values match it.
"""

from __future__ import annotations

import numpy as np
from PIL import Image

from processor.models.qwen2_vl import Qwen2VLMediaSpec


class Qwen2VLImagePreprocessor:
    def __init__(self, spec: Qwen2VLMediaSpec):
        self.spec = spec
        self._mean = np.array(spec.image_mean, dtype=np.float32)
        self._std = np.array(spec.image_std, dtype=np.float32)

    def __call__(self, image: Image.Image) -> tuple[np.ndarray, tuple[int, int, int]]:
        """RGB image -> (patches [grid_t*grid_h*grid_w, C*T*P*P] float32, (t, h, w))."""
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
