"""Batched sampling on the logits tensor with per-sequence parameters.

Order: logit bias, min_tokens suppression, repetition / frequency / presence penalties, temperature; log-probs
are taken here (the distribution the token is drawn from, before top-k / top-p / min-p truncation; at
temperature 0 the log-softmax of the penalized logits); then truncation and the draw. Seeded sequences draw
from a generator keyed by (seed, output index), so their tokens do not depend on batch companions or
preemption.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import torch

from common.types import SamplingParams

_SEED_MIX = 0x9E3779B97F4A7C15


@dataclass
class SamplingContext:
    """Per-sequence history the penalties and seeded draws need."""

    params: SamplingParams
    prompt_ids: Sequence[int]
    output_ids: Sequence[int]


@dataclass
class SampleOutput:
    token_ids: list[int]
    logprobs: list[float] | None
    top_logprobs: list[list[tuple[int, float]]] | None


class Sampler:
    def __init__(self, device: torch.device):
        self.device = device
        self.generator = torch.Generator(device=device)
        self.generator.seed()

    def __call__(self, logits: torch.Tensor, contexts: Sequence[SamplingContext]) -> SampleOutput:
        # logits: [B, V] float32
        params = [c.params for c in contexts]
        batch, vocab = logits.shape
        logits = logits.clone()
        self._apply_bias_and_suppression(logits, contexts)
        self._apply_penalties(logits, contexts, vocab)

        temps = torch.tensor(
            [p.temperature if p.temperature > 0 else 1.0 for p in params], device=logits.device
        )
        scaled = logits / temps[:, None]
        logprobs_all = None
        want_lp = any(p.return_logprob or p.top_logprobs for p in params)
        if want_lp:
            logprobs_all = torch.log_softmax(scaled, dim=-1)

        greedy = torch.tensor([p.greedy for p in params], device=logits.device)
        tokens = scaled.argmax(dim=-1)
        if not bool(greedy.all()):
            filtered = self._truncate(scaled, params)
            probs = torch.softmax(filtered, dim=-1)
            noise = self._exponential_noise(contexts, batch, vocab, logits.device)
            sampled = (probs / noise).argmax(dim=-1)  # the exponential race: an exact draw from probs
            tokens = torch.where(greedy, tokens, sampled)

        token_list = tokens.tolist()
        out_lp = out_top = None
        if want_lp and logprobs_all is not None:
            out_lp = logprobs_all.gather(1, tokens[:, None]).squeeze(1).tolist()
            k = max(p.top_logprobs for p in params)
            out_top = [[] for _ in params]
            if k > 0:
                top_v, top_i = logprobs_all.topk(k, dim=-1)
                top_v, top_i = top_v.tolist(), top_i.tolist()
                out_top = [
                    list(zip(top_i[b][: p.top_logprobs], top_v[b][: p.top_logprobs], strict=True))
                    for b, p in enumerate(params)
                ]
        return SampleOutput(token_list, out_lp, out_top)

    @staticmethod
    def _apply_bias_and_suppression(logits: torch.Tensor, contexts: Sequence[SamplingContext]) -> None:
        rows, cols, vals = [], [], []
        for b, c in enumerate(contexts):
            for tid, bias in c.params.logit_bias.items():
                if 0 <= tid < logits.shape[1]:
                    rows.append(b)
                    cols.append(tid)
                    vals.append(bias)
        if rows:
            logits.index_put_(
                (torch.tensor(rows, device=logits.device), torch.tensor(cols, device=logits.device)),
                torch.tensor(vals, device=logits.device, dtype=logits.dtype),
                accumulate=True,
            )
        rows, cols = [], []
        for b, c in enumerate(contexts):
            if len(c.output_ids) < c.params.min_tokens:
                ids = [t for t in c.params.min_tokens_suppress_ids if 0 <= t < logits.shape[1]]
                rows.extend([b] * len(ids))
                cols.extend(ids)
        if rows:
            logits[torch.tensor(rows, device=logits.device), torch.tensor(cols, device=logits.device)] = (
                float("-inf")
            )

    @staticmethod
    def _apply_penalties(logits: torch.Tensor, contexts: Sequence[SamplingContext], vocab: int) -> None:
        device = logits.device
        rep = [b for b, c in enumerate(contexts) if c.params.repetition_penalty != 1.0]
        if rep:
            for b in rep:  # one scatter per penalized sequence, over its distinct tokens only
                ids = torch.tensor(
                    sorted(set(contexts[b].prompt_ids) | set(contexts[b].output_ids)),
                    device=device,
                    dtype=torch.long,
                )
                ids = ids[ids < vocab]
                if ids.numel():
                    row = logits[b, ids]
                    penalty = contexts[b].params.repetition_penalty
                    logits[b, ids] = torch.where(row > 0, row / penalty, row * penalty)
        freq = [
            b
            for b, c in enumerate(contexts)
            if (c.params.frequency_penalty or c.params.presence_penalty) and c.output_ids
        ]
        if freq:
            counts = torch.zeros(len(freq), vocab, device=device)
            for i, b in enumerate(freq):
                ids = torch.tensor(contexts[b].output_ids, device=device, dtype=torch.long)
                ids = ids[ids < vocab]
                counts[i].scatter_add_(0, ids, torch.ones_like(ids, dtype=counts.dtype))
            fp = torch.tensor([contexts[b].params.frequency_penalty for b in freq], device=device)[:, None]
            pp = torch.tensor([contexts[b].params.presence_penalty for b in freq], device=device)[:, None]
            idx = torch.tensor(freq, device=device)
            logits[idx] -= fp * counts + pp * (counts > 0).to(counts.dtype)

    @staticmethod
    def _truncate(scaled: torch.Tensor, params: Sequence[SamplingParams]) -> torch.Tensor:
        need_sort = any(p.top_k > 0 or p.top_p < 1.0 for p in params)
        need_min_p = any(p.min_p > 0 for p in params)
        if not (need_sort or need_min_p):
            return scaled
        device = scaled.device
        out = scaled
        if need_sort:
            sorted_logits, order = scaled.sort(dim=-1, descending=True)
            vocab = scaled.shape[1]
            top_k = torch.tensor([p.top_k if p.top_k > 0 else vocab for p in params], device=device)
            top_p = torch.tensor([p.top_p for p in params], device=device)
            ranks = torch.arange(vocab, device=device)[None, :]
            drop = ranks >= top_k[:, None]
            probs = torch.softmax(sorted_logits.masked_fill(drop, float("-inf")), dim=-1)
            before = probs.cumsum(dim=-1) - probs  # mass of strictly more likely tokens
            drop |= before >= top_p[:, None]
            drop[:, 0] = False
            sorted_logits = sorted_logits.masked_fill(drop, float("-inf"))
            out = torch.empty_like(scaled).scatter_(1, order, sorted_logits)
        if need_min_p:
            min_p = torch.tensor([p.min_p for p in params], device=device)[:, None]
            probs = torch.softmax(out, dim=-1)
            out = out.masked_fill(probs < min_p * probs.max(dim=-1, keepdim=True).values, float("-inf"))
        return out

    def _exponential_noise(
        self, contexts: Sequence[SamplingContext], batch: int, vocab: int, device: torch.device
    ) -> torch.Tensor:
        noise = torch.empty(batch, vocab, device=device).exponential_(generator=self.generator)
        for b, c in enumerate(contexts):
            if c.params.seed is not None:
                g = torch.Generator(device=device)
                g.manual_seed((c.params.seed * _SEED_MIX + len(c.output_ids) + 1) % (1 << 63))
                noise[b].exponential_(generator=g)
        return noise
