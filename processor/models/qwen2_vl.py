"""Qwen2-VL / Qwen2.5-VL image geometry (smart resize, patch grid and placeholder count, without pixels) and their
vision configs."""

from __future__ import annotations

import json
import math
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from common.errors import InvalidRequestError
from processor.model_config import VisionConfig

CLIP_MEAN = (0.48145466, 0.4578275, 0.40821073)
CLIP_STD = (0.26862954, 0.26130258, 0.27577711)


def smart_resize(height: int, width: int, factor: int, min_pixels: int, max_pixels: int) -> tuple[int, int]:
    """Both sides multiples of `factor`, area within [min_pixels, max_pixels], aspect ratio kept as well as can be
    (the arithmetic of Qwen2-VL's image processor)."""
    if min(height, width) < 1:
        raise InvalidRequestError(f"image of size {width}x{height} is empty")
    if max(height, width) / min(height, width) > 200:
        raise InvalidRequestError(
            f"image aspect ratio must be at most 200:1, got {width}x{height}", param="image_url"
        )
    h_bar = round(height / factor) * factor
    w_bar = round(width / factor) * factor
    if h_bar * w_bar > max_pixels:
        beta = math.sqrt((height * width) / max_pixels)
        h_bar = max(factor, math.floor(height / beta / factor) * factor)
        w_bar = max(factor, math.floor(width / beta / factor) * factor)
    elif h_bar * w_bar < min_pixels:
        beta = math.sqrt(min_pixels / (height * width))
        h_bar = math.ceil(height * beta / factor) * factor
        w_bar = math.ceil(width * beta / factor) * factor
    return h_bar, w_bar


@dataclass(frozen=True)
class Qwen2VLMediaSpec:
    """Preprocessing settings from preprocessor_config.json and the geometry they imply."""

    min_pixels: int = 56 * 56
    max_pixels: int = 28 * 28 * 1280
    patch_size: int = 14
    temporal_patch_size: int = 2
    merge_size: int = 2
    image_mean: tuple[float, ...] = CLIP_MEAN
    image_std: tuple[float, ...] = CLIP_STD
    rescale_factor: float = 1 / 255
    resample: int = 3  # PIL bicubic

    image_placeholder = "<|image_pad|>"
    image_marker = "<|vision_start|><|image_pad|><|vision_end|>"  # an image in a prompt with no placeholder

    @classmethod
    def from_model_dir(cls, model_dir: str | Path) -> Qwen2VLMediaSpec:
        path = Path(model_dir) / "preprocessor_config.json"
        raw = json.loads(path.read_text()) if path.is_file() else {}
        size = raw.get("size") or {}
        kw = {
            "min_pixels": raw.get("min_pixels", size.get("shortest_edge", cls.min_pixels)),
            "max_pixels": raw.get("max_pixels", size.get("longest_edge", cls.max_pixels)),
            "patch_size": raw.get("patch_size", cls.patch_size),
            "temporal_patch_size": raw.get("temporal_patch_size", cls.temporal_patch_size),
            "merge_size": raw.get("merge_size", cls.merge_size),
            "image_mean": tuple(raw.get("image_mean", CLIP_MEAN)),
            "image_std": tuple(raw.get("image_std", CLIP_STD)),
            "rescale_factor": raw.get("rescale_factor", 1 / 255),
            "resample": raw.get("resample", 3),
        }
        return cls(**kw)

    def resized_size(self, width: int, height: int) -> tuple[int, int]:
        """(width, height) after smart resize."""
        h, w = smart_resize(
            height, width, self.patch_size * self.merge_size, self.min_pixels, self.max_pixels
        )
        return w, h

    def image_grid(self, width: int, height: int, num_images: int = 1) -> tuple[int, int, int]:
        """(t, h, w) in patches for a still image (the same however many images the prompt has)."""
        del num_images
        w, h = self.resized_size(width, height)
        return 1, h // self.patch_size, w // self.patch_size

    def num_image_tokens(self, grid: tuple[int, int, int]) -> int:
        t, h, w = grid
        return t * h * w // (self.merge_size**2)

    def num_patches(self, grid: tuple[int, int, int]) -> int:
        """Rows the tower runs for this image (its share of a batch)."""
        return grid[0] * grid[1] * grid[2]

    def item_settings(self, grid: tuple[int, int, int]) -> str:
        """What besides the bytes determines the image's embedding (the grid follows from bytes and settings)."""
        del grid
        return self.fingerprint()

    def fingerprint(self) -> str:
        """Everything that changes pixel values or geometry: part of each image's content key."""
        return json.dumps(
            [
                self.min_pixels,
                self.max_pixels,
                self.patch_size,
                self.temporal_patch_size,
                self.merge_size,
                list(self.image_mean),
                list(self.image_std),
                self.rescale_factor,
                self.resample,
            ],
            separators=(",", ":"),
        )


def parse_qwen2_5_vl_vision(v: dict[str, Any], text_hidden: int) -> VisionConfig:
    """Qwen2.5-VL's vision_config (the Hub's and transformers 5's use the same keys): `hidden_size` is the tower's
    width, `out_hidden_size` the merger's output; window attention except in `fullatt_block_indexes`."""
    return VisionConfig(
        depth=int(v.get("depth", v.get("num_hidden_layers", 32))),
        hidden_size=int(v.get("hidden_size", v.get("embed_dim", 1280))),
        intermediate_size=int(v.get("intermediate_size", 3420)),
        num_heads=int(v.get("num_heads", v.get("num_attention_heads", 16))),
        out_hidden_size=int(v.get("out_hidden_size", text_hidden)),
        patch_size=int(v.get("patch_size", 14)),
        spatial_merge_size=int(v.get("spatial_merge_size", 2)),
        temporal_patch_size=int(v.get("temporal_patch_size", 2)),
        in_channels=int(v.get("in_channels", v.get("in_chans", 3))),
        window_size=int(v.get("window_size", 112)),
        fullatt_block_indexes=tuple(int(i) for i in v.get("fullatt_block_indexes") or ()),
        hidden_act=v.get("hidden_act", "silu"),
        tokens_per_second=int(v.get("tokens_per_second", 2)),
    )


def parse_qwen2_vl_vision(v: dict[str, Any], text_hidden: int) -> VisionConfig:
    """Qwen2-VL's vision_config: `embed_dim` is the tower's width and `hidden_size` the merger's output (the
    language model's width); the MLP is embed_dim * mlp_ratio wide; every block attends to its whole frame."""
    depth = int(v.get("depth", v.get("num_hidden_layers", 32)))
    embed_dim = int(v.get("embed_dim", 1280))
    return VisionConfig(
        depth=depth,
        hidden_size=embed_dim,
        intermediate_size=int(embed_dim * float(v.get("mlp_ratio", 4))),
        num_heads=int(v.get("num_heads", v.get("num_attention_heads", 16))),
        out_hidden_size=int(v.get("hidden_size", text_hidden)),
        patch_size=int(v.get("patch_size", 14)),
        spatial_merge_size=int(v.get("spatial_merge_size", 2)),
        temporal_patch_size=int(v.get("temporal_patch_size", 2)),
        in_channels=int(v.get("in_channels", v.get("in_chans", 3))),
        window_size=0,
        fullatt_block_indexes=tuple(range(depth)),
        hidden_act=v.get("hidden_act", "quick_gelu"),
    )
