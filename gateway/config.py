"""GatewayArgs: the gateway's flags (vLLM/SGLang names where the concept exists)."""

from __future__ import annotations

from dataclasses import dataclass

from common.args import ObservabilityArgs, ProcessArgs, arg
from common.security import InternalAuthArgs
from processor.tool_parsers import TOOL_PARSERS


@dataclass(frozen=True)
class GatewayArgs(InternalAuthArgs, ObservabilityArgs, ProcessArgs):
    model_path: str = arg(
        "",
        "Hugging Face model directory (or Hub id): tokenizer, chat template, preprocessor",
        aliases=("--model",),
    )
    host: str = arg("127.0.0.1", "HTTP address to listen on")
    port: int = arg(8000, "HTTP port")
    scheduler_address: str = arg("127.0.0.1:50051", "host:port of the scheduler service")
    vision_address: str = arg(
        "",
        "host:port of the vision service, for decode hints: a request's images start decoding there as soon as "
        "they are fetched, while the request is tokenized and scheduled ('' : no hints)",
    )
    served_model_name: str = arg("", "model name clients send (default: the model path)")
    allow_private_media_urls: bool = arg(
        False,
        "allow image URLs that resolve to loopback, private, link-local or "
        "reserved addresses (off: such URLs get HTTP 400)",
    )
    allowed_local_media_path: str = arg(
        "", "directory whose files may be used as image URLs (file:// or a path); off when empty"
    )
    media_fetch_timeout_s: float = arg(10.0, "timeout for fetching one image URL, seconds")
    max_image_bytes: int = arg(20 * 1024 * 1024, "largest image accepted, bytes (HTTP 413 above)")
    max_image_pixels: int = arg(89_478_485, "largest decoded image accepted, width x height (HTTP 413 above)")
    max_images_per_request: int = arg(32, "most images in one request")
    max_request_pixels: int = arg(
        2 * 89_478_485,
        "most pixels (width x height, from the headers) of all images of one request together, which the vision "
        "service decodes (HTTP 413 above)",
    )
    max_request_bytes: int = arg(64 * 1024 * 1024, "largest HTTP request body, bytes (HTTP 413 above)")
    request_timeout_s: float = arg(3600.0, "longest a request may run end to end, seconds")
    api_key: str = arg(
        "",
        "require 'Authorization: Bearer <key>' on every route but --open-paths (HTTP 401 in OpenAI's shape "
        "otherwise); empty: the environment's MIRADOR_API_KEY, else no key",
    )
    open_paths: list[str] = arg(["/health"], "paths served without the API key (e.g. /health /metrics)")
    graceful_shutdown_timeout: float = arg(
        30.0,
        "on SIGTERM: stop accepting connections at once, then up to this many seconds for requests in flight "
        "(streams included) to finish",
    )
    gateway_workers: int = arg(
        1,
        "HTTP worker processes; each keeps its own stream to the scheduler (request ids stay unique, aborts and "
        "disconnects work from any of them)",
    )
    tool_call_parser: str = arg(
        "",
        f"how tool calls are read from the output ({', '.join(sorted(TOOL_PARSERS))}); empty: the model family's "
        "default (qwen25 for Qwen2-VL and Qwen2.5-VL)",
    )
    skip_server_warmup: bool = arg(
        False,
        "report ready (/health 200) without first sending one request through the whole cluster (SGLang's flag); "
        "by default that request pays what the services set up lazily, so the first user does not",
    )
    log_level: str = arg("info", "logging level")
    log_requests_max_chars: int = arg(2048, "with --log-requests: characters of each body logged")
    metrics_multiproc_dir: str = arg(
        "",
        "with --gateway-workers > 1: the directory where the worker processes share their metrics (emptied at "
        "start; default: a new temporary directory per gateway)",
    )

    def __post_init__(self):
        if not self.model_path:
            raise ValueError("--model-path is required")
        if self.tool_call_parser and self.tool_call_parser not in TOOL_PARSERS:
            raise ValueError(f"--tool-call-parser must be one of {sorted(TOOL_PARSERS)}")
        if self.gateway_workers < 1:
            raise ValueError("--gateway-workers must be >= 1")
        if self.media_fetch_timeout_s <= 0:
            raise ValueError("--media-fetch-timeout-s must be > 0")
