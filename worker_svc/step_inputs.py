"""One step's inputs, packed on the host into one int32 array that reaches the device in one copy.

Eager layout: ids | src_rows | positions (3 rows) | slots | rows | seq_lens | q_start | q_lens | sample_idx |
sample_rows, then the updates (page-table cells and last tokens of re-admitted sequences). Decode steps that replay a
CUDA graph of batch size G use the graph's layout instead: src_rows | positions | slots | seq_lens, each G long and
padded (seq_len 0, slot 0 of page 0), copied straight into the graph's static buffer; the updates follow.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np
import torch

GRAPH_SECTIONS = ("src_rows", "positions", "slots", "seq_lens")
GRAPH_WIDTHS = (1, 3, 1, 1)  # multiples of G
# Every section starts 16-byte aligned: Triton specialises kernels on the alignment of pointer arguments, so views
# at arbitrary offsets would compile a new variant (a second or so) the first time each combination turns up.
ALIGN = 4  # int32 elements


def _aligned(n: int) -> int:
    return -(-n // ALIGN) * ALIGN


def graph_buffer_size(max_bs: int) -> int:
    return sum(_aligned(w * max_bs) for w in GRAPH_WIDTHS)


@dataclass
class SeqInputs:
    """The host facts of one sequence's share of a step."""

    row: int
    ids: list[int]  # tokens to compute; empty: one token, the row's last sample (on the device)
    positions: np.ndarray  # [3, n] rotary positions
    slots: np.ndarray  # [n] KV slots
    seq_len: int  # tokens in the cache once this step is written
    sample: bool

    @property
    def num_tokens(self) -> int:
        return len(self.ids) or 1


@dataclass
class Updates:
    """Device-state changes that must land before the step runs."""

    table_cells: list[int] = field(default_factory=list)  # flat indices into block_table
    table_pages: list[int] = field(default_factory=list)
    token_rows: list[int] = field(default_factory=list)  # rows whose last token is set from the host
    token_ids: list[int] = field(default_factory=list)

    def __bool__(self) -> bool:
        return bool(self.table_cells or self.token_rows)


class StepInputs:
    """Packs `seqs` and `updates`; `graph_size` selects the graph layout (decode only, len(seqs) <= G)."""

    def __init__(
        self,
        seqs: list[SeqInputs],
        updates: Updates,
        graph_size: int | None = None,
        page_tables: list[list[int]] | None = None,
    ):
        self.page_tables = page_tables  # per sequence (host), for backends that plan on the CPU
        # per sequence, the bidirectional spans its tokens of this step touch (set by the runner for Gemma 3)
        self.image_spans: list[list[tuple[int, int]]] = []
        # per sequence, its cross-attention inputs (families with an encoder cache; None: no images)
        self.encoder_seqs: list | None = None
        self.num_seqs = len(seqs)
        self.num_tokens = sum(s.num_tokens for s in seqs)
        self.graph_size = graph_size
        self.sample_rows = [s.row for s in seqs if s.sample]
        self.q_lens = np.array([s.num_tokens for s in seqs], dtype=np.int32)
        self.seq_lens = np.array([s.seq_len for s in seqs], dtype=np.int32)
        self.rows = np.array([s.row for s in seqs], dtype=np.int32)
        self.has_device_ids = any(not s.ids for s in seqs)
        parts = self._graph_parts(seqs, graph_size) if graph_size else self._eager_parts(seqs)
        self.static_len = sum(_aligned(len(p)) for _, p in parts) if graph_size else 0
        parts += [
            ("table_cells", np.asarray(updates.table_cells, dtype=np.int32)),
            ("table_pages", np.asarray(updates.table_pages, dtype=np.int32)),
            ("token_rows", np.asarray(updates.token_rows, dtype=np.int32)),
            ("token_ids", np.asarray(updates.token_ids, dtype=np.int32)),
        ]
        self.sections: dict[str, tuple[int, int]] = {}
        offset = 0
        for name, arr in parts:
            self.sections[name] = (offset, len(arr))
            offset += _aligned(len(arr))
        flat = np.zeros(offset, np.int32)
        for name, arr in parts:
            o, n = self.sections[name]
            flat[o : o + n] = arr
        self.host = torch.from_numpy(flat)
        self.has_updates = bool(updates)

    def _eager_parts(self, seqs: list[SeqInputs]) -> list[tuple[str, np.ndarray]]:
        ids = np.zeros(self.num_tokens, np.int32)
        src = np.full(self.num_tokens, -1, np.int32)
        q_start = np.zeros(len(seqs), np.int32)
        sample_idx = []
        t = 0
        for i, s in enumerate(seqs):
            q_start[i] = t
            if s.ids:
                ids[t : t + len(s.ids)] = s.ids
            else:
                src[t] = s.row
            t += s.num_tokens
            if s.sample:
                sample_idx.append(t - 1)
        positions = np.concatenate([s.positions for s in seqs], axis=1) if seqs else np.zeros((3, 0))
        slots = np.concatenate([s.slots for s in seqs]) if seqs else np.zeros(0)
        return [
            ("ids", ids),
            ("src_rows", src),
            ("positions", positions.astype(np.int32).reshape(-1)),
            ("slots", slots.astype(np.int32)),
            ("rows", self.rows),
            ("seq_lens", self.seq_lens),
            ("q_start", q_start),
            ("q_lens", self.q_lens),
            ("sample_idx", np.asarray(sample_idx, dtype=np.int32)),
            ("sample_rows", np.asarray(self.sample_rows, dtype=np.int32)),
        ]

    @staticmethod
    def _graph_parts(seqs: list[SeqInputs], g: int) -> list[tuple[str, np.ndarray]]:
        src = np.zeros(g, np.int32)
        positions = np.zeros((3, g), np.int32)
        slots = np.zeros(g, np.int32)
        seq_lens = np.zeros(g, np.int32)
        for i, s in enumerate(seqs):
            src[i] = s.row
            positions[:, i] = s.positions[:, 0]
            slots[i] = s.slots[0]
            seq_lens[i] = s.seq_len
        return [
            ("src_rows", src),
            ("positions", positions.reshape(-1)),
            ("slots", slots),
            ("seq_lens", seq_lens),
        ]

    def to_device(self, device: torch.device, static: torch.Tensor | None = None) -> dict[str, torch.Tensor]:
        """One host-to-device copy (pinned, asynchronous on a GPU); with `static`, the graph part lands in it."""
        host = self.host.pin_memory() if device.type == "cuda" else self.host
        if static is None:
            flat = host.to(device, non_blocking=True)
            return {name: flat[o : o + n] for name, (o, n) in self.sections.items()}
        static[: self.static_len].copy_(host[: self.static_len], non_blocking=True)
        tail = host[self.static_len :].to(device, non_blocking=True) if self.has_updates else host[:0]
        out = {}
        for name, (o, n) in self.sections.items():
            out[name] = (
                static[o : o + n]
                if o < self.static_len
                else tail[o - self.static_len : o - self.static_len + n]
            )
        return out


def graph_views(static: torch.Tensor, g: int) -> dict[str, torch.Tensor]:
    """The graph layout's sections as views of the static buffer, for a graph of batch size g."""
    out, offset = {}, 0
    for name, width in zip(GRAPH_SECTIONS, GRAPH_WIDTHS, strict=True):
        out[name] = static[offset : offset + width * g]
        offset += _aligned(width * g)
    return out
