"""Prompt log-probabilities (SGLang's logprob_start_len, OpenAI's echo with logprobs): rows of a prefill chunk
through the output head, log-softmax, each row's target and top alternatives. Rows go through the head in slices,
so a long prompt never holds [rows, vocab] float32 logits at once."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import torch

from common.types import PromptLogprobs

ROWS_PER_SLICE = 256  # [256, 152k] float32 logits: 156 MB at a time


@dataclass(frozen=True)
class ScoredRows:
    """One sequence's rows of a step that score prompt tokens: packed rows row0 .. row0 + len(targets) - 1."""

    seq_id: str
    row0: int
    targets: tuple[int, ...]
    top_n: int


@dataclass
class PendingPromptLogprobs:
    """Device results of a step's scored rows, read on the host once the step is done."""

    scored: list[ScoredRows]
    logprobs: torch.Tensor  # [rows] float32
    top_ids: torch.Tensor  # [rows, max top_n]
    top_logprobs: torch.Tensor  # [rows, max top_n]

    def result(self) -> list[PromptLogprobs]:
        lps, ids, tops = self.logprobs.tolist(), self.top_ids.tolist(), self.top_logprobs.tolist()
        out, i = [], 0
        for s in self.scored:
            n = len(s.targets)
            top = tuple(
                tuple(zip(ids[r][: s.top_n], tops[r][: s.top_n], strict=True)) for r in range(i, i + n)
            )
            out.append(PromptLogprobs(s.seq_id, tuple(lps[i : i + n]), top if s.top_n else ()))
            i += n
        return out


def score_rows(
    hidden: torch.Tensor,  # [num_tokens, hidden] the step's final hidden states
    scored: list[ScoredRows],
    compute_logits: Callable[[torch.Tensor], torch.Tensor],  # [rows, hidden] -> [rows, vocab]
) -> PendingPromptLogprobs:
    device = hidden.device
    rows = torch.tensor([s.row0 + i for s in scored for i in range(len(s.targets))], device=device)
    targets = torch.tensor([t for s in scored for t in s.targets], device=device)
    k = max(s.top_n for s in scored)
    lps, top_ids, top_lps = [], [], []
    for a in range(0, rows.numel(), ROWS_PER_SLICE):
        sl = slice(a, a + ROWS_PER_SLICE)
        logp = torch.log_softmax(compute_logits(hidden.index_select(0, rows[sl])).float(), dim=-1)
        lps.append(logp.gather(1, targets[sl, None]).squeeze(1))
        if k:
            values, ids = logp.topk(k, dim=-1)
            top_lps.append(values)
            top_ids.append(ids)
    empty = torch.empty(rows.numel(), 0, device=device)
    return PendingPromptLogprobs(
        scored,
        torch.cat(lps),
        torch.cat(top_ids) if k else empty.long(),
        torch.cat(top_lps) if k else empty,
    )
