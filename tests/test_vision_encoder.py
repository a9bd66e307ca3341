"""The vision service's core on the CPU: images of one call share a forward, batched equals alone, and the fast
image processor's embeddings match the exact path's (transformers' PIL steps)."""

from __future__ import annotations

import asyncio

import pytest
import torch

from common.types import MultimodalItem
from processor.media import content_key, decode_image
from tests.helpers import noise_image, png_bytes, sample_photo
from vision_svc.encoder import EncoderConfig, VisionEncoder


@pytest.fixture(scope="module")
def encoders(default_model):
    fast = VisionEncoder(EncoderConfig(str(default_model), share_embeddings=False))
    exact = VisionEncoder(
        EncoderConfig(str(default_model), share_embeddings=False, fast_image_processor=False)
    )
    yield fast, exact
    fast.close()
    exact.close()


def _item(enc: VisionEncoder, data: bytes) -> MultimodalItem:
    img = decode_image(data).image
    grid = enc.spec.image_grid(*img.size)
    return MultimodalItem(
        content_key(data, enc.spec.fingerprint()), 0, enc.spec.num_image_tokens(grid), grid, "image", data
    )


def test_images_of_one_call_share_a_forward_and_equal_their_encodings_alone(encoders):
    fast, _ = encoders
    datas = [png_bytes(noise_image(56 + 28 * i, 84, seed=i)) for i in range(3)]
    items = [_item(fast, d) for d in datas]
    before = fast.stats.batches
    asyncio.run(fast.encode(items))
    assert fast.stats.batches - before == 1
    together = {m.content_key: fast.cache.get(m.content_key) for m in items}
    for m in items:
        alone = fast.forward([fast.prepare(m).payload], [m.grid_thw])
        torch.testing.assert_close(together[m.content_key], alone, rtol=1e-4, atol=1e-4)


def test_fast_image_processor_matches_the_exact_path(encoders):
    fast, exact = encoders
    data = sample_photo("grace_hopper.jpg").read_bytes()
    item = _item(fast, data)
    a = fast.forward([fast.prepare(item).payload], [item.grid_thw])
    b = exact.forward([exact.prepare(item).payload], [item.grid_thw])
    assert exact.fast is None and fast.fast is not None
    torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-4)


def test_a_request_grid_that_disagrees_with_the_image_is_refused(encoders):
    from common.errors import InvalidRequestError

    fast, _ = encoders
    data = png_bytes(noise_image(56, 56, seed=9))
    good = _item(fast, data)
    bad = MultimodalItem(good.content_key, 0, good.num_tokens, (1, 2, 2), "image", data)
    with pytest.raises(InvalidRequestError, match="disagree"):
        asyncio.run(fast.encode([bad]))


def test_a_key_that_is_not_the_bytes_is_refused_and_nothing_is_cached_under_it(encoders):
    """Keys name the embedding later requests are answered with: image A's bytes under B's key must not poison B."""
    from common.errors import InvalidRequestError

    fast, _ = encoders
    a, b = png_bytes(noise_image(56, 56, seed=10)), png_bytes(noise_image(56, 56, seed=11))
    item_b = _item(fast, b)
    forged = MultimodalItem(item_b.content_key, 0, item_b.num_tokens, item_b.grid_thw, "image", a)
    with pytest.raises(InvalidRequestError, match="content key"):
        asyncio.run(fast.encode([forged]))
    assert not fast.cache.touch(item_b.content_key)
    assert asyncio.run(fast.encode([item_b]))[0].cache_hit is False  # encoded from its own bytes


def test_a_prepare_hint_decodes_ahead_and_the_encode_uses_it(encoders):
    """Prepare starts the host half; the encode that follows takes its pixels (counted) and encodes exactly what
    an encode without the hint does. A hint whose grid disagrees is not used (the encode prepares anew)."""
    fast, _ = encoders
    data = png_bytes(noise_image(84, 56, seed=11))
    item = _item(fast, data)

    async def hinted():
        assert fast.prepare_ahead([item]) == 1
        assert fast.prepare_ahead([item]) == 0  # already on its way
        return await fast.encode([item])

    before = fast.stats.prepared_ahead
    asyncio.run(hinted())
    assert fast.stats.prepared_ahead - before == 1 and not fast._ahead  # noqa: SLF001
    alone = fast.forward([fast.prepare(item).payload], [item.grid_thw])
    torch.testing.assert_close(fast.cache.get(item.content_key), alone, rtol=1e-4, atol=1e-4)

    other = _item(fast, png_bytes(noise_image(84, 56, seed=12)))
    wrong = MultimodalItem(other.content_key, 0, other.num_tokens + 1, other.grid_thw, "image", other.data)

    async def mismatched():
        fast.prepare_ahead(
            [wrong]
        )  # its own prepare fails (grid / tokens disagree): nothing is kept for others
        return await fast.encode([other])

    before = fast.stats.prepared_ahead
    assert not asyncio.run(mismatched())[0].cache_hit
    assert fast.stats.prepared_ahead == before and other.content_key in fast.cache
