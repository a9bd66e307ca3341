"""Reads a Hugging Face model directory's config.json into plain dataclasses (no torch)."""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from common.errors import InvalidRequestError


@dataclass(frozen=True)
class TextConfig:
    vocab_size: int
    hidden_size: int
    intermediate_size: int
    num_hidden_layers: int
    num_attention_heads: int
    num_key_value_heads: int
    head_dim: int
    rms_norm_eps: float
    rope_theta: float
    max_position_embeddings: int
    hidden_act: str = "silu"
    mrope_section: tuple[int, ...] = ()
    tie_word_embeddings: bool = False


@dataclass(frozen=True)
class VisionConfig:
    depth: int
    hidden_size: int
    intermediate_size: int
    num_heads: int
    out_hidden_size: int
    patch_size: int = 14
    spatial_merge_size: int = 2
    temporal_patch_size: int = 2
    in_channels: int = 3
    window_size: int = 112  # 0: no windowed attention (every block attends to its whole frame)
    fullatt_block_indexes: tuple[int, ...] = ()
    hidden_act: str = "silu"
    tokens_per_second: int = 2
    image_size: int = 0  # the tower's fixed input side (SigLIP); 0: any size (Qwen-VL towers)
    layer_norm_eps: float = 1e-6


@dataclass(frozen=True)
class ModelConfig:
    """What every service needs to know about the checkpoint, in one frozen object."""

    architecture: str
    model_type: str
    text: TextConfig
    vision: VisionConfig | None
    torch_dtype: str = "float32"
    image_token_id: int | None = None
    video_token_id: int | None = None
    vision_start_token_id: int | None = None
    vision_end_token_id: int | None = None
    eos_token_ids: tuple[int, ...] = ()
    raw: dict[str, Any] = field(default_factory=dict, compare=False, repr=False)

    @property
    def is_multimodal(self) -> bool:
        return self.vision is not None

    @property
    def context_length(self) -> int:
        return self.text.max_position_embeddings


def _as_tuple(value: Any) -> tuple[int, ...]:
    if value is None:
        return ()
    if isinstance(value, int):
        return (value,)
    return tuple(int(v) for v in value)


def parse_config(raw: dict[str, Any]) -> ModelConfig:
    """Accepts both the Hub layout (text fields at top level) and transformers 5's nested `text_config`."""
    archs = raw.get("architectures") or []
    if not archs:
        raise InvalidRequestError("config.json has no 'architectures' entry")
    from processor.models import text_config_defaults

    text_raw = {**text_config_defaults(raw.get("model_type", "")), **raw}
    if isinstance(raw.get("text_config"), dict):
        text_raw.update(raw["text_config"])
    rope = text_raw.get("rope_scaling") or text_raw.get("rope_parameters") or {}
    rope_theta = text_raw.get("rope_theta", rope.get("rope_theta", 10000.0))
    num_heads = int(text_raw["num_attention_heads"])
    hidden = int(text_raw["hidden_size"])
    text = TextConfig(
        vocab_size=int(text_raw["vocab_size"]),
        hidden_size=hidden,
        intermediate_size=int(text_raw["intermediate_size"]),
        num_hidden_layers=int(text_raw["num_hidden_layers"]),
        num_attention_heads=num_heads,
        num_key_value_heads=int(text_raw.get("num_key_value_heads") or num_heads),
        head_dim=int(text_raw.get("head_dim") or hidden // num_heads),
        rms_norm_eps=float(text_raw.get("rms_norm_eps", 1e-6)),
        rope_theta=float(rope_theta),
        max_position_embeddings=int(text_raw.get("max_position_embeddings", 32768)),
        hidden_act=text_raw.get("hidden_act", "silu"),
        mrope_section=_as_tuple(rope.get("mrope_section")),
        # tied when either level says so: LLaVA checkpoints keep the flag in text_config (transformers' rule);
        # text_raw also holds the family's class defaults (Gemma 3's text config ties unless it says otherwise)
        tie_word_embeddings=bool(raw.get("tie_word_embeddings")) or bool(text_raw.get("tie_word_embeddings")),
    )
    vision = None
    if isinstance(raw.get("vision_config"), dict):
        from processor.models import vision_config_parser

        v = dict(raw["vision_config"])
        if "mm_tokens_per_image" in raw:  # Gemma 3: the projector's pooling follows from it
            v.setdefault("mm_tokens_per_image", raw["mm_tokens_per_image"])
        vision = vision_config_parser(raw.get("model_type", ""))(v, hidden)
    dtype = raw.get("torch_dtype") or raw.get("dtype") or text_raw.get("torch_dtype") or "float32"
    return ModelConfig(
        architecture=archs[0],
        model_type=raw.get("model_type", ""),
        text=text,
        vision=vision,
        torch_dtype=str(dtype),
        image_token_id=raw.get("image_token_id", raw.get("image_token_index")),
        video_token_id=raw.get("video_token_id", raw.get("video_token_index")),
        vision_start_token_id=raw.get("vision_start_token_id"),
        vision_end_token_id=raw.get("vision_end_token_id"),
        eos_token_ids=_as_tuple(text_raw.get("eos_token_id")),
        raw=raw,
    )


def load_model_config(model_dir: str | Path) -> ModelConfig:
    path = Path(model_dir) / "config.json"
    if not path.is_file():
        raise FileNotFoundError(f"{path} not found: --model must point at a Hugging Face model directory")
    return parse_config(json.loads(path.read_text()))


def load_generation_eos(model_dir: str | Path) -> tuple[int, ...]:
    """End-of-sequence ids from generation_config.json, falling back to config.json's."""
    path = Path(model_dir) / "generation_config.json"
    if path.is_file():
        ids = _as_tuple(json.loads(path.read_text()).get("eos_token_id"))
        if ids:
            return ids
    return load_model_config(model_dir).eos_token_ids


def load_generation_defaults(model_dir: str | Path) -> dict[str, Any]:
    """Sampling defaults a checkpoint ships in generation_config.json (temperature, top_p, top_k, ...)."""
    path = Path(model_dir) / "generation_config.json"
    if not path.is_file():
        return {}
    raw = json.loads(path.read_text())
    keys = ("temperature", "top_p", "top_k", "min_p", "repetition_penalty", "max_new_tokens")
    return {k: raw[k] for k in keys if raw.get(k) is not None}
