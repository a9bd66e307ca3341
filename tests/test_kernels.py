"""Every fast attention path against the per-sequence plain-torch reference in kernels/paged_attention.py."""

from __future__ import annotations

import random

import pytest
import torch

from kernels import paged_attention as pa
from tests.test_attention_backends import _meta
from worker_svc.attention.base import KVCache
from worker_svc.attention.torch_native import TorchNativeAttention


def _random_layout(rng: random.Random, num_seqs: int, page_size: int, num_pages: int, decode_only: bool):
    pages = list(range(1, num_pages))
    rng.shuffle(pages)
    query_lens, kv_lens, tables = [], [], []
    for _ in range(num_seqs):
        kv = rng.randrange(1, 40)
        q = 1 if decode_only or rng.random() < 0.5 else rng.randrange(1, kv + 1)
        n_pages = -(-kv // page_size)
        tables.append([pages.pop() for _ in range(n_pages)])
        query_lens.append(q)
        kv_lens.append(kv)
    return query_lens, kv_lens, tables


@pytest.mark.parametrize("heads,kv_heads", [(4, 4), (6, 2), (8, 1)])
@pytest.mark.parametrize("page_size", [1, 4, 16])
def test_decode_attention_matches_reference(heads, kv_heads, page_size):
    rng = random.Random(heads * 100 + page_size)
    torch.manual_seed(page_size)
    num_pages, head_dim = 200, 16
    k_cache = torch.randn(num_pages, page_size, kv_heads, head_dim)
    v_cache = torch.randn(num_pages, page_size, kv_heads, head_dim)
    _, kv_lens, tables = _random_layout(rng, 7, page_size, num_pages, decode_only=True)
    q = torch.randn(7, heads, head_dim)
    ref = pa.paged_attention(q, k_cache, v_cache, [torch.tensor(t) for t in tables], [1] * 7, kv_lens, 0.25)
    width = max(map(len, tables))
    table = torch.tensor([t + [0] * (width - len(t)) for t in tables])
    out = pa.paged_decode_attention(q, k_cache, v_cache, table, torch.tensor(kv_lens), 0.25)
    torch.testing.assert_close(out, ref, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("seed", range(4))
def test_backend_mixed_batch_matches_reference(seed):
    rng = random.Random(seed)
    torch.manual_seed(seed)
    page_size, heads, kv_heads, head_dim = 4, 6, 2, 8
    cache = KVCache(1, 300, page_size, kv_heads, head_dim, torch.float32, torch.device("cpu"))
    cache.k.normal_()
    cache.v.normal_()
    query_lens, kv_lens, tables = _random_layout(rng, 9, page_size, 300, decode_only=False)
    n = sum(query_lens)
    slots = []
    for q, kv, t in zip(query_lens, kv_lens, tables, strict=True):
        slots += [t[i // page_size] * page_size + i % page_size for i in range(kv - q, kv)]
    q = torch.randn(n, heads, head_dim)
    k, v = torch.randn(n, kv_heads, head_dim), torch.randn(n, kv_heads, head_dim)
    rows = list(range(len(tables)))
    meta = _meta(query_lens, kv_lens, tables, page_size, rows, len(rows), max(map(len, tables)), "cpu")
    k_ref, v_ref = cache.k[0].clone(), cache.v[0].clone()
    out = TorchNativeAttention(cache, heads, 0.3, len(rows), torch.device("cpu")).forward(0, q, k, v, meta)
    pa.store_kv(k, v, k_ref, v_ref, torch.tensor(slots))
    ref = pa.paged_attention(q, k_ref, v_ref, [torch.tensor(t) for t in tables], query_lens, kv_lens, 0.3)
    torch.testing.assert_close(out, ref, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(cache.k[0], k_ref)
