"""Torch-free per-family media arithmetic (placeholder counts, grids, settings), keyed by model_type."""

from __future__ import annotations

import importlib

_REGISTRY = {
    "qwen2_5_vl": "processor.models.qwen2_vl:Qwen2VLMediaSpec",
    "qwen2_vl": "processor.models.qwen2_vl:Qwen2VLMediaSpec",
}


def media_spec_class(model_type: str):
    if model_type not in _REGISTRY:
        raise ValueError(f"no media processor for model_type {model_type!r}; supported: {sorted(_REGISTRY)}")
    module, _, name = _REGISTRY[model_type].partition(":")
    return getattr(importlib.import_module(module), name)
