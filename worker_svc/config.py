"""WorkerArgs: the worker service's flags."""

from __future__ import annotations

from dataclasses import dataclass

from common.args import ObservabilityArgs, ProcessArgs, arg
from common.security import InternalAuthArgs
from models.registry import LOAD_FORMATS
from worker_svc.attention import ATTENTION_BACKENDS


@dataclass(frozen=True)
class WorkerArgs(InternalAuthArgs, ObservabilityArgs, ProcessArgs):
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
    max_encoder_images: int | None = arg(
        None,
        "encoder-cache capacity in images, for families whose language model cross-attends to image states "
        "(Llama 3.2 Vision): each holds every cross layer's K/V of one image's tiles (default: on GPU "
        "--encoder-cache-fraction of the KV memory, on CPU 16)",
    )
    encoder_cache_fraction: float = arg(
        0.15, "share of the KV memory given to the encoder cache when --max-encoder-images is not set (GPU)"
    )
    mem_fraction_static: float = arg(
        0.85, "GPU memory fraction for weights plus KV cache (activations and CUDA graphs live outside it)"
    )
    load_format: str = arg(
        "auto",
        "auto/safetensors: the checkpoint's weights; dummy: random weights from config.json alone (for "
        "benchmarks without a checkpoint, like SGLang's flag)",
        choices=LOAD_FORMATS,
    )
    attention_backend: str = arg(
        "auto",
        "attention kernels: auto (the fastest installed: triton, then flashinfer, on a GPU; torch_native on the "
        "CPU), triton, flashinfer (pip install mirador[gpu]) or torch_native (the reference)",
        choices=("auto", *ATTENTION_BACKENDS),
    )
    max_running_requests: int | None = arg(
        None, "max sequences in the running batch (default: 256 on GPU, 64 on CPU)"
    )
    max_prefill_tokens: int = arg(16384, "max prompt tokens of all sequences in one step")
    disable_cuda_graph: bool = arg(
        False, "run decode steps kernel by kernel instead of replaying CUDA graphs"
    )
    cuda_graph_max_bs: int | None = arg(
        None, "largest decode batch captured as a CUDA graph (default: --max-running-requests)"
    )
    piecewise_cuda_graph_max_tokens: int = arg(
        2048,
        "prompt steps of up to this many tokens replay CUDA graphs split at attention (attention runs between "
        "the pieces) instead of launching every kernel from Python; 0 turns them off",
    )
    vision_mem_fraction: float = arg(
        0.08,
        "GPU memory fraction the vision service may use (weights, activations, embedding cache) when it shares "
        "the worker's GPU; the worker leaves it free. 0 when vision runs on another device",
    )
    embedding_transport: str = arg(
        "auto",
        "how image embeddings come from the vision service: auto (map its embedding pool when it is on this "
        "host: CUDA IPC or shared memory, one copy per image; else gRPC bytes), grpc (always bytes)",
        choices=("auto", "grpc"),
    )
    embedding_buffer_mb: int = arg(
        256, "image embeddings kept on the worker's device after the sequences using them moved on, MiB"
    )
    step_socket: str = arg(
        "auto",
        "also serve the step stream on this Unix socket, which a scheduler on this host uses instead of gRPC "
        "(fewer thread wake-ups per step): auto (a fresh path in a 0700 directory of this user's, "
        "$XDG_RUNTIME_DIR/mirador or <tmp>/mirador-<uid>), a path (its directory must be 0700), or none (gRPC only)",
    )
    connect_timeout_s: float = arg(900.0, "how long to wait for the vision service to become ready")
    random_seed: int | None = arg(None, "seed of the sampler's generator for unseeded requests")
    graceful_shutdown_timeout: float = arg(
        30.0,
        "on SIGTERM: health NOT_SERVING (the scheduler then sends no new requests here), then up to this many "
        "seconds for the sequences running here to finish before the process exits",
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
        self.check_internal_auth(self.host, "the worker")
        if self.page_size < 1:
            raise ValueError("--page-size must be >= 1")
        if self.max_total_tokens is not None and self.max_total_tokens < self.page_size:
            raise ValueError("--max-total-tokens must hold at least one page")
        if self.max_encoder_images is not None and self.max_encoder_images < 1:
            raise ValueError("--max-encoder-images must be >= 1")
        if not 0.0 < self.encoder_cache_fraction < 1.0:
            raise ValueError("--encoder-cache-fraction must be in (0, 1)")
        if not 0.0 < self.mem_fraction_static < 1.0:
            raise ValueError("--mem-fraction-static must be in (0, 1)")
        if not 0.0 <= self.vision_mem_fraction < 1.0 - self.mem_fraction_static:
            raise ValueError("--vision-mem-fraction must be in [0, 1 - --mem-fraction-static)")
        if self.max_running_requests is not None and self.max_running_requests < 1:
            raise ValueError("--max-running-requests must be >= 1")
        if self.cuda_graph_max_bs is not None and self.cuda_graph_max_bs < 1:
            raise ValueError("--cuda-graph-max-bs must be >= 1")
        if self.piecewise_cuda_graph_max_tokens < 0:
            raise ValueError("--piecewise-cuda-graph-max-tokens must be >= 0 (0 turns the graphs off)")
