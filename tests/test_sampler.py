"""The worker's batched sampler against the definitions: greedy limits, the softmax at a temperature, top-k /
top-p / min-p truncation, penalties, logit bias, min_tokens, seeds and log-probabilities."""

from __future__ import annotations

import math

import pytest
import torch

from common.types import SamplingParams
from worker_svc.sampler import Sampler, SamplingContext

LOGITS = torch.tensor([2.0, 1.5, 1.0, 0.5, 0.0, -0.5, -1.0, -3.0])  # a fixed fixture over a vocabulary of 8
N = 20000


def draw(
    params: SamplingParams, n: int = N, logits: torch.Tensor = LOGITS, outputs=(), prompt=()
) -> torch.Tensor:
    """Token frequencies over n rows sampled in one batch."""
    sampler = Sampler(torch.device("cpu"))
    sampler.generator.manual_seed(1234)
    ctx = [SamplingContext(params, list(prompt), list(outputs)) for _ in range(n)]
    out = sampler(logits.expand(n, -1).clone(), ctx)
    return torch.bincount(torch.tensor(out.token_ids), minlength=logits.numel()).float() / n


def assert_matches(freq: torch.Tensor, probs: torch.Tensor) -> None:
    """Each frequency within 5 standard errors of its probability (binomial), and zero where probability is."""
    se = torch.sqrt(probs * (1 - probs) / N)
    assert torch.all((freq - probs).abs() <= 5 * se + 1e-9), (freq, probs)
    assert torch.all(freq[probs == 0] == 0)


@pytest.mark.parametrize("temperature", [0.5, 1.0, 2.0])
def test_frequencies_match_softmax_at_temperature(temperature):
    assert_matches(draw(SamplingParams(temperature=temperature)), torch.softmax(LOGITS / temperature, -1))


def test_top_k_one_and_tiny_top_p_are_greedy():
    for params in (
        SamplingParams(temperature=1.5, top_k=1),
        SamplingParams(temperature=1.5, top_p=1e-6),
        SamplingParams(temperature=0.0),
    ):
        freq = draw(params, n=500)
        assert freq[0] == 1.0


def test_top_k_keeps_the_k_most_likely():
    probs = torch.softmax(LOGITS, -1)
    probs[3:] = 0
    assert_matches(draw(SamplingParams(top_k=3)), probs / probs.sum())


def test_top_p_keeps_the_smallest_set_reaching_p():
    full = torch.softmax(
        LOGITS, -1
    )  # 0.37, 0.23, 0.14, ... : 0.6 needs the first two, and the third crosses it
    keep = int((full.cumsum(0) - full < 0.6).sum())
    probs = full.clone()
    probs[keep:] = 0
    assert_matches(draw(SamplingParams(top_p=0.6)), probs / probs.sum())


def test_min_p_drops_tokens_below_a_fraction_of_the_top():
    full = torch.softmax(LOGITS, -1)
    probs = torch.where(full >= 0.3 * full.max(), full, torch.zeros_like(full))
    assert_matches(draw(SamplingParams(min_p=0.3)), probs / probs.sum())


def _logprobs(params: SamplingParams, outputs=(), prompt=()) -> torch.Tensor:
    """The full distribution the sampler reports, via top_logprobs over the whole vocabulary."""
    params = SamplingParams(**{**params.__dict__, "return_logprob": True, "top_logprobs": LOGITS.numel()})
    out = Sampler(torch.device("cpu"))(
        LOGITS[None].clone(), [SamplingContext(params, list(prompt), list(outputs))]
    )
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


def test_logit_bias_and_min_tokens():
    assert draw(SamplingParams(temperature=0.0, logit_bias={7: 100.0}), n=10)[7] == 1.0
    suppressed = SamplingParams(temperature=0.0, min_tokens=3, min_tokens_suppress_ids=(0, 1))
    assert draw(suppressed, n=10, outputs=[5, 5])[2] == 1.0  # 2 outputs < 3: the top two are suppressed
    assert draw(suppressed, n=10, outputs=[5, 5, 5])[0] == 1.0  # min_tokens reached: back to greedy


def test_logprobs_are_of_the_distribution_sampled_from():
    lp = _logprobs(SamplingParams(temperature=2.0, top_k=2))
    torch.testing.assert_close(lp, torch.log_softmax(LOGITS / 2.0, -1))  # temperature yes, truncation no
    greedy = _logprobs(SamplingParams(temperature=0.0))
    torch.testing.assert_close(greedy, torch.log_softmax(LOGITS, -1))  # temperature 0: the raw log-softmax
    out = Sampler(torch.device("cpu"))(
        LOGITS[None].clone(),
        [SamplingContext(SamplingParams(temperature=0.0, return_logprob=True, top_logprobs=3), [], [])],
    )
    assert [t for t, _ in out.top_logprobs[0]] == [0, 1, 2]
    assert math.isclose(out.logprobs[0], float(torch.log_softmax(LOGITS, -1)[0]), rel_tol=1e-6)


def test_seeded_rows_do_not_depend_on_batch_companions():
    flat = torch.randn(64) * 0.1  # nearly flat: the draw depends on the noise, i.e. on the seed
    seeded = SamplingParams(temperature=1.0, seed=42)

    def run(batch_extra: int, position: int, outputs: int) -> int:
        rows = [SamplingParams(temperature=1.0)] * batch_extra
        rows.insert(position, seeded)
        ctx = [SamplingContext(p, [], [0] * outputs) for p in rows]
        out = Sampler(torch.device("cpu"))(flat.expand(len(rows), -1).clone(), ctx)
        return out.token_ids[position]

    first = [run(0, 0, k) for k in range(12)]
    assert [run(5, 3, k) for k in range(12)] == first
    assert [run(9, 9, k) for k in range(12)] == first
    assert len(set(first)) > 3  # successive outputs draw differently
    other = SamplingParams(temperature=1.0, seed=43)
    out = Sampler(torch.device("cpu"))(
        flat.expand(12, -1).clone(), [SamplingContext(other, [], [0] * k) for k in range(12)]
    )
    assert out.token_ids != first


def test_mixed_batch_applies_each_rows_parameters():
    rows = [
        SamplingParams(temperature=0.0),
        SamplingParams(temperature=0.0, logit_bias={5: 50.0}),
        SamplingParams(top_k=1, temperature=3.0),
        SamplingParams(temperature=0.0, min_tokens=1, min_tokens_suppress_ids=(0,)),
    ]
    out = Sampler(torch.device("cpu"))(
        LOGITS.expand(4, -1).clone(), [SamplingContext(p, [], []) for p in rows]
    )
    assert out.token_ids == [0, 5, 0, 1]
