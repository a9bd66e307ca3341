"""How many KV pages the worker allocates.

On a GPU, `--mem-fraction-static` covers weights plus KV cache. What lies outside it must hold the activations of
the largest step (measured by a warm-up forward before the cache exists), the CUDA graphs, the CUDA contexts and,
when the vision service shares the card, its own budget (`--vision-mem-fraction`). Every figure comes from this
process alone, so a vision service loading at the same time cannot change the result (no start-up race).
"""

from __future__ import annotations

import logging
import os
from dataclasses import dataclass

logger = logging.getLogger(__name__)

GiB = 1 << 30
CONTEXT_RESERVE = GiB  # CUDA contexts and library workspaces of the processes on the card (cuBLAS, Triton)
MAX_PAGES = (
    1 << 20
)  # the scheduler keeps a free list of page ids: a tiny model on a big GPU needs no millions
CPU_MAX_TOKENS = 65536


@dataclass(frozen=True)
class GpuBudget:
    total: int
    weights: int
    activations: int  # peak of the largest eager step
    graphs: int  # the decode graphs' pool and the sampler's work space at the largest batch
    vision: int  # reserved for a vision service on the same card
    free: int  # free on the card after the warm-up: what other processes leave us

    def kv_bytes(self, mem_fraction_static: float) -> int:
        static = int(self.total * mem_fraction_static) - self.weights
        rest = self.total - self.vision - CONTEXT_RESERVE - self.activations - self.graphs - self.weights
        if rest < static:
            logger.warning(
                "--mem-fraction-static %.2f would leave too little for activations (%.2f GB), graphs (%.2f GB) "
                "and the vision service (%.2f GB): the KV cache gets %.2f GB instead of %.2f GB",
                mem_fraction_static,
                self.activations / 1e9,
                self.graphs / 1e9,
                self.vision / 1e9,
                max(rest, 0) / 1e9,
                static / 1e9,
            )
        # other processes on the card (not the vision service: its share is reserved above) may hold memory
        free = self.free - self.activations - self.graphs - CONTEXT_RESERVE // 2
        if free < min(static, rest):
            logger.warning(
                "only %.2f GB of the GPU is free (other processes hold the rest): the KV cache gets %.2f GB",
                self.free / 1e9,
                max(free, 0) / 1e9,
            )
        return min(static, rest, free)

    def describe(self) -> str:
        return (
            f"GPU {self.total / 1e9:.1f} GB: weights {self.weights / 1e9:.2f}, activations {self.activations / 1e9:.2f}, "
            f"graphs {self.graphs / 1e9:.2f}, vision {self.vision / 1e9:.2f} GB"
        )


def gpu_num_pages(
    budget: GpuBudget, mem_fraction_static: float, bytes_per_page: int, reserved: int = 0
) -> int:
    """KV pages in what the budget leaves, less `reserved` bytes (the encoder cache's)."""
    kv = budget.kv_bytes(mem_fraction_static) - reserved
    if kv < 2 * bytes_per_page:
        raise ValueError(
            f"no room for a KV cache: {budget.describe()}; raise --mem-fraction-static "
            f"({mem_fraction_static}), lower --max-prefill-tokens / --cuda-graph-max-bs, or give the vision "
            "service less (--vision-mem-fraction) or its own GPU"
        )
    return min(kv // bytes_per_page, MAX_PAGES)


def encoder_num_pages(kv_bytes: int, bytes_per_page: int, max_images: int | None, fraction: float) -> int:
    """Encoder-cache pages (one image each, + page 0): max_images, or `fraction` of the KV memory, at least one."""
    images = max_images if max_images is not None else int(max(kv_bytes, 0) * fraction // bytes_per_page)
    return min(max(1, images), MAX_PAGES) + 1


def cpu_num_pages(max_total_tokens: int | None, page_size: int, bytes_per_page: int) -> int:
    """A token budget that fits the machine: at most a quarter of the RAM, at most 64k tokens by default."""
    if max_total_tokens is None:
        ram = os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")
        max_total_tokens = min(CPU_MAX_TOKENS, int(ram * 0.25 // (bytes_per_page / page_size)))
    return -(-max_total_tokens // page_size) + 1  # + page 0, never handed out
