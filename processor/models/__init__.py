"""Torch-free per-family media arithmetic (placeholder counts, grids, settings) and vision-config parsing, keyed by
model_type."""

from __future__ import annotations

import importlib
from collections.abc import Callable
from typing import Any

_REGISTRY = {
    "qwen2_5_vl": "processor.models.qwen2_vl:Qwen2VLMediaSpec",
    "qwen2_vl": "processor.models.qwen2_vl:Qwen2VLMediaSpec",
    "llava_onevision": "processor.models.llava_onevision:LlavaOnevisionMediaSpec",
    "gemma3": "processor.models.gemma3:Gemma3MediaSpec",
    "mllama": "processor.models.mllama:MllamaMediaSpec",
}

# config.json's `vision_config` -> processor.model_config.VisionConfig; the keys differ between families (Qwen2-VL's
# `hidden_size` is the merger's output width, Qwen2.5-VL's the tower's own). Unknown types use Qwen2.5-VL's keys.
_VISION_CONFIG_PARSERS = {
    "qwen2_5_vl": "processor.models.qwen2_vl:parse_qwen2_5_vl_vision",
    "qwen2_vl": "processor.models.qwen2_vl:parse_qwen2_vl_vision",
    "llava_onevision": "processor.models.llava_onevision:parse_llava_onevision_vision",
    "gemma3": "processor.models.gemma3:parse_gemma3_vision",
    "mllama": "processor.models.mllama:parse_mllama_vision",
}
_DEFAULT_VISION_CONFIG_PARSER = "qwen2_5_vl"

# text-config keys a family's config.json may leave to transformers' class defaults (Gemma 3's do)
_TEXT_DEFAULTS = {"gemma3": "processor.models.gemma3:GEMMA3_TEXT_DEFAULTS"}


def _load(path: str) -> Any:
    module, _, name = path.partition(":")
    return getattr(importlib.import_module(module), name)


def media_spec_class(model_type: str):
    if model_type not in _REGISTRY:
        raise ValueError(f"no media processor for model_type {model_type!r}; supported: {sorted(_REGISTRY)}")
    return _load(_REGISTRY[model_type])


def vision_config_parser(model_type: str) -> Callable[[dict[str, Any], int], Any]:
    """(vision_config dict, the language model's hidden size) -> VisionConfig for this model_type."""
    return _load(
        _VISION_CONFIG_PARSERS.get(model_type, _VISION_CONFIG_PARSERS[_DEFAULT_VISION_CONFIG_PARSER])
    )


def text_config_defaults(model_type: str) -> dict[str, Any]:
    return dict(_load(_TEXT_DEFAULTS[model_type])) if model_type in _TEXT_DEFAULTS else {}
