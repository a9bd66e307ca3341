"""WorkerArgs: the worker service's flags."""

from __future__ import annotations

from dataclasses import dataclass

from common.args import ArgsBase, arg


@dataclass(frozen=True)
class WorkerArgs(ArgsBase):
    model_path: str = arg("", "Hugging Face model directory (or Hub id)", aliases=("--model",))
    host: str = arg("127.0.0.1", "address to listen on")
    port: int = arg(50052, "gRPC port (0 picks a free one)")
    vision_address: str = arg("", "host:port of the vision service, where image embeddings are pulled from")
    dtype: str = arg(
        "auto", "weight dtype: auto (the checkpoint's on GPU, float32 on CPU), bfloat16, float16, float32"
    )
    device: str = arg("auto", "torch device: auto, cpu, cuda, cuda:1, ...")
    page_size: int = arg(16, "tokens per KV page")
    max_total_tokens: int | None = arg(
        None,
        "KV cache capacity in tokens (default: on GPU what "
        "--mem-fraction-static leaves, on CPU up to 64k tokens within 1/4 of RAM)",
    )
    mem_fraction_static: float = arg(0.85, "GPU memory fraction for weights plus KV cache")
    attention_backend: str = arg("torch_native", "attention backend", choices=("torch_native",))
    random_seed: int | None = arg(None, "seed of the sampler's generator for unseeded requests")
    log_level: str = arg("info", "logging level")

    def __post_init__(self):
        if not self.model_path:
            raise ValueError("--model-path is required")
        if self.page_size < 1:
            raise ValueError("--page-size must be >= 1")
        if self.max_total_tokens is not None and self.max_total_tokens < self.page_size:
            raise ValueError("--max-total-tokens must hold at least one page")
        if not 0.0 < self.mem_fraction_static < 1.0:
            raise ValueError("--mem-fraction-static must be in (0, 1)")
