"""The worker core: loads the language model, owns the paged KV tensors and per-sequence state, runs steps.

Per-sequence state lives in fixed rows on the device (page table, last sampled token, sampling parameters), so a
step sends only what changed. `launch` queues a step on the GPU without waiting for it (decode steps replay a CUDA
graph; the tokens a decode consumes never leave the device) and `collect` waits for its results; the servicer
launches step N+1 while step N runs. Free of protobuf and gRPC: the servicer converts StepRequest <-> StepPlan, the
in-process engine calls these directly. Image embeddings come from an `EmbeddingSource` (the vision service, or
the engine's encoder).
"""

from __future__ import annotations

import logging
import time
from dataclasses import dataclass, field

import numpy as np
import torch

from common.errors import InvalidRequestError
from common.types import SeqFailure, SeqResult, SeqStep, StepOutput, StepPlan, WorkerInfo, new_epoch
from models.loader import load_model, resolve_device, resolve_dtype
from models.registry import language_model_class
from processor.model_config import load_model_config
from worker_svc import memory
from worker_svc.attention import create_attention_backend, resolve_backend
from worker_svc.attention.base import AttentionMetadata, KVCache
from worker_svc.embeddings import EmbeddingSource, ResidentEmbeddings
from worker_svc.prompt_logprobs import PendingPromptLogprobs, ScoredRows, score_rows
from worker_svc.sampler import PendingSample, Sampler
from worker_svc.step_inputs import SeqInputs, StepInputs, Updates

logger = logging.getLogger(__name__)


@dataclass(frozen=True)
class RunnerConfig:
    model_path: str
    dtype: str = "auto"
    device: str = "auto"
    page_size: int = 16
    max_total_tokens: int | None = None
    max_encoder_images: int | None = None  # encoder-cache images (pages); None: a share of the KV memory
    encoder_cache_fraction: float = 0.15  # that share, on a GPU
    mem_fraction_static: float = 0.85
    attention_backend: str = "auto"
    seed: int | None = None
    load_format: str = "auto"
    max_running_requests: int | None = None  # rows of per-sequence state (default: 256 on GPU, 64 on CPU)
    disable_cuda_graph: bool = False
    cuda_graph_max_bs: int | None = None  # default: max_running_requests
    piecewise_cuda_graph_max_tokens: int = 2048  # prompt steps up to this many tokens replay piecewise graphs
    max_prefill_tokens: int = 16384  # the largest prefill a step carries: sizes the activation warm-up
    vision_mem_fraction: float = 0.0  # GPU share a vision service on the same card keeps
    embedding_buffer_bytes: int = 256 << 20  # image embeddings kept on the device when no sequence holds them
    embedding_timeout_s: float = 60.0  # how long a step with nothing else to run waits for a pull


@dataclass
class _SeqState:
    row: int
    page_table: list[int]
    spans: list[tuple[int, int, tuple[int, int, int]]]
    keys: list[str]
    delta: int
    sampled: bool  # a token of this sequence is on the device (decode steps may follow)
    top_logprobs: int = 0  # alternatives per prompt log-probability
    embeds: dict[str, torch.Tensor] = field(default_factory=dict)
    encoder_pages: list[int] = field(default_factory=list)  # one per image (families with an encoder cache)
    encoder_ready: bool = True  # its images' encoder pages hold their K/V
    cross: object = None  # the model's cross-attention inputs for this sequence (None: no images)


@dataclass
class InflightStep:
    """A launched step: its results arrive in `pending`'s pinned buffers once `done` has fired."""

    step_id: int
    start_ns: int
    prepare_ns: int
    seq_ids: list[str]  # sampled sequences, in result order
    failures: list[SeqFailure]
    num_tokens: int = 0
    pending: PendingSample | None = None
    prompt_logprobs: PendingPromptLogprobs | None = None
    started: torch.cuda.Event | None = None
    done: torch.cuda.Event | None = None
    host_forward_ns: int = 0  # without a GPU the forward runs inside launch: its wall time


class ModelRunner:
    def __init__(self, cfg: RunnerConfig, embeddings: EmbeddingSource | None):
        self.cfg = cfg
        self.model_config = load_model_config(cfg.model_path)
        self.device = resolve_device(cfg.device)
        self.dtype = resolve_dtype(cfg.dtype, self.model_config, self.device)
        self.cuda = self.device.type == "cuda"
        if self.cuda:
            torch.cuda.set_device(self.device)
            # cuBLASLt picks faster kernels than cuBLAS for the decoder's [in, out] weights (KNLinear) at decode
            # row counts, e.g. the 7B down projection at 64 rows in 47 us against 55 (an H100, BENCHMARKS.md)
            torch.backends.cuda.preferred_blas_library("cublaslt")
        self.embeddings = ResidentEmbeddings(embeddings, self.device, self.dtype, cfg.embedding_buffer_bytes)
        t0 = time.perf_counter()
        self.model = load_model(
            language_model_class(self.model_config.architecture),
            self.model_config,
            cfg.model_path,
            self.dtype,
            self.device,
            cfg.load_format,
        )
        # ids the embedding takes: the output head's, and a family's own past it (mllama's <|image|>); read once,
        # as every step checks every sequence's ids against it
        self.num_input_embeddings = getattr(
            self.model, "num_input_embeddings", self.model_config.text.vocab_size
        )
        logger.info(
            "loaded %s (%s, %s, %s weights) in %.1f s",
            self.model_config.architecture,
            self.dtype,
            self.device,
            cfg.load_format,
            time.perf_counter() - t0,
        )
        text = self.model_config.text
        self.page_size = cfg.page_size
        self.max_rows = cfg.max_running_requests or (256 if self.cuda else 64)
        self.max_pages_per_seq = -(-self.model_config.context_length // cfg.page_size)
        self.block_table = torch.zeros(
            self.max_rows, self.max_pages_per_seq, dtype=torch.int32, device=self.device
        )
        self.token_buf = torch.zeros(self.max_rows, dtype=torch.int64, device=self.device)
        self.free_rows = list(range(self.max_rows - 1, -1, -1))
        self.sampler = Sampler(self.device, text.vocab_size, self.max_rows, cfg.seed)
        self.backend_name = resolve_backend(cfg.attention_backend, self.device)
        self.scale = getattr(
            self.model, "attention_scale", text.head_dim**-0.5
        )  # Gemma: query_pre_attn_scalar
        # Gemma 3: the tokens of one image attend to each other both ways (the scheduler never cuts an image)
        self.bidirectional_spans = getattr(self.model, "bidirectional_image_spans", False)
        self.graphs = None
        self.piecewise = None
        graph_bs = min(cfg.cuda_graph_max_bs or self.max_rows, self.max_rows)
        per_page = KVCache.bytes_per_page(
            text.num_hidden_layers, cfg.page_size, text.num_key_value_heads, text.head_dim, self.dtype
        )
        # the encoder cache (Llama 3.2 Vision's cross-attention K/V of images): pages of one image each
        self.encoder_page_tokens = getattr(self.model, "encoder_page_tokens", 0)
        enc_per_page = self.model.encoder_bytes_per_page(self.dtype) if self.encoder_page_tokens else 0
        num_enc_pages = (cfg.max_encoder_images or 16) + 1 if enc_per_page else 0
        if self.cuda and cfg.max_total_tokens is None:
            budget = self._profile(graph_bs)
            if enc_per_page:
                num_enc_pages = memory.encoder_num_pages(
                    budget.kv_bytes(cfg.mem_fraction_static),
                    enc_per_page,
                    cfg.max_encoder_images,
                    cfg.encoder_cache_fraction,
                )
            num_pages = memory.gpu_num_pages(
                budget, cfg.mem_fraction_static, per_page, reserved=num_enc_pages * enc_per_page
            )
            logger.info("%s -> %d KV pages", budget.describe(), num_pages)
        elif self.cuda:
            num_pages = -(-cfg.max_total_tokens // cfg.page_size) + 1
        else:
            num_pages = memory.cpu_num_pages(cfg.max_total_tokens, cfg.page_size, per_page)
        self.encoder_slots: dict[int, str] = {}  # encoder page -> the image key whose K/V it holds
        self.num_encoder_pages = num_enc_pages
        if num_enc_pages:
            self.model.encoder_cache = self.model.new_encoder_cache(
                num_enc_pages, self.encoder_page_tokens, self.dtype, self.device
            )
            logger.info(
                "encoder cache: %d pages x %d rows (%.2f GB)",
                num_enc_pages,
                self.encoder_page_tokens,
                num_enc_pages * enc_per_page / 1e9,
            )
        self.kv_cache = self._new_kv_cache(num_pages)
        self.attn = self._new_backend(self.kv_cache)
        self.model.attn = self.attn
        self.seqs: dict[str, _SeqState] = {}
        self.failed: dict[str, str] = {}  # seq id -> reason, until the scheduler frees or re-inits it
        self.epoch = (
            new_epoch()
        )  # this process's KV cache: the scheduler drops its prefix cache when it changes
        logger.info(
            "KV cache: %d pages x %d tokens (%.1f GB), attention backend %s, %d sequence rows",
            num_pages,
            cfg.page_size,
            self.kv_cache.nbytes / 1e9,
            self.backend_name,
            self.max_rows,
        )
        if self._graphs_allowed() and self.attn.supports_cuda_graph:
            self._capture_graphs(graph_bs)
        if self._piecewise_tokens():
            from worker_svc.piecewise_graphs import PiecewiseGraphs

            self.piecewise = PiecewiseGraphs(
                self.model, self.attn, self._piecewise_tokens(), self.device, self.dtype
            )
            self.piecewise.capture()

    # ---- construction ----

    def _piecewise_tokens(self) -> int:
        """Largest prompt step replayed as piecewise graphs (0: none). Any backend: attention runs between pieces."""
        if not self._graphs_allowed():
            return 0
        return max(0, self.cfg.piecewise_cuda_graph_max_tokens)

    def _graphs_allowed(self) -> bool:
        """CUDA graphs on a GPU unless turned off or the model's step cannot be captured (mllama's cross layers)."""
        return (
            self.cuda
            and not self.cfg.disable_cuda_graph
            and getattr(self.model, "supports_cuda_graphs", True)
        )

    def _new_kv_cache(self, num_pages: int) -> KVCache:
        text = self.model_config.text
        return KVCache(
            text.num_hidden_layers,
            num_pages,
            self.page_size,
            text.num_key_value_heads,
            text.head_dim,
            self.dtype,
            self.device,
        )

    def _new_backend(self, kv_cache: KVCache):
        heads = self.model_config.text.num_attention_heads
        return create_attention_backend(
            self.backend_name, kv_cache, heads, self.scale, self.max_rows, self.device
        )

    def _profile(self, graph_bs: int) -> memory.GpuBudget:
        """Peak memory of the largest eager step and of the largest decode batch, measured before the KV cache
        exists (with a two-page stand-in: every token reads and writes page 0)."""
        torch.cuda.synchronize(self.device)
        weights = torch.cuda.memory_allocated(self.device)
        self.attn = self._new_backend(self._new_kv_cache(2))
        self.model.attn = self.attn
        self.seqs, self.failed = {}, {}
        text = self.model_config.text

        def peak_of(seqs: list[SeqInputs]) -> int:
            torch.cuda.synchronize(self.device)
            torch.cuda.reset_peak_memory_stats(self.device)
            base = torch.cuda.memory_allocated(self.device)
            with torch.inference_mode():
                logits, _, hidden = self._forward_eager(StepInputs(seqs, Updates()), [])
                del logits, hidden
            torch.cuda.synchronize(self.device)
            return torch.cuda.max_memory_allocated(self.device) - base

        def prompt(n: int) -> list[SeqInputs]:
            # a step of n prompt tokens, as sequences no longer than the context (a backend may rely on that:
            # torch_native's mask spans the sequence, its keys only the block table's width)
            cap, seqs = self.max_pages_per_seq * self.page_size, []
            for row, lo in enumerate(range(0, n, cap)):
                m = min(cap, n - lo)
                pos = np.tile(np.arange(m), (3, 1))
                seqs.append(SeqInputs(row % self.max_rows, [0] * m, pos, np.zeros(m, np.int64), m, True))
            return seqs

        activations = peak_of(prompt(max(1, self.cfg.max_prefill_tokens)))
        decode = [
            SeqInputs(i % self.max_rows, [0], np.zeros((3, 1), np.int64), np.zeros(1, np.int64), 1, True)
            for i in range(graph_bs)
        ]
        sampler_space = 4 * graph_bs * text.vocab_size * 4  # its [B, vocab] float32 temporaries
        graphs = peak_of(decode) + sampler_space if not self.cfg.disable_cuda_graph else sampler_space
        if self._piecewise_tokens():  # the piecewise graphs' pool holds the activations of their largest step
            graphs += peak_of(prompt(self._piecewise_tokens()))
        torch.cuda.empty_cache()
        free, total = torch.cuda.mem_get_info(self.device)
        embeddings = self.cfg.embedding_buffer_bytes if self.model_config.is_multimodal else 0
        return memory.GpuBudget(
            total=total,
            weights=weights,
            activations=activations + embeddings,  # resident image embeddings live beside the activations
            graphs=graphs,
            vision=int(total * self.cfg.vision_mem_fraction),
            free=free,
        )

    def _capture_graphs(self, graph_bs: int) -> None:
        from kernels.triton_attention import decode_num_splits
        from worker_svc.cuda_graphs import DecodeGraphs

        text = self.model_config.text
        num_sms = torch.cuda.get_device_properties(self.device).multi_processor_count
        max_len = self.model_config.context_length

        def splits(g: int) -> int:
            return decode_num_splits(max_len, g, text.num_key_value_heads, num_sms)

        self.graphs = DecodeGraphs(
            self._decode_body, self.attn, self.block_table, graph_bs, max_len, splits, self.device
        )
        self.graphs.capture()

    def info(self) -> WorkerInfo:
        text = self.model_config.text
        return WorkerInfo(
            architecture=self.model_config.architecture,
            num_pages=self.kv_cache.num_pages,
            page_size=self.page_size,
            context_length=self.model_config.context_length,
            vocab_size=text.vocab_size,
            dtype=str(self.dtype).removeprefix("torch."),
            device=str(self.device),
            kv_cache_bytes=self.kv_cache.nbytes,
            attention_backend=self.backend_name,
            max_running_requests=self.max_rows,
            embedding_transport=self.embeddings.transport if self.model_config.is_multimodal else "",
            epoch=self.epoch,
            num_encoder_pages=self.num_encoder_pages,
            encoder_page_tokens=self.encoder_page_tokens if self.num_encoder_pages else 0,
        )

    def warmup(self) -> None:
        """Run every kernel variant serving will meet (see `warmup_plans`) before the first request does."""
        from worker_svc.warmup import (
            WARMUP_IMAGE_KEY,
            encoder_warmup_plans,
            image_warmup_plans,
            warmup_plans,
        )

        for plan in warmup_plans(self.page_size, self.kv_cache.num_pages):
            self.step(plan)
        vision = self.model_config.vision
        # an image prompt: embedding rows merged into the prefill, grid positions (an encoder cache: below)
        if vision is not None and not self.num_encoder_pages:
            m = vision.spatial_merge_size
            grid = (1, 8 * m, 8 * m)
            rows = torch.zeros(64, self.model_config.text.hidden_size, dtype=self.dtype, device=self.device)
            self.embeddings.put(WARMUP_IMAGE_KEY, rows)
            for plan in image_warmup_plans(self.page_size, self.kv_cache.num_pages, grid, m):
                self.step(plan)
            self.embeddings.discard(WARMUP_IMAGE_KEY)
        if vision is not None and self.num_encoder_pages:  # an image's K/V written to an encoder page, read
            hidden = self.model_config.text.hidden_size
            rows = torch.zeros(self.encoder_page_tokens, hidden, dtype=self.dtype, device=self.device)
            self.embeddings.put(WARMUP_IMAGE_KEY, rows)
            for plan in encoder_warmup_plans(
                self.page_size, self.kv_cache.num_pages, self.model.image_token_id
            ):
                out = self.step(plan)
                if out.failures:
                    raise RuntimeError(f"encoder-cache warm-up failed: {out.failures}")
            self.embeddings.discard(WARMUP_IMAGE_KEY)
            self.encoder_slots.pop(1, None)  # page 1 holds no request's image

    # ---- the step ----

    def step(self, plan: StepPlan) -> StepOutput:
        """Launch and wait: the unpipelined form (tests, warm-up)."""
        return self.collect(self.launch(plan))

    @torch.inference_mode()
    def launch(self, plan: StepPlan) -> InflightStep:
        start_ns, t0 = time.time_ns(), time.perf_counter_ns()
        if plan.prefetch_keys or plan.prefetch_leases:
            self.embeddings.prefetch(plan.prefetch_keys, plan.prefetch_leases)
        for seq_id in plan.free_seq_ids:
            self._free(seq_id)
        updates = Updates()
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
                self._apply_init_and_pages(s, updates)
                seqs.append(s)
            except InvalidRequestError as e:
                failures.append(SeqFailure(s.seq_id, "internal", e.message))
        seqs, fetch_failures = self._fetch_embeddings(seqs)
        failures.extend(fetch_failures)
        if self.num_encoder_pages:
            self._fill_encoder_pages(seqs)
        for f in failures:
            self.failed[f.seq_id] = f.reason
        step = InflightStep(plan.step_id, start_ns, 0, [s.seq_id for s in seqs if s.sample], failures)
        if not seqs:
            if updates:
                self._apply_updates(StepInputs([], updates).to_device(self.device))
            step.prepare_ns = time.perf_counter_ns() - t0
            return step
        step_inputs, overrides = self._step_inputs(seqs, updates)
        step.num_tokens = step_inputs.num_tokens
        t1 = time.perf_counter_ns()
        step.prepare_ns = t1 - t0
        if self.cuda:
            step.started = torch.cuda.Event(enable_timing=True)
            step.done = torch.cuda.Event(enable_timing=True)
            step.started.record()
        if step_inputs.graph_size:
            views = self.graphs.stage(step_inputs)
            self._apply_updates(views)
            logits = self.graphs.replay(step_inputs.graph_size, step_inputs.num_seqs)
            sample_rows = views["src_rows"][: step_inputs.num_seqs]
        else:
            logits, views, hidden = self._forward_eager(step_inputs, overrides)
            sample_rows = views["sample_rows"]
            scored = self._scored_rows(seqs)
            if scored:
                step.prompt_logprobs = score_rows(hidden, scored, self.model.compute_logits)
        if step_inputs.sample_rows:
            masks = self._grammar_masks(plan, step.seq_ids) if plan.mask_seq_ids else None
            step.pending = self.sampler.sample(logits, step_inputs.sample_rows, masks)
            self.token_buf.index_copy_(0, sample_rows.long(), step.pending.token_ids.to(self.token_buf.dtype))
        if step.done is not None:
            step.done.record()
        else:
            step.host_forward_ns = time.perf_counter_ns() - t1
        return step

    def _grammar_masks(self, plan: StepPlan, sampled_ids: list[str]) -> tuple[np.ndarray, np.ndarray] | None:
        """The step's grammar bitmasks [R, W] and the batch row of each (rows of sequences left out dropped)."""
        num_words = -(-self.sampler.vocab_size // 32)
        bitmask = np.frombuffer(plan.token_bitmask, dtype="<i4").reshape(len(plan.mask_seq_ids), num_words)
        bitmask = bitmask.astype(np.int32)  # a writable copy in native order, which torch.from_numpy takes
        where = {seq_id: b for b, seq_id in enumerate(sampled_ids)}
        keep = [(i, where[s]) for i, s in enumerate(plan.mask_seq_ids) if s in where]
        if not keep:
            return None
        picked, rows = zip(*keep, strict=True)
        if len(picked) < len(plan.mask_seq_ids):
            bitmask = bitmask[list(picked)]
        return bitmask, np.asarray(rows, dtype=np.int64)

    def collect(self, step: InflightStep) -> StepOutput:
        """Wait for a launched step and read its tokens (touches only the step's own buffers: any thread)."""
        if step.done is not None:
            step.done.synchronize()
            forward_ns = int(step.started.elapsed_time(step.done) * 1e6)
        else:
            forward_ns = step.host_forward_ns
        results: list[SeqResult] = []
        if step.pending is not None:
            out = step.pending.result()
            for i, seq_id in enumerate(step.seq_ids):
                results.append(
                    SeqResult(
                        seq_id,
                        out.token_ids[i],
                        out.logprobs[i] if out.logprobs else 0.0,
                        tuple(out.top_logprobs[i]) if out.top_logprobs else (),
                    )
                )
        return StepOutput(
            step.step_id,
            tuple(results),
            tuple(step.failures),
            step.num_tokens,
            step.prepare_ns,
            forward_ns,
            step.start_ns,
            time.time_ns(),
            prompt_logprobs=tuple(step.prompt_logprobs.result()) if step.prompt_logprobs else (),
        )

    def _scored_rows(self, seqs: list[SeqStep]) -> list[ScoredRows]:
        """The rows of this step's packed batch that score prompt tokens, per sequence."""
        out, row0 = [], 0
        for s in seqs:
            if s.logprob_targets:
                top_n = self.seqs[s.seq_id].top_logprobs
                out.append(ScoredRows(s.seq_id, row0 + s.logprob_row_start, s.logprob_targets, top_n))
            row0 += s.num_tokens
        return out

    # ---- per-sequence state ----

    def _free(self, seq_id: str) -> None:
        self.failed.pop(seq_id, None)
        st = self.seqs.pop(seq_id, None)
        if st is not None:
            self._drop(st)

    def _drop(self, st: _SeqState) -> None:
        self.sampler.remove_row(st.row)
        self.free_rows.append(st.row)
        for key in st.embeds:
            self.embeddings.release(key)
        st.embeds.clear()

    def _check_inputs(self, s: SeqStep) -> None:
        """What the scheduler sent, checked before anything is touched: a bad sequence fails alone (an id past the
        vocabulary would be a device-side assert that ends the process; a zero grid a ZeroDivisionError)."""
        vocab, inputs = self.model_config.text.vocab_size, self.num_input_embeddings
        for ids, bound in ((s.input_ids, inputs), (s.logprob_targets, vocab)):
            if ids and not (min(ids) >= 0 and max(ids) < bound):
                raise InvalidRequestError(f"sequence {s.seq_id}: token ids outside [0, {bound})")
        if s.logprob_targets and not (0 <= s.logprob_row_start <= len(s.input_ids) - len(s.logprob_targets)):
            raise InvalidRequestError(f"sequence {s.seq_id}: prompt log-probability rows outside the chunk")
        if s.page_ids and not (min(s.page_ids) > 0 and max(s.page_ids) < self.kv_cache.num_pages):
            raise InvalidRequestError(f"sequence {s.seq_id}: page ids outside [1, {self.kv_cache.num_pages})")
        if s.init is None:
            return
        init = s.init
        for ids, bound in (
            (init.prompt_token_ids, inputs),
            (init.output_token_ids, vocab),
            (tuple(init.sampling.logit_bias), vocab),
        ):
            if ids and not (min(ids) >= 0 and max(ids) < bound):
                raise InvalidRequestError(f"sequence {s.seq_id}: token ids outside [0, {bound})")
        if self.num_encoder_pages and (
            len(init.encoder_page_ids) != len(init.mm_items)
            or (
                init.encoder_page_ids
                and not 0 < min(init.encoder_page_ids) <= max(init.encoder_page_ids) < self.num_encoder_pages
            )
        ):
            raise InvalidRequestError(
                f"sequence {s.seq_id}: encoder pages {init.encoder_page_ids} do not give one page in "
                f"[1, {self.num_encoder_pages}) per image"
            )
        for m in init.mm_items:
            if m.offset < 0 or not self.model.valid_span(m.num_tokens, tuple(m.grid_thw)):
                raise InvalidRequestError(
                    f"sequence {s.seq_id}: image span of {m.num_tokens} tokens at {m.offset} does not fit its "
                    f"grid {tuple(m.grid_thw)}"
                )

    def _apply_init_and_pages(self, s: SeqStep, updates: Updates) -> None:
        self._check_inputs(s)
        if s.init is not None:
            init = s.init
            old = self.seqs.pop(s.seq_id, None)
            if old is not None:
                self._drop(old)
            if not self.free_rows:
                raise InvalidRequestError(
                    f"the worker holds {self.max_rows} sequences already (--max-running-requests)"
                )
            row = self.free_rows.pop()
            spans = [(m.offset, m.num_tokens, tuple(m.grid_thw)) for m in init.mm_items]
            self.seqs[s.seq_id] = _SeqState(
                row=row,
                page_table=[],
                spans=spans,
                keys=[m.content_key for m in init.mm_items],
                delta=self.model.position_delta(spans),
                sampled=bool(init.output_token_ids),
                top_logprobs=init.sampling.top_logprobs,
            )
            if self.num_encoder_pages:
                st = self.seqs[s.seq_id]
                st.encoder_pages = list(init.encoder_page_ids)
                st.encoder_ready = not spans
                st.cross = self.model.sequence_images(
                    spans, st.encoder_pages, init.num_prompt_tokens, self.device
                )
            self.sampler.add_row(row, init.sampling, init.prompt_token_ids, init.output_token_ids)
            if init.output_token_ids:
                updates.token_rows.append(row)
                updates.token_ids.append(init.output_token_ids[-1])
        st = self.seqs.get(s.seq_id)
        if st is None:
            raise InvalidRequestError(
                f"sequence {s.seq_id} is unknown to the worker and the step carries no init"
            )
        if s.page_ids:
            end = s.page_table_start + len(s.page_ids)
            if end > self.max_pages_per_seq:
                raise InvalidRequestError(f"sequence {s.seq_id}: {end} pages exceed the context length")
            if len(st.page_table) < end:
                st.page_table.extend([0] * (end - len(st.page_table)))
            st.page_table[s.page_table_start : end] = s.page_ids
            base = st.row * self.max_pages_per_seq + s.page_table_start
            updates.table_cells.extend(range(base, base + len(s.page_ids)))
            updates.table_pages.extend(s.page_ids)
        if not s.input_ids and not st.sampled:
            raise InvalidRequestError(f"decode step for {s.seq_id} before any token was sampled")
        if (s.start_pos + s.num_tokens + self.page_size - 1) // self.page_size > len(st.page_table):
            raise InvalidRequestError(
                f"sequence {s.seq_id}: page table too short for {s.start_pos + s.num_tokens} tokens"
            )
        if s.sample:
            st.sampled = True

    def _fetch_embeddings(self, seqs: list[SeqStep]) -> tuple[list[SeqStep], list[SeqFailure]]:
        """Attach the embeddings of the spans this step computes (resident once per image, shared by sequences)
        and let go of the ones it has passed. A sequence whose embeddings are still being pulled is left out while
        any other sequence can run (in this step or the next); with nothing else to run, the step waits."""
        res = self.embeddings
        needs: dict[str, list[str]] = {}
        for s in seqs:
            st = self.seqs[s.seq_id]
            if self.num_encoder_pages:  # the images' states fill encoder pages (once per page and image)
                keys = [] if st.encoder_ready else self._unfilled(st)
                if keys:
                    needs[s.seq_id] = keys
                continue
            lo, hi = s.start_pos, s.start_pos + s.num_tokens
            for (off, n, _), key in zip(st.spans, st.keys, strict=True):
                if off + n <= lo and key in st.embeds:
                    del st.embeds[key]
                    res.release(key)
                elif off < hi and off + n > lo and key not in st.embeds:
                    needs.setdefault(s.seq_id, []).append(key)
        if not needs:
            return seqs, []
        res.request(k for keys in needs.values() for k in keys)
        blocked = {sid for sid, keys in needs.items() if any(res.status(k) == "pending" for k in keys)}
        failures: list[SeqFailure] = []
        in_step = {s.seq_id for s in seqs}
        others = len(blocked) < len(seqs) or any(  # this step, or the next, has something else to run
            st.sampled for sid, st in self.seqs.items() if sid not in in_step and sid not in self.failed
        )
        if blocked and others:
            res.stats.deferred += len(blocked)
            failures += [
                SeqFailure(sid, "embedding_pending", "image embeddings still on their way; scheduled again")
                for sid in sorted(blocked)
            ]
        elif blocked:
            try:
                res.wait((k for sid in blocked for k in needs[sid]), self.cfg.embedding_timeout_s)
            except TimeoutError:
                logger.warning("embedding pull timed out after %.0f s", self.cfg.embedding_timeout_s)
            blocked = set()
        missing: set[str] = set()
        for sid, keys in needs.items():
            if sid in blocked:
                continue
            if any(res.status(k) != "ready" for k in keys):
                missing.add(sid)
                continue
            st = self.seqs[sid]
            rows = {
                key: self.encoder_page_tokens or n for (_, n, _), key in zip(st.spans, st.keys, strict=True)
            }
            if any(res.peek_rows(k) != rows[k] for k in keys):
                missing.add(sid)  # cached under this key with another row count: not this image's embedding
                logger.warning("sequence %s: an embedding's rows disagree with its image span", sid)
                continue
            for k in keys:
                st.embeds[k] = res.acquire(k)
        failures += [
            SeqFailure(sid, "embedding_missing", "vision embedding not cached") for sid in sorted(missing)
        ]
        left_out = blocked | missing
        return [s for s in seqs if s.seq_id not in left_out], failures

    def _unfilled(self, st: _SeqState) -> list[str]:
        """The sequence's image keys whose encoder pages do not hold them yet (and that it has not fetched)."""
        return list(
            dict.fromkeys(
                k
                for k, p in zip(st.keys, st.encoder_pages, strict=True)
                if self.encoder_slots.get(p) != k and k not in st.embeds
            )
        )

    def _fill_encoder_pages(self, seqs: list[SeqStep]) -> None:
        """Write the cross-attention K/V of each image a step's sequence needs into its encoder page, once: the
        scheduler hands a page to one image at a time and shares it among the sequences showing that image."""
        for s in seqs:
            st = self.seqs[s.seq_id]
            if st.encoder_ready:
                continue
            for key, page in zip(st.keys, st.encoder_pages, strict=True):
                if self.encoder_slots.get(page) != key:
                    self.encoder_slots.pop(page, None)
                    page_table = torch.tensor([page], dtype=torch.int64, device=self.device)
                    self.model.write_encoder_cache(st.embeds[key], page_table)
                    self.encoder_slots[page] = key
            for key in st.embeds:
                self.embeddings.release(key)
            st.embeds.clear()
            st.encoder_ready = True

    # ---- inputs and forward ----

    def _step_inputs(
        self, seqs: list[SeqStep], updates: Updates
    ) -> tuple[StepInputs, list[tuple[int, torch.Tensor]]]:
        page_size = self.page_size
        items: list[SeqInputs] = []
        overrides: list[tuple[int, torch.Tensor]] = []  # (row in the packed batch, embedding rows)
        row0 = 0
        for s in seqs:
            st = self.seqs[s.seq_id]
            lo, n = s.start_pos, s.num_tokens
            hi = lo + n
            if st.spans and not self.num_encoder_pages and lo < st.spans[-1][0] + st.spans[-1][1]:
                positions = self.model.positions(st.spans, lo, hi).numpy()
                for (off, cnt, _), key in zip(st.spans, st.keys, strict=True):
                    a, b = max(lo, off), min(hi, off + cnt)
                    if a < b:
                        overrides.append((row0 + a - lo, st.embeds[key][a - off : b - off]))
            else:
                positions = np.broadcast_to(np.arange(lo + st.delta, hi + st.delta), (3, n))
            if n == 1:
                slots = np.array([st.page_table[lo // page_size] * page_size + lo % page_size])
            else:
                idx = np.arange(lo, hi)
                slots = np.asarray(st.page_table)[idx // page_size] * page_size + idx % page_size
            items.append(SeqInputs(st.row, list(s.input_ids), positions, slots, hi, s.sample))
            row0 += n
        graph_size = None
        if self.graphs is not None and all(not s.input_ids and s.sample for s in seqs):
            graph_size = self.graphs.size_for(len(seqs))
        tables = [self.seqs[s.seq_id].page_table for s in seqs]
        inputs = StepInputs(items, updates, graph_size, tables)
        if self.num_encoder_pages:
            inputs.encoder_seqs = [self.seqs[s.seq_id].cross for s in seqs]
        if self.bidirectional_spans and graph_size is None:
            inputs.image_spans = [self._spans_in_step(self.seqs[s.seq_id], s) for s in seqs]
        return inputs, overrides

    @staticmethod
    def _spans_in_step(st: _SeqState, s: SeqStep) -> list[tuple[int, int]]:
        """[start, end) of the images whose tokens this step computes (whole: the scheduler never cuts one)."""
        lo, hi = s.start_pos, s.start_pos + s.num_tokens
        return [(off, off + n) for off, n, _ in st.spans if off < hi and off + n > lo]

    def _apply_updates(self, views: dict[str, torch.Tensor]) -> None:
        cells = views["table_cells"]
        if cells.numel():
            self.block_table.view(-1).index_copy_(0, cells.long(), views["table_pages"])
        rows = views["token_rows"]
        if rows.numel():
            self.token_buf.index_copy_(0, rows.long(), views["token_ids"].long())

    def _forward_eager(
        self, inputs: StepInputs, overrides: list[tuple[int, torch.Tensor]]
    ) -> tuple[torch.Tensor | None, dict[str, torch.Tensor], torch.Tensor]:
        """Logits [num sampled, vocab] of a step run kernel by kernel (None if it samples nothing), its device
        sections and its final hidden states [num_tokens, hidden] (padding rows excluded)."""
        views = inputs.to_device(self.device)
        self._apply_updates(views)
        ids = views["ids"]
        if inputs.has_device_ids:
            src = views["src_rows"]
            ids = torch.where(src >= 0, self.token_buf.index_select(0, src.clamp(min=0)), ids)
        embeds = self.model.embed(ids)
        for row, rows in overrides:
            embeds[row : row + rows.shape[0]] = rows
        n = inputs.num_tokens
        meta = AttentionMetadata(
            num_tokens=n,
            is_decode=n == inputs.num_seqs,
            max_q_len=int(inputs.q_lens.max()),
            max_seq_len=int(inputs.seq_lens.max()),
            slot_mapping=views["slots"],
            rows=views["rows"],
            seq_lens=views["seq_lens"],
            q_start=views["q_start"],
            q_lens=views["q_lens"],
            block_table=self.block_table,
            rows_host=inputs.rows,
            seq_lens_host=inputs.seq_lens,
            q_lens_host=inputs.q_lens,
            page_tables_host=inputs.page_tables,
            image_spans_host=inputs.image_spans if any(inputs.image_spans) else None,
        )
        self.attn.prepare(meta)
        positions = views["positions"].view(3, n)
        if inputs.encoder_seqs and any(x is not None for x in inputs.encoder_seqs):
            q_start = np.concatenate(([0], np.cumsum(inputs.q_lens)[:-1])).tolist()
            meta.encoder = self.model.cross_batch(
                inputs.encoder_seqs, q_start, inputs.q_lens.tolist(), positions[0]
            )
        if self.piecewise is not None and n <= self.piecewise.max_tokens:
            hidden = self.piecewise.forward(embeds, positions, meta)
        else:
            hidden = self.model(embeds, positions, meta)
        if not inputs.sample_rows:  # prefill chunks that do not end a prompt: no logits
            return None, views, hidden
        last = hidden if len(inputs.sample_rows) == n else hidden.index_select(0, views["sample_idx"])
        return self.model.compute_logits(last), views, hidden

    def _decode_body(self, src_rows: torch.Tensor, positions: torch.Tensor, meta: AttentionMetadata):
        """What a decode CUDA graph holds: each row's last token, through the model, to logits [G, vocab]."""
        ids = self.token_buf.index_select(0, src_rows)
        hidden = self.model(self.model.embed(ids), positions, meta)
        return self.model.compute_logits(hidden)
