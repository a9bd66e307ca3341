"""Gemma 3 (issue 14): the attention masks (sliding window, bidirectional image spans) against HF's mask rules,
config and weights in both layouts, the tower against HF's, and the whole cluster against Hugging Face
transformers' generate token for token."""

from __future__ import annotations

import json
import shutil
from dataclasses import replace

import pytest
import torch

from kernels import paged_attention as ref
from mirador.default_model import default_model_dir
from models.loader import load_model
from models.registry import language_model_class, vision_model_class
from processor.model_config import load_model_config
from tests.helpers import (
    Cluster,
    check_batched_equals_alone,
    check_greedy_chat,
    image_part,
    mixed_image_requests,
    noise_image,
)
from tests.test_parity_cluster import case_messages

ARCH = "Gemma3ForConditionalGeneration"
IMAGE_TOKEN = 151672
MAX_TOKENS = 14


@pytest.fixture(scope="module")
def gemma3_model():
    """The tiny Gemma 3 (`mirador default-model --family gemma3`)."""
    return default_model_dir(family="gemma3")


# ---- masks ------------------------------------------------------------------------------------------------------


def _hf_mask(kv_len: int, q_lo: int, window: int, image: list[bool]) -> torch.Tensor:
    """HF's rule: full = causal OR same block; sliding = (kv > q - window) AND (causal OR same block), with block
    ids from transformers' get_block_sequence_ids_for_mask."""
    from transformers.models.gemma3.modeling_gemma3 import get_block_sequence_ids_for_mask

    blocks = get_block_sequence_ids_for_mask(torch.tensor([[int(b) for b in image]]))[0]
    q = torch.arange(q_lo, kv_len)[:, None]
    k = torch.arange(kv_len)[None, :]
    same = (blocks[q] == blocks[k]) & (blocks[q] >= 0)
    allowed = (k <= q) | same
    if window:
        allowed &= k > q - window
    return allowed


@pytest.mark.parametrize("window", [0, 5, 24])
@pytest.mark.parametrize("q_lo", [0, 9, 20])
def test_attention_mask_equals_hf_token_type_mask(window, q_lo):
    image = [False] * 40
    spans = [(3, 11), (13, 17), (20, 36)]  # the first two images are two tokens apart, as BOI/EOI keep them
    for s, e in spans:
        image[s:e] = [True] * (e - s)
    ours = ref.attention_mask(q_lo, 40, window, [sp for sp in spans if sp[1] > q_lo])
    assert torch.equal(ours, _hf_mask(40, q_lo, window, image))
    if window == 5:  # the feature matters: a plain causal mask differs
        assert not torch.equal(ours, ref.attention_mask(q_lo, 40, 0, []))


def test_paged_attention_with_window_and_spans_equals_dense_sdpa():
    torch.manual_seed(0)
    page, n, heads, kv_heads, d = 4, 30, 4, 2, 8
    k_cache = torch.randn(10, page, kv_heads, d)
    v_cache = torch.randn(10, page, kv_heads, d)
    table = torch.tensor([3, 1, 7, 2, 9, 5, 4, 8])
    k = k_cache[table].reshape(-1, kv_heads, d)[:n]
    v = v_cache[table].reshape(-1, kv_heads, d)[:n]
    q = torch.randn(12, heads, d)  # the last 12 tokens
    spans = [(20, 26)]
    out = ref.paged_attention(q, k_cache, v_cache, [table], [12], [n], 0.3, window=7, spans=[spans])
    mask = ref.attention_mask(n - 12, n, 7, spans)
    dense = torch.nn.functional.scaled_dot_product_attention(
        q.transpose(0, 1), k.transpose(0, 1), v.transpose(0, 1), attn_mask=mask, scale=0.3, enable_gqa=True
    ).transpose(0, 1)
    torch.testing.assert_close(out, dense)
    # decode: the window alone
    dec = ref.paged_decode_attention(q[-1:], k_cache, v_cache, table[None], torch.tensor([n]), 0.3, window=7)
    one = ref.paged_attention(q[-1:], k_cache, v_cache, [table], [1], [n], 0.3, window=7)
    torch.testing.assert_close(dec, one)
    full = ref.paged_attention(q[-1:], k_cache, v_cache, [table], [1], [n], 0.3)
    assert not torch.allclose(one, full)


def test_softcapped_attention_equals_hf_eager():
    """attn_logit_softcapping (Gemma 2 style; Gemma 3's configs set none): the reference against HF's eager path."""
    from types import SimpleNamespace

    from transformers.models.gemma3.modeling_gemma3 import eager_attention_forward

    torch.manual_seed(3)
    page, n, heads, kv_heads, d = 4, 18, 4, 2, 8
    k_cache, v_cache = torch.randn(6, page, kv_heads, d) * 3, torch.randn(6, page, kv_heads, d)
    table = torch.tensor([2, 5, 1, 4, 3])
    q = torch.randn(n, heads, d) * 3
    spans = [(4, 9)]
    got = ref.paged_attention(
        q, k_cache, v_cache, [table], [n], [n], 0.5, window=6, spans=[spans], softcap=2.0
    )
    k = k_cache[table].reshape(-1, kv_heads, d)[:n].transpose(0, 1)[None]
    v = v_cache[table].reshape(-1, kv_heads, d)[:n].transpose(0, 1)[None]
    mask = ref.attention_mask(0, n, 6, spans)
    additive = torch.zeros(mask.shape).masked_fill(~mask, float("-inf"))[None, None]
    module = SimpleNamespace(num_key_value_groups=heads // kv_heads, training=False)
    want, _ = eager_attention_forward(
        module, q.transpose(0, 1)[None], k, v, additive, scaling=0.5, softcap=2.0
    )
    torch.testing.assert_close(got, want[0])
    plain = ref.paged_attention(q, k_cache, v_cache, [table], [n], [n], 0.5, window=6, spans=[spans])
    assert not torch.allclose(got, plain)


def test_scheduler_never_ends_a_chunk_inside_an_image():
    from types import SimpleNamespace

    from common.types import MultimodalItem
    from scheduler_svc.scheduler import Scheduler, SchedulerPolicy

    item = MultimodalItem("k", 6, 16, (1, 8, 8))
    seq = SimpleNamespace(req=SimpleNamespace(request=SimpleNamespace(mm_items=(item,))))
    sched = SimpleNamespace(policy=SchedulerPolicy(16, 64, 4096, 8, 10, 64, whole_image_spans=True))
    assert Scheduler._whole_images(sched, seq, 0, 10) == 6  # stops before the image
    assert Scheduler._whole_images(sched, seq, 6, 10) == 16  # the image starts the chunk: all of it
    assert Scheduler._whole_images(sched, seq, 0, 30) == 30  # past the image: unchanged
    sched.policy = SchedulerPolicy(16, 64, 4096, 8, 10, 64)
    assert Scheduler._whole_images(sched, seq, 0, 10) == 10


# ---- config, weights, tower -------------------------------------------------------------------------------------


def test_hub_config_parses(gemma3_model):
    from processor.models.gemma3 import Gemma3MediaSpec, parse_gemma3_text

    cfg = load_model_config(gemma3_model)
    assert cfg.architecture == ARCH and cfg.image_token_id == IMAGE_TOKEN
    opts = parse_gemma3_text(cfg.raw)
    assert opts.layer_types == ("sliding_attention", "full_attention") * 2
    assert (opts.rope_theta, opts.rope_local_base_freq, opts.rope_linear_factor) == (1e6, 1e4, 8.0)
    spec = Gemma3MediaSpec.from_model_dir(gemma3_model)
    assert spec.num_image_tokens(spec.image_grid(300, 20)) == 16


def test_media_spec_and_span_interface(gemma3_model):
    """The family interface every family follows: the grid is the tower's square whatever the image or how many the
    prompt has, the count is the pooled grid, the tower's rows are its patches, the content key carries the
    settings; the language model accepts a span only with its grid's count (the worker's check)."""
    from processor.models.gemma3 import Gemma3MediaSpec

    spec = Gemma3MediaSpec.from_model_dir(gemma3_model)
    grid = spec.image_grid(300, 20, 3)
    assert grid == spec.image_grid(20, 300) == (1, 8, 8)
    assert spec.num_image_tokens(grid) == spec.count_image_tokens(300, 20) == 16
    assert spec.num_patches(grid) == 64 and spec.item_settings(grid) == spec.fingerprint()
    with torch.device("meta"):
        lm = language_model_class(ARCH)(load_model_config(gemma3_model))
    assert lm.valid_span(16, grid)
    assert not lm.valid_span(15, grid) and not lm.valid_span(16, (1, 8)) and not lm.valid_span(16, (1, 6, 6))


@pytest.fixture(scope="module")
def transformers5_dir(gemma3_model, tmp_path_factory):
    """The same model as transformers 5 writes it: rope_parameters and layer_types, weights under the module names
    model.language_model.* / model.vision_tower.* / model.multi_modal_projector.*."""
    from safetensors.torch import save_file
    from transformers import Gemma3ForConditionalGeneration

    out = tmp_path_factory.mktemp("gemma3-t5")
    model = Gemma3ForConditionalGeneration.from_pretrained(str(gemma3_model), dtype=torch.float32)
    model.config.save_pretrained(str(out))
    state = {k: v.contiguous() for k, v in model.state_dict().items() if k != "lm_head.weight"}
    save_file(state, str(out / "model.safetensors"), metadata={"format": "pt"})
    for name in ("preprocessor_config.json", "tokenizer.json", "tokenizer_config.json", "chat_template.json"):
        shutil.copyfile(gemma3_model / name, out / name)
    return out


def test_transformers5_layout_parses_and_loads_the_same_weights(gemma3_model, transformers5_dir):
    from processor.models.gemma3 import parse_gemma3_text

    raw = json.loads((transformers5_dir / "config.json").read_text())
    assert "rope_parameters" in raw["text_config"] and "rope_local_base_freq" not in raw["text_config"]
    hub, t5 = load_model_config(gemma3_model), load_model_config(transformers5_dir)
    # TextConfig's generic rope_theta/tie flag are not what Gemma reads: its rope and head come from
    # parse_gemma3_text (two bases per layer kind) and the tied embedding
    generic = {"rope_theta": 0.0, "tie_word_embeddings": True}
    assert (hub.architecture, replace(hub.text, **generic), hub.vision) == (
        t5.architecture,
        replace(t5.text, **generic),
        t5.vision,
    )
    assert parse_gemma3_text(hub.raw) == parse_gemma3_text(t5.raw)
    for cls in (language_model_class(ARCH), vision_model_class(ARCH)):
        a = load_model(cls, hub, gemma3_model, torch.float32, torch.device("cpu")).state_dict()
        b = load_model(cls, t5, transformers5_dir, torch.float32, torch.device("cpu")).state_dict()
        assert a.keys() == b.keys()
        for name in a:
            assert torch.equal(a[name], b[name]), name


# ---- HF reference -----------------------------------------------------------------------------------------------


class Gemma3Reference:
    def __init__(self, model_dir):
        from transformers import Gemma3ForConditionalGeneration, PreTrainedTokenizerFast
        from transformers.models.gemma3.image_processing_pil_gemma3 import Gemma3ImageProcessorPil

        self.model = Gemma3ForConditionalGeneration.from_pretrained(
            str(model_dir), dtype=torch.float32
        ).eval()
        self.tokenizer = PreTrainedTokenizerFast.from_pretrained(str(model_dir))
        pre = json.loads((model_dir / "preprocessor_config.json").read_text())
        self.image_processor = Gemma3ImageProcessorPil(
            size=pre["size"],
            image_mean=pre["image_mean"],
            image_std=pre["image_std"],
            resample=pre["resample"],
        )
        self.tokens = json.loads((model_dir / "config.json").read_text())["mm_tokens_per_image"]

    def prompt_ids(self, messages) -> list[int]:
        """Gemma3Processor's text path: the template, then each <start_of_image> replaced by the full sequence."""
        text = self.tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)
        full = "\n\n<start_of_image>" + "<image_soft_token>" * self.tokens + "<end_of_image>\n\n"
        return self.tokenizer.encode(text.replace("<start_of_image>", full), add_special_tokens=False)

    def generate(self, messages, images, max_new: int) -> tuple[list[int], list[int]]:
        ids = self.prompt_ids(messages)
        input_ids = torch.tensor([ids])
        kw = {}
        if images:
            kw["pixel_values"] = self.image_processor(images=images, return_tensors="pt")["pixel_values"]
        with torch.no_grad():
            out = self.model.generate(
                input_ids,
                attention_mask=torch.ones_like(input_ids),
                token_type_ids=(input_ids == IMAGE_TOKEN).long(),
                max_new_tokens=max_new,
                do_sample=False,
                **kw,
            )
        return ids, out[0, len(ids) :].tolist()


@pytest.fixture(scope="module")
def hf(gemma3_model):
    return Gemma3Reference(gemma3_model)


@pytest.mark.parametrize("backend", ["torch_native", "triton"])
def test_tower_and_preprocessing_equal_hf(gemma3_model, hf, backend):
    """The shared SigLIP tower through its post-layernorm, per vision attention backend (Triton by its
    interpreter; each image one segment), and the projector, against HF's get_image_features."""
    from models.gemma3_image import Gemma3ImagePreprocessor
    from processor.models.gemma3 import Gemma3MediaSpec

    cfg = load_model_config(gemma3_model)
    tower = load_model(vision_model_class(ARCH), cfg, gemma3_model, torch.float32, torch.device("cpu"))
    assert tower.set_attention_backend(backend) == backend
    spec = Gemma3MediaSpec.from_model_dir(gemma3_model)
    pre = Gemma3ImagePreprocessor(spec)
    images = [noise_image(150, 100, 5), noise_image(64, 64, 6), noise_image(30, 200, 7)]
    pixels_ref = hf.image_processor(images=images, return_tensors="pt")["pixel_values"]
    pixels = torch.cat([torch.from_numpy(pre(im, spec.image_grid(*im.size))[0]) for im in images])
    torch.testing.assert_close(pixels, pixels_ref, rtol=0, atol=1e-6)
    with torch.no_grad():
        want = hf.model.model.get_image_features(pixel_values=pixels_ref).pooler_output
        got = tower(pixels, [(1, 8, 8)] * 3)
    torch.testing.assert_close(got, want.reshape(-1, want.shape[-1]), rtol=1e-5, atol=1e-5)


# ---- the whole cluster ------------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def cluster(gemma3_model, log_dir):
    # page 4, chunks of 20: images (16 tokens) fall across chunk edges and the scheduler must move them
    c = Cluster(
        gemma3_model, "--page-size", "4", "--chunked-prefill-size", "20", log_dir=log_dir, name="gemma3"
    )
    yield c
    c.stop()


LONG = "Tell me a long story about the sea, the wind, the ships and the harbour lights at night. " * 3


@pytest.mark.parametrize("case", ["text", "long_text", "img_odd", "img_big", "two_images", "earlier_turn"])
def test_cluster_greedy_equals_hf(cluster, hf, case):
    if case == "long_text":
        ours = ref_msgs = [{"role": "user", "content": LONG}]
        images = []
    else:
        ours, ref_msgs, images = case_messages(case, (300, 220))
    prompt_ref, out_ref = hf.generate(ref_msgs, images, MAX_TOKENS)
    if case == "long_text":
        assert len(prompt_ref) > 2 * 24  # well past the sliding window
    assert prompt_ref.count(IMAGE_TOKEN) == 16 * len(images)
    check_greedy_chat(cluster, ours, prompt_ref, out_ref, case, MAX_TOKENS)


def test_batched_equals_alone(cluster):
    check_batched_equals_alone(cluster, mixed_image_requests(6))


def test_repeated_image_hits_the_prefix_cache(cluster, hf):
    img = noise_image(120, 90, 55)
    msgs = [{"role": "user", "content": [image_part(img), {"type": "text", "text": "Hi"}]}]
    ref_msgs = [{"role": "user", "content": [{"type": "image"}, {"type": "text", "text": "Hi"}]}]
    _, out_ref = hf.generate(ref_msgs, [img], 10)
    first = cluster.chat_ok(msgs, max_tokens=10, temperature=0, return_token_ids=True)
    before = cluster.stats()
    second = cluster.chat_ok(msgs, max_tokens=10, temperature=0, return_token_ids=True)
    after = cluster.stats()
    ids = second["prompt_token_ids"]
    assert second["usage"]["prompt_tokens_details"]["cached_tokens"] > ids.index(IMAGE_TOKEN) + 16  # past it
    assert after.vision_encode_calls == before.vision_encode_calls
    assert first["choices"][0]["token_ids"] == second["choices"][0]["token_ids"] == out_ref


# ---- Triton backend: window and spans against the reference (interpreter on the CPU, the device on a GPU) -------


def _triton_case(window: int, spans_per_seq, seq_lens, q_lens, dtype=torch.float32, seed=0):
    import random

    from kernels._triton import triton_testable

    if not triton_testable():
        pytest.skip("needs triton (a GPU or TRITON_INTERPRET=1)")
    from kernels import triton_attention as ta
    from tests.test_triton_attention import DEVICE, _batch, _fused_q

    rng = random.Random(seed)
    torch.manual_seed(seed)
    heads, kv_heads, d, page = 4, 2, 16, 4
    b = _batch(rng, seq_lens, page, kv_heads, d, dtype)
    q = _fused_q(sum(q_lens), heads, kv_heads, d, dtype)
    out = torch.full_like(q, float("nan"))
    last = []
    for n, ql, spans in zip(seq_lens, q_lens, spans_per_seq, strict=True):
        pos = torch.arange(n - ql, n)
        hi = pos.clone()
        for s, e in spans:
            inside = (pos >= s) & (pos < e)
            hi[inside] = torch.clamp(hi[inside], min=e - 1)
        last.append(hi)
    kv_last = torch.cat(last).to(torch.int32).to(DEVICE) if any(spans_per_seq) else None
    q_start = torch.tensor([sum(q_lens[:i]) for i in range(len(q_lens))], dtype=torch.int32, device=DEVICE)
    ql = torch.tensor(q_lens, dtype=torch.int32, device=DEVICE)
    ta.extend_attention(
        q, b.k_cache, b.v_cache, b.block_table, b.rows, b.seq_lens, q_start, ql, max(q_lens), 0.25, out,
        window=window, kv_last=kv_last, block_rows=16, block_n=8,
    )  # fmt: skip
    want = ref.paged_attention(
        q.float(),
        b.k_cache.float(),
        b.v_cache.float(),
        [torch.tensor(t, device=DEVICE) for t in b.tables],
        q_lens,
        seq_lens,
        0.25,
        window=window,
        spans=spans_per_seq,
    )
    torch.testing.assert_close(out.float(), want, rtol=1e-5, atol=1e-5)
    return b, q


@pytest.mark.parametrize("window", [0, 6, 24])
def test_triton_extend_with_window_and_spans_equals_reference(window):
    # chunks that start inside the cache (13 and 20 cached tokens) and one whole prompt; images of 8 and 16 tokens
    seq_lens, q_lens = [33, 40, 26], [20, 20, 26]
    spans = [[(14, 22)], [(22, 38)], [(2, 10), (12, 20)]]
    _triton_case(window, spans, seq_lens, q_lens)


def test_triton_extend_window_alone_equals_reference():
    _triton_case(5, [[], []], [30, 17], [12, 17])


@pytest.mark.parametrize("num_splits", [1, 3])
def test_triton_decode_with_window_equals_reference(num_splits):
    from kernels._triton import triton_testable

    if not triton_testable():
        pytest.skip("needs triton (a GPU or TRITON_INTERPRET=1)")
    import random

    from kernels import triton_attention as ta
    from tests.test_triton_attention import DEVICE, _batch, _fused_q

    seq_lens = [37, 3, 64]
    b = _batch(random.Random(1), seq_lens, 4, 2, 16, torch.float32)
    q = _fused_q(3, 4, 2, 16, torch.float32)
    out = torch.full_like(q, float("nan"))
    ta.decode_attention(
        q, b.k_cache, b.v_cache, b.block_table, b.rows, b.seq_lens, 0.25, out,
        num_splits=num_splits, window=10, block_n=8,
    )  # fmt: skip
    tables = [torch.tensor(t, device=DEVICE) for t in b.tables]
    want = ref.paged_attention(q, b.k_cache, b.v_cache, tables, [1, 1, 1], seq_lens, 0.25, window=10)
    torch.testing.assert_close(out, want, rtol=1e-5, atol=1e-5)


# ---- the in-process engine, per attention backend ---------------------------------------------------------------


def _engine_backends() -> list[str]:
    from kernels._triton import triton_testable

    return ["torch_native", "triton"] if triton_testable() else ["torch_native"]


@pytest.mark.parametrize("backend", _engine_backends())
def test_in_process_engine_equals_hf(gemma3_model, hf, backend):
    """The in-process engine (no HTTP, no gRPC) with chunks of 20 (the images are moved whole into one) through
    each attention backend (Triton by its interpreter on the CPU)."""
    from mirador.engine import Engine

    ours, ref_msgs, images = case_messages("two_images")
    prompt_ref, out_ref = hf.generate(ref_msgs, images, MAX_TOKENS)
    with Engine(
        str(gemma3_model), page_size=4, chunked_prefill_size=20, attention_backend=backend, device="cpu"
    ) as engine:
        out = engine.chat(ours, sampling_params={"temperature": 0, "max_new_tokens": MAX_TOKENS})
    assert out["output_ids"] == out_ref
    assert out["meta_info"]["prompt_tokens"] == len(prompt_ref)


# GPU cases (float32 engine per backend and graphs, the tower in bf16) are in tests/test_gpu.py.


def test_completion_prompt_with_a_typed_image_marker_expands_like_the_processor(gemma3_model, hf):
    """A raw prompt: a typed <start_of_image> becomes the image's whole sequence (Gemma3Processor's text rule);
    without one, the marker goes first."""
    import asyncio

    from processor.request_builder import RequestBuilder

    builder = RequestBuilder(gemma3_model)
    url = image_part(noise_image(50, 40, 9))["image_url"]["url"]
    typed = asyncio.run(builder.from_prompt("Look: <start_of_image> now", [url]))
    full = "\n\n<start_of_image>" + "<image_soft_token>" * 16 + "<end_of_image>\n\n"
    assert typed.input_ids == hf.tokenizer.encode(f"Look: {full} now", add_special_tokens=False)
    plain = asyncio.run(builder.from_prompt("Look now", [url]))
    assert plain.input_ids == hf.tokenizer.encode(f"{full}Look now", add_special_tokens=False)
    assert [m.offset for m in plain.mm_items] == [plain.input_ids.index(IMAGE_TOKEN)]


# google/gemma-3-4b-it's config.json as published (the Hub layout), for shapes only
GEMMA3_4B = {
    "architectures": ["Gemma3ForConditionalGeneration"],
    "boi_token_index": 255999,
    "eoi_token_index": 256000,
    "eos_token_id": [1, 106],
    "image_token_index": 262144,
    "initializer_range": 0.02,
    "mm_tokens_per_image": 256,
    "model_type": "gemma3",
    "text_config": {
        "hidden_size": 2560,
        "intermediate_size": 10240,
        "model_type": "gemma3_text",
        "num_hidden_layers": 34,
        "rope_scaling": {"factor": 8.0, "rope_type": "linear"},
        "sliding_window": 1024,
    },
    "torch_dtype": "bfloat16",
    "vision_config": {
        "hidden_size": 1152,
        "image_size": 896,
        "intermediate_size": 4304,
        "model_type": "siglip_vision_model",
        "num_attention_heads": 16,
        "num_hidden_layers": 27,
        "patch_size": 14,
        "vision_use_head": False,
    },
}


def test_published_4b_config_builds_the_published_shapes(tmp_path):
    """The 4B config leaves heads, head_dim, vocabulary and rope bases to Gemma3TextConfig's defaults: we fill the
    same ones (parsed equal to HF's fully defaulted config), so the model has the checkpoint's 4.3B parameters and
    256 soft tokens."""
    from transformers import Gemma3Config

    from processor.model_config import parse_config
    from processor.models.gemma3 import Gemma3MediaSpec, parse_gemma3_text

    full = json.loads(Gemma3Config(**GEMMA3_4B).to_json_string())  # what HF reads it as, defaults included
    ours = parse_config(GEMMA3_4B)  # the file as published: the defaults are ours to fill
    hf_view = parse_config(full)
    assert (ours.text, ours.vision, ours.image_token_id) == (
        hf_view.text,
        hf_view.vision,
        hf_view.image_token_id,
    )
    assert (ours.text.num_attention_heads, ours.text.head_dim, ours.text.vocab_size) == (8, 256, 262208)
    opts = parse_gemma3_text(GEMMA3_4B)
    assert opts.layer_types.count("full_attention") == 5 and opts.layer_types[5] == "full_attention"
    assert (opts.rope_theta, opts.rope_local_base_freq, opts.rope_linear_factor) == (1e6, 1e4, 8.0)
    assert opts == parse_gemma3_text(GEMMA3_4B | {"text_config": full["text_config"]})
    with torch.device("meta"):
        lm = language_model_class(ARCH)(ours)
        tower = vision_model_class(ARCH)(ours)
    total = sum(p.numel() for m in (lm, tower) for p in m.parameters())
    assert 4.2e9 < total < 4.4e9, total
    (tmp_path / "config.json").write_text(json.dumps(GEMMA3_4B))
    spec = Gemma3MediaSpec.from_model_dir(tmp_path)
    assert spec.num_image_tokens(spec.image_grid(1000, 300)) == 256 and ours.vision.spatial_merge_size == 4


def test_prefix_match_that_ends_inside_an_image_stays_exact(gemma3_model, hf):
    """Two prompts with one image that differ right after it: the page-granular prefix match can end inside the
    image. The cached part of the image saw all of it when it was computed, and the chunk takes the rest whole, so
    the second answer still equals HF's."""
    from mirador.engine import Engine

    img = noise_image(90, 60, 21)

    def msgs(text):
        return [{"role": "user", "content": [image_part(img), {"type": "text", "text": text}]}]

    def ref_msgs(text):
        return [{"role": "user", "content": [{"type": "image"}, {"type": "text", "text": text}]}]

    a, b = hf.prompt_ids(ref_msgs("Alpha")), hf.prompt_ids(ref_msgs("Zulu"))
    start = a.index(IMAGE_TOKEN)
    diverge = next(i for i, (x, y) in enumerate(zip(a, b, strict=False)) if x != y)
    page = next(p for p in range(2, 33) if start < diverge // p * p < start + 16)
    _, want = hf.generate(ref_msgs("Zulu"), [img], MAX_TOKENS)
    with Engine(str(gemma3_model), page_size=page, chunked_prefill_size=64, device="cpu") as engine:
        engine.chat(msgs("Alpha"), sampling_params={"temperature": 0, "max_new_tokens": 2})
        out = engine.chat(msgs("Zulu"), sampling_params={"temperature": 0, "max_new_tokens": MAX_TOKENS})
    cached = out["meta_info"]["cached_tokens"]
    assert start < cached < start + 16, (start, cached, page)  # the match ended inside the image
    assert out["output_ids"] == want
