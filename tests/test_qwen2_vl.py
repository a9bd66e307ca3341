"""Qwen2-VL (issue 14): config and weights in both layouts, the tower's padded (CUDA-graph) path, `mirador up`'s
architecture check, and the whole cluster against Hugging Face transformers token for token."""

from __future__ import annotations

import json
import shutil
import subprocess
import sys

import pytest
import torch
from safetensors import safe_open

from models.loader import load_model
from models.registry import language_model_class, supported_architectures, vision_model_class
from processor.model_config import load_model_config
from tests.helpers import (
    REPO,
    Cluster,
    HFReference,
    check_batched_equals_alone,
    check_greedy_chat,
    image_part,
    mixed_image_requests,
    noise_image,
)
from tests.test_parity_cluster import MAX_TOKENS, case_messages

ARCH = "Qwen2VLForConditionalGeneration"


def test_hub_config_keys_parse_to_the_tower_they_describe(qwen2_vl_model):
    cfg = load_model_config(qwen2_vl_model)
    raw = json.loads((qwen2_vl_model / "config.json").read_text())["vision_config"]
    assert cfg.architecture == ARCH and cfg.model_type == "qwen2_vl"
    v = cfg.vision
    assert v.hidden_size == raw["embed_dim"]  # the tower's width
    assert v.out_hidden_size == raw["hidden_size"] == cfg.text.hidden_size  # the merger's output
    assert v.intermediate_size == raw["embed_dim"] * raw["mlp_ratio"]
    assert v.hidden_act == "quick_gelu" and v.window_size == 0
    assert v.fullatt_block_indexes == tuple(range(v.depth))
    assert cfg.text.mrope_section == (2, 3, 3) and cfg.text.rope_theta == 1e6


@pytest.fixture(scope="module", params=["save_pretrained", "module_names"])
def transformers5_dir(request, qwen2_vl_model, tmp_path_factory):
    """The same model as transformers 5 saves it: a nested text_config with rope_parameters; weights as its
    save_pretrained writes them (the Hub's names), or under the module names model.language_model.* /
    model.visual.* (what transformers 4.52-4.57 wrote)."""
    from safetensors.torch import save_file
    from transformers import Qwen2VLForConditionalGeneration

    out = tmp_path_factory.mktemp(f"qwen2-vl-t5-{request.param}")
    model = Qwen2VLForConditionalGeneration.from_pretrained(str(qwen2_vl_model), dtype=torch.float32)
    model.save_pretrained(str(out))
    if request.param == "module_names":
        for f in out.glob("*.safetensors*"):
            f.unlink()
        state = {k: v.contiguous() for k, v in model.state_dict().items()}
        save_file(state, str(out / "model.safetensors"), metadata={"format": "pt"})
    for name in ("preprocessor_config.json", "tokenizer.json", "tokenizer_config.json", "chat_template.json"):
        shutil.copyfile(qwen2_vl_model / name, out / name)
    return request.param, out


def test_transformers5_layout_parses_and_loads_the_same_weights(qwen2_vl_model, transformers5_dir):
    layout, t5_dir = transformers5_dir
    raw = json.loads((t5_dir / "config.json").read_text())
    assert "rope_parameters" in raw["text_config"] and "rope_scaling" not in raw and "hidden_size" not in raw
    with safe_open(str(t5_dir / "model.safetensors"), "pt") as f:
        keys = list(f.keys())
    nested = any(k.startswith("model.language_model.") for k in keys)
    assert nested == (layout == "module_names")
    assert any(k.startswith("model.visual." if nested else "visual.") for k in keys)
    hub, t5 = load_model_config(qwen2_vl_model), load_model_config(t5_dir)
    assert (hub.architecture, hub.text, hub.vision) == (t5.architecture, t5.text, t5.vision)
    for cls in (language_model_class(ARCH), vision_model_class(ARCH)):
        a = load_model(cls, hub, qwen2_vl_model, torch.float32, torch.device("cpu")).state_dict()
        b = load_model(cls, t5, t5_dir, torch.float32, torch.device("cpu")).state_dict()
        assert a.keys() == b.keys()
        for name in a:
            assert torch.equal(a[name], b[name]), name


def test_padded_forward_equals_eager(qwen2_vl_model):
    """The vision service's graph path (static padded buffers, run eagerly on the CPU) gives the eager result."""
    from models.qwen2_vl_image import FastQwen2VLImagePreprocessor
    from processor.models.qwen2_vl import Qwen2VLMediaSpec
    from vision_svc.graphs import VisionGraphs

    cfg = load_model_config(qwen2_vl_model)
    tower = load_model(vision_model_class(ARCH), cfg, qwen2_vl_model, torch.float32, torch.device("cpu"))
    fast = FastQwen2VLImagePreprocessor(Qwen2VLMediaSpec.from_model_dir(qwen2_vl_model))
    import numpy as np

    images = [np.asarray(noise_image(w, h, w + h)) for w, h in ((56, 84), (112, 56))]
    grids = [(1, img.shape[0] // 14, img.shape[1] // 14) for img in images]
    pixels = fast.to_patches(images, "cpu")
    graphs = VisionGraphs(tower, buckets=(64, 256))
    with torch.inference_mode():
        padded = graphs.run(pixels, grids)
        eager = tower(pixels, grids)
    assert graphs.bucket_for(pixels.shape[0], 2, pixels.shape[1]) == 64
    torch.testing.assert_close(padded, eager, rtol=1e-5, atol=1e-5)


def test_up_refuses_an_unsupported_architecture(tmp_path, qwen2_vl_model):
    config = json.loads((qwen2_vl_model / "config.json").read_text())
    config["architectures"] = ["UnheardOfForConditionalGeneration"]
    (tmp_path / "config.json").write_text(json.dumps(config))
    r = subprocess.run(
        [sys.executable, "-m", "mirador", "up", "--model", str(tmp_path), "--port", "0"],
        cwd=REPO,
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert r.returncode == 2, r.stderr
    assert "'UnheardOfForConditionalGeneration' is not supported" in r.stderr
    for arch in supported_architectures():
        assert arch in r.stderr
    assert ARCH in supported_architectures()


def test_bench_hf_backend_loads_the_family_class(qwen2_vl_model):
    from mirador.bench.hf import load_model as load_hf

    model, random_weights = load_hf(qwen2_vl_model, "cpu", "float32")
    assert type(model).__name__ == ARCH and not random_weights


# ---- the whole cluster ------------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def cluster(qwen2_vl_model, log_dir):
    c = Cluster(
        qwen2_vl_model,
        "--page-size",
        "4",
        "--chunked-prefill-size",
        "48",
        log_dir=log_dir,
        name="qwen2-vl",
    )
    yield c
    c.stop()


@pytest.fixture(scope="module")
def hf(qwen2_vl_model):
    return HFReference(qwen2_vl_model)


def test_hf_reference_is_qwen2_vl(hf):
    assert type(hf.model).__name__ == ARCH


@pytest.mark.parametrize(
    "case", ["text", "img_28", "img_odd", "img_wide", "img_tall", "img_big", "two_images", "earlier_turn"]
)
def test_cluster_greedy_equals_hf(cluster, hf, case):
    ours, ref, images = case_messages(case, (300, 220))
    prompt_ref, out_ref = hf.generate(ref, images, MAX_TOKENS)
    body = check_greedy_chat(cluster, ours, prompt_ref, out_ref, case, MAX_TOKENS)
    assert body["choices"][0]["message"]["content"] == hf.tokenizer.decode(out_ref, skip_special_tokens=True)


def test_in_process_engine_equals_hf(qwen2_vl_model, hf):
    """The in-process engine (no HTTP, no gRPC) serves the family too."""
    from mirador.engine import Engine

    ours, ref, images = case_messages("two_images")
    prompt_ref, out_ref = hf.generate(ref, images, MAX_TOKENS)
    with Engine(str(qwen2_vl_model), page_size=4) as engine:
        out = engine.chat(ours, sampling_params={"temperature": 0, "max_new_tokens": MAX_TOKENS})
    assert out["output_ids"] == out_ref
    assert out["meta_info"]["prompt_tokens"] == len(prompt_ref)


def test_batched_equals_alone(cluster):
    check_batched_equals_alone(cluster, mixed_image_requests(8))


def test_repeated_image_hits_the_prefix_cache(cluster, hf):
    img = noise_image(120, 90, 55)
    msgs = [{"role": "user", "content": [image_part(img), {"type": "text", "text": "Hi"}]}]
    ref = [{"role": "user", "content": [{"type": "image"}, {"type": "text", "text": "Hi"}]}]
    _, out_ref = hf.generate(ref, [img], 10)
    first = cluster.chat_ok(msgs, max_tokens=10, temperature=0, return_token_ids=True)
    before = cluster.stats()
    second = cluster.chat_ok(msgs, max_tokens=10, temperature=0, return_token_ids=True)
    after = cluster.stats()
    ids = second["prompt_token_ids"]
    assert second["usage"]["prompt_tokens_details"]["cached_tokens"] > ids.index(151655)  # past the image
    assert ids.count(151655) == 12  # 120x90 -> 112x84 pixels, 8x6 patches, 12 merged
    assert after.vision_encode_calls == before.vision_encode_calls
    assert first["choices"][0]["token_ids"] == second["choices"][0]["token_ids"] == out_ref


# ---- on CUDA (the lead's GPU run) -------------------------------------------------------------------------------


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float32], ids=["bf16", "fp32"])
def test_cuda_tower_backends_and_graphs_match_hf(qwen2_vl_model, hf, dtype):
    """The fast paths (auto attention backend: varlen for bf16, triton for fp32; Triton QuickGELU; CUDA graphs)
    against HF's tower on the CPU."""
    from vision_svc.graphs import VisionGraphs

    cfg = load_model_config(qwen2_vl_model)
    tower = load_model(vision_model_class(ARCH), cfg, qwen2_vl_model, dtype, torch.device("cuda"))
    tower.set_attention_backend("auto")
    images = [noise_image(150, 100, 5), noise_image(60, 300, 6), noise_image(448, 448, 7)]
    feats = hf.image_processor(images=images, return_tensors="pt")
    grids = [tuple(int(v) for v in g) for g in feats["image_grid_thw"]]
    with torch.no_grad():
        ref = hf.model.model.visual(feats["pixel_values"], grid_thw=feats["image_grid_thw"]).pooler_output
        eager = tower(feats["pixel_values"].cuda(), grids).float().cpu()
        graphs = VisionGraphs(tower, buckets=(512, 2048), still=False)
        graphs.capture()
        replayed = graphs.run(feats["pixel_values"], grids).float().cpu()
    rel = 1e-4 if dtype == torch.float32 else 3e-2
    assert float((eager - ref).norm() / ref.norm()) < rel
    assert float((replayed - eager).norm() / eager.norm()) < rel
