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


@pytest.fixture(autouse=True, scope="session")
def _triton_interpreter_fixes():
    """Two Triton 3.6 interpreter bugs, patched for the test run (no effect on a GPU):
    - a loaded scalar used as a loop bound goes through int(1-element array), which numpy >= 2.4 refuses
      (triton-lang/triton#9171, fixed upstream by squeezing);
    - float32 -> bfloat16 conversions truncate where a GPU rounds to nearest even, so bfloat16 results could not be
      compared bit for bit on the CPU."""
    if os.environ.get("TRITON_INTERPRET") != "1":
        yield
        return
    try:
        import numpy as np
        import triton.language as tl
        from triton.runtime import interpreter
    except ImportError:
        yield
        return
    patch_tensor, convert = interpreter._patch_lang_tensor, interpreter._convert_float

    def patch(tensor, scope):
        patch_tensor(tensor, scope)
        scope.set_attr(tensor, "__index__", lambda self: int(self.handle.data.reshape(-1)[0]))

    def round_nearest_even(data, src, dst, rounding_mode):
        if src == tl.float32 and dst == tl.bfloat16:
            as_bf16 = torch.from_numpy(np.array(data, dtype=np.float32)).to(torch.bfloat16)
            return as_bf16.view(torch.int16).numpy().view(np.uint16)
        return convert(data, src, dst, rounding_mode)

    interpreter._patch_lang_tensor, interpreter._convert_float = patch, round_nearest_even
    yield
    interpreter._patch_lang_tensor, interpreter._convert_float = patch_tensor, convert


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
def qwen2_vl_model() -> Path:
    """The tiny Qwen2-VL (`mirador default-model --family qwen2-vl`)."""
    return default_model_dir(family="qwen2-vl")


@pytest.fixture(scope="session")
def llava_onevision_model() -> Path:
    """The tiny LLaVA-OneVision (`mirador default-model --family llava-onevision`)."""
    return default_model_dir(family="llava-onevision")


@pytest.fixture(scope="session")
def log_dir(tmp_path_factory) -> Path:
    return tmp_path_factory.mktemp("cluster-logs")
