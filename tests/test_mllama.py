"""Llama 3.2 Vision (mllama, issue 14): the tile arithmetic, the offline Llama 3 tokenizer, the tower and the
cross-attention language model against Hugging Face transformers (greedy generate token for token, with and
without images), and config/weights in both layouts. These tests drive our modules directly with a dense
single-sequence attention; tests/test_mllama_cluster.py serves the family through the whole cluster."""

from __future__ import annotations

import json
import shutil
import zlib
from pathlib import Path

import numpy as np
import pytest
import torch

from kernels.cross_attention import cross_attention, tile_visibility
from models.loader import dummy_tensor, load_model
from models.mllama import CrossAttentionBatch, MllamaForCausalLM, SequenceImages
from models.mllama_image import MllamaImagePreprocessor
from models.mllama_vision import MllamaVisionModel
from processor.model_config import load_model_config
from processor.models import mllama as spec
from processor.models.mllama_tokenizer import IMAGE_TOKEN_ID, build_mllama_tokenizer, llama3_ranks_file
from tests.helpers import noise_image

TINY_CONFIG = {
    "architectures": ["MllamaForConditionalGeneration"],
    "model_type": "mllama",
    "image_token_index": IMAGE_TOKEN_ID,
    "vision_config": {
        "hidden_size": 32,
        "attention_heads": 2,
        "num_hidden_layers": 4,
        "num_global_layers": 2,
        "intermediate_size": 64,
        "image_size": 28,
        "patch_size": 14,
        "max_num_tiles": 4,
        "intermediate_layers_indices": [1, 3],
        "vision_output_dim": 96,
        "norm_eps": 1e-5,
    },
    "text_config": {
        "vocab_size": 128256,
        "hidden_size": 64,
        "intermediate_size": 128,
        "num_hidden_layers": 5,
        "num_attention_heads": 4,
        "num_key_value_heads": 2,
        "cross_attention_layers": [1, 3],
        "max_position_embeddings": 16384,
        "rms_norm_eps": 1e-5,
        "rope_parameters": {
            "rope_type": "llama3",
            "rope_theta": 500000.0,
            "factor": 8.0,
            "low_freq_factor": 1.0,
            "high_freq_factor": 4.0,
            "original_max_position_embeddings": 8192,
        },
        "bos_token_id": 128000,
        "eos_token_id": [128001, 128008, 128009],
        "pad_token_id": 128004,
    },
}
TILE = 28


def _hf_model(config: dict):
    from transformers import MllamaConfig, MllamaForConditionalGeneration

    cfg = MllamaConfig(
        vision_config=config["vision_config"],
        text_config=config["text_config"],
        image_token_index=config["image_token_index"],
    )
    model = MllamaForConditionalGeneration(cfg).eval()
    # the shared dummy-weight rule (peaky output head), each tensor seeded by its Hub name
    hub = {k: v for k, v in model.state_dict().items()}
    g = torch.Generator()
    new = {}
    for name, t in hub.items():
        g.manual_seed(zlib.crc32(name.encode()))
        new[name] = dummy_tensor(name, tuple(t.shape), g, 10.0)
    model.load_state_dict(new)
    return model


@pytest.fixture(scope="module")
def tiny(tmp_path_factory) -> Path:
    """A tiny random mllama checkpoint saved by transformers 5 (Hub key names, rope_parameters) with the tokenizer."""
    d = tmp_path_factory.mktemp("mllama")
    torch.manual_seed(0)
    _hf_model(TINY_CONFIG).save_pretrained(d)
    (d / "preprocessor_config.json").write_text(json.dumps(PREPROCESSOR))
    build_mllama_tokenizer(d)
    return d


@pytest.fixture(scope="module")
def hf(tiny):
    from transformers import MllamaForConditionalGeneration

    return MllamaForConditionalGeneration.from_pretrained(tiny).eval()


@pytest.fixture(scope="module")
def ours(tiny):
    cfg = load_model_config(tiny)
    cpu = torch.device("cpu")
    return (
        load_model(MllamaForCausalLM, cfg, tiny, torch.float32, cpu),
        load_model(MllamaVisionModel, cfg, tiny, torch.float32, cpu),
    )


PREPROCESSOR = {
    "image_processor_type": "MllamaImageProcessor",
    "processor_class": "MllamaProcessor",
    "size": {"height": TILE, "width": TILE},
    "max_image_tiles": 4,
    "image_mean": [0.48145466, 0.4578275, 0.40821073],
    "image_std": [0.26862954, 0.26130258, 0.27577711],
    "rescale_factor": 0.00392156862745098,
    "resample": 2,
    "do_convert_rgb": True,
    "do_normalize": True,
    "do_pad": True,
    "do_rescale": True,
    "do_resize": True,
}


def _image_processor():
    from transformers.models.mllama.image_processing_pil_mllama import MllamaImageProcessorPil

    kwargs = {k: v for k, v in PREPROCESSOR.items() if k not in ("image_processor_type", "processor_class")}
    return MllamaImageProcessorPil(**kwargs)


# ---- tiles ------------------------------------------------------------------------------------------------------


def test_tiled_canvas_and_aspect_ratio_ids_equal_hf():
    import random

    from transformers.models.mllama.image_processing_pil_mllama import (
        get_all_supported_aspect_ratios,
        get_optimal_tiled_canvas,
    )

    assert list(spec.supported_aspect_ratios(4)) == [tuple(r) for r in get_all_supported_aspect_ratios(4)]
    rnd = random.Random(0)
    sizes = [(560, 560), (561, 560), (1120, 560), (100, 2000), (2000, 100)]
    sizes += [(rnd.randint(1, 3000), rnd.randint(1, 3000)) for _ in range(500)]
    for h, w in sizes:
        want = tuple(int(x) for x in get_optimal_tiled_canvas(h, w, 4, 560))
        assert spec.optimal_tiled_canvas(h, w, 4, 560) == want, (h, w)
    proc = _image_processor()
    for w, h in [(30, 70), (70, 30), (28, 28), (90, 20)]:
        out = proc([[noise_image(w, h)]], return_tensors="pt")
        th, tw = spec.num_tiles(h, w, 4, TILE)
        assert out["num_tiles"] == [[th * tw]]
        assert int(out["aspect_ratio_ids"][0, 0]) == spec.aspect_ratio_id(th, tw, 4)


def test_media_spec_counts_equal_hf_processor(tiny):
    """usage.prompt_tokens: HF's MllamaProcessor leaves one <|image|> per image in input_ids; the encoder cache
    holds max_num_tiles tiles of (tile / patch)^2 + 1 tokens per image, what HF's tower returns."""
    from transformers import PreTrainedTokenizerFast
    from transformers.models.mllama.processing_mllama import MllamaProcessor

    ms = spec.MllamaMediaSpec.from_model_dir(tiny)
    tok = PreTrainedTokenizerFast.from_pretrained(tiny)
    proc = MllamaProcessor(image_processor=_image_processor(), tokenizer=tok, chat_template=tok.chat_template)
    messages, sizes = CASES["two_images"]
    images = [noise_image(w, h, seed=i) for i, (w, h) in enumerate(sizes)]
    text = tok.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)
    out = proc(text=text, images=[images], add_special_tokens=False)
    n_text = len(tok.encode(text.replace("<|image|>", ""), add_special_tokens=False))
    assert len(out["input_ids"][0]) == n_text + sum(ms.count_image_tokens(w, h) for w, h in sizes)
    assert out["cross_attention_mask"].shape[:2] == (1, len(out["input_ids"][0]))
    for (w, h), n in zip(sizes, _image_processor()([images])["num_tiles"][0], strict=True):
        _, th, tw = ms.image_grid(w, h)
        assert th * tw == n
        assert ms.num_encoder_tokens((1, th, tw)) == 4 * 5
    assert ms.fingerprint() != spec.MllamaMediaSpec().fingerprint()


def test_image_token_ranges_equal_hf():
    from transformers.models.mllama.processing_mllama import get_cross_attention_token_mask

    im = IMAGE_TOKEN_ID
    for ids in ([1, 2, 3], [1, im, 2, 3], [im, im, 5, 6, im, 7], [1, im, 2, im, 3, 4], [im]):
        want = [tuple(r) for r in get_cross_attention_token_mask(ids, im)]
        want = [(a, len(ids) if b == -1 else b) for a, b in want]
        assert spec.image_token_ranges(ids, im) == want


# ---- tokenizer --------------------------------------------------------------------------------------------------


def test_tokenizer_equals_llama3_tiktoken_and_template(tiny):
    from transformers import PreTrainedTokenizerFast

    tiktoken = pytest.importorskip("tiktoken")
    from llama_models.tokenizer_utils import load_bpe_file

    from processor.models.mllama_tokenizer import LLAMA3_PATTERN

    ranks = load_bpe_file(llama3_ranks_file())
    ref = tiktoken.Encoding(name="llama3", pat_str=LLAMA3_PATTERN, mergeable_ranks=ranks, special_tokens={})
    tok = PreTrainedTokenizerFast.from_pretrained(tiny)
    for text in [
        "Hello world! 12345 héllo  \n\n  tabs\tand 日本語 it'll",
        "def f(x):\n    return x**2  # ok",
    ]:
        assert tok.encode(text, add_special_tokens=False) == ref.encode(text)
    msgs = [{"role": "user", "content": [{"type": "image"}, {"type": "text", "text": "What is this?"}]}]
    ids = tok.encode(
        tok.apply_chat_template(msgs, tokenize=False, add_generation_prompt=True), add_special_tokens=False
    )
    assert (
        ids[:2] == [128000, 128006]
        and ids.count(IMAGE_TOKEN_ID) == 1
        and ids[-4:] == [128006, 78191, 128007, 271]
    )


@pytest.mark.parametrize(
    "size", [(30, 70), (70, 30), (28, 28), (60, 60), (10, 200), (300, 13), (1, 1), (57, 29)]
)
def test_preprocessor_equals_hf(tiny, size):
    img = noise_image(*size, seed=size[0])
    want = _image_processor()([[img]], return_tensors="np")
    got = MllamaImagePreprocessor(spec.MllamaMediaSpec.from_model_dir(tiny))(img)
    np.testing.assert_allclose(got.pixels, want["pixel_values"][0, 0], atol=1e-6, rtol=0)
    assert got.num_tiles == want["num_tiles"][0][0]
    assert got.aspect_ratio_id == int(want["aspect_ratio_ids"][0, 0])


# ---- tower ------------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("size", [(30, 70), (70, 30), (28, 28), (60, 60)])
def test_tower_equals_hf(hf, ours, size):
    _, vm = ours
    out = _image_processor()([[noise_image(*size)]], return_tensors="pt")
    with torch.no_grad():
        ref = hf.model.vision_model(
            pixel_values=out["pixel_values"],
            aspect_ratio_ids=out["aspect_ratio_ids"],
            aspect_ratio_mask=out["aspect_ratio_mask"],
        ).last_hidden_state
        ref = hf.model.multi_modal_projector(ref).reshape(1, -1, 64)
        got = vm.encode_tiles(
            out["pixel_values"][0], out["aspect_ratio_ids"][0], torch.tensor(out["num_tiles"][0])
        )
    torch.testing.assert_close(got, ref, atol=1e-5, rtol=1e-5)


# ---- cross attention --------------------------------------------------------------------------------------------


def test_cross_attention_reference_equals_hf_mask_rule():
    """HF's inverted mask times full_text_row_masked_out_mask: rows that see no tile attend to every key."""
    from transformers.models.mllama.modeling_mllama import _prepare_cross_attention_mask

    torch.manual_seed(0)
    t, images, tiles, per_tile, heads, kv_heads, d = 7, 2, 4, 3, 4, 2, 8
    tile_mask = torch.zeros(1, t, images, tiles, dtype=torch.long)
    tile_mask[0, 2:5, 0, :2] = 1  # tokens 2-4 see image 0's two tiles; 5-6 image 1's three; 0-1 nothing
    tile_mask[0, 5:, 1, :3] = 1
    add_mask, row_mask = _prepare_cross_attention_mask(tile_mask, per_tile, torch.float32)
    q, k, v = (
        torch.randn(t, heads, d),
        torch.randn(images * tiles * per_tile, kv_heads, d),
        torch.randn(24, kv_heads, d),
    )
    ref = torch.nn.functional.scaled_dot_product_attention(
        q.transpose(0, 1)[None],
        k.transpose(0, 1)[None],
        v.transpose(0, 1)[None],
        attn_mask=add_mask,
        scale=0.3,
        enable_gqa=True,
    )[0].transpose(0, 1)
    visible = tile_visibility(torch.arange(t), [(2, 5), (5, 7)], [2, 3], tiles, per_tile, t)
    assert torch.equal(visible, tile_mask[0].flatten(1).repeat_interleave(per_tile, dim=1).bool())
    out, has_image = cross_attention(q, k, v, visible, 0.3)
    torch.testing.assert_close(out, ref)
    assert has_image.tolist() == row_mask[0, 0, :, 0].bool().tolist()
    # the quirk matters: masking the empty rows instead would give NaN/zero rows there
    assert not torch.allclose(out[:2], torch.zeros_like(out[:2]))


# ---- the language model against generate -----------------------------------------------------------------------


class DenseAttention:
    """One sequence, contiguous K/V per layer: the test's stand-in for the worker's paged backends."""

    def __init__(self):
        self.k: dict[int, torch.Tensor] = {}
        self.v: dict[int, torch.Tensor] = {}

    def forward(self, layer_idx, q, k, v, meta, **kwargs):
        if layer_idx in self.k:
            k, v = torch.cat([self.k[layer_idx], k]), torch.cat([self.v[layer_idx], v])
        self.k[layer_idx], self.v[layer_idx] = k, v
        n, past = q.shape[0], k.shape[0] - q.shape[0]
        idx = torch.arange(k.shape[0], device=q.device)
        mask = idx[None, :] <= (idx[:n] + past)[:, None]
        return torch.nn.functional.scaled_dot_product_attention(
            q.transpose(0, 1),
            k.transpose(0, 1),
            v.transpose(0, 1),
            attn_mask=mask,
            enable_gqa=True,
            scale=q.shape[-1] ** -0.5,
        ).transpose(0, 1)


def _our_generate(lm, vm, input_ids: list[int], images, max_new: int, model_dir: Path) -> list[int]:
    """Our preprocessor, tower, encoder cache and language model, greedy, on the models' device."""
    dev = lm.lm_head.weight.device
    lm.attn = DenseAttention()
    lm.encoder_cache = None
    seq = _encoder_cache(lm, vm, model_dir, images, input_ids) if images else None
    generated, pos = [], 0
    step = torch.tensor(input_ids, device=dev)
    for _ in range(max_new):
        positions = torch.arange(pos, pos + len(step), device=dev)
        cross = CrossAttentionBatch([seq], [0], [len(step)], positions)
        hidden = lm(lm.embed(step), positions.expand(3, -1), None, cross)
        tok = int(lm.compute_logits(hidden[-1:]).argmax(-1))
        generated.append(tok)
        pos += len(step)
        step = torch.tensor([tok], device=dev)
    return generated


def _hf_generate(hf, input_ids: list[int], images, max_new: int) -> list[int]:
    from transformers.models.mllama.processing_mllama import (
        convert_sparse_cross_attention_mask_to_dense,
        get_cross_attention_token_mask,
    )

    kwargs = {}
    if images:
        out = _image_processor()([images], return_tensors="pt")
        mask = convert_sparse_cross_attention_mask_to_dense(
            [get_cross_attention_token_mask(input_ids, IMAGE_TOKEN_ID)], out["num_tiles"], 4, len(input_ids)
        )
        kwargs = {
            "pixel_values": out["pixel_values"],
            "aspect_ratio_ids": out["aspect_ratio_ids"],
            "aspect_ratio_mask": out["aspect_ratio_mask"],
            "cross_attention_mask": torch.tensor(mask),
        }
    ids = torch.tensor([input_ids])
    got = hf.generate(
        input_ids=ids,
        attention_mask=torch.ones_like(ids),
        max_new_tokens=max_new,
        do_sample=False,
        eos_token_id=None,
        pad_token_id=128004,
        **kwargs,
    )
    return got[0, len(input_ids) :].tolist()


def _prompt(tiny, messages) -> list[int]:
    from transformers import PreTrainedTokenizerFast

    tok = PreTrainedTokenizerFast.from_pretrained(tiny)
    text = tok.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)
    return tok.encode(text, add_special_tokens=False)  # the template writes <|begin_of_text|>


def _user(*parts):
    return {
        "role": "user",
        "content": [{"type": "image"} if p is None else {"type": "text", "text": p} for p in parts],
    }


CASES = {
    "text_only": ([_user("Say something about llamas.")], []),
    "one_image_1x2_tiles": ([_user(None, "Describe the image.")], [(30, 70)]),
    "one_image_2x2_tiles": ([_user("Look:", None, "What is it?")], [(60, 60)]),
    "image_in_earlier_turn": (
        [
            _user(None, "What is in it?"),
            {"role": "assistant", "content": "A pattern of noise."},
            _user("And the colours?"),
        ],
        [(70, 30)],
    ),
    "two_images": ([_user(None, "and", None, "compare them")], [(30, 70), (60, 28)]),
}


@pytest.mark.parametrize("case", list(CASES))
def test_greedy_equals_hf_generate(tiny, hf, ours, case):
    messages, sizes = CASES[case]
    images = [noise_image(w, h, seed=i) for i, (w, h) in enumerate(sizes)]
    input_ids = _prompt(tiny, messages)
    assert input_ids.count(IMAGE_TOKEN_ID) == len(images)
    lm, vm = ours
    with torch.no_grad():
        want = _hf_generate(hf, input_ids, images, 12)
        got = _our_generate(lm, vm, input_ids, images, 12, tiny)
    assert got == want
    assert len(set(want)) >= 2  # not one repeated token


def test_images_change_the_output(tiny, ours):
    """The cross layers matter: another image gives other tokens (so the parity above is not vacuous)."""
    lm, vm = ours
    input_ids = _prompt(tiny, [_user(None, "Describe the image.")])
    with torch.no_grad():
        a = _our_generate(lm, vm, input_ids, [noise_image(30, 70, seed=0)], 12, tiny)
        b = _our_generate(lm, vm, input_ids, [noise_image(30, 70, seed=5)], 12, tiny)
    assert a != b


# ---- checkpoint layouts -----------------------------------------------------------------------------------------


def test_hub_layout_config_and_transformers5_key_names_load_equal(tiny, ours, tmp_path):
    """The Hub's config (rope_theta + rope_scaling in text_config, torch_dtype) and transformers 5's in-memory key
    names (model.language_model.*, model.vision_model.*, lm_head.*) load the same weights."""
    from safetensors.torch import load_file, save_file

    cfg = json.loads((tiny / "config.json").read_text())
    text = cfg["text_config"]
    rope = dict(text.pop("rope_parameters"))
    text["rope_theta"] = rope.pop("rope_theta")
    text["rope_scaling"] = rope
    cfg["torch_dtype"] = cfg.pop("dtype", "float32")
    hub = tmp_path / "hub"
    shutil.copytree(tiny, hub)
    (hub / "config.json").write_text(json.dumps(cfg))
    t5 = tmp_path / "t5"
    shutil.copytree(tiny, t5)
    state = load_file(tiny / "model.safetensors")
    renamed = {}
    for k, v in state.items():
        for theirs, new in (
            ("language_model.model.", "model.language_model."),
            ("language_model.lm_head.", "lm_head."),
            ("vision_model.", "model.vision_model."),
            ("multi_modal_projector.", "model.multi_modal_projector."),
        ):
            if k.startswith(theirs):
                k = new + k[len(theirs) :]
                break
        renamed[k] = v
    save_file(renamed, str(t5 / "model.safetensors"))
    lm0, vm0 = ours
    for d in (hub, t5):
        c = load_model_config(d)
        lm = load_model(MllamaForCausalLM, c, d, torch.float32, torch.device("cpu"))
        vm = load_model(MllamaVisionModel, c, d, torch.float32, torch.device("cpu"))
        for a, b in ((lm, lm0), (vm, vm0)):
            sa, sb = a.state_dict(), b.state_dict()
            assert sa.keys() == sb.keys() and all(torch.equal(sa[k], sb[k]) for k in sa)
        assert torch.equal(lm.inv_freq, lm0.inv_freq)


# ---- logits and batching ----------------------------------------------------------------------------------------


ENCODER_PAGE = 8


def _encoder_cache(lm, vm, model_dir, images, input_ids, first_page: int = 1):
    """Preprocess and encode the images, write the sequence's encoder pages (from first_page on, in reverse order
    so the pages are not contiguous) and describe them."""
    pre = MllamaImagePreprocessor(spec.MllamaMediaSpec.from_model_dir(model_dir))
    tiles = [pre(im) for im in images]
    dev = vm.multi_modal_projector.weight.device
    states = vm.encode_tiles(
        torch.from_numpy(np.stack([t.pixels for t in tiles])).to(dev),
        torch.tensor([t.aspect_ratio_id for t in tiles], device=dev),
        torch.tensor([t.num_tiles for t in tiles], device=dev),
    )
    states = states.reshape(-1, states.shape[-1])
    if lm.encoder_cache is None:
        lm.encoder_cache = lm.new_encoder_cache(64, ENCODER_PAGE, states.dtype, dev)
    n_pages = -(-states.shape[0] // ENCODER_PAGE)
    table = torch.arange(first_page + n_pages - 1, first_page - 1, -1, device=dev)
    lm.write_encoder_cache(states, table)
    return SequenceImages(
        page_table=table,
        encoder_len=states.shape[0],
        ranges=spec.image_token_ranges(input_ids, IMAGE_TOKEN_ID),
        num_tiles=[t.num_tiles for t in tiles],
        prompt_len=len(input_ids),
    )


def test_prefill_logits_equal_hf(tiny, hf, ours):
    """Every prompt position's logits (text before the image included: the masked-row quirk) match HF's."""
    lm, vm = ours
    messages, sizes = CASES["two_images"]
    images = [noise_image(w, h, seed=i) for i, (w, h) in enumerate(sizes)]
    ids = _prompt(tiny, messages)
    out = _image_processor()([images], return_tensors="pt")
    from transformers.models.mllama.processing_mllama import (
        convert_sparse_cross_attention_mask_to_dense,
        get_cross_attention_token_mask,
    )

    mask = convert_sparse_cross_attention_mask_to_dense(
        [get_cross_attention_token_mask(ids, IMAGE_TOKEN_ID)], out["num_tiles"], 4, len(ids)
    )
    with torch.no_grad():
        ref = hf(
            input_ids=torch.tensor([ids]),
            pixel_values=out["pixel_values"],
            aspect_ratio_ids=out["aspect_ratio_ids"],
            aspect_ratio_mask=out["aspect_ratio_mask"],
            cross_attention_mask=torch.tensor(mask),
        ).logits[0]
        lm.attn = DenseAttention()
        seq = _encoder_cache(lm, vm, tiny, images, ids)
        pos = torch.arange(len(ids))
        hidden = lm(
            lm.embed(torch.tensor(ids)),
            pos.expand(3, -1),
            None,
            CrossAttentionBatch([seq], [0], [len(ids)], pos),
        )
        got = lm.compute_logits(hidden)
    torch.testing.assert_close(got, ref, atol=2e-4, rtol=1e-4)


class PackedPrefillAttention:
    """Several sequences' prompts packed in one step (block-diagonal causal), no cache: for batched-vs-alone."""

    def __init__(self, q_lens: list[int]):
        self.q_lens = q_lens

    def forward(self, layer_idx, q, k, v, meta, **kwargs):
        n = q.shape[0]
        seq = torch.repeat_interleave(torch.arange(len(self.q_lens)), torch.tensor(self.q_lens))
        idx = torch.arange(n)
        mask = (seq[:, None] == seq[None, :]) & (idx[None, :] <= idx[:, None])
        return torch.nn.functional.scaled_dot_product_attention(
            q.transpose(0, 1), k.transpose(0, 1), v.transpose(0, 1), attn_mask=mask, enable_gqa=True
        ).transpose(0, 1)


def test_batched_prefill_equals_alone(tiny, ours):
    """A text-only sequence (cross layers skipped) and two image sequences packed in one step give each the hidden
    states it gets alone."""
    lm, vm = ours
    prompts = []
    for case in ("text_only", "one_image_1x2_tiles", "two_images"):
        messages, sizes = CASES[case]
        images = [noise_image(w, h, seed=i) for i, (w, h) in enumerate(sizes)]
        ids = _prompt(tiny, messages)
        first = 1 + 20 * len(prompts)  # each sequence its own encoder pages
        prompts.append((ids, _encoder_cache(lm, vm, tiny, images, ids, first) if images else None))
    with torch.no_grad():
        alone = []
        for ids, seq in prompts:
            lm.attn = PackedPrefillAttention([len(ids)])
            pos = torch.arange(len(ids))
            cross = CrossAttentionBatch([seq], [0], [len(ids)], pos)
            alone.append(lm(lm.embed(torch.tensor(ids)), pos.expand(3, -1), None, cross))
        q_lens = [len(ids) for ids, _ in prompts]
        starts = [sum(q_lens[:i]) for i in range(len(q_lens))]
        lm.attn = PackedPrefillAttention(q_lens)
        pos = torch.cat([torch.arange(n) for n in q_lens])
        cross = CrossAttentionBatch([seq for _, seq in prompts], starts, q_lens, pos)
        ids = torch.tensor([t for p, _ in prompts for t in p])
        batched = lm(lm.embed(ids), pos.expand(3, -1), None, cross)
    for a, s, n in zip(alone, starts, q_lens, strict=True):
        torch.testing.assert_close(batched[s : s + n], a, atol=1e-5, rtol=1e-5)


# ---- the tiny model builder (`mirador default-model --family mllama`, Hub layout) -------------------------------


@pytest.mark.parametrize("case", ["text_only", "image_in_earlier_turn"])
def test_default_model_builder_hub_layout_equals_hf(case):
    """The builder writes the Hub layout (language_model.model.*, rope_theta + rope_scaling, torch_dtype) with the
    Llama 3 tokenizer; transformers loads it and our models generate what it generates."""
    from transformers import MllamaForConditionalGeneration

    from mirador.default_model import default_model_dir

    d = default_model_dir(family="mllama")
    cfg_json = json.loads((d / "config.json").read_text())
    assert "rope_scaling" in cfg_json["text_config"] and "rope_parameters" not in cfg_json["text_config"]
    hf = MllamaForConditionalGeneration.from_pretrained(d).eval()
    cfg = load_model_config(d)
    cpu = torch.device("cpu")
    lm = load_model(MllamaForCausalLM, cfg, d, torch.float32, cpu)
    vm = load_model(MllamaVisionModel, cfg, d, torch.float32, cpu)
    messages, sizes = CASES[case]
    images = [noise_image(w, h, seed=i) for i, (w, h) in enumerate(sizes)]
    ids = _prompt(d, messages)
    with torch.no_grad():
        want = _hf_generate(hf, ids, images, 12)
        got = _our_generate(lm, vm, ids, images, 12, d)
    assert got == want and len(set(want)) >= 2


def test_mirador_up_accepts_mllama():
    """The family is in the model registry: `mirador up` starts it (tests/test_mllama_cluster.py serves it)."""
    from mirador.cli import _check_architecture
    from mirador.default_model import default_model_dir
    from models.registry import supported_architectures

    _check_architecture(str(default_model_dir(family="mllama")))
    assert "MllamaForConditionalGeneration" in supported_architectures()


def test_paged_cross_attention_equals_dense():
    """The encoder cache in pages (scattered, the last one partly used) gives the dense reference's output."""
    from kernels.cross_attention import paged_cross_attention, store_encoder_kv

    torch.manual_seed(1)
    s, page, kv_heads, heads, d = 23, 4, 2, 4, 8
    k, v = torch.randn(s, kv_heads, d), torch.randn(s, kv_heads, d)
    k_cache, v_cache = torch.zeros(12, page, kv_heads, d), torch.zeros(12, page, kv_heads, d)
    table = torch.tensor([7, 2, 11, 4, 9, 1])
    store_encoder_kv(k, v, k_cache, v_cache, table)
    q = torch.randn(6, heads, d)
    visible = torch.zeros(6, s, dtype=torch.bool)
    visible[2:, :10] = True  # rows 0-1 see nothing (attend to all), the rest the first 10 encoder tokens
    want = cross_attention(q, k, v, visible, 0.35)
    got = paged_cross_attention(q, k_cache, v_cache, table, s, visible, 0.35)
    torch.testing.assert_close(got[0], want[0])
    assert torch.equal(got[1], want[1])
    assert k_cache[0].abs().sum() == 0  # pages outside the table are untouched


# Llama-3.2-11B-Vision-Instruct's config.json as published (Hub layout), dimensions only
HUB_11B_CONFIG = {
    "architectures": ["MllamaForConditionalGeneration"],
    "model_type": "mllama",
    "image_token_index": 128256,
    "torch_dtype": "bfloat16",
    "text_config": {
        "model_type": "mllama_text_model",
        "vocab_size": 128256,
        "hidden_size": 4096,
        "intermediate_size": 14336,
        "num_hidden_layers": 40,
        "num_attention_heads": 32,
        "num_key_value_heads": 8,
        "cross_attention_layers": [3, 8, 13, 18, 23, 28, 33, 38],
        "max_position_embeddings": 131072,
        "rms_norm_eps": 1e-05,
        "rope_theta": 500000.0,
        "rope_scaling": {
            "factor": 8.0,
            "high_freq_factor": 4.0,
            "low_freq_factor": 1.0,
            "original_max_position_embeddings": 8192,
            "rope_type": "llama3",
        },
        "eos_token_id": [128001, 128008, 128009],
    },
    "vision_config": {
        "model_type": "mllama_vision_model",
        "hidden_size": 1280,
        "attention_heads": 16,
        "num_hidden_layers": 32,
        "num_global_layers": 8,
        "intermediate_size": 5120,
        "image_size": 560,
        "patch_size": 14,
        "max_num_tiles": 4,
        "intermediate_layers_indices": [3, 7, 15, 23, 30],
        "vision_output_dim": 7680,
        "norm_eps": 1e-05,
        "supported_aspect_ratios": [[1, 1], [1, 2], [1, 3], [1, 4], [2, 1], [2, 2], [3, 1], [4, 1]],
    },
}


def test_11b_hub_config_parameter_names_and_shapes_equal_hf():
    """At the published size (built on the meta device): every tensor of HF's model maps onto ours with its
    shape, and ours are all covered; the rope frequencies are transformers' llama3 ones."""
    from transformers import MllamaConfig, MllamaForConditionalGeneration
    from transformers.modeling_rope_utils import ROPE_INIT_FUNCTIONS

    from models.loader import checkpoint_shapes, map_key
    from processor.model_config import parse_config

    hf_cfg = MllamaConfig(
        **{k: v for k, v in HUB_11B_CONFIG.items() if k not in ("architectures", "model_type")}
    )
    with torch.device("meta"):
        hf_model = MllamaForConditionalGeneration(hf_cfg)
        cfg = parse_config(HUB_11B_CONFIG)
        models = [MllamaForCausalLM(cfg), MllamaVisionModel(cfg)]
    hf_shapes = {k: tuple(v.shape) for k, v in hf_model.state_dict().items()}
    for model in models:
        ours = checkpoint_shapes(model)
        mapped = {}
        for k, shape in hf_shapes.items():
            name = map_key(k, type(model).checkpoint_prefixes)
            if name is not None:
                mapped[name] = shape
        assert mapped == ours
    inv_freq, _ = ROPE_INIT_FUNCTIONS["llama3"](hf_cfg.text_config, "cpu")
    torch.testing.assert_close(models[0].inv_freq, inv_freq.float())
    ms = spec.MllamaMediaSpec()
    assert ms.tokens_per_tile == 1601 and ms.num_encoder_tokens((1, 2, 2)) == 6404
