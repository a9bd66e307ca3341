"""The worker core: loads the language model, owns the paged KV tensors and per-sequence state, runs steps.

Free of protobuf and gRPC: the servicer converts StepRequest <-> StepPlan, the in-process engine calls `step`
directly. Image embeddings come from an `EmbeddingSource` (the vision service, or the engine's encoder).
"""

from __future__ import annotations

import logging
import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Protocol

import torch

from common.errors import InvalidRequestError
from common.types import SeqFailure, SeqResult, SeqStep, StepOutput, StepPlan, WorkerInfo
from models.attention import AttentionMetadata, KVCache, create_attention_backend
from models.loader import load_model, resolve_device, resolve_dtype
from models.registry import language_model_class
from processor.model_config import load_model_config
from worker_svc.sampler import Sampler, SamplingContext

logger = logging.getLogger(__name__)

MAX_PAGES = 1 << 20  # cap of the memory-fraction sizing (16M tokens at 16 tokens a page)


class EmbeddingSource(Protocol):
    def get_embeddings(self, keys: Sequence[str]) -> tuple[dict[str, torch.Tensor], list[str]]:
        """Embeddings [num_tokens, hidden] by content key, and the keys not found."""
        ...


@dataclass(frozen=True)
class RunnerConfig:
    model_path: str
    dtype: str = "auto"
    device: str = "auto"
    page_size: int = 16
    max_total_tokens: int | None = None
    mem_fraction_static: float = 0.85
    attention_backend: str = "torch_native"
    seed: int | None = None


@dataclass
class _SeqState:
    page_table: list[int]
    spans: list[tuple[int, int, tuple[int, int, int]]]
    keys: list[str]
    delta: int
    ctx: SamplingContext
    num_prompt_tokens: int
    last_token: int | None = None
    embeds: dict[str, torch.Tensor] = field(default_factory=dict)


class ModelRunner:
    def __init__(self, cfg: RunnerConfig, embeddings: EmbeddingSource | None):
        self.cfg = cfg
        self.embeddings = embeddings
        self.model_config = load_model_config(cfg.model_path)
        self.device = resolve_device(cfg.device)
        self.dtype = resolve_dtype(cfg.dtype, self.model_config, self.device)
        if self.device.type == "cuda":
            torch.cuda.set_device(self.device)
        t0 = time.perf_counter()
        self.model = load_model(
            language_model_class(self.model_config.architecture),
            self.model_config,
            cfg.model_path,
            self.dtype,
            self.device,
        )
        logger.info(
            "loaded %s (%s, %s) in %.1f s",
            self.model_config.architecture,
            self.dtype,
            self.device,
            time.perf_counter() - t0,
        )
        text = self.model_config.text
        num_pages = self._num_pages(text)
        self.kv_cache = KVCache(
            text.num_hidden_layers,
            num_pages,
            cfg.page_size,
            text.num_key_value_heads,
            text.head_dim,
            self.dtype,
            self.device,
        )
        self.model.attn = create_attention_backend(cfg.attention_backend, self.kv_cache, text.head_dim**-0.5)
        self.sampler = Sampler(self.device)
        if cfg.seed is not None:
            self.sampler.generator.manual_seed(cfg.seed)
        self.seqs: dict[str, _SeqState] = {}
        self.failed: dict[str, str] = {}  # seq id -> reason, until the scheduler frees or re-inits it
        logger.info(
            "KV cache: %d pages x %d tokens (%.1f MB), attention backend %s",
            num_pages,
            cfg.page_size,
            self.kv_cache.nbytes / 1e6,
            cfg.attention_backend,
        )

    def _num_pages(self, text) -> int:
        per_page = KVCache.bytes_per_page(
            text.num_hidden_layers, self.cfg.page_size, text.num_key_value_heads, text.head_dim, self.dtype
        )
        if self.cfg.max_total_tokens is not None:
            tokens = self.cfg.max_total_tokens
        elif self.device.type == "cuda":
            free, total = torch.cuda.mem_get_info(self.device)
            used = total - free
            budget = total * self.cfg.mem_fraction_static - used
            if budget <= per_page * 2:
                raise ValueError(
                    f"--mem-fraction-static {self.cfg.mem_fraction_static} leaves no room for the KV cache "
                    f"({used / 1e9:.1f} GB already used of {total / 1e9:.1f} GB)"
                )
            # the scheduler keeps a free list of page ids: a tiny model on a big GPU needs no millions of pages
            return min(int(budget // per_page), MAX_PAGES)
        else:
            # CPU: a token budget that fits the machine, at most a quarter of the RAM
            import os

            ram = os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")
            tokens = min(65536, int(ram * 0.25 // (per_page / self.cfg.page_size)))
        return -(-tokens // self.cfg.page_size) + 1  # + page 0, never handed out

    def info(self) -> WorkerInfo:
        text = self.model_config.text
        return WorkerInfo(
            architecture=self.model_config.architecture,
            num_pages=self.kv_cache.num_pages,
            page_size=self.cfg.page_size,
            context_length=self.model_config.context_length,
            vocab_size=text.vocab_size,
            dtype=str(self.dtype).removeprefix("torch."),
            device=str(self.device),
            kv_cache_bytes=self.kv_cache.nbytes,
            attention_backend=self.cfg.attention_backend,
        )

    # ---- the step ----

    @torch.inference_mode()
    def step(self, plan: StepPlan) -> StepOutput:
        start_ns = time.time_ns()
        t0 = time.perf_counter_ns()
        for seq_id in plan.free_seq_ids:
            self.seqs.pop(seq_id, None)
            self.failed.pop(seq_id, None)
        failures: list[SeqFailure] = []
        seqs: list[SeqStep] = []
        for s in plan.seqs:
            if s.seq_id in self.failed and s.init is None:
                # its KV has a hole since a failed step: skip until the scheduler re-initializes it
                failures.append(
                    SeqFailure(s.seq_id, self.failed[s.seq_id], "sequence failed in an earlier step")
                )
                continue
            self.failed.pop(s.seq_id, None)
            try:
                self._apply_init_and_pages(s)
                seqs.append(s)
            except InvalidRequestError as e:
                failures.append(SeqFailure(s.seq_id, "internal", e.message))
        seqs, fetch_failures = self._fetch_embeddings(seqs)
        failures.extend(fetch_failures)
        for f in failures:
            self.failed[f.seq_id] = f.reason
        if not seqs:
            return StepOutput(
                plan.step_id, (), tuple(failures), 0, time.perf_counter_ns() - t0, 0, start_ns, time.time_ns()
            )
        embeds, positions, meta, sample_rows = self._prepare(seqs)
        t1 = time.perf_counter_ns()
        hidden = self.model(embeds, positions, meta)
        results: list[SeqResult] = []
        if sample_rows:
            rows = torch.tensor([r for r, _ in sample_rows], device=self.device)
            logits = self.model.compute_logits(hidden[rows])
            states = [self.seqs[s.seq_id] for _, s in sample_rows]
            out = self.sampler(logits, [st.ctx for st in states])
            for i, ((_, s), st) in enumerate(zip(sample_rows, states, strict=True)):
                token = out.token_ids[i]
                st.last_token = token
                st.ctx.output_ids.append(token)
                results.append(
                    SeqResult(
                        s.seq_id,
                        token,
                        out.logprobs[i] if out.logprobs else 0.0,
                        tuple(out.top_logprobs[i]) if out.top_logprobs else (),
                    )
                )
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)
        t2 = time.perf_counter_ns()
        return StepOutput(
            plan.step_id,
            tuple(results),
            tuple(failures),
            meta.num_tokens,
            t1 - t0,
            t2 - t1,
            start_ns,
            time.time_ns(),
        )

    def _apply_init_and_pages(self, s: SeqStep) -> None:
        if s.init is not None:
            init = s.init
            spans = [(m.offset, m.num_tokens, tuple(m.grid_thw)) for m in init.mm_items]
            ctx = SamplingContext(init.sampling, list(init.prompt_token_ids), list(init.output_token_ids))
            self.seqs[s.seq_id] = _SeqState(
                page_table=[],
                spans=spans,
                keys=[m.content_key for m in init.mm_items],
                delta=self.model.position_delta(spans),
                ctx=ctx,
                num_prompt_tokens=init.num_prompt_tokens,
                last_token=init.output_token_ids[-1] if init.output_token_ids else None,
            )
        st = self.seqs.get(s.seq_id)
        if st is None:
            raise InvalidRequestError(
                f"sequence {s.seq_id} is unknown to the worker and the step carries no init"
            )
        if s.page_ids:
            end = s.page_table_start + len(s.page_ids)
            if len(st.page_table) < end:
                st.page_table.extend([0] * (end - len(st.page_table)))
            st.page_table[s.page_table_start : end] = s.page_ids
        if not s.input_ids and st.last_token is None:
            raise InvalidRequestError(f"decode step for {s.seq_id} before any token was sampled")
        if (s.start_pos + s.num_tokens + self.cfg.page_size - 1) // self.cfg.page_size > len(st.page_table):
            raise InvalidRequestError(
                f"sequence {s.seq_id}: page table too short for {s.start_pos + s.num_tokens} tokens"
            )

    def _fetch_embeddings(self, seqs: list[SeqStep]) -> tuple[list[SeqStep], list[SeqFailure]]:
        """Pull the embeddings of spans this step computes (once per sequence) and drop the ones it has passed."""
        wanted: dict[str, list[str]] = {}
        for s in seqs:
            st = self.seqs[s.seq_id]
            lo, hi = s.start_pos, s.start_pos + s.num_tokens
            for (off, n, _), key in zip(st.spans, st.keys, strict=True):
                if off < hi and off + n > lo and key not in st.embeds:
                    wanted.setdefault(key, []).append(s.seq_id)
            for (off, n, _), key in zip(st.spans, st.keys, strict=True):
                if off + n <= lo:
                    st.embeds.pop(key, None)
        if not wanted:
            return seqs, []
        if self.embeddings is None:
            found, missing = {}, list(wanted)
        else:
            found, missing = self.embeddings.get_embeddings(list(wanted))
        failed: set[str] = set()
        for key in missing:
            failed.update(wanted[key])
        for key, tensor in found.items():
            for seq_id in wanted[key]:
                if seq_id not in failed:
                    self.seqs[seq_id].embeds[key] = tensor.to(self.device, self.dtype)
        failures = [
            SeqFailure(sid, "embedding_missing", "vision embedding not cached") for sid in sorted(failed)
        ]
        return [s for s in seqs if s.seq_id not in failed], failures

    def _prepare(self, seqs: list[SeqStep]):
        page_size = self.cfg.page_size
        ids: list[int] = []
        pos_parts: list[torch.Tensor] = []
        slots: list[int] = []
        query_lens, kv_lens, tables = [], [], []
        overrides: list[tuple[int, torch.Tensor]] = []  # (row in the packed batch, embedding rows)
        sample_rows: list[tuple[int, SeqStep]] = []
        for s in seqs:
            st = self.seqs[s.seq_id]
            tokens = list(s.input_ids) or [st.last_token]
            lo, n = s.start_pos, len(tokens)
            hi = lo + n
            row0 = len(ids)
            ids.extend(tokens)
            if st.spans and lo < st.spans[-1][0] + st.spans[-1][1]:
                pos_parts.append(self.model.positions(st.spans, lo, hi))
            else:
                pos_parts.append(torch.arange(lo + st.delta, hi + st.delta).expand(3, n))
            for (off, cnt, _), key in zip(st.spans, st.keys, strict=True):
                a, b = max(lo, off), min(hi, off + cnt)
                if a < b:
                    overrides.append((row0 + a - lo, st.embeds[key][a - off : b - off]))
            table = st.page_table
            slots.extend(table[i // page_size] * page_size + i % page_size for i in range(lo, hi))
            query_lens.append(n)
            kv_lens.append(hi)
            tables.append(table[: (hi + page_size - 1) // page_size])
            if s.sample:
                sample_rows.append((len(ids) - 1, s))
        dev = self.device
        input_ids = torch.tensor(ids, dtype=torch.long, device=dev)
        embeds = self.model.embed(input_ids)
        for row, rows in overrides:
            embeds[row : row + rows.shape[0]] = rows
        positions = torch.cat(pos_parts, dim=1).to(dev)
        meta = AttentionMetadata.build(
            query_lens, kv_lens, tables, page_size, torch.tensor(slots, dtype=torch.long, device=dev), dev
        )
        return embeds, positions, meta, sample_rows
