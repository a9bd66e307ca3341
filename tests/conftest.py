"""Shared fixtures: the embedded default model, a second tiny config, and clusters started on loopback."""

from __future__ import annotations

import os
from pathlib import Path

import torch

# Without a GPU, Triton kernels run through Triton's interpreter on CPU tensors (set before triton is imported).
if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")

import pytest  # noqa: E402

from mirador.default_model import cache_root, config_with, default_model_dir, ensure_model  # noqa: E402

# A second shape: more layers, GQA 3:1, wider hidden, a 3-block vision tower, and a small max_pixels so that
# images above it (downscaled) stay cheap.
SECOND_CONFIG = config_with(
    hidden_size=96,
    intermediate_size=160,
    num_hidden_layers=3,
    num_attention_heads=6,
    num_key_value_heads=2,
    vision_depth=3,
    vision_hidden_size=48,
    vision_num_heads=3,
    vision_intermediate_size=96,
    vision_out_hidden_size=96,
    vision_fullatt_block_indexes=[2],
)
SECOND_MAX_PIXELS = 160 * 28 * 28


@pytest.fixture(scope="session")
def default_model() -> Path:
    return default_model_dir()


@pytest.fixture(scope="session")
def second_model() -> Path:
    return ensure_model(
        cache_root() / "models",
        "qwen2.5-vl-tiny-b",
        SECOND_CONFIG,
        preprocessor={"max_pixels": SECOND_MAX_PIXELS},
        seed=7,
    )


@pytest.fixture(scope="session")
def log_dir(tmp_path_factory) -> Path:
    return tmp_path_factory.mktemp("cluster-logs")
