"""The hf backend: the bench workload through Hugging Face transformers `generate` in this process, one request
at a time or in left-padded batches, timed per step from a logits processor (after a CUDA synchronize).

A batch's clock starts when its inputs start being built (chat template, image preprocessing), as the cluster's
starts when a request is sent; each request of the batch is done at the step that produces its last token.
Prompts are the cluster's: token ids as sent, and chat requests through the gateway's RequestBuilder (chat
template via our tokenizer, <|image_pad|> expanded per image grid) with pixels from transformers' PIL processor.
"""

from __future__ import annotations

import asyncio
import base64
import io
import time
from pathlib import Path
from typing import Any

from PIL import Image

from mirador.bench.args import BenchArgs
from mirador.bench.progress import Progress
from mirador.bench.report import RequestResult
from mirador.bench.workload import BenchRequest


def resolve_device_dtype(device: str, dtype: str) -> tuple[str, str]:
    import torch

    if device == "auto":
        device = "cuda" if torch.cuda.is_available() else "cpu"
    if dtype == "auto":
        dtype = "float32" if device == "cpu" else "bfloat16"
    return device, dtype


def load_model(model_path: Path, device: str, dtype: str) -> tuple[Any, bool]:
    """(model, random_weights): the checkpoint when the directory has safetensors, else random weights built
    from config.json directly on the device in the dtype (a 7B model is never materialised on the CPU)."""
    import torch
    import transformers
    from transformers import AutoConfig

    from processor.model_config import load_model_config

    torch_dtype = getattr(torch, dtype)
    # the class config.json names (Qwen2_5_VLForConditionalGeneration, Qwen2VLForConditionalGeneration, ...)
    model_cls = getattr(transformers, load_model_config(model_path).architecture)
    if any(model_path.glob("*.safetensors")):
        try:  # straight onto the device; older transformers need accelerate for a device_map
            model = model_cls.from_pretrained(str(model_path), dtype=torch_dtype, device_map=device)
        except (ImportError, ValueError):
            model = model_cls.from_pretrained(str(model_path), dtype=torch_dtype)
        return model.to(device).eval(), False
    config = AutoConfig.from_pretrained(str(model_path))
    with torch.device(device):
        model = model_cls._from_config(config, dtype=torch_dtype)
    return model.eval(), True


class StepClock:
    """A logits processor that stamps the time each step's logits are ready (one call per generated token)."""

    def __init__(self, sync: bool):
        import torch

        self._sync = torch.cuda.synchronize if sync else (lambda: None)
        self.times: list[float] = []

    def __call__(self, input_ids, scores):
        self._sync()
        self.times.append(time.perf_counter())
        return scores


class InputBuilder:
    """Model inputs for bench requests: the cluster's token ids and transformers' pixel values."""

    def __init__(self, model_path: Path, device: str, dtype: str):
        import torch
        from transformers.models.qwen2_vl.image_processing_pil_qwen2_vl import Qwen2VLImageProcessorPil

        from processor.request_builder import RequestBuilder

        self.torch, self.device, self.dtype = torch, device, getattr(torch, dtype)
        self.builder = RequestBuilder(model_path)
        self.image_processor = Qwen2VLImageProcessorPil.from_pretrained(str(model_path))
        self.image_token_id = self.builder.image_token_id
        self.pad_id = self.builder.tokenizer.hf.pad_token_id
        if self.pad_id is None:
            self.pad_id = self.builder.tokenizer.eos_token_id
        self._loop = asyncio.new_event_loop()

    def close(self) -> None:
        self._loop.run_until_complete(self.builder.aclose())
        self._loop.close()

    def one(self, req: BenchRequest) -> tuple[list[int], Any, Any]:
        """(input ids, pixel values or None, image grids or None)."""
        if not req.image_urls:
            return req.prompt_ids, None, None
        prompt = self._loop.run_until_complete(self.builder.from_messages(req.messages()))
        images = [_decode(u) for u in req.image_urls]
        feats = self.image_processor(images=images, return_tensors="pt")
        grids = [tuple(g.tolist()) for g in feats["image_grid_thw"]]
        ours = [tuple(m.grid_thw) for m in prompt.mm_items]
        if grids != ours:
            raise RuntimeError(f"image grids differ: transformers {grids}, ours {ours}")
        return prompt.input_ids, feats["pixel_values"], feats["image_grid_thw"]

    def batch(self, reqs: list[BenchRequest]) -> tuple[dict[str, Any], list[int]]:
        """Left-padded model inputs for a batch, and each request's prompt length."""
        torch = self.torch
        built = [self.one(r) for r in reqs]
        width = max(len(ids) for ids, _, _ in built)
        input_ids = torch.full((len(reqs), width), self.pad_id, dtype=torch.long)
        mask = torch.zeros((len(reqs), width), dtype=torch.long)
        for row, (ids, _, _) in enumerate(built):
            input_ids[row, width - len(ids) :] = torch.tensor(ids)
            mask[row, width - len(ids) :] = 1
        inputs: dict[str, Any] = {
            "input_ids": input_ids,
            "attention_mask": mask,
            "mm_token_type_ids": ((input_ids == self.image_token_id) & mask.bool()).int(),
        }
        pixels = [p for _, p, _ in built if p is not None]
        if pixels:
            inputs["pixel_values"] = torch.cat(pixels).to(self.dtype)
            inputs["image_grid_thw"] = torch.cat([g for _, _, g in built if g is not None])
        return {k: v.to(self.device) for k, v in inputs.items()}, [len(ids) for ids, _, _ in built]


def run_hf(
    args: BenchArgs, requests: list[BenchRequest], warmup: list[BenchRequest]
) -> tuple[list[RequestResult], float, dict[str, Any]]:
    """Returns the timed requests' results, the timed run's duration, and what ran them."""
    import torch
    import transformers

    device, dtype = resolve_device_dtype(args.device, args.dtype)
    model_path = Path(args.model_path)
    torch.manual_seed(args.seed)
    model, random_weights = load_model(model_path, device, dtype)
    inputs = InputBuilder(model_path, device, dtype)
    info = {
        "device": device,
        "device_name": torch.cuda.get_device_name(device) if device.startswith("cuda") else "cpu",
        "dtype": dtype,
        "batch_size": args.hf_batch_size,
        "random_weights": random_weights,
        "attn_implementation": model.config._attn_implementation,
        "torch_version": torch.__version__,
        "transformers_version": transformers.__version__,
    }
    batch = args.hf_batch_size
    try:
        for k in range(0, len(warmup), batch):
            _run_batch(model, inputs, warmup[k : k + batch], 0.0, device)
        progress = Progress(len(requests), "requests", disabled=args.disable_progress)
        _sync(device)
        t0 = time.perf_counter()
        results = []
        for k in range(0, len(requests), batch):
            results += _run_batch(model, inputs, requests[k : k + batch], t0, device)
            progress.update(len(requests[k : k + batch]))
        duration = time.perf_counter() - t0
        progress.close()
    finally:
        inputs.close()
    return results, duration, info


def _run_batch(
    model, inputs: InputBuilder, reqs: list[BenchRequest], t0: float, device: str
) -> list[RequestResult]:
    import torch
    from transformers import GenerationConfig, LogitsProcessorList

    results = [RequestResult(r.index, len(r.image_urls), r.output_len) for r in reqs]
    _sync(device)
    start = time.perf_counter()
    try:
        batch, prompt_lens = inputs.batch(reqs)
        steps = max(r.output_len for r in reqs)
        clock = StepClock(sync=device.startswith("cuda"))
        config = GenerationConfig(
            max_new_tokens=steps,
            min_new_tokens=steps,
            do_sample=False,
            pad_token_id=inputs.pad_id,
            eos_token_id=model.generation_config.eos_token_id,
        )
        with torch.inference_mode():
            out = model.generate(
                **batch, generation_config=config, logits_processor=LogitsProcessorList([clock])
            )
        generated = out.shape[1] - batch["input_ids"].shape[1]
        if len(clock.times) != steps or generated != steps:
            raise RuntimeError(f"generate made {generated} tokens in {len(clock.times)} steps, asked {steps}")
    except Exception as e:  # noqa: BLE001 - e.g. out of memory: the batch fails, the run goes on
        for r in results:
            r.start_s, r.error = start - t0, f"{type(e).__name__}: {e}"
        return results
    for r, n_in in zip(results, prompt_lens, strict=True):
        times = clock.times[: r.expected_output_tokens]
        r.start_s = start - t0
        r.ttft_s = times[0] - start
        r.e2e_s = times[-1] - start
        r.itls_s = [b - a for a, b in zip(times, times[1:])]  # noqa: B905 - one shorter by construction
        r.input_tokens, r.output_tokens, r.num_chunks = n_in, len(times), len(times)
        r.success = True
    return results


def _sync(device: str) -> None:
    import torch

    if device.startswith("cuda"):
        torch.cuda.synchronize(device)


def _decode(data_uri: str) -> Image.Image:
    payload = data_uri.partition(",")[2]
    return Image.open(io.BytesIO(base64.b64decode(payload))).convert("RGB")
