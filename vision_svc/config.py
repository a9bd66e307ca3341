"""VisionArgs: the vision service's flags."""

from __future__ import annotations

from dataclasses import dataclass

from common.args import ArgsBase, arg


@dataclass(frozen=True)
class VisionArgs(ArgsBase):
    model_path: str = arg("", "Hugging Face model directory (or Hub id)", aliases=("--model",))
    host: str = arg("127.0.0.1", "address to listen on")
    port: int = arg(50053, "gRPC port (0 picks a free one)")
    dtype: str = arg(
        "auto", "encoder dtype: auto (the checkpoint's on GPU, float32 on CPU), bfloat16, float16, float32"
    )
    device: str = arg("auto", "torch device: auto, cpu, cuda, cuda:1, ...")
    embedding_cache_mb: int = arg(1024, "byte budget of the embedding LRU cache, MiB")
    max_batch_patches: int = arg(16384, "patches per encoder forward when several images arrive together")
    log_level: str = arg("info", "logging level")

    def __post_init__(self):
        if not self.model_path:
            raise ValueError("--model-path is required")
        if self.embedding_cache_mb < 1:
            raise ValueError("--embedding-cache-mb must be >= 1")
