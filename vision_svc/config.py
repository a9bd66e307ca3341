"""VisionArgs: the vision service's flags."""

from __future__ import annotations

from dataclasses import dataclass

from common.args import ObservabilityArgs, ProcessArgs, arg
from common.security import InternalAuthArgs
from models.registry import LOAD_FORMATS


@dataclass(frozen=True)
class VisionArgs(InternalAuthArgs, ObservabilityArgs, ProcessArgs):
    model_path: str = arg("", "Hugging Face model directory (or Hub id)", aliases=("--model",))
    host: str = arg("127.0.0.1", "address to listen on")
    port: int = arg(50053, "gRPC port (0 picks a free one)")
    dtype: str = arg(
        "auto", "encoder dtype: auto (the checkpoint's on GPU, float32 on CPU), bfloat16, float16, float32"
    )
    device: str = arg("auto", "torch device: auto, cpu, cuda, cuda:1, ...")
    load_format: str = arg(
        "auto",
        "auto/safetensors: the checkpoint's weights; dummy: random weights from config.json alone (for "
        "benchmarks without a checkpoint, like SGLang's flag)",
        choices=LOAD_FORMATS,
    )
    vision_mem_fraction: float = arg(
        0.08,
        "GPU memory fraction the vision service may use (weights, activations, embedding cache) when it shares "
        "the worker's GPU; the worker leaves it free. 0 when vision runs on another device",
    )
    embedding_cache_mb: int = arg(
        1024, "byte budget of the embedding cache, MiB (allocated up front on the encoder's device)"
    )
    share_embeddings: bool = arg(
        True,
        "let workers on this host map the embedding cache (CUDA IPC on a GPU, shared memory on the CPU) and copy "
        "embeddings without gRPC; workers elsewhere pull bytes either way",
    )
    max_batch_patches: int = arg(
        4096,
        "patches per encoder forward: images ready while the encoder was busy join the next batch up to this "
        "many (an image with more is encoded alone). The default is the largest CUDA-graph bucket (four 448x448 "
        "images); larger batches run eager and make bursts of requests move in lockstep (64 image streams on an "
        "H100: 4.7k output tok/s at 4096 against 4.5k at 16384, BENCHMARKS.md)",
    )
    disable_fast_image_processor: bool = arg(
        False,
        "preprocess images exactly as transformers' PIL processor does, in float32 on the host, instead of the "
        "fast path (decode and resize to uint8 on the host, normalize and patchify on the vision device)",
    )
    vision_attention_backend: str = arg(
        "auto",
        "attention of the vision tower: auto (fa4 where flash-attn-4 is installed on a Hopper or newer GPU, else "
        "varlen on a GPU, else torch_native), fa4 (flash-attn-4 for whole images at head_dim 80, the Qwen towers', "
        "mirador[gpu]; the rest as varlen), varlen (flash varlen / cuDNN; windows: our Triton kernel with the rotary fused), triton (ours), "
        "torch_native (SDPA per group of equal windows; the reference)",
        choices=("auto", "fa4", "varlen", "triton", "torch_native"),
    )
    disable_cuda_graph: bool = arg(
        False,
        "run kernel by kernel instead of replaying CUDA graphs (the worker's decode steps, the vision tower's "
        "small batches)",
    )
    vision_graph_shapes: int = arg(
        4,
        "exact image-size combinations past the largest graph bucket (large photos) kept as CUDA graphs: such a "
        "batch runs eagerly when first seen and is captured at its exact shape when seen again (0: always eager; "
        "each keeps its input and output buffers, about 20 MB for a 1092x1932 photo at 7B sizes)",
    )
    preprocess_threads: int = arg(0, "threads decoding and resizing images on the host (0: half the cores)")
    graceful_shutdown_timeout: float = arg(
        30.0,
        "on SIGTERM: health NOT_SERVING (the scheduler then sends no new image requests here), then up to this "
        "many seconds for the encodes and embedding pulls in flight to end before the process exits",
    )
    log_level: str = arg("info", "logging level")
    metrics_port: int = arg(
        0,
        "serve Prometheus metrics over plain HTTP at /metrics on this port (0: off; `mirador up` turns it on, on a "
        "free port it prints)",
    )
    metrics_host: str = arg("", "address of the metrics port (default: --host)")
    served_model_name: str = arg("", "the model_name label of its metrics (default: the model path)")

    def __post_init__(self):
        if not self.model_path:
            raise ValueError("--model-path is required")
        self.check_internal_auth(self.host, "the vision service")
        if not 0.0 <= self.vision_mem_fraction < 1.0:
            raise ValueError("--vision-mem-fraction must be in [0, 1)")
        if self.vision_graph_shapes < 0:
            raise ValueError("--vision-graph-shapes must be >= 0")
        if self.embedding_cache_mb < 1:
            raise ValueError("--embedding-cache-mb must be >= 1")
