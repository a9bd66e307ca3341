"""Qwen2.5-VL vision tower: patch embedding, window- and full-attention blocks with 2D rotary, 2x2 patch merger;
and its per-forward metadata (window order, segments, positions), built once on the host and copied in one piece.

Runs in the vision service. Parameter names match the Hub checkpoint's `visual.*` keys (gate/up fused on load).
`forward_padded` takes static shapes and does no host work, so a fixed padded size can be captured in a CUDA graph.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from kernels.vision import (
    ATTN_BLOCK_M,
    VISION_ATTENTION_BACKENDS,
    Segments,
    VisionRotaryAttention,
    resolve_vision_attention,
    tile_table,
)
from models.layers import MergedGatedMLP, RMSNorm
from processor.model_config import ModelConfig, VisionConfig

Grid = tuple[int, int, int]


# ---- metadata (host) -------------------------------------------------------------------------------------------


def _window_side(cfg: VisionConfig) -> int:
    """Merged units per window side; 0 for a tower without windowed attention (window_size 0, as Qwen2-VL's)."""
    if cfg.window_size <= 0:
        return 0
    side = cfg.window_size // cfg.spatial_merge_size // cfg.patch_size
    if side < 1:
        raise ValueError(f"window_size {cfg.window_size} is smaller than one merged patch")
    return side


@dataclass(frozen=True)
class PaddedShape:
    """Static sizes of a padded forward (what a CUDA graph fixes): rows = real patches then padding, and the
    capacities of the segment lists. Padding rows form their own segments: windows of at most `max_window` rows
    and one full-attention segment."""

    num_rows: int
    max_frames: int  # frames (images, video frames) a batch may hold
    max_window: int  # rows of the largest window
    window_segments: int
    full_segments: int

    @classmethod
    def for_rows(cls, cfg: VisionConfig, num_rows: int, max_frames: int) -> PaddedShape:
        unit, side = cfg.spatial_merge_size**2, _window_side(cfg)
        if num_rows <= 0 or num_rows % unit or max_frames < 1:
            raise ValueError(f"padded rows {num_rows} must be a positive multiple of {unit}; max_frames >= 1")
        if side == 0:  # no windowed blocks: no window segments at all
            return cls(num_rows, max_frames, 0, 0, max_frames + 1)
        max_window = side * side * unit
        # a frame of gh x gw merged units makes ceil(gh/side)*ceil(gw/side) < gh*gw/side + 1 windows
        real = num_rows // (unit * side) + max_frames + 1
        return cls(num_rows, max_frames, max_window, real + -(-num_rows // max_window), max_frames + 1)


def _image_windows(t: int, h: int, w: int, merge: int, side: int) -> tuple[np.ndarray, np.ndarray]:
    """One image: its merged units in window order, and the units in each non-empty window."""
    gh, gw = h // merge, w // merge
    nh, nw = -(-gh // side), -(-gw // side)
    padded = np.full((t, nh * side, nw * side), -1, dtype=np.int64)
    padded[:, :gh, :gw] = np.arange(t * gh * gw).reshape(t, gh, gw)
    windows = padded.reshape(t, nh, side, nw, side).transpose(0, 1, 3, 2, 4).reshape(t * nh * nw, side * side)
    valid = windows >= 0
    counts = valid.sum(-1)
    return windows[valid], counts[counts > 0]


def _image_positions(t: int, h: int, w: int, merge: int) -> np.ndarray:
    """(row, column) of every patch in the merged-block-major order the image processor emits: [t*h*w, 2]."""
    shape = (h // merge, merge, w // merge, merge)
    rows = np.broadcast_to(np.arange(h)[:, None], (h, w)).reshape(shape).transpose(0, 2, 1, 3).reshape(-1)
    cols = np.broadcast_to(np.arange(w)[None, :], (h, w)).reshape(shape).transpose(0, 2, 1, 3).reshape(-1)
    return np.tile(np.stack([rows, cols], axis=-1), (t, 1))


def _bounds(lengths: list[int], capacity: int | None) -> np.ndarray:
    """cu_seqlens of `lengths`, padded to capacity + 1 entries by repeating the total (empty segments)."""
    if capacity is not None and len(lengths) > capacity:
        raise ValueError(f"{len(lengths)} attention segments exceed the capacity {capacity}")
    cu = np.zeros((len(lengths) if capacity is None else capacity) + 1, dtype=np.int64)
    cu[1 : len(lengths) + 1] = np.cumsum(lengths, dtype=np.int64)
    cu[len(lengths) + 1 :] = cu[len(lengths)]
    return cu


@dataclass(frozen=True)
class VisionMetadata:
    """Everything a forward needs besides the pixels; device tensors are views of one int32 buffer (`packed`)."""

    num_patches: int  # real patches; rows past them are padding
    num_rows: int
    num_tokens: int  # merged embeddings of the real patches
    unit_order: torch.Tensor  # [num_rows / unit] int32: source merged unit of each unit in window order
    unit_inverse: torch.Tensor  # [num_rows / unit] int32: window-order position of each source unit
    positions: torch.Tensor  # [num_rows, 2] int32: (row, column) of each patch, in window order
    window: Segments  # windowed-attention blocks
    full: Segments  # full-attention blocks: each frame attends within itself
    packed: torch.Tensor  # [size] int32


def _segment_lengths(
    grids: Sequence[Grid], cfg: VisionConfig, pad: PaddedShape | None
) -> tuple[np.ndarray, np.ndarray, list[int], list[int]]:
    """Merged units in window order [num_rows / unit], patch positions in that order [num_rows, 2], and the
    lengths of the windowed and of the full-attention segments (padding rows in segments of their own)."""
    merge, side = cfg.spatial_merge_size, _window_side(cfg)
    unit = merge * merge
    orders, window_lengths, full_lengths, positions = [], [], [], []
    base = 0
    for t, h, w in grids:
        if side:
            order, counts = _image_windows(t, h, w, merge, side)
            orders.append(order + base)
            window_lengths.extend((counts * unit).tolist())
        else:  # no windows: the units stay in the processor's order
            orders.append(np.arange(base, base + t * (h // merge) * (w // merge)))
        full_lengths.extend([h * w] * t)
        positions.append(_image_positions(t, h, w, merge))
        base += t * (h // merge) * (w // merge)
    num_rows = base * unit if pad is None else pad.num_rows
    if num_rows < base * unit or (pad is not None and len(full_lengths) > pad.max_frames):
        raise ValueError(f"{base * unit} patches in {len(full_lengths)} frames do not fit {pad}")
    padding = num_rows - base * unit
    if pad is not None and padding:
        if pad.max_window:
            window_lengths.extend([pad.max_window] * (padding // pad.max_window))
            window_lengths.extend([padding % pad.max_window] if padding % pad.max_window else [])
        full_lengths.append(padding)
    order = np.concatenate([*orders, np.arange(base, num_rows // unit)])
    pos = np.zeros((num_rows, 2), dtype=np.int64)
    if positions:
        pos[: base * unit] = np.concatenate(positions).reshape(base, unit, 2)[order[:base]].reshape(-1, 2)
    return order, pos, window_lengths, full_lengths


def _uniform(lengths: list[int], pad: PaddedShape | None) -> int:
    """The common segment length when there is one (never for padded metadata: a graph's layout varies)."""
    return lengths[0] if pad is None and lengths and lengths[0] and len(set(lengths)) == 1 else 0


def build_vision_metadata(
    grids: Sequence[Grid],
    cfg: VisionConfig,
    device: torch.device | str,
    pad: PaddedShape | None = None,
    out: torch.Tensor | None = None,
) -> VisionMetadata:
    """Metadata of the patches of `grids` (concatenated in order), exact or padded to `pad`, built on the host and
    copied in one piece: into `out` (a previous metadata's `packed` of the same PaddedShape, e.g. a CUDA graph's
    static buffer) when given, else to a new tensor on `device`."""
    order, pos, window_lengths, full_lengths = _segment_lengths(grids, cfg, pad)
    unit = cfg.spatial_merge_size**2
    num_tokens = sum(t * h * w for t, h, w in grids) // unit
    inverse = np.empty_like(order)
    inverse[order] = np.arange(len(order))
    cu_window = _bounds(window_lengths, None if pad is None else pad.window_segments)
    cu_full = _bounds(full_lengths, None if pad is None else pad.full_segments)
    if pad is None:
        window_cap = full_cap = None
        max_window, max_full = max(window_lengths, default=0), max(full_lengths, default=0)
    else:
        window_cap = pad.window_segments * -(-pad.max_window // ATTN_BLOCK_M)
        full_cap = pad.num_rows // ATTN_BLOCK_M + pad.full_segments
        max_window, max_full = pad.max_window, pad.num_rows
    tiles_window = tile_table(cu_window, ATTN_BLOCK_M, window_cap)
    tiles_full = tile_table(cu_full, ATTN_BLOCK_M, full_cap)

    sections = [order, inverse, pos.ravel(), cu_window, cu_full, tiles_window.ravel(), tiles_full.ravel()]
    host = torch.from_numpy(np.concatenate(sections).astype(np.int32))
    device = torch.device(device) if out is None else out.device
    if device.type == "cuda":
        host = host.pin_memory()  # an asynchronous copy, ordered before the forward on the same stream
    if out is None:
        packed = host.to(device, non_blocking=True)
    elif out.shape != host.shape:
        raise ValueError(f"metadata buffer {tuple(out.shape)} != {tuple(host.shape)}: another PaddedShape")
    else:
        packed = out.copy_(host, non_blocking=True)
    o, inv, p, cw, cf, tw, tf = packed.split([len(s) for s in sections])
    return VisionMetadata(
        num_patches=num_tokens * unit,
        num_rows=len(pos),
        num_tokens=num_tokens,
        unit_order=o,
        unit_inverse=inv,
        positions=p.view(-1, 2),
        window=Segments(
            cw, max_window, tuple(cu_window.tolist()), tw.view(-1, 2), _uniform(window_lengths, pad)
        ),
        full=Segments(cf, max_full, tuple(cu_full.tolist()), tf.view(-1, 2), _uniform(full_lengths, pad)),
        packed=packed,
    )


# ---- modules ---------------------------------------------------------------------------------------------------


class Qwen2_5_VisionPatchEmbed(nn.Module):
    def __init__(self, cfg: VisionConfig):
        super().__init__()
        k = (cfg.temporal_patch_size, cfg.patch_size, cfg.patch_size)
        self.proj = nn.Conv3d(cfg.in_channels, cfg.hidden_size, kernel_size=k, stride=k, bias=False)

    def fold_still_kernel(self, align: int | None = None) -> None:
        """Keeps the kernel summed over T for still images ([hidden, C*P*P], a non-persistent buffer), its columns
        zero-padded to a multiple of `align` (default: 8 on CUDA, a row of 16 bytes; none elsewhere). A still
        patch of C*P*P = 588 bf16 is 1,176 bytes, a row stride cuBLAS runs in an sm80 kernel: 10,764 patches
        (a 1092x1932 photo) took 116 us against 32 us at 592 columns on an H100. Called after loading; a tower
        whose weights were set otherwise folds them each forward."""
        folded = self._summed_over_t()
        align = align or (8 if folded.is_cuda else 1)
        self.register_buffer("folded_still", F.pad(folded, (0, -folded.shape[1] % align)), persistent=False)

    def _summed_over_t(self) -> torch.Tensor:
        w = self.proj.weight  # [hidden, C, T, P, P] -> [hidden, C*P*P]
        return w.float().sum(2).to(w.dtype).reshape(w.shape[0], -1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        # x: [N, C*T*P*P], or [N, C*P*P] for still images -> [N, hidden]. A stride-equals-kernel conv on one patch
        # is a matmul with the flattened kernel; over T identical frames, with the kernel summed over T.
        w = self.proj.weight  # [hidden, C, T, P, P]
        if x.shape[1] == w[0].numel():
            return F.linear(x.to(w.dtype), w.reshape(w.shape[0], -1))
        if x.shape[1] == w[0, :, 0].numel():
            folded = getattr(self, "folded_still", None)
            if folded is None:
                return F.linear(x.to(w.dtype), self._summed_over_t())
            x = x.to(w.dtype)
            if folded.shape[1] != x.shape[1]:
                x = F.pad(x, (0, folded.shape[1] - x.shape[1]))
            return F.linear(x, folded)
        raise ValueError(
            f"pixel patches of {x.shape[1]} values; expected {w[0].numel()} or {w[0, :, 0].numel()}"
        )


class Qwen2_5_VLVisionAttention(nn.Module):
    def __init__(self, cfg: VisionConfig):
        super().__init__()
        self.num_heads = cfg.num_heads
        self.head_dim = cfg.hidden_size // cfg.num_heads
        self.qkv = nn.Linear(cfg.hidden_size, 3 * cfg.hidden_size, bias=True)
        self.proj = nn.Linear(cfg.hidden_size, cfg.hidden_size, bias=True)

    def attend(self, x, seg: Segments, cos, sin, attention: VisionRotaryAttention) -> torch.Tensor:
        """The attention output before `proj`: x [N, hidden]; cos, sin [N, head_dim] float32 -> [N, hidden]."""
        n = x.shape[0]
        q, k, v = self.qkv(x).view(n, 3, self.num_heads, self.head_dim).unbind(1)
        o = attention(q, k, v, cos, sin, seg, self.head_dim**-0.5)  # [N, heads, head_dim]
        return o.reshape(n, -1)

    def forward(self, x, seg: Segments, cos, sin, attention: VisionRotaryAttention) -> torch.Tensor:
        return self.proj(self.attend(x, seg, cos, sin, attention))


class Qwen2_5_VLVisionBlock(nn.Module):
    def __init__(self, cfg: VisionConfig):
        super().__init__()
        self.norm1 = RMSNorm(cfg.hidden_size, 1e-6)
        self.norm2 = RMSNorm(cfg.hidden_size, 1e-6)
        self.attn = Qwen2_5_VLVisionAttention(cfg)
        self.mlp = MergedGatedMLP(cfg.hidden_size, cfg.intermediate_size, cfg.hidden_act, bias=True)

    def forward(self, stream, seg, cos, sin, attention, shifts) -> torch.Tensor:
        """stream [N, hidden]: the residual stream less the output projections' biases, which are carried in
        `shifts` ([2, hidden] float32: what is missing before norm1 and before norm2) and added inside the
        norms. So each residual add is the projection GEMM accumulating into the stream in place (cuBLAS reads
        it as C), and each norm reads one tensor and writes one: two passes over [N, hidden] fewer a block than
        a separate bias, add and norm. Updated in place and returned."""
        h = self.norm1(stream, shift=shifts[0])
        stream.addmm_(self.attn.attend(h, seg, cos, sin, attention), self.attn.proj.weight.t())
        h = self.norm2(stream, shift=shifts[1])
        return stream.addmm_(self.mlp.activate(h), self.mlp.down_proj.weight.t())


class Qwen2_5_VLPatchMerger(nn.Module):
    def __init__(self, cfg: VisionConfig):
        super().__init__()
        self.hidden = cfg.hidden_size * cfg.spatial_merge_size**2
        self.ln_q = RMSNorm(cfg.hidden_size, 1e-6)
        self.mlp = nn.Sequential(
            nn.Linear(self.hidden, self.hidden), nn.GELU(), nn.Linear(self.hidden, cfg.out_hidden_size)
        )

    def forward(self, x: torch.Tensor, shift: torch.Tensor | None = None) -> torch.Tensor:
        # x (+ shift, [hidden] float32): [N, hidden] -> [N / merge^2, out_hidden]; the normed rows are viewed
        h = self.ln_q(x, shift=shift)
        return self.mlp(h.view(-1, self.hidden))


class Qwen2_5_VisionTransformer(nn.Module):
    """pixel patches [N, C*T*P*P] (or [N, C*P*P] for still images) + grids -> merged embeddings
    [N / merge^2, out_hidden_size], image by image in the order given."""

    checkpoint_prefixes = (("model.visual.", ""), ("visual.", ""))
    hub_prefix = "visual."  # where the Hub checkpoint keeps our names (the tiny-model builder writes there)
    packed_modules_mapping: dict[str, tuple[str, ...]] = {"gate_up_proj": ("gate_proj", "up_proj")}

    def __init__(self, config: ModelConfig):
        super().__init__()
        cfg = config.vision
        assert cfg is not None
        self.cfg = cfg
        self.patch_embed = Qwen2_5_VisionPatchEmbed(cfg)
        head_dim = cfg.hidden_size // cfg.num_heads
        spatial = head_dim // 2
        # a plain attribute on the CPU, not a buffer: the model is built on the meta device before loading; moved
        # by the first forward (before any CUDA graph is captured)
        self.inv_freq = 1.0 / (
            10000.0 ** (torch.arange(0, spatial, 2, dtype=torch.float, device="cpu") / spatial)
        )
        self.blocks = nn.ModuleList([Qwen2_5_VLVisionBlock(cfg) for _ in range(cfg.depth)])
        self.merger = Qwen2_5_VLPatchMerger(cfg)
        self.full_blocks = frozenset(cfg.fullatt_block_indexes)
        self.attention_backend = "auto"

    def tie_weights(self) -> None:
        pass

    def process_weights_after_loading(self) -> None:
        self.patch_embed.fold_still_kernel()
        for block in self.blocks:  # 7B's 3,420 is not a multiple of 8: its down GEMM fell to an sm80 kernel
            block.mlp.pad_intermediate(64)
        # a buffer (moves with the module, not saved): 64 bias conversions a forward cost 0.2 ms of launches
        self.register_buffer("folded_bias_shifts", self.bias_shifts(), persistent=False)

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
        freqs = (positions[..., None].float() * self.inv_freq).flatten(1)  # [N, head_dim / 2]
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
        backend = VISION_ATTENTION_BACKENDS[
            resolve_vision_attention(self.attention_backend, pixel_values.device, self.dtype)
        ]
        window_attention, full_attention = backend.with_rotary(True), backend.with_rotary(False)
        x = self.patch_embed(pixel_values)  # [R, hidden]
        rows, hidden = x.shape
        units = meta.unit_order.shape[0]
        # window order; a new tensor, which the blocks update in place
        x = x.view(units, -1).index_select(0, meta.unit_order).view(rows, hidden)
        cos, sin = self.rotary(meta.positions)
        # computed once after loading; a tower whose weights were set otherwise sums them each forward
        shifts = getattr(self, "folded_bias_shifts", None)
        shifts = self.bias_shifts() if shifts is None else shifts
        for i, block in enumerate(self.blocks):
            if i in self.full_blocks:
                x = block(x, meta.full, cos, sin, full_attention, shifts[2 * i : 2 * i + 2])
            else:
                x = block(x, meta.window, cos, sin, window_attention, shifts[2 * i : 2 * i + 2])
        merged = self.merger(x, shifts[-1])  # [R / unit, out_hidden], window order
        return merged.index_select(0, meta.unit_inverse)

    def bias_shifts(self) -> torch.Tensor:
        """[2 * depth + 1, hidden] float32: the sum of the output projections' biases (attention proj, MLP down)
        before each norm, in order: what the blocks' residual stream leaves out (Qwen2_5_VLVisionBlock)."""
        biases = []
        for block in self.blocks:
            for linear in (block.attn.proj, block.mlp.down_proj):
                w = linear.weight
                biases.append(
                    linear.bias.float()
                    if linear.bias is not None
                    else torch.zeros(w.shape[0], device=w.device, dtype=torch.float32)
                )
        stacked = torch.stack(biases)  # [2 * depth, hidden]
        return torch.cat([stacked.new_zeros(1, stacked.shape[1]), stacked.cumsum(0)])
