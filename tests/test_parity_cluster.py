"""Greedy completions through the full cluster equal Hugging Face transformers token for token (issue 2)."""

from __future__ import annotations

import pytest
from PIL import Image

from tests.helpers import Cluster, HFReference, image_part, noise_image

MAX_TOKENS = 14


def case_messages(case: str, max_side_img: tuple[int, int] | None = None):
    """(cluster messages, HF messages, images) for a named case."""
    text = {"type": "text", "text": "Describe the picture in detail, please."}
    img = {"type": "image"}
    if case == "text":
        m = [{"role": "user", "content": "Write one sentence about the sea."}]
        return m, m, []
    sizes = {
        "img_28": (28, 28),
        "img_odd": (150, 100),
        "img_wide": (1000, 60),
        "img_tall": (56, 700),
        "img_big": max_side_img,
    }
    if case in sizes:
        w, h = sizes[case]
        im = noise_image(w, h, seed=w * 7 + h)
        return (
            [{"role": "user", "content": [image_part(im), text]}],
            [{"role": "user", "content": [img, text]}],
            [im],
        )
    if case == "two_images":
        a, b = noise_image(84, 56, 1), noise_image(60, 90, 2)
        ours = [
            {"role": "user", "content": [text, image_part(a), {"type": "text", "text": "and"}, image_part(b)]}
        ]
        ref = [{"role": "user", "content": [text, img, {"type": "text", "text": "and"}, img]}]
        return ours, ref, [a, b]
    if case == "earlier_turn":
        a = noise_image(70, 70, 3)
        ours = [
            {"role": "system", "content": "You are terse."},
            {"role": "user", "content": [image_part(a), {"type": "text", "text": "What is this?"}]},
            {"role": "assistant", "content": "A square of noise."},
            {"role": "user", "content": "What colour dominates it?"},
        ]
        ref = [
            ours[0],
            {"role": "user", "content": [img, {"type": "text", "text": "What is this?"}]},
            ours[2],
            ours[3],
        ]
        return ours, ref, [a]
    raise KeyError(case)


CASES = ["text", "img_28", "img_odd", "img_wide", "img_tall", "two_images", "earlier_turn"]


@pytest.fixture(scope="module")
def default_cluster(default_model, log_dir):
    c = Cluster(default_model, "--page-size", "4", log_dir=log_dir, name="parity-default")
    yield c
    c.stop()


@pytest.fixture(scope="module")
def second_cluster(second_model, log_dir):
    c = Cluster(
        second_model,
        "--page-size",
        "8",
        "--chunked-prefill-size",
        "64",
        log_dir=log_dir,
        name="parity-second",
    )
    yield c
    c.stop()


@pytest.fixture(scope="module")
def hf_default(default_model):
    return HFReference(default_model)


@pytest.fixture(scope="module")
def hf_second(second_model):
    return HFReference(second_model)


def _check(cluster: Cluster, hf: HFReference, case: str, page_size: int, big: tuple[int, int] | None = None):
    ours, ref, images = case_messages(case, big)
    prompt_ref, out_ref = hf.generate(ref, images, MAX_TOKENS)
    body = cluster.chat_ok(ours, max_tokens=MAX_TOKENS, temperature=0, return_token_ids=True)
    choice = body["choices"][0]
    assert body["prompt_token_ids"] == prompt_ref, f"{case}: prompt tokens differ"
    assert body["usage"]["prompt_tokens"] == len(prompt_ref)
    assert choice["token_ids"] == out_ref, f"{case}: generated tokens differ"
    assert choice["message"]["content"] == hf.tokenizer.decode(out_ref, skip_special_tokens=True)
    total = len(prompt_ref) + len(out_ref)
    assert len(out_ref) >= 2 * page_size or total // page_size >= 2, "case must span at least two KV pages"
    return body


@pytest.mark.parametrize("case", CASES)
def test_default_model_matches_hf(default_cluster, hf_default, case):
    _check(default_cluster, hf_default, case, page_size=4)


@pytest.mark.parametrize("case", [*CASES, "img_big"])
def test_second_model_matches_hf(second_cluster, hf_second, case):
    from tests.conftest import SECOND_MAX_PIXELS

    big = (640, 480)
    assert big[0] * big[1] > SECOND_MAX_PIXELS  # this one is downscaled
    body = _check(second_cluster, hf_second, case, page_size=8, big=big)
    if case == "img_big":
        n_image = body["prompt_token_ids"].count(151655)
        assert n_image * 28 * 28 <= SECOND_MAX_PIXELS


def test_images_change_the_answer(default_cluster):
    """Two different images with the same text give different logits (the image is not ignored)."""
    text = {"type": "text", "text": "Describe."}
    lps = []
    for seed in (11, 12):
        body = default_cluster.chat_ok(
            [{"role": "user", "content": [image_part(noise_image(56, 56, seed)), text]}],
            max_tokens=1,
            temperature=0,
            logprobs=True,
            top_logprobs=5,
        )
        lps.append(body["choices"][0]["logprobs"]["content"][0]["top_logprobs"])
    assert lps[0] != lps[1]


def test_real_photos_png_and_jpeg(default_cluster, hf_default):
    from tests.helpers import data_uri, sample_photo

    jpeg = sample_photo("grace_hopper.jpg").read_bytes()
    png = sample_photo("logo2.png").read_bytes()
    for data, mime in ((jpeg, "image/jpeg"), (png, "image/png")):
        from processor.media import decode_image

        img = decode_image(data).image
        ours = [
            {
                "role": "user",
                "content": [
                    {"type": "image_url", "image_url": {"url": data_uri(data, mime)}},
                    {"type": "text", "text": "What is in this photo?"},
                ],
            }
        ]
        ref = [
            {
                "role": "user",
                "content": [{"type": "image"}, {"type": "text", "text": "What is in this photo?"}],
            }
        ]
        prompt_ref, out_ref = hf_default.generate(ref, [img], 8)
        body = default_cluster.chat_ok(ours, max_tokens=8, temperature=0, return_token_ids=True)
        assert body["prompt_token_ids"] == prompt_ref
        assert body["choices"][0]["token_ids"] == out_ref
    assert Image.open(sample_photo("grace_hopper.jpg")).format == "JPEG"
