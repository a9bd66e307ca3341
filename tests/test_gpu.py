"""The model code on CUDA: our worker and vision encoder against Hugging Face transformers (skipped without a GPU;
run on the GPU machine)."""

from __future__ import annotations

import pytest
import torch

from tests.helpers import HFReference, noise_image, runner_generate

pytestmark = [
    pytest.mark.gpu,
    pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device"),
]

MSGS = [
    {"role": "user", "content": [{"type": "image"}, {"type": "text", "text": "Compare"}, {"type": "image"}]}
]


def _images():
    return [noise_image(150, 100, 5), noise_image(60, 300, 6)]


@pytest.mark.parametrize("which", ["default", "second", "qwen2_vl"])
@pytest.mark.parametrize("chunk", [10_000, 13])
def test_cuda_float32_greedy_equals_hf_cpu(which, chunk, default_model, second_model, qwen2_vl_model):
    model_dir = {"default": default_model, "second": second_model, "qwen2_vl": qwen2_vl_model}[which]
    hf = HFReference(model_dir)
    _, ref = hf.generate(MSGS, _images(), 20)
    ours, _ = runner_generate(model_dir, hf, MSGS, _images(), 20, "cuda", "float32", chunk)
    assert ours == ref


@pytest.mark.parametrize("which", ["default", "qwen2_vl"])
def test_cuda_bfloat16_tracks_hf_bfloat16(which, default_model, qwen2_vl_model):
    model_dir = {"default": default_model, "qwen2_vl": qwen2_vl_model}[which]
    hf = HFReference(model_dir)
    hf.model.to("cuda", torch.bfloat16)
    inputs = {k: v.to("cuda") for k, v in hf.inputs(MSGS, _images()).items()}
    inputs["pixel_values"] = inputs["pixel_values"].to(torch.bfloat16)
    with torch.no_grad():
        ref = hf.model(**inputs).logits[0, -1].float().cpu()
    hf.model.to("cpu", torch.float32)
    _, ours = runner_generate(model_dir, hf, MSGS, _images(), 1, "cuda", "bfloat16")
    assert ours.argmax() == ref.argmax()
    assert (ours - ref).abs().max() / ref.abs().max() < 0.05


@pytest.mark.parametrize("which", ["default", "qwen2_vl"])
def test_vision_tower_on_cuda_matches_hf(which, default_model, qwen2_vl_model):
    from models.loader import load_model
    from models.qwen2_vl_image import Qwen2VLImagePreprocessor
    from models.registry import vision_model_class
    from processor.model_config import load_model_config
    from processor.models.qwen2_vl import Qwen2VLMediaSpec

    model_dir = {"default": default_model, "qwen2_vl": qwen2_vl_model}[which]
    hf = HFReference(model_dir)
    cfg = load_model_config(model_dir)
    vision = load_model(
        vision_model_class(cfg.architecture), cfg, model_dir, torch.float32, torch.device("cuda")
    )
    pre = Qwen2VLImagePreprocessor(Qwen2VLMediaSpec.from_model_dir(model_dir))
    feats = hf.image_processor(images=_images(), return_tensors="pt")
    with torch.no_grad():
        ref = hf.model.model.visual(feats["pixel_values"], grid_thw=feats["image_grid_thw"]).pooler_output
        patches = [pre(img) for img in _images()]
        ours = vision(torch.cat([torch.from_numpy(p) for p, _ in patches]).cuda(), [g for _, g in patches])
    torch.testing.assert_close(ours.cpu(), ref, rtol=1e-3, atol=1e-3)


@pytest.mark.parametrize("chunk", [10_000, 13])
def test_cuda_prompt_logprobs_equal_hf_cpu(chunk, default_model):
    """Prompt log-probabilities (issue 11) on CUDA float32, piecewise-graphed prompt steps included: every
    position's target and top-3 against HF's log-softmax on the CPU."""
    from common.types import SamplingParams, SeqInit, SeqStep, StepPlan
    from worker_svc.model_runner import ModelRunner, RunnerConfig

    hf = HFReference(default_model)
    msgs = [{"role": "user", "content": "Write two sentences about the sea and the ships that sail on it."}]
    ids = hf.inputs(msgs, [])["input_ids"][0].tolist()
    with torch.no_grad():
        ref = torch.log_softmax(hf.model(input_ids=torch.tensor([ids])).logits[0].float(), dim=-1)
    cfg = RunnerConfig(str(default_model), "float32", "cuda", page_size=4, max_total_tokens=4096)
    runner = ModelRunner(cfg, None)
    init = SeqInit((), SamplingParams(temperature=0.0, top_logprobs=3), len(ids))
    pages = tuple(range(1, len(ids) // 4 + 3))
    got = []
    for start in range(0, len(ids), chunk):
        n = min(chunk, len(ids) - start)
        end = min(start + n, len(ids) - 1)  # rows start .. end - 1 score positions start + 1 .. end
        targets = tuple(ids[start + 1 : end + 1])
        step = SeqStep(
            "s", start, tuple(ids[start : start + n]), start + n == len(ids), 0,
            pages if start == 0 else (), init if start == 0 else None, 0, targets,
        )  # fmt: skip
        out = runner.step(StepPlan(start + 1, (step,)))
        got += [e for p in out.prompt_logprobs for e in p.entries(targets)]
    assert [e.token_id for e in got] == ids[1:]
    for pos, e in enumerate(got, start=1):
        assert abs(e.logprob - float(ref[pos - 1, ids[pos]])) < 1e-3
        assert [v for _, v in e.top_logprobs] == pytest.approx(ref[pos - 1].topk(3).values.tolist(), abs=1e-3)


# ---- LLaVA-OneVision (issue 14) --------------------------------------------------------------------------------

LLAVA_ONE = [{"role": "user", "content": [{"type": "image"}, {"type": "text", "text": "Describe it"}]}]


def _llava_cases():
    """(messages, images): one tiled image past the anyres_max cap, and two squares."""
    return [(LLAVA_ONE, [noise_image(400, 300, 8)]), (MSGS, _images())]


@pytest.mark.parametrize("chunk", [10_000, 13])
def test_llava_onevision_cuda_float32_greedy_equals_hf_cpu(chunk, llava_onevision_model):
    from tests.helpers import LlavaOnevisionHFReference

    hf = LlavaOnevisionHFReference(llava_onevision_model)
    for msgs, images in _llava_cases():
        _, ref = hf.generate(msgs, images, 20)
        ours, _ = runner_generate(llava_onevision_model, hf, msgs, images, 20, "cuda", "float32", chunk)
        assert ours == ref


def test_llava_onevision_cuda_bfloat16_tracks_hf_bfloat16(llava_onevision_model):
    from tests.helpers import LlavaOnevisionHFReference

    hf = LlavaOnevisionHFReference(llava_onevision_model)
    for msgs, images in _llava_cases():
        hf.model.to("cuda", torch.bfloat16)
        inputs = {k: v.to("cuda") for k, v in hf.inputs(msgs, images).items()}
        inputs["pixel_values"] = inputs["pixel_values"].to(torch.bfloat16)
        with torch.no_grad():
            ref = hf.model(**inputs).logits[0, -1].float().cpu()
        hf.model.to("cpu", torch.float32)
        _, ours = runner_generate(llava_onevision_model, hf, msgs, images, 1, "cuda", "bfloat16")
        assert ours.argmax() == ref.argmax()
        assert (ours - ref).abs().max() / ref.abs().max() < 0.05


@pytest.mark.parametrize(
    ("dtype", "backend"),
    [
        (torch.float32, "torch_native"),
        (torch.float32, "triton"),
        (torch.bfloat16, "varlen"),
        (torch.bfloat16, "triton"),
    ],
)
def test_llava_onevision_tower_on_cuda_matches_hf(dtype, backend, llava_onevision_model):
    """SigLIP, projector and packing on CUDA through each vision attention backend (crops as equal segments:
    varlen takes the dense cuDNN path) against HF's get_image_features on the CPU in float32."""
    from models.llava_onevision_image import LlavaOnevisionImagePreprocessor
    from models.loader import load_model
    from models.registry import vision_model_class
    from processor.model_config import load_model_config
    from processor.models.llava_onevision import LlavaOnevisionMediaSpec
    from tests.helpers import LlavaOnevisionHFReference

    hf = LlavaOnevisionHFReference(llava_onevision_model)
    cfg = load_model_config(llava_onevision_model)
    spec = LlavaOnevisionMediaSpec.from_model_dir(llava_onevision_model)
    tower = load_model(
        vision_model_class(cfg.architecture), cfg, llava_onevision_model, dtype, torch.device("cuda")
    )
    tower.set_attention_backend(backend)
    pre = LlavaOnevisionImagePreprocessor(spec)
    for _, images in _llava_cases():
        feats = hf.image_processor(images=[images], return_tensors="pt")
        with torch.no_grad():
            ref = hf.model.model.get_image_features(
                feats["pixel_values"],
                feats["image_sizes"],
                vision_feature_layer=-1,
                vision_feature_select_strategy="full",
                vision_aspect_ratio="anyres_max_9",
                batch_num_images=torch.tensor([len(images)]),
            ).pooler_output
            ref = torch.cat(list(ref))
            grids = [spec.image_grid(*img.size, len(images)) for img in images]
            crops = torch.cat(
                [torch.from_numpy(pre(img, g)[0]) for img, g in zip(images, grids, strict=True)]
            )
            # cuDNN runs float32 convolutions (SigLIP's patch embedding) in TF32 by default: 2.8e-4 off HF's CPU
            # result on an H100; the comparison is of float32 with float32
            with torch.backends.cudnn.flags(enabled=True, allow_tf32=False):
                ours = tower(crops.cuda(), grids).float().cpu()
        rel = 1e-4 if dtype == torch.float32 else 3e-2
        assert ours.shape == ref.shape
        assert float((ours - ref).norm() / ref.norm()) < rel


# ---- Gemma 3 (sliding-window layers, bidirectional image spans) ----------------------------------------------------


@pytest.mark.parametrize("backend", ["torch_native", "triton"])
@pytest.mark.parametrize("graphs", [False, True])
@pytest.mark.parametrize("case", ["long_text", "two_images"])
def test_gemma3_cuda_float32_engine_equals_hf_cpu(backend, graphs, case):
    """Float32 on the GPU (decode graphs and piecewise prompt graphs when on; chunks of 20 that the scheduler
    moves to image edges) against HF generate on the CPU."""
    from mirador.default_model import default_model_dir
    from mirador.engine import Engine
    from tests.test_gemma3 import LONG, MAX_TOKENS, Gemma3Reference
    from tests.test_parity_cluster import case_messages

    model_dir = default_model_dir(family="gemma3")
    hf = Gemma3Reference(model_dir)
    if case == "long_text":
        ours = ref_msgs = [{"role": "user", "content": LONG}]
        images = []
    else:
        ours, ref_msgs, images = case_messages(case)
    _, out_ref = hf.generate(ref_msgs, images, MAX_TOKENS)
    with Engine(
        str(model_dir),
        page_size=4,
        chunked_prefill_size=20,
        attention_backend=backend,
        device="cuda",
        dtype="float32",
        disable_cuda_graph=not graphs or backend == "torch_native",
        mem_fraction_static=0.3,
    ) as engine:
        out = engine.chat(ours, sampling_params={"temperature": 0, "max_new_tokens": MAX_TOKENS})
    assert out["output_ids"] == out_ref


@pytest.mark.parametrize(
    ("dtype", "backend"),
    [
        (torch.float32, "torch_native"),
        (torch.float32, "triton"),
        (torch.bfloat16, "varlen"),
        (torch.bfloat16, "triton"),
    ],
)
def test_gemma3_tower_on_cuda_matches_hf(dtype, backend):
    """The shared SigLIP tower (through its post-layernorm) and Gemma 3's projector on CUDA through each vision
    attention backend (each image one equal segment) against HF's get_image_features on the CPU in float32."""
    from mirador.default_model import default_model_dir
    from models.loader import load_model
    from models.registry import vision_model_class
    from processor.model_config import load_model_config
    from tests.test_gemma3 import Gemma3Reference

    model_dir = default_model_dir(family="gemma3")
    hf = Gemma3Reference(model_dir)
    cfg = load_model_config(model_dir)
    tower = load_model(vision_model_class(cfg.architecture), cfg, model_dir, dtype, torch.device("cuda"))
    tower.set_attention_backend(backend)
    pixels = hf.image_processor(images=_images(), return_tensors="pt")["pixel_values"]
    with torch.no_grad():
        want = hf.model.model.get_image_features(pixel_values=pixels).pooler_output
        got = tower(pixels.cuda(), [(1, 8, 8)] * 2).float().cpu()
    want = want.reshape(-1, want.shape[-1])
    assert float((got - want).norm() / want.norm()) < (1e-4 if dtype == torch.float32 else 3e-2)


# ---- Llama 3.2 Vision (mllama): model code and the worker's runner (tests/test_mllama.py's tiny model) ---------


@pytest.fixture(scope="module")
def mllama_tiny(tmp_path_factory):
    from tests import test_mllama as tm

    d = tmp_path_factory.mktemp("mllama_gpu")
    tm._hf_model(tm.TINY_CONFIG).save_pretrained(d)
    import json

    from processor.models.mllama_tokenizer import build_mllama_tokenizer

    (d / "preprocessor_config.json").write_text(json.dumps(tm.PREPROCESSOR))
    build_mllama_tokenizer(d)
    return d


@pytest.mark.parametrize("case", ["text_only", "one_image_2x2_tiles", "two_images"])
def test_mllama_cuda_float32_greedy_equals_hf_cpu(case, mllama_tiny):
    from transformers import MllamaForConditionalGeneration

    from models.loader import load_model
    from models.mllama import MllamaForCausalLM
    from models.mllama_vision import MllamaVisionModel
    from processor.model_config import load_model_config
    from tests import test_mllama as tm

    hf = MllamaForConditionalGeneration.from_pretrained(mllama_tiny).eval()
    messages, sizes = tm.CASES[case]
    images = [noise_image(w, h, seed=i) for i, (w, h) in enumerate(sizes)]
    ids = tm._prompt(mllama_tiny, messages)
    cfg = load_model_config(mllama_tiny)
    cuda = torch.device("cuda")
    lm = load_model(MllamaForCausalLM, cfg, mllama_tiny, torch.float32, cuda)
    vm = load_model(MllamaVisionModel, cfg, mllama_tiny, torch.float32, cuda)
    with torch.no_grad():
        want = tm._hf_generate(hf, ids, images, 12)
        got = tm._our_generate(lm, vm, ids, images, 12, mllama_tiny)
    assert got == want


@pytest.mark.parametrize("size", [(30, 70), (60, 60)])
def test_mllama_tower_on_cuda_matches_hf(size, mllama_tiny):
    from transformers import MllamaForConditionalGeneration

    from models.loader import load_model
    from models.mllama_vision import MllamaVisionModel
    from processor.model_config import load_model_config
    from tests import test_mllama as tm

    hf = MllamaForConditionalGeneration.from_pretrained(mllama_tiny).eval()
    out = tm._image_processor()([[noise_image(*size)]], return_tensors="pt")
    vm = load_model(
        MllamaVisionModel, load_model_config(mllama_tiny), mllama_tiny, torch.float32, torch.device("cuda")
    )
    with torch.no_grad():
        ref = hf.model.vision_model(
            pixel_values=out["pixel_values"],
            aspect_ratio_ids=out["aspect_ratio_ids"],
            aspect_ratio_mask=out["aspect_ratio_mask"],
        ).last_hidden_state
        ref = hf.model.multi_modal_projector(ref).reshape(1, -1, hf.config.text_config.hidden_size)
        got = vm.encode_tiles(
            out["pixel_values"][0].cuda(),
            out["aspect_ratio_ids"][0].cuda(),
            torch.tensor(out["num_tiles"][0]).cuda(),
        )
    torch.testing.assert_close(got.cpu(), ref, atol=1e-4, rtol=1e-4)


@pytest.fixture(scope="module")
def mllama_weights(tmp_path_factory):
    """tests/test_mllama.py's tiny model without a tokenizer (the runner and the tower need none)."""
    import json

    from tests import test_mllama as tm

    d = tmp_path_factory.mktemp("mllama_runner_gpu")
    torch.manual_seed(0)
    tm._hf_model(tm.TINY_CONFIG).save_pretrained(d)
    (d / "preprocessor_config.json").write_text(json.dumps(tm.PREPROCESSOR))
    return d


# chat prompts in the Llama 3 vocabulary (<|image|> = 128256): text only, one image, two images
_HEAD, _TAIL = [128000, 128006, 882, 128007, 271], [128009, 128006, 78191, 128007, 271]
MLLAMA_PROMPTS = [
    (_HEAD + [46864, 2555, 922, 326, 81101, 13] + _TAIL, []),
    (_HEAD + [128256, 75885, 279, 2217, 13] + _TAIL, [(30, 70)]),
    (_HEAD + [128256, 438, 128256, 9616, 1124] + _TAIL, [(30, 70), (60, 28)]),
]


@pytest.mark.parametrize("chunk", [5, 10_000])
def test_mllama_runner_cuda_batch_equals_hf_cpu(chunk, mllama_weights):
    """The worker's runner on the GPU (encoder cache filled from the tower's states, eager steps: no CUDA graphs
    for this family yet), three prompts in one batch sharing an image's encoder page, against HF on the CPU."""
    from transformers import MllamaForConditionalGeneration

    from tests import test_mllama as tm
    from tests.test_mllama_cluster import runner_generate

    hf = MllamaForConditionalGeneration.from_pretrained(mllama_weights).eval()
    prompts, want = [], []
    for ids, sizes in MLLAMA_PROMPTS:
        images = [noise_image(w, h, seed=i) for i, (w, h) in enumerate(sizes)]
        prompts.append((ids, images))
        with torch.no_grad():
            want.append(tm._hf_generate(hf, ids, images, 10))
    got = runner_generate(mllama_weights, prompts, 10, "cuda", "float32", chunk)
    assert got == want


def test_mllama_runner_sizes_its_encoder_cache_from_gpu_memory(mllama_weights):
    """Without --max-total-tokens the encoder cache takes --encoder-cache-fraction of the KV memory the profile
    leaves, the KV pages the rest; GetInfo reports both; the warm-up runs."""
    from worker_svc import memory
    from worker_svc.model_runner import ModelRunner, RunnerConfig

    runner = ModelRunner(
        RunnerConfig(
            str(mllama_weights), "bfloat16", "cuda", mem_fraction_static=0.3, max_running_requests=8
        ),
        None,
    )
    runner.warmup()  # the serving warm-up, the encoder page's write and read included
    info = runner.info()
    enc_bytes = runner.model.encoder_bytes_per_page(torch.bfloat16) * info.num_encoder_pages
    assert info.encoder_page_tokens == 4 * 5 and info.num_encoder_pages > 2
    share = enc_bytes / (enc_bytes + info.kv_cache_bytes)
    # the default fraction (0.15) of the KV memory; more of the total where the tiny model's KV pages hit their
    # cap (memory.MAX_PAGES), which the encoder pages also respect
    assert share > 0.1 and info.num_encoder_pages <= memory.MAX_PAGES + 1, share
