"""Qwen2-VL image geometry (processor.models.qwen2_vl) against transformers' reference implementation:
`smart_resize` arithmetic and the grid the reference image processor actually produces."""

from __future__ import annotations

import warnings

import pytest
from hypothesis import assume, given, settings
from hypothesis import strategies as st
from PIL import Image
from transformers.models.qwen2_vl.image_processing_pil_qwen2_vl import Qwen2VLImageProcessorPil
from transformers.models.qwen2_vl.image_processing_pil_qwen2_vl import smart_resize as hf_smart_resize

from common.errors import InvalidRequestError
from mirador.default_model import default_model_dir
from processor.models.qwen2_vl import Qwen2VLMediaSpec, smart_resize

FACTOR = 28
MIN_PIXELS = 3136
MAX_PIXELS = 12845056
SMALL_MAX = 28 * 28 * 64  # keeps the reference processor cheap for images above it


@pytest.fixture(scope="session")
def model_dir():
    return default_model_dir()


@pytest.fixture(scope="session")
def spec(model_dir) -> Qwen2VLMediaSpec:
    return Qwen2VLMediaSpec.from_model_dir(model_dir)


@pytest.fixture(scope="session")
def small_spec(spec) -> Qwen2VLMediaSpec:
    return Qwen2VLMediaSpec(min_pixels=spec.min_pixels, max_pixels=SMALL_MAX)


@pytest.fixture(scope="session")
def hf_processor(model_dir):
    return Qwen2VLImageProcessorPil.from_pretrained(str(model_dir))


@pytest.fixture(scope="session")
def hf_small_processor(model_dir):
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        return Qwen2VLImageProcessorPil.from_pretrained(str(model_dir), max_pixels=SMALL_MAX)


def hf_grid(processor, width: int, height: int) -> tuple[tuple[int, int, int], int]:
    """(grid_thw, number of merged tokens) from the reference processor on a real image of that size."""
    img = Image.new("RGB", (width, height), (120, 60, 30))
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        out = processor(images=[img], return_tensors="np")
    grid = tuple(int(v) for v in out["image_grid_thw"][0])
    merged = out["pixel_values"].shape[0] // (processor.merge_size**2)
    return grid, merged


def test_spec_reads_preprocessor_config(spec):
    assert (spec.min_pixels, spec.max_pixels) == (MIN_PIXELS, MAX_PIXELS)
    assert (spec.patch_size, spec.merge_size, spec.temporal_patch_size) == (14, 2, 2)


MODEST_SIZES = [  # (width, height), within max_pixels: compared with the processor from the model dir
    (28, 28),
    (1, 1),
    (1, 5),
    (5, 1),
    (3, 1),
    (27, 29),
    (29, 27),
    (37, 41),
    (56, 56),
    (55, 57),
    (100, 50),
    (224, 224),
    (333, 777),
    (640, 480),
    (1000, 999),
    (2000, 30),
    (30, 2000),
    (200, 1),
    (1, 200),
    (14, 14),
    (42, 42),
    (70, 70),
    (512, 600),
]

SMALL_MAX_SIZES = [  # (width, height), mostly above SMALL_MAX: compared with a processor capped at SMALL_MAX
    (28, 28),
    (300, 300),
    (1000, 1000),
    (1920, 1080),
    (1080, 1920),
    (4000, 30),
    (30, 4000),
    (5000, 25),
    (251, 250),
    (224, 225),
    (449, 111),
    (2000, 2000),
]


@pytest.mark.parametrize("w,h", MODEST_SIZES)
def test_smart_resize_matches_reference(w, h):
    assert smart_resize(h, w, FACTOR, MIN_PIXELS, MAX_PIXELS) == hf_smart_resize(
        h, w, FACTOR, MIN_PIXELS, MAX_PIXELS
    )


@pytest.mark.parametrize("w,h", MODEST_SIZES)
def test_grid_matches_reference_processor(spec, hf_processor, w, h):
    grid = spec.image_grid(w, h)
    ref_grid, ref_tokens = hf_grid(hf_processor, w, h)
    assert grid == ref_grid
    assert spec.num_image_tokens(grid) == ref_tokens
    rh, rw = hf_smart_resize(h, w, FACTOR, MIN_PIXELS, MAX_PIXELS)
    assert spec.resized_size(w, h) == (rw, rh)


@pytest.mark.parametrize("w,h", SMALL_MAX_SIZES)
def test_grid_above_max_pixels_matches_reference_processor(small_spec, hf_small_processor, w, h):
    grid = small_spec.image_grid(w, h)
    ref_grid, ref_tokens = hf_grid(hf_small_processor, w, h)
    assert grid == ref_grid
    assert small_spec.num_image_tokens(grid) == ref_tokens
    assert ref_tokens * 4 * 14 * 14 <= SMALL_MAX or min(grid[1], grid[2]) == 2


@pytest.mark.parametrize("w,h", [(1, 1), (10, 10), (1, 100), (30, 40)])
def test_below_min_pixels_scaled_up(spec, w, h):
    rw, rh = spec.resized_size(w, h)
    assert rw * rh >= MIN_PIXELS
    assert rw % FACTOR == 0 and rh % FACTOR == 0


def test_known_values(spec):
    assert spec.image_grid(28, 28) == (1, 4, 4)  # 28x28 is below min_pixels: scaled up to 56x56
    assert spec.num_image_tokens((1, 4, 4)) == 4
    assert spec.image_grid(56, 56) == (1, 4, 4)
    assert spec.image_grid(448, 224) == (1, 16, 32)
    assert spec.num_image_tokens((1, 16, 32)) == 128
    assert spec.image_grid(512, 600) == (1, 42, 36)


@pytest.mark.parametrize("w,h", [(201, 1), (1, 201), (4021, 20), (20, 4001)])
def test_aspect_ratio_above_200_refused(spec, w, h):
    with pytest.raises(InvalidRequestError) as e:
        spec.image_grid(w, h)
    assert "200" in e.value.message
    with pytest.raises(ValueError):
        hf_smart_resize(h, w, FACTOR, MIN_PIXELS, MAX_PIXELS)


@pytest.mark.parametrize("w,h", [(200, 1), (1, 200), (4000, 20)])
def test_aspect_ratio_of_exactly_200_allowed(spec, w, h):
    assert spec.image_grid(w, h)[0] == 1


@pytest.mark.parametrize("w,h", [(0, 10), (10, 0), (0, 0)])
def test_empty_image_refused(spec, w, h):
    with pytest.raises(InvalidRequestError):
        spec.image_grid(w, h)


@settings(max_examples=600, deadline=None, derandomize=True)
@given(
    w=st.integers(1, 4000),
    h=st.integers(1, 4000),
    limits=st.sampled_from(
        [
            (MIN_PIXELS, MAX_PIXELS),
            (56 * 56, 28 * 28 * 1280),
            (MIN_PIXELS, SMALL_MAX),
            (256 * 28 * 28, 1280 * 28 * 28),
            (4 * 28 * 28, 16 * 28 * 28),
        ]
    ),
)
def test_smart_resize_random_sizes(w, h, limits):
    assume(max(w, h) / min(w, h) <= 200)
    lo, hi = limits
    ours = smart_resize(h, w, FACTOR, lo, hi)
    assert ours == hf_smart_resize(h, w, FACTOR, lo, hi)
    rh, rw = ours
    assert rh % FACTOR == 0 and rw % FACTOR == 0 and rh >= FACTOR and rw >= FACTOR
    spec = Qwen2VLMediaSpec(min_pixels=lo, max_pixels=hi)
    grid = spec.image_grid(w, h)
    assert grid == (1, rh // 14, rw // 14)
    assert spec.num_image_tokens(grid) == (rh // 28) * (rw // 28)
