"""LLaVA-OneVision's processor as pure code (issue 14; the served model is tests/test_llava_onevision.py): anyres layouts, placeholder counts and
pixel values against transformers' LlavaOnevisionImageProcessorPil and LlavaOnevisionProcessor's own counting
code (the processor object itself needs torchvision for its video half, so its methods run on a stand-in)."""

from __future__ import annotations

import types

import numpy as np
import pytest
from transformers.models.llava_onevision.image_processing_pil_llava_onevision import (
    LlavaOnevisionImageProcessorPil,
)
from transformers.models.llava_onevision.processing_llava_onevision import LlavaOnevisionProcessor

from models.llava_onevision_image import LlavaOnevisionImagePreprocessor
from processor.models.llava_onevision import LlavaOnevisionMediaSpec, select_best_resolution
from tests.helpers import noise_image

# (width, height): tiny, square crops, grid edges, extreme aspect ratios, and large images the anyres_max cap pools
SIZES = [
    (10, 10),
    (384, 384),
    (385, 384),
    (768, 384),
    (500, 300),
    (300, 500),
    (1000, 60),
    (60, 1000),
    (2000, 50),
    (1152, 1153),
    (1920, 1080),
    (4000, 3000),
    (2304, 2304),
]


@pytest.fixture(scope="module")
def hf_image_processor():
    # the published checkpoints' preprocessor_config.json (transformers' defaults are CLIP's mean and std)
    return LlavaOnevisionImageProcessorPil(image_mean=[0.5, 0.5, 0.5], image_std=[0.5, 0.5, 0.5])


def _hf_counter(strategy: str, num_image_tokens: int = 729):
    """LlavaOnevisionProcessor's replace_image_token and the methods it calls, bound to a stand-in."""
    stub = types.SimpleNamespace(
        image_processor=types.SimpleNamespace(
            image_grid_pinpoints=LlavaOnevisionImageProcessorPil.image_grid_pinpoints
        ),
        num_image_tokens=num_image_tokens,
        vision_aspect_ratio="anyres_max_9",
        vision_feature_select_strategy=strategy,
        image_token="<image>",
    )
    for name in ("_get_unpadded_features", "_get_number_of_features", "replace_image_token"):
        setattr(stub, name, types.MethodType(getattr(LlavaOnevisionProcessor, name), stub))
    return stub


def _inputs(width: int, height: int, num_images: int) -> dict:
    """What the image processor hands replace_image_token: original sizes, crops of 384 (the pixel test below
    checks these against the real processor's output)."""
    return {
        "image_sizes": [[height, width]] * num_images,
        "pixel_values": np.zeros((num_images, 1, 3, 384, 384), dtype=np.float32),
        "batch_num_images": [num_images],
    }


@pytest.mark.parametrize("strategy", ["full", "default"])
def test_placeholder_counts_equal_hf(strategy):
    spec = LlavaOnevisionMediaSpec(feature_select_strategy=strategy)
    hf = _hf_counter(strategy)
    for width, height in SIZES:
        for num_images in (1, 2):
            ref = hf.replace_image_token(_inputs(width, height, num_images), 0).count("<image>")
            assert spec.count_image_tokens(width, height, num_images) == ref, (width, height, num_images)
            # the builder's interface: the grid carries the prompt's image count
            grid = spec.image_grid(width, height, num_images)
            assert spec.num_image_tokens(grid) == ref, (width, height, num_images)


def test_counts_cover_the_cap_and_the_newlines():
    """Hand-checked cases: a 384x384 image is one crop (27x27 features, 27 newlines, plus the base 729); a large
    photo's 6x6 grid is pooled by the anyres_max_9 cap."""
    spec = LlavaOnevisionMediaSpec()
    assert spec.count_image_tokens(384, 384) == 729 + 27 * 27 + 27
    assert spec.layout(4000, 3000).rows * spec.layout(4000, 3000).cols > 9
    assert spec.count_image_tokens(4000, 3000) < 729 + 10 * (27 * 27 + 27)
    assert spec.count_image_tokens(384, 384, num_images=3) == 730


def test_layouts_and_pixels_equal_hf(hf_image_processor):
    spec = LlavaOnevisionMediaSpec()
    ours = LlavaOnevisionImagePreprocessor(spec)
    for width, height in [(10, 10), (500, 300), (60, 1000), (1920, 1080)]:
        img = noise_image(width, height, width * 3 + height)
        ref = hf_image_processor(images=[img], return_tensors="np")["pixel_values"][0]
        crops = ours.crops(img)
        assert crops.shape == ref.shape and spec.layout(width, height).num_crops == ref.shape[0]
        sizes = hf_image_processor(images=[img], return_tensors="np")["image_sizes"][0]
        assert tuple(sizes) == (height, width)  # what the counting code is given
        assert np.array_equal(crops, ref), (width, height)
        ref_multi = hf_image_processor(images=[[img, img]], return_tensors="np")["pixel_values"][0]
        multi = ours.crops(img, num_images=2)
        assert multi.shape == ref_multi.shape == (1, 3, 384, 384)
        assert np.array_equal(multi, ref_multi), (width, height)


def test_select_best_resolution_equals_hf():
    from transformers.image_processing_utils import select_best_resolution as hf_select

    pinpoints = LlavaOnevisionMediaSpec().pinpoints
    for width, height in SIZES:
        assert select_best_resolution(height, width, pinpoints) == tuple(
            hf_select((height, width), pinpoints)
        )


def test_settings_from_a_model_directory(tmp_path):
    import json

    (tmp_path / "config.json").write_text(
        json.dumps(
            {
                "architectures": ["LlavaOnevisionForConditionalGeneration"],
                "vision_aspect_ratio": "anyres_max_4",
                "vision_feature_select_strategy": "full",
                "image_grid_pinpoints": [[384, 384], [384, 768], [768, 384], [768, 768]],
                "vision_config": {"patch_size": 14, "image_size": 384},
            }
        )
    )
    (tmp_path / "preprocessor_config.json").write_text(json.dumps({"size": {"height": 384, "width": 384}}))
    spec = LlavaOnevisionMediaSpec.from_model_dir(tmp_path)
    assert spec.max_crops == 4 and spec.pinpoints[-1] == (768, 768)
    assert spec.layout(3000, 3000).rows == 2
    assert spec.fingerprint() != LlavaOnevisionMediaSpec().fingerprint()


def test_packed_features_equal_hf_and_the_count():
    """Our feature packing against LlavaOnevisionModel.pack_image_features (bound to a stand-in config): the same
    rows in the same order, and as many as the placeholder count."""
    import torch
    from transformers.models.llava_onevision.modeling_llava_onevision import LlavaOnevisionModel

    from models.llava_onevision import pack_image_features

    spec = LlavaOnevisionMediaSpec()
    stub = types.SimpleNamespace(
        config=types.SimpleNamespace(
            vision_config=types.SimpleNamespace(image_size=384, patch_size=14),
            image_grid_pinpoints=[list(p) for p in spec.pinpoints],
        )
    )
    hf_pack = types.MethodType(LlavaOnevisionModel.pack_image_features, stub)
    newline = torch.randn(8, generator=torch.Generator().manual_seed(0))
    for width, height in [(500, 300), (60, 1000), (384, 384), (1920, 1080), (4000, 3000)]:
        num_crops = spec.layout(width, height).num_crops
        feats = torch.randn(num_crops, 729, 8, generator=torch.Generator().manual_seed(width))
        (ref,), _ = hf_pack([feats], torch.tensor([[height, width]]), newline)
        ours = pack_image_features(feats, spec.feature_grid(width, height), newline)
        assert torch.equal(ours, ref), (width, height)
        assert ours.shape[0] == spec.count_image_tokens(width, height)
    (ref,), _ = hf_pack([feats[:1]], torch.tensor([[height, width]]), newline)
    ours = pack_image_features(feats[:1], None, newline)
    assert torch.equal(ours, ref) and ours.shape[0] == spec.count_image_tokens(width, height, num_images=2)
