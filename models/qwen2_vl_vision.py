"""Qwen2-VL vision tower: Qwen2.5-VL's patch embedding, 2D rotary and attention, with LayerNorm blocks, a
fc1/fc2 MLP (QuickGELU) and a LayerNorm patch merger, and full attention within each frame in every block (no
windows, so no reordering).

Runs in the vision service. Parameter names match the Hub checkpoint's `visual.*` keys. Shares the metadata
(`build_vision_metadata`, `PaddedShape`) and the attention backends (kernels/vision.py) with Qwen2.5-VL, so the
vision service's CUDA graphs serve it unchanged.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import nn

from kernels.vision import VISION_ATTENTION_BACKENDS, Segments, resolve_vision_attention
from models.layers import ACTIVATIONS
from models.qwen2_5_vl_vision import (
    Grid,
    Qwen2_5_VisionPatchEmbed,
    Qwen2_5_VLVisionAttention,
    VisionMetadata,
    build_vision_metadata,
)
from processor.model_config import ModelConfig, VisionConfig

LAYER_NORM_EPS = 1e-6


class Qwen2VLVisionMLP(nn.Module):
    """fc2(act(fc1(x))), HF's VisionMlp."""

    def __init__(self, cfg: VisionConfig):
        super().__init__()
        self.fc1 = nn.Linear(cfg.hidden_size, cfg.intermediate_size)
        self.fc2 = nn.Linear(cfg.intermediate_size, cfg.hidden_size)
        self.act = ACTIVATIONS[cfg.hidden_act]

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc2(self.act(self.fc1(x)))


class Qwen2VLVisionBlock(nn.Module):
    def __init__(self, cfg: VisionConfig):
        super().__init__()
        self.norm1 = nn.LayerNorm(cfg.hidden_size, eps=LAYER_NORM_EPS)
        self.norm2 = nn.LayerNorm(cfg.hidden_size, eps=LAYER_NORM_EPS)
        self.attn = Qwen2_5_VLVisionAttention(cfg)
        self.mlp = Qwen2VLVisionMLP(cfg)

    def forward(self, x, seg: Segments, cos, sin, attention) -> torch.Tensor:
        # x: [N, hidden] -> [N, hidden]
        x = x + self.attn(self.norm1(x), seg, cos, sin, attention)
        return x + self.mlp(self.norm2(x))


class Qwen2VLPatchMerger(nn.Module):
    def __init__(self, cfg: VisionConfig):
        super().__init__()
        self.hidden = cfg.hidden_size * cfg.spatial_merge_size**2
        self.ln_q = nn.LayerNorm(cfg.hidden_size, eps=LAYER_NORM_EPS)
        self.mlp = nn.Sequential(
            nn.Linear(self.hidden, self.hidden), nn.GELU(), nn.Linear(self.hidden, cfg.out_hidden_size)
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        # x: [N, hidden] -> [N / merge^2, out_hidden]
        return self.mlp(self.ln_q(x).view(-1, self.hidden))


class Qwen2VisionTransformer(nn.Module):
    """pixel patches [N, C*T*P*P] (or [N, C*P*P] for still images) + grids -> merged embeddings
    [N / merge^2, out_hidden_size], image by image in the order given."""

    checkpoint_prefixes = (("model.visual.", ""), ("visual.", ""))
    hub_prefix = "visual."  # where the Hub checkpoint keeps our names (the tiny-model builder writes there)
    packed_modules_mapping: dict[str, tuple[str, ...]] = {}

    def __init__(self, config: ModelConfig):
        super().__init__()
        cfg = config.vision
        if cfg is None:
            raise ValueError(f"{config.architecture} has no vision_config")
        if cfg.window_size:
            raise ValueError("Qwen2-VL's tower has no windowed attention (window_size must be 0)")
        self.cfg = cfg
        self.patch_embed = Qwen2_5_VisionPatchEmbed(cfg)
        spatial = cfg.hidden_size // cfg.num_heads // 2
        # a plain attribute on the CPU, not a buffer: built on the meta device before loading; moved by the first
        # forward (before any CUDA graph is captured)
        self.inv_freq = 1.0 / (
            10000.0 ** (torch.arange(0, spatial, 2, dtype=torch.float, device="cpu") / spatial)
        )
        self.blocks = nn.ModuleList([Qwen2VLVisionBlock(cfg) for _ in range(cfg.depth)])
        self.merger = Qwen2VLPatchMerger(cfg)
        self.attention_backend = "auto"

    def tie_weights(self) -> None:
        pass

    def process_weights_after_loading(self) -> None:
        self.patch_embed.fold_still_kernel()

    @property
    def dtype(self) -> torch.dtype:
        return self.patch_embed.proj.weight.dtype

    def set_attention_backend(self, name: str) -> str:
        """Chooses the attention backend ("auto" or a kernels.vision.VISION_ATTENTION_BACKENDS name) for the
        weights' device and dtype; raises ValueError where it cannot run. Returns the resolved name."""
        w = self.patch_embed.proj.weight
        self.attention_backend = resolve_vision_attention(name, w.device, w.dtype)
        return self.attention_backend

    def rotary(self, positions: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        # positions: [N, 2] -> cos, sin: [N, head_dim] float32 (row bands, then column bands, twice)
        if self.inv_freq.device != positions.device:
            self.inv_freq = self.inv_freq.to(positions.device)
        freqs = (positions[..., None].float() * self.inv_freq).flatten(1)
        emb = torch.cat([freqs, freqs], dim=-1)
        return emb.cos(), emb.sin()

    def forward(self, pixel_values: torch.Tensor, grids: Sequence[Grid]) -> torch.Tensor:
        meta = build_vision_metadata(grids, self.cfg, pixel_values.device)
        if pixel_values.shape[0] != meta.num_rows:
            raise ValueError(f"{pixel_values.shape[0]} pixel patches for grids of {meta.num_rows}")
        return self.forward_padded(pixel_values, meta)

    def forward_padded(self, pixel_values: torch.Tensor, meta: VisionMetadata) -> torch.Tensor:
        """pixel patches [meta.num_rows, ...] -> [meta.num_rows / merge^2, out_hidden]: the images' embeddings
        in the first meta.num_tokens rows, padding after. No host work: capturable for a fixed PaddedShape."""
        attention = VISION_ATTENTION_BACKENDS[
            resolve_vision_attention(self.attention_backend, pixel_values.device, self.dtype)
        ].with_rotary(False)  # one segment per image
        x = self.patch_embed(pixel_values)  # [R, hidden], the processor's order (no windows to sort into)
        cos, sin = self.rotary(meta.positions)
        for block in self.blocks:
            x = block(x, meta.full, cos, sin, attention)
        return self.merger(x)
