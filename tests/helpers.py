"""Test helpers: a real cluster started with `mirador up`, image fixtures, and the Hugging Face reference."""

from __future__ import annotations

import base64
import io
import os
import signal
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import grpc
import httpx
import numpy as np
from PIL import Image
from prometheus_client.parser import text_string_to_metric_families

from protos import scheduler_pb2, scheduler_pb2_grpc

REPO = Path(__file__).resolve().parent.parent
SERVED = "test-model"


def free_port() -> int:
    from common.ports import free_port as pick

    return pick("127.0.0.1")


class Cluster:
    """`mirador up` in a subprocess on loopback with explicit ports, so tests can reach every service."""

    def __init__(
        self, model_dir: Path, *flags: str, log_dir: Path, name: str = "cluster", startup_s: float = 180
    ):
        self.port = free_port()
        self.scheduler_port, self.worker_port, self.vision_port = free_port(), free_port(), free_port()
        self.base_url = f"http://127.0.0.1:{self.port}"
        self.scheduler_address = f"127.0.0.1:{self.scheduler_port}"
        self.log_path = log_dir / f"{name}-{self.port}.log"
        cmd = [
            sys.executable,
            "-m",
            "mirador",
            "up",
            "--model",
            str(model_dir),
            "--port",
            str(self.port),
            "--scheduler-port",
            str(self.scheduler_port),
            "--worker-port",
            str(self.worker_port),
            "--vision-port",
            str(self.vision_port),
            "--served-model-name",
            SERVED,
            *flags,
        ]
        self._log = open(self.log_path, "wb")  # noqa: SIM115 - lives as long as the cluster
        self.proc = subprocess.Popen(
            cmd,
            stdout=self._log,
            stderr=subprocess.STDOUT,
            cwd=REPO,
            env={**os.environ, "PYTHONUNBUFFERED": "1"},
        )
        self.http = httpx.Client(base_url=self.base_url, timeout=120, trust_env=False)
        deadline = time.monotonic() + startup_s
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                raise RuntimeError(f"mirador up exited with {self.proc.returncode}:\n{self.log()[-4000:]}")
            if b"Mirador is ready" in self.log_path.read_bytes():
                break
            time.sleep(0.2)
        else:
            self.stop()
            raise TimeoutError(f"cluster not ready in {startup_s} s:\n{self.log()[-4000:]}")
        self._channel = grpc.insecure_channel(self.scheduler_address)
        self._stub = scheduler_pb2_grpc.SchedulerStub(self._channel)

    def log(self) -> str:
        return self.log_path.read_text(errors="replace")

    def metrics_urls(self) -> dict[str, str]:
        """Each service's /metrics URL, from the line `mirador up` prints when the cluster is ready."""
        line = next(ln for ln in self.log().splitlines() if "metrics (Prometheus):" in ln)
        pairs = (p.strip().split(" ", 1) for p in line.split("metrics (Prometheus):", 1)[1].split(","))
        return {name: url for name, url in pairs}

    def scrape(self, service: str) -> str:
        # the Accept header Prometheus sends: what it is answered is what it stores
        accept = "application/openmetrics-text;version=1.0.0,text/plain;version=0.0.4;q=0.5,*/*;q=0.1"
        r = httpx.get(self.metrics_urls()[service], headers={"Accept": accept}, timeout=30, trust_env=False)
        assert r.status_code == 200, r.text
        return r.text

    def stats(self) -> scheduler_pb2.SchedulerStats:
        return self._stub.GetStats(scheduler_pb2.GetStatsRequest(), timeout=10)

    def chat(self, messages: list[dict[str, Any]], **body: Any) -> httpx.Response:
        return self.http.post("/v1/chat/completions", json={"model": SERVED, "messages": messages, **body})

    def chat_ok(self, messages: list[dict[str, Any]], **body: Any) -> dict[str, Any]:
        r = self.chat(messages, **body)
        assert r.status_code == 200, r.text
        return r.json()

    def child_pids(self) -> dict[str, int]:
        """PIDs of the service processes `mirador up` started, by service name (Linux /proc)."""
        out = {}
        for entry in Path("/proc").iterdir():
            if not entry.name.isdigit():
                continue
            try:
                stat = (entry / "stat").read_text()
                ppid = int(stat.rsplit(")", 1)[1].split()[1])
                cmdline = (entry / "cmdline").read_bytes().split(b"\0")
            except (OSError, ValueError, IndexError):
                continue
            if ppid == self.proc.pid and len(cmdline) > 3 and cmdline[2] == b"mirador":
                out[cmdline[3].decode()] = int(entry.name)
        return out

    def stop(self) -> None:
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(30)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()
        self.http.close()
        if hasattr(self, "_channel"):
            self._channel.close()
        self._log.close()


def noise_image(width: int, height: int, seed: int = 0) -> Image.Image:
    rng = np.random.RandomState(seed)
    return Image.fromarray((rng.rand(height, width, 3) * 255).astype(np.uint8))


def png_bytes(img: Image.Image) -> bytes:
    buf = io.BytesIO()
    img.save(buf, format="PNG")
    return buf.getvalue()


def data_uri(data: bytes, mime: str = "image/png") -> str:
    return f"data:{mime};base64,{base64.b64encode(data).decode()}"


def image_part(img: Image.Image) -> dict[str, Any]:
    return {"type": "image_url", "image_url": {"url": data_uri(png_bytes(img))}}


def sample_photo(name: str) -> Path:
    import matplotlib

    return Path(matplotlib.get_data_path()) / "sample_data" / name


class HFReference:
    """Hugging Face transformers on the same directory (the class its config.json names): the tokenizer's chat
    template, Qwen2VLImageProcessorPil for the grids, each <|image_pad|> expanded (what Qwen2_5_VLProcessor and
    Qwen2VLProcessor do), and generate(do_sample=False)."""

    def __init__(self, model_dir: Path):
        import json

        import torch
        import transformers
        from transformers import PreTrainedTokenizerFast
        from transformers.models.qwen2_vl.image_processing_pil_qwen2_vl import Qwen2VLImageProcessorPil

        self.torch = torch
        arch = json.loads((Path(model_dir) / "config.json").read_text())["architectures"][0]
        model_cls = getattr(transformers, arch)  # e.g. Qwen2VLForConditionalGeneration
        self.model = model_cls.from_pretrained(str(model_dir), dtype=torch.float32).eval()
        self.tokenizer = PreTrainedTokenizerFast.from_pretrained(str(model_dir))
        self.image_processor = Qwen2VLImageProcessorPil.from_pretrained(str(model_dir))
        self.image_token_id = self.model.config.image_token_id

    def inputs(self, messages: list[dict[str, Any]], images: list[Image.Image]) -> dict[str, Any]:
        """messages use {"type": "image"} parts; images fill them in order."""
        text = self.tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)
        out: dict[str, Any] = {}
        if images:
            feats = self.image_processor(images=images, return_tensors="pt")
            merge = self.image_processor.merge_size
            counts = [int(g.prod()) // merge**2 for g in feats["image_grid_thw"]]
            pieces = text.split("<|image_pad|>")
            assert len(pieces) == len(counts) + 1
            text = pieces[0] + "".join(
                "<|image_pad|>" * n + p for n, p in zip(counts, pieces[1:], strict=True)
            )
            out.update(pixel_values=feats["pixel_values"], image_grid_thw=feats["image_grid_thw"])
        ids = self.tokenizer(text, add_special_tokens=False, return_tensors="pt")["input_ids"]
        out.update(
            input_ids=ids,
            attention_mask=self.torch.ones_like(ids),
            mm_token_type_ids=(ids == self.image_token_id).int(),
        )
        return out

    def generate(
        self, messages, images, max_new_tokens: int, min_new_tokens: int = 0
    ) -> tuple[list[int], list[int]]:
        inputs = self.inputs(messages, images)
        with self.torch.no_grad():
            out = self.model.generate(
                **inputs, max_new_tokens=max_new_tokens, min_new_tokens=min_new_tokens, do_sample=False
            )
        prompt = inputs["input_ids"][0].tolist()
        return prompt, out[0, len(prompt) :].tolist()

    def last_logits(self, messages, images):
        inputs = self.inputs(messages, images)
        with self.torch.no_grad():
            return self.model(**inputs).logits[0, -1].float()


class LlavaOnevisionHFReference(HFReference):
    """LlavaOnevisionForConditionalGeneration on the same directory: the tokenizer's chat template, each <image>
    expanded by LlavaOnevisionProcessor's own counting code (bound to a stand-in: the processor object wants
    torchvision for its video half), pixels from LlavaOnevisionImageProcessorPil with the prompt's images as one
    sample (so a multi-image prompt gets one square per image), and generate(do_sample=False)."""

    def __init__(self, model_dir: Path):
        import json
        import types

        import torch
        from transformers import LlavaOnevisionForConditionalGeneration, PreTrainedTokenizerFast
        from transformers.models.llava_onevision.image_processing_pil_llava_onevision import (
            LlavaOnevisionImageProcessorPil,
        )
        from transformers.models.llava_onevision.processing_llava_onevision import LlavaOnevisionProcessor

        self.torch = torch
        self.model = LlavaOnevisionForConditionalGeneration.from_pretrained(
            str(model_dir), dtype=torch.float32
        ).eval()
        self.tokenizer = PreTrainedTokenizerFast.from_pretrained(str(model_dir))
        self.image_processor = LlavaOnevisionImageProcessorPil.from_pretrained(str(model_dir))
        self.image_token_id = self.model.config.image_token_id
        cfg = json.loads((Path(model_dir) / "config.json").read_text())
        side = cfg["vision_config"]["image_size"] // cfg["vision_config"]["patch_size"]
        counter = types.SimpleNamespace(
            image_processor=self.image_processor,
            num_image_tokens=side * side,
            vision_aspect_ratio=cfg["vision_aspect_ratio"],
            vision_feature_select_strategy=cfg["vision_feature_select_strategy"],
            image_token="<image>",
        )
        for name in ("_get_unpadded_features", "_get_number_of_features", "replace_image_token"):
            setattr(counter, name, types.MethodType(getattr(LlavaOnevisionProcessor, name), counter))
        self.counter = counter

    def inputs(self, messages: list[dict[str, Any]], images: list[Image.Image]) -> dict[str, Any]:
        text = self.tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)
        out: dict[str, Any] = {}
        if images:
            feats = self.image_processor(images=[images], return_tensors="pt")
            image_inputs = {**feats, "batch_num_images": [len(images)]}
            pieces = text.split("<image>")
            assert len(pieces) == len(images) + 1
            text = pieces[0] + "".join(
                self.counter.replace_image_token(image_inputs, i) + p for i, p in enumerate(pieces[1:])
            )
            out.update(
                pixel_values=feats["pixel_values"],
                image_sizes=feats["image_sizes"],
                batch_num_images=self.torch.tensor([len(images)]),
            )
        ids = self.tokenizer(text, add_special_tokens=False, return_tensors="pt")["input_ids"]
        out.update(input_ids=ids, attention_mask=self.torch.ones_like(ids))
        return out


def runner_generate(
    model_dir: Path,
    hf: HFReference,
    messages_ref,
    images,
    max_new_tokens: int,
    device: str,
    dtype: str,
    chunk: int = 10_000,
) -> tuple[list[int], Any]:
    """Greedy tokens from our worker runner and vision encoder in process (on `device`), fed the same prompt as
    the HF reference. Returns (tokens, prefill logits of the last prompt token)."""
    import asyncio

    import torch

    from common.types import MultimodalItem, SamplingParams, SeqInit, SeqStep, StepPlan
    from processor.media import content_key
    from vision_svc.encoder import EncoderConfig, VisionEncoder
    from worker_svc.model_runner import ModelRunner, RunnerConfig

    inputs = hf.inputs(messages_ref, images)
    ids = inputs["input_ids"][0].tolist()
    encoder = VisionEncoder(EncoderConfig(str(model_dir), dtype, device))
    items, pos = [], 0
    for img in images:
        grid = encoder.spec.image_grid(*img.size, len(images))
        n = encoder.spec.num_image_tokens(grid)
        off = ids.index(hf.image_token_id, pos)
        data = png_bytes(img)
        items.append(
            MultimodalItem(content_key(data, encoder.spec.item_settings(grid)), off, n, grid, "image", data)
        )
        pos = off + n
    asyncio.run(encoder.encode(items))
    runner = ModelRunner(
        RunnerConfig(str(model_dir), dtype, device, page_size=4, max_total_tokens=4096), encoder
    )
    pages = tuple(range(1, (len(ids) + max_new_tokens + 3) // 4 + 2))
    init = SeqInit(tuple(m.without_data() for m in items), SamplingParams(temperature=0.0), len(ids))
    captured = {}
    original = runner.model.compute_logits

    def spy(hidden):
        captured.setdefault("logits", original(hidden)[0].float().cpu())
        return original(hidden)

    runner.model.compute_logits = spy
    start, out = 0, []
    while start < len(ids):
        n = min(chunk, len(ids) - start)
        done = start + n == len(ids)
        step = SeqStep(
            "s",
            start,
            tuple(ids[start : start + n]),
            done,
            0,
            pages if start == 0 else (),
            init if start == 0 else None,
        )
        res = runner.step(StepPlan(start, (step,)))
        if done:
            out.append(res.results[0].token_id)
        start += n
    while len(out) < max_new_tokens:
        res = runner.step(StepPlan(1000 + len(out), (SeqStep("s", len(ids) + len(out) - 1, (), True),)))
        out.append(res.results[0].token_id)
    del torch
    return out, captured["logits"]


def samples(text: str) -> dict[tuple[str, frozenset], float]:
    """Every sample of an exposition by (name, labels)."""
    out = {}
    for family in text_string_to_metric_families(text):
        for s in family.samples:
            out[(s.name, frozenset(s.labels.items()))] = s.value
    return out


def value(snap: dict, name: str, **labels: str) -> float:
    """The sum of the samples of `name` whose labels include `labels` (0 when there are none)."""
    want = set(labels.items())
    return sum(v for (n, lab), v in snap.items() if n == name and want <= lab)


# ---- what every family's cluster tests ask (tests/test_qwen2_vl.py, test_llava_onevision.py, test_gemma3.py) ----


def check_greedy_chat(
    cluster: Cluster, messages, prompt_ref: list[int], out_ref: list[int], case: str, max_tokens: int
):
    """A greedy chat through the cluster against HF's prompt and output ids; returns the response body."""
    body = cluster.chat_ok(messages, max_tokens=max_tokens, temperature=0, return_token_ids=True)
    choice = body["choices"][0]
    assert body["prompt_token_ids"] == prompt_ref, f"{case}: prompt tokens differ"
    assert body["usage"]["prompt_tokens"] == len(prompt_ref)
    assert choice["token_ids"] == out_ref, f"{case}: generated tokens differ"
    assert len(set(out_ref)) > 1, "a constant answer would not show a wrong image or position"
    return body


def greedy_tokens(cluster: Cluster, messages, max_tokens: int = 12) -> list[int]:
    body = cluster.chat_ok(messages, max_tokens=max_tokens, temperature=0, return_token_ids=True)
    return body["choices"][0]["token_ids"]


def mixed_image_requests(num: int) -> list[list[dict[str, Any]]]:
    """Chats in turn without an image, with one image they share, and with an image of their own."""
    shared = noise_image(84, 84, 100)
    reqs = []
    for k in range(num):
        text = {"type": "text", "text": f"Question {k}: " + "tell me more " * (k % 3 * 4 + 1)}
        image = [] if k % 3 == 0 else [image_part(shared if k % 3 == 1 else noise_image(40 + 20 * k, 70, k))]
        reqs.append([{"role": "user", "content": [*image, text]}])
    return reqs


def check_batched_equals_alone(cluster: Cluster, reqs: list[list[dict[str, Any]]]) -> None:
    from concurrent.futures import ThreadPoolExecutor

    alone = [greedy_tokens(cluster, m) for m in reqs]
    with ThreadPoolExecutor(len(reqs)) as pool:
        together = list(pool.map(lambda m: greedy_tokens(cluster, m), reqs))
    assert together == alone
