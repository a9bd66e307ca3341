"""Every attention backend against the torch reference backend, through the backend interface the model uses:
mixed prefill/decode batches and decode-only batches, over page sizes, GQA ratios and dtypes. Triton runs here
through its interpreter when there is no GPU; flashinfer only on a GPU."""

from __future__ import annotations

import random

import numpy as np
import pytest
import torch

from worker_svc.attention import create_attention_backend, installed
from worker_svc.attention.base import AttentionMetadata, KVCache

DEVICE = torch.device("cuda" if torch.cuda.is_available() else "cpu")
BACKENDS = [b for b in ("triton", "flashinfer") if installed(b, DEVICE)]


def _layout(
    rng: random.Random, num_seqs: int, page_size: int, num_pages: int, decode_only: bool, max_len: int
):
    pages = list(range(1, num_pages))
    rng.shuffle(pages)
    q_lens, kv_lens, tables = [], [], []
    for _ in range(num_seqs):
        kv = rng.randrange(1, max_len)
        q = 1 if decode_only or rng.random() < 0.4 else rng.randrange(1, kv + 1)
        tables.append([pages.pop() for _ in range(-(-kv // page_size))])
        q_lens.append(q)
        kv_lens.append(kv)
    return q_lens, kv_lens, tables


def _meta(q_lens, kv_lens, tables, page_size, rows, max_rows, width, device) -> AttentionMetadata:
    block_table = torch.zeros(max_rows, width, dtype=torch.int32)
    slots = []
    for row, q, kv, t in zip(rows, q_lens, kv_lens, tables, strict=True):
        block_table[row, : len(t)] = torch.tensor(t, dtype=torch.int32)
        slots += [t[i // page_size] * page_size + i % page_size for i in range(kv - q, kv)]
    q_start = np.concatenate([[0], np.cumsum(q_lens)[:-1]]).astype(np.int32)

    def dev(x):
        return torch.as_tensor(np.asarray(x, dtype=np.int32), device=device)

    return AttentionMetadata(
        num_tokens=sum(q_lens),
        is_decode=all(q == 1 for q in q_lens),
        max_q_len=max(q_lens),
        max_seq_len=max(kv_lens),
        slot_mapping=dev(slots),
        rows=dev(rows),
        seq_lens=dev(kv_lens),
        q_start=dev(q_start),
        q_lens=dev(q_lens),
        block_table=block_table.to(device),
        rows_host=np.asarray(rows, np.int32),
        seq_lens_host=np.asarray(kv_lens, np.int32),
        q_lens_host=np.asarray(q_lens, np.int32),
        page_tables_host=tables,
    )


def _check(
    backend: str, heads: int, kv_heads: int, head_dim: int, page_size: int, dtype, decode_only: bool, seed
):
    rng = random.Random(seed)
    torch.manual_seed(seed)
    num_pages, num_seqs, max_rows = 500, 6, 16
    q_lens, kv_lens, tables = _layout(rng, num_seqs, page_size, num_pages, decode_only, 70)
    rows = rng.sample(range(max_rows), num_seqs)
    width = max(map(len, tables)) + 2
    meta = _meta(q_lens, kv_lens, tables, page_size, rows, max_rows, width, DEVICE)
    caches = []
    for _ in range(2):
        c = KVCache(1, num_pages, page_size, kv_heads, head_dim, dtype, DEVICE)
        caches.append(c)
    caches[0].k.normal_()
    caches[0].v.normal_()
    caches[1].k.copy_(caches[0].k)
    caches[1].v.copy_(caches[0].v)
    n = meta.num_tokens
    qkv = torch.randn(n, (heads + 2 * kv_heads) * head_dim, dtype=dtype, device=DEVICE)
    q, k, v = qkv.split([heads * head_dim, kv_heads * head_dim, kv_heads * head_dim], dim=-1)
    q, k, v = q.view(n, heads, head_dim), k.view(n, kv_heads, head_dim), v.view(n, kv_heads, head_dim)
    scale = head_dim**-0.5
    ref_backend = create_attention_backend("torch_native", caches[0], heads, scale, max_rows, DEVICE)
    ref = ref_backend.forward(0, q, k, v, meta)
    fast = create_attention_backend(backend, caches[1], heads, scale, max_rows, DEVICE)
    fast.prepare(meta)
    out = fast.forward(0, q, k, v, meta)
    assert torch.equal(caches[0].k, caches[1].k) and torch.equal(caches[0].v, caches[1].v)
    err = (out.float() - ref.float()).norm() / ref.float().norm()
    assert err < (1e-5 if dtype == torch.float32 else 1e-2), err
    assert torch.isfinite(out).all()


@pytest.mark.skipif(not BACKENDS, reason="no fast backend usable here (needs triton, or a GPU)")
@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("heads,kv_heads", [(4, 4), (6, 2), (14, 2)])
@pytest.mark.parametrize("page_size", [1, 16])
@pytest.mark.parametrize("decode_only", [True, False])
def test_backend_matches_reference(backend, heads, kv_heads, page_size, decode_only):
    dtype = torch.float32 if DEVICE.type == "cpu" else torch.bfloat16
    head_dim = 64 if backend == "flashinfer" else 16  # flashinfer builds head dims 64, 128 and 256
    _check(backend, heads, kv_heads, head_dim, page_size, dtype, decode_only, heads * 10 + page_size)


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
@pytest.mark.parametrize("backend", [b for b in ("triton", "flashinfer") if installed(b, DEVICE)])
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
@pytest.mark.parametrize("decode_only", [True, False])
def test_backend_matches_reference_at_7b_head_shapes(backend, dtype, decode_only):
    _check(backend, 28, 4, 128, 16, dtype, decode_only, 7)


@pytest.mark.skipif(not BACKENDS, reason="no fast backend usable here (needs triton, or a GPU)")
@pytest.mark.parametrize("graphs", [True, False] if DEVICE.type == "cuda" else [False])
@pytest.mark.parametrize("backend", BACKENDS)
def test_runner_greedy_tokens_equal_the_reference_backend(backend, graphs, default_model):
    """The whole worker step (prefill chunks, mixed batches, decode; CUDA graphs on or off on a GPU: decode graphs
    and piecewise prompt graphs) through a fast backend gives the reference backend's greedy tokens (float32, the
    embedded model; the reference runs kernel by kernel)."""
    from common.types import SamplingParams, SeqInit, SeqStep, StepPlan
    from worker_svc.model_runner import ModelRunner, RunnerConfig

    if (
        backend == "flashinfer"
    ):  # float32 is what makes greedy tokens comparable; flashinfer has no such kernels
        with pytest.raises(ValueError, match="float16 or bfloat16"):
            ModelRunner(RunnerConfig(str(default_model), device=str(DEVICE), attention_backend=backend), None)
        return
    prompts = [[(i * 37 + j * 11) % 5000 + 10 for j in range(5 + i * 9)] for i in range(4)]

    def generate(name: str, graphs: bool) -> dict[str, list[int]]:
        runner = ModelRunner(
            RunnerConfig(str(default_model), device=str(DEVICE), attention_backend=name, page_size=4,
                         max_total_tokens=2048, max_running_requests=8, disable_cuda_graph=not graphs,
                         piecewise_cuda_graph_max_tokens=64),
            None,
        )  # fmt: skip
        assert (runner.graphs is not None) == graphs
        assert (runner.piecewise is not None) == graphs
        runner.warmup()
        replays = runner.piecewise.replays if graphs else 0
        out: dict[str, list[int]] = {f"s{i}": [] for i in range(len(prompts))}
        greedy = SamplingParams(temperature=0.0)
        # step 1: the first two prompts; step 2: the others chunked (8 tokens), mixed with two decodes
        first = [
            SeqStep(
                f"s{i}",
                0,
                tuple(p),
                True,
                0,
                tuple(range(1 + 30 * i, 31 + 30 * i)),
                SeqInit((), greedy, len(p)),
            )
            for i, p in enumerate(prompts[:2])
        ]
        steps = [StepPlan(1, tuple(first))]
        decode = [SeqStep(f"s{i}", len(prompts[i]), (), True) for i in range(2)]
        chunked = [
            SeqStep(
                f"s{i}",
                0,
                tuple(p[:8]),
                False,
                0,
                tuple(range(1 + 30 * i, 31 + 30 * i)),
                SeqInit((), greedy, len(p)),
            )
            for i, p in ((2, prompts[2]), (3, prompts[3]))
        ]
        steps.append(StepPlan(2, (*decode, *chunked)))
        pos = {0: len(prompts[0]) + 1, 1: len(prompts[1]) + 1}
        rest = [SeqStep(f"s{i}", 8, tuple(prompts[i][8:]), True) for i in (2, 3)]
        steps.append(StepPlan(3, (*[SeqStep(f"s{i}", pos[i], (), True) for i in (0, 1)], *rest)))
        for plan in steps:
            for r in runner.step(plan).results:
                out[r.seq_id].append(r.token_id)
        for t in range(6):
            plan = StepPlan(4 + t, tuple(
                SeqStep(f"s{i}", len(p) + len(out[f"s{i}"]) - 1, (), True) for i, p in enumerate(prompts)
            ))  # fmt: skip
            for r in runner.step(plan).results:
                out[r.seq_id].append(r.token_id)
        if graphs:  # the three prompt steps (19, 18 and 41 tokens) went through the piecewise graphs
            assert runner.piecewise.replays - replays == 3
        return out

    ref = generate("torch_native", False)
    assert all(len(v) >= 7 for v in ref.values())
    assert generate(backend, graphs) == ref
