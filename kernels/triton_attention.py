"""Triton paged attention over the KV layout of kernels/paged_attention.py (its torch functions are the reference):
split-KV decode and causal extend (prefill, chunked prefill, mixed batches). Both read keys and values only from
the cache; import this module only where kernels._triton.HAS_TRITON holds."""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from kernels._triton import INTERPRET, pdl_args, pdl_prologue

LOG2E = 1.4426950408889634

# Defaults for head_dim 128 on an H100 (bf16), to be swept there: decode is bandwidth-bound, so a modest KV block
# and 4 warps per (sequence, kv head, split); extend is compute-bound, so 128 (token, head) rows per program.
DECODE_BLOCK_N = 64
DECODE_NUM_WARPS = 4
# pipeline stages of the decode kernel: one split per sequence streams the longest runs of KV and gains from a third
# stage; split programs are short and run as well or better with two (H100: graph-replayed sweep over 28 layers,
# and whole steps at 64 rows: 6.55 against 6.57 ms at 400 context, 8.52 against 8.61-8.75 ms at 2,000)
DECODE_NUM_STAGES = 3
DECODE_SPLIT_NUM_STAGES = 2
REDUCE_NUM_WARPS = 4
EXTEND_BLOCK_ROWS = 128
EXTEND_BLOCK_N = 64
EXTEND_NUM_WARPS = 8
EXTEND_NUM_STAGES = 2
MAX_DECODE_SPLITS = 64


def decode_num_splits(
    max_context_len: int,
    batch_size: int,
    num_kv_heads: int,
    num_sms: int,
    *,
    block_n: int = DECODE_BLOCK_N,
    max_splits: int = MAX_DECODE_SPLITS,
) -> int:
    """Splits per sequence for `decode_attention`, fixed for a captured graph: one when the batch's (sequence, kv
    head) programs already cover the SMs; otherwise enough splits to give every SM two programs, never more splits
    than the longest context has KV blocks (every split can hold one block of `block_n` tokens), at most
    `max_splits`, at least 1. Each split covers ceil(seq_len / num_splits) tokens of the live length, so a short
    context leaves most splits empty and they cost a launch slot, not bandwidth. (A sweep of the kernel alone
    favoured splitting up to 1.5 programs per SM into ~3 per SM, 10-15% at 16-48 rows; whole steps showed no
    difference, so the policy stays.)"""
    programs = max(1, batch_size * num_kv_heads)
    if (
        programs >= num_sms
    ):  # the batch alone fills the SMs: splitting only adds the merge (measured on an H100)
        return 1
    wanted = -(-2 * num_sms // programs)
    max_blocks = -(-max(1, max_context_len) // block_n)
    return max(1, min(wanted, max_blocks, max_splits))


def decode_num_stages(num_splits: int) -> int:
    return DECODE_NUM_STAGES if num_splits == 1 else DECODE_SPLIT_NUM_STAGES


def _block_d(head_dim: int) -> int:
    return max(16, triton.next_power_of_2(head_dim))


def _check_layout(q, k_cache, v_cache, block_table) -> None:
    # the kernels index head_dim and page-table columns with unit stride; everything else goes by strides
    if (
        q.shape[1] % k_cache.shape[2]
        or k_cache.shape[3] != q.shape[2]
        or v_cache.shape != k_cache.shape
        or k_cache.stride(3) != 1
        or v_cache.stride(3) != 1
        or block_table.stride(1) != 1
    ):
        raise ValueError(f"bad attention layout: q {tuple(q.shape)}, cache {tuple(k_cache.shape)}")


def _dot_precision(dtype: torch.dtype) -> str:
    if INTERPRET and dtype != torch.float32:
        return "upcast"  # the interpreter multiplies bf16 bit patterns as integers: see _dot
    # fp32 inputs would go through TF32 on the tensor cores by default; the fp32 path is the exact one.
    return "ieee" if dtype == torch.float32 else "tf32"


@triton.jit
def _dot(a, b, DOT_PRECISION: tl.constexpr):
    if DOT_PRECISION == "upcast":  # fp32 products of the 16-bit inputs, as the tensor cores form them
        return tl.dot(a.to(tl.float32), b.to(tl.float32), input_precision="ieee")
    else:
        return tl.dot(a, b, input_precision=DOT_PRECISION)


@triton.jit
def _load_kv(cache, pages, slots, kv_head, offs_d, stride_p, stride_s, stride_h, tok_mask, D: tl.constexpr):
    # [BLOCK_N, BLOCK_D]: token n at page pages[n], slot slots[n]; masked tokens and padded dims read nothing.
    ptrs = cache + pages.to(tl.int64)[:, None] * stride_p + (slots * stride_s + kv_head * stride_h)[:, None]
    return tl.load(ptrs + offs_d[None, :], mask=tok_mask[:, None] & (offs_d < D)[None, :], other=0.0)


@triton.jit
def _attend_block(
    acc, m_i, l_i, qb, k_cache, v_cache, block_table, row, stride_bt,
    offs_n, n_mask, q_pos, kv_head, offs_d,
    stride_kp, stride_ks, stride_kh, stride_vp, stride_vs, stride_vh,
    qk_scale,
    D: tl.constexpr, PAGE_SIZE: tl.constexpr, MASK: tl.constexpr, DOT_PRECISION: tl.constexpr,
    q_lo=0,
):  # fmt: skip
    """One online-softmax step over the KV tokens offs_n (log2 domain, fp32). MASK 0: every token is visible to
    every row; 1: tokens outside n_mask are hidden; 2: also those after the row's position q_pos (causal);
    3: only tokens in [q_lo, q_pos] per row (a sliding window and/or a bidirectional span's later keys)."""
    pages = tl.load(block_table + row * stride_bt + offs_n // PAGE_SIZE, mask=n_mask, other=0)
    slots = offs_n % PAGE_SIZE
    k = _load_kv(k_cache, pages, slots, kv_head, offs_d, stride_kp, stride_ks, stride_kh, n_mask, D)
    qk = _dot(qb, tl.trans(k.to(qb.dtype)), DOT_PRECISION) * qk_scale  # [rows, BLOCK_N]
    if MASK == 1:
        qk = tl.where(n_mask[None, :], qk, float("-inf"))
    elif MASK == 2:
        qk = tl.where(n_mask[None, :] & (offs_n[None, :] <= q_pos[:, None]), qk, float("-inf"))
    elif MASK == 3:
        seen = n_mask[None, :] & (offs_n[None, :] <= q_pos[:, None]) & (offs_n[None, :] >= q_lo[:, None])
        qk = tl.where(seen, qk, float("-inf"))
    m_new = tl.maximum(m_i, tl.max(qk, 1))
    # a row that sees no key of this block (MASK 3) keeps m = -inf: subtract 0 there, not -inf
    m_safe = tl.where(m_new == float("-inf"), 0.0, m_new)
    p = tl.exp2(qk - m_safe[:, None])
    alpha = tl.exp2(m_i - m_safe)
    v = _load_kv(v_cache, pages, slots, kv_head, offs_d, stride_vp, stride_vs, stride_vh, n_mask, D)
    acc = acc * alpha[:, None] + _dot(p.to(qb.dtype), v.to(qb.dtype), DOT_PRECISION)
    return acc, m_new, l_i * alpha + tl.sum(p, 1)


@triton.jit
def _decode_split_kernel(
    q, k_cache, v_cache, block_table, rows, seq_lens, out, ws,
    stride_qb, stride_qh, stride_qd,
    stride_kp, stride_ks, stride_kh, stride_vp, stride_vs, stride_vh, stride_bt,
    stride_ob, stride_oh, stride_od,
    stride_wb, stride_wh, stride_ws,
    qk_scale, window,
    G: tl.constexpr, D: tl.constexpr, PAGE_SIZE: tl.constexpr, NUM_SPLITS: tl.constexpr,
    BLOCK_G: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_D: tl.constexpr, DOT_PRECISION: tl.constexpr,
    USE_PDL: tl.constexpr,
):  # fmt: skip
    """One program per (sequence, kv head, split): the G query heads of that kv head against the split's tokens.
    With one split it writes `out`; otherwise the normalised partial output and its log2-sum-exp go to `ws`."""
    pdl_prologue(USE_PDL)
    b = tl.program_id(0)
    kv_head = tl.program_id(1)
    split = tl.program_id(2)
    seq_len = tl.load(seq_lens + b)
    row = tl.load(rows + b).to(tl.int64)
    offs_g = tl.arange(0, BLOCK_G)
    offs_d = tl.arange(0, BLOCK_D)
    heads = kv_head * G + offs_g
    g_mask = offs_g < G
    d_mask = offs_d < D
    q_ptrs = q + b * stride_qb + heads[:, None] * stride_qh + offs_d[None, :] * stride_qd
    qb = tl.load(q_ptrs, mask=g_mask[:, None] & d_mask[None, :], other=0.0)  # [BLOCK_G, BLOCK_D]

    lo = tl.where(window > 0, tl.maximum(seq_len - window, 0), 0)  # a sliding window reads its last `window`
    split_len = tl.cdiv(tl.cdiv(seq_len - lo, NUM_SPLITS), BLOCK_N) * BLOCK_N
    start = lo + split * split_len
    end = tl.minimum(start + split_len, seq_len)  # start >= end: an empty split (or a padding entry)
    m_i = tl.full([BLOCK_G], float("-inf"), tl.float32)
    l_i = tl.zeros([BLOCK_G], tl.float32)
    acc = tl.zeros([BLOCK_G, BLOCK_D], tl.float32)
    for start_n in range(start, end, BLOCK_N):
        offs_n = start_n + tl.arange(0, BLOCK_N)
        acc, m_i, l_i = _attend_block(
            acc, m_i, l_i, qb, k_cache, v_cache, block_table, row, stride_bt,
            offs_n, offs_n < end, offs_n, kv_head, offs_d,
            stride_kp, stride_ks, stride_kh, stride_vp, stride_vs, stride_vh,
            qk_scale, D, PAGE_SIZE, 1, DOT_PRECISION,
        )  # fmt: skip

    has = l_i > 0
    o = acc / tl.where(has, l_i, 1.0)[:, None]  # empty split / padding entry: zeros
    if NUM_SPLITS == 1:
        o_ptrs = out + b * stride_ob + heads[:, None] * stride_oh + offs_d[None, :] * stride_od
        tl.store(o_ptrs, o.to(out.dtype.element_ty), mask=g_mask[:, None] & d_mask[None, :])
    else:
        w_ptrs = ws + b * stride_wb + heads * stride_wh + split * stride_ws
        tl.store(w_ptrs[:, None] + offs_d[None, :], o, mask=g_mask[:, None] & d_mask[None, :])
        lse = m_i + tl.log2(tl.where(has, l_i, 1.0))  # an empty split keeps m_i = -inf
        tl.store(w_ptrs + D, lse, mask=g_mask)


@triton.jit
def _decode_reduce_kernel(
    ws, out,
    stride_wb, stride_wh, stride_ws,
    stride_ob, stride_oh, stride_od,
    D: tl.constexpr, NUM_SPLITS: tl.constexpr, BLOCK_S: tl.constexpr, BLOCK_D: tl.constexpr,
    USE_PDL: tl.constexpr,
):  # fmt: skip
    """One program per (sequence, query head): merge the splits' partial outputs by their log2-sum-exp."""
    pdl_prologue(USE_PDL)
    b = tl.program_id(0)
    h = tl.program_id(1)
    offs_s = tl.arange(0, BLOCK_S)
    offs_d = tl.arange(0, BLOCK_D)
    s_mask = offs_s < NUM_SPLITS
    d_mask = offs_d < D
    base = ws + b * stride_wb + h * stride_wh + offs_s * stride_ws
    lse = tl.load(base + D, mask=s_mask, other=float("-inf"))  # [BLOCK_S]
    o = tl.load(base[:, None] + offs_d[None, :], mask=s_mask[:, None] & d_mask[None, :], other=0.0)
    m = tl.max(lse, 0)
    w = tl.exp2(lse - tl.where(m > float("-inf"), m, 0.0))  # empty splits weigh 0; a padding entry: all 0
    total = tl.sum(w, 0)
    res = tl.sum(o * w[:, None], 0) / tl.where(total > 0, total, 1.0)
    tl.store(
        out + b * stride_ob + h * stride_oh + offs_d * stride_od, res.to(out.dtype.element_ty), mask=d_mask
    )


def decode_attention(
    q: torch.Tensor,  # [batch, num_heads, head_dim], any strides
    k_cache: torch.Tensor,  # [num_pages, page_size, num_kv_heads, head_dim]
    v_cache: torch.Tensor,
    block_table: torch.Tensor,  # [num_rows, max_pages] int32, persistent per-slot page tables
    rows: torch.Tensor,  # [batch] int32: the block_table row of each batch entry
    seq_lens: torch.Tensor,  # [batch] int32: cached tokens (the query is the last); 0 marks a padding entry
    scale: float,
    out: torch.Tensor,  # [batch, num_heads, head_dim], written in full
    *,
    num_splits: int,
    window: int = 0,  # > 0: only the last `window` cached tokens (a sliding-window layer)
    workspace: torch.Tensor | None = None,  # [>= batch, num_heads, num_splits, head_dim + 1] float32
    block_n: int = DECODE_BLOCK_N,
    num_warps: int = DECODE_NUM_WARPS,
    num_stages: int | None = None,  # None: decode_num_stages(num_splits)
    reduce_num_warps: int = REDUCE_NUM_WARPS,
) -> torch.Tensor:
    """One query token per sequence against its whole cached context (flash-decoding). The launch depends only
    on shapes and `num_splits`, never on tensor values, so it can be captured in a CUDA graph; padding entries
    (seq_len 0) come out as zeros without reading a page. With num_splits > 1, `workspace` holds partial outputs
    and log2-sum-exps (allocated when None; pass one sized for the largest batch to keep graphs allocation-free)."""
    batch, num_heads, head_dim = q.shape
    _check_layout(q, k_cache, v_cache, block_table)
    if num_splits < 1:
        raise ValueError(f"num_splits must be >= 1, got {num_splits}")
    if num_stages is None:
        num_stages = decode_num_stages(num_splits)
    if batch == 0:
        return out
    num_kv_heads = k_cache.shape[2]
    group = num_heads // num_kv_heads
    block_d = _block_d(head_dim)
    ws_shape = (num_heads, num_splits, head_dim + 1)
    if num_splits > 1:
        if workspace is None:
            workspace = torch.empty(batch, *ws_shape, dtype=torch.float32, device=q.device)
        fits = workspace.shape[0] >= batch and tuple(workspace.shape[1:]) == ws_shape
        if not fits or workspace.dtype != torch.float32 or workspace.stride(3) != 1:
            raise ValueError(f"workspace {tuple(workspace.shape)} is no float32 [>= {batch}, *{ws_shape}]")
        ws = workspace
    else:
        ws = out  # unused: the single split writes `out` directly
    ws_strides = (ws.stride(0), ws.stride(1), ws.stride(2)) if num_splits > 1 else (0, 0, 0)
    _decode_split_kernel[(batch, num_kv_heads, num_splits)](
        q, k_cache, v_cache, block_table, rows, seq_lens, out, ws,
        *q.stride(), *k_cache.stride()[:3], *v_cache.stride()[:3], block_table.stride(0),
        *out.stride(), *ws_strides,
        scale * LOG2E, window,
        G=group, D=head_dim, PAGE_SIZE=k_cache.shape[1], NUM_SPLITS=num_splits,
        BLOCK_G=max(16, triton.next_power_of_2(group)), BLOCK_N=block_n, BLOCK_D=block_d,
        DOT_PRECISION=_dot_precision(q.dtype), num_warps=num_warps, num_stages=num_stages, **pdl_args(q),
    )  # fmt: skip
    if num_splits > 1:
        _decode_reduce_kernel[(batch, num_heads)](
            ws, out, *ws_strides, *out.stride(),
            D=head_dim, NUM_SPLITS=num_splits, BLOCK_S=triton.next_power_of_2(num_splits), BLOCK_D=block_d,
            num_warps=reduce_num_warps, **pdl_args(q),
        )  # fmt: skip
    return out


@triton.jit
def _extend_kernel(
    q, k_cache, v_cache, block_table, rows, seq_lens, q_start_loc, q_lens, out, kv_last,
    stride_qt, stride_qh, stride_qd,
    stride_kp, stride_ks, stride_kh, stride_vp, stride_vs, stride_vh, stride_bt,
    stride_ot, stride_oh, stride_od,
    qk_scale, window,
    G: tl.constexpr, D: tl.constexpr, PAGE_SIZE: tl.constexpr, BLOCK_M: tl.constexpr,
    BLOCK_R: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_D: tl.constexpr, DOT_PRECISION: tl.constexpr,
    GENERAL: tl.constexpr, HAS_LAST: tl.constexpr, USE_PDL: tl.constexpr,
):  # fmt: skip
    """One program per (sequence, block of BLOCK_M new tokens, kv head). Its BLOCK_R rows are (token, query
    head) pairs, row r = token r // G, head r % G of the kv head's group, so each KV block is read once for all
    G heads; rows past BLOCK_M * G or past q_len are padding. KV blocks wholly at or below the first token's
    position skip the causal mask; blocks above the last token's position are never visited."""
    pdl_prologue(USE_PDL)
    b = tl.program_id(0)
    m_start = tl.program_id(1) * BLOCK_M
    kv_head = tl.program_id(2)
    q_len = tl.load(q_lens + b)
    if m_start >= q_len:
        return
    seq_len = tl.load(seq_lens + b)
    row = tl.load(rows + b).to(tl.int64)
    q0 = tl.load(q_start_loc + b)
    offs_r = tl.arange(0, BLOCK_R)
    offs_d = tl.arange(0, BLOCK_D)
    tok = m_start + offs_r // G
    heads = kv_head * G + offs_r % G
    r_mask = (offs_r < BLOCK_M * G) & (tok < q_len)
    d_mask = offs_d < D
    q_ptrs = q + (q0 + tok)[:, None].to(tl.int64) * stride_qt + heads[:, None] * stride_qh
    qb = tl.load(q_ptrs + offs_d[None, :] * stride_qd, mask=r_mask[:, None] & d_mask[None, :], other=0.0)
    q_pos = seq_len - q_len + tok  # [BLOCK_R] position of each row's token in its sequence
    first_pos = seq_len - q_len + m_start
    kv_end = seq_len - q_len + tl.minimum(m_start + BLOCK_M, q_len)  # one past the last token's position
    full_end = (first_pos + 1) // BLOCK_N * BLOCK_N  # blocks below here are visible to every row

    m_i = tl.full([BLOCK_R], float("-inf"), tl.float32)
    l_i = tl.zeros([BLOCK_R], tl.float32)
    acc = tl.zeros([BLOCK_R, BLOCK_D], tl.float32)
    if GENERAL:
        # per row, keys [q_lo, q_hi]: q_hi is the token's position, or its image's last index (kv_last, Gemma 3's
        # bidirectional spans); q_lo is the window's first key. Blocks wholly outside every row's range are skipped.
        q_hi = q_pos
        if HAS_LAST:
            q_hi = tl.load(kv_last + q0 + tok, mask=r_mask, other=0)
        q_lo = tl.where(window > 0, tl.maximum(q_pos - window + 1, 0), 0)
        lo_start = tl.where(window > 0, tl.maximum(first_pos - window + 1, 0) // BLOCK_N * BLOCK_N, 0)
        hi_end = tl.max(tl.where(r_mask, q_hi, 0), 0) + 1
        for start_n in range(lo_start, hi_end, BLOCK_N):
            offs_n = start_n + tl.arange(0, BLOCK_N)
            acc, m_i, l_i = _attend_block(
                acc, m_i, l_i, qb, k_cache, v_cache, block_table, row, stride_bt,
                offs_n, offs_n < hi_end, q_hi, kv_head, offs_d,
                stride_kp, stride_ks, stride_kh, stride_vp, stride_vs, stride_vh,
                qk_scale, D, PAGE_SIZE, 3, DOT_PRECISION, q_lo,
            )  # fmt: skip
        full_end = 0
        kv_end = 0
    for start_n in range(0, full_end, BLOCK_N):
        offs_n = start_n + tl.arange(0, BLOCK_N)
        acc, m_i, l_i = _attend_block(
            acc, m_i, l_i, qb, k_cache, v_cache, block_table, row, stride_bt,
            offs_n, offs_n < full_end, q_pos, kv_head, offs_d,
            stride_kp, stride_ks, stride_kh, stride_vp, stride_vs, stride_vh,
            qk_scale, D, PAGE_SIZE, 0, DOT_PRECISION,
        )  # fmt: skip
    for start_n in range(full_end, kv_end, BLOCK_N):
        offs_n = start_n + tl.arange(0, BLOCK_N)
        acc, m_i, l_i = _attend_block(
            acc, m_i, l_i, qb, k_cache, v_cache, block_table, row, stride_bt,
            offs_n, offs_n < kv_end, q_pos, kv_head, offs_d,
            stride_kp, stride_ks, stride_kh, stride_vp, stride_vs, stride_vh,
            qk_scale, D, PAGE_SIZE, 2, DOT_PRECISION,
        )  # fmt: skip

    o = acc / tl.where(l_i > 0, l_i, 1.0)[:, None]
    o_ptrs = out + (q0 + tok)[:, None].to(tl.int64) * stride_ot + heads[:, None] * stride_oh
    tl.store(
        o_ptrs + offs_d[None, :] * stride_od,
        o.to(out.dtype.element_ty),
        mask=r_mask[:, None] & d_mask[None, :],
    )


def extend_attention(
    q: torch.Tensor,  # [num_tokens, num_heads, head_dim]: new tokens of the batch, back to back, any strides
    k_cache: torch.Tensor,  # [num_pages, page_size, num_kv_heads, head_dim], new tokens already stored
    v_cache: torch.Tensor,
    block_table: torch.Tensor,  # [num_rows, max_pages] int32
    rows: torch.Tensor,  # [batch] int32: the block_table row of each sequence
    seq_lens: torch.Tensor,  # [batch] int32: cached tokens after this step, the new ones included
    q_start_loc: torch.Tensor,  # [batch] int32: row of q holding each sequence's first new token
    q_lens: torch.Tensor,  # [batch] int32: new tokens per sequence (0 allowed: nothing is written)
    max_q_len: int,  # host bound on q_lens (>= every q_len, or tokens past it go unwritten): sizes the grid
    scale: float,
    out: torch.Tensor,  # [num_tokens, num_heads, head_dim]
    *,
    window: int = 0,  # > 0: a token at position i sees keys > i - window only (a sliding-window layer)
    kv_last: torch.Tensor | None = None,  # [num_tokens] int32: last key each token sees (>= its position)
    block_rows: int = EXTEND_BLOCK_ROWS,
    block_n: int = EXTEND_BLOCK_N,
    num_warps: int = EXTEND_NUM_WARPS,
    num_stages: int = EXTEND_NUM_STAGES,
) -> torch.Tensor:
    """Causal attention of each sequence's new tokens (positions seq_len - q_len .. seq_len - 1) to its cached
    prefix and to the new tokens up to themselves. A program takes block_rows // G new tokens with all G query
    heads of one kv head; programs past a sequence's q_len return at once."""
    num_tokens, num_heads, head_dim = q.shape
    num_kv_heads = k_cache.shape[2]
    _check_layout(q, k_cache, v_cache, block_table)
    batch = rows.shape[0]
    if batch == 0 or num_tokens == 0 or max_q_len <= 0:
        return out
    group = num_heads // num_kv_heads
    block_r = triton.next_power_of_2(max(block_rows, 16, group))
    block_m = block_r // group
    general = window > 0 or kv_last is not None
    _extend_kernel[(batch, triton.cdiv(max_q_len, block_m), num_kv_heads)](
        q, k_cache, v_cache, block_table, rows, seq_lens, q_start_loc, q_lens, out,
        kv_last if kv_last is not None else q_lens,
        *q.stride(), *k_cache.stride()[:3], *v_cache.stride()[:3], block_table.stride(0),
        *out.stride(),
        scale * LOG2E, window,
        G=group, D=head_dim, PAGE_SIZE=k_cache.shape[1], BLOCK_M=block_m,
        BLOCK_R=block_r, BLOCK_N=block_n, BLOCK_D=_block_d(head_dim),
        DOT_PRECISION=_dot_precision(q.dtype), num_warps=num_warps, num_stages=num_stages,
        GENERAL=general, HAS_LAST=kv_last is not None, **pdl_args(q),
    )  # fmt: skip
    return out
