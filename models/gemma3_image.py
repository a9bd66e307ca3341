"""Gemma 3 image preprocessing: transformers' Gemma3ImageProcessorPil step for step (RGB, PIL bilinear resize to
the tower's square, rescale, normalize), on the CPU, no pan-and-scan."""

from __future__ import annotations

import numpy as np
from PIL import Image

from processor.models.gemma3 import Gemma3MediaSpec


class Gemma3ImagePreprocessor:
    def __init__(self, spec: Gemma3MediaSpec):
        self.spec = spec
        self._mean = np.array(spec.image_mean, dtype=np.float32)[:, None, None]
        self._std = np.array(spec.image_std, dtype=np.float32)[:, None, None]

    def __call__(
        self, image: Image.Image, grid: tuple[int, int, int] | None = None
    ) -> tuple[np.ndarray, tuple[int, int, int]]:
        """RGB image -> (pixels [1, C, S, S] float32, grid (1, S / patch, S / patch)). The requested `grid` does
        not change a Gemma 3 image's layout (every image is one square)."""
        del grid
        s = self.spec
        size = (s.image_size, s.image_size)
        if image.size != size:
            image = image.resize(size, resample=Image.Resampling(s.resample))
        pixels = np.asarray(image, dtype=np.uint8).transpose(2, 0, 1).astype(np.float32) * np.float32(
            s.rescale_factor
        )
        pixels = (pixels - self._mean) / self._std
        return np.ascontiguousarray(pixels[None]), s.image_grid(*size)
