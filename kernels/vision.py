"""Vision-tower kernels: rotate-half rotary with per-token cos/sin applied to q and k in one launch, and
non-causal attention within segments given by cu_seqlens, behind a registry of backends (`torch_native`, the
group-by-length SDPA reference; `varlen`, torch's flash-attention varlen_attn; `fa4`, flash-attn-4's CuTe DSL kernel
for whole images; `triton`, our kernel over a host-built tile table). Each Triton kernel has its torch reference
here."""

from __future__ import annotations

import functools
import inspect
import warnings
from collections.abc import Callable
from dataclasses import dataclass

import numpy as np
import torch
import torch.nn.functional as F

from kernels._triton import HAS_TRITON, INTERPRET, pdl_args, triton_enabled

try:  # torch >= 2.10; flash attention on CUDA for fp16/bf16 only (the CPU build has no kernel for it)
    from torch.nn.attention.varlen import varlen_attn as _varlen_attn

    HAS_VARLEN = True
    _VARLEN_TAKES_SCALE = "scale" in inspect.signature(_varlen_attn).parameters
except ImportError:
    HAS_VARLEN = False
    _VARLEN_TAKES_SCALE = False

# Query rows per program of the Triton attention kernel; tile tables are built for it.
ATTN_BLOCK_M = 64
ATTN_BLOCK_N = 64
# A padding tile's first row: past every segment, so the program loads and stores nothing.
_EMPTY_TILE_ROW = 1 << 30
HALF_DTYPES = (torch.float16, torch.bfloat16)


@dataclass(frozen=True)
class Segments:
    """Attention segments of a packed [N, heads, head_dim] batch: rows [cu[i], cu[i+1]) attend to each other."""

    cu_seqlens: torch.Tensor  # [num_segments + 1] int32 on the device (empty segments allowed)
    max_len: int  # an upper bound of the longest segment (static when padded for a CUDA graph)
    bounds: tuple[int, ...]  # cu_seqlens on the host, for the torch reference
    tiles: torch.Tensor  # [num_tiles, 2] int32 (segment, first row within it) for the Triton kernel
    uniform: int = 0  # the common length when every segment has it (eager metadata only): a dense batch


def tile_table(cu: np.ndarray, block_m: int = ATTN_BLOCK_M, capacity: int | None = None) -> np.ndarray:
    """One (segment, first row) entry per block_m query rows of each segment: [num_tiles, 2] int32, padded to
    `capacity` entries with tiles that cover no row (a static launch grid for a CUDA graph)."""
    lengths = np.diff(cu)
    per_segment = -(-lengths // block_m)
    total = int(per_segment.sum())
    if capacity is not None and total > capacity:
        raise ValueError(f"{total} attention tiles exceed the capacity {capacity}")
    segment = np.repeat(np.arange(len(lengths)), per_segment)
    first_tile = np.repeat(np.cumsum(per_segment) - per_segment, per_segment)
    out = np.empty((total if capacity is None else capacity, 2), dtype=np.int32)
    out[:total, 0] = segment
    out[:total, 1] = (np.arange(total) - first_tile) * block_m
    out[total:] = (0, _EMPTY_TILE_ROW)
    return out


# ---- rotary ----------------------------------------------------------------------------------------------------


def _rotate_half(x: torch.Tensor) -> torch.Tensor:
    x1, x2 = x.chunk(2, dim=-1)
    return torch.cat((-x2, x1), dim=-1)


def apply_vision_rotary_ref(
    q: torch.Tensor,  # [num_tokens, num_heads, head_dim], overwritten
    k: torch.Tensor,  # [num_tokens, num_heads, head_dim], overwritten
    cos: torch.Tensor,  # [num_tokens, head_dim] float32
    sin: torch.Tensor,  # [num_tokens, head_dim] float32
) -> None:
    """HF's apply_rotary_pos_emb_vision: x * cos + rotate_half(x) * sin in float32, cast back, in place."""
    c, s = cos[:, None, :], sin[:, None, :]
    for x in (q, k):
        xf = x.float()
        x.copy_((xf * c + _rotate_half(xf) * s).to(x.dtype))


if HAS_TRITON:
    import triton
    import triton.language as tl

    from kernels._triton import pdl_prologue

    @triton.jit
    def _rotate_tile(x_ptr, offs, mask, half: tl.constexpr, c1, c2, s1, s2):
        x1 = tl.load(x_ptr + offs, mask=mask, other=0.0).to(tl.float32)
        x2 = tl.load(x_ptr + offs + half, mask=mask, other=0.0).to(tl.float32)
        dtype = x_ptr.dtype.element_ty
        tl.store(x_ptr + offs, (x1 * c1 - x2 * s1).to(dtype), mask=mask)
        tl.store(x_ptr + offs + half, (x2 * c2 + x1 * s2).to(dtype), mask=mask)

    @triton.jit
    def _vision_rotary_kernel(
        q_ptr, k_ptr, cos_ptr, sin_ptr,
        stride_qt, stride_qh, stride_kt, stride_kh, stride_ct, stride_st,
        num_tokens, num_q_heads, num_k_heads,
        HALF: tl.constexpr, BLOCK_T: tl.constexpr, BLOCK_H: tl.constexpr, BLOCK_HALF: tl.constexpr,
        USE_PDL: tl.constexpr,
    ):  # fmt: skip
        """One program per BLOCK_T tokens, every head of q and of k at once: rows of the tile are (token, head)
        pairs, so each token's cos/sin row is read once per program (from L1 for the other heads). HALF is a
        compile-time constant so that the half-row mask is uniform over 16-byte groups (head_dim 80: 40 = 5 x 8
        bf16) and the loads vectorise; a runtime bound made them 2-byte loads (3x the bandwidth floor)."""
        pdl_prologue(USE_PDL)
        r = tl.arange(0, BLOCK_T * BLOCK_H)
        t = tl.program_id(0).to(tl.int64) * BLOCK_T + r // BLOCK_H
        h = r % BLOCK_H
        j = tl.arange(0, BLOCK_HALF)
        t_ok = (t < num_tokens)[:, None] & (j < HALF)[None, :]
        c_offs = t[:, None] * stride_ct + j[None, :]
        s_offs = t[:, None] * stride_st + j[None, :]
        c1 = tl.load(cos_ptr + c_offs, mask=t_ok, other=0.0)
        c2 = tl.load(cos_ptr + c_offs + HALF, mask=t_ok, other=0.0)
        s1 = tl.load(sin_ptr + s_offs, mask=t_ok, other=0.0)
        s2 = tl.load(sin_ptr + s_offs + HALF, mask=t_ok, other=0.0)
        q_offs = t[:, None] * stride_qt + h[:, None] * stride_qh + j[None, :]
        _rotate_tile(q_ptr, q_offs, t_ok & (h < num_q_heads)[:, None], HALF, c1, c2, s1, s2)
        k_offs = t[:, None] * stride_kt + h[:, None] * stride_kh + j[None, :]
        _rotate_tile(k_ptr, k_offs, t_ok & (h < num_k_heads)[:, None], HALF, c1, c2, s1, s2)


def apply_vision_rotary_triton(
    q: torch.Tensor,  # [num_tokens, num_heads, head_dim], head_dim contiguous (a view of the qkv output)
    k: torch.Tensor,  # [num_tokens, num_heads, head_dim], head_dim contiguous
    cos: torch.Tensor,  # [num_tokens, head_dim] float32, head_dim contiguous
    sin: torch.Tensor,  # [num_tokens, head_dim] float32, head_dim contiguous
) -> None:
    num_tokens, num_q_heads, head_dim = q.shape
    if num_tokens == 0:
        return
    if q.stride(2) != 1 or k.stride(2) != 1 or cos.stride(1) != 1 or sin.stride(1) != 1 or head_dim % 2:
        raise ValueError("vision rotary wants head_dim contiguous and even")
    half = head_dim // 2
    block_h = triton.next_power_of_2(max(num_q_heads, k.shape[1]))
    block_t = max(1, 128 // block_h)
    _vision_rotary_kernel[(triton.cdiv(num_tokens, block_t),)](
        q, k, cos, sin,
        q.stride(0), q.stride(1), k.stride(0), k.stride(1), cos.stride(0), sin.stride(0),
        num_tokens, num_q_heads, k.shape[1],
        HALF=half, BLOCK_T=block_t, BLOCK_H=block_h, BLOCK_HALF=triton.next_power_of_2(half), num_warps=8,
        **pdl_args(q),
    )  # fmt: skip


def apply_vision_rotary(q: torch.Tensor, k: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> None:
    """Rotates q and k [num_tokens, num_heads, head_dim] in place by per-token cos/sin [num_tokens, head_dim]
    (float32 arithmetic, rounded back to q's dtype)."""
    if triton_enabled(q):
        apply_vision_rotary_triton(q, k, cos, sin)
    else:
        apply_vision_rotary_ref(q, k, cos, sin)


# ---- attention -------------------------------------------------------------------------------------------------


def varlen_attention_ref(
    q: torch.Tensor,  # [N, heads, head_dim]
    k: torch.Tensor,
    v: torch.Tensor,
    seg: Segments,
    scale: float,
) -> torch.Tensor:  # [N, heads, head_dim]
    """The reference: segments of equal length run as one SDPA batch (one launch group per distinct length, index
    tensors built from host bounds: not capturable in a CUDA graph)."""
    out = torch.empty_like(q)
    by_len: dict[int, list[int]] = {}
    for lo, hi in zip(seg.bounds[:-1], seg.bounds[1:], strict=True):
        if hi > lo:
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


def _prefer_cudnn():
    """SDPA backends in the order measured fastest on an H100 at the tower's shapes (cuDNN, then flash)."""
    from torch.nn.attention import SDPBackend, sdpa_kernel

    order = [SDPBackend.CUDNN_ATTENTION, SDPBackend.FLASH_ATTENTION, SDPBackend.EFFICIENT_ATTENTION]
    try:
        return sdpa_kernel(order, set_priority=True)
    except TypeError:  # torch without set_priority: allow them all, torch picks
        return sdpa_kernel(order)


def varlen_attention_flash(
    q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, seg: Segments, scale: float
) -> torch.Tensor:
    """torch.nn.attention.varlen.varlen_attn (flash attention, CUDA, fp16/bf16); segments of one common length
    run as a dense batch through SDPA instead, where cuDNN's attention is faster on Hopper."""
    if seg.uniform:
        n, heads, d = q.shape
        dense = [x.view(n // seg.uniform, seg.uniform, heads, d).transpose(1, 2) for x in (q, k, v)]
        with _prefer_cudnn():
            o = F.scaled_dot_product_attention(*dense, scale=scale)
        return o.transpose(1, 2).reshape(n, heads, d)
    cu = seg.cu_seqlens
    if _VARLEN_TAKES_SCALE:
        return _varlen_attn(q, k, v, cu, cu, seg.max_len, seg.max_len, scale=scale)
    if abs(scale * q.shape[-1] ** 0.5 - 1.0) > 1e-6:  # older builds only apply the default scale
        raise ValueError("this torch's varlen_attn takes no scale; only 1/sqrt(head_dim) is supported")
    return _varlen_attn(q, k, v, cu, cu, seg.max_len, seg.max_len)


# flash-attn-4 (`flash_attn.cute`, CuTe DSL kernels; `pip install mirador[gpu]`): an FA3-class kernel on Hopper and
# Blackwell that runs head_dim 80 as 80, where cuDNN runs the tower's full-attention layers in a 128-wide kernel
# (1,092x1,932 photo: 1.23 ms a layer against cuDNN's 1.62 on an H100). Segments shorter than this stay on
# cuDNN / flash varlen, faster there (4 x 448^2: 125 against 157-170 us); BENCHMARKS.md has the rows.
FA4_MIN_SEGMENT = 2048
# head_dims whose flash-attn-4 path is measured and parity-tested here (the Qwen2-VL / Qwen2.5-VL towers'); other
# towers (SigLIP's 72) keep cuDNN / flash varlen under this backend
FA4_HEAD_DIMS = frozenset({80})


@functools.cache
def _fa4_varlen() -> Callable | None:
    """flash_attn.cute's varlen forward, imported on first use (cutlass-dsl takes a while to import); None where it
    is not installed or does not import."""
    try:
        from flash_attn.cute import flash_attn_varlen_func
    except Exception:  # noqa: BLE001 - absent, or a cutlass-dsl / CUDA build that does not load here
        return None
    # each first compile warns that an internal argument is not a JIT argument: noise in the service's log
    warnings.filterwarnings("ignore", message="Argument aux_data", category=UserWarning)
    return flash_attn_varlen_func


@functools.cache
def fa4_usable(device: torch.device) -> bool:
    """flash-attn-4 imports and `device` is a Hopper or newer GPU (its sm90/sm100 kernels)."""
    if device.type != "cuda" or not torch.cuda.is_available():
        return False
    return torch.cuda.get_device_capability(device)[0] >= 9 and _fa4_varlen() is not None


def varlen_attention_fa4(
    q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, seg: Segments, scale: float
) -> torch.Tensor:
    """flash-attn-4's varlen kernel (views of the qkv output as they are: head_dim contiguous) for segments that
    can reach FA4_MIN_SEGMENT rows at a head_dim of FA4_HEAD_DIMS; the rest through varlen_attention_flash. Rows no
    segment covers are left unwritten. No host work: capturable in a CUDA graph."""
    if seg.max_len < FA4_MIN_SEGMENT or q.shape[-1] not in FA4_HEAD_DIMS:
        return varlen_attention_flash(q, k, v, seg, scale)
    cu = seg.cu_seqlens
    out = _fa4_varlen()(
        q, k, v, cu_seqlens_q=cu, cu_seqlens_k=cu, max_seqlen_q=seg.max_len, max_seqlen_k=seg.max_len,
        softmax_scale=scale,
    )  # fmt: skip
    return out[0] if isinstance(out, tuple) else out  # (out, lse) in some releases


if HAS_TRITON:
    LOG2E = 1.4426950408889634

    def _dot_precision(dtype: torch.dtype) -> str:
        if INTERPRET and dtype != torch.float32:
            return "upcast"  # the interpreter would multiply 16-bit floats' bit patterns as integers
        return "ieee" if dtype == torch.float32 else "tf32"  # fp32 stays exact, not TF32

    @triton.jit
    def _dot(a, b, DOT_PRECISION: tl.constexpr):
        if DOT_PRECISION == "upcast":
            return tl.dot(a.to(tl.float32), b.to(tl.float32), input_precision="ieee")
        else:
            return tl.dot(a, b, input_precision=DOT_PRECISION)

    @triton.jit
    def _varlen_attention_kernel(
        q_ptr, k_ptr, v_ptr, o_ptr, cu_ptr, tiles_ptr,
        stride_qt, stride_qh, stride_kt, stride_kh, stride_vt, stride_vh, stride_ot, stride_oh,
        qk_scale,
        D: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_D: tl.constexpr,
        DOT_PRECISION: tl.constexpr, USE_PDL: tl.constexpr,
    ):  # fmt: skip
        """One program per (tile, head): BLOCK_M query rows of one segment against all of its keys (online
        softmax in the log2 domain, fp32). A padding tile starts past its segment and does nothing."""
        pdl_prologue(USE_PDL)
        tile = tl.program_id(0)
        head = tl.program_id(1)
        seg = tl.load(tiles_ptr + 2 * tile)
        first = tl.load(tiles_ptr + 2 * tile + 1)
        start = tl.load(cu_ptr + seg)
        end = tl.load(cu_ptr + seg + 1)
        rows = start + first + tl.arange(0, BLOCK_M)
        row_mask = rows < end
        offs_d = tl.arange(0, BLOCK_D)
        d_mask = offs_d < D
        rows64 = rows.to(tl.int64)
        q_ptrs = q_ptr + rows64[:, None] * stride_qt + head * stride_qh + offs_d[None, :]
        qb = tl.load(q_ptrs, mask=row_mask[:, None] & d_mask[None, :], other=0.0)
        m_i = tl.full([BLOCK_M], float("-inf"), tl.float32)
        l_i = tl.zeros([BLOCK_M], tl.float32)
        acc = tl.zeros([BLOCK_M, BLOCK_D], tl.float32)
        kv_end = tl.where(start + first < end, end, start)  # no keys for a padding tile
        for kv in range(start, kv_end, BLOCK_N):
            cols = kv + tl.arange(0, BLOCK_N)
            col_mask = cols < end
            cols64 = cols.to(tl.int64)
            kv_mask = col_mask[:, None] & d_mask[None, :]
            kb = tl.load(
                k_ptr + cols64[:, None] * stride_kt + head * stride_kh + offs_d[None, :],
                mask=kv_mask,
                other=0.0,
            )
            s = _dot(qb, tl.trans(kb), DOT_PRECISION) * qk_scale
            s = tl.where(col_mask[None, :], s, float("-inf"))
            m_new = tl.maximum(m_i, tl.max(s, 1))
            p = tl.exp2(s - m_new[:, None])
            alpha = tl.exp2(m_i - m_new)
            vb = tl.load(
                v_ptr + cols64[:, None] * stride_vt + head * stride_vh + offs_d[None, :],
                mask=kv_mask,
                other=0.0,
            )
            acc = acc * alpha[:, None] + _dot(p.to(vb.dtype), vb, DOT_PRECISION)
            l_i = l_i * alpha + tl.sum(p, 1)
            m_i = m_new
        o = acc / tl.where(l_i > 0, l_i, 1.0)[:, None]
        o_ptrs = o_ptr + rows64[:, None] * stride_ot + head * stride_oh + offs_d[None, :]
        tl.store(o_ptrs, o.to(o_ptr.dtype.element_ty), mask=row_mask[:, None] & d_mask[None, :])


def varlen_attention_triton(
    q: torch.Tensor,  # [N, heads, head_dim], head_dim contiguous (views of the qkv output)
    k: torch.Tensor,
    v: torch.Tensor,
    seg: Segments,  # tiles built with ATTN_BLOCK_M
    scale: float,
) -> torch.Tensor:  # [N, heads, head_dim]; rows no segment covers are left unwritten
    n, heads, head_dim = q.shape
    out = torch.empty(n, heads, head_dim, dtype=q.dtype, device=q.device)
    if n == 0 or seg.tiles.shape[0] == 0:
        return out
    if q.stride(2) != 1 or k.stride(2) != 1 or v.stride(2) != 1:
        raise ValueError("vision attention wants head_dim contiguous")
    _varlen_attention_kernel[(seg.tiles.shape[0], heads)](
        q, k, v, out, seg.cu_seqlens, seg.tiles,
        q.stride(0), q.stride(1), k.stride(0), k.stride(1), v.stride(0), v.stride(1), out.stride(0), out.stride(1),
        scale * LOG2E,
        D=head_dim, BLOCK_M=ATTN_BLOCK_M, BLOCK_N=ATTN_BLOCK_N, BLOCK_D=max(16, triton.next_power_of_2(head_dim)),
        DOT_PRECISION=_dot_precision(q.dtype), num_warps=4, num_stages=2, **pdl_args(q),
    )  # fmt: skip
    return out


def rotary_varlen_attention_ref(
    q: torch.Tensor,  # [N, heads, head_dim], rotated in place
    k: torch.Tensor,  # [N, heads, head_dim], rotated in place
    v: torch.Tensor,
    cos: torch.Tensor,  # [N, head_dim] float32
    sin: torch.Tensor,
    seg: Segments,
    scale: float,
) -> torch.Tensor:  # [N, heads, head_dim]
    """What the fused kernel computes: the rotary (rounded to q's dtype), then attention within segments."""
    apply_vision_rotary_ref(q, k, cos, sin)
    return varlen_attention_ref(q, k, v, seg, scale)


if HAS_TRITON:

    @triton.jit
    def _rotated_halves(x_ptr, c, s, rows64, stride_x, j, mask, HALF: tl.constexpr):
        """Rows of x (one head) rotated by their cos/sin tiles `c`, `s` (the first half of head_dim: a rotate-half
        table's halves are equal), as the two halves of head_dim (each padded to a power of two), rounded to x's
        dtype as the in-place rotary stores them."""
        x = x_ptr + rows64[:, None] * stride_x + j[None, :]
        x1 = tl.load(x, mask=mask, other=0.0).to(tl.float32)
        x2 = tl.load(x + HALF, mask=mask, other=0.0).to(tl.float32)
        dtype = x_ptr.dtype.element_ty
        return (x1 * c - x2 * s).to(dtype), (x2 * c + x1 * s).to(dtype)

    @triton.jit
    def _cos_sin_tile(c_ptr, s_ptr, rows64, stride_c, stride_s, j, mask):
        c = tl.load(c_ptr + rows64[:, None] * stride_c + j[None, :], mask=mask, other=0.0)
        s = tl.load(s_ptr + rows64[:, None] * stride_s + j[None, :], mask=mask, other=0.0)
        return c, s

    @triton.jit
    def _rotary_varlen_attention_kernel(
        q_ptr, k_ptr, v_ptr, o_ptr, cos_ptr, sin_ptr, cu_ptr, tiles_ptr,
        stride_qt, stride_qh, stride_kt, stride_kh, stride_vt, stride_vh, stride_ot, stride_oh,
        stride_ct, stride_st, qk_scale,
        NUM_HEADS: tl.constexpr, HALF: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
        BLOCK_HALF: tl.constexpr, DOT_PRECISION: tl.constexpr, USE_PDL: tl.constexpr,
    ):  # fmt: skip
        """The varlen kernel with the rotary applied to q and k as they are loaded: one program per (tile, head),
        the heads of a tile adjacent so that its rows' cos/sin are read from L2 after the first. head_dim is
        handled as its two rotary halves (two dots each for QK^T and PV). Only the first half of cos/sin is read
        (the halves of a rotate-half table are equal), and a segment that is this one tile (a window) rotates its
        keys with the queries' cos/sin tiles: the float32 cos/sin loads were most of the kernel's traffic (H100, 7B
        photo's windows: 80.0 -> 71.5 us a layer). Longer segments loop over key blocks; they take rotary +
        attention in the towers (with_rotary)."""
        pdl_prologue(USE_PDL)
        pid = tl.program_id(0)
        tile = pid // NUM_HEADS
        head = pid % NUM_HEADS
        seg = tl.load(tiles_ptr + 2 * tile)
        first = tl.load(tiles_ptr + 2 * tile + 1)
        start = tl.load(cu_ptr + seg)
        end = tl.load(cu_ptr + seg + 1)
        rows = start + first + tl.arange(0, BLOCK_M)
        j = tl.arange(0, BLOCK_HALF)
        j_ok = j < HALF
        q_mask = (rows < end)[:, None] & j_ok[None, :]
        rows64 = rows.to(tl.int64)
        q_head, k_head = q_ptr + head * stride_qh, k_ptr + head * stride_kh
        c_q, s_q = _cos_sin_tile(cos_ptr, sin_ptr, rows64, stride_ct, stride_st, j, q_mask)
        q1, q2 = _rotated_halves(q_head, c_q, s_q, rows64, stride_qt, j, q_mask, HALF)
        m_i = tl.full([BLOCK_M], float("-inf"), tl.float32)
        l_i = tl.zeros([BLOCK_M], tl.float32)
        acc1 = tl.zeros([BLOCK_M, BLOCK_HALF], tl.float32)
        acc2 = tl.zeros([BLOCK_M, BLOCK_HALF], tl.float32)
        kv_end = tl.where(start + first < end, end, start)  # no keys for a padding tile
        one_block = (first == 0) & (end - start <= BLOCK_N)  # BLOCK_N == BLOCK_M (asserted at launch)
        for kv in range(start, kv_end, BLOCK_N):
            cols = kv + tl.arange(0, BLOCK_N)
            col_mask = cols < end
            kv_mask = col_mask[:, None] & j_ok[None, :]
            cols64 = cols.to(tl.int64)
            if one_block:  # the keys are this tile's rows
                c_k, s_k = c_q, s_q
            else:
                c_k, s_k = _cos_sin_tile(cos_ptr, sin_ptr, cols64, stride_ct, stride_st, j, kv_mask)
            k1, k2 = _rotated_halves(k_head, c_k, s_k, cols64, stride_kt, j, kv_mask, HALF)
            s = (_dot(q1, tl.trans(k1), DOT_PRECISION) + _dot(q2, tl.trans(k2), DOT_PRECISION)) * qk_scale
            s = tl.where(col_mask[None, :], s, float("-inf"))
            m_new = tl.maximum(m_i, tl.max(s, 1))
            p = tl.exp2(s - m_new[:, None])
            alpha = tl.exp2(m_i - m_new)
            vb = v_ptr + head * stride_vh + cols64[:, None] * stride_vt + j[None, :]
            v1 = tl.load(vb, mask=kv_mask, other=0.0)
            v2 = tl.load(vb + HALF, mask=kv_mask, other=0.0)
            pb = p.to(v1.dtype)
            acc1 = acc1 * alpha[:, None] + _dot(pb, v1, DOT_PRECISION)
            acc2 = acc2 * alpha[:, None] + _dot(pb, v2, DOT_PRECISION)
            l_i = l_i * alpha + tl.sum(p, 1)
            m_i = m_new
        inv = 1.0 / tl.where(l_i > 0, l_i, 1.0)
        o = o_ptr + rows64[:, None] * stride_ot + head * stride_oh + j[None, :]
        dtype = o_ptr.dtype.element_ty
        tl.store(o, (acc1 * inv[:, None]).to(dtype), mask=q_mask)
        tl.store(o + HALF, (acc2 * inv[:, None]).to(dtype), mask=q_mask)


def rotary_varlen_attention_triton(
    q: torch.Tensor,  # [N, heads, head_dim], head_dim contiguous (views of the qkv output); not modified
    k: torch.Tensor,
    v: torch.Tensor,
    cos: torch.Tensor,  # [N, head_dim] float32, head_dim contiguous; a rotate-half table: its halves are equal
    sin: torch.Tensor,
    seg: Segments,  # tiles built with ATTN_BLOCK_M
    scale: float,
) -> torch.Tensor:  # [N, heads, head_dim]; rows no segment covers are left unwritten
    n, heads, head_dim = q.shape
    out = torch.empty(n, heads, head_dim, dtype=q.dtype, device=q.device)
    if n == 0 or seg.tiles.shape[0] == 0:
        return out
    if q.stride(2) != 1 or k.stride(2) != 1 or v.stride(2) != 1 or cos.stride(1) != 1 or sin.stride(1) != 1:
        raise ValueError("vision attention wants head_dim contiguous")
    if head_dim % 2:
        raise ValueError("the rotary wants an even head_dim")
    half = head_dim // 2
    assert ATTN_BLOCK_M == ATTN_BLOCK_N  # the kernel's one-block path takes the query tile's rows as the keys
    # one pipeline stage: a window is one key block, so there is nothing to prefetch (measured: 2 stages took
    # twice as long on an H100 at 7B's shapes)
    _rotary_varlen_attention_kernel[(seg.tiles.shape[0] * heads,)](
        q, k, v, out, cos, sin, seg.cu_seqlens, seg.tiles,
        q.stride(0), q.stride(1), k.stride(0), k.stride(1), v.stride(0), v.stride(1), out.stride(0), out.stride(1),
        cos.stride(0), sin.stride(0), scale * LOG2E,
        NUM_HEADS=heads, HALF=half, BLOCK_M=ATTN_BLOCK_M, BLOCK_N=ATTN_BLOCK_N,
        BLOCK_HALF=max(16, triton.next_power_of_2(half)), DOT_PRECISION=_dot_precision(q.dtype),
        num_warps=4, num_stages=1, **pdl_args(q),
    )  # fmt: skip
    return out


# ---- backends --------------------------------------------------------------------------------------------------

VisionAttention = Callable[[torch.Tensor, torch.Tensor, torch.Tensor, Segments, float], torch.Tensor]
# (q, k, v, cos, sin, segments, scale) -> out: the rotary of q and k, then attention
VisionRotaryAttention = Callable[
    [torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor, Segments, float], torch.Tensor
]


def rotary_then(attention: VisionAttention) -> VisionRotaryAttention:
    """The rotary in place (one launch for q and k), then `attention`."""

    def run(q, k, v, cos, sin, seg: Segments, scale: float) -> torch.Tensor:
        apply_vision_rotary(q, k, cos, sin)
        return attention(q, k, v, seg, scale)

    return run


@dataclass(frozen=True)
class VisionAttentionBackend:
    forward: VisionAttention
    graph_safe: bool  # no host work or host-to-device copies inside: can be captured in a CUDA graph
    # the rotary inside the attention kernel, for short segments (windows); None: rotary, then `forward`
    fused_rotary: VisionRotaryAttention | None = None

    def with_rotary(self, short_segments: bool) -> VisionRotaryAttention:
        """Rotary + attention for segments that are short (windows: the fused kernel where there is one) or
        long (a whole image: the rotary pass, then `forward`)."""
        if short_segments and self.fused_rotary is not None:
            return self.fused_rotary
        return rotary_then(self.forward)


_FUSED_ROTARY = rotary_varlen_attention_triton if HAS_TRITON else None
VISION_ATTENTION_BACKENDS: dict[str, VisionAttentionBackend] = {
    "torch_native": VisionAttentionBackend(varlen_attention_ref, graph_safe=False),
    # windows: our fused rotary + attention kernel (measured faster on an H100 than the rotary pass followed by
    # flash varlen: see BENCHMARKS.md); whole images: cuDNN / flash
    "varlen": VisionAttentionBackend(varlen_attention_flash, graph_safe=True, fused_rotary=_FUSED_ROTARY),
    # whole images of FA4_MIN_SEGMENT rows or more: flash-attn-4; the rest as `varlen`
    "fa4": VisionAttentionBackend(varlen_attention_fa4, graph_safe=True, fused_rotary=_FUSED_ROTARY),
    "triton": VisionAttentionBackend(varlen_attention_triton, graph_safe=True, fused_rotary=_FUSED_ROTARY),
}


def pick_vision_attention(
    requested: str,
    device_type: str,
    dtype: torch.dtype,
    *,
    has_varlen: bool,
    has_triton: bool,
    interpret: bool,
    has_fa4: bool = False,
) -> str:
    """The backend for `requested` ("auto" or a VISION_ATTENTION_BACKENDS name) on this device type and dtype.
    "auto" on CUDA for fp16/bf16: fa4 where flash-attn-4 runs on this GPU, else varlen (flash); else triton on
    CUDA, else torch_native. Raises ValueError for a name that is unknown or cannot run here."""
    half_cuda = device_type == "cuda" and dtype in HALF_DTYPES
    usable = {
        "torch_native": True,
        "fa4": has_fa4 and has_varlen and half_cuda,
        "varlen": has_varlen and half_cuda,
        "triton": has_triton and (device_type == "cuda" or (interpret and device_type == "cpu")),
    }
    if requested == "auto":
        order = ("fa4", "varlen", "triton", "torch_native") if device_type == "cuda" else ("torch_native",)
        return next(name for name in order if usable[name])
    if requested not in VISION_ATTENTION_BACKENDS:
        raise ValueError(
            f"unknown vision attention backend {requested!r}; choose auto, {', '.join(VISION_ATTENTION_BACKENDS)}"
        )
    if not usable[requested]:
        why = f"cannot run on {device_type} with {dtype}"
        if requested == "fa4" and half_cuda and not has_fa4:
            why = "needs flash-attn-4 (pip install 'mirador[gpu]') and a Hopper or newer GPU"
        raise ValueError(f"vision attention backend {requested!r} {why}")
    return requested


def resolve_vision_attention(requested: str, device: torch.device, dtype: torch.dtype) -> str:
    """pick_vision_attention with what this process has."""
    return pick_vision_attention(
        requested,
        device.type,
        dtype,
        has_varlen=HAS_VARLEN,
        has_triton=HAS_TRITON,
        interpret=INTERPRET,
        has_fa4=device.type == "cuda" and dtype in HALF_DTYPES and fa4_usable(device),
    )
