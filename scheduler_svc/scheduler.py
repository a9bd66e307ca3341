"""The scheduler core: continuous batching with chunked prefill, paged KV allocation, the prefix cache,
preemption and stop conditions. Plain Python, no I/O: `schedule()` returns the next StepPlan,
`process_output()` consumes a StepOutput, and outputs and encode requests are drained by the loop around it.
"""

from __future__ import annotations

import bisect
import dataclasses
import logging
import time
from collections import deque
from collections.abc import Sequence as Seq
from dataclasses import dataclass, field

from common.errors import InvalidRequestError, ResourceExhaustedError
from common.types import (
    Constraint,
    DeltaColumns,
    EmbeddingLease,
    GenerateOutput,
    GenerateRequest,
    MultimodalItem,
    SeqInit,
    SeqResult,
    SeqStep,
    StepOutput,
    StepPlan,
    TokenLogprob,
)
from processor.text_stream import TextStream
from processor.tokenizer import Tokenizer
from scheduler_svc.encoder_pages import EncoderPages
from scheduler_svc.page_allocator import PageAllocator
from scheduler_svc.radix_cache import RadixCache
from scheduler_svc.sequence import RequestState, SeqStatus, Sequence, cache_key

logger = logging.getLogger(__name__)


@dataclass(frozen=True)
class SchedulerPolicy:
    """Resolved limits (no "auto" left)."""

    page_size: int
    num_pages: int
    context_length: int
    max_running_requests: int
    chunked_prefill_size: int  # max prompt tokens of one sequence in one step; <= 0: prompts are never split
    max_prefill_tokens: (
        int  # max prompt tokens of all sequences in one step (one unsplit prompt may exceed it)
    )
    enable_prefix_cache: bool = True
    # decodes ride along in steps that carry prompt chunks; off (SGLang's default): a step with prompt work runs
    # prompts only, so decode-only steps stay eligible for the worker's CUDA graphs
    enable_mixed_chunk: bool = False
    # with mixed chunks, the prompt-token budget of a step while sequences are decoding (0: max_prefill_tokens):
    # a small one keeps decode steps short and spreads admissions, an idle batch still takes max_prefill_tokens
    mixed_prefill_tokens: int = 0
    schedule_policy: str = "fcfs"  # or "lpm": longest cached prefix first
    max_queued_requests: int = 0  # requests waiting for admission before new ones are refused; 0: no limit
    stream_interval: int = 1  # streamed outputs carry at least this many new tokens (the last one fewer)
    eos_token_ids: tuple[int, ...] = ()
    decode_log_interval: int = 40
    vocab_size: int = 1 << 31
    image_token_id: int | None = (
        None  # the model's image placeholder (mllama's <|image|> is past the vocabulary)
    )
    # prefill chunks end only at image edges (Gemma 3's image tokens attend to their whole image): a chunk that
    # would end inside an image stops before it, or takes all of it when the image starts the chunk
    whole_image_spans: bool = False
    # encoder-cache pages (one image each, page 0 included) of a family whose language model cross-attends to
    # image states (Llama 3.2 Vision); 0: images are tokens of the sequence
    num_encoder_pages: int = 0


@dataclass
class Stats:
    num_preemptions: int = 0
    prefix_cache_hit_tokens: int = 0
    prompt_tokens_total: int = 0
    vision_encode_calls: int = 0
    vision_images_requested: int = 0
    vision_cache_hits: int = 0
    vision_skipped_images: int = 0
    embedding_prefetches: int = 0
    embedding_deferrals: int = 0
    num_steps: int = 0
    generated_tokens_total: int = 0
    requests_finished: int = 0
    requests_aborted: int = 0
    scheduler_ns_total: int = 0
    scheduler_ns_off_path: int = 0
    scheduler_ns_overlapped: int = 0
    worker_forward_ns_total: int = 0
    steps_overlapped: int = 0
    cached_tokens_total: int = 0  # prompt tokens found in the prefix cache at each request's first admission
    finish_reasons: dict = field(default_factory=dict)  # sequences finished, by reason (stop, length, abort)
    recent_tokens: deque = field(default_factory=lambda: deque(maxlen=256))  # (unix time, tokens)

    def counters(self) -> dict[str, int | float]:
        """Every counter by name (the names of SchedulerStats' fields), plus the recent generation throughput."""
        out = {f.name: getattr(self, f.name) for f in dataclasses.fields(self) if f.name in _PROTO_FIELDS}
        out["gen_throughput"] = self.gen_throughput()
        return out

    def gen_throughput(self) -> float:
        if len(self.recent_tokens) < 2:
            return 0.0
        span = self.recent_tokens[-1][0] - self.recent_tokens[0][0]
        return sum(n for _, n in list(self.recent_tokens)[1:]) / span if span > 0 else 0.0


_PROTO_FIELDS = {f.name for f in dataclasses.fields(Stats)} - {
    "recent_tokens",
    "cached_tokens_total",
    "finish_reasons",
}


class StepObserver:
    """Timings the core reports once per step or admission (never per token); the server plugs in a
    Prometheus-backed one, the core stays free of it."""

    def step(self, has_prompt_work: bool, seconds: float) -> None:
        pass

    def queued(self, seconds: float) -> None:
        pass

    def grammar_compiled(self, seconds: float) -> None:  # called on a grammar thread
        pass


@dataclass
class _Sent:
    """What a sent step did to one sequence, to apply when its result arrives."""

    seq: Sequence
    epoch: int
    computed_after: int
    sample: bool
    prompt_lp_pos: int = -1  # the first prompt position the chunk's logprob_targets score


@dataclass
class _Decodes:
    """A step's plain decodes (one token from the last sample, no page-table change) in columns: what the plan
    carries, and what its result is applied to (sequence i computed position start_pos[i] in epoch epochs[i])."""

    seqs: list[Sequence] = field(default_factory=list)
    epochs: list[int] = field(default_factory=list)
    seq_ids: list[str] = field(default_factory=list)
    start_pos: list[int] = field(default_factory=list)


def validate_request(req: GenerateRequest, vocab_size: int, image_token_id: int | None = None) -> None:
    """What the scheduler cannot run: raised as INVALID_ARGUMENT for gRPC callers that skip the gateway."""
    s, st = req.sampling, req.stopping
    ids = req.input_ids
    # inside an image's span the model's placeholder may lie past the output head (mllama's <|image|>)
    if req.mm_items and image_token_id is not None and image_token_id >= vocab_size:
        ids = list(ids)
        for m in req.mm_items:
            span = range(max(0, m.offset), min(m.end, len(ids)))
            ids[span.start : span.stop] = [0 if ids[i] == image_token_id else ids[i] for i in span]
    if any(t < 0 or t >= vocab_size for t in ids):
        raise InvalidRequestError(f"input_ids must be in [0, {vocab_size})", param="input_ids")
    first = req.prompt_logprob_from
    if first is not None and any(t >= vocab_size for t in req.input_ids[first:]):
        raise InvalidRequestError(
            "prompt log-probabilities cannot score an image placeholder past the output head (mllama's "
            "<|image|>): start them after the prompt's last image",
            param="logprob_start_len",
        )
    for m in req.mm_items:
        if m.offset < 0 or m.end > len(req.input_ids) or m.num_tokens < 1 or not m.content_key:
            raise InvalidRequestError(
                "multimodal item outside the prompt or without a content key", param="mm_items"
            )
    checks = [
        (s.temperature >= 0, "temperature", "must be >= 0"),
        (0 < s.top_p <= 1, "top_p", "must be in (0, 1]"),
        (s.top_k >= -1, "top_k", "must be -1, 0 or positive"),
        (0 <= s.min_p <= 1, "min_p", "must be in [0, 1]"),
        (s.repetition_penalty > 0, "repetition_penalty", "must be > 0"),
        (0 <= s.top_logprobs <= 20, "top_logprobs", "must be in [0, 20]"),
        (st.max_new_tokens >= 0, "max_tokens", "must be >= 0"),  # 0: SGLang's prompt scoring
        (0 <= st.min_new_tokens <= st.max_new_tokens, "min_tokens", "must be in [0, max_tokens]"),
        (1 <= req.n <= 128, "n", "must be in [1, 128]"),
    ]
    for ok, param, what in checks:
        if not ok:
            raise InvalidRequestError(f"{param} {what}", param=param)
    for param, ids in (("stop_token_ids", st.stop_token_ids), ("logit_bias", s.logit_bias)):
        bad = sorted({t for t in ids if not 0 <= t < vocab_size})
        if bad:  # a bias on a row the logits do not have would fail the worker's step, not this request
            raise InvalidRequestError(f"{param}: token ids {bad} are outside [0, {vocab_size})", param=param)


class Scheduler:
    def __init__(self, policy: SchedulerPolicy, tokenizer: Tokenizer):
        self.policy = policy
        self.tokenizer = tokenizer
        self.allocator = PageAllocator(policy.num_pages)
        self.cache = RadixCache(policy.page_size, self.allocator.free, enabled=policy.enable_prefix_cache)
        self.encoder_pages = EncoderPages(policy.num_encoder_pages) if policy.num_encoder_pages else None
        self.requests: dict[str, RequestState] = {}
        self.waiting: list[Sequence] = []  # sorted by arrival
        self.running: list[Sequence] = []  # in admission order
        self.outputs: list[GenerateOutput] = []
        self.encode_requests: list[tuple[str, list[MultimodalItem]]] = []
        self._prefetch: dict[str, None] = {}  # encoded keys the next step tells the worker to pull
        self._leases: list[
            EmbeddingLease
        ] = []  # granted with encodes; the next step hands them to the worker
        self.stats = Stats()
        self.observer = StepObserver()
        self._free_worker: list[str] = []
        self._inflight: dict[int, tuple[list[_Sent], _Decodes]] = {}
        self._step_id = 0
        self._last_log = 0.0
        self.grammar = None  # a GrammarBackend, made on first use (or by the server at startup)
        self.grammar_requests: list[tuple[str, Constraint]] = []  # constraints the loop compiles off the path
        self._num_constrained = 0  # running or waiting sequences with a matcher
        self._stop_sets: dict[frozenset[int], frozenset[int]] = {}
        # with the shortcuts, the running sequences that may still have prompt tokens to compute: every one admitted
        # since _has_prompt_work last looked (a running sequence is back in its prompt only through admission, after
        # a preemption or release), so that check need not scan the whole batch every step
        self._maybe_in_prompt: set[Sequence] = set()
        # plan a sequence that decoded plainly in the step before from its Sequence.plain_until bound, a decode
        # into a new page inline, and apply a step whose other rows all sample as its plain decodes are applied
        # (False: the general paths, which the tests compare against)
        self.plain_shortcut = True

    def grammar_backend(self):
        """The grammar backend, made on first use: the llguidance tokenizer takes ~3 s to build (on a thread)."""
        if self.grammar is None:
            from scheduler_svc.grammar import GrammarBackend

            self.use_grammar(
                GrammarBackend(self.tokenizer.hf, self.policy.vocab_size, self.policy.eos_token_ids)
            )
        return self.grammar

    def use_grammar(self, backend) -> None:
        """Take a grammar backend built ahead (the service starts one before it knows the worker's vocabulary);
        one for another vocabulary than the logits' is closed, and grammar_backend() makes the right one."""
        if backend.vocab_size != self.policy.vocab_size:
            logger.warning(
                "the worker's vocabulary (%d) is not the config's (%d)",
                self.policy.vocab_size,
                backend.vocab_size,
            )
            backend.close()
            return
        backend.on_compile = lambda seconds: self.observer.grammar_compiled(seconds)
        self.grammar = backend

    # ---- requests ----

    def add_request(
        self, req: GenerateRequest, now: float | None = None, deltas: DeltaColumns | None = None
    ) -> None:
        """Queue a request. With `deltas`, its streamed plain deltas are appended there (a consumer's columns)
        instead of going to `outputs` one GenerateOutput each; finishes, logprobs and errors still go to
        `outputs`, after the deltas delivered before them."""
        if req.request_id in self.requests:
            raise InvalidRequestError(f"request id {req.request_id!r} is already live", param="rid")
        cap = self.policy.max_queued_requests
        if cap and self._num_queued_requests() >= cap:
            raise ResourceExhaustedError(
                f"{cap} requests are already waiting (--max-queued-requests); retry shortly"
            )
        n_prompt = len(req.input_ids)
        validate_request(req, self.policy.vocab_size, self.policy.image_token_id)
        if n_prompt == 0:
            raise InvalidRequestError("the prompt is empty", param="messages")
        if n_prompt >= self.policy.context_length:
            raise InvalidRequestError(
                f"the prompt is {n_prompt} tokens (images included); this model's context length is "
                f"{self.policy.context_length}",
                param="messages",
                code="context_length_exceeded",
            )
        if n_prompt > self.policy.num_pages * self.policy.page_size - self.policy.page_size:
            raise InvalidRequestError(
                f"the prompt is {n_prompt} tokens, more than the KV cache holds", param="messages"
            )
        num_images = len({m.content_key for m in req.mm_items})
        if self.encoder_pages is not None and num_images > self.policy.num_encoder_pages - 1:
            raise InvalidRequestError(
                f"the prompt has {num_images} images; the encoder cache holds {self.policy.num_encoder_pages - 1}",
                param="messages",
            )
        state = RequestState(
            req,
            now if now is not None else time.monotonic(),
            cache_key(
                list(req.input_ids),
                req.mm_items,
                req.cache_salt,
                images_from_start=self.encoder_pages is not None,
            ),
        )
        stop = req.stopping
        for i in range(max(1, req.n)):
            stream = TextStream(
                self.tokenizer,
                skip_special_tokens=stop.skip_special_tokens,
                stop=stop.stop,
                no_stop_trim=stop.no_stop_trim,
            )
            seq = Sequence(state, i, stream, self.policy.eos_token_ids)
            # one frozenset per distinct stop-token set, shared: read for every token, it stays in the caches
            if len(self._stop_sets) > 1024:
                self._stop_sets.clear()
            seq.stop_token_ids = self._stop_sets.setdefault(seq.stop_token_ids, seq.stop_token_ids)
            seq.output_limit = min(seq.max_new_tokens, self.policy.context_length - n_prompt)
            if req.stream and seq.prompt_lps_sent:  # a first output with prompt logprobs goes as a message
                seq.deltas = deltas
            state.seqs.append(seq)
            self._enqueue(seq)
        state.num_unfinished = len(state.seqs)
        self.requests[req.request_id] = state
        if req.constraint is not None:
            state.grammar_pending = True
            self.grammar_requests.append((req.request_id, req.constraint))
        self.stats.prompt_tokens_total += n_prompt

    def abort_request(self, request_id: str, reason: str = "aborted") -> bool:
        state = self.requests.get(request_id)
        if state is None:
            return False
        for seq in state.seqs:
            if not seq.is_finished:
                self._finish(seq, "abort", emit=True)
        self.stats.requests_aborted += 1
        return True

    def _num_queued_requests(self) -> int:
        """Requests with a sequence waiting for admission (n > 1 counts once)."""
        return len({seq.request_id for seq in self.waiting})

    def fail_request(self, request_id: str, error: str, code: str = "internal") -> None:
        """End a request with an error (code: invalid_argument, unavailable, resource_exhausted, internal)."""
        state = self.requests.get(request_id)
        if state is None:
            return
        state.error = error
        for seq in state.seqs:
            if not seq.is_finished:
                self._finish(seq, "abort", emit=True, error=(error, code))

    def on_worker_lost(self, error: str) -> None:
        """The step stream broke: every live request fails; the worker starts over on the next stream."""
        for rid in list(self.requests):
            self.fail_request(rid, error, "unavailable")
        self._inflight.clear()
        self._free_worker.clear()
        self._prefetch.clear()
        self._leases.clear()  # the vision service ends them when they expire

    def on_worker_restarted(self, error: str) -> None:
        """The worker answering now is another process (a new epoch): its KV cache holds none of the pages the
        prefix cache remembers, nor any running sequence's. Running requests fail; waiting ones (no state on the
        worker) stay; the prefix cache is dropped, so every later prompt is computed again."""
        running = {seq.request_id for seq in self.running}
        for rid in running:
            self.fail_request(rid, error, "unavailable")
        self._inflight.clear()
        self._free_worker.clear()
        self._prefetch.clear()
        self._leases.clear()  # the vision service ends them when they expire
        self.cache.reset()

    def on_encoded(
        self,
        request_id: str,
        keys: Seq[str],
        num_calls: int = 0,
        num_sent: int = 0,
        num_hits: int = 0,
        lease: EmbeddingLease | None = None,
    ) -> None:
        """The request's images are in the vision cache; counts are of the RPCs this request made itself (images
        another request was already encoding were awaited, not sent again). A lease on their rows (granted with
        the encode) goes to the worker with the next step, which copies them from the pool at once."""
        self.stats.vision_encode_calls += num_calls
        self.stats.vision_images_requested += num_sent
        self.stats.vision_cache_hits += num_hits
        if lease is not None:
            self._leases.append(lease)
        state = self.requests.get(request_id)
        if state is not None:
            state.images_ready.update(keys)
            state.encoding = False
            self._prefetch.update(dict.fromkeys(keys))
            leased = lease is not None and set(keys) <= {loc.content_key for loc in lease.locations}
            # the next plan carries them: with a lease the worker has the rows as that step starts, so the prefill
            # may be in it; otherwise the worker pulls them meanwhile and the prefill waits while others run
            state.prefetch_step = None if leased else self._step_id + 1

    def on_grammar(self, request_id: str, compiled) -> None:
        """The request's grammar compiled: each choice gets its own matcher, and the request may be admitted."""
        state = self.requests.get(request_id)
        if state is None:
            return
        for seq in state.seqs:
            if not seq.is_finished:
                seq.matcher = compiled.deep_copy()
                seq.plain_until = 0
                self._num_constrained += 1
        state.grammar_pending = False

    def hand_back(self, lease: EmbeddingLease) -> None:
        """A lease nobody will use: the next step hands it to the worker to end, with nothing to copy."""
        self._leases.append(EmbeddingLease(lease.pool_id, lease.lease_id, ()))

    @property
    def has_work(self) -> bool:
        return (
            bool(self.running)
            or any(self._admissible(s) for s in self.waiting)
            or bool(self._free_worker)
            or bool(self._prefetch)
            or bool(self._leases)
        )

    # ---- planning ----

    def schedule(self) -> StepPlan | None:
        p = self.policy
        steps: list[SeqStep] = []
        sent: list[_Sent] = []
        decodes = _Decodes()
        prefill_budget = p.max_prefill_tokens
        if p.enable_mixed_chunk and p.mixed_prefill_tokens and self._decoding():
            prefill_budget = min(prefill_budget, p.mixed_prefill_tokens)
        full_budget = prefill_budget
        step_id = self._step_id + 1

        # 1. decodes and unfinished prefills of the running batch, oldest first; preempt the newest on shortage.
        # Without mixed chunks, a step that has prompt work to do leaves the decodes for the next one.
        prompts_first = not p.enable_mixed_chunk and self._has_prompt_work()
        prefill_budget = self._plan_running(steps, sent, decodes, prefill_budget, step_id, not prompts_first)

        # 2. admit waiting sequences, first come first served (or longest cached prefix first, "lpm")
        new_seqs = new_tokens = cached = 0
        for seq in self._admission_order():
            if len(self.running) >= p.max_running_requests or prefill_budget <= 0:
                break
            if not self._admissible(seq) or seq.preempted_in_step == step_id:
                continue
            admitted = self._admit(seq, prefill_budget, step_id, prefill_budget == full_budget)
            if admitted is None:
                break  # out of pages: later arrivals wait too
            if admitted == 0:
                continue  # waits for its images
            n, hit = admitted
            prefill_budget -= n
            new_seqs, new_tokens, cached = new_seqs + 1, new_tokens + n, cached + hit
            steps.append(self._seq_step(seq, n, sent))
            seq.last_step = step_id

        if prompts_first and not any(st.input_ids for st in steps):
            # the prompt work could not be placed (no pages, waiting for images): decode after all
            self._plan_running(steps, sent, decodes, prefill_budget, step_id, True)
        if (
            not steps
            and not decodes.seqs
            and not self._free_worker
            and not self._prefetch
            and not self._leases
        ):
            return None
        self._step_id = step_id
        mask_ids, bitmask = self._masks(sent, decodes) if self._num_constrained else ((), b"")
        plan = StepPlan(
            step_id,
            tuple(steps),
            tuple(self._free_worker),
            time.time_ns(),
            tuple(self._prefetch),
            tuple(decodes.seq_ids),
            tuple(decodes.start_pos),
            tuple(self._leases),
            mask_ids,
            bitmask,
        )
        self._free_worker = []
        self._leases = []
        if self._prefetch:
            self.stats.embedding_prefetches += len(self._prefetch)
            self._prefetch = {}
        self._inflight[step_id] = (sent, decodes)
        self.stats.num_steps += 1
        self._log_step(new_seqs, new_tokens, cached, len(steps) + len(decodes.seqs) - new_seqs)
        return plan

    def _masks(self, sent: list[_Sent], decodes: _Decodes) -> tuple[tuple[str, ...], bytes]:
        """The allowed-token bitmasks of the step's constrained sequences that sample, filled in one batch."""
        seqs = [s.seq for s in sent if s.sample and s.seq.matcher is not None]
        seqs += [seq for seq in decodes.seqs if seq.matcher is not None]
        if not seqs:
            return (), b""
        mask = self.grammar.fill([seq.matcher for seq in seqs])
        return tuple(seq.seq_id for seq in seqs), mask.astype("<i4", copy=False).tobytes()

    LPM_MAX_QUEUE = 128  # past this many waiting, matching every prompt costs more than it saves (as SGLang)

    def _admission_order(self) -> list[Sequence]:
        """The waiting queue in admission order: by arrival (fcfs), or with "lpm" the longest prefix-cache match
        first (arrival breaks ties), so requests sharing a cached prefix run while it is still cached."""
        if self.policy.schedule_policy != "lpm" or len(self.waiting) > self.LPM_MAX_QUEUE:
            return list(self.waiting)

        def matched(seq: Sequence) -> int:
            return len(self.cache.match_prefix(seq.key[: seq.num_tokens - 1])[0])

        return sorted(self.waiting, key=lambda seq: -matched(seq))  # stable: arrival order among equals

    def _has_prompt_work(self) -> bool:
        """A running sequence has prompt tokens left, or a waiting one could be admitted now."""
        running = SeqStatus.RUNNING
        if self.plain_shortcut:
            # only the sequences admitted since the last look, less those whose prompt is done or that left
            maybe = self._maybe_in_prompt
            if maybe:
                maybe.difference_update([s for s in maybe if not (s.status is running and s.in_prompt)])
                if maybe:
                    return True
        else:
            # Sequence.in_prompt, inline and in a plain loop (no generator): this runs over the batch every step
            for s in self.running:
                n = len(s.output_ids)
                if s.num_computed < s.num_prompt + n - (1 if n else 0) and s.status is running:
                    return True
        return len(self.running) < self.policy.max_running_requests and any(
            self._admissible(s) for s in self.waiting
        )

    def _decoding(self) -> bool:
        """A running sequence is past its prompt (usually the oldest, so this stops at the first)."""
        return any(not s.in_prompt for s in self.running if s.status is SeqStatus.RUNNING)

    def _plan_running(
        self,
        steps: list[SeqStep],
        sent: list[_Sent],
        plain: _Decodes,
        prefill_budget: int,
        step_id: int,
        decodes: bool,
    ) -> int:
        """Add the running batch's unfinished prompt chunks (and its decodes if `decodes`) to the step, oldest
        first, preempting the newest sequences on a page shortage. Returns the prompt-token budget left.
        Plain decodes go to `plain`, the rest to `steps`."""
        p = self.policy
        page_size, running = p.page_size, SeqStatus.RUNNING
        # the lists, not their bound appends: Python 3.11 runs `a_list.append(x)` inline
        plain_seqs, plain_epochs, plain_ids, plain_pos = (
            plain.seqs,
            plain.epochs,
            plain.seq_ids,
            plain.start_pos,
        )
        shortcut = self.plain_shortcut
        for seq in list(self.running):
            start = seq.num_computed
            pending = seq.num_pending_samples
            if start < seq.plain_until and pending and decodes and seq.last_step != step_id:
                # a plain decode in the step before (its bound says no page, limit or state change since): one
                # more, without the checks below. A sample in flight means its prompt is done: while it decodes,
                # num_computed = num_prompt + len(output_ids) + num_pending_samples - 1
                plain_seqs.append(seq)
                plain_epochs.append(seq.epoch)
                plain_ids.append(seq.seq_id)
                plain_pos.append(start)
                seq.num_computed = start + 1
                seq.num_pending_samples = pending + 1
                seq.last_step = step_id
                continue
            if seq.status is not running or seq.last_step == step_id:
                continue  # preempted for an older sequence in this loop, or already in the step
            total = seq.num_prompt + len(seq.output_ids)
            if start >= total:  # prompt done: a decode
                if not decodes:
                    continue
                if len(seq.output_ids) + pending >= seq.output_limit:  # max_new_tokens, or the context
                    continue  # its last token is in flight; it finishes when that arrives
                if pending and seq.matcher is not None:
                    continue  # its mask needs the token in flight: it samples in the step after that arrives
                page_end = len(seq.page_ids) * page_size
                if seq.worker_has_state and seq.table_dirty_from == len(seq.page_ids) and start < page_end:
                    # the common case, kept to a few list appends: no init, no new page, no token to send
                    plain_seqs.append(seq)
                    plain_epochs.append(seq.epoch)
                    plain_ids.append(seq.seq_id)
                    plain_pos.append(start)
                    seq.num_computed = start + 1
                    seq.num_pending_samples = pending + 1
                    seq.last_step = step_id
                    if shortcut and seq.matcher is None:
                        # each later plain decode adds one to num_computed and to len(output_ids) + pending, so
                        # this stays one until its next page or its last token
                        seq.plain_until = min(
                            page_end, seq.output_limit - (len(seq.output_ids) + pending - start)
                        )
                    continue
                if (
                    shortcut
                    and start == page_end
                    and seq.worker_has_state
                    and seq.table_dirty_from == len(seq.page_ids)
                    and self.allocator.num_free
                ):
                    # a decode into a new page (one step in page_size of each sequence): what _reserve and
                    # _seq_step do for it, inline. A page is free, so nothing is evicted or preempted; it samples
                    # (its output limit is above len(output_ids) + pending >= 0)
                    page_ids = seq.page_ids
                    table_start = len(page_ids)
                    page_ids += self.allocator.alloc(1)
                    steps.append(SeqStep(seq.seq_id, start, (), True, table_start, (page_ids[-1],)))
                    seq.table_dirty_from = table_start + 1
                    seq.num_computed = start + 1
                    seq.num_pending_samples = pending + 1
                    sent.append(_Sent(seq, seq.epoch, start + 1, True))
                    seq.last_step = step_id
                    if seq.matcher is None:  # plain decodes again until the next page, as above
                        seq.plain_until = min(
                            page_end + page_size,
                            seq.output_limit - (len(seq.output_ids) + pending - start),
                        )
                    continue
                n = 1
            elif not decodes and not seq.in_prompt:
                continue
            else:
                limit = p.chunked_prefill_size if p.chunked_prefill_size > 0 else total
                # a decode row (its last sampled token) needs no prompt budget: older chunks that spent it all
                # must not hold the decodes back
                n = min(total - seq.num_computed, limit, prefill_budget if seq.in_prompt else 1)
                n = self._whole_images(seq, seq.num_computed, n)
                if n <= 0:
                    continue
            # a prompt chunk in a prompts-only step takes free pages only: preempting for it could starve decodes
            if not self._reserve(seq, seq.num_computed + n, step_id, may_preempt=decodes):
                if seq.status is SeqStatus.RUNNING and len(self.running) == 1 and not seq.num_pending_samples:
                    logger.warning("%s needs more KV pages than the pool has; ending it", seq.seq_id)
                    self._finish(seq, "length", emit=True)
                continue
            if seq.in_prompt:  # a decode row is not a prompt token
                prefill_budget -= n
            steps.append(self._seq_step(seq, n, sent))
            seq.last_step = step_id
        return prefill_budget

    def _whole_images(self, seq: Sequence, start: int, n: int) -> int:
        """A chunk of n tokens from `start`, moved so that it does not end inside an image (policy permitting)."""
        if not self.policy.whole_image_spans or n <= 0:
            return n
        end = start + n
        for m in seq.req.request.mm_items:
            if m.offset < end < m.end:
                # before the image; or, when the image starts at the chunk, all of it (at most 256 tokens over)
                return m.offset - start if m.offset > start else m.end - start
        return n

    def _admissible(self, seq: Sequence) -> bool:
        if seq.num_pending_samples or seq.req.encoding or seq.req.grammar_pending:
            return False
        if self.running and seq.req.prefetch_step is not None and self._step_id <= seq.req.prefetch_step:
            # the worker starts pulling this request's embeddings in that step: give the pull one more step
            # before the prefill, so running decodes never wait on it (an idle batch admits at once; the worker
            # then waits for the pull itself)
            return False
        if seq.index > 0 and self.policy.enable_prefix_cache:
            first = seq.req.seqs[0]  # siblings wait for the first choice's prompt to be cached, then share it
            return first.is_finished or first.num_confirmed >= len(seq.req.request.input_ids)
        return True

    def _admit(self, seq: Sequence, budget: int, step_id: int, first: bool) -> tuple[int, int] | int | None:
        """Match the prefix cache, make sure images are encoded, take pages. Returns (tokens, cache hit) when
        admitted, 0 when the sequence waits for its images, None when pages ran out (or, with chunking off, the
        prompt does not fit the budget left; `first`: nothing took any of the step's budget yet)."""
        total = seq.num_tokens
        usable = total - 1  # the last token is always computed: its row samples the next one
        if seq.req.needs_prompt_lps:  # rows from logprob_start_len - 1 on are computed to score the prompt
            usable = min(usable, seq.req.request.prompt_logprob_from - 1)
        pages, node = self.cache.match_prefix(seq.key[:usable])
        matched = len(pages) * self.policy.page_size
        req = seq.req
        # with an encoder cache every image is needed (the prompt's last token cross-attends to them all); the
        # worker fills a page only when it does not hold the image already
        done = 0 if self.encoder_pages is not None else matched
        needed = [m for m in req.request.mm_items if m.end > done and m.content_key not in req.images_ready]
        if needed:
            req.encoding = True
            self.encode_requests.append((req.request_id, needed))
            return 0
        if self.policy.chunked_prefill_size > 0:
            n = self._whole_images(
                seq, matched, min(total - matched, self.policy.chunked_prefill_size, budget)
            )
        elif total - matched <= budget or first:
            n = total - matched  # chunking off: the whole prompt, alone in a step if it must be
        else:
            return None
        if self.encoder_pages is not None and req.request.mm_items:
            keys = [m.content_key for m in req.request.mm_items]
            enc = self.encoder_pages.acquire(keys)
            if enc is None:
                return None  # out of encoder pages: later arrivals wait too
            seq.encoder_keys, seq.encoder_page_ids = keys, enc
        self.cache.lock(node)
        seq.page_ids, seq.tree_node, seq.num_tree_pages = list(pages), node, len(pages)
        seq.plain_until = 0
        if not self._reserve(seq, matched + n, step_id, may_preempt=False):
            self.cache.unlock(node)
            seq.page_ids, seq.tree_node, seq.num_tree_pages = [], None, 0
            self._release_encoder_pages(seq)
            return None
        self.waiting.remove(seq)
        self.running.append(seq)
        if self.plain_shortcut and not self.policy.enable_mixed_chunk:  # (_has_prompt_work runs without them)
            self._maybe_in_prompt.add(seq)
        seq.status = SeqStatus.RUNNING
        seq.num_computed = seq.num_confirmed = matched
        seq.table_dirty_from = 0
        if seq.cached_tokens is None:
            seq.cached_tokens = min(matched, len(req.request.input_ids))
            self.stats.cached_tokens_total += seq.cached_tokens
            self.observer.queued(time.monotonic() - req.arrival)
            self.stats.vision_skipped_images += sum(1 for m in req.request.mm_items if m.end <= done)
        self.stats.prefix_cache_hit_tokens += matched
        return n, matched

    def _reserve(self, seq: Sequence, num_tokens: int, step_id: int, may_preempt: bool = True) -> bool:
        """Make seq.page_ids cover num_tokens, evicting cache and then preempting the newest running sequences
        (never one already in this step). False if it could not (seq itself may have been preempted)."""
        need = -(-num_tokens // self.policy.page_size) - len(seq.page_ids)
        if need <= 0:
            return True
        while True:
            if self.allocator.num_free < need:
                self.cache.evict(need - self.allocator.num_free)
            pages = self.allocator.alloc(need)
            if pages is not None:
                seq.page_ids.extend(pages)
                seq.plain_until = 0
                return True
            if not may_preempt:
                return False
            victim = next((s for s in reversed(self.running) if s.last_step != step_id), None)
            if victim is None or (victim is seq and len(self.running) == 1):
                return False  # nothing to take pages from (alone, seq can never grow: the caller ends it)
            self._preempt(victim, step_id)
            if victim is seq:
                return False

    def _seq_step(self, seq: Sequence, n: int, sent: list[_Sent]) -> SeqStep:
        start = seq.num_computed
        total = seq.num_tokens
        decode = seq.prefill_done
        sample = (decode or start + n == total) and seq.max_new_tokens > 0
        init = None
        if not seq.worker_has_state:
            req = seq.req.request
            sampling = req.sampling
            if sampling.seed is not None and seq.index:
                # each choice of a seeded request draws its own stream, reproducibly
                sampling = dataclasses.replace(
                    sampling, seed=(sampling.seed + seq.index * 0x9E3779B97F4A7C15) % (1 << 63)
                )
            init = SeqInit(
                mm_items=tuple(m.without_data() for m in req.mm_items),
                sampling=sampling,
                num_prompt_tokens=len(req.input_ids),
                prompt_token_ids=tuple(req.input_ids) if req.sampling.needs_prompt_ids else (),
                output_token_ids=tuple(seq.output_ids),
                encoder_page_ids=tuple(seq.encoder_page_ids),
            )
            seq.worker_has_state = True
            seq.table_dirty_from = 0
        lp_row, lp_targets = (0, ()) if decode else seq.req.prompt_lp_rows(start, n)
        step = SeqStep(
            seq_id=seq.seq_id,
            start_pos=start,
            input_ids=() if decode else tuple(seq.token_ids[start : start + n]),
            sample=sample,
            page_table_start=seq.table_dirty_from,
            page_ids=tuple(seq.page_ids[seq.table_dirty_from :]),
            init=init,
            logprob_row_start=lp_row,
            logprob_targets=lp_targets,
        )
        seq.table_dirty_from = len(seq.page_ids)
        seq.plain_until = 0  # a step of its own: the planner checks it in full next time
        seq.num_computed = start + n
        if sample:
            seq.num_pending_samples += 1
        lp_pos = start + lp_row + 1 if lp_targets else -1
        sent.append(_Sent(seq, seq.epoch, seq.num_computed, sample, lp_pos))
        return step

    def _preempt(self, seq: Sequence, step_id: int) -> None:
        """Free a running sequence's pages; it is recomputed from its known tokens later."""
        logger.info("preempting %s (%d tokens) to free KV pages", seq.seq_id, seq.num_tokens)
        self.stats.num_preemptions += 1
        self._release(seq, cache=True)
        self.running.remove(seq)
        seq.status = SeqStatus.WAITING
        seq.preempted_in_step = step_id
        self._enqueue(seq)

    def _enqueue(self, seq: Sequence) -> None:
        keys = [s.arrival for s in self.waiting]
        self.waiting.insert(bisect.bisect(keys, seq.arrival), seq)

    def _release(self, seq: Sequence, cache: bool) -> None:
        """Give back a sequence's pages (caching its confirmed full pages) and forget in-flight steps."""
        ps = self.policy.page_size
        n_full = min(seq.num_confirmed, seq.num_tokens) // ps if cache and self.cache.enabled else 0
        owned_from = seq.num_tree_pages
        if n_full > seq.num_tree_pages:
            existing = self.cache.insert(seq.key[: n_full * ps], seq.page_ids[:n_full]) // ps
            dup = seq.page_ids[seq.num_tree_pages : max(seq.num_tree_pages, existing)]
            self.allocator.free(dup)
            owned_from = n_full
        self.allocator.free(seq.page_ids[owned_from:])
        if seq.tree_node is not None:
            self.cache.unlock(seq.tree_node)
        seq.page_ids, seq.tree_node, seq.num_tree_pages = [], None, 0
        self._release_encoder_pages(seq)
        seq.num_computed = seq.num_confirmed = 0
        seq.num_pending_samples = 0
        seq.plain_until = 0
        seq.epoch += 1
        if seq.worker_has_state:
            self._free_worker.append(seq.seq_id)
            seq.worker_has_state = False

    def _release_encoder_pages(self, seq: Sequence) -> None:
        """Let go of the sequence's encoder pages (the last holder of an image frees its page)."""
        if seq.encoder_keys:
            self.encoder_pages.release(seq.encoder_keys)
            seq.encoder_keys, seq.encoder_page_ids = [], []

    def _cache_unfinished(self, seq: Sequence, computed: int) -> None:
        """Share a running sequence's confirmed full pages through the prefix cache; where the cache already
        held them, switch the sequence to the cached pages and free its duplicates."""
        ps = self.policy.page_size
        n_full = min(computed, seq.num_tokens) // ps
        if not self.cache.enabled or n_full <= seq.num_tree_pages:
            return
        key = seq.key[: n_full * ps]
        existing = self.cache.insert(key, seq.page_ids[:n_full]) // ps
        pages, node = self.cache.match_prefix(key)
        if len(pages) != n_full:
            return
        for i in range(seq.num_tree_pages, existing):
            if seq.page_ids[i] != pages[i]:
                self.allocator.free([seq.page_ids[i]])
                seq.page_ids[i] = pages[i]
                seq.table_dirty_from = min(seq.table_dirty_from, i)
                seq.plain_until = 0  # its page table goes to the worker again
        self.cache.lock(node)
        if seq.tree_node is not None:
            self.cache.unlock(seq.tree_node)
        seq.tree_node, seq.num_tree_pages = node, n_full

    # ---- results ----

    def process_output(self, out: StepOutput) -> None:
        sent, decodes = self._inflight.pop(out.step_id, ((), _Decodes()))
        failed = {f.seq_id: f for f in out.failures}
        results = {r.seq_id: r for r in out.results}
        decode_ids = tuple(decodes.seq_ids)
        head = len(out.sampled_seq_ids) - len(decode_ids)
        if head >= 0 and out.sampled_seq_ids[head:] == decode_ids:
            # the worker sampled the plain decodes last and in plan order, as it does: no lookups for them, a dict
            # of the few others (a sequence is in one of the two lists, so the dict's last-wins is not needed)
            ids, toks = out.sampled_seq_ids, out.sampled_token_ids
            tokens = dict(zip(ids[:head], toks[:head], strict=True)) if head else {}
            decode_tokens = toks[head:]
        else:
            tokens = dict(zip(out.sampled_seq_ids, out.sampled_token_ids, strict=True))
            decode_tokens = [tokens.get(i) for i in decodes.seq_ids]
        scored = {p.seq_id: p for p in out.prompt_logprobs}
        self.stats.worker_forward_ns_total += out.forward_ns
        self.observer.step(bool(sent), out.forward_ns * 1e-9)
        num_tokens = 0
        seqs, epochs, starts = decodes.seqs, decodes.epochs, decodes.start_pos
        if sent and self.plain_shortcut:
            for s in sent:
                if not s.sample or s.prompt_lp_pos >= 0:
                    break
            else:
                # every other step of it samples and scores no prompt (decodes into a new page, in steady
                # decoding): what the loop below does to a row is what this loop does to such a step, so they
                # go first through it, in order, and their common tokens are applied inline too
                seqs = [s.seq for s in sent] + seqs
                epochs = [s.epoch for s in sent] + epochs
                starts = [s.computed_after - 1 for s in sent] + starts
                decode_tokens = [tokens.get(s.seq.seq_id) for s in sent] + list(decode_tokens)
                sent = ()
        for s in sent:
            seq = s.seq
            if seq.epoch != s.epoch or seq.is_finished:
                continue
            if seq.seq_id in failed:
                self._on_failure(seq, failed[seq.seq_id].reason, failed[seq.seq_id].message)
                continue
            seq.num_confirmed = max(seq.num_confirmed, s.computed_after)
            if s.prompt_lp_pos >= 0 and seq.seq_id in scored:
                seq.req.add_prompt_lps(s.prompt_lp_pos, scored[seq.seq_id])
            if not s.sample:
                self._cache_unfinished(seq, s.computed_after)
                if seq.max_new_tokens == 0 and s.computed_after >= seq.req.num_prompt_tokens:
                    self._finish(seq, "length", emit=True)  # scored the prompt, generates nothing
                continue
            num_tokens += self._on_sample(seq, s.computed_after, tokens.get(seq.seq_id), results)
        finished = SeqStatus.FINISHED
        interval = self.policy.stream_interval
        each_token = interval == 1
        columns: DeltaColumns | None = None
        num_other = 0  # rows skipped or applied by _on_sample: every other row is one token
        for seq, epoch, start, token in zip(seqs, epochs, starts, decode_tokens, strict=True):
            if seq.epoch != epoch or seq.status is finished:
                num_other += 1
                continue
            if failed and seq.seq_id in failed:
                num_other += 1
                self._on_failure(seq, failed[seq.seq_id].reason, failed[seq.seq_id].message)
                continue
            if seq.num_confirmed <= start:
                seq.num_confirmed = start + 1
            output_ids = seq.output_ids
            if (
                token is None
                or not output_ids
                or len(output_ids) + 1 >= seq.output_limit
                or seq.matcher is not None
                or seq.return_logprob
                or token in seq.stop_token_ids
            ):
                num_other += 1 - self._on_sample(seq, start + 1, token, results)
                continue
            # _on_sample and _on_token inline for the common token: not the first, not the last by length, no
            # grammar, no logprobs, no stop token; only a stop string can end the sequence here
            seq.num_pending_samples -= 1
            output_ids.append(token)
            if seq.detok is not None:  # no stop strings: the text stream is its detokenizer
                text = seq.detok.add_token(token)
            else:
                stream = seq.stream
                text = stream.push_token(token, len(output_ids) >= seq.min_new_tokens)
                if stream.matched_stop is not None:
                    seq.pending_text += text
                    seq.pending_ids.append(token)
                    seq.matched_stop = stream.matched_stop
                    self._finish(seq, "stop", emit=True)
                    continue
            deltas = seq.deltas
            if text and deltas is not None and each_token and not seq.pending_ids:
                if deltas is not columns:  # one consumer's columns, usually every sequence's
                    columns = deltas
                    # the lists, not their bound appends: Python 3.11 runs `a_list.append(x)` inline
                    rids, indexes, texts = deltas.request_ids, deltas.indexes, deltas.texts
                    counts, token_ids = deltas.num_tokens, deltas.token_ids
                rids.append(seq.request_id)
                indexes.append(seq.index)
                texts.append(text)
                counts.append(1)
                token_ids.append(token)
                continue
            if text:
                seq.pending_text += text
            seq.pending_ids.append(token)
            if seq.streaming and seq.pending_text and len(seq.pending_ids) >= interval:
                if deltas is not None:
                    self._emit_delta(seq, deltas)
                else:
                    self._emit(seq)
        num_tokens += len(seqs) - num_other
        self.stats.generated_tokens_total += num_tokens
        self.stats.recent_tokens.append((time.time(), num_tokens))

    def _on_sample(
        self, seq: Sequence, computed: int, token: int | None, results: dict[str, SeqResult]
    ) -> int:
        """The token a step sampled for seq: `token` from the result's columns or, with logprobs, its `results`."""
        seq.num_pending_samples -= 1
        logprob = None
        if token is None:
            result = results.get(seq.seq_id)
            if result is None:
                self._on_failure(seq, "internal", "worker returned no token")
                return 0
            token = result.token_id
            if seq.return_logprob:
                logprob = TokenLogprob(token, result.logprob, result.top_logprobs)
        elif seq.return_logprob:
            logprob = TokenLogprob(token, 0.0)  # what the columns carry: a logprob of 0, no alternatives
        if not seq.output_ids:
            self._cache_unfinished(seq, computed)
        self._on_token(seq, token, logprob)
        return 1

    def _on_failure(self, seq: Sequence, reason: str, message: str) -> None:
        if reason == "embedding_pending" and seq.status is SeqStatus.RUNNING:
            # the worker left it out of a step rather than stall the others: give the pull another step or two
            self.stats.embedding_deferrals += 1
            seq.req.prefetch_step = self._step_id
            self._release(seq, cache=True)
            self.running.remove(seq)
            seq.status = SeqStatus.WAITING
            self._enqueue(seq)
            return
        if reason == "embedding_missing" and seq.status is SeqStatus.RUNNING:
            logger.warning("%s: %s; re-encoding its images and recomputing", seq.seq_id, message)
            self._release(seq, cache=False)
            self.running.remove(seq)
            seq.status = SeqStatus.WAITING
            seq.req.images_ready.clear()
            self._enqueue(seq)
            return
        self.fail_request(seq.req.request_id, f"worker failed: {message or reason}")

    def _on_token(self, seq: Sequence, token: int, logprob: TokenLogprob | None) -> None:
        grammar_done = False
        if seq.matcher is not None:
            if not seq.matcher.consume_token(token):
                error = f"token {token} is outside the grammar: {seq.matcher.get_error()}"
                logger.error("%s: %s", seq.seq_id, error)
                self.fail_request(seq.request_id, error)
                return
            grammar_done = seq.matcher.is_stopped()  # complete, and nothing may follow but EOS
        seq.output_ids.append(token)
        n_out = len(seq.output_ids)
        reason: str | None = None
        check = n_out >= seq.min_new_tokens
        stream = seq.stream
        text = ""
        if check and token in seq.stop_token_ids:
            reason, seq.matched_stop = "stop", token
            if seq.no_stop_trim:
                text = stream.push_token(token, check_stop=False)
        else:
            text = stream.push_token(token, check_stop=check)
            if stream.matched_stop is not None:
                reason, seq.matched_stop = "stop", stream.matched_stop
        if reason is None and grammar_done:
            reason = "stop"
        if reason is None and (
            n_out >= seq.max_new_tokens or seq.num_prompt + n_out >= self.policy.context_length
        ):
            reason = "length"
        if text:
            seq.pending_text += text
        seq.pending_ids.append(token)
        if logprob is not None:
            seq.pending_logprobs.append(logprob)
        if reason is not None:
            self._finish(seq, reason, emit=True)
        elif (
            seq.streaming
            and (seq.pending_text or logprob is not None)
            and len(seq.pending_ids) >= self.policy.stream_interval
        ):
            if logprob is None and seq.deltas is not None:
                self._emit_delta(seq, seq.deltas)
            else:
                self._emit(seq)

    def _finish(self, seq: Sequence, reason: str, emit: bool, error: tuple[str, str] | None = None) -> None:
        if seq.status is not SeqStatus.FINISHED:
            if seq.status is SeqStatus.RUNNING:
                self.running.remove(seq)
                self._release(seq, cache=True)
            elif seq in self.waiting:
                self.waiting.remove(seq)
                self._release(seq, cache=False)
        seq.status = SeqStatus.FINISHED
        seq.plain_until = 0
        seq.finish_reason = reason
        if seq.matcher is not None:
            seq.matcher = None
            self._num_constrained -= 1
        if seq.stream.matched_stop is None:
            seq.pending_text += seq.stream.finish(
                check_stop=len(seq.output_ids) >= seq.req.request.stopping.min_new_tokens
            )
            if (
                seq.stream.matched_stop is not None and reason != "abort"
            ):  # a stop string in the held-back text
                seq.finish_reason, seq.matched_stop = "stop", seq.stream.matched_stop
        if emit:
            self._emit(seq, final=True, error=error)
        reasons = self.stats.finish_reasons
        reasons[seq.finish_reason] = reasons.get(seq.finish_reason, 0) + 1
        state = seq.req
        state.num_unfinished -= 1
        if state.num_unfinished == 0:
            self.requests.pop(state.request_id, None)
            if reason != "abort":
                self.stats.requests_finished += 1

    @staticmethod
    def _emit_delta(seq: Sequence, deltas: DeltaColumns) -> None:
        """_emit of a plain delta (no logprobs, not final) into the consumer's columns."""
        deltas.request_ids.append(seq.request_id)
        deltas.indexes.append(seq.index)
        deltas.texts.append(seq.pending_text)
        deltas.num_tokens.append(len(seq.pending_ids))
        deltas.token_ids += seq.pending_ids
        seq.pending_text = ""
        seq.pending_ids.clear()

    def _emit(self, seq: Sequence, final: bool = False, error: tuple[str, str] | None = None) -> None:
        req = seq.req
        out = GenerateOutput(seq.request_id, seq.index, seq.pending_text, seq.pending_ids)
        if not seq.prompt_lps_sent:
            seq.prompt_lps_sent = True
            out.prompt_logprobs = req.prompt_logprobs()
        if seq.pending_logprobs:
            out.logprobs, seq.pending_logprobs = seq.pending_logprobs, []
        seq.pending_text, seq.pending_ids = "", []
        if error is not None:
            out.error, out.error_code = error
        if final:
            out.finish_reason = seq.finish_reason
            out.matched_stop = seq.matched_stop
            out.prompt_tokens = req.num_prompt_tokens
            out.completion_tokens = len(seq.output_ids)
            out.cached_tokens = seq.cached_tokens or 0
        self.outputs.append(out)

    # ---- observability ----

    def snapshot(self) -> dict[str, int | float]:
        used = self.allocator.num_usable - self.allocator.num_free
        return {
            "num_running": len(self.running),
            "num_queued": len(self.waiting),
            "kv_pages_used": used,
            "kv_pages_total": self.allocator.num_usable,
            "kv_pages_cached": self.cache.num_evictable_pages,
            "page_size": self.policy.page_size,
            "encoder_pages_used": len(enc.pages) if (enc := self.encoder_pages) is not None else 0,
            "encoder_pages_total": max(0, self.policy.num_encoder_pages - 1),  # page 0 is never handed out
        }

    def _log_step(self, new_seqs: int, new_tokens: int, cached: int, decodes: int) -> None:
        if not new_seqs and not (decodes and self.stats.num_steps % self.policy.decode_log_interval == 0):
            return  # most steps log nothing: no snapshot to take
        snap = self.snapshot()
        usage = snap["kv_pages_used"] / max(1, snap["kv_pages_total"])
        if new_seqs:
            logger.info(
                "Prefill batch. #new-seq: %d, #new-token: %d, #cached-token: %d, token usage: %.2f, "
                "#running-req: %d, #queue-req: %d",
                new_seqs,
                new_tokens,
                cached,
                usage,
                snap["num_running"],
                snap["num_queued"],
            )
        elif decodes and self.stats.num_steps % self.policy.decode_log_interval == 0:
            logger.info(
                "Decode batch. #running-req: %d, #token: %d, token usage: %.2f, gen throughput (token/s): "
                "%.2f, #queue-req: %d",
                snap["num_running"],
                snap["kv_pages_used"] * self.policy.page_size,
                usage,
                self.stats.gen_throughput(),
                snap["num_queued"],
            )
