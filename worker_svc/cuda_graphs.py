"""CUDA graphs of the decode forward (token gather, every layer, the output head), one per batch size; a decode
step pads its batch up to the next captured size and replays, so the ~10 kernels a layer cost one launch.

All graphs share one memory pool and one static input buffer (each reads it in its own layout, see
step_inputs.py); a step fills it with one host-to-device copy before the replay.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable

import numpy as np
import torch

from worker_svc.attention.base import AttentionMetadata
from worker_svc.step_inputs import StepInputs, graph_buffer_size, graph_views

logger = logging.getLogger(__name__)

_SIZES = (1, 2, 3, 4, 6, 8, 12, 16, 20, 24, 28, 32, 40, 48, 56, 64, 80, 96, 112, 128, 160, 192, 224, 256)


def bucket_sizes(table: tuple[int, ...], step: int, largest: int) -> list[int]:
    """The table's sizes below `largest`, then steps of `step` beyond it, then `largest` itself."""
    sizes = [s for s in table if s < largest]
    top = table[-1]
    while top < largest:
        top += step
        if top < largest:
            sizes.append(top)
    return [*sizes, largest]


def capture_sizes(max_bs: int) -> list[int]:
    return bucket_sizes(_SIZES, 64, max_bs)


class DecodeGraphs:
    def __init__(
        self,
        forward: Callable[[torch.Tensor, torch.Tensor, AttentionMetadata], torch.Tensor],
        attn,
        block_table: torch.Tensor,
        max_bs: int,
        max_seq_len: int,
        num_kv_splits: Callable[[int], int],
        device: torch.device,
    ):
        """`forward(src_rows, positions, meta)` is the decode body: gather the rows' last tokens, run the model,
        return logits [G, vocab]."""
        self.forward = forward
        self.attn = attn
        self.block_table = block_table
        self.max_seq_len = max_seq_len
        self.num_kv_splits = num_kv_splits
        self.device = device
        self.sizes = capture_sizes(max_bs)
        self.max_bs = self.sizes[-1]
        self.static = torch.zeros(graph_buffer_size(self.max_bs), dtype=torch.int32, device=device)
        self._arange = torch.arange(self.max_bs, dtype=torch.int32, device=device)
        self._ones = torch.ones(self.max_bs, dtype=torch.int32, device=device)
        self.graphs: dict[int, torch.cuda.CUDAGraph] = {}
        self.logits: dict[int, torch.Tensor] = {}
        self.metas: dict[int, AttentionMetadata] = {}

    def size_for(self, batch: int) -> int | None:
        return next((g for g in self.sizes if g >= batch), None)

    def meta(self, g: int, views: dict[str, torch.Tensor], host: StepInputs | None) -> AttentionMetadata:
        rows_h = host.rows if host is not None else np.zeros(g, np.int32)
        lens_h = host.seq_lens if host is not None else np.zeros(g, np.int32)
        return AttentionMetadata(
            num_tokens=g,
            is_decode=True,
            max_q_len=1,
            max_seq_len=self.max_seq_len,
            slot_mapping=views["slots"],
            rows=views["src_rows"],
            seq_lens=views["seq_lens"],
            q_start=self._arange[:g],
            q_lens=self._ones[:g],
            block_table=self.block_table,
            rows_host=rows_h,
            seq_lens_host=lens_h,
            q_lens_host=np.ones(len(rows_h), np.int32),
            page_tables_host=getattr(host, "page_tables", None),
            num_kv_splits=self.num_kv_splits(g),
        )

    @torch.inference_mode()
    def capture(self) -> None:
        t0 = time.perf_counter()
        pool = torch.cuda.graph_pool_handle()
        self.static.zero_()  # every row: page 0, seq_len 0 (padding)
        for g in reversed(self.sizes):  # largest first, so the smaller graphs reuse its pool blocks
            views = graph_views(self.static, g)
            meta = self.meta(g, views, None)
            self.metas[g] = meta
            positions = views["positions"].view(3, g)
            if hasattr(self.attn, "prepare_graph"):
                self.attn.prepare_graph(g, meta)
            for _ in range(2):  # warm-up: lazy initialisation and kernel compilation stay out of the graph
                self.forward(views["src_rows"], positions, meta)
            torch.cuda.synchronize(self.device)
            graph = torch.cuda.CUDAGraph()
            with torch.cuda.graph(graph, pool=pool):
                self.logits[g] = self.forward(views["src_rows"], positions, meta)
            self.graphs[g] = graph
        torch.cuda.synchronize(self.device)
        logger.info(
            "captured %d decode CUDA graphs (batch sizes %s) in %.1f s",
            len(self.sizes),
            ",".join(map(str, self.sizes)),
            time.perf_counter() - t0,
        )

    def stage(self, inputs: StepInputs) -> dict[str, torch.Tensor]:
        """Copy the step into the static buffer (one copy) and let the backend plan; the step's device sections."""
        g = inputs.graph_size
        views = inputs.to_device(self.device, self.static)
        if hasattr(self.attn, "prepare_graph"):
            self.attn.prepare_graph(g, self.meta(g, graph_views(self.static, g), inputs))
        return views

    def replay(self, g: int, batch: int) -> torch.Tensor:
        """Logits [batch, vocab] of the staged step."""
        self.graphs[g].replay()
        return self.logits[g][:batch]
