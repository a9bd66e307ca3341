"""Qwen2.5-VL vision tower: patch embedding, window- and full-attention blocks with 2D rotary, 2x2 patch merger.

Runs in the vision service. Parameter names match the Hub checkpoint's `visual.*` keys.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
import torch.nn.functional as F
from torch import nn

from models.layers import GatedMLP, RMSNorm, rotate_half
from processor.model_config import ModelConfig, VisionConfig

Grid = tuple[int, int, int]


def window_index(
    grids: Sequence[Grid], merge: int, window_size: int, patch_size: int
) -> tuple[torch.Tensor, list[int]]:
    """Order of merged patch groups that makes each attention window contiguous, and the window boundaries in
    patches (cumulative)."""
    side = window_size // merge // patch_size  # merged units per window side
    unit = merge * merge
    order: list[torch.Tensor] = []
    cu = [0]
    base = 0
    for t, h, w in grids:
        gh, gw = h // merge, w // merge
        nh, nw = -(-gh // side), -(-gw // side)
        idx = torch.arange(t * gh * gw).reshape(t, gh, gw)
        padded = F.pad(idx, (0, nw * side - gw, 0, nh * side - gh), value=-1)
        windows = (
            padded.reshape(t, nh, side, nw, side).permute(0, 1, 3, 2, 4).reshape(t, nh * nw, side * side)
        )
        valid = windows >= 0
        order.append(windows[valid] + base)
        for n in valid.sum(-1).reshape(-1).tolist():
            if n:
                cu.append(cu[-1] + n * unit)
        base += t * gh * gw
    return torch.cat(order), cu


def full_attention_bounds(grids: Sequence[Grid]) -> list[int]:
    """Each frame of each image attends within itself."""
    cu = [0]
    for t, h, w in grids:
        cu.extend(cu[-1] + h * w * (i + 1) for i in range(t))
    return cu


def patch_positions(grids: Sequence[Grid], merge: int) -> torch.Tensor:
    """(row, column) of every patch in the merged-block-major order the image processor emits: [N, 2]."""
    out = []
    for t, h, w in grids:
        rows = torch.arange(h)[:, None].expand(h, w)
        cols = torch.arange(w)[None, :].expand(h, w)
        shape = (h // merge, merge, w // merge, merge)
        rows = rows.reshape(shape).transpose(1, 2).flatten()
        cols = cols.reshape(shape).transpose(1, 2).flatten()
        out.append(torch.stack([rows, cols], dim=-1).repeat(t, 1))
    return torch.cat(out)


def varlen_attention(
    q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, bounds: list[int], scale: float
) -> torch.Tensor:
    """Non-causal attention within each [bounds[i], bounds[i+1]) segment; segments of equal length run as one
    batch. q, k, v: [N, heads, head_dim] -> [N, heads, head_dim]."""
    out = torch.empty_like(q)
    by_len: dict[int, list[int]] = {}
    for lo, hi in zip(bounds[:-1], bounds[1:], strict=True):
        by_len.setdefault(hi - lo, []).append(lo)
    for length, starts in by_len.items():
        idx = (
            torch.tensor(starts, device=q.device)[:, None] + torch.arange(length, device=q.device)
        ).reshape(-1)
        shape = (len(starts), length, q.shape[1], q.shape[2])
        qs, ks, vs = (x[idx].reshape(shape).transpose(1, 2) for x in (q, k, v))
        o = F.scaled_dot_product_attention(qs, ks, vs, scale=scale)
        out[idx] = o.transpose(1, 2).reshape(-1, q.shape[1], q.shape[2])
    return out


class Qwen2_5_VisionPatchEmbed(nn.Module):
    def __init__(self, cfg: VisionConfig):
        super().__init__()
        k = (cfg.temporal_patch_size, cfg.patch_size, cfg.patch_size)
        self.proj = nn.Conv3d(cfg.in_channels, cfg.hidden_size, kernel_size=k, stride=k, bias=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        # x: [N, C*T*P*P]; a stride-equals-kernel conv on one patch is a matmul with the flattened kernel
        w = self.proj.weight
        return F.linear(x.to(w.dtype), w.reshape(w.shape[0], -1))


class Qwen2_5_VLVisionAttention(nn.Module):
    def __init__(self, cfg: VisionConfig):
        super().__init__()
        self.num_heads = cfg.num_heads
        self.head_dim = cfg.hidden_size // cfg.num_heads
        self.qkv = nn.Linear(cfg.hidden_size, 3 * cfg.hidden_size, bias=True)
        self.proj = nn.Linear(cfg.hidden_size, cfg.hidden_size, bias=True)

    def forward(
        self, x: torch.Tensor, bounds: list[int], cos: torch.Tensor, sin: torch.Tensor
    ) -> torch.Tensor:
        n = x.shape[0]
        q, k, v = self.qkv(x).reshape(n, 3, self.num_heads, self.head_dim).unbind(1)
        dtype = q.dtype
        cos, sin = cos[:, None, :], sin[:, None, :]
        q = (q.float() * cos + rotate_half(q.float()) * sin).to(dtype)
        k = (k.float() * cos + rotate_half(k.float()) * sin).to(dtype)
        o = varlen_attention(q, k, v, bounds, self.head_dim**-0.5)
        return self.proj(o.reshape(n, -1))


class Qwen2_5_VLVisionBlock(nn.Module):
    def __init__(self, cfg: VisionConfig):
        super().__init__()
        self.norm1 = RMSNorm(cfg.hidden_size, 1e-6)
        self.norm2 = RMSNorm(cfg.hidden_size, 1e-6)
        self.attn = Qwen2_5_VLVisionAttention(cfg)
        self.mlp = GatedMLP(cfg.hidden_size, cfg.intermediate_size, cfg.hidden_act, bias=True)

    def forward(self, x, bounds, cos, sin):
        x = x + self.attn(self.norm1(x), bounds, cos, sin)
        return x + self.mlp(self.norm2(x))


class Qwen2_5_VLPatchMerger(nn.Module):
    def __init__(self, cfg: VisionConfig):
        super().__init__()
        self.hidden = cfg.hidden_size * cfg.spatial_merge_size**2
        self.ln_q = RMSNorm(cfg.hidden_size, 1e-6)
        self.mlp = nn.Sequential(
            nn.Linear(self.hidden, self.hidden), nn.GELU(), nn.Linear(self.hidden, cfg.out_hidden_size)
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.mlp(self.ln_q(x).view(-1, self.hidden))


class Qwen2_5_VisionTransformer(nn.Module):
    """pixel patches [N, C*T*P*P] + grids -> merged embeddings [N / merge^2, out_hidden_size], image by image in
    the order given."""

    checkpoint_prefixes = (("model.visual.", ""), ("visual.", ""))
    packed_modules_mapping: dict[str, list[str]] = {}

    def __init__(self, config: ModelConfig):
        super().__init__()
        cfg = config.vision
        assert cfg is not None
        self.cfg = cfg
        self.patch_embed = Qwen2_5_VisionPatchEmbed(cfg)
        head_dim = cfg.hidden_size // cfg.num_heads
        spatial = head_dim // 2
        # a plain attribute on the CPU, not a buffer: the model is built on the meta device before loading
        self.inv_freq = 1.0 / (
            10000.0 ** (torch.arange(0, spatial, 2, dtype=torch.float, device="cpu") / spatial)
        )
        self.blocks = nn.ModuleList([Qwen2_5_VLVisionBlock(cfg) for _ in range(cfg.depth)])
        self.merger = Qwen2_5_VLPatchMerger(cfg)

    def tie_weights(self) -> None:
        pass

    @property
    def dtype(self) -> torch.dtype:
        return self.patch_embed.proj.weight.dtype

    def forward(self, pixel_values: torch.Tensor, grids: Sequence[Grid]) -> torch.Tensor:
        cfg = self.cfg
        unit = cfg.spatial_merge_size**2
        device = pixel_values.device
        order, window_bounds = window_index(grids, cfg.spatial_merge_size, cfg.window_size, cfg.patch_size)
        order = order.to(device)
        full_bounds = full_attention_bounds(grids)

        x = self.patch_embed(pixel_values)  # [N, hidden]
        n = x.shape[0]
        x = x.reshape(n // unit, unit, -1)[order].reshape(n, -1)

        pos = patch_positions(grids, cfg.spatial_merge_size).to(device)  # [N, 2]
        if self.inv_freq.device != device:
            self.inv_freq = self.inv_freq.to(device)
        freqs = (pos[..., None].float() * self.inv_freq).flatten(1)  # [N, head_dim/2]: h then w bands
        freqs = freqs.reshape(n // unit, unit, -1)[order].reshape(n, -1)
        emb = torch.cat([freqs, freqs], dim=-1)
        cos, sin = emb.cos(), emb.sin()

        full = set(cfg.fullatt_block_indexes)
        for i, block in enumerate(self.blocks):
            x = block(x, full_bounds if i in full else window_bounds, cos, sin)
        merged = self.merger(x)
        return merged[torch.argsort(order)]
