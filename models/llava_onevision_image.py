"""LLaVA-OneVision image preprocessing (the exact path: transformers' LlavaOnevisionImageProcessorPil step for step,
on the host): anyres crops of the image in a single-image prompt, one mean-padded square in a multi-image prompt,
then rescale and normalize. The geometry is processor/models/llava_onevision.py's.
"""

from __future__ import annotations

import numpy as np
from PIL import Image

from processor.models.llava_onevision import LlavaOnevisionMediaSpec


class LlavaOnevisionImagePreprocessor:
    def __init__(self, spec: LlavaOnevisionMediaSpec):
        self.spec = spec
        self._mean = np.array(spec.image_mean, dtype=np.float32)
        self._std = np.array(spec.image_std, dtype=np.float32)

    def __call__(
        self, image: Image.Image, grid: tuple[int, int, int] | None = None
    ) -> tuple[np.ndarray, tuple[int, int, int]]:
        """The vision service's call: (crops, grid) for an image whose requested grid says whether it is tiled
        (more than one crop: the prompt's only image) or one square of a multi-image prompt."""
        num_images = 1 if grid is None or grid[0] > 1 else 2
        return self.crops(image, num_images), self.spec.image_grid(image.width, image.height, num_images)

    def crops(self, image: Image.Image, num_images: int = 1) -> np.ndarray:
        """RGB image -> crops [num_crops, C, crop, crop] float32: the base image then the grid row by row (or
        the one square of a multi-image prompt)."""
        s = self.spec
        resample = Image.Resampling(s.resample)
        crop = s.crop_size
        lay = s.layout(image.width, image.height, num_images)
        (top, _), (left, _) = lay.padding
        if lay.tiled:
            canvas = np.zeros((*lay.best, 3), dtype=np.uint8)  # black padding around the resized image
            resized = _resize(image, lay.resized, resample)
            canvas[top : top + lay.resized[0], left : left + lay.resized[1]] = resized
            tiles = [_resize(image, (crop, crop), resample)]
            tiles += [
                canvas[r * crop : (r + 1) * crop, c * crop : (c + 1) * crop]
                for r in range(lay.rows)
                for c in range(lay.cols)
            ]
        else:
            # the mean colour, as HF's pad_to_square gets it: int(mean * 255) per channel
            square = np.empty((*lay.best, 3), dtype=np.uint8)
            square[...] = [int(m * 255) for m in s.image_mean]
            square[top : top + image.height, left : left + image.width] = np.asarray(image)
            tiles = [_resize(Image.fromarray(square), (crop, crop), resample)]
        return np.stack([self._normalize(t) for t in tiles])

    def _normalize(self, pixels: np.ndarray) -> np.ndarray:
        # [H, W, C] uint8 -> [C, H, W] float32, in HF's order: rescale in float64, cast, subtract, divide
        x = (pixels.transpose(2, 0, 1).astype(np.float64) * self.spec.rescale_factor).astype(np.float32)
        return ((x.T - self._mean) / self._std).T


def _resize(image: Image.Image, size_hw: tuple[int, int], resample: Image.Resampling) -> np.ndarray:
    """[H, W, 3] uint8 at size_hw (PIL returns a copy when the size is unchanged, as HF's resize does)."""
    h, w = size_hw
    return np.asarray(image.resize((w, h), resample=resample))
