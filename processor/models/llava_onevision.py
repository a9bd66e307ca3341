"""LLaVA-OneVision image geometry, without pixels: anyres tiling (the best grid resolution, the aspect-kept resize
and its padding, the 384-pixel crops plus a base image), and the placeholder count after unpadding, the anyres_max
cap and one image-newline token per feature row, as transformers' LlavaOnevisionProcessor counts them. A prompt
with several images takes each as one padded square (no tiles): the count depends on the number of images, so an
image's grid is (num_crops, height, width), which says both.
"""

from __future__ import annotations

import json
import math
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from common.errors import InvalidRequestError
from processor.model_config import VisionConfig

SIGLIP_MEAN = (0.5, 0.5, 0.5)
SIGLIP_STD = (0.5, 0.5, 0.5)

# transformers' default (the published checkpoints ship the same list): 384 x {1..6} by 384 x {1..6}, (h, w)
DEFAULT_PINPOINTS: tuple[tuple[int, int], ...] = tuple(
    (384 * r, 384 * c) for r in range(1, 7) for c in range(1, 7)
)


def select_best_resolution(
    height: int, width: int, pinpoints: tuple[tuple[int, int], ...]
) -> tuple[int, int]:
    """The (h, w) of `pinpoints` that keeps the most of the image's pixels after an aspect-kept downscale, then
    wastes the least: transformers' select_best_resolution."""
    best, best_effective, best_wasted = None, 0, math.inf
    for h, w in pinpoints:
        scale = min(w / width, h / height)
        effective = min(int(width * scale) * int(height * scale), width * height)
        wasted = w * h - effective
        if effective > best_effective or (effective == best_effective and wasted < best_wasted):
            best, best_effective, best_wasted = (h, w), effective, wasted
    if best is None:
        raise ValueError("image_grid_pinpoints is empty")
    return best


def resized_within(height: int, width: int, target_h: int, target_w: int) -> tuple[int, int]:
    """(h, w) of the image scaled to fit (target_h, target_w) with its aspect ratio: get_patch_output_size."""
    scale_w, scale_h = target_w / width, target_h / height
    if scale_w < scale_h:
        return min(math.ceil(height * scale_w), target_h), target_w
    return target_h, min(math.ceil(width * scale_h), target_w)


@dataclass(frozen=True)
class AnyresLayout:
    """How one image becomes crops. Single-image prompts: the base image (squashed to crop x crop) then the
    rows x cols crops of the image resized into `best` and centred on black padding. Multi-image prompts: one crop,
    the image centred unresized on a square of the mean colour (`best`), which is then resized to the crop."""

    tiled: bool
    best: tuple[int, int]  # (h, w) of the grid resolution; (crop, crop) when not tiled
    resized: tuple[int, int]  # (h, w) of the image inside it
    padding: tuple[tuple[int, int], tuple[int, int]]  # ((top, bottom), (left, right)) in pixels
    rows: int
    cols: int

    @property
    def num_crops(self) -> int:
        """Crops the vision tower encodes: the base image and the grid, or the one square."""
        return 1 + self.rows * self.cols if self.tiled else 1


@dataclass(frozen=True)
class FeatureGrid:
    """The crop grid's features after unpadding: rows [top, bottom) and columns [left, right) of its
    (rows * side) x (cols * side) feature map, then pooled (bilinear) to `pooled` where the anyres_max cap applies;
    each remaining row ends with one image-newline feature."""

    rows: int  # crops down
    cols: int  # crops across
    top: int
    bottom: int
    left: int
    right: int
    pooled: tuple[int, int] | None

    @property
    def out_hw(self) -> tuple[int, int]:
        """(rows, columns) of features that reach the language model, newlines not counted."""
        return self.pooled or (self.bottom - self.top, self.right - self.left)


@dataclass(frozen=True)
class LlavaOnevisionMediaSpec:
    """Preprocessing settings (preprocessor_config.json, config.json) and the geometry they imply."""

    crop_size: int = 384  # the tower's input side (`size`)
    vision_patch_size: int = 14  # the SigLIP tower's patch: crop_size // patch features per side
    pinpoints: tuple[tuple[int, int], ...] = DEFAULT_PINPOINTS
    vision_aspect_ratio: str = "anyres_max_9"
    feature_select_strategy: str = "full"  # "default" drops the tower's first (CLS) feature
    image_mean: tuple[float, ...] = SIGLIP_MEAN
    image_std: tuple[float, ...] = SIGLIP_STD
    rescale_factor: float = 1 / 255
    resample: int = 3  # PIL bicubic

    image_placeholder = "<image>"
    image_marker = "<image>"  # an image in a prompt with no placeholder

    @classmethod
    def from_model_dir(cls, model_dir: str | Path) -> LlavaOnevisionMediaSpec:
        d = Path(model_dir)
        pre = (
            json.loads((d / "preprocessor_config.json").read_text())
            if (d / "preprocessor_config.json").is_file()
            else {}
        )
        cfg = json.loads((d / "config.json").read_text()) if (d / "config.json").is_file() else {}
        return cls.from_configs(cfg, pre)

    @classmethod
    def from_configs(cls, cfg: dict[str, Any], pre: dict[str, Any]) -> LlavaOnevisionMediaSpec:
        """From config.json and preprocessor_config.json (the tower packs with config.json's alone)."""
        vision = cfg.get("vision_config") or {}
        size = pre.get("size") or {}
        pinpoints = pre.get("image_grid_pinpoints") or cfg.get("image_grid_pinpoints") or DEFAULT_PINPOINTS
        crop = vision.get("image_size", cls.crop_size)
        return cls(
            crop_size=int(size.get("height", size.get("shortest_edge", crop))),
            vision_patch_size=int(vision.get("patch_size", cls.vision_patch_size)),
            pinpoints=tuple((int(h), int(w)) for h, w in pinpoints),
            vision_aspect_ratio=cfg.get("vision_aspect_ratio", cls.vision_aspect_ratio),
            feature_select_strategy=cfg.get("vision_feature_select_strategy", cls.feature_select_strategy),
            image_mean=tuple(pre.get("image_mean", SIGLIP_MEAN)),
            image_std=tuple(pre.get("image_std", SIGLIP_STD)),
            rescale_factor=float(pre.get("rescale_factor", 1 / 255)),
            resample=int(pre.get("resample", 3)),
        )

    @property
    def features_per_side(self) -> int:
        return self.crop_size // self.vision_patch_size

    @property
    def max_crops(self) -> int:
        """The anyres_max_N cap: feature rows x columns beyond N crops' worth are pooled down."""
        prefix = "anyres_max_"
        if not self.vision_aspect_ratio.startswith(prefix):
            raise ValueError(f"vision_aspect_ratio {self.vision_aspect_ratio!r} is not anyres_max_N")
        return int(self.vision_aspect_ratio[len(prefix) :])

    def layout(self, width: int, height: int, num_images: int = 1) -> AnyresLayout:
        """The crops of a width x height image in a prompt of `num_images` images."""
        if min(width, height) < 1:
            raise InvalidRequestError(f"image of size {width}x{height} is empty")
        if num_images != 1:
            side = max(width, height)
            top, left = (side - height) // 2, (side - width) // 2
            pad = ((top, side - height - top), (left, side - width - left))
            return AnyresLayout(False, (side, side), (height, width), pad, 1, 1)
        best = select_best_resolution(height, width, self.pinpoints)
        resized = resized_within(height, width, *best)
        top, r_y = divmod(best[0] - resized[0], 2)
        left, r_x = divmod(best[1] - resized[1], 2)
        rows, cols = best[0] // self.crop_size, best[1] // self.crop_size
        return AnyresLayout(True, best, resized, ((top, top + r_y), (left, left + r_x)), rows, cols)

    # ---- the media-spec interface (request builder, vision service) ----

    def image_grid(self, width: int, height: int, num_images: int = 1) -> tuple[int, int, int]:
        """(num_crops, height, width): the crops the tower encodes (1: a square of a multi-image prompt; the base
        image and its tiles otherwise) and the original size, which fix the packing and the count."""
        return self.layout(width, height, num_images).num_crops, height, width

    def num_image_tokens(self, grid: tuple[int, int, int]) -> int:
        num_crops, height, width = grid
        return self.count_image_tokens(width, height, 1 if num_crops > 1 else 2)

    def num_patches(self, grid: tuple[int, int, int]) -> int:
        """Rows the tower runs for this image (its share of a batch)."""
        return grid[0] * self.features_per_side**2

    def item_settings(self, grid: tuple[int, int, int]) -> str:
        """What besides the bytes determines the image's embedding: the settings and whether it is tiled."""
        return f"{self.fingerprint()}|crops={'tiled' if grid[0] > 1 else 'square'}"

    def resized_size(self, width: int, height: int) -> tuple[int, int]:
        """(width, height) of an image whose grid is its own size (warm-up images)."""
        return width, height

    def feature_grid_of(self, grid: tuple[int, int, int]) -> FeatureGrid | None:
        """The packing of an image with this grid: None for a square of a multi-image prompt."""
        num_crops, height, width = grid
        return self.feature_grid(width, height) if num_crops > 1 else None

    def count_image_tokens(self, width: int, height: int, num_images: int = 1) -> int:
        """Placeholder tokens of one image: LlavaOnevisionProcessor.replace_image_token's count."""
        side = self.features_per_side
        if num_images != 1:  # several images: each is its base features and one newline
            count = side * side + 1
        else:  # one image: its base features, then the unpadded grid with a newline per row
            h, w = self.feature_grid(width, height).out_hw
            count = side * side + h * w + h
        return count - (1 if self.feature_select_strategy == "default" else 0)

    def feature_grid(self, width: int, height: int) -> FeatureGrid:
        """Which features of a single image's crop grid are kept (unpadding: the rows or columns that only saw
        the padding around the resized image are cut) and the size the anyres_max cap pools them to."""
        lay = self.layout(width, height)
        side = self.features_per_side
        grid_h, grid_w = side * lay.rows, side * lay.cols
        top, bottom, left, right = 0, grid_h, 0, grid_w
        if width / height > grid_w / grid_h:
            pad = (grid_h - int(round(height * (grid_w / width), 7))) // 2
            top, bottom = pad, grid_h - pad
        else:
            pad = (grid_w - int(round(width * (grid_h / height), 7))) // 2
            left, right = pad, grid_w - pad
        cur_h, cur_w = bottom - top, right - left
        ratio = math.sqrt(cur_h * cur_w / (self.max_crops * side * side))
        pooled = (int(cur_h // ratio), int(cur_w // ratio)) if ratio > 1.1 else None
        return FeatureGrid(lay.rows, lay.cols, top, bottom, left, right, pooled)

    def fingerprint(self) -> str:
        """Everything that changes pixel values, crops or counts: part of each image's content key."""
        return json.dumps(
            [
                "llava_onevision",
                self.crop_size,
                self.vision_patch_size,
                [list(p) for p in self.pinpoints],
                self.vision_aspect_ratio,
                self.feature_select_strategy,
                list(self.image_mean),
                list(self.image_std),
                self.rescale_factor,
                self.resample,
            ],
            separators=(",", ":"),
        )


def parse_llava_onevision_vision(v: dict[str, Any], text_hidden: int) -> VisionConfig:
    """LLaVA-OneVision's vision_config (a SigLIP tower; the Hub's and transformers 5's use the same keys): the
    projector maps its `hidden_size` to the language model's width."""
    return VisionConfig(
        depth=int(v.get("num_hidden_layers", 27)),
        hidden_size=int(v.get("hidden_size", 1152)),
        intermediate_size=int(v.get("intermediate_size", 4304)),
        num_heads=int(v.get("num_attention_heads", 16)),
        out_hidden_size=text_hidden,
        patch_size=int(v.get("patch_size", 14)),
        spatial_merge_size=1,
        temporal_patch_size=1,
        in_channels=int(v.get("num_channels", 3)),
        window_size=0,
        fullatt_block_indexes=(),
        hidden_act=v.get("hidden_act", "gelu_pytorch_tanh"),
        image_size=int(v.get("image_size", 384)),
        layer_norm_eps=float(v.get("layer_norm_eps", 1e-6)),
    )
