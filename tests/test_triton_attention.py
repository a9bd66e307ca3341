"""Triton paged attention (kernels/triton_attention.py) against the per-sequence torch reference in
kernels/paged_attention.py. Without a GPU the kernels run on CPU tensors through Triton's interpreter, so the shapes
here stay small; the `gpu` cases at the end are the large ones worth running on the device."""

from __future__ import annotations

import random
from dataclasses import dataclass, replace

import pytest
import torch

from kernels import paged_attention as pa
from kernels._triton import triton_testable

pytestmark = pytest.mark.skipif(not triton_testable(), reason="needs triton (a GPU or TRITON_INTERPRET=1)")

if triton_testable():
    from kernels import triton_attention as ta

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"
BF16_RTOL = 1e-2


@dataclass
class Batch:
    k_cache: torch.Tensor  # [num_pages, page_size, num_kv_heads, head_dim], NaN wherever no live token is
    v_cache: torch.Tensor
    block_table: torch.Tensor  # [num_rows, width] int32
    rows: torch.Tensor  # [batch] int32
    seq_lens: torch.Tensor  # [batch] int32
    tables: list[list[int]]  # per sequence, its live pages


def _batch(rng, seq_lens, page_size, kv_heads, head_dim, dtype, extra_rows=3) -> Batch:
    """Shuffled pages from 1.., rows a random subset of a larger table, every byte nobody may read set to NaN: page 0,
    spare pages, slots past a sequence's length, and table entries past its pages (they point at NaN pages)."""
    need = [-(-n // page_size) for n in seq_lens]
    num_pages = 1 + sum(need) + 4
    width = max(need + [1]) + 2
    pages = list(range(1, num_pages))
    rng.shuffle(pages)
    spare = pages[sum(need) :]
    shape = (num_pages, page_size, kv_heads, head_dim)
    k_cache = torch.full(shape, float("nan"), dtype=dtype, device=DEVICE)
    v_cache = torch.full(shape, float("nan"), dtype=dtype, device=DEVICE)
    num_rows = len(seq_lens) + extra_rows
    table = [[rng.choice([0, *spare]) for _ in range(width)] for _ in range(num_rows)]
    row_ids = rng.sample(range(num_rows), len(seq_lens))
    tables, slots = [], []
    for n, pages_needed, row in zip(seq_lens, need, row_ids, strict=True):
        own = [pages.pop() for _ in range(pages_needed)]
        table[row][:pages_needed] = own
        tables.append(own)
        slots += [own[i // page_size] * page_size + i % page_size for i in range(n)]
    slots = torch.tensor(slots, dtype=torch.long, device=DEVICE)
    for cache in (k_cache, v_cache):
        cache.view(-1, kv_heads, head_dim)[slots] = torch.randn(
            len(slots), kv_heads, head_dim, device=DEVICE
        ).to(dtype)
    as_i32 = lambda x: torch.tensor(x, dtype=torch.int32, device=DEVICE)  # noqa: E731
    return Batch(k_cache, v_cache, as_i32(table), as_i32(row_ids), as_i32(seq_lens), tables)


def _reference(q, b: Batch, q_lens, scale):
    """fp32 reference over the live sequences (q_len > 0 and seq_len > 0), packed like q."""
    live = [i for i, (ql, n) in enumerate(zip(q_lens, b.seq_lens.tolist(), strict=True)) if ql and n]
    starts = [sum(q_lens[:i]) for i in range(len(q_lens))]
    if not live:
        return None, []
    qs = torch.cat([q[starts[i] : starts[i] + q_lens[i]] for i in live]).float()
    ref = pa.paged_attention(
        qs,
        b.k_cache.float(),
        b.v_cache.float(),
        [torch.tensor(b.tables[i], device=DEVICE) for i in live],
        [q_lens[i] for i in live],
        [b.seq_lens[i].item() for i in live],
        scale,
    )
    return ref, [(starts[i], q_lens[i]) for i in live]


def _check(out, ref, spans, dtype):
    if not spans:
        return
    got = torch.cat([out[s : s + n] for s, n in spans]).float()
    assert not got.isnan().any()
    rel = ((got - ref).norm() / ref.norm()).item()
    max_abs = (got - ref).abs().max().item()
    peak = ref.abs().max().item()
    if dtype == torch.float32:  # seen on CPU: rel 2e-7, max_abs 3e-7 * peak
        assert rel < 1e-5 and max_abs < 1e-5 * peak, (rel, max_abs, peak)
    else:  # bf16 inputs against the fp32 answer for them; seen: rel 5e-3, max_abs 7e-3 * peak
        assert rel < BF16_RTOL and max_abs < 2e-2 * peak, (rel, max_abs, peak)


def _fused_q(num_tokens, heads, kv_heads, head_dim, dtype):
    # q as the slice of a fused qkv projection, as the model hands it over: row stride (heads + 2 kv) * head_dim
    qkv = torch.randn(num_tokens, (heads + 2 * kv_heads) * head_dim, device=DEVICE).to(dtype)
    return qkv[:, : heads * head_dim].view(num_tokens, heads, head_dim)


def _run_decode(
    seed, heads, kv_heads, head_dim, page_size, dtype, num_splits, seq_lens, block_n=16, ws_extra=0
):
    rng = random.Random(seed)
    torch.manual_seed(seed)
    b = _batch(rng, seq_lens, page_size, kv_heads, head_dim, dtype)
    q = _fused_q(len(seq_lens), heads, kv_heads, head_dim, dtype)
    out = torch.full_like(q, float("nan"))
    ws = None
    if ws_extra:
        ws = torch.full(
            (len(seq_lens) + ws_extra, heads, num_splits, head_dim + 1), float("nan"), device=DEVICE
        )
    scale = head_dim**-0.5
    ta.decode_attention(
        q, b.k_cache, b.v_cache, b.block_table, b.rows, b.seq_lens, scale, out,
        num_splits=num_splits, workspace=ws, block_n=block_n,
    )  # fmt: skip
    ref, spans = _reference(q, b, [1] * len(seq_lens), scale)
    _check(out, ref, spans, dtype)
    for i, n in enumerate(seq_lens):
        if n == 0:  # padding entry: exactly zero
            assert torch.equal(out[i], torch.zeros_like(out[i]))


HEADS = [(4, 4), (6, 2), (8, 1), (14, 2)]  # group sizes 1, 3, 8, 7


@pytest.mark.parametrize("heads,kv_heads", HEADS)
@pytest.mark.parametrize("page_size", [1, 4, 16])
def test_decode_matches_reference(heads, kv_heads, page_size):
    # 3 splits over 16-token blocks: long sequences split, short ones leave splits empty; padding entries at 1 and 5
    seq_lens = [37, 0, 1, 150, 16, 0, 9]
    _run_decode(heads + page_size, heads, kv_heads, 16, page_size, torch.float32, 3, seq_lens)


@pytest.mark.parametrize("num_splits", [1, 2, 16])
def test_decode_splits(num_splits):
    # 16 splits against at most 6 token blocks: most splits are empty; workspace preallocated for a larger batch
    seq_lens = [90, 0, 17, 33, 5]
    _run_decode(num_splits, 6, 2, 16, 4, torch.float32, num_splits, seq_lens, ws_extra=3)


@pytest.mark.parametrize("heads,kv_heads,page_size", [(14, 2, 16), (8, 1, 4)])
def test_decode_bfloat16(heads, kv_heads, page_size):
    _run_decode(3, heads, kv_heads, 16, page_size, torch.bfloat16, 4, [120, 0, 7, 64])


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_decode_head_dim_128(dtype):
    _run_decode(5, 14, 2, 128, 16, dtype, 4, [80, 3, 0], block_n=32)


def test_decode_head_dim_8_and_default_block():
    _run_decode(6, 6, 2, 8, 4, torch.float32, 2, [70, 0, 2, 130], block_n=ta.DECODE_BLOCK_N)


def test_decode_all_padding_and_empty_batch():
    _run_decode(7, 4, 2, 16, 4, torch.float32, 3, [0, 0])
    q = torch.randn(0, 4, 16, device=DEVICE)
    b = _batch(random.Random(0), [], 4, 2, 16, torch.float32)
    ta.decode_attention(q, b.k_cache, b.v_cache, b.block_table, b.rows, b.seq_lens, 0.25, q, num_splits=2)


def _run_extend(seed, heads, kv_heads, head_dim, page_size, dtype, seqs, block_rows=32, block_n=16):
    """seqs: (q_len, seq_len) per sequence."""
    rng = random.Random(seed)
    torch.manual_seed(seed)
    q_lens = [ql for ql, _ in seqs]
    b = _batch(rng, [n for _, n in seqs], page_size, kv_heads, head_dim, dtype)
    q = _fused_q(sum(q_lens), heads, kv_heads, head_dim, dtype)
    out = torch.full_like(q, float("nan"))
    starts = torch.tensor([sum(q_lens[:i]) for i in range(len(seqs))], dtype=torch.int32, device=DEVICE)
    scale = head_dim**-0.5
    ta.extend_attention(
        q, b.k_cache, b.v_cache, b.block_table, b.rows, b.seq_lens, starts,
        torch.tensor(q_lens, dtype=torch.int32, device=DEVICE), max(q_lens), scale, out,
        block_rows=block_rows, block_n=block_n,
    )  # fmt: skip
    ref, spans = _reference(q, b, q_lens, scale)
    assert sum(n for _, n in spans) == q.shape[0]  # every row of out is checked
    _check(out, ref, spans, dtype)


# decode rows, whole prompts (no prefix), chunks over a prefix (some across page and block edges), one q_len 0
MIXED = [(1, 40), (23, 23), (9, 50), (1, 1), (0, 12), (17, 33), (40, 75)]


@pytest.mark.parametrize("heads,kv_heads", HEADS)
@pytest.mark.parametrize("page_size", [1, 4, 16])
def test_extend_matches_reference(heads, kv_heads, page_size):
    _run_extend(heads * page_size, heads, kv_heads, 16, page_size, torch.float32, MIXED)


@pytest.mark.parametrize("block_rows,block_n", [(16, 16), (64, 32), (128, 64)])
def test_extend_tile_sizes(block_rows, block_n):
    # group 3 at 16 rows: 5 tokens per program, rows 15 and up are padding
    _run_extend(block_rows, 6, 2, 16, 4, torch.float32, MIXED, block_rows=block_rows, block_n=block_n)


@pytest.mark.parametrize("heads,kv_heads,page_size", [(14, 2, 16), (4, 4, 1)])
def test_extend_bfloat16(heads, kv_heads, page_size):
    _run_extend(11, heads, kv_heads, 16, page_size, torch.bfloat16, MIXED)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_extend_head_dim_128(dtype):
    _run_extend(12, 14, 2, 128, 16, dtype, [(1, 30), (20, 20), (12, 45)], block_n=32)


def test_extend_head_dim_8():
    _run_extend(13, 6, 2, 8, 4, torch.float32, MIXED[:4])


def test_extend_and_decode_agree_on_decode_rows():
    """A decode row through the extend kernel equals the decode kernel's answer for it."""
    rng = random.Random(14)
    seq_lens = [45, 3, 0, 20]
    b = _batch(rng, seq_lens, 4, 2, 16, torch.float32)
    q = torch.randn(4, 6, 16, device=DEVICE)
    dec = ta.decode_attention(
        q, b.k_cache, b.v_cache, b.block_table, b.rows, b.seq_lens, 0.3, torch.empty_like(q), num_splits=3
    )
    ones = torch.ones(4, dtype=torch.int32, device=DEVICE)
    starts = torch.arange(4, dtype=torch.int32, device=DEVICE)
    live = [0, 1, 3]
    ext = torch.full_like(q, float("nan"))
    ta.extend_attention(q, b.k_cache, b.v_cache, b.block_table, b.rows, b.seq_lens, starts, ones, 1, 0.3, ext)
    torch.testing.assert_close(ext[live], dec[live], rtol=1e-5, atol=1e-5)


def test_decode_num_splits_policy():
    # batch 1 of a 7B model (4 kv heads) on 132 SMs: split long contexts 64 ways, short ones only per token block
    assert ta.decode_num_splits(32768, 1, 4, 132) == 64
    assert ta.decode_num_splits(100, 1, 4, 132) == 2
    assert ta.decode_num_splits(32768, 64, 4, 132) == 1  # 256 programs already cover the SMs
    assert ta.decode_num_splits(32768, 256, 4, 132) == 1
    assert ta.decode_num_splits(0, 1, 4, 132) == 1
    # and the stages follow the split count
    assert ta.decode_num_stages(1) == 3 and ta.decode_num_stages(4) == 2


# The device cases: Qwen2.5-VL-7B attention (28 heads, 4 kv heads, head_dim 128), bf16, long contexts and big batches.
needs_cuda = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")


@pytest.mark.gpu
@needs_cuda
@pytest.mark.parametrize("page_size", [1, 16, 64])
@pytest.mark.parametrize("batch,max_len", [(1, 8192), (64, 2048)])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_gpu_decode_large(page_size, batch, max_len, dtype):
    rng = random.Random(batch + page_size)
    seq_lens = [max_len] + [rng.randrange(1, max_len + 1) for _ in range(batch - 2)] + [0] * (batch > 1)
    num_sms = torch.cuda.get_device_properties(0).multi_processor_count
    splits = ta.decode_num_splits(max_len, batch, 4, num_sms)
    _run_decode(batch, 28, 4, 128, page_size, dtype, splits, seq_lens, block_n=ta.DECODE_BLOCK_N)


@pytest.mark.gpu
@needs_cuda
@pytest.mark.parametrize("page_size", [1, 16, 64])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_gpu_extend_large(page_size, dtype):
    seqs = [(1, 3000), (4096, 4096), (700, 2500), (1, 1), (0, 50), (511, 1024), *[(1, 900)] * 32]
    _run_extend(page_size, 28, 4, 128, page_size, dtype, seqs, ta.EXTEND_BLOCK_ROWS, ta.EXTEND_BLOCK_N)


@pytest.mark.gpu
@needs_cuda
def test_gpu_decode_graph_replay():
    """Captured once, replayed with other lengths, rows and padding: the launch must not depend on the values."""
    rng = random.Random(21)
    full = [1500, 700, 64, 2000, 5, 333, 1024, 90]
    b = _batch(rng, full, 16, 4, 128, torch.bfloat16)
    q = torch.randn(8, 28, 128, device=DEVICE).to(torch.bfloat16)
    out = torch.empty_like(q)
    rows, seq_lens = b.rows.clone(), b.seq_lens.clone()
    splits = ta.decode_num_splits(2048, 8, 4, torch.cuda.get_device_properties(0).multi_processor_count)
    ws = torch.empty(8, 28, splits, 129, device=DEVICE)

    def step():
        ta.decode_attention(
            q,
            b.k_cache,
            b.v_cache,
            b.block_table,
            rows,
            seq_lens,
            0.088,
            out,
            num_splits=splits,
            workspace=ws,
        )

    step()  # compile outside the capture
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        step()
    for _ in range(3):
        order = rng.sample(range(8), 8)
        lens = [rng.randrange(0, full[i] + 1) if rng.random() < 0.8 else 0 for i in order]
        rows.copy_(b.rows[order])
        seq_lens.copy_(torch.tensor(lens, dtype=torch.int32))
        q.copy_(torch.randn(8, 28, 128).to(q.dtype))
        out.fill_(float("nan"))
        graph.replay()
        view = replace(b, rows=rows, seq_lens=seq_lens, tables=[b.tables[i] for i in order])
        ref, spans = _reference(q, view, [1] * 8, 0.088)
        _check(out, ref, spans, torch.bfloat16)
        assert all(torch.equal(out[i], torch.zeros_like(out[i])) for i in range(8) if lens[i] == 0)
