"""Llama 3.2 Vision (mllama): config parsing for the vision tower and the cross-attention language model, and the
torch-free tile arithmetic (HF's MllamaImageProcessor: the best supported aspect ratio of up to max_num_tiles
tiles, canvas size, aspect-ratio ids)."""

from __future__ import annotations

import json
import math
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from processor.model_config import VisionConfig

# transformers' MllamaVisionConfig / MllamaTextConfig defaults (the published checkpoints' values)
MLLAMA_VISION_DEFAULTS: dict[str, Any] = {
    "hidden_size": 1280,
    "hidden_act": "gelu",
    "num_hidden_layers": 32,
    "num_global_layers": 8,
    "attention_heads": 16,
    "num_channels": 3,
    "intermediate_size": 5120,
    "vision_output_dim": 7680,
    "image_size": 448,
    "patch_size": 14,
    "norm_eps": 1e-5,
    "max_num_tiles": 4,
    "intermediate_layers_indices": [3, 7, 15, 23, 30],
}


@dataclass(frozen=True)
class MllamaVisionOptions:
    """What VisionConfig does not hold: the global (gated) layers, the tiles and the intermediate outputs."""

    num_global_layers: int
    max_num_tiles: int
    intermediate_layers_indices: tuple[int, ...]
    vision_output_dim: int
    supported_aspect_ratios: tuple[tuple[int, int], ...]


@dataclass(frozen=True)
class MllamaTextOptions:
    cross_attention_layers: tuple[int, ...]
    rope_theta: float
    rope_scaling: dict[
        str, Any
    ]  # llama3 scaling (factor, low/high_freq_factor, original_max_position_embeddings)


def supported_aspect_ratios(max_num_tiles: int) -> tuple[tuple[int, int], ...]:
    """(tiles wide, tiles high) with at most max_num_tiles tiles, in HF's order (get_all_supported_aspect_ratios)."""
    return tuple(
        (w, h)
        for w in range(1, max_num_tiles + 1)
        for h in range(1, max_num_tiles + 1)
        if w * h <= max_num_tiles
    )


def _vision_raw(v: dict[str, Any]) -> dict[str, Any]:
    return {**MLLAMA_VISION_DEFAULTS, **v}


def parse_mllama_vision(v: dict[str, Any], text_hidden: int) -> VisionConfig:
    v = _vision_raw(v)
    return VisionConfig(
        depth=int(v["num_hidden_layers"]),
        hidden_size=int(v["hidden_size"]),
        intermediate_size=int(v["intermediate_size"]),
        num_heads=int(v["attention_heads"]),
        out_hidden_size=text_hidden,
        patch_size=int(v["patch_size"]),
        spatial_merge_size=1,
        temporal_patch_size=1,
        in_channels=int(v["num_channels"]),
        window_size=0,
        hidden_act=v["hidden_act"],
        image_size=int(v["image_size"]),
        layer_norm_eps=float(v["norm_eps"]),
    )


def parse_mllama_vision_options(raw: dict[str, Any]) -> MllamaVisionOptions:
    v = _vision_raw(raw.get("vision_config") or {})
    tiles = int(v["max_num_tiles"])
    ratios = v.get("supported_aspect_ratios") or supported_aspect_ratios(tiles)
    return MllamaVisionOptions(
        num_global_layers=int(v["num_global_layers"]),
        max_num_tiles=tiles,
        intermediate_layers_indices=tuple(int(i) for i in v["intermediate_layers_indices"]),
        vision_output_dim=int(v["vision_output_dim"]),
        supported_aspect_ratios=tuple((int(a), int(b)) for a, b in ratios),
    )


def parse_mllama_text(raw: dict[str, Any]) -> MllamaTextOptions:
    """Hub layout (text_config.rope_theta + rope_scaling) and transformers 5's (text_config.rope_parameters)."""
    t = raw.get("text_config") or raw
    rope = dict(t.get("rope_parameters") or t.get("rope_scaling") or {})
    theta = float(rope.pop("rope_theta", t.get("rope_theta", 500000.0)))
    kind = rope.get("rope_type", rope.get("type", "default"))
    if kind not in ("default", "llama3"):
        raise ValueError(f"mllama rope type {kind!r} is not supported (default, llama3)")
    return MllamaTextOptions(
        cross_attention_layers=tuple(
            int(i) for i in t.get("cross_attention_layers", (3, 8, 13, 18, 23, 28, 33, 38))
        ),
        rope_theta=theta,
        rope_scaling=rope if kind == "llama3" else {},
    )


def optimal_tiled_canvas(height: int, width: int, max_num_tiles: int, tile_size: int) -> tuple[int, int]:
    """HF's get_optimal_tiled_canvas: (canvas height, canvas width) of the tiling that upscales least (or, when
    every tiling must downscale, downscales least), smallest area among equals. HF reads each supported pair as
    (tiles high, tiles wide) here, whatever its docstring says; we follow the code."""
    candidates = []
    for a, b in supported_aspect_ratios(max_num_tiles):
        ch, cw = a * tile_size, b * tile_size
        candidates.append((min(ch / height, cw / width), ch, cw))
    upscales = [c for c in candidates if c[0] >= 1]
    pool = upscales or candidates
    best_scale = min(c[0] for c in pool) if upscales else max(c[0] for c in pool)
    best = min((c for c in pool if c[0] == best_scale), key=lambda c: c[1] * c[2])
    return best[1], best[2]


def num_tiles(height: int, width: int, max_num_tiles: int, tile_size: int) -> tuple[int, int]:
    """(tiles high, tiles wide) of an image of this size."""
    ch, cw = optimal_tiled_canvas(height, width, max_num_tiles, tile_size)
    return ch // tile_size, cw // tile_size


def aspect_ratio_id(tiles_high: int, tiles_wide: int, max_num_tiles: int) -> int:
    """1-based index of (high, wide) in the supported aspect ratios (0 pads), HF's convert_aspect_ratios_to_ids."""
    return supported_aspect_ratios(max_num_tiles).index((tiles_high, tiles_wide)) + 1


def num_vision_tokens(image_size: int, patch_size: int) -> int:
    """Tokens per tile the language model cross-attends to: the patch grid plus the class token."""
    return (image_size // patch_size) ** 2 + 1


def image_token_ranges(input_ids: list[int], image_token_id: int) -> list[tuple[int, int]]:
    """Per <|image|> in the prompt, the [start, end) of the prompt tokens that see it (HF's
    get_cross_attention_token_mask): from the tag to the next tag, a run of adjacent tags sharing the end of the
    run's last; the last one to the end of the prompt. Tokens after the prompt see what its last token sees."""
    locations = [i for i, t in enumerate(input_ids) if t == image_token_id]
    if not locations:
        return []
    ranges = [[a, b] for a, b in zip(locations[:-1], locations[1:], strict=True)]
    ranges.append([locations[-1], len(input_ids)])
    last_end = ranges[-1][1]
    for r in ranges[::-1]:
        if r[0] == r[1] - 1:
            r[1] = last_end
        last_end = r[1]
    return [(a, b) for a, b in ranges]


def image_size_fit_to_canvas(
    height: int, width: int, canvas_height: int, canvas_width: int, tile_size: int
) -> tuple[int, int]:
    """HF's get_image_size_fit_to_canvas: the resized (height, width), aspect kept, each side clipped to
    [tile_size, canvas side]."""
    target_w = min(max(width, tile_size), canvas_width)
    target_h = min(max(height, tile_size), canvas_height)
    scale_h, scale_w = target_h / height, target_w / width
    if scale_w < scale_h:
        return min(math.floor(height * scale_w) or 1, target_h), target_w
    return target_h, min(math.floor(width * scale_h) or 1, target_w)


CLIP_MEAN = (
    0.48145466,
    0.4578275,
    0.40821073,
)  # meta-llama/Llama-3.2-11B-Vision-Instruct's preprocessor_config
CLIP_STD = (0.26862954, 0.26130258, 0.27577711)


@dataclass(frozen=True)
class MllamaMediaSpec:
    """Preprocessing settings (preprocessor_config.json, config.json) and the geometry they imply. An image is one
    <|image|> token in the prompt; the language model cross-attends to its encoder tokens (max_num_tiles tiles of
    (tile / patch)^2 + 1 tokens, padding tiles included, as HF's tower always runs them). The grid is
    (1, tiles high, tiles wide)."""

    tile_size: int = 560
    patch_size: int = 14
    max_num_tiles: int = 4
    image_mean: tuple[float, ...] = CLIP_MEAN
    image_std: tuple[float, ...] = CLIP_STD
    rescale_factor: float = 1 / 255
    resample: int = 2  # PIL bilinear

    image_placeholder = "<|image|>"

    @classmethod
    def from_model_dir(cls, model_dir: str | Path) -> MllamaMediaSpec:
        d = Path(model_dir)
        path = d / "preprocessor_config.json"
        pre = json.loads(path.read_text()) if path.is_file() else {}
        cfg = json.loads((d / "config.json").read_text())
        vision = _vision_raw(cfg.get("vision_config") or {})
        size = pre.get("size") or {}
        tile = int(size.get("height", vision["image_size"]))
        if tile != int(vision["image_size"]) or int(size.get("width", tile)) != tile:
            raise ValueError(
                f"preprocessor size {size} differs from the tower's image_size {vision['image_size']}"
            )
        return cls(
            tile_size=tile,
            patch_size=int(vision["patch_size"]),
            max_num_tiles=int(pre.get("max_image_tiles", vision["max_num_tiles"])),
            image_mean=tuple(pre.get("image_mean", CLIP_MEAN)),
            image_std=tuple(pre.get("image_std", CLIP_STD)),
            rescale_factor=float(pre.get("rescale_factor", 1 / 255)),
            resample=int(pre.get("resample", 2)),
        )

    @property
    def tokens_per_tile(self) -> int:
        return num_vision_tokens(self.tile_size, self.patch_size)

    # ---- the media-spec interface (request builder, vision service) ----

    def image_grid(self, width: int, height: int, num_images: int = 1) -> tuple[int, int, int]:
        del num_images
        th, tw = num_tiles(height, width, self.max_num_tiles, self.tile_size)
        return 1, th, tw

    def num_image_tokens(self, grid: tuple[int, int, int]) -> int:
        """Prompt tokens of an image: its one <|image|> (HF's processor count)."""
        del grid
        return 1

    def num_encoder_tokens(self, grid: tuple[int, int, int]) -> int:
        """Rows of the image's cross-attention K/V per cross layer (the encoder cache the scheduler accounts)."""
        del grid
        return self.max_num_tiles * self.tokens_per_tile

    def num_embedding_rows(self, grid: tuple[int, int, int]) -> int:
        """Rows of the vision service's output per image: the cross-attention states, not prompt tokens."""
        return self.num_encoder_tokens(grid)

    def resized_size(self, width: int, height: int) -> tuple[int, int]:
        """The tiler resizes inside the preprocessor: an image enters at its own size."""
        return width, height

    def num_patches(self, grid: tuple[int, int, int]) -> int:
        """Rows the tower runs for this image (its share of a batch): every tile slot, padding tiles included."""
        return self.num_encoder_tokens(grid)

    def item_settings(self, grid: tuple[int, int, int]) -> str:
        """What besides the bytes determines the image's cross-attention states (the tiling follows from them)."""
        del grid
        return self.fingerprint()

    def count_image_tokens(self, width: int, height: int, num_images: int = 1) -> int:
        return self.num_image_tokens(self.image_grid(width, height, num_images))

    def fingerprint(self) -> str:
        return json.dumps(
            [
                "mllama",
                self.tile_size,
                self.patch_size,
                self.max_num_tiles,
                list(self.image_mean),
                list(self.image_std),
                self.rescale_factor,
                self.resample,
            ],
            separators=(",", ":"),
        )
