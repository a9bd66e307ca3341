"""The FastAPI application: routes, error handlers, client-disconnect cancellation, health and info."""

from __future__ import annotations

import asyncio
import contextlib
import hmac
import json
import logging
import os
import re
import time
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from functools import partial
from pathlib import Path
from typing import Any

import grpc
from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse, Response
from grpc_health.v1 import health_pb2, health_pb2_grpc
from pydantic import ValidationError
from starlette.exceptions import HTTPException as StarletteHTTPException

from common.errors import (
    InvalidRequestError,
    MiradorError,
    NotFoundError,
    PayloadTooLargeError,
    UnavailableError,
)
from common.grpc_utils import create_channel
from common.service_main import settle_gc
from common.types import MultimodalItem
from gateway import native
from gateway.config import GatewayArgs
from gateway.errors import RETRY_AFTER_S, error_body, error_response, from_validation_error
from gateway.metrics import GatewayMetrics
from gateway.metrics import render as render_metrics
from gateway.openapi import (
    FLUSH_RESPONSES,
    HEALTH_RESPONSES,
    METRICS_RESPONSES,
    generation_responses,
    info_responses,
    install,
    model_responses,
)
from gateway.protocol import ChatCompletionRequest, CompletionRequest, GenerateBody
from gateway.request_context import RequestContext
from gateway.responses import (
    ChatCompletionChunk,
    ChatCompletionResponse,
    CompletionChunk,
    CompletionResponse,
    GenerateResponse,
    ModelEntry,
    ModelInfo,
    ModelList,
    ServerInfo,
)
from gateway.serving import ModelCard, OpenAIServing
from gateway.sse import RAW_SEND, EventStreamResponse
from processor.media import MediaPolicy
from processor.model_config import load_generation_defaults, load_generation_eos
from processor.request_builder import RequestBuilder
from processor.tool_parsers import tool_parser
from scheduler_svc.client import SchedulerClient
from vision_svc.client import VisionClient

logger = logging.getLogger(__name__)
# a first request that compiles kernels on a fresh machine takes seconds, not minutes
WARMUP_TIMEOUT_S = 300.0


class Gateway:
    """What the routes share: the scheduler client, the request builder and the model card."""

    def __init__(self, args: GatewayArgs):
        self.args = args
        policy = MediaPolicy(
            fetch_timeout_s=args.media_fetch_timeout_s,
            max_bytes=args.max_image_bytes,
            max_pixels=args.max_image_pixels,
            allow_private_urls=args.allow_private_media_urls,
            allowed_local_media_path=args.allowed_local_media_path or None,
            max_images=args.max_images_per_request,
            max_request_pixels=args.max_request_pixels,
        )
        self.builder = RequestBuilder(args.model_path, policy)
        cfg = self.builder.config
        self.card = ModelCard(
            served_name=args.served_model_name or args.model_path,
            model_path=args.model_path,
            context_length=cfg.context_length,
            eos_token_ids=load_generation_eos(args.model_path),
            generation_defaults=load_generation_defaults(args.model_path),
        )
        self.metrics = GatewayMetrics(self.card.served_name)
        self.tool_parser = tool_parser(args.tool_call_parser, cfg.model_type)
        self.scheduler: SchedulerClient | None = None
        self.vision: VisionClient | None = None  # for decode hints (--vision-address)
        self._hints: set[asyncio.Task] = set()
        self.serving: OpenAIServing | None = None
        self._synced = False
        self.warmed = args.skip_server_warmup  # /health answers 200 only once the warm-up request is done
        self._warmup: asyncio.Task | None = None

    async def start(self) -> None:
        """gRPC channels belong to the event loop that serves: create them inside it."""
        self.scheduler = SchedulerClient(self.args.scheduler_address, timeout_s=self.args.request_timeout_s)
        if self.args.vision_address and self.builder.media_spec is not None:
            self.vision = VisionClient(self.args.vision_address)
            self.builder.on_images = self._hint_vision
        self._health_channel = create_channel(self.args.scheduler_address)
        self._health = health_pb2_grpc.HealthStub(self._health_channel)
        self.serving = OpenAIServing(
            self.builder,
            self.scheduler,
            self.card,
            self.args.max_images_per_request,
            self.metrics,
            self.tool_parser,
        )
        await self.builder.warmup()
        settle_gc()
        if not self.warmed:
            self._warmup = asyncio.create_task(self._warm_up())

    async def _warm_up(self) -> None:
        """Once the scheduler serves: one request through the whole cluster (`OpenAIServing.warmup`), then ready.
        A failed warm-up is logged and the gateway serves anyway: what failed will answer users with an error of
        its own."""
        while not await self._scheduler_serving():
            await asyncio.sleep(0.25)
        t0 = time.perf_counter()
        try:
            await asyncio.wait_for(self.serving.warmup(), WARMUP_TIMEOUT_S)
            logger.info("warm-up request through the cluster: %.0f ms", (time.perf_counter() - t0) * 1e3)
        except Exception:  # noqa: BLE001 - reported, then serve
            logger.exception("the warm-up request failed; serving anyway")
        self.warmed = True

    def _hint_vision(self, items: list[MultimodalItem]) -> None:
        """A request's images are fetched: the vision service starts decoding them while the request is tokenized
        and scheduled (best effort; the encode decodes them itself when the hint did not arrive)."""
        task = self.vision.prepare(items)
        self._hints.add(task)
        task.add_done_callback(self._hints.discard)

    async def sync_with_scheduler(self) -> None:
        """Adopt the scheduler's effective limits (e.g. a --context-length override) once it answers."""
        if self._synced:
            return
        info = await self.scheduler.server_info()
        self.card.context_length = info.context_length
        self._synced = True

    async def healthy(self) -> bool:
        return self.warmed and await self._scheduler_serving()

    async def _scheduler_serving(self) -> bool:
        try:
            resp = await self._health.Check(health_pb2.HealthCheckRequest(), timeout=2)
        except grpc.aio.AioRpcError:
            return False
        return resp.status == health_pb2.HealthCheckResponse.SERVING

    async def close(self) -> None:
        if self._warmup is not None:
            self._warmup.cancel()
        await self.scheduler.close()
        if self.vision is not None:
            await self.vision.close()
        await self._health_channel.close()
        await self.builder.aclose()


async def _read_body(request: Request, limit: int) -> bytes:
    declared = request.headers.get("content-length")
    if declared and declared.isdigit() and int(declared) > limit:
        raise PayloadTooLargeError(f"request body is larger than {limit} bytes")
    raw = await request.body()
    if len(raw) > limit:
        raise PayloadTooLargeError(f"request body is larger than {limit} bytes")
    return raw


def _json_body(raw: bytes) -> dict[str, Any]:
    try:
        body = json.loads(raw)
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise InvalidRequestError(f"request body is not valid JSON: {e}") from None
    except RecursionError:
        raise InvalidRequestError("request body nests too deeply") from None
    if not isinstance(body, dict):
        raise InvalidRequestError("request body must be a JSON object")
    if _SURROGATE_ESCAPE.search(raw):  # JSON may spell lone UTF-16 surrogates, which no UTF-8 text can hold
        try:
            _refuse_lone_surrogates(body, "")
        except RecursionError:
            raise InvalidRequestError("request body nests too deeply") from None
    return body


def _validated_from_bytes(model_cls, raw: bytes):
    """The request model straight from the body's bytes (pydantic's own JSON parser: 0.05 ms for a 240 KB image
    request where json.loads alone takes 0.4 ms), or None when the general path must run: anything the parser or
    the model refuses, lone-surrogate escapes included (the parser rejects them), gets its exact 400 there."""
    try:
        return model_cls.model_validate_json(raw)
    except ValueError:  # ValidationError included
        return None


_SURROGATE_ESCAPE = re.compile(rb"\\u[dD][89a-fA-F]")


def _refuse_lone_surrogates(value: Any, path: str) -> None:
    """A 400 naming the first string (key or value) that holds a lone surrogate; pairs decode to characters."""
    if isinstance(value, str):
        try:
            value.encode("utf-8")
        except UnicodeEncodeError:
            raise InvalidRequestError(
                "text must be valid Unicode: a lone UTF-16 surrogate escape is not a character",
                param=path or None,
            ) from None
    elif isinstance(value, dict):
        for k, v in value.items():
            _refuse_lone_surrogates(k, path)
            _refuse_lone_surrogates(v, f"{path}.{k}" if path else str(k))
    elif isinstance(value, list):
        for i, v in enumerate(value):
            _refuse_lone_surrogates(v, f"{path}[{i}]")


async def _until_disconnect(request: Request, work) -> Any:
    """Run `work`; cancel it (and so the scheduler call) if the client goes away first."""
    task = asyncio.ensure_future(work)
    while not task.done():
        done, _ = await asyncio.wait({task}, timeout=0.5)
        if not done and await request.is_disconnected():
            task.cancel()
            logger.info("client disconnected; request cancelled")
            return Response(status_code=499)
    return task.result()


def _truncated(text: str, limit: int) -> str:
    return text if len(text) <= limit else f"{text[:limit]}... ({len(text)} chars)"


async def _logged_stream(events: AsyncIterator[str], limit: int) -> AsyncIterator[str]:
    """--log-requests for a stream: the events pass through; their text, truncated, is logged at the end."""
    seen: list[str] = []
    size = 0
    try:
        async for event in events:
            if size < limit:
                seen.append(event)
                size += len(event)
            yield event
    finally:
        logger.info("response (stream) %s", _truncated("".join(seen), limit))


class _InternalErrors:
    """ASGI middleware, the last resort: an exception no route handled becomes a 500 in OpenAI's error shape (or,
    once a response has started, the end of its body) and goes no further. Starlette's own handler for `Exception`
    re-raises after answering, and uvicorn then drops the keep-alive connection, so the client's next request on
    it failed with a connection reset."""

    def __init__(self, app):
        self.app = app

    async def __call__(self, scope, receive, send):
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        try:
            await self.app(scope, receive, send)  # `send` unwrapped: nothing added per streamed event
        except Exception as e:  # noqa: BLE001 - answered here, logged with its traceback
            logger.exception("unhandled error in %s %s", scope.get("method"), scope.get("path"))
            body = json.dumps(
                error_body(f"internal error: {type(e).__name__}", "internal_error", None, 500)
            ).encode()
            start = {
                "type": "http.response.start",
                "status": 500,
                "headers": [(b"content-type", b"application/json")],
            }
            try:
                await send(start)
            except Exception:  # noqa: BLE001 - the response had started (the server refuses a second start)
                with contextlib.suppress(Exception):
                    await send({"type": "http.response.body", "body": b"", "more_body": False})
                return
            await send({"type": "http.response.body", "body": body})


class _ApiKey:
    """ASGI middleware: every HTTP request but the open paths carries `Authorization: Bearer <key>` (compared in
    constant time), or gets a 401 in OpenAI's error shape. Pure ASGI, so streamed responses pass untouched."""

    def __init__(self, app, key: str, open_paths: list[str]):
        self.app = app
        self.key = key.encode()
        self.open_paths = set(open_paths)

    async def __call__(self, scope, receive, send):
        if scope["type"] != "http" or scope["path"] in self.open_paths:
            return await self.app(scope, receive, send)
        auth = dict(scope["headers"]).get(b"authorization", b"")
        scheme, _, token = auth.partition(b" ")
        if scheme.lower() == b"bearer" and hmac.compare_digest(token.strip(), self.key):
            return await self.app(scope, receive, send)
        body = json.dumps(
            error_body(
                "missing or incorrect API key: send 'Authorization: Bearer <key>'",
                "invalid_request_error",
                None,
                "invalid_api_key",
            )
        ).encode()
        headers = [(b"content-type", b"application/json"), (b"www-authenticate", b"Bearer")]
        await send({"type": "http.response.start", "status": 401, "headers": headers})
        await send({"type": "http.response.body", "body": body})


class GatewayApp(FastAPI):
    """FastAPI that leaves the ASGI server's own `send` in the scope (RAW_SEND) before Starlette's outermost
    middleware (ServerErrorMiddleware) wraps it, so streamed events skip every wrapper (gateway/sse.py)."""

    async def __call__(self, scope, receive, send) -> None:
        if scope["type"] == "http":
            scope[RAW_SEND] = send
        await super().__call__(scope, receive, send)


def create_app(args: GatewayArgs) -> FastAPI:
    gw = Gateway(args)
    api_key = args.api_key or os.environ.get("MIRADOR_API_KEY", "")

    @asynccontextmanager
    async def lifespan(app: FastAPI):
        await gw.start()
        yield
        await gw.close()

    app = GatewayApp(
        title="Mirador",
        version="0.1.0",
        lifespan=lifespan,
        description="OpenAI-compatible serving of vision-language models",
    )
    app.state.gateway = gw
    app.add_middleware(_InternalErrors)
    if api_key:
        app.add_middleware(_ApiKey, key=api_key, open_paths=args.open_paths)
    app.add_middleware(
        RequestContext, metrics=gw.metrics
    )  # outermost: 401s and 500s get an id and a count too

    @app.exception_handler(MiradorError)
    async def _mirador_error(_: Request, e: MiradorError):
        return error_response(e)

    @app.exception_handler(StarletteHTTPException)
    async def _http_error(_: Request, e: StarletteHTTPException):
        """Routing errors (404 unknown path, 405 wrong method) in OpenAI's shape, not FastAPI's {"detail"}."""
        message = {404: "no such route", 405: "method not allowed on this route"}.get(
            e.status_code, str(e.detail)
        )
        kind = "not_found_error" if e.status_code == 404 else "invalid_request_error"
        return JSONResponse(
            error_body(message, kind, None, e.status_code), e.status_code, headers=getattr(e, "headers", None)
        )

    @app.exception_handler(RequestValidationError)
    async def _validation_error(_: Request, e: RequestValidationError):
        first = e.errors()[0] if e.errors() else {}
        param = ".".join(str(x) for x in first.get("loc", ()) if x != "body") or None
        return JSONResponse(
            error_body(first.get("msg", "invalid request"), "invalid_request_error", param, 400), 400
        )

    @app.exception_handler(Exception)
    async def _internal_error(_: Request, e: Exception):
        logger.exception("unhandled error")
        return JSONResponse(
            error_body(f"internal error: {type(e).__name__}", "internal_error", None, 500), 500
        )

    async def handle(request: Request, model_cls, method):
        raw = await _read_body(request, args.max_request_bytes)
        req = None if args.log_requests else _validated_from_bytes(model_cls, raw)
        if req is None:
            body = _json_body(raw)
            if args.log_requests:
                logger.info(
                    "request %s %s",
                    request.url.path,
                    _truncated(json.dumps(body), args.log_requests_max_chars),
                )
            try:
                req = model_cls.model_validate(body)
            except ValidationError as e:
                raise from_validation_error(e) from None
        try:
            await gw.sync_with_scheduler()
        except MiradorError:
            raise UnavailableError("the scheduler is not ready yet; retry shortly") from None
        result = await _until_disconnect(request, method(req))
        if isinstance(result, Response):
            return result
        if isinstance(result, AsyncIterator):
            if args.log_requests:
                result = _logged_stream(result, args.log_requests_max_chars)
            return EventStreamResponse(result)
        if args.log_requests:
            logger.info("response %s", _truncated(json.dumps(result), args.log_requests_max_chars))
        return JSONResponse(result)

    @app.post(
        "/v1/chat/completions", responses=generation_responses(ChatCompletionResponse, ChatCompletionChunk)
    )
    async def chat_completions(request: Request):
        return await handle(request, ChatCompletionRequest, gw.serving.chat)

    @app.post("/v1/completions", responses=generation_responses(CompletionResponse, CompletionChunk))
    async def completions(request: Request):
        return await handle(request, CompletionRequest, gw.serving.completions)

    @app.post(
        "/generate",
        responses=generation_responses(GenerateResponse | list[GenerateResponse], GenerateResponse),
    )
    async def generate(request: Request):
        return await handle(request, GenerateBody, partial(native.generate, gw.serving))

    def model_entry() -> dict[str, Any]:
        return {
            "id": gw.card.served_name,
            "object": "model",
            "created": 0,
            "owned_by": "mirador",
            "root": gw.card.model_path,
            "max_model_len": gw.card.context_length,
        }

    @app.get("/v1/models", responses=info_responses(ModelList))
    async def models():
        return {"object": "list", "data": [model_entry()]}

    @app.get("/v1/models/{model_id:path}", responses=model_responses(ModelEntry))
    async def model(model_id: str):
        """OpenAI's models.retrieve; an id not served here is a 404 in OpenAI's shape."""
        if model_id != gw.card.served_name:
            raise NotFoundError(
                f"The model `{model_id}` does not exist; this server serves `{gw.card.served_name}`",
                param="model",
                code="model_not_found",
            )
        return model_entry()

    @app.post("/flush_cache", responses=FLUSH_RESPONSES)
    async def flush_cache():
        """SGLang's: empty the prefix cache and the image embedding cache, only while no request is live."""
        resp = await gw.scheduler.flush_cache()
        if not resp.flushed:
            raise InvalidRequestError(
                f"cache not flushed: {resp.num_requests} requests are running or queued; retry when idle",
                code="requests_running",
            )
        return {
            "flushed": True,
            "num_pages_freed": resp.num_pages_freed,
            "num_embeddings_freed": resp.num_embeddings_freed,
        }

    @app.get("/health", response_class=Response, responses=HEALTH_RESPONSES)
    async def health():
        if await gw.healthy():
            return Response(status_code=200)
        return JSONResponse(
            error_body(
                "not ready: the scheduler, worker or vision service is not serving",
                "service_unavailable",
                None,
                503,
            ),
            503,
            headers={"Retry-After": str(RETRY_AFTER_S)},
        )

    @app.get("/metrics", response_class=Response, responses=METRICS_RESPONSES)
    async def metrics():
        body, content_type = render_metrics()
        return Response(body, media_type=content_type)

    @app.get("/model_info", responses=info_responses(ModelInfo))
    @app.get("/get_model_info", responses=info_responses(ModelInfo))
    async def model_info():
        cfg = gw.builder.config
        return {
            "model_path": gw.card.model_path,
            "served_model_name": gw.card.served_name,
            "architecture": cfg.architecture,
            "is_generation": True,
            "is_multimodal": cfg.is_multimodal,
            "has_image_understanding": cfg.is_multimodal,
            "context_length": gw.card.context_length,
        }

    @app.get("/server_info", responses=info_responses(ServerInfo))
    @app.get("/get_server_info", responses=info_responses(ServerInfo))
    async def server_info():
        info, stats = await asyncio.gather(gw.scheduler.server_info(), gw.scheduler.stats())
        from google.protobuf.json_format import MessageToDict

        out = MessageToDict(info, preserving_proto_field_name=True, always_print_fields_with_no_presence=True)
        for key in ("scheduler_args_json", "worker_info_json", "vision_info_json", "grammar_info_json"):
            out[key.removesuffix("_json")] = json.loads(out.pop(key) or "{}")
        # live values only, as JSON numbers (MessageToDict writes int64 as strings); page_size is configuration
        out["stats"] = {
            f.name: getattr(stats, f.name) for f in stats.DESCRIPTOR.fields if f.name != "page_size"
        }
        # this gateway process's request stream to the scheduler: unix (local stream) or grpc
        out["connect_transport"] = gw.scheduler.transport
        out["gateway_args"] = {k: ("<set>" if k == "api_key" and v else v) for k, v in vars(args).items()}
        out["version"] = app.version
        out["model_dir"] = str(Path(args.model_path))
        return out

    install(app, [gw.card.served_name, gw.card.model_path], gw.builder.config.text.vocab_size)
    return app
