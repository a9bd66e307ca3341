"""The vision core: decode, preprocess and encode images, cache the embeddings, and encode each new key once
however many callers ask for it at the same time. Free of protobuf; the servicer and the engine call it."""

from __future__ import annotations

import asyncio
import dataclasses
import logging
import os
import time
from collections.abc import Callable, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from typing import Any

import torch

from common.errors import InvalidRequestError
from common.types import EmbeddingLease, EmbeddingLocation, EncodedItem, MultimodalItem
from models.loader import load_model, resolve_device, resolve_dtype
from models.registry import fast_image_preprocessor_class, image_preprocessor_class, vision_model_class
from processor.media import content_key, decode_image
from processor.model_config import load_model_config
from processor.models import media_spec_class
from vision_svc.embedding_pool import EmbeddingPool

logger = logging.getLogger(__name__)


@dataclass(frozen=True)
class EncoderConfig:
    model_path: str
    dtype: str = "auto"
    device: str = "auto"
    cache_bytes: int = 1 << 30
    max_batch_patches: int = 4096  # patches per encoder forward when several images are encoded together
    load_format: str = "auto"
    mem_fraction: float = 0.0  # cap of this process's share of the GPU (0: none)
    share_embeddings: bool = (
        True  # map the embedding pool for workers on this host (CUDA IPC / shared memory)
    )
    fast_image_processor: bool = True  # uint8 off the host, normalize + patchify on the device
    attention_backend: str = "auto"  # of the vision tower: auto, varlen, triton, torch_native
    cuda_graph: bool = True  # replay the tower from CUDA graphs for batches up to the largest bucket
    graph_buckets: tuple[
        int, ...
    ] = ()  # padded patch counts with a graph (empty: vision_svc.graphs' default)
    graph_max_shapes: int = 4  # exact-shape graphs of larger batches (captured when a shape recurs)
    preprocess_threads: int = 0  # host decode/resize threads (0: half the cores, at least 1)
    warmup: bool = True  # run representative image shapes before serving


MAX_PREPARED_AHEAD = 16  # decoded images held for an encode that has not come yet
PREPARED_AHEAD_TTL_S = 10.0  # after which a hint's pixels are dropped


def _ignore(_seconds: float) -> None:
    pass


@dataclass
class VisionStats:
    encode_calls: int = 0
    images_requested: int = 0  # images asked for in encode calls (a key repeated within one call counts once)
    images_encoded: int = 0
    cache_hits: int = 0
    encode_ns_total: int = 0
    batches: int = 0  # encoder forwards (each holds every image that was ready when it started)
    graph_batches: int = 0  # of them replayed from a CUDA graph
    prepared_ahead: int = 0  # images an encode found decoded by a prepare hint


@dataclass
class _Prepared:
    """An image after its host half: what the device half needs, and the host time it took."""

    item: MultimodalItem
    # fast path: uint8 [H, W, 3] pixels at the model's size, or a HostImage the device half resizes; exact path:
    # float32 patches [N, C*T*P*P]
    payload: Any
    grid: tuple[int, int, int]
    host_ns: int


class VisionEncoder:
    def __init__(self, cfg: EncoderConfig):
        self.cfg = cfg
        self.model_config = load_model_config(cfg.model_path)
        if not self.model_config.is_multimodal:
            raise ValueError(f"{cfg.model_path} has no vision tower")
        self.device = resolve_device(cfg.device)
        self.dtype = resolve_dtype(cfg.dtype, self.model_config, self.device)
        if self.device.type == "cuda":
            torch.cuda.set_device(self.device)
            if cfg.mem_fraction > 0:
                # the worker sizes its KV cache leaving this share free, so the two never race for memory
                torch.cuda.set_per_process_memory_fraction(cfg.mem_fraction, self.device)
        arch = self.model_config.architecture
        self.model = load_model(
            vision_model_class(arch),
            self.model_config,
            cfg.model_path,
            self.dtype,
            self.device,
            cfg.load_format,
        )
        self.attention_backend = self.model.set_attention_backend(cfg.attention_backend)
        self.spec = media_spec_class(self.model_config.model_type).from_model_dir(cfg.model_path)
        fast_cls = fast_image_preprocessor_class(arch) if cfg.fast_image_processor else None
        self.fast = fast_cls(self.spec, defer_resize=self._defer_resize()) if fast_cls is not None else None
        self.preprocess = image_preprocessor_class(arch)(self.spec)
        self.hidden_size = self.model_config.vision.out_hidden_size
        self.cache = EmbeddingPool(
            cfg.cache_bytes, self.hidden_size, self.dtype, self.device, shareable=cfg.share_embeddings
        )
        self.stats = VisionStats()
        # timings reported per image (host preprocessing) and per batch (the device half); the server plugs in a
        # Prometheus-backed recorder
        self.on_preprocessed: Callable[[float], None] = _ignore
        self.on_batch_encoded: Callable[[float], None] = _ignore
        self._inflight: dict[str, asyncio.Future] = {}
        # prepare hints: key -> (host half running or done, when it is dropped unless an encode takes it)
        self._ahead: dict[str, tuple[asyncio.Future, float]] = {}
        self._executor = ThreadPoolExecutor(1, thread_name_prefix="vision-encode")
        threads = cfg.preprocess_threads or max(1, (os.cpu_count() or 2) // 2)
        self._host_pool = ThreadPoolExecutor(threads, thread_name_prefix="vision-host")
        self._queue: list[tuple[_Prepared, asyncio.Future]] = []
        self._drainer: asyncio.Task | None = None
        self.on_fatal = None  # the servicer's Fatal.report: the batch loop dying stops the service
        self.graphs = None
        # a tower whose shapes vary in ways the padded buckets do not cover says so (supports_cuda_graphs)
        if (
            self.device.type == "cuda"
            and cfg.cuda_graph
            and getattr(self.model, "supports_cuda_graphs", True)
        ):
            from vision_svc.graphs import DEFAULT_BUCKETS, VisionGraphs

            t0 = time.perf_counter()
            self.graphs = VisionGraphs(
                self.model,
                cfg.graph_buckets or DEFAULT_BUCKETS,
                still=self.fast is not None,
                max_shapes=cfg.graph_max_shapes,
            )
            self.graphs.capture()
            logger.info("captured vision graphs in %.1f s", time.perf_counter() - t0)
        if cfg.warmup:
            self.warmup()

    # ---- async API (dedupes concurrent requests for the same key) ----

    async def encode(self, items: Sequence[MultimodalItem]) -> list[EncodedItem]:
        self.stats.encode_calls += 1
        self.stats.images_requested += len({item.content_key for item in items})
        loop = asyncio.get_running_loop()
        results: dict[str, EncodedItem] = {}
        todo: list[MultimodalItem] = []
        waits: list[tuple[MultimodalItem, asyncio.Future]] = []
        for item in items:
            if item.content_key in results or any(t.content_key == item.content_key for t in todo):
                continue
            if self.cache.touch(item.content_key):
                results[item.content_key] = EncodedItem(item.content_key, item.num_tokens, True)
            elif item.content_key in self._inflight:
                waits.append((item, self._inflight[item.content_key]))
            else:
                todo.append(item)
                self._inflight[item.content_key] = loop.create_future()
        if todo:
            try:
                prepared = await asyncio.gather(*(self._prepared(item) for item in todo))
                done = await asyncio.gather(*(self._submit(p) for p in prepared))
                for item, enc in zip(todo, done, strict=True):
                    results[item.content_key] = enc
                    self._inflight.pop(item.content_key).set_result(True)
            except BaseException as e:
                for item in todo:
                    fut = self._inflight.pop(item.content_key, None)
                    if fut is not None and not fut.done():
                        fut.set_exception(e)
                        fut.exception()  # mark retrieved: waiters re-raise it themselves
                raise
        for item, fut in waits:
            await fut
            results[item.content_key] = EncodedItem(item.content_key, item.num_tokens, True)
        self.stats.cache_hits += sum(1 for r in results.values() if r.cache_hit)
        return [results[i.content_key] for i in items]

    def prepare_ahead(self, items: Sequence[MultimodalItem]) -> int:
        """Start the host half (decode) of items that are neither cached, encoding nor prepared, so that their
        encode finds them decoded; returns how many started. Errors are kept for nobody: the encode prepares
        again and reports its own."""
        loop = asyncio.get_running_loop()
        self._expire_ahead()
        started = 0
        for item in items:
            key = item.content_key
            if key in self._ahead or key in self._inflight or key in self.cache:
                continue
            if len(self._ahead) >= MAX_PREPARED_AHEAD:
                break
            fut = loop.run_in_executor(self._host_pool, self.prepare, item)
            fut.add_done_callback(lambda f: f.cancelled() or f.exception())  # retrieved
            self._ahead[key] = (fut, time.monotonic() + PREPARED_AHEAD_TTL_S)
            started += 1
        return started

    def _expire_ahead(self) -> None:
        now = time.monotonic()
        for key in [k for k, (_, deadline) in self._ahead.items() if deadline < now]:
            del self._ahead[key]

    async def _prepared(self, item: MultimodalItem) -> _Prepared:
        """The host half of an item: a prepare hint's when one ran for it and agrees, else done now."""
        self._expire_ahead()
        ahead = self._ahead.pop(item.content_key, None)
        if ahead is not None:
            try:
                p = await ahead[0]
            except Exception:  # noqa: BLE001 - prepared again below, which raises for this caller
                p = None
            if p is not None and p.grid == tuple(item.grid_thw) and p.item.num_tokens == item.num_tokens:
                self.stats.prepared_ahead += 1
                return dataclasses.replace(p, item=item)
        return await asyncio.get_running_loop().run_in_executor(self._host_pool, self.prepare, item)

    def get_embeddings(
        self, keys: Sequence[str], device: torch.device | None = None, dtype: torch.dtype | None = None
    ) -> tuple[dict[str, torch.Tensor], list[str]]:
        """Copies of the cached rows (on `device`, the encoder's by default), and the keys not cached."""
        found, missing = {}, []
        for k in keys:
            t = self.cache.get(k, device, dtype)
            if t is None:
                missing.append(k)
            else:
                found[k] = t
        return found, missing

    transport = "in_process"  # as the in-process engine's EmbeddingSource

    def fetch(
        self, keys: Sequence[str], device: torch.device, dtype: torch.dtype
    ) -> tuple[dict[str, torch.Tensor], list[str]]:
        """EmbeddingSource for a worker in this process: one copy per image from the pool, complete on return."""
        found, missing = self.get_embeddings(keys, device, dtype)
        for d in {t.device for t in found.values()}:
            if d.type == "cuda":
                torch.cuda.current_stream(d).synchronize()
        return found, missing

    def lease_embeddings(self, keys: Sequence[str]) -> tuple[int, list[EmbeddingLocation], list[str]]:
        return self.cache.lease(keys)

    def lease_encoded(self, keys: Sequence[str]) -> EmbeddingLease | None:
        """A lease on the pool rows of keys just encoded, for a worker that maps the pool (None when the pool is
        not shareable or none of them is cached any longer)."""
        if not self.cache.kind:
            return None
        lease_id, found, _ = self.cache.lease(list(dict.fromkeys(keys)))
        return EmbeddingLease(self.cache.pool_id, lease_id, tuple(found)) if lease_id else None

    def release_embeddings(self, lease_id: int, pool_id: str = "") -> bool:
        """End a lease; one taken in another pool (before a restart: lease ids start over) is left alone."""
        if pool_id and pool_id != self.cache.pool_id:
            return False
        return self.cache.release(lease_id)

    def close(self) -> None:
        self._executor.shutdown(wait=False, cancel_futures=True)
        self._host_pool.shutdown(wait=False, cancel_futures=True)
        self.cache.close()

    # ---- batching: every image prepared while the device was busy goes into the next forward ----

    def _submit(self, prepared: _Prepared) -> asyncio.Future:
        fut = asyncio.get_running_loop().create_future()
        self._queue.append((prepared, fut))
        if self._drainer is None or self._drainer.done():
            self._drainer = asyncio.create_task(self._drain())
            if self.on_fatal is not None:
                self._drainer.add_done_callback(self._check_drainer)
        return fut

    def _check_drainer(self, task: asyncio.Task) -> None:
        if not task.cancelled() and task.exception() is not None:
            for _, fut in self._queue:  # nobody would run these now
                if not fut.done():
                    fut.set_exception(task.exception())
            self.on_fatal(task.exception(), "the vision batch loop")

    async def _drain(self) -> None:
        loop = asyncio.get_running_loop()
        while self._queue:
            batch, rows = [], 0
            while self._queue and (
                not batch or rows + self._patches(self._queue[0][0]) <= self.cfg.max_batch_patches
            ):
                entry = self._queue.pop(0)
                batch.append(entry)
                rows += self._patches(entry[0])
            try:
                done, finish = await loop.run_in_executor(
                    self._executor, self.launch_batch, [p for p, _ in batch]
                )
            except BaseException as e:  # noqa: BLE001 - every image of the batch fails with it
                for _, fut in batch:
                    if not fut.done():
                        fut.set_exception(e)
                continue
            for p, fut in batch:  # answered now: with early answers the device may still be running it
                if not fut.done():
                    fut.set_result(done[p.item.content_key])
            # images that arrive meanwhile gather for the next forward, as before
            await loop.run_in_executor(self._executor, finish)

    def _rows(self, item: MultimodalItem) -> int:
        """Embedding rows of an image: its placeholder tokens, or what the spec says when the language model
        does not take them as tokens (Llama 3.2 Vision: the cross-attention states of every tile slot)."""
        rows_of = getattr(self.spec, "num_embedding_rows", None)
        return rows_of(tuple(item.grid_thw)) if rows_of is not None else item.num_tokens

    def _patches(self, p: _Prepared) -> int:
        return self.spec.num_patches(p.grid)

    def _defer_resize(self) -> bool:
        """On a GPU the fast path's resize runs there (Pillow's pixels, bit for bit), after a check of our resize
        against the installed Pillow; on a CPU the preprocessing threads keep it (Pillow is the faster there)."""
        if self.device.type != "cuda":
            return False
        from kernels.image_resize import matches_pillow

        if not matches_pillow():
            logger.warning(
                "this Pillow's bicubic resize differs from kernels/image_resize.py: resizing on the host"
            )
            return False
        return True

    # ---- host half (preprocessing threads) ----

    def prepare(self, item: MultimodalItem) -> _Prepared:
        """Check the key against the bytes, decode and resize (fast path: to uint8 pixels; exact path: to float32
        patches) and check the geometry against the request's."""
        t0 = time.perf_counter_ns()
        if item.content_key != content_key(item.data, self.spec.item_settings(tuple(item.grid_thw))):
            # the key names the embedding every later request with it is answered with: it must be the bytes'
            raise InvalidRequestError(
                f"image {item.content_key[:12]}: the content key is not the SHA-256 of these bytes and this "
                "model's preprocessing settings"
            )
        if self.fast is not None:
            host = self.fast.load(item.data)
            payload = host if host.resize_to is not None else host.pixels
            grid, n = tuple(host.grid), host.num_tokens
        else:
            # the request's grid says how the image is laid out in its prompt (LLaVA-OneVision tiles an image
            # only when it is the prompt's one image); the geometry checked below is the image's own
            payload, grid = self.preprocess(decode_image(item.data).image, tuple(item.grid_thw))
            grid = tuple(grid)
            n = self.spec.num_image_tokens(grid)
        if grid != tuple(item.grid_thw) or n != item.num_tokens:
            raise InvalidRequestError(
                f"image {item.content_key[:12]}: grid {grid} / {n} tokens disagree with the "
                f"request's {tuple(item.grid_thw)} / {item.num_tokens}"
            )
        host_ns = time.perf_counter_ns() - t0
        self.on_preprocessed(host_ns * 1e-9)
        return _Prepared(item, payload, grid, host_ns)

    # ---- device half (the encoder thread) ----

    @torch.inference_mode()
    def encode_now(self, items: Sequence[MultimodalItem]) -> dict[str, EncodedItem]:
        """Synchronous encode of items (no dedupe): prepare each, run them in batches of max_batch_patches."""
        prepared = [self.prepare(item) for item in items]
        out: dict[str, EncodedItem] = {}
        batch: list[_Prepared] = []
        for p in prepared:
            if batch and sum(map(self._patches, batch)) + self._patches(p) > self.cfg.max_batch_patches:
                out.update(self.run_batch(batch))
                batch = []
            batch.append(p)
        if batch:
            out.update(self.run_batch(batch))
        return out

    @torch.inference_mode()
    def forward(self, payloads: Sequence[Any], grids: Sequence[tuple[int, int, int]]) -> torch.Tensor:
        """Device half of preprocessing and the tower: merged embeddings [sum(tokens), hidden], image by image."""
        if self.fast is not None:
            pixels = self.fast.to_patches(list(payloads), self.device, self.dtype)
        else:
            pixels = torch.cat([torch.from_numpy(p) for p in payloads]).to(self.device, self.dtype)
        if self.graphs is not None:
            return self.graphs.run(pixels, grids)
        return self.model(pixels, grids)

    @torch.inference_mode()
    def run_batch(self, batch: Sequence[_Prepared]) -> dict[str, EncodedItem]:
        """Encode a batch and wait until its rows are in the pool."""
        out, finish = self.launch_batch(batch, early=False)
        finish()
        return out

    @property
    def answers_early(self) -> bool:
        """Whether batches are answered once queued on the device: a CUDA IPC pool, whose leases name a ready
        event that the worker's stream waits on (no host waits for the tower; in-process readers share the
        stream)."""
        return bool(self.cache.ready_events)

    @torch.inference_mode()
    def launch_batch(
        self, batch: Sequence[_Prepared], early: bool | None = None
    ) -> tuple[dict[str, EncodedItem], Callable[[], None]]:
        """Queue a batch's tower and pool writes. With `early` (default: `answers_early`) its results are final
        when this returns while the device still runs it (leases carry the pool's ready event); `finish` waits for
        the device and records the timings either way."""
        early = self.answers_early if early is None else early
        t0 = time.perf_counter_ns()
        grids = [p.grid for p in batch]
        emb = self.forward([p.payload for p in batch], grids)
        rows, start = [], 0
        for p in batch:
            n = self._rows(p.item)
            rows.append((p.item.content_key, emb[start : start + n]))
            start += n
        written = self.cache.put_many(rows, ready_event=early)
        total = sum(map(self._patches, batch))
        self.stats.batches += 1
        if self.graphs is not None and self.graphs.graphed(grids, total, self.graphs.in_features):
            self.stats.graph_batches += 1
        launch_ns = time.perf_counter_ns() - t0
        out = {}
        for p in batch:  # early: the time until answered; else finish() puts in the device's time
            self.stats.images_encoded += 1
            ns = p.host_ns + launch_ns * self._patches(p) // max(1, total)
            out[p.item.content_key] = EncodedItem(p.item.content_key, self._rows(p.item), False, ns)

        def finish() -> None:
            if written is not None:
                written.synchronize()
            elif self.device.type == "cuda":  # the rows are in the pool before anyone hears they are cached
                torch.cuda.synchronize(self.device)
            forward_ns = time.perf_counter_ns() - t0
            self.on_batch_encoded(forward_ns * 1e-9)
            for p in batch:
                ns = p.host_ns + forward_ns * self._patches(p) // max(1, total)
                self.stats.encode_ns_total += ns
                if not early:
                    out[p.item.content_key] = dataclasses.replace(out[p.item.content_key], encode_ns=ns)
            logger.info("encoded %d image(s), %d patches in %.1f ms", len(batch), total, forward_ns / 1e6)

        return out, finish

    # ---- warm-up ----

    def warmup(self) -> None:
        """Run representative image shapes (one small image, a 448x448 one, a batch of them, a large photo) so
        the first request pays no plan, compile or allocation cost."""
        t0 = time.perf_counter()
        sizes = [(56, 56), (448, 448), (1092, 1932)] if self.device.type == "cuda" else [(56, 56), (112, 84)]
        for w, h in sizes:
            self._warm([(w, h)])
        if self.graphs is not None:  # seen again, the large photo is captured here rather than on a request
            self._warm([sizes[-1]])
        self._warm([sizes[1]] * 4)
        self._warm_host()
        logger.info(
            "vision warm-up (%s) in %.1f s", ", ".join(f"{w}x{h}" for w, h in sizes), time.perf_counter() - t0
        )

    def _warm_host(self) -> None:
        """Decode a JPEG and a PNG on every host thread (decoder plugins load on first use)."""
        import io

        from PIL import Image

        items = []
        for fmt in ("JPEG", "PNG"):
            buf = io.BytesIO()
            Image.new("RGB", (56, 56), (90, 120, 150)).save(buf, format=fmt)
            grid = self.spec.image_grid(56, 56)
            n = self.spec.num_image_tokens(grid)
            data = buf.getvalue()
            key = content_key(data, self.spec.item_settings(grid))
            items.append(MultimodalItem(key, 0, n, grid, "image", data))
        list(self._host_pool.map(self.prepare, items * self._host_pool._max_workers))  # noqa: SLF001

    @torch.inference_mode()
    def _warm(self, sizes: Sequence[tuple[int, int]]) -> None:
        import numpy as np
        from PIL import Image

        payloads, grids = [], []
        for w, h in sizes:
            w, h = self.spec.resized_size(w, h)
            img = np.random.default_rng(0).integers(0, 256, (h, w, 3), dtype=np.uint8)
            if self.fast is not None:
                payloads.append(self.fast.warm_payload(img))
                grids.append(self.spec.image_grid(w, h))
            else:
                patches, grid = self.preprocess(Image.fromarray(img), self.spec.image_grid(w, h))
                payloads.append(patches)
                grids.append(tuple(grid))
        self.forward(payloads, grids)
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)
