"""Llama 3.2 Vision image preprocessing: transformers' MllamaImageProcessorPil step for step (RGB, PIL bilinear
resize into the best tiled canvas, zero padding to the canvas, rescale, normalize, split into tiles, zero tiles up
to max_num_tiles), on the CPU."""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
from PIL import Image

from processor.models import mllama as geometry
from processor.models.mllama import MllamaMediaSpec


@dataclass(frozen=True)
class MllamaTiles:
    """One image, preprocessed: pixels [max_num_tiles, C, S, S] float32, its tile layout and aspect-ratio id."""

    pixels: np.ndarray
    tiles_high: int
    tiles_wide: int
    aspect_ratio_id: int

    @property
    def num_tiles(self) -> int:
        return self.tiles_high * self.tiles_wide


class MllamaImagePreprocessor:
    def __init__(self, spec: MllamaMediaSpec):
        self.spec = spec
        self._mean = np.array(spec.image_mean, dtype=np.float32)[:, None, None]
        self._std = np.array(spec.image_std, dtype=np.float32)[:, None, None]

    def __call__(self, image: Image.Image) -> MllamaTiles:
        sp = self.spec
        image = image.convert("RGB")
        w, h = image.size
        s = sp.tile_size
        ch, cw = geometry.optimal_tiled_canvas(h, w, sp.max_num_tiles, s)
        nh, nw = geometry.image_size_fit_to_canvas(h, w, ch, cw, s)
        if (nw, nh) != (w, h):
            image = image.resize((nw, nh), resample=Image.Resampling(sp.resample))
        canvas = np.zeros(
            (3, ch, cw), dtype=np.uint8
        )  # HF pads before rescaling: padding becomes -mean / std
        canvas[:, :nh, :nw] = np.asarray(image, dtype=np.uint8).transpose(2, 0, 1)
        pixels = canvas.astype(np.float32) * np.float32(sp.rescale_factor)
        pixels = (pixels - self._mean) / self._std
        th, tw = ch // s, cw // s
        tiles = pixels.reshape(3, th, s, tw, s).transpose(1, 3, 0, 2, 4).reshape(th * tw, 3, s, s)
        out = np.zeros(
            (sp.max_num_tiles, 3, s, s), dtype=np.float32
        )  # padding tiles: zeros (HF's pack_images)
        out[: th * tw] = tiles
        return MllamaTiles(out, th, tw, geometry.aspect_ratio_id(th, tw, sp.max_num_tiles))


class MllamaTilePreprocessor(MllamaImagePreprocessor):
    """The vision service's interface: image -> (pixels [max_num_tiles, C, S, S], grid (1, tiles high, tiles
    wide)); the grid follows from the image's size alone."""

    def __call__(self, image: Image.Image, grid: tuple[int, int, int] | None = None):
        del grid
        tiles = super().__call__(image)
        return tiles.pixels, (1, tiles.tiles_high, tiles.tiles_wide)
