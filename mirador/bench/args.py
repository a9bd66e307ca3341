"""BenchArgs: every flag of `mirador bench` (SGLang's bench_serving names where the concept exists)."""

from __future__ import annotations

import json
import math
import os
from dataclasses import dataclass

from common.args import ArgsBase, arg


@dataclass(frozen=True)
class BenchArgs(ArgsBase):
    backend: str = arg(
        "mirador",
        "mirador: drive the OpenAI-compatible server at --base-url with streaming requests (any server that "
        "takes token-id prompts and ignore_eos works, SGLang's and vLLM's too); hf: run the same workload "
        "through Hugging Face transformers in this process on --model-path",
        choices=("mirador", "hf"),
    )
    base_url: str = arg("http://127.0.0.1:8000", "the gateway's address (mirador backend)")
    model: str = arg("", "served model name to send (default: the first id of GET /v1/models)")
    tokenizer: str = arg(
        "",
        "model directory whose tokenizer builds the prompts (default: --model-path, else the served model's "
        "directory from GET /v1/models when it exists on this machine, else the embedded default model's, "
        "which is the Qwen2.5-VL tokenizer)",
    )
    model_path: str = arg(
        "",
        "hf backend: model directory (config.json, tokenizer, preprocessor); without *.safetensors the model "
        "is built from config.json with random weights, directly on --device in --dtype",
    )
    dataset: str = arg(
        "random",
        "random: uniformly random token ids; sharegpt-like: synthetic conversational English generated "
        "offline. Both have exact lengths from --random-input-len / --random-output-len. "
        "generated-shared-prefix (SGLang's): each prompt is one of --gsp-num-groups shared system prompts of "
        "--gsp-system-prompt-len random tokens, then --random-input-len tokens of its own; groups interleave",
        choices=("random", "sharegpt-like", "generated-shared-prefix"),
    )
    gsp_num_groups: int = arg(16, "generated-shared-prefix: number of distinct shared system prompts")
    gsp_system_prompt_len: int = arg(1024, "generated-shared-prefix: tokens of each shared system prompt")
    num_prompts: int = arg(1000, "number of timed requests")
    random_input_len: int = arg(
        1024, "prompt tokens per request (the text part of image requests; image tokens come on top)"
    )
    random_output_len: int = arg(
        1024, "generated tokens per request (exact: ignore_eos, min_tokens = max_tokens)"
    )
    random_range_ratio: float = arg(
        1.0,
        "lengths are drawn uniformly from [len * ratio, len], as SGLang does; 1.0 (our default, SGLang's is "
        "0.0) keeps every length exact",
    )
    num_images: int = arg(0, "synthetic images per image request, sent to /v1/chat/completions")
    image_size: str = arg("512x512", "width x height of each synthetic image, e.g. 1024x768")
    image_format: str = arg("jpeg", "encoding of the synthetic images (data URIs)", choices=("jpeg", "png"))
    image_ratio: float = arg(
        1.0,
        "fraction of the requests that carry --num-images images (spread evenly); the others are text-only",
    )
    same_image: bool = arg(
        False, "every request sends the same image(s) (exercises the vision and prefix caches)"
    )
    max_concurrency: int | None = arg(
        None, "most requests in flight at once (default: no limit); a request's clock starts when it is sent"
    )
    request_rate: float = arg(
        math.inf, "requests per second, Poisson arrivals; inf sends them all at once (bounded by concurrency)"
    )
    num_client_processes: int = arg(
        0,
        "client processes that share the requests, each with its share of --max-concurrency and "
        "--request-rate (one Python process reads roughly 5,000 streamed chunks a second and would cap the "
        "figures above that); 0: one per 32 concurrent streams, at most one per CPU core",
    )
    warmup_requests: int = arg(
        1,
        "requests of the same shape run first and left out of the figures (hf backend: give the batch size "
        "to warm the batched shapes)",
    )
    seed: int = arg(1, "seed of the prompts, lengths, images and arrival times")
    extra_request_body: str = arg(
        "",
        "JSON merged into every request body, e.g. '{\"temperature\": 0.7}' (mirador backend; default greedy)",
    )
    timeout_s: float = arg(3600.0, "per-request timeout, seconds")
    disable_progress: bool = arg(False, "no progress bar")
    output_json: str = arg("", "write the report (every figure, the configuration, server_info) here")
    output_details: bool = arg(False, "also put each request's inter-token latencies in the JSON")
    plot: str = arg(
        "", "write a PNG here: TTFT and ITL distributions and per-request timelines (needs matplotlib)"
    )
    hf_batch_size: int = arg(
        1,
        "hf backend: requests per generate call (1: one at a time; B: batched, left padding); "
        "--max-concurrency and --request-rate do not apply, each batch's clock starts when it does",
    )
    device: str = arg("auto", "hf backend: torch device (auto: cuda if available, else cpu)")
    dtype: str = arg(
        "auto",
        "hf backend: weights and activations (auto: bfloat16 on a GPU, float32 on a CPU)",
        choices=("auto", "bfloat16", "float16", "float32"),
    )

    def __post_init__(self):
        positive = {
            "--num-prompts": self.num_prompts,
            "--random-input-len": self.random_input_len,
            "--random-output-len": self.random_output_len,
            "--hf-batch-size": self.hf_batch_size,
            "--timeout-s": self.timeout_s,
        }
        for flag, value in positive.items():
            if value <= 0:
                raise ValueError(f"{flag} must be > 0, got {value}")
        if self.num_client_processes < 0:
            raise ValueError("--num-client-processes must be >= 0 (0: auto)")
        if self.num_images < 0 or self.warmup_requests < 0:
            raise ValueError("--num-images and --warmup-requests must be >= 0")
        if not 0 <= self.random_range_ratio <= 1:
            raise ValueError("--random-range-ratio must be in [0, 1]")
        if not 0 <= self.image_ratio <= 1:
            raise ValueError("--image-ratio must be in [0, 1]")
        if self.max_concurrency is not None and self.max_concurrency <= 0:
            raise ValueError("--max-concurrency must be > 0")
        if not self.request_rate > 0:
            raise ValueError("--request-rate must be > 0 (inf: all at once)")
        self.image_wh  # noqa: B018 - validates --image-size
        if self.extra_request_body:
            try:
                extra = json.loads(self.extra_request_body)
            except json.JSONDecodeError as e:
                raise ValueError(f"--extra-request-body is not JSON: {e}") from None
            if not isinstance(extra, dict):
                raise ValueError("--extra-request-body must be a JSON object")
        if self.backend == "hf" and not self.model_path:
            raise ValueError("--backend hf needs --model-path")

    STREAMS_PER_CLIENT_PROCESS = 32

    @property
    def client_processes(self) -> int:
        """Client processes to run: --num-client-processes, or one per 32 concurrent streams (one with no
        concurrency limit), at most one per CPU core; never more than the timed requests."""
        n = self.num_client_processes
        if n == 0:
            cores = os.cpu_count() or 1
            n = (
                1
                if self.max_concurrency is None
                else -(-self.max_concurrency // self.STREAMS_PER_CLIENT_PROCESS)
            )
            n = min(n, cores)
        if self.max_concurrency is not None:
            n = min(n, self.max_concurrency)
        return max(1, min(n, self.num_prompts))

    @property
    def image_wh(self) -> tuple[int, int]:
        try:
            w, h = (int(v) for v in self.image_size.lower().split("x"))
        except ValueError:
            raise ValueError(f"--image-size must be WIDTHxHEIGHT, got {self.image_size!r}") from None
        if w <= 0 or h <= 0:
            raise ValueError(f"--image-size must be positive, got {self.image_size!r}")
        return w, h
