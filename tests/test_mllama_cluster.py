"""Llama 3.2 Vision (mllama) served by the whole cluster (issue 14): greedy output equal to Hugging Face
transformers' generate token for token, usage.prompt_tokens = HF's count, batched = alone, the prefix cache keyed
by the images, and the encoder cache (pages shared by image, freed with the last holder, refilled after a
preemption) under tiny KV and encoder pools."""

from __future__ import annotations

import json
from concurrent.futures import ThreadPoolExecutor

import pytest
import torch

from common.types import (
    EmbeddingLease,
    EmbeddingLocation,
    GenerateRequest,
    MultimodalItem,
    SamplingParams,
    StoppingCriteria,
)
from mirador.default_model import default_model_dir
from processor.models.mllama_tokenizer import IMAGE_TOKEN_ID
from scheduler_svc.encoder_pages import EncoderPages
from tests.helpers import (
    Cluster,
    check_batched_equals_alone,
    check_greedy_chat,
    greedy_tokens,
    image_part,
    mixed_image_requests,
    noise_image,
)
from tests.test_mllama import CASES, _hf_generate, _prompt

MAX_TOKENS = 12


@pytest.fixture(scope="module")
def mllama_model():
    """The tiny Llama 3.2 Vision (`mirador default-model --family mllama`: Hub layout, 28-pixel tiles)."""
    return default_model_dir(family="mllama")


@pytest.fixture(scope="module")
def hf(mllama_model):
    from transformers import MllamaForConditionalGeneration

    return MllamaForConditionalGeneration.from_pretrained(mllama_model).eval()


def _ours(messages, images):
    """CASES' messages ({"type": "image"} parts) with the images as data URIs, in order."""
    it = iter(images)
    out = []
    for m in messages:
        content = m["content"]
        if isinstance(content, list):
            content = [image_part(next(it)) if p["type"] == "image" else p for p in content]
        out.append({"role": m["role"], "content": content})
    return out


def _reference(mllama_model, hf, case: str, max_new: int = MAX_TOKENS):
    messages, sizes = CASES[case]
    images = [noise_image(w, h, seed=i) for i, (w, h) in enumerate(sizes)]
    ids = _prompt(mllama_model, messages)
    with torch.no_grad():
        out = _hf_generate(hf, ids, images, max_new)
    return _ours(messages, images), ids, out


@pytest.fixture(scope="module")
def cluster(mllama_model, log_dir):
    # page 4, chunks of 8: prompts (15-40 tokens) are prefilled in several chunks, the image's <|image|> inside one
    c = Cluster(
        mllama_model, "--page-size", "4", "--chunked-prefill-size", "8", log_dir=log_dir, name="mllama"
    )
    yield c
    c.stop()


@pytest.mark.slow
@pytest.mark.parametrize("case", list(CASES))
def test_cluster_greedy_equals_hf(cluster, mllama_model, hf, case):
    ours, prompt_ref, out_ref = _reference(mllama_model, hf, case)
    assert prompt_ref.count(IMAGE_TOKEN_ID) == len(CASES[case][1])
    check_greedy_chat(cluster, ours, prompt_ref, out_ref, case, MAX_TOKENS)


@pytest.mark.slow
def test_worker_reports_its_encoder_cache(cluster):
    info = cluster.http.get("/server_info").json()
    worker = json.loads(info["worker_info_json"]) if "worker_info_json" in info else info["worker_info"]
    assert worker["num_encoder_pages"] == 17  # 16 images (the CPU default) + page 0
    assert worker["encoder_page_tokens"] == 4 * (2 * 2 + 1)  # 4 tile slots of 2x2 patches + a class token
    stats = cluster.stats()
    assert stats.encoder_pages_total == 16 and stats.encoder_pages_used == 0  # nothing running


@pytest.mark.slow
def test_batched_equals_alone(cluster):
    check_batched_equals_alone(cluster, mixed_image_requests(6))


@pytest.mark.slow
def test_prefix_cache_reuses_only_with_the_same_image(cluster, mllama_model, hf):
    img, other = noise_image(50, 40, 71), noise_image(50, 40, 72)
    text = {"type": "text", "text": "What do you see in this picture? Tell me in detail, please."}
    first = cluster.chat_ok(
        [{"role": "user", "content": [image_part(img), text]}],
        max_tokens=8,
        temperature=0,
        return_token_ids=True,
    )
    again = cluster.chat_ok(
        [{"role": "user", "content": [image_part(img), text]}],
        max_tokens=8,
        temperature=0,
        return_token_ids=True,
    )
    ids = again["prompt_token_ids"]
    cached = again["usage"]["prompt_tokens_details"]["cached_tokens"]
    assert cached > ids.index(IMAGE_TOKEN_ID) + 4  # past the image
    assert again["choices"][0]["token_ids"] == first["choices"][0]["token_ids"]
    swapped = cluster.chat_ok(
        [{"role": "user", "content": [image_part(other), text]}],
        max_tokens=8,
        temperature=0,
        return_token_ids=True,
    )
    # every token's KV depends on the images (the cross layers), so another image shares no page
    assert swapped["usage"]["prompt_tokens_details"]["cached_tokens"] == 0
    ref_msgs = [{"role": "user", "content": [{"type": "image"}, {"type": "text", "text": text["text"]}]}]
    ref_ids = _prompt(mllama_model, ref_msgs)
    with torch.no_grad():
        want = _hf_generate(hf, ref_ids, [other], 8)
    assert swapped["choices"][0]["token_ids"] == want
    assert want != first["choices"][0]["token_ids"]


@pytest.mark.slow
def test_tiny_kv_and_encoder_pools_preempt_and_recompute_exactly(mllama_model, hf, log_dir):
    """Four image chats (five images) at once in 56 tokens of KV and 3 encoder pages: admissions wait for pages,
    running sequences are preempted (their encoder pages freed) and resume with their images' K/V written again;
    every output equals HF's."""
    cases = ["one_image_1x2_tiles", "one_image_2x2_tiles", "image_in_earlier_turn", "two_images"]
    refs = [_reference(mllama_model, hf, c, 16) for c in cases]
    c = Cluster(
        mllama_model,
        "--page-size",
        "4",
        "--max-total-tokens",
        "56",
        "--max-encoder-images",
        "3",
        "--chunked-prefill-size",
        "8",
        log_dir=log_dir,
        name="mllama-tiny-pools",
    )
    try:
        with ThreadPoolExecutor(len(refs)) as pool:
            got = list(pool.map(lambda r: greedy_tokens(c, r[0], 16), refs))
        stats = c.stats()
    finally:
        c.stop()
    assert got == [r[2] for r in refs]
    assert stats.num_preemptions > 0


def _request(rid: str, keys: list[str]) -> GenerateRequest:
    ids = [1, 2] + [IMAGE_TOKEN_ID if i % 2 == 0 else 5 for i in range(2 * len(keys))] + [7]
    items = tuple(MultimodalItem(k, 2 + 2 * i, 1, (1, 1, 2), "image", b"x") for i, k in enumerate(keys))
    return GenerateRequest(
        request_id=rid,
        input_ids=tuple(ids),
        mm_items=items,
        sampling=SamplingParams(temperature=0),
        stopping=StoppingCriteria(max_new_tokens=4),
    )


def test_prompt_logprobs_over_an_image_placeholder_are_a_clear_400():
    """<|image|> is past mllama's output head: no position can score it, so asking is INVALID_ARGUMENT (a 400),
    not a worker failure; scoring from after the image is fine."""
    from dataclasses import replace

    from common.errors import InvalidRequestError
    from scheduler_svc.scheduler import validate_request

    req = _request("lp", ["k0"])  # [1, 2, <|image|>, 5, 7]
    validate_request(req, IMAGE_TOKEN_ID, IMAGE_TOKEN_ID)
    with pytest.raises(InvalidRequestError, match="image placeholder"):
        validate_request(replace(req, logprob_start_len=0), IMAGE_TOKEN_ID, IMAGE_TOKEN_ID)
    validate_request(replace(req, logprob_start_len=3), IMAGE_TOKEN_ID, IMAGE_TOKEN_ID)
    # past the vocabulary only the placeholder, and only inside an image's span
    with pytest.raises(InvalidRequestError, match="input_ids must be in"):
        validate_request(
            replace(req, input_ids=(1, 2, IMAGE_TOKEN_ID + 1, 5, 7)), IMAGE_TOKEN_ID, IMAGE_TOKEN_ID
        )
    with pytest.raises(InvalidRequestError, match="input_ids must be in"):
        validate_request(
            replace(req, input_ids=(IMAGE_TOKEN_ID, 2, IMAGE_TOKEN_ID, 5, 7)), IMAGE_TOKEN_ID, IMAGE_TOKEN_ID
        )
    with pytest.raises(InvalidRequestError, match="input_ids must be in"):
        validate_request(req, IMAGE_TOKEN_ID)  # a model without that placeholder


def test_encoder_pages_are_shared_by_image_and_freed_with_the_last_holder():
    pages = EncoderPages(4)  # pages 1..3
    a = pages.acquire(["img-a", "img-b"])
    b = pages.acquire(["img-a"])
    assert a[0] == b[0] and a[0] != a[1] and 0 not in a
    assert pages.acquire(["img-c", "img-d"]) is None and pages.num_free == 1  # all or nothing
    pages.release(["img-a", "img-b"])
    assert pages.holds("img-a") and not pages.holds("img-b") and pages.num_free == 2
    pages.release(["img-a"])
    assert not pages.holds("img-a") and pages.num_free == 3


def test_scheduler_accounts_encoder_pages_and_keys_the_prefix_by_all_images():
    from scheduler_svc.scheduler import Scheduler, SchedulerPolicy
    from tests.test_scheduler_core import FakeTokenizer

    policy = SchedulerPolicy(
        page_size=4,
        num_pages=64,
        context_length=1024,
        max_running_requests=8,
        chunked_prefill_size=64,
        max_prefill_tokens=256,
        vocab_size=IMAGE_TOKEN_ID,
        image_token_id=IMAGE_TOKEN_ID,
        num_encoder_pages=3,
    )
    sched = Scheduler(policy, FakeTokenizer())
    sched.add_request(_request("r1", ["k1"]))
    sched.add_request(_request("r2", ["k1"]))
    sched.add_request(_request("r3", ["k2", "k3"]))
    assert sched.schedule() is None  # every image must be encoded first
    for rid, keys in (("r1", ["k1"]), ("r2", ["k1"]), ("r3", ["k2", "k3"])):
        sched.encode_requests.clear()
        locations = tuple(EmbeddingLocation(k, (1,), 20) for k in keys)
        sched.on_encoded(rid, keys, lease=EmbeddingLease("pool", 1, locations))  # rows ready at once
    plan = sched.schedule()
    inits = {s.seq_id: s.init for s in plan.seqs}
    # r1 and r2 share k1's page; r3 needs two more pages but one is left: it waits
    assert set(inits) == {"r1#0", "r2#0"}
    assert inits["r1#0"].encoder_page_ids == inits["r2#0"].encoder_page_ids
    assert sched.encoder_pages.num_free == 1
    sched.abort_request("r1")
    assert sched.encoder_pages.holds("k1")  # r2 still holds it
    sched.abort_request("r2")
    assert sched.encoder_pages.num_free == 2
    plan = sched.schedule()
    assert [s.init.encoder_page_ids for s in plan.seqs if s.init] and sched.encoder_pages.num_free == 0
    snap = sched.snapshot()  # GetStats and the Prometheus gauges
    assert (snap["encoder_pages_used"], snap["encoder_pages_total"]) == (2, 2)
    # the prefix key's first value depends on all the prompt's images
    k1 = sched.requests["r3"].prompt_key
    assert k1[0] != 1 and k1[1] == 2
    with pytest.raises(Exception, match="encoder cache holds 2"):
        sched.add_request(_request("r4", ["a", "b", "c"]))


# ---- the worker's runner in process (CPU here; tests/test_gpu.py runs it on a GPU) ------------------------------


def runner_generate(model_dir, prompts, max_new: int, device: str, dtype: str, chunk: int = 10_000):
    """Greedy tokens of several prompts [(input_ids, images)] run together through our vision encoder and worker
    runner in process: each image gets an encoder page (the same page for the same image), prompts are prefilled
    in chunks of `chunk` tokens in one step each, then decoded together."""
    import asyncio

    from common.types import SeqInit, SeqStep, StepPlan
    from processor.media import content_key
    from tests.helpers import png_bytes
    from vision_svc.encoder import EncoderConfig, VisionEncoder
    from worker_svc.model_runner import ModelRunner, RunnerConfig

    encoder = VisionEncoder(EncoderConfig(str(model_dir), dtype, device))
    runner = ModelRunner(
        RunnerConfig(str(model_dir), dtype, device, page_size=4, max_total_tokens=4096), encoder
    )
    enc_pages: dict[str, int] = {}
    seqs = []
    for i, (ids, images) in enumerate(prompts):
        offsets = [j for j, t in enumerate(ids) if t == IMAGE_TOKEN_ID]
        items = []
        for off, img in zip(offsets, images, strict=True):
            data = png_bytes(img)
            grid = encoder.spec.image_grid(*img.size)
            items.append(
                MultimodalItem(
                    content_key(data, encoder.spec.item_settings(grid)), off, 1, grid, "image", data
                )
            )
        if items:
            asyncio.run(encoder.encode(items))
        pages = [enc_pages.setdefault(m.content_key, len(enc_pages) + 1) for m in items]
        init = SeqInit(
            tuple(m.without_data() for m in items),
            SamplingParams(temperature=0.0),
            len(ids),
            encoder_page_ids=tuple(pages),
        )
        kv = tuple(range(1 + 40 * i, 1 + 40 * (i + 1)))
        seqs.append((f"s{i}", ids, init, kv))
    keys = list(enc_pages)
    runner.embeddings.request(keys)  # pulled before the first step, so no sequence is deferred for its images
    runner.embeddings.wait(keys, 60)
    out = {sid: [] for sid, *_ in seqs}
    step_id, start = 0, 0
    while any(start < len(ids) for _, ids, _, _ in seqs):
        steps = []
        for sid, ids, init, kv in seqs:
            if start < len(ids):
                n = min(chunk, len(ids) - start)
                first = start == 0
                steps.append(
                    SeqStep(
                        sid,
                        start,
                        tuple(ids[start : start + n]),
                        start + n == len(ids),
                        0,
                        kv if first else (),
                        init if first else None,
                    )
                )
        step_id += 1
        for r in runner.step(StepPlan(step_id, tuple(steps))).results:
            out[r.seq_id].append(r.token_id)
        start += chunk
    while any(len(v) < max_new for v in out.values()):
        steps = [
            SeqStep(sid, len(ids) + len(out[sid]) - 1, (), True)
            for sid, ids, _, _ in seqs
            if len(out[sid]) < max_new
        ]
        step_id += 1
        res = runner.step(StepPlan(step_id, tuple(steps)))
        assert not res.failures, res.failures
        for r in res.results:
            out[r.seq_id].append(r.token_id)
    return [out[sid] for sid, *_ in seqs]


@pytest.mark.parametrize("chunk", [5, 10_000])
def test_runner_batch_equals_hf(mllama_model, hf, chunk):
    """Three prompts in one batch (text only, an image, and two images of which one is the second prompt's, so
    they share its encoder page), prefilled in chunks or whole, decoded together: each equals HF's generate."""
    cases = ["text_only", "one_image_1x2_tiles", "two_images"]
    refs = []
    for case in cases:
        messages, sizes = CASES[case]
        images = [noise_image(w, h, seed=i) for i, (w, h) in enumerate(sizes)]
        ids = _prompt(mllama_model, messages)
        with torch.no_grad():
            refs.append((ids, images, _hf_generate(hf, ids, images, 10)))
    got = runner_generate(
        mllama_model, [(ids, images) for ids, images, _ in refs], 10, "cpu", "float32", chunk
    )
    assert got == [want for *_, want in refs]


def test_encoder_cache_sizing():
    from worker_svc import memory

    assert memory.encoder_num_pages(1000, 10, None, 0.15) == 15 + 1  # 15 % of the KV memory, + page 0
    assert memory.encoder_num_pages(1000, 10, 3, 0.15) == 3 + 1  # --max-encoder-images wins
    assert memory.encoder_num_pages(5, 10, None, 0.15) == 1 + 1  # at least one image
    assert memory.encoder_num_pages(1 << 40, 1, None, 0.5) == memory.MAX_PAGES + 1


@pytest.mark.parametrize("backend", ["torch_native", "triton"])
def test_in_process_engine_equals_hf(mllama_model, hf, backend):
    """The in-process engine (no HTTP, no gRPC) shares the scheduler core, so it gets the encoder pages too;
    through each attention backend (Triton by its interpreter on the CPU)."""
    from kernels._triton import triton_testable
    from mirador.engine import Engine

    if backend == "triton" and not triton_testable():
        pytest.skip("Triton cannot run here")
    ours, prompt_ref, out_ref = _reference(mllama_model, hf, "two_images", 8)
    with Engine(
        str(mllama_model), page_size=4, chunked_prefill_size=6, attention_backend=backend, device="cpu"
    ) as engine:
        out = engine.chat(ours, sampling_params={"temperature": 0, "max_new_tokens": 8})
    assert out["output_ids"] == out_ref
    assert out["meta_info"]["prompt_tokens"] == len(prompt_ref)


def test_vision_service_encodes_a_batch_of_images_as_each_alone(mllama_model):
    """The vision service's forward takes the tiles of several images (different layouts) in one batch and
    returns each image's cross-attention states as when it runs alone: every tile slot, padding included."""
    from vision_svc.encoder import EncoderConfig, VisionEncoder

    encoder = VisionEncoder(EncoderConfig(str(mllama_model), "float32", "cpu", warmup=False))
    images = [noise_image(30, 70, 1), noise_image(60, 60, 2), noise_image(90, 20, 3)]
    prepared = [encoder.preprocess(img) for img in images]
    assert len({g for _, g in prepared}) == 3  # three tile layouts
    rows = encoder.spec.num_embedding_rows((1, 1, 1))
    with torch.no_grad():
        together = encoder.forward([p for p, _ in prepared], [g for _, g in prepared])
        alone = [encoder.forward([p], [g]) for p, g in prepared]
    assert together.shape == (3 * rows, 64)
    torch.testing.assert_close(together, torch.cat(alone), atol=1e-5, rtol=1e-5)
    assert not torch.allclose(alone[0], alone[1])


def test_worker_warmup_writes_and_reads_an_encoder_page(mllama_model):
    from worker_svc.model_runner import ModelRunner, RunnerConfig

    runner = ModelRunner(
        RunnerConfig(str(mllama_model), "float32", "cpu", page_size=4, max_total_tokens=256), None
    )
    writes = []
    original = runner.model.write_encoder_cache
    runner.model.write_encoder_cache = lambda states, table: (
        writes.append(table.tolist()) or original(states, table)
    )
    runner.warmup()
    assert writes == [[1]]
    assert runner.encoder_slots == {} and not runner.seqs  # nothing of the warm-up is left for requests
