"""Truncation (top-k, top-p, min-p) and the draw for sampled rows of a logits batch: one Triton program per row,
and the plain-torch reference it is tested against.

Semantics, shared by both (x = logits / temperature, e = exp(x - max x), so the top token has e = 1):
- top-k keeps every token whose x is at least the k-th largest x (ties at the k-th value are all kept);
- top-p, over the top-k set, keeps a token when the mass of strictly more likely kept tokens is < top_p times the
  kept mass (so a tie group is kept or dropped as a whole, and the top token always stays);
- min-p keeps tokens with e >= min_p (probability at least min_p times the top one's);
- the draw is an exponential race, which is exact: blocks of RACE_BLOCK consecutive token ids race with their
  kept mass / E_block, then the winning block's kept tokens race with e / E_token (E ~ Exp(1)). Two levels give
  the same distribution as one and need noise for ceil(V / RACE_BLOCK) + RACE_BLOCK values instead of V.
The noise is counter-based: Philox-4x32-10 keyed by a row's 64-bit key, with counter (index, ctr low word, tag,
ctr high word), so a row's draw depends on (key, ctr) only, never on its batch companions.
Thresholds are found without sorting the vocabulary: top-k's by torch.topk in the reference, the others by
bisection on the float32 bit pattern (ordered as integers), exact after 32 halvings. The kernel first narrows the row to candidates above a lower bound of the threshold (the k-th largest
block maximum for top-k; x >= max + log((1 - top_p) * Z / (2 V)) for top-p alone) and searches only those when
they fit in CANDIDATE_CAP, else the whole row.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from kernels._triton import HAS_TRITON, triton_enabled

RACE_BLOCK = 1024  # tokens per block of the two-level race; also the Triton program's tile
CANDIDATE_CAP = 16384  # candidates per row the kernel's threshold searches may hold (scratch: 4 B each)
PROBES = 4  # thresholds the kernel's search tests per pass over the candidates: log2(PROBES + 1) bits a pass
NUM_WARPS = 8  # one program per row: more warps hide more of the latency of its passes over the row
KEY_NEG_INF = -2139095041  # the ordered-integer key of float32 -inf
TOKEN_TAG, BLOCK_TAG = 0, 1  # third Philox counter word: noise of tokens, noise of blocks
_M32 = 0xFFFFFFFF
_KEY_A, _KEY_B = 0x9E3779B9, 0xBB67AE85
_ROUND_A, _ROUND_B = 0xD2511F53, 0xCD9E8D57
_LOG1P_SERIES = 0.125  # below this, -log(1 - w) by its series, which keeps small E as fine as w


# ---- the reference ----


def float_keys(x: torch.Tensor) -> torch.Tensor:
    """int64 keys ordered like the float32 values: the bit pattern, with the magnitude bits of negatives flipped."""
    b = x.contiguous().view(torch.int32).to(torch.int64)
    return torch.where(b >= 0, b, b ^ 0x7FFFFFFF)


def _mulhilo(a: torch.Tensor, b: int) -> tuple[torch.Tensor, torch.Tensor]:
    """High and low 32-bit words of a * b for uint32 values held in int64, in 48-bit partial products."""
    p_lo, p_hi = a * (b & 0xFFFF), a * (b >> 16)
    low = p_lo + ((p_hi & 0xFFFF) << 16)
    return (p_hi >> 16) + (low >> 32), low & _M32


def exponential_noise(key: torch.Tensor, ctr: torch.Tensor, index: torch.Tensor, tag: int) -> torch.Tensor:
    """Exp(1) noise [S, N] for rows (key [S], ctr [S]) at indices [N] or [S, N]: Triton's tl.philox, in torch."""
    c0 = (index & _M32).expand(key.shape[0], -1)
    c1 = (ctr & _M32)[:, None].expand_as(c0)
    c2 = torch.full_like(c0, tag)
    c3 = ((ctr >> 32) & _M32)[:, None].expand_as(c0)
    k0, k1 = (key & _M32)[:, None], ((key >> 32) & _M32)[:, None]
    for _ in range(10):
        hi_b, lo_b = _mulhilo(c2, _ROUND_B)
        hi_a, lo_a = _mulhilo(c0, _ROUND_A)
        c0, c1, c2, c3 = hi_b ^ c1 ^ k0, lo_b, hi_a ^ c3 ^ k1, lo_a
        k0, k1 = (k0 + _KEY_A) & _M32, (k1 + _KEY_B) & _M32
    return _exponential_from_bits(c0, c1)


def _exponential_from_bits(u0: torch.Tensor, u1: torch.Tensor) -> torch.Tensor:
    # w in (0, 1] from 55 random bits, then E = -log(1 - w): fine near E = 0, where the race is decided
    lo = ((u1 >> 9).to(torch.float32) + 0.5) * 2.0**-23
    w = (u0.to(torch.float32) + lo) * 2.0**-32
    series = w * (
        1 + w * (1 / 2 + w * (1 / 3 + w * (1 / 4 + w * (1 / 5 + w * (1 / 6 + w * (1 / 7 + w / 8))))))
    )
    return torch.where(w < _LOG1P_SERIES, series, -torch.log(1 - w))


def _bisect(keys: torch.Tensor, w: torch.Tensor, lo: torch.Tensor, hi: torch.Tensor, target: torch.Tensor):
    """Per row, the largest key t in [lo, hi] with sum(w where keys >= t) >= target (given it holds at lo)."""
    for _ in range(33):
        mid = lo + (hi - lo + 1) // 2
        ok = torch.where(keys >= mid[:, None], w, 0).sum(1) >= target
        lo, hi = torch.where(ok, mid, lo), torch.where(ok, hi, mid - 1)
    return lo


def _race(e: torch.Tensor, keep: torch.Tensor, key: torch.Tensor, ctr: torch.Tensor) -> torch.Tensor:
    num_rows, vocab = e.shape
    num_blocks = -(-vocab // RACE_BLOCK)
    pad = num_blocks * RACE_BLOCK - vocab
    e = F.pad(torch.where(keep, e, 0), (0, pad))  # [S, num_blocks * RACE_BLOCK]
    keep = F.pad(keep, (0, pad))
    mass = e.view(num_rows, num_blocks, RACE_BLOCK).sum(2)
    blocks = torch.arange(num_blocks, device=e.device)
    block = (mass / exponential_noise(key, ctr, blocks, BLOCK_TAG)).argmax(1)  # [S]
    width = min(RACE_BLOCK, vocab)  # a vocabulary smaller than a block needs noise for its own tokens only
    idx = block[:, None] * RACE_BLOCK + torch.arange(width, device=e.device)  # [S, width]
    score = e.gather(1, idx) / exponential_noise(key, ctr, idx, TOKEN_TAG)
    return block * RACE_BLOCK + torch.where(keep.gather(1, idx), score, -1.0).argmax(1)


def sample_rows_ref(
    logits: torch.Tensor,
    rows: torch.Tensor,
    temperature: torch.Tensor,
    top_k: torch.Tensor,
    top_p: torch.Tensor,
    min_p: torch.Tensor,
    key: torch.Tensor,
    ctr: torch.Tensor,
    out: torch.Tensor,
    *,
    max_top_k: int,
    any_top_p: bool,
    kept: torch.Tensor | None = None,  # [S, V] bool: receives the kept set, for tests
) -> None:
    x = logits.index_select(0, rows) / temperature[:, None]  # [S, V]
    vocab = x.shape[1]
    m = x.max(dim=1, keepdim=True).values
    e = torch.exp(x - m)
    keys = float_keys(x)
    thr = torch.full_like(rows, KEY_NEG_INF)
    if max_top_k > 0:  # the k-th largest by torch.topk, over the largest k in the batch
        kmax = min(max_top_k, vocab)
        kth = x.topk(kmax, dim=1).values.gather(1, (top_k.clamp(1, kmax) - 1)[:, None])[:, 0]
        thr = torch.where((top_k > 0) & (top_k < vocab), float_keys(kth), thr)
    if any_top_p:
        w = torch.where(keys >= thr[:, None], e, 0)
        top = float_keys(m[:, 0])
        thr = torch.where(top_p < 1, _bisect(keys, w, thr, top, top_p * w.sum(1)), thr)
    keep = (keys >= thr[:, None]) & (e >= min_p[:, None])
    if kept is not None:
        kept.copy_(keep)
    out.index_copy_(0, rows, _race(e, keep, key, ctr))


# ---- the Triton kernel ----

if HAS_TRITON:
    import triton
    import triton.language as tl

    _KEY_NEG_INF = tl.constexpr(KEY_NEG_INF)
    _TOKEN_TAG = tl.constexpr(TOKEN_TAG)
    _BLOCK_TAG = tl.constexpr(BLOCK_TAG)

    @triton.jit
    def _key(x):
        b = x.to(tl.int32, bitcast=True)
        return tl.where(b >= 0, b, b ^ 0x7FFFFFFF).to(tl.int64)

    @triton.jit
    def _exp_or_zero(a, b):  # exp(a - b), and 0 for a = -inf even when b (>= a) is -inf too
        return tl.exp(a - tl.where(a == float("-inf"), 0.0, b))

    @triton.jit
    def _scaled(src, idx, n, t):
        # correctly rounded, as torch divides: the reference sees the same x bit for bit
        return tl.math.div_rn(tl.load(src + idx, mask=idx < n, other=float("-inf")), t)

    @triton.jit
    def _exponential(key, ctr, index, tag: tl.constexpr):
        c0 = (tl.zeros((), tl.int64) + index).to(tl.uint32)  # index may be a scalar loop counter
        zero = c0 * 0
        c1 = zero + (ctr & 0xFFFFFFFF).to(tl.uint32)
        c3 = zero + (ctr >> 32).to(tl.uint32)
        u0, u1, _, _ = tl.philox(key, c0, c1, zero + tag, c3)
        lo = ((u1 >> 9).to(tl.float32) + 0.5) * 1.1920928955078125e-07  # 2**-23
        w = (u0.to(tl.float32) + lo) * 2.3283064365386963e-10  # 2**-32
        series = w * (
            1 + w * (1 / 2 + w * (1 / 3 + w * (1 / 4 + w * (1 / 5 + w * (1 / 6 + w * (1 / 7 + w / 8))))))
        )
        return tl.where(w < 0.125, series, -tl.log(1 - w))

    @triton.jit
    def _threshold(
        src,
        n,
        t,
        m,
        lo,
        hi,
        target,
        V: tl.constexpr,
        MASS: tl.constexpr,
        BLOCK: tl.constexpr,
        PROBES: tl.constexpr,
    ):
        """The largest key T in [lo, hi] with sum(w over x with key >= T) >= target, w = 1 or e (MASS), given
        that it holds at lo: each pass over src tests PROBES keys spread over the remaining range."""
        offs = tl.arange(0, BLOCK)
        j = tl.arange(0, PROBES).to(tl.int64)
        while lo < hi:
            probes = lo + ((hi - lo) * (j + 1) + PROBES) // (PROBES + 1)  # increasing, in (lo, hi]
            g = tl.zeros([PROBES], dtype=tl.float32)
            for start in range(0, V, BLOCK):  # to n, which the interpreter cannot take as a loop bound
                if start < n:
                    idx = start + offs
                    x = _scaled(src, idx, n, t)
                    w = _exp_or_zero(x, m) if MASS else (idx < n).to(tl.float32)
                    hit = _key(x)[None, :] >= probes[:, None]
                    g += tl.sum(tl.where(hit, w[None, :], 0.0), axis=1)
            ok = g >= target
            new_lo = tl.max(tl.where(ok, probes, lo), axis=0)
            hi = tl.min(tl.where(ok, hi, probes - 1), axis=0)
            lo = new_lo
        return lo

    @triton.jit
    def _mass(src, n, t, m, lo, V: tl.constexpr, BLOCK: tl.constexpr):
        offs = tl.arange(0, BLOCK)
        acc = tl.zeros([BLOCK], dtype=tl.float32)
        for start in range(0, V, BLOCK):
            if start < n:
                x = _scaled(src, start + offs, n, t)
                acc += tl.where(_key(x) >= lo, _exp_or_zero(x, m), 0.0)
        return tl.sum(acc, axis=0)

    @triton.jit
    def _sample_kernel(
        logits,
        stride,
        rows,
        temperature,
        top_k,
        top_p,
        min_p,
        key,
        ctr,
        out,
        block_max,  # [S, NUM_BLOCKS_P2] float32 scratch
        cand,  # [S, cap] float32 scratch
        kept,  # [S, V] int8, written when STORE_KEPT
        cap,
        V: tl.constexpr,  # constexpr: the interpreter cannot loop to a runtime bound; one compile per model
        BLOCK: tl.constexpr,
        NUM_BLOCKS_P2: tl.constexpr,
        PROBES: tl.constexpr,
        STORE_KEPT: tl.constexpr,
    ):
        s = tl.program_id(0).to(tl.int64)
        b = tl.load(rows + s)
        row = logits + b * stride
        t = tl.load(temperature + s)
        k = tl.load(top_k + s)
        p = tl.load(top_p + s)
        seed = tl.load(key + s)
        stream = tl.load(ctr + s)
        offs = tl.arange(0, BLOCK)
        num_blocks = tl.cdiv(V, BLOCK)
        bmax = block_max + s * NUM_BLOCKS_P2

        # pass 1: the maximum, the sum of e (online) and each block's maximum
        mv = tl.full([BLOCK], float("-inf"), tl.float32)
        zv = tl.zeros([BLOCK], dtype=tl.float32)
        for start in range(0, V, BLOCK):
            x = _scaled(row, start + offs, V, t)
            tl.store(bmax + start // BLOCK, tl.max(x, axis=0))
            new = tl.maximum(mv, x)
            zv = zv * _exp_or_zero(mv, new) + _exp_or_zero(x, new)
            mv = new
        m = tl.max(mv, axis=0)
        z = tl.sum(zv * _exp_or_zero(mv, m), axis=0)
        tl.debug_barrier()

        use_k = (k > 0) & (k < V)
        use_p = p < 1.0
        thr = tl.full((), _KEY_NEG_INF, tl.int64)
        if use_k | use_p:
            lb = tl.full((), float("-inf"), tl.float32)  # a lower bound of the threshold
            if use_k:
                if k <= num_blocks:  # the k-th largest block maximum: k tokens are at least that large
                    bi = tl.arange(0, NUM_BLOCKS_P2)
                    bm = tl.load(bmax + bi, mask=bi < num_blocks, other=float("-inf"))
                    bm = tl.sort(bm, descending=True)
                    lb = tl.sum(tl.where(bi == k - 1, bm, 0.0), axis=0)
            else:  # the tokens below hold less than (1 - top_p) / 2 of the mass
                lb = m + tl.log(0.5 * (1.0 - p) * z / V)
            # the candidates, in order, while they fit
            c = cand + s * cap
            n = tl.sum(tl.zeros([BLOCK], dtype=tl.int32), axis=0)
            for start in range(0, V, BLOCK):
                idx = start + offs
                x = _scaled(row, idx, V, t)
                is_c = (idx < V) & (x >= lb)
                pos = n + tl.cumsum(is_c.to(tl.int32), axis=0) - 1
                tl.store(c + pos, x, mask=is_c & (pos < cap))
                n += tl.sum(is_c.to(tl.int32), axis=0)
            tl.debug_barrier()
            src = row
            count = n * 0 + V
            t_src = t
            if n <= cap:
                src = c
                count = n
                t_src = tl.full((), 1.0, tl.float32)
            thr = _key(lb)
            top = _key(m)
            if use_k:
                thr = _threshold(src, count, t_src, m, thr, top, k.to(tl.float32), V, False, BLOCK, PROBES)
            if use_p:
                zk = z
                if use_k:
                    zk = _mass(src, count, t_src, m, thr, V, BLOCK)
                thr = _threshold(src, count, t_src, m, thr, top, p * zk, V, True, BLOCK, PROBES)

        # the draw: blocks race with their kept mass, then the winning block's tokens with their e
        mp = tl.load(min_p + s)
        best = tl.full((), -1.0, tl.float32)
        best_block = tl.full((), 0, tl.int32)
        for start in range(0, V, BLOCK):
            idx = start + offs
            x = _scaled(row, idx, V, t)
            e = _exp_or_zero(x, m)
            keep = (idx < V) & (_key(x) >= thr) & (e >= mp)
            if STORE_KEPT:
                tl.store(kept + s * V + idx, keep.to(tl.int8), mask=idx < V)
            mass = tl.sum(tl.where(keep, e, 0.0), axis=0)
            score = tl.math.div_rn(mass, _exponential(seed, stream, start // BLOCK, _BLOCK_TAG))
            better = score > best
            best_block = tl.where(better, start // BLOCK, best_block)
            best = tl.where(better, score, best)
        idx = best_block * BLOCK + offs
        x = _scaled(row, idx, V, t)
        e = _exp_or_zero(x, m)
        keep = (idx < V) & (_key(x) >= thr) & (e >= mp)
        score = tl.where(keep, tl.math.div_rn(e, _exponential(seed, stream, idx, _TOKEN_TAG)), -1.0)
        tl.store(out + b, (best_block * BLOCK + tl.argmax(score, axis=0)).to(tl.int64))


def sample_rows_triton(
    logits: torch.Tensor,
    rows: torch.Tensor,
    temperature: torch.Tensor,
    top_k: torch.Tensor,
    top_p: torch.Tensor,
    min_p: torch.Tensor,
    key: torch.Tensor,
    ctr: torch.Tensor,
    out: torch.Tensor,
    *,
    cap: int = CANDIDATE_CAP,
    kept: torch.Tensor | None = None,  # [S, V] int8: receives the kept set, for tests
) -> None:
    """One program per sampled row; arguments as sample_rows."""
    num_rows, vocab = rows.shape[0], logits.shape[1]
    if logits.stride(1) != 1:
        logits = logits.contiguous()
    num_blocks_p2 = triton.next_power_of_2(triton.cdiv(vocab, RACE_BLOCK))
    block_max = torch.empty(num_rows, num_blocks_p2, dtype=torch.float32, device=logits.device)
    cand = torch.empty(num_rows, cap, dtype=torch.float32, device=logits.device)
    _sample_kernel[(num_rows,)](
        logits,
        logits.stride(0),
        rows,
        temperature,
        top_k,
        top_p,
        min_p,
        key,
        ctr,
        out,
        block_max,
        cand,
        out if kept is None else kept,
        cap,
        V=vocab,
        BLOCK=RACE_BLOCK,
        NUM_BLOCKS_P2=num_blocks_p2,
        PROBES=PROBES,
        STORE_KEPT=kept is not None,
        num_warps=NUM_WARPS,
    )


def sample_rows(
    logits: torch.Tensor,  # [B, V] float32, penalties applied
    rows: torch.Tensor,  # [S] int64: the batch rows to sample
    temperature: torch.Tensor,  # [S] float32, > 0
    top_k: torch.Tensor,  # [S] int64, 0 = off
    top_p: torch.Tensor,  # [S] float32, 1 = off
    min_p: torch.Tensor,  # [S] float32, 0 = off
    key: torch.Tensor,  # [S] int64: Philox key
    ctr: torch.Tensor,  # [S] int64: Philox counter words (low: stream index, high: domain)
    out: torch.Tensor,  # [B] int64: out[rows[s]] receives row s's token
    *,
    max_top_k: int,  # host-side hints, so the reference needs no device read: the largest top_k
    any_top_p: bool,  # and whether some row has top_p < 1
) -> None:
    """The kernel on CUDA tensors, the reference elsewhere."""
    if triton_enabled(logits):
        sample_rows_triton(logits, rows, temperature, top_k, top_p, min_p, key, ctr, out)
    else:
        sample_rows_ref(
            logits,
            rows,
            temperature,
            top_k,
            top_p,
            min_p,
            key,
            ctr,
            out,
            max_top_k=max_top_k,
            any_top_p=any_top_p,
        )
