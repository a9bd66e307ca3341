"""Per-request and per-choice state of the scheduler: token ids, cache keys, pages, progress and output text."""

from __future__ import annotations

import enum
import hashlib
from collections.abc import Iterable
from dataclasses import dataclass, field

from common.types import DeltaColumns, GenerateRequest, MultimodalItem, PromptLogprobs, TokenLogprob
from processor.text_stream import TextStream
from scheduler_svc.radix_cache import TreeNode


class SeqStatus(enum.Enum):
    WAITING = "waiting"
    RUNNING = "running"
    FINISHED = "finished"


def image_key_value(content_key: str) -> int:
    """The value every placeholder token of an image takes in prefix-cache keys: negative, so it never equals a
    token id, and 63 bits of a hash of the content key, so different images never share cache."""
    digest = hashlib.blake2b(content_key.encode(), digest_size=8).digest()
    return -(int.from_bytes(digest, "little") >> 1) - 1


def cache_key(
    input_ids: list[int],
    mm_items: tuple[MultimodalItem, ...],
    salt: str = "",
    images_from_start: bool = False,
) -> list[int]:
    """The prompt's prefix-cache key. A salt (a tenant's cache_salt) replaces the first token by a value of the salt
    and that token, so the whole path from the root differs and no page is shared with another salt's prompts;
    its images' values are salted too, which keeps them apart even where a key is compared from an image on.
    `images_from_start` (Llama 3.2 Vision): every token's KV depends on all the prompt's images (a token before
    the first image still attends over them in the cross layers, and a prompt without images skips those layers),
    so the first value is made from all of them and only prompts with the same images in order share pages."""
    key = list(input_ids)
    for item in mm_items:
        value = image_key_value(f"{salt}\0{item.content_key}" if salt else item.content_key)
        key[item.offset : item.end] = [value] * item.num_tokens
    if images_from_start and mm_items and key:
        images = "\0".join(m.content_key for m in mm_items)
        key[0] = image_key_value(f"images\0{images}\0{key[0]}")
    if salt and key:
        key[0] = image_key_value(f"salt\0{salt}\0{key[0]}")
    return key


@dataclass
class RequestState:
    request: GenerateRequest
    arrival: float
    prompt_key: list[int]
    seqs: list[Sequence] = field(default_factory=list)
    images_ready: set[str] = field(default_factory=set)
    encoding: bool = False
    prefetch_step: int | None = None  # the step that told the worker to pull this request's embeddings
    num_unfinished: int = 0
    error: str | None = None
    prompt_lps: dict[int, TokenLogprob] = field(default_factory=dict)  # position -> its prompt logprob
    grammar_pending: bool = False  # its constraint is compiling: not admitted until it is ready

    @property
    def request_id(self) -> str:
        return self.request.request_id

    @property
    def num_prompt_tokens(self) -> int:
        return len(self.request.input_ids)

    # ---- prompt log-probabilities (logprob_start_len) ----

    @property
    def needs_prompt_lps(self) -> bool:
        """Prompt log-probabilities were asked for and some are not computed yet: a prefill must compute every
        position from the first one asked (so the prefix cache may serve only the tokens before it)."""
        first = self.request.prompt_logprob_from
        return first is not None and len(self.prompt_lps) < self.num_prompt_tokens - first

    def prompt_lp_rows(self, start: int, n: int) -> tuple[int, tuple[int, ...]]:
        """For a prefill chunk of positions [start, start + n): the first row (of the chunk) that scores a prompt
        token, and the tokens those rows score (row r predicts position start + r + 1)."""
        first = self.request.prompt_logprob_from
        if first is None or not self.needs_prompt_lps:
            return 0, ()
        a, b = max(start, first - 1), min(start + n, self.num_prompt_tokens - 1)
        if a >= b:
            return 0, ()
        return a - start, tuple(self.request.input_ids[a + 1 : b + 1])

    def add_prompt_lps(self, first_pos: int, result: PromptLogprobs) -> None:
        targets = self.request.input_ids[first_pos : first_pos + len(result.logprobs)]
        for i, entry in enumerate(result.entries(targets)):
            self.prompt_lps.setdefault(first_pos + i, entry)

    def prompt_logprobs(self) -> list[TokenLogprob]:
        """Positions max(logprob_start_len, 1) to the prompt's end, once all are computed (else empty)."""
        first = self.request.prompt_logprob_from
        if first is None or self.needs_prompt_lps:
            return []
        return [self.prompt_lps[p] for p in range(first, self.num_prompt_tokens)]


class Sequence:
    """One choice of a request: the unit the worker computes."""

    # slots: a compact object. The fields that planning and applying a plain decode read and write come first, so
    # that they share a few cache lines (the batch's sequences are cold again after each device step)
    __slots__ = (
        "num_computed",
        "num_pending_samples",
        "plain_until",
        "last_step",
        "epoch",
        "seq_id",
        "status",
        "num_confirmed",
        "output_ids",
        "output_limit",
        "matcher",
        "return_logprob",
        "stop_token_ids",
        "detok",
        "deltas",
        "pending_ids",
        "request_id",
        "index",
        "req",
        "min_new_tokens",
        "max_new_tokens",
        "no_stop_trim",
        "streaming",
        "num_prompt",
        "page_ids",
        "table_dirty_from",
        "tree_node",
        "num_tree_pages",
        "worker_has_state",
        "encoder_keys",
        "encoder_page_ids",
        "cached_tokens",
        "stream",
        "finish_reason",
        "matched_stop",
        "pending_text",
        "pending_logprobs",
        "preempted_in_step",
        "prompt_lps_sent",
    )

    def __init__(self, req: RequestState, index: int, stream: TextStream, eos_token_ids: Iterable[int] = ()):
        self.req = req
        self.index = index
        self.request_id = req.request_id
        self.seq_id = f"{req.request_id}#{index}"
        # the request's stop conditions, read once per token
        stop = req.request.stopping
        self.min_new_tokens = stop.min_new_tokens
        self.max_new_tokens = stop.max_new_tokens
        self.no_stop_trim = stop.no_stop_trim
        self.stop_token_ids = frozenset(stop.stop_token_ids).union(() if stop.ignore_eos else eos_token_ids)
        self.streaming = req.request.stream
        self.return_logprob = req.request.sampling.return_logprob
        self.last_step = -1  # the step that last scheduled it
        self.num_prompt = len(req.request.input_ids)
        self.output_ids: list[int] = []
        self.status = SeqStatus.WAITING
        self.epoch = 0  # bumped when in-flight steps of this sequence must be ignored (preempted, reset)
        self.num_computed = 0  # tokens whose KV is written by steps already sent
        self.num_confirmed = 0  # tokens whose KV is written by steps whose results were processed
        self.num_pending_samples = 0  # sent steps that will sample a token for this sequence
        self.page_ids: list[int] = []
        self.table_dirty_from = 0  # lowest page-table index the worker has not seen yet
        self.tree_node: TreeNode | None = None
        self.num_tree_pages = 0  # leading pages owned by the prefix cache (locked through tree_node)
        self.worker_has_state = False
        self.encoder_keys: list[
            str
        ] = []  # image keys whose encoder pages it holds (families with an encoder cache)
        self.encoder_page_ids: list[int] = []  # their pages, in prompt order
        self.cached_tokens: int | None = None  # prefix-cache hit at first admission (usage)
        self.stream = stream
        # with no stop strings TextStream.push_token is its detokenizer's add_token: the hot loop calls that
        self.detok = stream.detok if not stream.stop else None
        self.finish_reason: str | None = None
        self.matched_stop: str | int | None = None
        self.pending_text = ""  # non-streaming: text accumulated until the end
        self.pending_ids: list[int] = []
        self.pending_logprobs: list[TokenLogprob] = []
        self.preempted_in_step = -1
        # its first output carried the prompt log-probabilities (none asked for: nothing to carry)
        self.prompt_lps_sent = req.request.prompt_logprob_from is None
        self.deltas: DeltaColumns | None = None  # where its plain streamed deltas go (else to the outputs)
        # output tokens at which it ends by length; the scheduler lowers it to what the context leaves
        self.output_limit = self.max_new_tokens
        # grammar-constrained decoding: the llguidance matcher, advanced by every accepted output token; the
        # sequence samples only once its previous token is known (the mask depends on it)
        self.matcher = None
        # the planner's shortcut (Scheduler._plan_running): while num_computed < plain_until and a sample is in
        # flight, its next step is a plain decode, known without re-checking every condition; 0 when unknown.
        # Set where a plain decode was checked in full; reset to 0 by every change that could end that (pages,
        # page table, worker state, status, grammar), so a stale bound never plans a wrong step.
        self.plain_until = 0

    @property
    def token_ids(self) -> list[int]:
        """Prompt and outputs: built when asked (a prompt chunk, preemption), so a token costs one list append."""
        return [*self.req.request.input_ids, *self.output_ids]

    @property
    def num_tokens(self) -> int:
        return self.num_prompt + len(self.output_ids)

    @property
    def key(self) -> list[int]:
        """The prefix-cache key of its tokens: the prompt's (images and salt as their values), then its outputs;
        built when asked (admission, caching), so a token costs no third list append."""
        return self.req.prompt_key + self.output_ids

    @property
    def prefill_done(self) -> bool:
        return self.num_computed >= self.num_prompt + len(self.output_ids)

    @property
    def in_prompt(self) -> bool:
        """More than its last sampled token is left to compute (a prompt, or a recompute after preemption)."""
        return self.num_computed < self.num_prompt + len(self.output_ids) - (1 if self.output_ids else 0)

    @property
    def arrival(self) -> tuple[float, int]:
        return (self.req.arrival, self.index)

    @property
    def is_finished(self) -> bool:
        return self.status is SeqStatus.FINISHED
