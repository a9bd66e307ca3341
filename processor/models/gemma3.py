"""Gemma 3 image geometry (every image resized to the tower's square, `mm_tokens_per_image` soft tokens), prompt
markers, and its vision and text configs (both the Hub's keys and transformers 5's). Pan-and-scan is not done:
each image is one view, as Gemma3Processor's default (`do_pan_and_scan` off)."""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from processor.model_config import VisionConfig

# What transformers' config classes fill in when config.json leaves a key out (google/gemma-3-4b-it's text_config
# names only hidden_size, intermediate_size, num_hidden_layers, rope_scaling and sliding_window)
GEMMA3_TEXT_DEFAULTS: dict[str, Any] = {
    "vocab_size": 262208,
    "hidden_size": 2304,
    "intermediate_size": 9216,
    "num_hidden_layers": 26,
    "num_attention_heads": 8,
    "num_key_value_heads": 4,
    "head_dim": 256,
    "hidden_activation": "gelu_pytorch_tanh",
    "max_position_embeddings": 131072,
    "rms_norm_eps": 1e-6,
    "query_pre_attn_scalar": 256,
    "sliding_window": 4096,
    "sliding_window_pattern": 6,
    "rope_theta": 1_000_000.0,
    "rope_local_base_freq": 10_000.0,
    "eos_token_id": 1,
    "tie_word_embeddings": True,
}
SIGLIP_DEFAULTS: dict[str, Any] = {
    "hidden_size": 768,
    "intermediate_size": 3072,
    "num_hidden_layers": 12,
    "num_attention_heads": 12,
    "num_channels": 3,
    "image_size": 224,
    "patch_size": 16,
    "layer_norm_eps": 1e-6,
    "hidden_act": "gelu_pytorch_tanh",
}
SIGLIP_MEAN = (0.5, 0.5, 0.5)
SIGLIP_STD = (0.5, 0.5, 0.5)
BOI, EOI, IMAGE_TOKEN = "<start_of_image>", "<end_of_image>", "<image_soft_token>"


@dataclass(frozen=True)
class Gemma3MediaSpec:
    """Preprocessing settings (preprocessor_config.json, config.json) and the geometry they imply. The grid is
    (1, patches per side, patches per side); `merge_size` is the projector's average-pool kernel."""

    image_size: int = 896
    patch_size: int = 14
    merge_size: int = 4  # (image_size / patch_size) / sqrt(mm_tokens_per_image)
    image_mean: tuple[float, ...] = SIGLIP_MEAN
    image_std: tuple[float, ...] = SIGLIP_STD
    rescale_factor: float = 1 / 255
    resample: int = 2  # PIL bilinear

    # the chat template writes BOI where an image goes; Gemma3Processor replaces it by this text (with one soft
    # token here, which the request builder expands to the image's count like any placeholder)
    image_placeholder = IMAGE_TOKEN
    image_marker = f"\n\n{BOI}{IMAGE_TOKEN}{EOI}\n\n"  # an image in a prompt with no placeholder

    @classmethod
    def from_model_dir(cls, model_dir: str | Path) -> Gemma3MediaSpec:
        d = Path(model_dir)
        pre = (
            json.loads((d / "preprocessor_config.json").read_text())
            if (d / "preprocessor_config.json").is_file()
            else {}
        )
        cfg = json.loads((d / "config.json").read_text())
        vision = {**SIGLIP_DEFAULTS, **(cfg.get("vision_config") or {})}
        image_size = int(vision["image_size"])
        patch = int(vision["patch_size"])
        tokens_per_side = int(int(cfg.get("mm_tokens_per_image", 256)) ** 0.5)
        size = pre.get("size") or {}
        if size and (size.get("height"), size.get("width")) != (image_size, image_size):
            raise ValueError(f"preprocessor size {size} differs from the tower's image_size {image_size}")
        return cls(
            image_size=image_size,
            patch_size=patch,
            merge_size=(image_size // patch) // tokens_per_side,
            image_mean=tuple(pre.get("image_mean", SIGLIP_MEAN)),
            image_std=tuple(pre.get("image_std", SIGLIP_STD)),
            rescale_factor=float(pre.get("rescale_factor", 1 / 255)),
            resample=int(pre.get("resample", 2)),
        )

    def expand_image_markers(self, text: str) -> str:
        """What Gemma3Processor does to the rendered prompt: each BOI becomes the image's full sequence."""
        return text.replace(BOI, self.image_marker)

    def resized_size(self, width: int, height: int) -> tuple[int, int]:
        return self.image_size, self.image_size

    # ---- the media-spec interface (request builder, vision service) ----

    def image_grid(self, width: int, height: int, num_images: int = 1) -> tuple[int, int, int]:
        """(1, patches per side, patches per side): every image is resized to the tower's square."""
        del width, height, num_images
        n = self.image_size // self.patch_size
        return 1, n, n

    def num_image_tokens(self, grid: tuple[int, int, int]) -> int:
        t, h, w = grid
        return t * h * w // (self.merge_size**2)

    def num_patches(self, grid: tuple[int, int, int]) -> int:
        """Rows the tower runs for this image (its share of a batch)."""
        return grid[0] * grid[1] * grid[2]

    def item_settings(self, grid: tuple[int, int, int]) -> str:
        """What besides the bytes determines the image's embedding (the grid is fixed by the settings)."""
        del grid
        return self.fingerprint()

    def count_image_tokens(self, width: int, height: int, num_images: int = 1) -> int:
        """Soft tokens of one image (`mm_tokens_per_image`, whatever its size)."""
        return self.num_image_tokens(self.image_grid(width, height, num_images))

    def fingerprint(self) -> str:
        return json.dumps(
            [
                "gemma3",
                self.image_size,
                self.patch_size,
                self.merge_size,
                list(self.image_mean),
                list(self.image_std),
                self.rescale_factor,
                self.resample,
            ],
            separators=(",", ":"),
        )


def parse_gemma3_vision(v: dict[str, Any], text_hidden: int) -> VisionConfig:
    """SigLIP's vision_config (the same keys in the Hub's config and transformers 5's; `mm_tokens_per_image` from
    the top level): the projector pools the patch grid by `spatial_merge_size` per side and maps the tower's
    width to the language model's."""
    v = {**SIGLIP_DEFAULTS, **v}
    per_side = int(v["image_size"]) // int(v["patch_size"])
    pool = per_side // int(int(v.get("mm_tokens_per_image", 256)) ** 0.5)
    return VisionConfig(
        depth=int(v["num_hidden_layers"]),
        hidden_size=int(v["hidden_size"]),
        intermediate_size=int(v["intermediate_size"]),
        num_heads=int(v["num_attention_heads"]),
        out_hidden_size=text_hidden,
        patch_size=int(v["patch_size"]),
        spatial_merge_size=pool,
        temporal_patch_size=1,
        in_channels=int(v["num_channels"]),
        window_size=0,
        hidden_act=v["hidden_act"],
        image_size=int(v["image_size"]),
        layer_norm_eps=float(v["layer_norm_eps"]),
    )


@dataclass(frozen=True)
class Gemma3TextOptions:
    """What Gemma 3's language model adds to TextConfig: per-layer attention kinds, windows and rope."""

    layer_types: tuple[str, ...]  # "sliding_attention" or "full_attention", per layer
    sliding_window: int
    rope_theta: float  # global layers
    rope_local_base_freq: float  # sliding layers
    rope_linear_factor: float  # global layers' linear rope scaling (1: none)
    query_pre_attn_scalar: float
    attn_logit_softcapping: float | None
    final_logit_softcapping: float | None
    hidden_activation: str


def parse_gemma3_text(raw: dict[str, Any]) -> Gemma3TextOptions:
    """config.json (Hub layout: top-level rope_theta / rope_local_base_freq / rope_scaling and
    sliding_window_pattern in text_config; transformers 5: rope_parameters per layer type and layer_types)."""
    t = {**GEMMA3_TEXT_DEFAULTS, **(raw.get("text_config") or raw)}
    n = int(t["num_hidden_layers"])
    types = t.get("layer_types")
    if not types:
        pattern = int(t.get("_sliding_window_pattern", t["sliding_window_pattern"]))
        types = ["full_attention" if (i + 1) % pattern == 0 else "sliding_attention" for i in range(n)]
    params = t.get("rope_parameters") or {}
    full = params.get("full_attention") or t.get("rope_scaling") or {}
    local = params.get("sliding_attention") or {}
    factor = float(full.get("factor", 1.0)) if full.get("rope_type", full.get("type")) == "linear" else 1.0
    if full.get("rope_type", full.get("type", "default")) not in ("default", "linear"):
        raise ValueError(f"Gemma 3 rope type {full.get('rope_type')!r} is not supported (default, linear)")
    head_dim = int(t["head_dim"])
    return Gemma3TextOptions(
        layer_types=tuple(types),
        sliding_window=int(t["sliding_window"]),
        rope_theta=float(full.get("rope_theta", t["rope_theta"])),
        rope_local_base_freq=float(local.get("rope_theta", t["rope_local_base_freq"])),
        rope_linear_factor=factor,
        query_pre_attn_scalar=float(t.get("query_pre_attn_scalar", head_dim)),
        attn_logit_softcapping=t.get("attn_logit_softcapping"),
        final_logit_softcapping=t.get("final_logit_softcapping"),
        hidden_activation=t["hidden_activation"],
    )
