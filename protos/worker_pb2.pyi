from protos import common_pb2 as _common_pb2
from google.protobuf.internal import containers as _containers
from google.protobuf.internal import enum_type_wrapper as _enum_type_wrapper
from google.protobuf import descriptor as _descriptor
from google.protobuf import message as _message
from collections.abc import Iterable as _Iterable, Mapping as _Mapping
from typing import ClassVar as _ClassVar, Optional as _Optional, Union as _Union

DESCRIPTOR: _descriptor.FileDescriptor

class FailureReason(int, metaclass=_enum_type_wrapper.EnumTypeWrapper):
    __slots__ = ()
    FAILURE_REASON_UNSPECIFIED: _ClassVar[FailureReason]
    FAILURE_REASON_EMBEDDING_MISSING: _ClassVar[FailureReason]
    FAILURE_REASON_INTERNAL: _ClassVar[FailureReason]
    FAILURE_REASON_EMBEDDING_PENDING: _ClassVar[FailureReason]
FAILURE_REASON_UNSPECIFIED: FailureReason
FAILURE_REASON_EMBEDDING_MISSING: FailureReason
FAILURE_REASON_INTERNAL: FailureReason
FAILURE_REASON_EMBEDDING_PENDING: FailureReason

class GetInfoRequest(_message.Message):
    __slots__ = ()
    def __init__(self) -> None: ...

class WorkerInfo(_message.Message):
    __slots__ = ("architecture", "num_pages", "page_size", "context_length", "vocab_size", "dtype", "device", "tp_rank", "tp_size", "kv_cache_bytes", "attention_backend", "max_running_requests", "embedding_transport", "epoch", "num_encoder_pages", "encoder_page_tokens", "step_socket")
    ARCHITECTURE_FIELD_NUMBER: _ClassVar[int]
    NUM_PAGES_FIELD_NUMBER: _ClassVar[int]
    PAGE_SIZE_FIELD_NUMBER: _ClassVar[int]
    CONTEXT_LENGTH_FIELD_NUMBER: _ClassVar[int]
    VOCAB_SIZE_FIELD_NUMBER: _ClassVar[int]
    DTYPE_FIELD_NUMBER: _ClassVar[int]
    DEVICE_FIELD_NUMBER: _ClassVar[int]
    TP_RANK_FIELD_NUMBER: _ClassVar[int]
    TP_SIZE_FIELD_NUMBER: _ClassVar[int]
    KV_CACHE_BYTES_FIELD_NUMBER: _ClassVar[int]
    ATTENTION_BACKEND_FIELD_NUMBER: _ClassVar[int]
    MAX_RUNNING_REQUESTS_FIELD_NUMBER: _ClassVar[int]
    EMBEDDING_TRANSPORT_FIELD_NUMBER: _ClassVar[int]
    EPOCH_FIELD_NUMBER: _ClassVar[int]
    NUM_ENCODER_PAGES_FIELD_NUMBER: _ClassVar[int]
    ENCODER_PAGE_TOKENS_FIELD_NUMBER: _ClassVar[int]
    STEP_SOCKET_FIELD_NUMBER: _ClassVar[int]
    architecture: str
    num_pages: int
    page_size: int
    context_length: int
    vocab_size: int
    dtype: str
    device: str
    tp_rank: int
    tp_size: int
    kv_cache_bytes: int
    attention_backend: str
    max_running_requests: int
    embedding_transport: str
    epoch: int
    num_encoder_pages: int
    encoder_page_tokens: int
    step_socket: str
    def __init__(self, architecture: _Optional[str] = ..., num_pages: _Optional[int] = ..., page_size: _Optional[int] = ..., context_length: _Optional[int] = ..., vocab_size: _Optional[int] = ..., dtype: _Optional[str] = ..., device: _Optional[str] = ..., tp_rank: _Optional[int] = ..., tp_size: _Optional[int] = ..., kv_cache_bytes: _Optional[int] = ..., attention_backend: _Optional[str] = ..., max_running_requests: _Optional[int] = ..., embedding_transport: _Optional[str] = ..., epoch: _Optional[int] = ..., num_encoder_pages: _Optional[int] = ..., encoder_page_tokens: _Optional[int] = ..., step_socket: _Optional[str] = ...) -> None: ...

class SequenceInit(_message.Message):
    __slots__ = ("mm_items", "sampling", "num_prompt_tokens", "prompt_token_ids", "output_token_ids", "encoder_page_ids")
    MM_ITEMS_FIELD_NUMBER: _ClassVar[int]
    SAMPLING_FIELD_NUMBER: _ClassVar[int]
    NUM_PROMPT_TOKENS_FIELD_NUMBER: _ClassVar[int]
    PROMPT_TOKEN_IDS_FIELD_NUMBER: _ClassVar[int]
    OUTPUT_TOKEN_IDS_FIELD_NUMBER: _ClassVar[int]
    ENCODER_PAGE_IDS_FIELD_NUMBER: _ClassVar[int]
    mm_items: _containers.RepeatedCompositeFieldContainer[_common_pb2.MultimodalItem]
    sampling: _common_pb2.SamplingParams
    num_prompt_tokens: int
    prompt_token_ids: _containers.RepeatedScalarFieldContainer[int]
    output_token_ids: _containers.RepeatedScalarFieldContainer[int]
    encoder_page_ids: _containers.RepeatedScalarFieldContainer[int]
    def __init__(self, mm_items: _Optional[_Iterable[_Union[_common_pb2.MultimodalItem, _Mapping]]] = ..., sampling: _Optional[_Union[_common_pb2.SamplingParams, _Mapping]] = ..., num_prompt_tokens: _Optional[int] = ..., prompt_token_ids: _Optional[_Iterable[int]] = ..., output_token_ids: _Optional[_Iterable[int]] = ..., encoder_page_ids: _Optional[_Iterable[int]] = ...) -> None: ...

class SequenceStep(_message.Message):
    __slots__ = ("seq_id", "init", "page_table_start", "page_ids", "start_pos", "input_ids", "sample", "logprob_row_start", "logprob_targets")
    SEQ_ID_FIELD_NUMBER: _ClassVar[int]
    INIT_FIELD_NUMBER: _ClassVar[int]
    PAGE_TABLE_START_FIELD_NUMBER: _ClassVar[int]
    PAGE_IDS_FIELD_NUMBER: _ClassVar[int]
    START_POS_FIELD_NUMBER: _ClassVar[int]
    INPUT_IDS_FIELD_NUMBER: _ClassVar[int]
    SAMPLE_FIELD_NUMBER: _ClassVar[int]
    LOGPROB_ROW_START_FIELD_NUMBER: _ClassVar[int]
    LOGPROB_TARGETS_FIELD_NUMBER: _ClassVar[int]
    seq_id: str
    init: SequenceInit
    page_table_start: int
    page_ids: _containers.RepeatedScalarFieldContainer[int]
    start_pos: int
    input_ids: _containers.RepeatedScalarFieldContainer[int]
    sample: bool
    logprob_row_start: int
    logprob_targets: _containers.RepeatedScalarFieldContainer[int]
    def __init__(self, seq_id: _Optional[str] = ..., init: _Optional[_Union[SequenceInit, _Mapping]] = ..., page_table_start: _Optional[int] = ..., page_ids: _Optional[_Iterable[int]] = ..., start_pos: _Optional[int] = ..., input_ids: _Optional[_Iterable[int]] = ..., sample: _Optional[bool] = ..., logprob_row_start: _Optional[int] = ..., logprob_targets: _Optional[_Iterable[int]] = ...) -> None: ...

class StepRequest(_message.Message):
    __slots__ = ("step_id", "free_seq_ids", "seqs", "sent_unix_ns", "prefetch_keys", "decode_seq_ids", "decode_start_pos", "prefetch_leases", "mask_seq_ids", "token_bitmask", "page_decode_seq_ids", "page_decode_start_pos", "page_decode_table_start", "page_decode_page_ids")
    STEP_ID_FIELD_NUMBER: _ClassVar[int]
    FREE_SEQ_IDS_FIELD_NUMBER: _ClassVar[int]
    SEQS_FIELD_NUMBER: _ClassVar[int]
    SENT_UNIX_NS_FIELD_NUMBER: _ClassVar[int]
    PREFETCH_KEYS_FIELD_NUMBER: _ClassVar[int]
    DECODE_SEQ_IDS_FIELD_NUMBER: _ClassVar[int]
    DECODE_START_POS_FIELD_NUMBER: _ClassVar[int]
    PREFETCH_LEASES_FIELD_NUMBER: _ClassVar[int]
    MASK_SEQ_IDS_FIELD_NUMBER: _ClassVar[int]
    TOKEN_BITMASK_FIELD_NUMBER: _ClassVar[int]
    PAGE_DECODE_SEQ_IDS_FIELD_NUMBER: _ClassVar[int]
    PAGE_DECODE_START_POS_FIELD_NUMBER: _ClassVar[int]
    PAGE_DECODE_TABLE_START_FIELD_NUMBER: _ClassVar[int]
    PAGE_DECODE_PAGE_IDS_FIELD_NUMBER: _ClassVar[int]
    step_id: int
    free_seq_ids: _containers.RepeatedScalarFieldContainer[str]
    seqs: _containers.RepeatedCompositeFieldContainer[SequenceStep]
    sent_unix_ns: int
    prefetch_keys: _containers.RepeatedScalarFieldContainer[str]
    decode_seq_ids: _containers.RepeatedScalarFieldContainer[str]
    decode_start_pos: _containers.RepeatedScalarFieldContainer[int]
    prefetch_leases: _containers.RepeatedCompositeFieldContainer[_common_pb2.EmbeddingLease]
    mask_seq_ids: _containers.RepeatedScalarFieldContainer[str]
    token_bitmask: bytes
    page_decode_seq_ids: _containers.RepeatedScalarFieldContainer[str]
    page_decode_start_pos: _containers.RepeatedScalarFieldContainer[int]
    page_decode_table_start: _containers.RepeatedScalarFieldContainer[int]
    page_decode_page_ids: _containers.RepeatedScalarFieldContainer[int]
    def __init__(self, step_id: _Optional[int] = ..., free_seq_ids: _Optional[_Iterable[str]] = ..., seqs: _Optional[_Iterable[_Union[SequenceStep, _Mapping]]] = ..., sent_unix_ns: _Optional[int] = ..., prefetch_keys: _Optional[_Iterable[str]] = ..., decode_seq_ids: _Optional[_Iterable[str]] = ..., decode_start_pos: _Optional[_Iterable[int]] = ..., prefetch_leases: _Optional[_Iterable[_Union[_common_pb2.EmbeddingLease, _Mapping]]] = ..., mask_seq_ids: _Optional[_Iterable[str]] = ..., token_bitmask: _Optional[bytes] = ..., page_decode_seq_ids: _Optional[_Iterable[str]] = ..., page_decode_start_pos: _Optional[_Iterable[int]] = ..., page_decode_table_start: _Optional[_Iterable[int]] = ..., page_decode_page_ids: _Optional[_Iterable[int]] = ...) -> None: ...

class SequenceResult(_message.Message):
    __slots__ = ("seq_id", "token_id", "logprob", "top_logprobs")
    SEQ_ID_FIELD_NUMBER: _ClassVar[int]
    TOKEN_ID_FIELD_NUMBER: _ClassVar[int]
    LOGPROB_FIELD_NUMBER: _ClassVar[int]
    TOP_LOGPROBS_FIELD_NUMBER: _ClassVar[int]
    seq_id: str
    token_id: int
    logprob: float
    top_logprobs: _containers.RepeatedCompositeFieldContainer[_common_pb2.TopLogprob]
    def __init__(self, seq_id: _Optional[str] = ..., token_id: _Optional[int] = ..., logprob: _Optional[float] = ..., top_logprobs: _Optional[_Iterable[_Union[_common_pb2.TopLogprob, _Mapping]]] = ...) -> None: ...

class SequenceFailure(_message.Message):
    __slots__ = ("seq_id", "reason", "message")
    SEQ_ID_FIELD_NUMBER: _ClassVar[int]
    REASON_FIELD_NUMBER: _ClassVar[int]
    MESSAGE_FIELD_NUMBER: _ClassVar[int]
    seq_id: str
    reason: FailureReason
    message: str
    def __init__(self, seq_id: _Optional[str] = ..., reason: _Optional[_Union[FailureReason, str]] = ..., message: _Optional[str] = ...) -> None: ...

class StepResult(_message.Message):
    __slots__ = ("step_id", "results", "failures", "num_tokens", "prepare_ns", "forward_ns", "start_unix_ns", "end_unix_ns", "sampled_seq_ids", "sampled_token_ids", "prompt_logprobs")
    STEP_ID_FIELD_NUMBER: _ClassVar[int]
    RESULTS_FIELD_NUMBER: _ClassVar[int]
    FAILURES_FIELD_NUMBER: _ClassVar[int]
    NUM_TOKENS_FIELD_NUMBER: _ClassVar[int]
    PREPARE_NS_FIELD_NUMBER: _ClassVar[int]
    FORWARD_NS_FIELD_NUMBER: _ClassVar[int]
    START_UNIX_NS_FIELD_NUMBER: _ClassVar[int]
    END_UNIX_NS_FIELD_NUMBER: _ClassVar[int]
    SAMPLED_SEQ_IDS_FIELD_NUMBER: _ClassVar[int]
    SAMPLED_TOKEN_IDS_FIELD_NUMBER: _ClassVar[int]
    PROMPT_LOGPROBS_FIELD_NUMBER: _ClassVar[int]
    step_id: int
    results: _containers.RepeatedCompositeFieldContainer[SequenceResult]
    failures: _containers.RepeatedCompositeFieldContainer[SequenceFailure]
    num_tokens: int
    prepare_ns: int
    forward_ns: int
    start_unix_ns: int
    end_unix_ns: int
    sampled_seq_ids: _containers.RepeatedScalarFieldContainer[str]
    sampled_token_ids: _containers.RepeatedScalarFieldContainer[int]
    prompt_logprobs: _containers.RepeatedCompositeFieldContainer[PromptLogprobs]
    def __init__(self, step_id: _Optional[int] = ..., results: _Optional[_Iterable[_Union[SequenceResult, _Mapping]]] = ..., failures: _Optional[_Iterable[_Union[SequenceFailure, _Mapping]]] = ..., num_tokens: _Optional[int] = ..., prepare_ns: _Optional[int] = ..., forward_ns: _Optional[int] = ..., start_unix_ns: _Optional[int] = ..., end_unix_ns: _Optional[int] = ..., sampled_seq_ids: _Optional[_Iterable[str]] = ..., sampled_token_ids: _Optional[_Iterable[int]] = ..., prompt_logprobs: _Optional[_Iterable[_Union[PromptLogprobs, _Mapping]]] = ...) -> None: ...

class PromptLogprobs(_message.Message):
    __slots__ = ("seq_id", "logprobs", "num_top", "top_token_ids", "top_logprobs")
    SEQ_ID_FIELD_NUMBER: _ClassVar[int]
    LOGPROBS_FIELD_NUMBER: _ClassVar[int]
    NUM_TOP_FIELD_NUMBER: _ClassVar[int]
    TOP_TOKEN_IDS_FIELD_NUMBER: _ClassVar[int]
    TOP_LOGPROBS_FIELD_NUMBER: _ClassVar[int]
    seq_id: str
    logprobs: _containers.RepeatedScalarFieldContainer[float]
    num_top: int
    top_token_ids: _containers.RepeatedScalarFieldContainer[int]
    top_logprobs: _containers.RepeatedScalarFieldContainer[float]
    def __init__(self, seq_id: _Optional[str] = ..., logprobs: _Optional[_Iterable[float]] = ..., num_top: _Optional[int] = ..., top_token_ids: _Optional[_Iterable[int]] = ..., top_logprobs: _Optional[_Iterable[float]] = ...) -> None: ...
