"""SchedulerArgs: the scheduler service's flags (SGLang's names where the concept exists)."""

from __future__ import annotations

from dataclasses import dataclass

from common.args import ObservabilityArgs, ProcessArgs, arg
from common.security import InternalAuthArgs


@dataclass(frozen=True)
class SchedulerArgs(InternalAuthArgs, ObservabilityArgs, ProcessArgs):
    model_path: str = arg(
        "", "Hugging Face model directory (or Hub id): tokenizer and config", aliases=("--model",)
    )
    host: str = arg("127.0.0.1", "address to listen on")
    port: int = arg(50051, "gRPC port (0 picks a free one)")
    worker_address: str = arg("127.0.0.1:50052", "host:port of the worker service")
    vision_address: str = arg("127.0.0.1:50053", "host:port of the vision service ('' for text-only models)")
    served_model_name: str = arg("", "model name clients send (default: the model path)")
    context_length: int | None = arg(None, "override the model's context length (must not exceed it)")
    max_running_requests: int | None = arg(
        None, "max sequences in the running batch (default: 256 on GPU, 64 on CPU)"
    )
    chunked_prefill_size: int | None = arg(
        None,
        "max prompt tokens of one sequence per step; -1 disables chunking "
        "(default: 8192 on GPU, 2048 on CPU)",
    )
    max_prefill_tokens: int = arg(16384, "max prompt tokens of all sequences in one step")
    disable_radix_cache: bool = arg(False, "turn the prefix cache off")
    schedule_policy: str = arg(
        "fcfs",
        "order of admission: fcfs (arrival), lpm (the longest prefix-cache match first, so requests sharing a "
        "cached prefix run while it is cached; fcfs past 128 waiting requests)",
        choices=("fcfs", "lpm"),
    )
    stream_interval: int = arg(
        1, "streamed outputs carry this many tokens at a time (fewer messages and SSE events per token)"
    )
    enable_mixed_chunk: bool | None = arg(
        None,
        "let decodes share steps with prompt chunks, so running streams keep producing tokens while prompts "
        "are computed (default: on with a GPU worker, whose piecewise graphs serve such steps; off on CPU). "
        "--no-enable-mixed-chunk: a step with prompt work runs prompts only, as SGLang's default",
    )
    max_queued_requests: int = arg(
        0,
        "most requests waiting for admission; past it new ones are refused (RESOURCE_EXHAUSTED, HTTP 429 with "
        "Retry-After) instead of queueing without bound; 0: no limit",
    )
    mixed_prefill_tokens: int | None = arg(
        None,
        "with --enable-mixed-chunk: the most prompt tokens a step takes while sequences are decoding, so each "
        "decode step stays short and admissions spread over steps; an idle batch still takes "
        "--max-prefill-tokens (default: --max-prefill-tokens)",
    )
    connect_socket: str = arg(
        "auto",
        "also serve the gateways' Connect stream on this Unix socket, which a gateway on this host uses instead of "
        "gRPC: auto (a fresh path in a 0700 directory of this user's, $XDG_RUNTIME_DIR/mirador or "
        "<tmp>/mirador-<uid>), a path (its directory must be 0700), or none (gRPC only)",
    )
    disable_overlap_schedule: bool = arg(False, "plan each step only after the previous one returned")
    decode_log_interval: int = arg(40, "log a decode batch line every N steps")
    graceful_shutdown_timeout: float = arg(
        30.0,
        "on SIGTERM: health NOT_SERVING and new requests refused (HTTP 503 with Retry-After) at once, then up to "
        "this many seconds for the requests in flight to finish before the process exits",
    )
    step_timeout_s: float = arg(600.0, "fail running requests when the worker does not answer a step in time")
    connect_timeout_s: float = arg(
        900.0, "how long to wait for the worker and vision services to become ready"
    )
    log_level: str = arg("info", "logging level")
    metrics_port: int = arg(
        0,
        "serve Prometheus metrics over plain HTTP at /metrics on this port (0: off; `mirador up` turns it on, on a "
        "free port it prints)",
    )
    metrics_host: str = arg("", "address of the metrics port (default: --host)")

    def __post_init__(self):
        if not self.model_path:
            raise ValueError("--model-path is required")
        self.check_internal_auth(self.host, "the scheduler")
        if self.max_running_requests is not None and self.max_running_requests < 1:
            raise ValueError("--max-running-requests must be >= 1")
        if self.chunked_prefill_size is not None and self.chunked_prefill_size == 0:
            raise ValueError("--chunked-prefill-size must be positive or -1")
        if self.max_prefill_tokens < 1:
            raise ValueError("--max-prefill-tokens must be >= 1")
        if self.mixed_prefill_tokens is not None and self.mixed_prefill_tokens < 1:
            raise ValueError("--mixed-prefill-tokens must be >= 1")
        if self.stream_interval < 1:
            raise ValueError("--stream-interval must be >= 1")
