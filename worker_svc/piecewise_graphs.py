"""Piecewise CUDA graphs of prompt steps: the forward of a padded token count, split at attention.

A prompt (or mixed) step runs ~10 kernels a layer; launched one by one from Python they cost ~20 ms of host time
for a 7B model, far longer than the GPU needs for a few hundred tokens. Attention is the only part whose work
depends on how the step's tokens split into sequences and on their cached prefixes; everything between two
attentions (o_proj, norms, MLP, the next qkv_proj and rotary) depends only on the number of tokens. So, as vLLM's
and SGLang's piecewise graphs do, each token bucket T is captured as num_layers + 1 graphs: the first embeds-to-qkv,
one per layer boundary, and the last ending at the final norm. A step with n <= T tokens copies its embeddings and
positions into static buffers, replays piece 0, then for each layer runs the backend's attention eagerly (KV store
and attention, with the step's real metadata, on the first n rows) and replays the next piece. Rows n..T-1 are
padding: every op between attentions works row by row, so they never touch the real rows, and attention never
reads them.

Every bucket's pieces share one memory pool (captured largest first; one bucket runs at a time), and the static
buffers (embeddings, positions, q/k/v, attention output) are shared by all buckets.
"""

from __future__ import annotations

import logging
import time

import torch

from worker_svc.attention.base import AttentionMetadata
from worker_svc.cuda_graphs import bucket_sizes

logger = logging.getLogger(__name__)

_SIZES = (8, 16, 32, 48, 64, 96, 128, 160, 192, 224, 256, 320, 384, 448, 512, 640, 768, 896, 1024)


def token_sizes(max_tokens: int) -> list[int]:
    """Captured token counts up to `max_tokens`: the table, then steps of 256."""
    return bucket_sizes(_SIZES, 256, max_tokens) if max_tokens > 0 else []


class _Cut:
    """Stands in for the attention backend while pieces are captured: copies q, k, v into the static buffers,
    ends the current graph and begins the next; the attention output is the static output buffer (it is written
    between the two pieces at replay)."""

    def __init__(self, owner: PiecewiseGraphs):
        self.owner = owner
        self.pool = None
        self.pieces: list[torch.cuda.CUDAGraph] | None = None  # None: warm-up, nothing is captured

    def begin(self) -> None:
        graph = torch.cuda.CUDAGraph()
        graph.capture_begin(pool=self.pool)
        self.pieces.append(graph)

    def forward(self, layer_idx: int, q, k, v, meta, **layer_kwargs) -> torch.Tensor:
        # layer_kwargs: a layer's static attention options (Gemma 3's sliding window), replayed with it
        self.owner.layer_kwargs[layer_idx] = layer_kwargs
        n = q.shape[0]
        sq, sk, sv = self.owner.qkv(n)
        sq.copy_(q)
        sk.copy_(k)
        sv.copy_(v)
        if self.pieces is not None:
            self.pieces[-1].capture_end()
            self.begin()
        return self.owner.out[:n]


class PiecewiseGraphs:
    def __init__(self, model, attn, max_tokens: int, device: torch.device, dtype: torch.dtype):
        text = model.config.text
        self.model = model
        self.attn = attn
        self.layer_kwargs: dict[int, dict] = {}  # per layer, the options its attention call passes
        self.device = device
        self.sizes = token_sizes(max_tokens)
        self.max_tokens = self.sizes[-1]
        self.num_layers = text.num_hidden_layers
        self.heads, self.kv_heads, self.head_dim = (
            text.num_attention_heads,
            text.num_key_value_heads,
            text.head_dim,
        )
        t = self.max_tokens
        self.embeds = torch.zeros(t, text.hidden_size, dtype=dtype, device=device)
        self._positions = torch.zeros(3 * t, dtype=torch.int32, device=device)
        q_size, kv_size = self.heads * self.head_dim, self.kv_heads * self.head_dim
        self._qkv = torch.zeros(t, q_size + 2 * kv_size, dtype=dtype, device=device)
        self.out = torch.zeros(t, self.heads, self.head_dim, dtype=dtype, device=device)
        self.pieces: dict[int, list[torch.cuda.CUDAGraph]] = {}
        self.hidden: dict[int, torch.Tensor] = {}
        self.replays = 0  # steps run through the graphs (tests and logs)

    def size_for(self, num_tokens: int) -> int | None:
        return next((t for t in self.sizes if t >= num_tokens), None)

    def positions(self, t: int) -> torch.Tensor:
        return self._positions[: 3 * t].view(3, t)

    def qkv(self, n: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """Views of the static q/k/v rows [n, heads, head_dim], laid out as the fused projection lays them."""
        q_size, kv_size = self.heads * self.head_dim, self.kv_heads * self.head_dim
        q, k, v = self._qkv[:n].split([q_size, kv_size, kv_size], dim=-1)
        return (
            q.view(n, self.heads, self.head_dim),
            k.view(n, self.kv_heads, self.head_dim),
            v.view(n, self.kv_heads, self.head_dim),
        )

    @torch.inference_mode()
    def capture(self) -> None:
        t0 = time.perf_counter()
        cut = _Cut(self)
        cut.pool = torch.cuda.graph_pool_handle()
        stream = torch.cuda.Stream(self.device)
        self.model.attn = cut
        try:
            for t in reversed(self.sizes):  # largest first: the smaller buckets reuse its pool blocks
                embeds, positions = self.embeds[:t], self.positions(t)
                cut.pieces = None
                for _ in range(
                    2
                ):  # warm-up: kernel compilation and lazy initialisation stay out of the graphs
                    self.model(embeds, positions, None)
                torch.cuda.synchronize(self.device)
                cut.pieces = []
                with torch.cuda.stream(stream):
                    cut.begin()
                    self.hidden[t] = self.model(embeds, positions, None)
                    cut.pieces[-1].capture_end()
                torch.cuda.current_stream(self.device).wait_stream(stream)
                if len(cut.pieces) != self.num_layers + 1:
                    raise RuntimeError(f"expected {self.num_layers + 1} pieces, captured {len(cut.pieces)}")
                self.pieces[t] = cut.pieces
        finally:
            self.model.attn = self.attn
        torch.cuda.synchronize(self.device)
        logger.info(
            "captured piecewise CUDA graphs of prompt steps (%d pieces each; token counts %s) in %.1f s",
            self.num_layers + 1,
            ",".join(map(str, self.sizes)),
            time.perf_counter() - t0,
        )

    def forward(self, embeds: torch.Tensor, positions: torch.Tensor, meta: AttentionMetadata) -> torch.Tensor:
        """Final hidden states [n, hidden] of a step of n <= max_tokens tokens (embeds [n, hidden], positions
        [3, n]); the backend has been prepared with `meta`."""
        n = embeds.shape[0]
        t = self.size_for(n)
        self.embeds[:n].copy_(embeds)
        self.positions(t)[:, :n].copy_(positions)
        pieces = self.pieces[t]
        pieces[0].replay()
        q, k, v = self.qkv(n)
        out = self.out[:n]
        for layer in range(self.num_layers):
            self.attn.forward(layer, q, k, v, meta, out=out, **self.layer_kwargs.get(layer, {}))
            pieces[layer + 1].replay()
        self.replays += 1
        return self.hidden[t][:n]
