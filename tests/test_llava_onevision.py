"""LLaVA-OneVision (issue 14): the tower against HF's, config and weights in both layouts, the language model's
1-D positions, and the whole cluster against Hugging Face transformers token for token (anyres grids at their
edges, the anyres_max cap, two images as squares, an image in an earlier turn)."""

from __future__ import annotations

import json
import shutil

import pytest
import torch
from safetensors import safe_open

from models.loader import load_model
from models.registry import language_model_class, vision_model_class
from processor.model_config import load_model_config
from processor.models.llava_onevision import LlavaOnevisionMediaSpec
from tests.helpers import (
    Cluster,
    LlavaOnevisionHFReference,
    check_batched_equals_alone,
    check_greedy_chat,
    image_part,
    mixed_image_requests,
    noise_image,
)
from tests.test_parity_cluster import MAX_TOKENS, case_messages

ARCH = "LlavaOnevisionForConditionalGeneration"
IMAGE = 151646

# (width, height) with 56-pixel crops: below one crop, exactly one, one pixel past it (a 1x2 grid), odd, extreme
# aspect ratios (the 6-crop edge of the pinpoints, unpadded), and one big enough for the anyres_max_9 pooling
SIZES = {
    "img_28": (28, 28),
    "img_56": (56, 56),
    "img_57": (57, 56),
    "img_odd": (150, 100),
    "img_wide": (1000, 60),
    "img_tall": (56, 700),
    "img_pooled": (400, 300),
}


@pytest.fixture(scope="module")
def hf(llava_onevision_model):
    return LlavaOnevisionHFReference(llava_onevision_model)


@pytest.fixture(scope="module")
def spec(llava_onevision_model):
    return LlavaOnevisionMediaSpec.from_model_dir(llava_onevision_model)


def test_sizes_cover_the_grid_edges_and_the_cap(spec):
    layouts = {k: spec.layout(*wh) for k, wh in SIZES.items()}
    assert (layouts["img_56"].rows, layouts["img_56"].cols) == (1, 1)
    assert (layouts["img_57"].rows, layouts["img_57"].cols) == (1, 2)
    assert layouts["img_wide"].cols == 6 and layouts["img_tall"].rows == 6
    assert spec.feature_grid(*SIZES["img_pooled"]).pooled is not None
    assert all(spec.feature_grid(*wh).pooled is None for k, wh in SIZES.items() if k != "img_pooled")


def test_hub_config_parses_to_the_tower_it_describes(llava_onevision_model):
    cfg = load_model_config(llava_onevision_model)
    raw = json.loads((llava_onevision_model / "config.json").read_text())
    v = cfg.vision
    assert cfg.architecture == ARCH and cfg.model_type == "llava_onevision"
    assert cfg.image_token_id == raw["image_token_index"] == IMAGE
    assert (v.hidden_size, v.depth, v.image_size) == (32, 2, 56)
    assert v.out_hidden_size == cfg.text.hidden_size == raw["text_config"]["hidden_size"]
    assert v.hidden_act == "gelu_pytorch_tanh" and cfg.text.mrope_section == ()
    from transformers import LlavaOnevisionConfig

    hf_cfg = LlavaOnevisionConfig(**{k: v for k, v in raw.items() if k != "architectures"})
    assert hf_cfg.vision_config.num_hidden_layers == v.depth
    assert hf_cfg.text_config.num_key_value_heads == cfg.text.num_key_value_heads


@pytest.mark.parametrize(
    ("size", "num_images"), [((100, 70), 1), ((300, 40), 1), ((400, 300), 1), ((90, 60), 2), ((28, 28), 3)]
)
def test_tower_equals_hf_image_features(llava_onevision_model, hf, spec, size, num_images):
    """Crops, SigLIP, projector and packing against LlavaOnevisionModel.get_image_features."""
    from models.llava_onevision_image import LlavaOnevisionImagePreprocessor

    cfg = load_model_config(llava_onevision_model)
    tower = load_model(
        vision_model_class(ARCH), cfg, llava_onevision_model, torch.float32, torch.device("cpu")
    )
    img = noise_image(*size, seed=size[0])
    feats = hf.image_processor(images=[[img] * num_images], return_tensors="pt")
    grid = spec.image_grid(*size, num_images)
    crops, own_grid = LlavaOnevisionImagePreprocessor(spec)(img, grid)
    with torch.no_grad():
        ref = hf.model.model.get_image_features(
            feats["pixel_values"],
            feats["image_sizes"],
            vision_feature_layer=-1,
            vision_feature_select_strategy="full",
            vision_aspect_ratio="anyres_max_9",
            batch_num_images=torch.tensor([num_images]),
        ).pooler_output[0]
        ours = tower(torch.from_numpy(crops), [grid] * 1)
    assert own_grid == grid and ours.shape == ref.shape == (spec.num_image_tokens(grid), cfg.text.hidden_size)
    torch.testing.assert_close(ours, ref, rtol=1e-5, atol=1e-5)


def test_positions_are_one_dimensional(llava_onevision_model):
    """Image tokens take sequence positions (no M-RoPE grid), on all three rows, and decode adds nothing."""
    cfg = load_model_config(llava_onevision_model)
    with torch.device("meta"):
        lm = language_model_class(ARCH)(cfg)
    spans = [(3, 70, (5, 70, 100))]
    pos = lm.positions(spans, 2, 80)
    assert torch.equal(pos, torch.arange(2, 80).expand(3, -1))
    assert lm.position_delta(spans) == 0
    assert lm.valid_span(70, (5, 70, 100)) and not lm.valid_span(70, (5, 70))


@pytest.fixture(scope="module", params=["save_pretrained", "module_names"])
def transformers5_dir(request, llava_onevision_model, tmp_path_factory):
    """The same model as transformers 5 saves it (its save_pretrained writes the Hub's names back), or under its
    module names model.language_model.* / model.vision_tower.* / lm_head.*."""
    from safetensors.torch import save_file
    from transformers import LlavaOnevisionForConditionalGeneration

    out = tmp_path_factory.mktemp(f"llava-ov-t5-{request.param}")
    model = LlavaOnevisionForConditionalGeneration.from_pretrained(
        str(llava_onevision_model), dtype=torch.float32
    )
    model.save_pretrained(str(out))
    if request.param == "module_names":
        for f in out.glob("*.safetensors*"):
            f.unlink()
        state = {k: v.contiguous() for k, v in model.state_dict().items()}
        save_file(state, str(out / "model.safetensors"), metadata={"format": "pt"})
    for name in ("preprocessor_config.json", "tokenizer.json", "tokenizer_config.json", "chat_template.json"):
        shutil.copyfile(llava_onevision_model / name, out / name)
    return request.param, out


def test_transformers5_layout_parses_and_loads_the_same_weights(llava_onevision_model, transformers5_dir):
    layout, t5_dir = transformers5_dir
    with safe_open(str(t5_dir / "model.safetensors"), "pt") as f:
        keys = list(f.keys())
    nested = any(k.startswith("model.language_model.") for k in keys)
    assert nested == (layout == "module_names")
    assert any(k.startswith("model.vision_tower." if nested else "vision_tower.") for k in keys)
    assert ("model.image_newline" if nested else "image_newline") in keys
    hub, t5 = load_model_config(llava_onevision_model), load_model_config(t5_dir)
    assert (hub.architecture, hub.text, hub.vision, hub.image_token_id) == (
        t5.architecture,
        t5.text,
        t5.vision,
        t5.image_token_id,
    )
    for cls in (language_model_class(ARCH), vision_model_class(ARCH)):
        a = load_model(cls, hub, llava_onevision_model, torch.float32, torch.device("cpu")).state_dict()
        b = load_model(cls, t5, t5_dir, torch.float32, torch.device("cpu")).state_dict()
        assert a.keys() == b.keys()
        for name in a:
            assert torch.equal(a[name], b[name]), name


# ---- the whole cluster ------------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def cluster(llava_onevision_model, log_dir):
    c = Cluster(
        llava_onevision_model,
        "--page-size",
        "4",
        "--chunked-prefill-size",
        "48",
        log_dir=log_dir,
        name="llava-onevision",
    )
    yield c
    c.stop()


def _case(case: str):
    if case not in SIZES:
        return case_messages(case)
    img = noise_image(
        *SIZES[case], seed=sum(SIZES[case]) + 1
    )  # seeds whose answers are not one repeated token
    text = {"type": "text", "text": "Describe the picture in detail, please."}
    return (
        [{"role": "user", "content": [image_part(img), text]}],
        [{"role": "user", "content": [{"type": "image"}, text]}],
        [img],
    )


@pytest.mark.parametrize("case", ["text", *SIZES, "two_images", "earlier_turn"])
def test_cluster_greedy_equals_hf(cluster, hf, case):
    ours, ref, images = _case(case)
    prompt_ref, out_ref = hf.generate(ref, images, MAX_TOKENS)
    body = check_greedy_chat(cluster, ours, prompt_ref, out_ref, case, MAX_TOKENS)
    assert body["choices"][0]["message"]["content"] == hf.tokenizer.decode(out_ref, skip_special_tokens=True)


def test_in_process_engine_equals_hf(llava_onevision_model, hf):
    from mirador.engine import Engine

    ours, ref, images = case_messages("two_images")
    prompt_ref, out_ref = hf.generate(ref, images, MAX_TOKENS)
    with Engine(str(llava_onevision_model), page_size=4) as engine:
        out = engine.chat(ours, sampling_params={"temperature": 0, "max_new_tokens": MAX_TOKENS})
    assert out["output_ids"] == out_ref
    assert out["meta_info"]["prompt_tokens"] == len(prompt_ref)


def test_batched_equals_alone(cluster):
    shared = noise_image(84, 84, 100)  # the image mixed_image_requests share
    reqs = mixed_image_requests(8)
    reqs.append(
        [{"role": "user", "content": [image_part(shared), image_part(shared), {"type": "text", "text": "?"}]}]
    )
    check_batched_equals_alone(cluster, reqs)


def test_repeated_image_hits_the_prefix_cache(cluster, hf, spec):
    img = noise_image(120, 90, 55)
    msgs = [{"role": "user", "content": [image_part(img), {"type": "text", "text": "Hi"}]}]
    ref = [{"role": "user", "content": [{"type": "image"}, {"type": "text", "text": "Hi"}]}]
    prompt_ref, out_ref = hf.generate(ref, [img], 10)
    first = cluster.chat_ok(msgs, max_tokens=10, temperature=0, return_token_ids=True)
    before = cluster.stats()
    second = cluster.chat_ok(msgs, max_tokens=10, temperature=0, return_token_ids=True)
    after = cluster.stats()
    ids = second["prompt_token_ids"]
    assert second["usage"]["prompt_tokens_details"]["cached_tokens"] > ids.index(IMAGE)  # past the image
    assert ids.count(IMAGE) == prompt_ref.count(IMAGE) == spec.count_image_tokens(120, 90)
    assert after.vision_encode_calls == before.vision_encode_calls
    assert first["choices"][0]["token_ids"] == second["choices"][0]["token_ids"] == out_ref


def test_the_same_image_alone_and_in_company_is_two_embeddings(cluster, hf):
    """An image tiled when alone and squared beside another: the keys differ, so neither answer borrows the
    other's embedding (the prefix cache and the vision service's cache key on the layout)."""
    img = noise_image(100, 80, 9)
    text = {"type": "text", "text": "Compare."}
    alone = [{"role": "user", "content": [image_part(img), text]}]
    pair = [{"role": "user", "content": [image_part(img), image_part(img), text]}]
    for msgs, n in ((alone, 1), (pair, 2), (alone, 1)):
        ref = [{"role": "user", "content": [*[{"type": "image"}] * n, text]}]
        _, out_ref = hf.generate(ref, [img] * n, 8)
        body = cluster.chat_ok(msgs, max_tokens=8, temperature=0, return_token_ids=True)
        assert body["choices"][0]["token_ids"] == out_ref, n


def test_raw_prompt_with_images_gets_the_image_marker(cluster, hf):
    """/generate with image_data and no placeholder in the text: each image is prepended as `<image>` (the media
    spec's marker), counted as in a prompt of that many images, and the output equals HF's on that prompt."""
    from tests.helpers import data_uri, png_bytes

    a, b = noise_image(150, 100, 21), noise_image(70, 90, 22)
    for images in ([a], [a, b]):
        body = cluster.http.post(
            "/generate",
            json={
                "text": "Describe",
                "image_data": [data_uri(png_bytes(img)) for img in images],
                "sampling_params": {"max_new_tokens": 8, "temperature": 0},
            },
        ).json()
        text = "<image>" * len(images) + "Describe"
        feats = hf.image_processor(images=[images], return_tensors="pt")
        inputs = {**feats, "batch_num_images": [len(images)]}
        pieces = text.split("<image>")
        text = pieces[0] + "".join(
            hf.counter.replace_image_token(inputs, i) + p for i, p in enumerate(pieces[1:])
        )
        ids = hf.tokenizer(text, add_special_tokens=False, return_tensors="pt")["input_ids"]
        with torch.no_grad():
            out = hf.model.generate(
                input_ids=ids,
                attention_mask=torch.ones_like(ids),
                pixel_values=feats["pixel_values"],
                image_sizes=feats["image_sizes"],
                batch_num_images=torch.tensor([len(images)]),
                max_new_tokens=8,
                do_sample=False,
            )
        assert body["meta_info"]["prompt_tokens"] == ids.shape[1]
        assert body["output_ids"] == out[0, ids.shape[1] :].tolist()


@pytest.mark.parametrize("chunk", [10_000, 13])
def test_runner_in_process_equals_hf(llava_onevision_model, hf, chunk):
    """The worker runner and vision encoder in process (what the GPU tests run on CUDA), prefill in one piece
    and in 13-token chunks that cut through image spans."""
    from tests.helpers import runner_generate

    for case in ("img_pooled", "two_images"):
        _, ref, images = _case(case)
        _, out_ref = hf.generate(ref, images, 12)
        ours, _ = runner_generate(llava_onevision_model, hf, ref, images, 12, "cpu", "float32", chunk)
        assert ours == out_ref, case
