"""Our model code against Hugging Face transformers, in process: vision embeddings, prefill logits, positions."""

from __future__ import annotations

import pytest
import torch

from common.types import MultimodalItem, SamplingParams, SeqInit, SeqStep, StepPlan
from models.loader import load_model
from models.qwen2_vl_image import Qwen2VLImagePreprocessor
from models.registry import vision_model_class
from processor.model_config import load_model_config
from processor.models.qwen2_vl import Qwen2VLMediaSpec
from tests.helpers import HFReference, noise_image, sample_photo
from worker_svc.model_runner import ModelRunner, RunnerConfig


@pytest.fixture(scope="module", params=["default", "second", "qwen2_vl"])
def setup(request, default_model, second_model, qwen2_vl_model):
    model_dir = {"default": default_model, "second": second_model, "qwen2_vl": qwen2_vl_model}[request.param]
    cfg = load_model_config(model_dir)
    vision = load_model(
        vision_model_class(cfg.architecture), cfg, model_dir, torch.float32, torch.device("cpu")
    )
    pre = Qwen2VLImagePreprocessor(Qwen2VLMediaSpec.from_model_dir(model_dir))
    return model_dir, HFReference(model_dir), vision, pre


def _images():
    from PIL import Image

    return [
        noise_image(28, 28, 1),
        noise_image(150, 100, 2),
        noise_image(900, 60, 3),
        Image.open(sample_photo("grace_hopper.jpg")).convert("RGB"),
    ]


def test_pixel_values_equal_hf(setup):
    _, hf, _, pre = setup
    for img in _images():
        ref = hf.image_processor(images=[img], return_tensors="np")
        ours, grid = pre(img)
        assert tuple(ref["image_grid_thw"][0]) == grid
        assert (ours == ref["pixel_values"]).all()


def test_vision_embeddings_equal_hf(setup):
    _, hf, vision, pre = setup
    images = _images()
    feats = hf.image_processor(images=images, return_tensors="pt")
    with torch.no_grad():
        ref = hf.model.model.visual(feats["pixel_values"], grid_thw=feats["image_grid_thw"]).pooler_output
        patches = [pre(img) for img in images]
        ours = vision(torch.cat([torch.from_numpy(p) for p, _ in patches]), [g for _, g in patches])
        one = vision(torch.from_numpy(patches[1][0]), [patches[1][1]])  # alone equals within the batch
    assert ours.shape == ref.shape
    assert_fp32_close(ours, ref)
    start = patches[0][0].shape[0] // 4
    assert_fp32_close(one, ours[start : start + one.shape[0]])


def assert_fp32_close(ours: torch.Tensor, ref: torch.Tensor) -> None:
    """Float32 through a network: the relative error norm far under 1e-3 (measured ~1e-6 here; a wrong window,
    rotary angle or merge order gives ~1e-1), and no element off by more than 1e-3 of the largest magnitude (a
    rare ~3e-4 wobble was seen on busy CPUs, from the BLAS's thread-dependent blocking)."""
    rel = float((ours - ref).norm() / ref.norm())
    assert rel < 1e-4, rel
    torch.testing.assert_close(ours, ref, rtol=0, atol=1e-3 * float(ref.abs().max()))


class _Embeddings:
    def __init__(self, table):
        self.table = table

    transport = "in_process"

    def fetch(self, keys, device, dtype):
        found = {k: self.table[k].to(device, dtype) for k in keys if k in self.table}
        return found, [k for k in keys if k not in self.table]


def _runner_logits(model_dir, vision, pre, hf, messages_ref, images, chunk: int):
    """Prefill logits of the last prompt token from our worker runner (chunked), with our vision embeddings."""
    inputs = hf.inputs(messages_ref, images)
    ids = inputs["input_ids"][0].tolist()
    table, items = {}, []
    pos = 0
    for i, img in enumerate(images):
        patches, grid = pre(img)
        with torch.no_grad():
            table[f"k{i}"] = vision(torch.from_numpy(patches), [grid])
        off = ids.index(hf.image_token_id, pos)
        n = table[f"k{i}"].shape[0]
        items.append(MultimodalItem(f"k{i}", off, n, grid))
        pos = off + n
    runner = ModelRunner(RunnerConfig(str(model_dir), page_size=4, max_total_tokens=4096), _Embeddings(table))
    pages = tuple(range(1, (len(ids) + 3) // 4 + 1))
    init = SeqInit(
        tuple(items), SamplingParams(temperature=0.0, return_logprob=True, top_logprobs=5), len(ids)
    )
    captured = {}
    original = runner.model.compute_logits

    def spy(hidden):
        captured["logits"] = original(hidden)
        return captured["logits"]

    runner.model.compute_logits = spy
    start = 0
    while start < len(ids):
        n = min(chunk, len(ids) - start)
        step = SeqStep(
            "s",
            start,
            tuple(ids[start : start + n]),
            start + n == len(ids),
            0,
            pages if start == 0 else (),
            init if start == 0 else None,
        )
        runner.step(StepPlan(start, (step,)))
        start += n
    return captured["logits"][0].cpu()


@pytest.mark.parametrize("chunk", [10_000, 7])
def test_prefill_logits_equal_hf(setup, chunk):
    model_dir, hf, vision, pre = setup
    images = [noise_image(150, 100, 5), noise_image(60, 300, 6)]
    msgs = [
        {
            "role": "user",
            "content": [{"type": "image"}, {"type": "text", "text": "Compare"}, {"type": "image"}],
        }
    ]
    ref = hf.last_logits(msgs, images)
    ours = _runner_logits(model_dir, vision, pre, hf, msgs, images, chunk)
    assert_fp32_close(ours, ref)
    assert ours.argmax() == ref.argmax()


def test_different_images_give_different_logits(setup):
    model_dir, hf, vision, pre = setup
    msgs = [{"role": "user", "content": [{"type": "image"}, {"type": "text", "text": "Describe"}]}]
    a = _runner_logits(model_dir, vision, pre, hf, msgs, [noise_image(56, 56, 1)], 10_000)
    b = _runner_logits(model_dir, vision, pre, hf, msgs, [noise_image(56, 56, 2)], 10_000)
    assert (a - b).abs().max() > 1e-2
