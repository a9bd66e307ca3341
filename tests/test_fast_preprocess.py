"""The fast image preprocessor (host half `load`, device half `to_patches`, run here on the CPU) against transformers'
Qwen2VLImageProcessorPil and our exact path: pixel values, grids and token counts, layouts, JPEG draft mode."""

from __future__ import annotations

import dataclasses
import io
import warnings

import numpy as np
import pytest
import torch
from PIL import Image, ImageOps
from transformers.models.qwen2_vl.image_processing_pil_qwen2_vl import Qwen2VLImageProcessorPil

from common.errors import InvalidRequestError, PayloadTooLargeError
from models.qwen2_vl_image import FastQwen2VLImagePreprocessor, HostImage
from processor.media import MediaPolicy, decode_image
from processor.models.qwen2_vl import Qwen2VLMediaSpec
from tests.helpers import sample_photo

# The bound per element asked for; one uint8 level off is 1/255/std ~ 0.015 after normalizing, so it holds only
# when the resized uint8 pixels are HF's exactly.
ONE_LEVEL = 1 / 255
FLOAT_ROUNDING = 1e-6  # what rescaling in float32 (HF rescales in float64) leaves: measured 4.8e-7
# A small max_pixels: large JPEGs shrink by 4x or more per side, so draft mode engages.
SMALL_MAX = 28 * 28 * 64
# Draft mode (libjpeg's DCT-domain downscale by 2, 4 or 8 before the bicubic resize), measured on these photo-like
# JPEGs at 21 random sizes from 1000 to 4100 pixels a side, all EXIF orientations, max_pixels 28*28*64 and
# 28*28*256: mean |error| 0.0025-0.0067 and max 0.030-0.165 after normalizing (about 0.2-0.45 and 2-11 uint8
# levels). The largest errors sit on the last row or column when a side is not a multiple of the draft scale
# (the partial DCT block); inside, at most 5 levels. Bounds with some room:
DRAFT_MEAN_BOUND, DRAFT_MAX_BOUND = 0.01, 0.25
needs_cuda = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")


def photo(width: int, height: int, seed: int = 0) -> Image.Image:
    """Photo-like: grace_hopper.jpg scaled to cover the frame and cropped, with mild grain."""
    base = Image.open(sample_photo("grace_hopper.jpg")).convert("RGB")
    scale = max(width / base.width, height / base.height)
    cover = (max(width, round(base.width * scale)), max(height, round(base.height * scale)))
    img = base.resize(cover, Image.Resampling.BICUBIC).crop((0, 0, width, height))
    grain = np.random.default_rng(seed).normal(0.0, 4.0, (height, width, 3))
    return Image.fromarray(np.clip(np.asarray(img, np.float32) + grain, 0, 255).astype(np.uint8))


def encode(img: Image.Image, fmt: str = "JPEG", **kw) -> bytes:
    buf = io.BytesIO()
    img.save(buf, fmt, **({"quality": 90} if fmt == "JPEG" else {}) | kw)
    return buf.getvalue()


def with_orientation(img: Image.Image, orientation: int) -> bytes:
    exif = img.getexif()
    exif[0x0112] = orientation
    return encode(img, exif=exif)


@pytest.fixture(scope="module")
def spec(default_model) -> Qwen2VLMediaSpec:
    return Qwen2VLMediaSpec.from_model_dir(default_model)


@pytest.fixture(scope="module")
def fast(spec) -> FastQwen2VLImagePreprocessor:
    return FastQwen2VLImagePreprocessor(spec)


@pytest.fixture(scope="module")
def hf(default_model) -> Qwen2VLImageProcessorPil:
    return Qwen2VLImageProcessorPil.from_pretrained(str(default_model))


@pytest.fixture(scope="module")
def small_fast(spec) -> FastQwen2VLImagePreprocessor:
    return FastQwen2VLImagePreprocessor(dataclasses.replace(spec, max_pixels=SMALL_MAX))


@pytest.fixture(scope="module")
def small_hf(default_model) -> Qwen2VLImageProcessorPil:
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        return Qwen2VLImageProcessorPil.from_pretrained(str(default_model), max_pixels=SMALL_MAX)


def hf_features(processor: Qwen2VLImageProcessorPil, img: Image.Image) -> tuple[np.ndarray, tuple[int, ...]]:
    out = processor(images=[img], return_tensors="np")
    return out["pixel_values"], tuple(int(v) for v in out["image_grid_thw"][0])


def compare(
    fast: FastQwen2VLImagePreprocessor, hf, data: bytes, hf_input: Image.Image
) -> tuple[HostImage, np.ndarray]:
    """|fast - HF| per element, after checking grid, token count and shape agree."""
    host = fast.load(data)
    ref, ref_grid = hf_features(hf, hf_input)
    ours = fast.to_patches_temporal([host.pixels], "cpu").numpy()
    assert host.grid == ref_grid
    assert host.num_tokens == ref.shape[0] // hf.merge_size**2
    assert ours.shape == ref.shape and ours.dtype == np.float32
    return host, np.abs(ours - ref)


CASES = {  # name -> (encoded bytes, what HF is given: the image as the model should see it)
    "jpeg 448x448 (no resize)": lambda: (encode(photo(448, 448, 1)), None),
    "jpeg 333x777 (resized)": lambda: (encode(photo(333, 777, 2)), None),
    "jpeg 1000x750 (resized)": lambda: (encode(photo(1000, 750, 3)), None),
    "jpeg 20x30 (scaled up to min_pixels)": lambda: (encode(photo(20, 30, 4)), None),
    "png rgba logo2.png": lambda: (sample_photo("logo2.png").read_bytes(), None),
    "webp": lambda: (encode(photo(300, 200, 5), "WEBP", quality=90), None),
    "gif (palette)": lambda: (encode(photo(120, 90, 6).convert("P"), "GIF"), None),
    "jpeg grayscale": lambda: (encode(photo(250, 180, 7).convert("L")), None),
    "jpeg cmyk": lambda: (encode(photo(250, 180, 8).convert("CMYK")), None),
}


@pytest.mark.parametrize("case", list(CASES))
def test_pixel_values_match_hf(fast, hf, case):
    data, _ = CASES[case]()
    host, err = compare(fast, hf, data, Image.open(io.BytesIO(data)))
    assert host.draft_scale == 1
    assert err.max() <= ONE_LEVEL
    assert err.max() <= FLOAT_ROUNDING  # the uint8 pixels are HF's exactly; only float32 rounding differs


@pytest.mark.parametrize("orientation", range(1, 9))
def test_exif_orientation_matches_hf_on_the_upright_image(fast, hf, orientation):
    data = with_orientation(photo(224, 112, orientation), orientation)  # stored 224 wide, 112 high
    upright = ImageOps.exif_transpose(Image.open(io.BytesIO(data)))  # HF's processor itself ignores EXIF
    host, err = compare(fast, hf, data, upright)
    assert err.max() <= ONE_LEVEL
    assert err.max() <= FLOAT_ROUNDING
    assert host.pixels.shape[:2] == ((112, 224) if orientation < 5 else (224, 112))  # 5-8 swap the axes


@pytest.mark.parametrize("size", [(448, 448), (333, 777)])
def test_host_pixels_equal_the_exact_paths_resized_image(fast, spec, size):
    data = encode(photo(*size))
    host = fast.load(data)
    image = decode_image(data).image
    expected = np.asarray(image.resize(spec.resized_size(*image.size), Image.Resampling(spec.resample)))
    assert host.pixels.dtype == np.uint8 and host.pixels.flags.c_contiguous
    assert host.pixels.shape == expected.shape
    assert (host.pixels == expected).all()
    assert host.grid == spec.image_grid(*image.size)


def test_still_layout_is_the_first_temporal_slice(fast, spec):
    pixels = fast.load(encode(photo(333, 777))).pixels
    still = fast.to_patches([pixels], "cpu")
    full = fast.to_patches_temporal([pixels], "cpu")
    c, t, pp = 3, spec.temporal_patch_size, spec.patch_size**2
    assert still.shape == (full.shape[0], c * pp)
    per_t = full.view(-1, c, t, pp)
    for k in range(t):
        assert torch.equal(per_t[:, :, k], still.view(-1, c, pp))


def test_batch_is_the_images_in_order(fast):
    a = fast.load(encode(photo(448, 448, 1))).pixels
    b = fast.load(encode(photo(333, 777, 2))).pixels
    both = fast.to_patches([a, b], "cpu")
    assert torch.equal(both, torch.cat([fast.to_patches([a], "cpu"), fast.to_patches([b], "cpu")]))
    as_tensors = fast.to_patches([torch.from_numpy(a.copy()), torch.from_numpy(b.copy())], "cpu")
    assert torch.equal(as_tensors, both)  # tensors take the torch path, arrays the numpy one: same rows
    assert torch.equal(fast.to_patches([a, b], "cpu", torch.bfloat16), both.to(torch.bfloat16))
    assert fast.to_patches([], "cpu").shape == (0, both.shape[1])


@pytest.mark.parametrize(
    "shape,dtype",
    [
        ((448, 448), np.uint8),
        ((448, 447, 3), np.uint8),
        ((448, 448, 3), np.float32),
        ((450, 448, 3), np.uint8),
    ],
)
def test_to_patches_refuses_pixels_load_would_not_produce(fast, shape, dtype):
    with pytest.raises(ValueError):
        fast.to_patches([np.zeros(shape, dtype)], "cpu")


@pytest.mark.parametrize(
    "size,seed", [((1600, 1200), 1), ((2400, 1800), 2), ((1200, 1600), 4), ((2403, 1801), 5)]
)
def test_draft_mode_error_bound(small_fast, small_hf, size, seed):
    """Target far below the source: the JPEG is decoded at 1/2 or 1/4 scale (>= 2x the target per side) before
    the bicubic resize. Grid and tokens stay exact; pixel values move by the measured bound, not by 1/255."""
    data = encode(photo(*size, seed))
    host, err = compare(small_fast, small_hf, data, Image.open(io.BytesIO(data)))
    assert host.draft_scale in (2, 4)
    assert err.mean() <= DRAFT_MEAN_BOUND
    assert err.max() <= DRAFT_MAX_BOUND


def test_draft_mode_with_exif_rotation(small_fast, small_hf):
    data = with_orientation(photo(2400, 1600, 7), 6)  # stored landscape, displayed portrait
    upright = ImageOps.exif_transpose(Image.open(io.BytesIO(data)))
    host, err = compare(small_fast, small_hf, data, upright)
    assert host.draft_scale > 1 and host.pixels.shape[0] > host.pixels.shape[1]
    assert err.mean() <= DRAFT_MEAN_BOUND
    assert err.max() <= DRAFT_MAX_BOUND


def test_draft_mode_off_is_exact(spec, small_hf):
    exact = FastQwen2VLImagePreprocessor(dataclasses.replace(spec, max_pixels=SMALL_MAX), allow_draft=False)
    data = encode(photo(1600, 1200, 1))
    host, err = compare(exact, small_hf, data, Image.open(io.BytesIO(data)))
    assert host.draft_scale == 1
    assert err.max() <= FLOAT_ROUNDING


def test_no_draft_when_the_target_is_not_far_smaller(fast, small_fast):
    assert fast.load(encode(photo(1600, 1200))).draft_scale == 1  # 7B settings: no resize to speak of
    assert small_fast.load(encode(photo(800, 600))).draft_scale == 1  # 252x196 target: 1/2 would leave < 2x
    assert small_fast.load(encode(photo(1600, 1200), "PNG")).draft_scale == 1  # only JPEGs have a draft mode


@pytest.mark.parametrize(
    "data,error",
    [
        (b"hello world", InvalidRequestError),
        (encode(Image.new("RGB", (4, 4)), "TIFF"), InvalidRequestError),
        (encode(photo(64, 64))[:300], InvalidRequestError),
    ],
)
def test_bad_bytes_raise_what_decode_image_raises(fast, data, error):
    with pytest.raises(error):
        decode_image(data)
    with pytest.raises(error):
        fast.load(data)


def test_pixel_limit_of_the_policy(fast):
    data = encode(photo(40, 40))
    with pytest.raises(PayloadTooLargeError):
        fast.load(data, MediaPolicy(max_pixels=1599))
    assert fast.load(data, MediaPolicy(max_pixels=1600)).grid == (1, 4, 4)


# ---- the resize left to the device (kernels/image_resize.py, Pillow's bicubic bit for bit) ------------------------


def _shapes(n: int, seed: int) -> list[tuple[tuple[int, int], tuple[int, int]]]:
    rng = np.random.default_rng(seed)
    out = []
    for i in range(n):
        w, h = (int(v) for v in rng.integers(8, 160, 2))
        if i % 3 == 0:  # near the source: small grow / shrink per axis, where the pass order flips
            ow, oh = w + int(rng.integers(-4, 5)), h + int(rng.integers(-4, 5))
        else:
            ow, oh = (int(v) for v in rng.integers(8, 220, 2))
        out.append(((w, h), (max(ow, 1), max(oh, 1))))
    return out


SHAPES = [((300, 200), (301, 199)), ((300, 200), (299, 201)), ((640, 480), (224, 168)), ((57, 33), (112, 56))]


@pytest.mark.parametrize(("size", "out"), SHAPES + _shapes(40, 7))
def test_device_resize_is_pillows_bicubic_bit_for_bit(size, out):
    from kernels.image_resize import resize_bicubic

    pixels = np.random.default_rng(size[0] * 1000 + out[1]).integers(0, 256, (size[1], size[0], 3), np.uint8)
    expected = np.asarray(Image.fromarray(pixels).resize(out, Image.Resampling.BICUBIC))
    ours = resize_bicubic(torch.from_numpy(pixels), out).numpy()
    assert ours.shape == expected.shape and (ours == expected).all()


def test_device_resize_with_a_box_and_the_start_up_check():
    from kernels.image_resize import matches_pillow, resize_bicubic

    pixels = np.random.default_rng(3).integers(0, 256, (600, 800, 3), np.uint8)
    box = (3.5, 2.25, 790.0, 590.5)
    expected = np.asarray(Image.fromarray(pixels).resize((392, 280), Image.Resampling.BICUBIC, box=box))
    assert (resize_bicubic(torch.from_numpy(pixels), (392, 280), box).numpy() == expected).all()
    assert matches_pillow()


@pytest.fixture(scope="module")
def deferred(spec) -> FastQwen2VLImagePreprocessor:
    return FastQwen2VLImagePreprocessor(spec, defer_resize=True)


@pytest.mark.parametrize("case", list(CASES))
def test_resize_on_the_device_gives_the_host_resizes_patches(fast, deferred, case):
    data, _ = CASES[case]()
    host, left = fast.load(data), deferred.load(data)
    assert left.grid == host.grid and left.num_tokens == host.num_tokens
    assert (left.resize_to is None) == (host.pixels.shape[:2] == left.pixels.shape[:2])
    expected = fast.to_patches_temporal([host.pixels], "cpu")
    assert torch.equal(deferred.to_patches_temporal([left], "cpu"), expected)


@pytest.mark.parametrize("orientation", [1, 6, 8])
def test_resize_on_the_device_after_an_exif_turn(fast, deferred, orientation):
    data = with_orientation(photo(333, 150, orientation), orientation)
    left = deferred.load(data)
    assert left.resize_to is not None
    assert torch.equal(deferred.to_patches([left], "cpu"), fast.to_patches([fast.load(data).pixels], "cpu"))


@pytest.mark.gpu
@needs_cuda
def test_device_resize_on_cuda_is_pillows_and_feeds_the_same_patches(fast, deferred):
    from kernels.image_resize import resize_bicubic

    for size, out in [((1920, 1080), (1932, 1092)), ((300, 200), (301, 199)), ((640, 480), (224, 168))]:
        pixels = np.random.default_rng(size[0]).integers(0, 256, (size[1], size[0], 3), np.uint8)
        expected = np.asarray(Image.fromarray(pixels).resize(out, Image.Resampling.BICUBIC))
        assert (resize_bicubic(torch.from_numpy(pixels).cuda(), out).cpu().numpy() == expected).all()
    data = encode(photo(1000, 750, 3))
    on_gpu = deferred.to_patches([deferred.load(data)], "cuda").cpu()
    assert torch.equal(on_gpu, fast.to_patches([fast.load(data).pixels], "cpu"))
