"""The worker's sampler: per-row sampling state (parameters on the host, penalty history on the device) and one
vectorised sampling step per batch, with no host synchronisation and no per-sequence device work in the step.

Order: logit bias, min_tokens suppression, repetition penalty (HF: over tokens seen in the prompt or output,
positive logits divided, negative multiplied), frequency and presence penalties (OpenAI: over output tokens),
temperature; log-probs are taken here (the distribution the token is drawn from, before top-k / top-p / min-p
truncation; at temperature 0 the log-softmax of the penalized logits); then truncation and the draw, an exact
exponential race (kernels/sampling.py, which also defines the ties). Greedy rows (temperature 0 or top_k 1) take
the argmax. Seeded sequences draw Philox noise keyed by (seed, output index), so their tokens depend neither on
batch companions nor on preemption; unseeded rows use a per-step key from the sampler's RNG and their batch index.
"""

from __future__ import annotations

import heapq
import random
from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np
import torch

from common.types import SamplingParams
from kernels.grammar_mask import apply_token_bitmask
from kernels.sampling import sample_rows

_UNSEEDED = 1 << 32  # high counter word of unseeded rows, whose stream is the batch index
_TORCH_DTYPES = {
    np.dtype(np.int64): torch.int64,
    np.dtype(np.int32): torch.int32,
    np.dtype(np.float32): torch.float32,
}


_MAX_TEMPERATURE = float(np.finfo(np.float32).max)


@dataclass
class SampleOutput:
    token_ids: list[int]
    logprobs: list[float] | None  # per row, meaningful for rows that asked; None when none did
    top_logprobs: list[list[tuple[int, float]]] | None  # each row's own top_logprobs ([] when it asked none)


class PendingSample:
    """A step's tokens on the device, and its results on their way into host memory of its own."""

    def __init__(
        self, token_ids: torch.Tensor, host: dict[str, torch.Tensor], lp_rows: list[int], top_n: list[int]
    ):
        self.token_ids = token_ids  # [B] int64 on the device: the next decode step's input
        self._host = host  # pinned copies, written by the device after sample() returns
        self._lp_rows = lp_rows  # batch rows that asked for log-probs
        self._top_n = top_n  # their top_logprobs

    def result(self) -> SampleOutput:
        """Host lists; call once the device has passed the step (e.g. an event recorded after sample())."""
        tokens = self._host["tokens"].tolist()
        if not self._lp_rows:
            return SampleOutput(tokens, None, None)
        logprobs = [0.0] * len(tokens)
        top: list[list[tuple[int, float]]] = [[] for _ in tokens]
        values = self._host["top_v"].tolist() if "top_v" in self._host else None
        ids = self._host["top_i"].tolist() if "top_i" in self._host else None
        for j, (b, lp) in enumerate(zip(self._lp_rows, self._host["logprob"].tolist(), strict=True)):
            logprobs[b] = lp
            n = self._top_n[j]
            if n:
                top[b] = list(zip(ids[j][:n], values[j][:n], strict=True))
        return SampleOutput(tokens, logprobs, top)


class _Pool:
    """Rows of a [slots, vocab] device tensor lent to the sequences that use a penalty; grown by doubling, so only
    those sequences cost vocab-sized memory (a dense [max_rows, vocab] would be 152k entries per row)."""

    def __init__(self, dtype: torch.dtype, vocab_size: int, max_rows: int, device: torch.device):
        self.data = torch.zeros(0, vocab_size, dtype=dtype, device=device)
        self.max_rows = max_rows
        self._free: list[int] = []
        self._num_used = 0  # slots ever handed out

    def acquire(self) -> int:
        if self._free:
            return heapq.heappop(self._free)
        self._num_used += 1
        return self._num_used - 1

    def release(self, slot: int) -> None:
        heapq.heappush(self._free, slot)

    def grow(self) -> None:
        """Room for every slot handed out: device work only, no host synchronisation."""
        have = self.data.shape[0]
        if self._num_used > have:
            size = min(self.max_rows, max(self._num_used, 2 * have))
            grown = self.data.new_zeros(size, self.data.shape[1])
            grown[:have] = self.data
            self.data = grown


class _Upload:
    """Named host arrays packed into one buffer and sent with one asynchronous host-to-device copy."""

    def __init__(self) -> None:
        self._arrays: dict[str, np.ndarray] = {}

    def add(self, name: str, values, dtype) -> None:
        self._arrays[name] = np.ascontiguousarray(values, dtype=dtype).reshape(-1)

    def send(self, device: torch.device) -> dict[str, torch.Tensor]:
        offsets, total = [], 0
        for a in self._arrays.values():
            offsets.append(total)
            # 16-byte aligned: every slice can be viewed as its dtype, and Triton (which specialises kernels on
            # pointer alignment) compiles one variant, not one per offset pattern
            total += -(-a.nbytes // 16) * 16
        packed = np.zeros(max(total, 8), dtype=np.uint8)
        for off, a in zip(offsets, self._arrays.values(), strict=True):
            packed[off : off + a.nbytes] = a.view(np.uint8)
        buf = torch.from_numpy(packed)
        if device.type != "cpu":
            # the caching host allocator keeps this pinned block until the copy has run
            buf = buf.pin_memory().to(device, non_blocking=True)
        return {
            name: buf[off : off + a.nbytes].view(_TORCH_DTYPES[a.dtype])
            for off, (name, a) in zip(offsets, self._arrays.items(), strict=True)
        }


def _seed_key(seed: int) -> int:
    """A request seed as a 64-bit Philox key, held in an int64."""
    key = seed & (2**64 - 1)
    return key - 2**64 if key >= 2**63 else key


class Sampler:
    """Sampling for up to max_rows sequences, each in a fixed row. add_row, remove_row and sample run on one thread
    (the step's); PendingSample.result() may run on another once the device has passed the step."""

    def __init__(self, device: torch.device, vocab_size: int, max_rows: int, seed: int | None = None):
        self.device = device
        self.vocab_size = vocab_size
        self.max_rows = max_rows
        self._rng = random.Random(seed)  # the per-step keys of unseeded rows
        self._pin = device.type != "cpu"
        n = max_rows
        self._active = np.zeros(n, bool)
        self._greedy = np.zeros(n, bool)
        self._temperature = np.ones(n, np.float32)  # 1 for temperature 0: log-probs of the raw logits
        self._top_k = np.zeros(n, np.int64)  # 0: off
        self._top_p = np.ones(n, np.float32)
        self._min_p = np.zeros(n, np.float32)
        self._seeded = np.zeros(n, bool)
        self._key = np.zeros(n, np.int64)
        self._wants_lp = np.zeros(n, bool)
        self._top_n = np.zeros(n, np.int64)
        self._num_out = np.zeros(n, np.int64)  # outputs so far: the seeded stream index and min_tokens' clock
        self._min_tokens = np.zeros(n, np.int64)  # 0 unless there are ids to suppress
        self._has_bias = np.zeros(n, bool)
        self._repetition = np.ones(n, np.float32)
        self._frequency = np.zeros(n, np.float32)
        self._presence = np.zeros(n, np.float32)
        self._seen_slot = np.full(n, -1, np.int64)  # row of the seen pool (repetition penalty), -1 none
        self._count_slot = np.full(n, -1, np.int64)  # row of the count pool (frequency / presence), -1 none
        self._bias: dict[int, tuple[np.ndarray, np.ndarray]] = {}  # row -> (token ids, biases)
        self._suppress: dict[int, np.ndarray] = {}  # row -> min_tokens_suppress_ids in the vocabulary
        # penalty history: 1 B a token for "seen in prompt or output", 4 B for output counts, only for rows using it
        self._seen = _Pool(torch.bool, vocab_size, max_rows, device)
        self._counts = _Pool(torch.int32, vocab_size, max_rows, device)
        self._staged_seen: dict[int, tuple[int, np.ndarray]] = {}  # row -> (slot, token ids) to load
        self._staged_counts: dict[int, tuple[int, np.ndarray, np.ndarray]] = {}  # row -> (slot, ids, counts)
        self._ones = torch.ones(max_rows, dtype=torch.int32, device=device)

    # ---- rows ----

    def add_row(
        self, row: int, params: SamplingParams, prompt_ids: Sequence[int], output_ids: Sequence[int]
    ) -> None:
        """Row `row` now holds a sequence (new, or re-admitted after preemption with its earlier outputs). Host
        work only: the penalty history reaches the device with the next sample()."""
        if not 0 <= row < self.max_rows:
            raise ValueError(f"row {row} outside [0, {self.max_rows})")
        if self._active[row]:
            self.remove_row(row)
        vocab = self.vocab_size
        self._active[row] = True
        self._greedy[row] = params.greedy
        # a float32 temperature past its range is inf, and -inf / inf (a token the grammar or min_tokens removed)
        # is NaN: the largest finite float32 gives the same near-uniform draw and keeps removed tokens removed
        self._temperature[row] = min(params.temperature, _MAX_TEMPERATURE) if params.temperature > 0 else 1.0
        self._top_k[row] = params.top_k if 0 < params.top_k < vocab else 0
        self._top_p[row] = params.top_p
        self._min_p[row] = params.min_p
        self._seeded[row] = params.seed is not None
        self._key[row] = _seed_key(params.seed) if params.seed is not None else 0
        self._wants_lp[row] = params.return_logprob or params.top_logprobs > 0
        self._top_n[row] = params.top_logprobs
        self._num_out[row] = len(output_ids)
        self._repetition[row] = params.repetition_penalty
        self._frequency[row] = params.frequency_penalty
        self._presence[row] = params.presence_penalty
        bias = [(t, v) for t, v in params.logit_bias.items() if 0 <= t < vocab]
        self._has_bias[row] = bool(bias)
        if bias:
            self._bias[row] = (
                np.array([t for t, _ in bias], np.int64),
                np.array([v for _, v in bias], np.float32),
            )
        suppress = [t for t in params.min_tokens_suppress_ids if 0 <= t < vocab]
        self._min_tokens[row] = params.min_tokens if suppress else 0
        if suppress:
            self._suppress[row] = np.array(suppress, np.int64)
        outputs = _in_vocab(output_ids, vocab)
        if params.repetition_penalty != 1.0:
            slot = self._seen.acquire()
            self._seen_slot[row] = slot
            seen = np.concatenate([_in_vocab(prompt_ids, vocab), outputs])
            self._staged_seen[row] = (slot, np.unique(seen))
        if params.frequency_penalty or params.presence_penalty:
            slot = self._counts.acquire()
            self._count_slot[row] = slot
            self._staged_counts[row] = (slot, *np.unique(outputs, return_counts=True))

    def remove_row(self, row: int) -> None:
        if not self._active[row]:
            return
        self._active[row] = False
        if self._seen_slot[row] >= 0:
            self._seen.release(int(self._seen_slot[row]))
            self._seen_slot[row] = -1
        if self._count_slot[row] >= 0:
            self._counts.release(int(self._count_slot[row]))
            self._count_slot[row] = -1
        for staged in (self._staged_seen, self._staged_counts, self._bias, self._suppress):
            staged.pop(row, None)

    # ---- the step ----

    def sample(
        self,
        logits: torch.Tensor,
        rows: Sequence[int],
        masks: tuple[np.ndarray, np.ndarray] | None = None,
    ) -> PendingSample:
        """Tokens for logits [B, V] (float32, on the device; modified in place), row b belonging to worker row
        rows[b]. `masks`: grammar bitmasks [R, W] int32 and the batch row of each; the tokens they do not allow
        are excluded from sampling (log-probs come from the distribution before the mask, so they stay finite).
        Queues device work and asynchronous copies only; the host never waits for the device."""
        r = np.asarray(rows, dtype=np.int64)
        if logits.shape != (len(r), self.vocab_size):
            raise ValueError(
                f"logits {tuple(logits.shape)} for {len(r)} rows of vocabulary {self.vocab_size}"
            )
        if not self._active[r].all():
            raise ValueError("sample() for a row that holds no sequence")
        if logits.dtype != torch.float32:
            logits = logits.float()
        greedy = self._greedy[r]
        lp_b = np.flatnonzero(self._wants_lp[r])
        rep_b = np.flatnonzero(self._seen_slot[r] >= 0)
        count_b = np.flatnonzero(self._count_slot[r] >= 0)
        sparse_b = np.flatnonzero(self._has_bias[r] | (self._num_out[r] < self._min_tokens[r]))
        if greedy.all() and not (len(lp_b) or len(rep_b) or len(count_b) or len(sparse_b) or masks):
            return self._finish(logits.argmax(dim=-1), r, {}, lp_b)
        sampled_b = np.flatnonzero(~greedy)
        up = _Upload()
        self._stage_history(up)
        self._stage_step(up, r, rep_b, count_b, sampled_b, lp_b)
        if len(sparse_b):
            self._stage_sparse(up, r, sparse_b)
        dev = up.send(self.device)
        self._load_history(dev)

        batch = len(r)
        if len(sparse_b):  # accumulating, so a token both biased and suppressed ends at -inf
            logits.index_put_((dev["sparse_b"], dev["sparse_tok"]), dev["sparse_val"], accumulate=True)
        if len(rep_b):
            logits = self._apply_repetition(logits, dev, len(rep_b) == batch)
        if len(count_b):
            logits = self._apply_frequency(logits, dev, len(count_b) == batch)
        lp_logits = logits
        if masks is not None:
            if len(lp_b):
                lp_logits = logits.clone()
            # pinned and asynchronous, so the host goes on preparing the next step (torch's pinned allocator keeps
            # the buffers until the copies have run)
            host = [torch.from_numpy(a) for a in masks]
            if self._pin:
                host = [t.pin_memory() for t in host]
            bitmask, mask_rows = (t.to(logits.device, non_blocking=self._pin) for t in host)
            apply_token_bitmask(logits, bitmask, mask_rows)
        if len(sampled_b) < batch:
            tokens = logits.argmax(dim=-1)
        else:
            tokens = torch.empty(batch, dtype=torch.int64, device=logits.device)
        if len(sampled_b):
            s = r[sampled_b]
            sample_rows(
                logits,
                dev["s_b"],
                dev["s_temperature"],
                dev["s_top_k"],
                dev["s_top_p"],
                dev["s_min_p"],
                dev["s_key"],
                dev["s_ctr"],
                tokens,
                max_top_k=int(self._top_k[s].max()),
                any_top_p=bool((self._top_p[s] < 1).any()),
            )
        out = self._logprobs(lp_logits, tokens, dev, r, lp_b) if len(lp_b) else {}
        self._record_tokens(tokens, dev, rep_b, count_b)
        return self._finish(tokens, r, out, lp_b)

    def _stage_history(self, up: _Upload) -> None:
        """Penalty history of rows added since the last upload: clear their pool slots, then load them."""
        vocab = self.vocab_size
        if self._staged_seen:
            staged = list(self._staged_seen.values())
            self._staged_seen.clear()
            up.add("seen_clear", [slot for slot, _ in staged], np.int64)
            up.add("seen_set", np.concatenate([slot * vocab + ids for slot, ids in staged]), np.int64)
        if self._staged_counts:
            staged = list(self._staged_counts.values())
            self._staged_counts.clear()
            up.add("count_clear", [slot for slot, _, _ in staged], np.int64)
            up.add("count_set", np.concatenate([slot * vocab + ids for slot, ids, _ in staged]), np.int64)
            up.add("count_val", np.concatenate([c for _, _, c in staged]), np.int32)

    def _stage_step(self, up: _Upload, r, rep_b, count_b, sampled_b, lp_b) -> None:
        if len(rep_b):
            up.add("rep_b", rep_b, np.int64)
            up.add("rep_slot", self._seen_slot[r[rep_b]], np.int64)
            up.add("rep", self._repetition[r[rep_b]], np.float32)
        if len(count_b):
            rows = r[count_b]
            up.add("count_b", count_b, np.int64)
            up.add("count_slot", self._count_slot[rows], np.int64)
            up.add("frequency", self._frequency[rows], np.float32)
            up.add("presence", self._presence[rows], np.float32)
        if len(sampled_b):
            s = r[sampled_b]
            up.add("s_b", sampled_b, np.int64)
            up.add("s_temperature", self._temperature[s], np.float32)
            up.add("s_top_k", self._top_k[s], np.int64)
            up.add("s_top_p", self._top_p[s], np.float32)
            up.add("s_min_p", self._min_p[s], np.float32)
            seeded = self._seeded[s]
            step_key = self._rng.getrandbits(63) if not seeded.all() else 0
            up.add("s_key", np.where(seeded, self._key[s], step_key), np.int64)
            up.add("s_ctr", np.where(seeded, self._num_out[s], _UNSEEDED | sampled_b), np.int64)
        if len(lp_b):
            up.add("lp_b", lp_b, np.int64)
            up.add("lp_temperature", self._temperature[r[lp_b]], np.float32)

    def _stage_sparse(self, up: _Upload, r, sparse_b) -> None:
        """(batch row, token, value) triples of logit bias and, while min_tokens is unmet, suppression (-inf):
        host work only for the rows that have them."""
        bs, toks, vals = [], [], []
        for b in sparse_b.tolist():
            row = int(r[b])
            parts = [self._bias[row]] if row in self._bias else []
            if self._num_out[row] < self._min_tokens[row]:
                ids = self._suppress[row]
                parts.append((ids, np.full(len(ids), -np.inf, np.float32)))
            for ids, values in parts:
                bs.append(np.full(len(ids), b, np.int64))
                toks.append(ids)
                vals.append(values)
        up.add("sparse_b", np.concatenate(bs), np.int64)
        up.add("sparse_tok", np.concatenate(toks), np.int64)
        up.add("sparse_val", np.concatenate(vals), np.float32)

    def _load_history(self, dev: dict[str, torch.Tensor]) -> None:
        self._seen.grow()
        self._counts.grow()
        if "seen_clear" in dev:
            self._seen.data.index_fill_(0, dev["seen_clear"], False)
            self._seen.data.view(-1).index_fill_(0, dev["seen_set"], True)
        if "count_clear" in dev:
            self._counts.data.index_fill_(0, dev["count_clear"], 0)
            self._counts.data.view(-1).index_copy_(0, dev["count_set"], dev["count_val"])

    def _apply_repetition(
        self, logits: torch.Tensor, dev: dict[str, torch.Tensor], whole: bool
    ) -> torch.Tensor:
        """HF's repetition penalty over the tokens seen: positive logits divided, negative multiplied; written in
        place, so the temporaries stay near 10 bytes a logit."""
        idx = dev["rep_b"]
        x = logits if whole else logits.index_select(0, idx)
        seen = self._seen.data.index_select(0, dev["rep_slot"])
        penalty = dev["rep"][:, None]
        penalized = x / penalty
        torch.where(x > 0, penalized, x * penalty, out=penalized)
        torch.where(seen, penalized, x, out=x)
        return x if whole else logits.index_copy_(0, idx, x)

    def _apply_frequency(
        self, logits: torch.Tensor, dev: dict[str, torch.Tensor], whole: bool
    ) -> torch.Tensor:
        """OpenAI's frequency and presence penalties over the output counts, in place."""
        idx = dev["count_b"]
        x = logits if whole else logits.index_select(0, idx)
        counts = self._counts.data.index_select(0, dev["count_slot"]).to(torch.float32)
        penalty = (counts > 0).to(torch.float32).mul_(dev["presence"][:, None])
        x.sub_(penalty.add_(counts.mul_(dev["frequency"][:, None])))
        return x if whole else logits.index_copy_(0, idx, x)

    def _logprobs(self, logits, tokens, dev, r, lp_b) -> dict[str, torch.Tensor]:
        """Log-probs of the rows that asked: at their temperature, before truncation."""
        idx = dev["lp_b"]
        x = logits if len(lp_b) == len(r) else logits.index_select(0, idx)
        lps = torch.log_softmax(x / dev["lp_temperature"][:, None], dim=-1)
        out = {"logprob": lps.gather(1, tokens.index_select(0, idx)[:, None])[:, 0]}
        k = int(self._top_n[r[lp_b]].max())
        if k > 0:
            out["top_v"], out["top_i"] = lps.topk(k, dim=-1)
        return out

    def _record_tokens(self, tokens: torch.Tensor, dev: dict[str, torch.Tensor], rep_b, count_b) -> None:
        """The new tokens join the penalty history on the device."""
        vocab = self.vocab_size
        if len(rep_b):
            flat = dev["rep_slot"] * vocab + tokens.index_select(0, dev["rep_b"])
            self._seen.data.view(-1).index_fill_(0, flat, True)
        if len(count_b):
            flat = dev["count_slot"] * vocab + tokens.index_select(0, dev["count_b"])
            self._counts.data.view(-1).index_add_(0, flat, self._ones[: len(count_b)])

    def _finish(self, tokens: torch.Tensor, r, out: dict[str, torch.Tensor], lp_b) -> PendingSample:
        """Asynchronous copies into pinned memory owned by the PendingSample; the rows count one more output."""
        host = {}
        for name, t in {"tokens": tokens, **out}.items():
            host[name] = torch.empty(t.shape, dtype=t.dtype, pin_memory=self._pin)
            host[name].copy_(t, non_blocking=self._pin)
        self._num_out[r] += 1
        return PendingSample(tokens, host, lp_b.tolist(), self._top_n[r[lp_b]].tolist())


def _in_vocab(ids: Sequence[int], vocab: int) -> np.ndarray:
    a = np.asarray(ids, dtype=np.int64).reshape(-1)
    return a[(a >= 0) & (a < vocab)]
