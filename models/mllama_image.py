"""Llama 3.2 Vision image preprocessing: transformers' MllamaImageProcessorPil step for step (RGB, PIL bilinear
resize into the best tiled canvas, zero padding to the canvas, rescale, normalize, split into tiles, zero tiles up
to max_num_tiles), on the CPU."""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from PIL import Image

from processor.models import mllama as spec

# meta-llama/Llama-3.2-11B-Vision-Instruct's preprocessor_config.json (OpenAI CLIP's statistics)
CLIP_MEAN_STD = (0.48145466, 0.4578275, 0.40821073), (0.26862954, 0.26130258, 0.27577711)


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
    def __init__(
        self,
        tile_size: int = 560,
        max_num_tiles: int = 4,
        image_mean: tuple[float, ...] = CLIP_MEAN_STD[0],
        image_std: tuple[float, ...] = CLIP_MEAN_STD[1],
        rescale_factor: float = 1 / 255,
        resample: int = 2,
    ):
        self.tile_size, self.max_num_tiles = tile_size, max_num_tiles
        self._mean = np.array(image_mean, dtype=np.float32)[:, None, None]
        self._std = np.array(image_std, dtype=np.float32)[:, None, None]
        self.rescale_factor, self.resample = rescale_factor, resample

    @classmethod
    def from_model_dir(cls, model_dir: str | Path) -> MllamaImagePreprocessor:
        path = Path(model_dir) / "preprocessor_config.json"
        pre = json.loads(path.read_text()) if path.is_file() else {}
        cfg = json.loads((Path(model_dir) / "config.json").read_text())
        vision = {**spec.MLLAMA_VISION_DEFAULTS, **(cfg.get("vision_config") or {})}
        size = pre.get("size") or {}
        return cls(
            tile_size=int(size.get("height", vision["image_size"])),
            max_num_tiles=int(pre.get("max_image_tiles", vision["max_num_tiles"])),
            image_mean=tuple(pre.get("image_mean", CLIP_MEAN_STD[0])),
            image_std=tuple(pre.get("image_std", CLIP_MEAN_STD[1])),
            rescale_factor=float(pre.get("rescale_factor", 1 / 255)),
            resample=int(pre.get("resample", 2)),
        )

    def __call__(self, image: Image.Image) -> MllamaTiles:
        image = image.convert("RGB")
        w, h = image.size
        s = self.tile_size
        ch, cw = spec.optimal_tiled_canvas(h, w, self.max_num_tiles, s)
        nh, nw = spec.image_size_fit_to_canvas(h, w, ch, cw, s)
        if (nw, nh) != (w, h):
            image = image.resize((nw, nh), resample=Image.Resampling(self.resample))
        canvas = np.zeros((3, ch, cw), dtype=np.uint8)
        canvas[:, :nh, :nw] = np.asarray(image, dtype=np.uint8).transpose(2, 0, 1)
        pixels = canvas.astype(np.float32) * np.float32(self.rescale_factor)
        pixels = (pixels - self._mean) / self._std
        th, tw = ch // s, cw // s
        tiles = pixels.reshape(3, th, s, tw, s).transpose(1, 3, 0, 2, 4).reshape(th * tw, 3, s, s)
        out = np.zeros((self.max_num_tiles, 3, s, s), dtype=np.float32)
        out[: th * tw] = tiles
        return MllamaTiles(out, th, tw, spec.aspect_ratio_id(th, tw, self.max_num_tiles))
