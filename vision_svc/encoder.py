"""The vision core: decode, preprocess and encode images, cache the embeddings, and encode each new key once
however many callers ask for it at the same time. Free of protobuf; the servicer and the engine call it."""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass

import torch

from common.errors import InvalidRequestError
from common.types import EncodedItem, MultimodalItem
from models.loader import load_model, resolve_device, resolve_dtype
from models.registry import image_preprocessor_class, vision_model_class
from processor.media import decode_image
from processor.model_config import load_model_config
from processor.models import media_spec_class
from vision_svc.embedding_pool import EmbeddingPool, Location

logger = logging.getLogger(__name__)


@dataclass(frozen=True)
class EncoderConfig:
    model_path: str
    dtype: str = "auto"
    device: str = "auto"
    cache_bytes: int = 1 << 30
    max_batch_patches: int = 16384  # patches per encoder forward when several images are encoded together
    load_format: str = "auto"
    mem_fraction: float = 0.0  # cap of this process's share of the GPU (0: none)
    share_embeddings: bool = (
        True  # map the embedding pool for workers on this host (CUDA IPC / shared memory)
    )


@dataclass
class VisionStats:
    encode_calls: int = 0
    images_encoded: int = 0
    cache_hits: int = 0
    encode_ns_total: int = 0


class VisionEncoder:
    def __init__(self, cfg: EncoderConfig):
        self.cfg = cfg
        self.model_config = load_model_config(cfg.model_path)
        if not self.model_config.is_multimodal:
            raise ValueError(f"{cfg.model_path} has no vision tower")
        self.device = resolve_device(cfg.device)
        self.dtype = resolve_dtype(cfg.dtype, self.model_config, self.device)
        if self.device.type == "cuda" and cfg.mem_fraction > 0:
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
        self.spec = media_spec_class(self.model_config.model_type).from_model_dir(cfg.model_path)
        self.preprocess = image_preprocessor_class(arch)(self.spec)
        self.hidden_size = self.model_config.vision.out_hidden_size
        self.cache = EmbeddingPool(
            cfg.cache_bytes, self.hidden_size, self.dtype, self.device, shareable=cfg.share_embeddings
        )
        self.stats = VisionStats()
        self._inflight: dict[str, asyncio.Future] = {}
        self._executor = ThreadPoolExecutor(1, thread_name_prefix="vision-encode")

    # ---- async API (dedupes concurrent requests for the same key) ----

    async def encode(self, items: Sequence[MultimodalItem]) -> list[EncodedItem]:
        self.stats.encode_calls += 1
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
                done = await loop.run_in_executor(self._executor, self.encode_now, todo)
                for item in todo:
                    results[item.content_key] = done[item.content_key]
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

    def lease_embeddings(self, keys: Sequence[str]) -> tuple[int, list[Location], list[str]]:
        return self.cache.lease(keys)

    def release_embeddings(self, lease_id: int) -> bool:
        return self.cache.release(lease_id)

    def close(self) -> None:
        self._executor.shutdown(wait=False, cancel_futures=True)
        self.cache.close()

    # ---- sync work (runs on the encoder thread) ----

    @torch.inference_mode()
    def encode_now(self, items: Sequence[MultimodalItem]) -> dict[str, EncodedItem]:
        out: dict[str, EncodedItem] = {}
        prepared = []
        for item in items:
            t0 = time.perf_counter_ns()
            image = decode_image(item.data).image
            patches, grid = self.preprocess(image)
            n = grid[0] * grid[1] * grid[2] // self.spec.merge_size**2
            if tuple(grid) != tuple(item.grid_thw) or n != item.num_tokens:
                raise InvalidRequestError(
                    f"image {item.content_key[:12]}: grid {grid} / {n} tokens disagree with the "
                    f"request's {tuple(item.grid_thw)} / {item.num_tokens}"
                )
            prepared.append((item, patches, grid, time.perf_counter_ns() - t0))
        batch: list = []
        for entry in prepared:
            if (
                batch
                and sum(p.shape[0] for _, p, _, _ in batch) + entry[1].shape[0] > self.cfg.max_batch_patches
            ):
                out.update(self._run(batch))
                batch = []
            batch.append(entry)
        if batch:
            out.update(self._run(batch))
        return out

    def _run(self, batch) -> dict[str, EncodedItem]:
        t0 = time.perf_counter_ns()
        pixels = torch.cat([torch.from_numpy(p) for _, p, _, _ in batch]).to(self.device, self.dtype)
        grids = [g for _, _, g, _ in batch]
        emb = self.model(pixels, grids)
        start = 0
        for item, *_ in batch:
            self.cache.put(item.content_key, emb[start : start + item.num_tokens])
            start += item.num_tokens
        if self.device.type == "cuda":  # the rows are in the pool before anyone hears they are cached
            torch.cuda.synchronize(self.device)
        forward_ns = time.perf_counter_ns() - t0
        out = {}
        total_patches = sum(p.shape[0] for _, p, _, _ in batch)
        for item, patches, _, pre_ns in batch:
            ns = pre_ns + forward_ns * patches.shape[0] // max(1, total_patches)
            self.stats.images_encoded += 1
            self.stats.encode_ns_total += ns
            out[item.content_key] = EncodedItem(item.content_key, item.num_tokens, False, ns)
        logger.info("encoded %d image(s), %d patches in %.1f ms", len(batch), total_patches, forward_ns / 1e6)
        return out
