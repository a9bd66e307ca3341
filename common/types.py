"""Domain types of the step protocol and requests: plain dataclasses shared by the scheduler core, the worker
core and the in-process engine. Servicers convert them to and from protos; nothing here imports protobuf."""

from __future__ import annotations

from dataclasses import dataclass, field, replace


@dataclass(frozen=True)
class MultimodalItem:
    """A media span of a prompt. `data` (the fetched bytes) travels only gateway -> scheduler -> vision."""

    content_key: str
    offset: int
    num_tokens: int
    grid_thw: tuple[int, int, int]
    modality: str = "image"
    data: bytes = field(default=b"", repr=False, compare=False)

    @property
    def end(self) -> int:
        return self.offset + self.num_tokens

    def without_data(self) -> MultimodalItem:
        return MultimodalItem(self.content_key, self.offset, self.num_tokens, self.grid_thw, self.modality)


@dataclass(frozen=True)
class SamplingParams:
    temperature: float = 1.0
    top_p: float = 1.0
    top_k: int = 0
    min_p: float = 0.0
    seed: int | None = None
    presence_penalty: float = 0.0
    frequency_penalty: float = 0.0
    repetition_penalty: float = 1.0
    logit_bias: dict[int, float] = field(default_factory=dict)
    return_logprob: bool = False
    top_logprobs: int = 0
    min_tokens_suppress_ids: tuple[int, ...] = ()
    min_tokens: int = 0

    @property
    def greedy(self) -> bool:
        return self.temperature == 0.0 or self.top_k == 1

    @property
    def needs_prompt_ids(self) -> bool:
        return self.repetition_penalty != 1.0


@dataclass(frozen=True)
class StoppingCriteria:
    max_new_tokens: int = 16
    min_new_tokens: int = 0
    stop: tuple[str, ...] = ()
    stop_token_ids: tuple[int, ...] = ()
    ignore_eos: bool = False
    no_stop_trim: bool = False
    skip_special_tokens: bool = True


CONSTRAINT_KINDS = ("json_schema", "json_object", "regex", "ebnf", "lark")


@dataclass(frozen=True)
class Constraint:
    """A grammar the output must match: `kind` names the language of `text` (a JSON schema as JSON text, "" for
    json_object, a regex, an EBNF/GBNF grammar, or a Lark grammar in llguidance's dialect)."""

    kind: str
    text: str = ""

    def __post_init__(self) -> None:
        if self.kind not in CONSTRAINT_KINDS:
            raise ValueError(f"constraint kind {self.kind!r} is not one of {', '.join(CONSTRAINT_KINDS)}")


@dataclass(frozen=True)
class GenerateRequest:
    """A tokenized request as the scheduler receives it."""

    request_id: str
    input_ids: tuple[int, ...]
    mm_items: tuple[MultimodalItem, ...] = ()
    sampling: SamplingParams = field(default_factory=SamplingParams)
    stopping: StoppingCriteria = field(default_factory=StoppingCriteria)
    n: int = 1
    stream: bool = True
    cache_salt: str = ""  # prompts share prefix-cache pages only with prompts of the same salt
    logprob_start_len: int = -1  # prompt log-probabilities from this position on (-1: none)

    @property
    def prompt_logprob_from(self) -> int | None:
        """The first prompt position whose log-probability is computed (position 0 has none), or None."""
        start = self.logprob_start_len
        return max(start, 1) if 0 <= start < len(self.input_ids) and len(self.input_ids) > 1 else None

    constraint: Constraint | None = None  # structured output: every choice follows this grammar


@dataclass(frozen=True)
class TokenLogprob:
    token_id: int
    logprob: float
    top_logprobs: tuple[tuple[int, float], ...] = ()


@dataclass
class GenerateOutput:
    """One message of a choice's result stream (a delta when streaming)."""

    request_id: str
    index: int
    text: str = ""
    token_ids: list[int] = field(default_factory=list)
    finish_reason: str | None = None  # "stop" | "length" | "abort"
    matched_stop: str | int | None = None
    prompt_tokens: int = 0
    completion_tokens: int = 0
    cached_tokens: int = 0
    logprobs: list[TokenLogprob] = field(default_factory=list)
    # on a choice's first output, with logprob_start_len: positions max(start, 1) .. end of the prompt
    prompt_logprobs: list[TokenLogprob] = field(default_factory=list)
    error: str | None = None
    error_code: str = "internal"  # "invalid_argument" | "unavailable" | "resource_exhausted" | "internal"


class DeltaColumns:
    """Plain streamed deltas (text and ids, no finish, logprobs or error) of every choice bound for one consumer,
    in columns: the scheduler appends a delta as five list appends instead of building a GenerateOutput, and a
    Connect stream copies the columns into its OutputBatch whole. Entry i is choice `indexes[i]` of request
    `request_ids[i]`: `texts[i]` and the next `num_tokens[i]` ids of `token_ids`."""

    __slots__ = ("request_ids", "indexes", "texts", "num_tokens", "token_ids")

    def __init__(self) -> None:
        self.request_ids: list[str] = []
        self.indexes: list[int] = []
        self.texts: list[str] = []
        self.num_tokens: list[int] = []
        self.token_ids: list[int] = []

    def __len__(self) -> int:
        return len(self.request_ids)

    def take(self) -> DeltaColumns:
        """What is here, as a new object; this one is left empty (its producers keep appending to it)."""
        taken = DeltaColumns()
        taken.request_ids, self.request_ids = self.request_ids, taken.request_ids
        taken.indexes, self.indexes = self.indexes, taken.indexes
        taken.texts, self.texts = self.texts, taken.texts
        taken.num_tokens, self.num_tokens = self.num_tokens, taken.num_tokens
        taken.token_ids, self.token_ids = self.token_ids, taken.token_ids
        return taken

    def outputs(self) -> list[GenerateOutput]:
        """The entries as GenerateOutputs, in order."""
        outs, end = [], 0
        for rid, index, text, n in zip(
            self.request_ids, self.indexes, self.texts, self.num_tokens, strict=True
        ):
            outs.append(GenerateOutput(rid, index, text, self.token_ids[end : end + n]))
            end += n
        return outs


# ---- the scheduler <-> worker step protocol ----


@dataclass(frozen=True)
class SeqInit:
    mm_items: tuple[MultimodalItem, ...]
    sampling: SamplingParams
    num_prompt_tokens: int
    prompt_token_ids: tuple[int, ...] = ()
    output_token_ids: tuple[int, ...] = ()
    encoder_page_ids: tuple[
        int, ...
    ] = ()  # one encoder-cache page per image (families with an encoder cache)


@dataclass(frozen=True, init=False)
class SeqStep:
    seq_id: str
    start_pos: int
    input_ids: tuple[int, ...] = ()  # empty: one token, the worker's last sample for this sequence
    sample: bool = True
    page_table_start: int = 0
    page_ids: tuple[int, ...] = ()
    init: SeqInit | None = None
    # prompt log-probabilities: rows logprob_row_start + i of this chunk score logprob_targets[i]
    logprob_row_start: int = 0
    logprob_targets: tuple[int, ...] = ()

    def __init__(
        self,
        seq_id: str,
        start_pos: int,
        input_ids: tuple[int, ...] = (),
        sample: bool = True,
        page_table_start: int = 0,
        page_ids: tuple[int, ...] = (),
        init: SeqInit | None = None,
        logprob_row_start: int = 0,
        logprob_targets: tuple[int, ...] = (),
    ) -> None:
        # the fields as declared above (a test compares them): written into __dict__, because a frozen dataclass's
        # generated __init__ calls object.__setattr__ once per field (~2x slower), and rows are built per step
        d = self.__dict__
        d["seq_id"] = seq_id
        d["start_pos"] = start_pos
        d["input_ids"] = input_ids
        d["sample"] = sample
        d["page_table_start"] = page_table_start
        d["page_ids"] = page_ids
        d["init"] = init
        d["logprob_row_start"] = logprob_row_start
        d["logprob_targets"] = logprob_targets

    @property
    def num_tokens(self) -> int:
        return len(self.input_ids) or 1


@dataclass(frozen=True)
class StepPlan:
    step_id: int
    seqs: tuple[SeqStep, ...]
    free_seq_ids: tuple[str, ...] = ()
    sent_unix_ns: int = 0
    prefetch_keys: tuple[str, ...] = ()  # images whose embeddings the worker starts pulling now
    # plain decodes after `seqs`, in columns: SeqStep(decode_seq_ids[i], decode_start_pos[i]) each
    decode_seq_ids: tuple[str, ...] = ()
    decode_start_pos: tuple[int, ...] = ()
    # leases on prefetch_keys' rows in the vision service's pool: copied from there (no pull), always released
    prefetch_leases: tuple[EmbeddingLease, ...] = ()
    # grammar-constrained sequences that sample in this step, and their allowed-token bitmasks: int32 words,
    # little-endian, ceil(vocab / 32) a row, one row per id in order
    mask_seq_ids: tuple[str, ...] = ()
    token_bitmask: bytes = field(default=b"", repr=False)

    @property
    def num_tokens(self) -> int:
        return sum(s.num_tokens for s in self.seqs) + len(self.decode_seq_ids)

    def expanded(self) -> StepPlan:
        """The same step with its plain decodes as SeqSteps at the end of `seqs`."""
        if not self.decode_seq_ids:
            return self
        decodes = (SeqStep(i, p) for i, p in zip(self.decode_seq_ids, self.decode_start_pos, strict=True))
        return replace(self, seqs=(*self.seqs, *decodes), decode_seq_ids=(), decode_start_pos=())


@dataclass(frozen=True)
class SeqResult:
    seq_id: str
    token_id: int
    logprob: float = 0.0
    top_logprobs: tuple[tuple[int, float], ...] = ()


@dataclass(frozen=True)
class PromptLogprobs:
    """The log-probabilities of one chunk's logprob_targets, with each row's top alternatives."""

    seq_id: str
    logprobs: tuple[float, ...]
    top_logprobs: tuple[tuple[tuple[int, float], ...], ...] = ()

    def entries(self, targets: tuple[int, ...] | list[int]) -> list[TokenLogprob]:
        tops = self.top_logprobs or ((),) * len(self.logprobs)
        return [TokenLogprob(t, lp, top) for t, lp, top in zip(targets, self.logprobs, tops, strict=True)]


@dataclass(frozen=True)
class SeqFailure:
    seq_id: str
    reason: str  # "embedding_missing" | "internal"
    message: str = ""


@dataclass(frozen=True)
class StepOutput:
    step_id: int
    results: tuple[SeqResult, ...]
    failures: tuple[SeqFailure, ...] = ()
    num_tokens: int = 0
    prepare_ns: int = 0
    forward_ns: int = 0
    start_unix_ns: int = 0
    end_unix_ns: int = 0
    # tokens without logprobs may come in columns instead of `results`: sampled_token_ids[i] for sampled_seq_ids[i]
    sampled_seq_ids: tuple[str, ...] = ()
    sampled_token_ids: tuple[int, ...] = ()
    prompt_logprobs: tuple[PromptLogprobs, ...] = ()

    def sampled(self) -> list[tuple[str, int]]:
        """(sequence id, token) of every token sampled, columns first."""
        columns = zip(self.sampled_seq_ids, self.sampled_token_ids, strict=True)
        return [*columns, *((r.seq_id, r.token_id) for r in self.results)]


@dataclass(frozen=True)
class WorkerInfo:
    architecture: str
    num_pages: int
    page_size: int
    context_length: int
    vocab_size: int
    dtype: str
    device: str
    tp_rank: int = 0
    tp_size: int = 1
    kv_cache_bytes: int = 0
    attention_backend: str = ""
    max_running_requests: int = 0  # 0: no limit of the worker's own
    embedding_transport: str = ""  # cuda_ipc, shared_memory, grpc, in_process; "" without images
    epoch: int = 0  # drawn at random when the worker process starts: a new value means its KV cache is new
    num_encoder_pages: int = 0  # encoder-cache pages, one image each (page 0 included); 0: no encoder cache
    encoder_page_tokens: int = 0  # encoder rows per page (max_num_tiles x tokens per tile)
    step_socket: str = ""  # a Unix socket serving the step stream here (common/local_stream.py); "": off


def new_epoch() -> int:
    """A process identity: another value after every restart (63 random bits)."""
    import secrets

    return secrets.randbits(63) or 1


@dataclass(frozen=True)
class EncodedItem:
    content_key: str
    num_tokens: int
    cache_hit: bool
    encode_ns: int = 0


@dataclass(frozen=True)
class EmbeddingLocation:
    """An embedding's rows [num_rows, hidden] in the vision service's pool, page by page."""

    content_key: str
    page_ids: tuple[int, ...]
    num_rows: int
    # 0: the rows are in the pool; k > 0: they are still being written, and a reader first waits (on its device)
    # for the pool's ready event k - 1 (vision.v1.SharedPool.ready_event_handles)
    ready_event: int = 0


@dataclass(frozen=True)
class EmbeddingLease:
    """Embeddings pinned in pool `pool_id` until lease `lease_id` is released (or expires). The vision service
    grants it with an encode; the scheduler hands it to the worker, which copies the rows and releases it."""

    pool_id: str
    lease_id: int
    locations: tuple[EmbeddingLocation, ...]
