"""The worker's batched sampler against the definitions: greedy limits, the softmax at a temperature, top-k /
top-p / min-p truncation, penalties, logit bias, min_tokens, seeds and log-probabilities; rows independent of
their batch and of preemption; no host synchronisation in a step; the Triton kernel against its torch reference."""

from __future__ import annotations

import math
import random

import pytest
import torch

from common.types import SamplingParams
from kernels import sampling as ks
from kernels._triton import triton_testable
from worker_svc.sampler import SampleOutput, Sampler, _Upload

LOGITS = torch.tensor([2.0, 1.5, 1.0, 0.5, 0.0, -0.5, -1.0, -3.0])  # a fixed fixture over a vocabulary of 8
N = 20000
CPU = torch.device("cpu")
DEVICE = torch.device(
    "cuda" if torch.cuda.is_available() else "cpu"
)  # the kernel's tests; the interpreter on CPU
needs_triton = pytest.mark.skipif(not triton_testable(), reason="needs triton (a GPU or TRITON_INTERPRET=1)")


def sample(sampler: Sampler, logits: torch.Tensor, rows) -> SampleOutput:
    return sampler.sample(logits.clone(), list(rows)).result()


def draw(
    params: SamplingParams, n: int = N, logits: torch.Tensor = LOGITS, outputs=(), prompt=()
) -> torch.Tensor:
    """Token frequencies over n rows sampled in one batch."""
    sampler = Sampler(CPU, logits.numel(), n, seed=1234)
    for row in range(n):
        sampler.add_row(row, params, list(prompt), list(outputs))
    out = sample(sampler, logits.expand(n, -1), range(n))
    return torch.bincount(torch.tensor(out.token_ids), minlength=logits.numel()).float() / n


def assert_matches(freq: torch.Tensor, probs: torch.Tensor) -> None:
    """Each frequency within 5 standard errors of its probability (binomial), and zero where probability is."""
    se = torch.sqrt(probs * (1 - probs) / N)
    assert torch.all((freq - probs).abs() <= 5 * se + 1e-9), (freq, probs)
    assert torch.all(freq[probs == 0] == 0)


@pytest.mark.parametrize("temperature", [0.5, 1.0, 2.0])
def test_frequencies_match_softmax_at_temperature(temperature):
    assert_matches(draw(SamplingParams(temperature=temperature)), torch.softmax(LOGITS / temperature, -1))


@pytest.mark.parametrize("params", [SamplingParams(temperature=0.8), SamplingParams(top_p=0.8, min_p=0.05)])
def test_the_race_between_blocks_is_exact(monkeypatch, params):
    monkeypatch.setattr(ks, "RACE_BLOCK", 3)  # blocks {0, 1, 2}, {3, 4, 5}, {6, 7} of the 8 tokens
    expect = torch.tensor(_kept(LOGITS / params.temperature, top_p=params.top_p, min_p=params.min_p))
    probs = torch.zeros(8)
    probs[expect] = torch.softmax(LOGITS[expect] / params.temperature, -1)
    assert_matches(draw(params), probs)


def test_top_k_one_and_tiny_top_p_are_greedy():
    for params in (
        SamplingParams(temperature=1.5, top_k=1),
        SamplingParams(temperature=1.5, top_p=1e-6),
        SamplingParams(temperature=1.5, min_p=1.0),
        SamplingParams(temperature=0.0),
    ):
        freq = draw(params, n=500)
        assert freq[0] == 1.0


def test_top_k_keeps_the_k_most_likely():
    probs = torch.softmax(LOGITS, -1)
    probs[3:] = 0
    assert_matches(draw(SamplingParams(top_k=3)), probs / probs.sum())


def test_top_p_keeps_the_smallest_set_reaching_p():
    # 0.37, 0.23, 0.14, ... : 0.6 needs the first two, and the third crosses it
    full = torch.softmax(LOGITS, -1)
    keep = int((full.cumsum(0) - full < 0.6).sum())
    probs = full.clone()
    probs[keep:] = 0
    assert_matches(draw(SamplingParams(top_p=0.6)), probs / probs.sum())


def test_top_p_applies_to_the_renormalised_top_k_set():
    full = torch.softmax(LOGITS, -1)
    top3 = full[:3] / full[:3].sum()  # 0.50, 0.31, 0.19: top_p 0.7 keeps the first two of the top three
    assert float(top3[0]) < 0.7 <= float(top3[:2].sum())
    probs = torch.zeros(8)
    probs[:2] = full[:2] / full[:2].sum()
    assert_matches(draw(SamplingParams(top_k=3, top_p=0.7)), probs)


def test_min_p_drops_tokens_below_a_fraction_of_the_top():
    full = torch.softmax(LOGITS, -1)
    probs = torch.where(full >= 0.3 * full.max(), full, torch.zeros_like(full))
    assert_matches(draw(SamplingParams(min_p=0.3)), probs / probs.sum())


def _kept(logits: torch.Tensor, **params) -> list[int]:
    """The reference's kept set for one row at temperature 1."""
    one = torch.ones(1)
    kept = torch.zeros(1, logits.numel(), dtype=torch.bool)
    ks.sample_rows_ref(
        logits[None],
        torch.zeros(1, dtype=torch.int64),
        one,
        torch.tensor([params.get("top_k", 0)]),
        torch.tensor([params.get("top_p", 1.0)]),
        torch.tensor([params.get("min_p", 0.0)]),
        torch.zeros(1, dtype=torch.int64),
        torch.zeros(1, dtype=torch.int64),
        torch.zeros(1, dtype=torch.int64),
        max_top_k=params.get("top_k", 0),
        any_top_p=params.get("top_p", 1.0) < 1,
        kept=kept,
    )
    return kept[0].nonzero()[:, 0].tolist()


def test_ties_at_a_threshold_are_kept_together():
    tied = torch.tensor([3.0, 1.0, 1.0, 1.0, -2.0])
    assert _kept(tied, top_k=2) == [0, 1, 2, 3]  # every token equal to the k-th largest
    p = torch.softmax(tied, -1)  # the top holds 0.83: top_p just above it reaches the tie group, all of it
    assert _kept(tied, top_p=float(p[0]) + 0.01) == [0, 1, 2, 3]
    assert _kept(tied, top_p=float(p[0]) - 0.01) == [0]
    # a tie at the top: the mass strictly more likely than either is 0
    assert _kept(torch.tensor([1.0, 1.0, 0.0]), top_p=0.1) == [0, 1]
    assert _kept(tied, min_p=math.exp(-2.0)) == [0, 1, 2, 3]  # e^(1 - 3) is exactly at the bound


def _logprobs(params: SamplingParams, outputs=(), prompt=()) -> torch.Tensor:
    """The full distribution the sampler reports, via top_logprobs over the whole vocabulary."""
    params = SamplingParams(**{**params.__dict__, "return_logprob": True, "top_logprobs": LOGITS.numel()})
    sampler = Sampler(CPU, LOGITS.numel(), 1)
    sampler.add_row(0, params, list(prompt), list(outputs))
    out = sample(sampler, LOGITS[None], [0])
    lp = torch.empty(LOGITS.numel())
    for tid, v in out.top_logprobs[0]:
        lp[tid] = v
    return lp


def test_presence_and_frequency_penalties_follow_openai():
    outputs = [1, 1, 1, 4]
    counts = torch.bincount(torch.tensor(outputs), minlength=8).float()
    expect = torch.log_softmax(LOGITS - 0.7 * counts - 0.4 * (counts > 0).float(), -1)
    got = _logprobs(
        SamplingParams(temperature=0.0, frequency_penalty=0.7, presence_penalty=0.4), outputs=outputs
    )
    torch.testing.assert_close(got, expect)


def test_repetition_penalty_divides_positive_and_multiplies_negative_logits():
    expect = LOGITS.clone()  # prompt token 0 (logit 2.0) and output token 6 (logit -1.0) are penalized
    expect[0] /= 2.0
    expect[6] *= 2.0
    got = _logprobs(SamplingParams(temperature=0.0, repetition_penalty=2.0), outputs=[6], prompt=[0])
    torch.testing.assert_close(got, torch.log_softmax(expect, -1))


def test_penalty_history_follows_each_step_and_reused_slots_start_clean():
    full = SamplingParams(temperature=0.0, top_logprobs=8, frequency_penalty=0.5, repetition_penalty=1.5)
    sampler = Sampler(CPU, 8, 4)
    history = {0: ([2], [1, 1]), 1: ([], [3]), 2: ([5], [])}
    for row, (prompt, outputs) in history.items():
        sampler.add_row(row, full, prompt, outputs)
    for step in range(4):
        if step == 2:  # row 1 leaves; a new sequence takes its row and, first, its pool slots
            sampler.remove_row(1)
            sampler.add_row(1, full, [7], [0])
            history[1] = ([7], [0])
        rows = sorted(history)
        out = sample(sampler, LOGITS.expand(len(rows), -1), rows)
        for b, row in enumerate(rows):
            prompt, outputs = history[row]
            counts = torch.bincount(torch.tensor(outputs, dtype=torch.long), minlength=8).float()
            seen = torch.zeros(8, dtype=torch.bool)
            seen[list(prompt) + list(outputs)] = True
            x = torch.where(seen, torch.where(LOGITS > 0, LOGITS / 1.5, LOGITS * 1.5), LOGITS) - 0.5 * counts
            got = torch.empty(8)
            for tid, v in out.top_logprobs[b]:
                got[tid] = v
            torch.testing.assert_close(got, torch.log_softmax(x, -1))
            assert out.token_ids[b] == int(x.argmax())
            outputs.append(out.token_ids[b])


def test_logit_bias_and_min_tokens():
    assert draw(SamplingParams(temperature=0.0, logit_bias={7: 100.0}), n=10)[7] == 1.0
    suppressed = SamplingParams(temperature=0.0, min_tokens=3, min_tokens_suppress_ids=(0, 1))
    assert draw(suppressed, n=10, outputs=[5, 5])[2] == 1.0  # 2 outputs < 3: the top two are suppressed
    assert draw(suppressed, n=10, outputs=[5, 5, 5])[0] == 1.0  # min_tokens reached: back to greedy
    sampler = Sampler(CPU, 8, 1)
    sampler.add_row(0, SamplingParams(temperature=0.0, min_tokens=2, min_tokens_suppress_ids=(0,)), [], [])
    tokens = [sample(sampler, LOGITS[None], [0]).token_ids[0] for _ in range(3)]
    assert tokens == [1, 1, 0]  # the sampler counts the row's outputs


def test_logprobs_are_of_the_distribution_sampled_from():
    lp = _logprobs(SamplingParams(temperature=2.0, top_k=2))
    torch.testing.assert_close(lp, torch.log_softmax(LOGITS / 2.0, -1))  # temperature yes, truncation no
    greedy = _logprobs(SamplingParams(temperature=0.0))
    torch.testing.assert_close(greedy, torch.log_softmax(LOGITS, -1))  # temperature 0: the raw log-softmax
    sampler = Sampler(CPU, 8, 3)
    sampler.add_row(0, SamplingParams(temperature=0.0), [], [])
    sampler.add_row(1, SamplingParams(temperature=0.0, return_logprob=True, top_logprobs=3), [], [])
    sampler.add_row(2, SamplingParams(temperature=0.0, return_logprob=True), [], [])
    out = sample(sampler, LOGITS.expand(3, -1), [0, 1, 2])
    assert out.top_logprobs[0] == [] and out.top_logprobs[2] == []
    assert [t for t, _ in out.top_logprobs[1]] == [0, 1, 2]
    assert math.isclose(out.logprobs[1], float(torch.log_softmax(LOGITS, -1)[0]), rel_tol=1e-6)
    assert out.logprobs[2] == out.logprobs[1]


def test_seeded_rows_do_not_depend_on_batch_companions():
    flat = torch.randn(64) * 0.1  # nearly flat: the draw depends on the noise, i.e. on the seed
    seeded = SamplingParams(temperature=1.0, seed=42)

    def run(batch_extra: int, position: int, outputs: int) -> int:
        rows = [SamplingParams(temperature=1.0)] * batch_extra
        rows.insert(position, seeded)
        sampler = Sampler(CPU, 64, 16)
        worker_rows = [(5 * b + 3) % 16 for b in range(len(rows))]  # any worker rows, in any order
        for row, p in zip(worker_rows, rows, strict=True):
            sampler.add_row(row, p, [], [0] * outputs)
        return sample(sampler, flat.expand(len(rows), -1), worker_rows).token_ids[position]

    first = [run(0, 0, k) for k in range(12)]
    assert [run(5, 3, k) for k in range(12)] == first
    assert [run(9, 9, k) for k in range(12)] == first
    assert len(set(first)) > 3  # successive outputs draw differently
    for other in (43, -1, 2**70):
        sampler = Sampler(CPU, 64, 12)
        for k in range(12):
            sampler.add_row(k, SamplingParams(temperature=1.0, seed=other), [], [0] * k)
        assert sample(sampler, flat.expand(12, -1), range(12)).token_ids != first


def test_unseeded_rows_differ_within_a_step_and_follow_the_random_seed():
    flat = torch.zeros(2, 1000)

    def tokens(seed: int) -> list[int]:
        sampler = Sampler(CPU, 1000, 2, seed=seed)
        for row in range(2):
            sampler.add_row(row, SamplingParams(temperature=1.0), [], [])
        return [t for _ in range(5) for t in sample(sampler, flat, [0, 1]).token_ids]

    a = tokens(1)
    assert a == tokens(1) and a != tokens(2)
    assert a[0::2] != a[1::2]


def test_mixed_batch_applies_each_rows_parameters():
    rows = [
        SamplingParams(temperature=0.0),
        SamplingParams(temperature=0.0, logit_bias={5: 50.0}),
        SamplingParams(top_k=1, temperature=3.0),
        SamplingParams(temperature=0.0, min_tokens=1, min_tokens_suppress_ids=(0,)),
    ]
    sampler = Sampler(CPU, 8, 4)
    for row, p in enumerate(rows):
        sampler.add_row(row, p, [], [])
    assert sample(sampler, LOGITS.expand(4, -1), range(4)).token_ids == [0, 5, 0, 1]


MIXED = [
    SamplingParams(temperature=0.0),
    SamplingParams(temperature=0.0, repetition_penalty=1.3, return_logprob=True, top_logprobs=2),
    SamplingParams(temperature=0.8, top_p=0.9, seed=1),
    SamplingParams(temperature=1.2, top_k=3, frequency_penalty=0.5, presence_penalty=0.2, seed=2),
    SamplingParams(temperature=1.0, min_p=0.2, seed=3, return_logprob=True),
    SamplingParams(
        temperature=0.7, logit_bias={4: 3.0}, min_tokens=3, min_tokens_suppress_ids=(1, 2), seed=4
    ),
    SamplingParams(temperature=1.5, top_k=5, top_p=0.8, min_p=0.05, seed=5, top_logprobs=4),
]


def _run_steps(
    rows: dict[int, SamplingParams], logits: list[torch.Tensor], order: list[int]
) -> dict[int, list]:
    """Steps over per-step logits [len(MIXED), V] (row i uses logits[step][i]); worker row of i is order[i]."""
    sampler = Sampler(CPU, logits[0].shape[1], 16)
    for i, p in rows.items():
        sampler.add_row(order[i], p, [3, 4], [])
    got: dict[int, list] = {i: [] for i in rows}
    for step_logits in logits:
        ids = sorted(rows, key=lambda i: order[i])
        out = sample(sampler, step_logits[ids], [order[i] for i in ids])
        for b, i in enumerate(ids):
            lp = out.logprobs[b] if out.logprobs else None
            top = out.top_logprobs[b] if out.top_logprobs else None
            got[i].append((out.token_ids[b], lp if MIXED[i].return_logprob else None, top or None))
    return got


def test_each_row_of_a_mixed_batch_equals_that_row_alone():
    gen = torch.Generator().manual_seed(0)
    logits = [torch.randn(len(MIXED), 50, generator=gen) * 2 for _ in range(6)]
    order = [9, 2, 14, 0, 7, 3, 11]
    batched = _run_steps(dict(enumerate(MIXED)), logits, order)
    for i, p in enumerate(MIXED):
        assert _run_steps({i: p}, logits, [0] * len(MIXED)) == {i: batched[i]}, i
    assert len({t for t, _, _ in batched[2]}) > 1  # the sampled rows do sample


def test_preemption_continues_a_seeded_stream():
    params = SamplingParams(
        temperature=1.0, top_p=0.95, seed=99, repetition_penalty=1.2, frequency_penalty=0.3
    )
    gen = torch.Generator().manual_seed(1)
    logits = [torch.randn(1, 40, generator=gen) for _ in range(10)]
    prompt = [1, 2, 3]

    sampler = Sampler(CPU, 40, 4)
    sampler.add_row(0, params, prompt, [])
    straight = [sample(sampler, x, [0]).token_ids[0] for x in logits]

    sampler = Sampler(CPU, 40, 4)
    sampler.add_row(0, params, prompt, [])
    resumed = [sample(sampler, x, [0]).token_ids[0] for x in logits[:5]]
    sampler.remove_row(0)
    sampler.add_row(0, SamplingParams(frequency_penalty=2.0, repetition_penalty=3.0), [5] * 10, [6] * 7)
    sample(sampler, logits[0], [0])  # another sequence dirties the row and its pool slots
    sampler.remove_row(0)
    sampler.add_row(2, params, prompt, resumed)  # re-admitted elsewhere with its earlier outputs
    resumed += [sample(sampler, x, [2]).token_ids[0] for x in logits[5:]]
    assert resumed == straight
    assert len(set(straight)) > 3


def test_greedy_batches_take_the_argmax_only(monkeypatch):
    def no_upload(self, device):
        raise AssertionError("a greedy-only batch uploads nothing")

    sampler = Sampler(CPU, 8, 3)
    for row in range(3):
        sampler.add_row(row, SamplingParams(temperature=0.0 if row else 1.0, top_k=0 if row else 1), [], [])
    sends = []
    monkeypatch.setattr(_Upload, "send", no_upload)
    assert sample(sampler, LOGITS.expand(3, -1), [2, 0, 1]).token_ids == [0, 0, 0]
    monkeypatch.undo()
    real_send = _Upload.send
    monkeypatch.setattr(_Upload, "send", lambda self, device: sends.append(1) or real_send(self, device))
    sampler.add_row(1, SamplingParams(temperature=0.0, presence_penalty=1.0), [], [])
    sample(sampler, LOGITS.expand(3, -1), [0, 1, 2])
    assert sends  # the check above can fail


def test_sample_never_reads_the_device(monkeypatch):
    """sample() decides everything from host-side knowledge: no .item(), .tolist(), bool() or nonzero() on a
    tensor until result()."""
    sampler = Sampler(CPU, 50, 16, seed=3)
    rows = MIXED + [SamplingParams(temperature=1.0), SamplingParams(temperature=0.9, top_p=0.5)]
    for i, p in enumerate(rows):
        sampler.add_row(i, p, [1, 2], [3])
    logits = torch.randn(len(MIXED) + 2, 50)
    calls = []

    def forbidden(name):
        def f(self, *args, **kwargs):
            calls.append(name)
            raise AssertionError(f"Tensor.{name} in sample()")

        return f

    for name in ("item", "tolist", "__bool__", "__int__", "__float__", "nonzero", "cpu", "numpy"):
        monkeypatch.setattr(torch.Tensor, name, forbidden(name))
    pending = sampler.sample(logits, list(range(len(MIXED) + 2)))
    monkeypatch.undo()
    assert not calls
    out = pending.result()
    assert len(out.token_ids) == len(MIXED) + 2 and out.token_ids[:2] == logits[:2].argmax(-1).tolist()
    with pytest.raises(AssertionError):  # the patch does catch a read
        monkeypatch.setattr(torch.Tensor, "item", forbidden("item"))
        logits.sum().item()


# ---- the Triton kernel against its torch reference ----


def _kernel_case(vocab: int, seed: int):
    gen = torch.Generator().manual_seed(seed)
    logits = torch.randn(9, vocab, generator=gen) * 3
    logits[2, 100:200] = float("-inf")  # suppressed tokens
    logits[3] = torch.round(logits[3] * 2) / 2  # many ties
    logits[8] = torch.randn(vocab, generator=gen) * 0.01  # nearly flat: every token a candidate
    params = [  # (temperature, top_k, top_p, min_p)
        (0.7, 0, 0.9, 0.0),
        (1.0, 2, 1.0, 0.0),
        (1.3, 50, 0.8, 0.05),
        (0.5, 3, 0.95, 0.0),
        (2.0, 0, 1.0, 0.1),
        (1.0, 0, 1.0, 0.0),
        (0.9, 20, 0.3, 0.0),
        (1.0, 400, 0.99, 0.0),
    ]
    rows = torch.tensor([0, 1, 2, 3, 5, 6, 7, 8])
    cols = list(zip(*params, strict=True))
    args = (
        logits,
        rows,
        torch.tensor(cols[0]),
        torch.tensor(cols[1]),
        torch.tensor(cols[2]),
        torch.tensor(cols[3]),
        torch.tensor([random.Random(seed + i).getrandbits(63) for i in range(len(params))]),
        torch.tensor([i if i % 2 else (1 << 32) | i for i in range(len(params))]),
    )
    return tuple(a.to(DEVICE) for a in args), max(cols[1]), len(params)


@needs_triton
def test_noise_matches_tritons_philox():
    import triton
    import triton.language as tl

    @triton.jit
    def noise_kernel(key, ctr, out, N: tl.constexpr, TAG: tl.constexpr):
        s = tl.program_id(0)
        offs = tl.arange(0, N)
        tl.store(out + s * N + offs, ks._exponential(tl.load(key + s), tl.load(ctr + s), offs, TAG))

    key = torch.tensor([0, 42, -5, 2**62 + 12345, -(2**63)], device=DEVICE)
    ctr = torch.tensor([0, 7, (1 << 32) | 3, 2**40 + 5, 123], device=DEVICE)
    got = torch.empty(5, 2048, device=DEVICE)
    noise_kernel[(5,)](key, ctr, got, N=2048, TAG=ks.BLOCK_TAG)
    ref = ks.exponential_noise(key, ctr, torch.arange(2048, device=DEVICE), ks.BLOCK_TAG)
    torch.testing.assert_close(got, ref, rtol=1e-5, atol=0)  # the same Philox bits; log may differ in ulps
    assert abs(float(ref.mean()) - 1) < 0.05 and abs(float(ref.var()) - 1) < 0.1  # Exp(1)


@needs_triton
@pytest.mark.parametrize("vocab,cap", [(2500, ks.CANDIDATE_CAP), (2500, 64), (300, ks.CANDIDATE_CAP)])
def test_kernel_matches_reference(vocab, cap):
    """The kept set of each row and the token drawn with the same counter-based noise, token for token; a small
    cap sends rows with many candidates down the whole-row search."""
    args, max_top_k, num_rows = _kernel_case(vocab, seed=vocab + cap)
    out_ref = torch.full((9,), -1, device=DEVICE)
    out_tri = out_ref.clone()
    kept_ref = torch.zeros(num_rows, vocab, dtype=torch.bool, device=DEVICE)
    kept_tri = torch.zeros(num_rows, vocab, dtype=torch.int8, device=DEVICE)
    ks.sample_rows_ref(*args, out_ref, max_top_k=max_top_k, any_top_p=True, kept=kept_ref)
    ks.sample_rows_triton(*args, out_tri, cap=cap, kept=kept_tri)
    assert torch.equal(kept_tri.bool(), kept_ref)
    assert torch.equal(out_tri, out_ref)
    assert out_ref[4] == -1 and all(kept_ref[i, out_ref[r]] for i, r in enumerate(args[1].tolist()))
    assert kept_ref.sum(1).tolist()[:2] != [vocab, vocab]  # truncation did happen


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
def test_cuda_sampler_equals_the_cpu_sampler():
    """The whole step on the GPU (kernel, pinned upload, asynchronous copies) against the CPU path: seeded rows
    and greedy rows give the same tokens and log-probs, step after step."""
    gen = torch.Generator().manual_seed(3)
    logits = [torch.randn(len(MIXED), 3000, generator=gen) * 2 for _ in range(6)]
    runs = []
    for device in (CPU, torch.device("cuda")):
        sampler = Sampler(device, 3000, 16)
        for i, p in enumerate(MIXED):
            sampler.add_row(i, p, [3, 4], [])
        pending = [sampler.sample(x.to(device), list(range(len(MIXED)))) for x in logits]
        torch.cuda.synchronize()
        runs.append([p.result() for p in pending])
    for cpu, cuda in zip(*runs, strict=True):
        assert cuda.token_ids == cpu.token_ids
        # seen on an H100 (2026-11-26): one penalised row's log-prob 1e-3 apart in one of the six steps, tokens equal
        assert cuda.logprobs == pytest.approx(cpu.logprobs, abs=2e-3)
