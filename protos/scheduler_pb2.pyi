from protos import common_pb2 as _common_pb2
from google.protobuf.internal import containers as _containers
from google.protobuf.internal import enum_type_wrapper as _enum_type_wrapper
from google.protobuf import descriptor as _descriptor
from google.protobuf import message as _message
from collections.abc import Iterable as _Iterable, Mapping as _Mapping
from typing import ClassVar as _ClassVar, Optional as _Optional, Union as _Union

DESCRIPTOR: _descriptor.FileDescriptor

class FinishReason(int, metaclass=_enum_type_wrapper.EnumTypeWrapper):
    __slots__ = ()
    FINISH_REASON_UNSPECIFIED: _ClassVar[FinishReason]
    FINISH_REASON_STOP: _ClassVar[FinishReason]
    FINISH_REASON_LENGTH: _ClassVar[FinishReason]
    FINISH_REASON_ABORT: _ClassVar[FinishReason]
FINISH_REASON_UNSPECIFIED: FinishReason
FINISH_REASON_STOP: FinishReason
FINISH_REASON_LENGTH: FinishReason
FINISH_REASON_ABORT: FinishReason

class StoppingCriteria(_message.Message):
    __slots__ = ("max_new_tokens", "min_new_tokens", "stop", "stop_token_ids", "ignore_eos", "no_stop_trim", "skip_special_tokens")
    MAX_NEW_TOKENS_FIELD_NUMBER: _ClassVar[int]
    MIN_NEW_TOKENS_FIELD_NUMBER: _ClassVar[int]
    STOP_FIELD_NUMBER: _ClassVar[int]
    STOP_TOKEN_IDS_FIELD_NUMBER: _ClassVar[int]
    IGNORE_EOS_FIELD_NUMBER: _ClassVar[int]
    NO_STOP_TRIM_FIELD_NUMBER: _ClassVar[int]
    SKIP_SPECIAL_TOKENS_FIELD_NUMBER: _ClassVar[int]
    max_new_tokens: int
    min_new_tokens: int
    stop: _containers.RepeatedScalarFieldContainer[str]
    stop_token_ids: _containers.RepeatedScalarFieldContainer[int]
    ignore_eos: bool
    no_stop_trim: bool
    skip_special_tokens: bool
    def __init__(self, max_new_tokens: _Optional[int] = ..., min_new_tokens: _Optional[int] = ..., stop: _Optional[_Iterable[str]] = ..., stop_token_ids: _Optional[_Iterable[int]] = ..., ignore_eos: _Optional[bool] = ..., no_stop_trim: _Optional[bool] = ..., skip_special_tokens: _Optional[bool] = ...) -> None: ...

class GenerateRequest(_message.Message):
    __slots__ = ("request_id", "input_ids", "mm_items", "sampling", "stopping", "n", "stream", "cache_salt", "logprob_start_len", "constraint")
    REQUEST_ID_FIELD_NUMBER: _ClassVar[int]
    INPUT_IDS_FIELD_NUMBER: _ClassVar[int]
    MM_ITEMS_FIELD_NUMBER: _ClassVar[int]
    SAMPLING_FIELD_NUMBER: _ClassVar[int]
    STOPPING_FIELD_NUMBER: _ClassVar[int]
    N_FIELD_NUMBER: _ClassVar[int]
    STREAM_FIELD_NUMBER: _ClassVar[int]
    CACHE_SALT_FIELD_NUMBER: _ClassVar[int]
    LOGPROB_START_LEN_FIELD_NUMBER: _ClassVar[int]
    CONSTRAINT_FIELD_NUMBER: _ClassVar[int]
    request_id: str
    input_ids: _containers.RepeatedScalarFieldContainer[int]
    mm_items: _containers.RepeatedCompositeFieldContainer[_common_pb2.MultimodalItem]
    sampling: _common_pb2.SamplingParams
    stopping: StoppingCriteria
    n: int
    stream: bool
    cache_salt: str
    logprob_start_len: int
    constraint: _common_pb2.Constraint
    def __init__(self, request_id: _Optional[str] = ..., input_ids: _Optional[_Iterable[int]] = ..., mm_items: _Optional[_Iterable[_Union[_common_pb2.MultimodalItem, _Mapping]]] = ..., sampling: _Optional[_Union[_common_pb2.SamplingParams, _Mapping]] = ..., stopping: _Optional[_Union[StoppingCriteria, _Mapping]] = ..., n: _Optional[int] = ..., stream: _Optional[bool] = ..., cache_salt: _Optional[str] = ..., logprob_start_len: _Optional[int] = ..., constraint: _Optional[_Union[_common_pb2.Constraint, _Mapping]] = ...) -> None: ...

class Usage(_message.Message):
    __slots__ = ("prompt_tokens", "completion_tokens", "cached_tokens")
    PROMPT_TOKENS_FIELD_NUMBER: _ClassVar[int]
    COMPLETION_TOKENS_FIELD_NUMBER: _ClassVar[int]
    CACHED_TOKENS_FIELD_NUMBER: _ClassVar[int]
    prompt_tokens: int
    completion_tokens: int
    cached_tokens: int
    def __init__(self, prompt_tokens: _Optional[int] = ..., completion_tokens: _Optional[int] = ..., cached_tokens: _Optional[int] = ...) -> None: ...

class TokenLogprob(_message.Message):
    __slots__ = ("token_id", "logprob", "top_logprobs")
    TOKEN_ID_FIELD_NUMBER: _ClassVar[int]
    LOGPROB_FIELD_NUMBER: _ClassVar[int]
    TOP_LOGPROBS_FIELD_NUMBER: _ClassVar[int]
    token_id: int
    logprob: float
    top_logprobs: _containers.RepeatedCompositeFieldContainer[_common_pb2.TopLogprob]
    def __init__(self, token_id: _Optional[int] = ..., logprob: _Optional[float] = ..., top_logprobs: _Optional[_Iterable[_Union[_common_pb2.TopLogprob, _Mapping]]] = ...) -> None: ...

class GenerateResponse(_message.Message):
    __slots__ = ("request_id", "index", "text", "token_ids", "finish_reason", "matched_stop_str", "matched_stop_token", "usage", "logprobs", "prompt_logprobs")
    REQUEST_ID_FIELD_NUMBER: _ClassVar[int]
    INDEX_FIELD_NUMBER: _ClassVar[int]
    TEXT_FIELD_NUMBER: _ClassVar[int]
    TOKEN_IDS_FIELD_NUMBER: _ClassVar[int]
    FINISH_REASON_FIELD_NUMBER: _ClassVar[int]
    MATCHED_STOP_STR_FIELD_NUMBER: _ClassVar[int]
    MATCHED_STOP_TOKEN_FIELD_NUMBER: _ClassVar[int]
    USAGE_FIELD_NUMBER: _ClassVar[int]
    LOGPROBS_FIELD_NUMBER: _ClassVar[int]
    PROMPT_LOGPROBS_FIELD_NUMBER: _ClassVar[int]
    request_id: str
    index: int
    text: str
    token_ids: _containers.RepeatedScalarFieldContainer[int]
    finish_reason: FinishReason
    matched_stop_str: str
    matched_stop_token: int
    usage: Usage
    logprobs: _containers.RepeatedCompositeFieldContainer[TokenLogprob]
    prompt_logprobs: _containers.RepeatedCompositeFieldContainer[TokenLogprob]
    def __init__(self, request_id: _Optional[str] = ..., index: _Optional[int] = ..., text: _Optional[str] = ..., token_ids: _Optional[_Iterable[int]] = ..., finish_reason: _Optional[_Union[FinishReason, str]] = ..., matched_stop_str: _Optional[str] = ..., matched_stop_token: _Optional[int] = ..., usage: _Optional[_Union[Usage, _Mapping]] = ..., logprobs: _Optional[_Iterable[_Union[TokenLogprob, _Mapping]]] = ..., prompt_logprobs: _Optional[_Iterable[_Union[TokenLogprob, _Mapping]]] = ...) -> None: ...

class AbortRequest(_message.Message):
    __slots__ = ("request_id",)
    REQUEST_ID_FIELD_NUMBER: _ClassVar[int]
    request_id: str
    def __init__(self, request_id: _Optional[str] = ...) -> None: ...

class AbortResponse(_message.Message):
    __slots__ = ("found",)
    FOUND_FIELD_NUMBER: _ClassVar[int]
    found: bool
    def __init__(self, found: _Optional[bool] = ...) -> None: ...

class GetStatsRequest(_message.Message):
    __slots__ = ()
    def __init__(self) -> None: ...

class SchedulerStats(_message.Message):
    __slots__ = ("num_running", "num_queued", "kv_pages_used", "kv_pages_total", "page_size", "kv_pages_cached", "num_preemptions", "prefix_cache_hit_tokens", "prompt_tokens_total", "vision_encode_calls", "vision_images_requested", "vision_cache_hits", "vision_skipped_images", "num_steps", "generated_tokens_total", "requests_finished", "requests_aborted", "scheduler_ns_total", "scheduler_ns_overlapped", "worker_forward_ns_total", "gen_throughput", "steps_overlapped", "scheduler_ns_off_path", "embedding_prefetches", "embedding_deferrals", "encoder_pages_used", "encoder_pages_total")
    NUM_RUNNING_FIELD_NUMBER: _ClassVar[int]
    NUM_QUEUED_FIELD_NUMBER: _ClassVar[int]
    KV_PAGES_USED_FIELD_NUMBER: _ClassVar[int]
    KV_PAGES_TOTAL_FIELD_NUMBER: _ClassVar[int]
    PAGE_SIZE_FIELD_NUMBER: _ClassVar[int]
    KV_PAGES_CACHED_FIELD_NUMBER: _ClassVar[int]
    NUM_PREEMPTIONS_FIELD_NUMBER: _ClassVar[int]
    PREFIX_CACHE_HIT_TOKENS_FIELD_NUMBER: _ClassVar[int]
    PROMPT_TOKENS_TOTAL_FIELD_NUMBER: _ClassVar[int]
    VISION_ENCODE_CALLS_FIELD_NUMBER: _ClassVar[int]
    VISION_IMAGES_REQUESTED_FIELD_NUMBER: _ClassVar[int]
    VISION_CACHE_HITS_FIELD_NUMBER: _ClassVar[int]
    VISION_SKIPPED_IMAGES_FIELD_NUMBER: _ClassVar[int]
    NUM_STEPS_FIELD_NUMBER: _ClassVar[int]
    GENERATED_TOKENS_TOTAL_FIELD_NUMBER: _ClassVar[int]
    REQUESTS_FINISHED_FIELD_NUMBER: _ClassVar[int]
    REQUESTS_ABORTED_FIELD_NUMBER: _ClassVar[int]
    SCHEDULER_NS_TOTAL_FIELD_NUMBER: _ClassVar[int]
    SCHEDULER_NS_OVERLAPPED_FIELD_NUMBER: _ClassVar[int]
    WORKER_FORWARD_NS_TOTAL_FIELD_NUMBER: _ClassVar[int]
    GEN_THROUGHPUT_FIELD_NUMBER: _ClassVar[int]
    STEPS_OVERLAPPED_FIELD_NUMBER: _ClassVar[int]
    SCHEDULER_NS_OFF_PATH_FIELD_NUMBER: _ClassVar[int]
    EMBEDDING_PREFETCHES_FIELD_NUMBER: _ClassVar[int]
    EMBEDDING_DEFERRALS_FIELD_NUMBER: _ClassVar[int]
    ENCODER_PAGES_USED_FIELD_NUMBER: _ClassVar[int]
    ENCODER_PAGES_TOTAL_FIELD_NUMBER: _ClassVar[int]
    num_running: int
    num_queued: int
    kv_pages_used: int
    kv_pages_total: int
    page_size: int
    kv_pages_cached: int
    num_preemptions: int
    prefix_cache_hit_tokens: int
    prompt_tokens_total: int
    vision_encode_calls: int
    vision_images_requested: int
    vision_cache_hits: int
    vision_skipped_images: int
    num_steps: int
    generated_tokens_total: int
    requests_finished: int
    requests_aborted: int
    scheduler_ns_total: int
    scheduler_ns_overlapped: int
    worker_forward_ns_total: int
    gen_throughput: float
    steps_overlapped: int
    scheduler_ns_off_path: int
    embedding_prefetches: int
    embedding_deferrals: int
    encoder_pages_used: int
    encoder_pages_total: int
    def __init__(self, num_running: _Optional[int] = ..., num_queued: _Optional[int] = ..., kv_pages_used: _Optional[int] = ..., kv_pages_total: _Optional[int] = ..., page_size: _Optional[int] = ..., kv_pages_cached: _Optional[int] = ..., num_preemptions: _Optional[int] = ..., prefix_cache_hit_tokens: _Optional[int] = ..., prompt_tokens_total: _Optional[int] = ..., vision_encode_calls: _Optional[int] = ..., vision_images_requested: _Optional[int] = ..., vision_cache_hits: _Optional[int] = ..., vision_skipped_images: _Optional[int] = ..., num_steps: _Optional[int] = ..., generated_tokens_total: _Optional[int] = ..., requests_finished: _Optional[int] = ..., requests_aborted: _Optional[int] = ..., scheduler_ns_total: _Optional[int] = ..., scheduler_ns_overlapped: _Optional[int] = ..., worker_forward_ns_total: _Optional[int] = ..., gen_throughput: _Optional[float] = ..., steps_overlapped: _Optional[int] = ..., scheduler_ns_off_path: _Optional[int] = ..., embedding_prefetches: _Optional[int] = ..., embedding_deferrals: _Optional[int] = ..., encoder_pages_used: _Optional[int] = ..., encoder_pages_total: _Optional[int] = ...) -> None: ...

class GetServerInfoRequest(_message.Message):
    __slots__ = ()
    def __init__(self) -> None: ...

class ServerInfo(_message.Message):
    __slots__ = ("model_path", "served_model_name", "architecture", "is_multimodal", "context_length", "page_size", "num_pages", "max_running_requests", "chunked_prefill_size", "max_prefill_tokens", "enable_prefix_cache", "scheduler_args_json", "worker_info_json", "vision_info_json", "enable_overlap", "eos_token_ids", "grammar_info_json", "connect_socket", "step_transport")
    MODEL_PATH_FIELD_NUMBER: _ClassVar[int]
    SERVED_MODEL_NAME_FIELD_NUMBER: _ClassVar[int]
    ARCHITECTURE_FIELD_NUMBER: _ClassVar[int]
    IS_MULTIMODAL_FIELD_NUMBER: _ClassVar[int]
    CONTEXT_LENGTH_FIELD_NUMBER: _ClassVar[int]
    PAGE_SIZE_FIELD_NUMBER: _ClassVar[int]
    NUM_PAGES_FIELD_NUMBER: _ClassVar[int]
    MAX_RUNNING_REQUESTS_FIELD_NUMBER: _ClassVar[int]
    CHUNKED_PREFILL_SIZE_FIELD_NUMBER: _ClassVar[int]
    MAX_PREFILL_TOKENS_FIELD_NUMBER: _ClassVar[int]
    ENABLE_PREFIX_CACHE_FIELD_NUMBER: _ClassVar[int]
    SCHEDULER_ARGS_JSON_FIELD_NUMBER: _ClassVar[int]
    WORKER_INFO_JSON_FIELD_NUMBER: _ClassVar[int]
    VISION_INFO_JSON_FIELD_NUMBER: _ClassVar[int]
    ENABLE_OVERLAP_FIELD_NUMBER: _ClassVar[int]
    EOS_TOKEN_IDS_FIELD_NUMBER: _ClassVar[int]
    GRAMMAR_INFO_JSON_FIELD_NUMBER: _ClassVar[int]
    CONNECT_SOCKET_FIELD_NUMBER: _ClassVar[int]
    STEP_TRANSPORT_FIELD_NUMBER: _ClassVar[int]
    model_path: str
    served_model_name: str
    architecture: str
    is_multimodal: bool
    context_length: int
    page_size: int
    num_pages: int
    max_running_requests: int
    chunked_prefill_size: int
    max_prefill_tokens: int
    enable_prefix_cache: bool
    scheduler_args_json: str
    worker_info_json: str
    vision_info_json: str
    enable_overlap: bool
    eos_token_ids: _containers.RepeatedScalarFieldContainer[int]
    grammar_info_json: str
    connect_socket: str
    step_transport: str
    def __init__(self, model_path: _Optional[str] = ..., served_model_name: _Optional[str] = ..., architecture: _Optional[str] = ..., is_multimodal: _Optional[bool] = ..., context_length: _Optional[int] = ..., page_size: _Optional[int] = ..., num_pages: _Optional[int] = ..., max_running_requests: _Optional[int] = ..., chunked_prefill_size: _Optional[int] = ..., max_prefill_tokens: _Optional[int] = ..., enable_prefix_cache: _Optional[bool] = ..., scheduler_args_json: _Optional[str] = ..., worker_info_json: _Optional[str] = ..., vision_info_json: _Optional[str] = ..., enable_overlap: _Optional[bool] = ..., eos_token_ids: _Optional[_Iterable[int]] = ..., grammar_info_json: _Optional[str] = ..., connect_socket: _Optional[str] = ..., step_transport: _Optional[str] = ...) -> None: ...

class ConnectRequest(_message.Message):
    __slots__ = ("generate", "abort")
    GENERATE_FIELD_NUMBER: _ClassVar[int]
    ABORT_FIELD_NUMBER: _ClassVar[int]
    generate: GenerateRequest
    abort: AbortRequest
    def __init__(self, generate: _Optional[_Union[GenerateRequest, _Mapping]] = ..., abort: _Optional[_Union[AbortRequest, _Mapping]] = ...) -> None: ...

class OutputBatch(_message.Message):
    __slots__ = ("outputs", "errors", "delta_request_ids", "delta_indexes", "delta_texts", "delta_num_tokens", "delta_token_ids")
    OUTPUTS_FIELD_NUMBER: _ClassVar[int]
    ERRORS_FIELD_NUMBER: _ClassVar[int]
    DELTA_REQUEST_IDS_FIELD_NUMBER: _ClassVar[int]
    DELTA_INDEXES_FIELD_NUMBER: _ClassVar[int]
    DELTA_TEXTS_FIELD_NUMBER: _ClassVar[int]
    DELTA_NUM_TOKENS_FIELD_NUMBER: _ClassVar[int]
    DELTA_TOKEN_IDS_FIELD_NUMBER: _ClassVar[int]
    outputs: _containers.RepeatedCompositeFieldContainer[GenerateResponse]
    errors: _containers.RepeatedCompositeFieldContainer[RequestError]
    delta_request_ids: _containers.RepeatedScalarFieldContainer[str]
    delta_indexes: _containers.RepeatedScalarFieldContainer[int]
    delta_texts: _containers.RepeatedScalarFieldContainer[str]
    delta_num_tokens: _containers.RepeatedScalarFieldContainer[int]
    delta_token_ids: _containers.RepeatedScalarFieldContainer[int]
    def __init__(self, outputs: _Optional[_Iterable[_Union[GenerateResponse, _Mapping]]] = ..., errors: _Optional[_Iterable[_Union[RequestError, _Mapping]]] = ..., delta_request_ids: _Optional[_Iterable[str]] = ..., delta_indexes: _Optional[_Iterable[int]] = ..., delta_texts: _Optional[_Iterable[str]] = ..., delta_num_tokens: _Optional[_Iterable[int]] = ..., delta_token_ids: _Optional[_Iterable[int]] = ...) -> None: ...

class RequestError(_message.Message):
    __slots__ = ("request_id", "code", "message")
    REQUEST_ID_FIELD_NUMBER: _ClassVar[int]
    CODE_FIELD_NUMBER: _ClassVar[int]
    MESSAGE_FIELD_NUMBER: _ClassVar[int]
    request_id: str
    code: str
    message: str
    def __init__(self, request_id: _Optional[str] = ..., code: _Optional[str] = ..., message: _Optional[str] = ...) -> None: ...

class FlushCacheRequest(_message.Message):
    __slots__ = ()
    def __init__(self) -> None: ...

class FlushCacheResponse(_message.Message):
    __slots__ = ("flushed", "num_requests", "num_pages_freed", "num_embeddings_freed")
    FLUSHED_FIELD_NUMBER: _ClassVar[int]
    NUM_REQUESTS_FIELD_NUMBER: _ClassVar[int]
    NUM_PAGES_FREED_FIELD_NUMBER: _ClassVar[int]
    NUM_EMBEDDINGS_FREED_FIELD_NUMBER: _ClassVar[int]
    flushed: bool
    num_requests: int
    num_pages_freed: int
    num_embeddings_freed: int
    def __init__(self, flushed: _Optional[bool] = ..., num_requests: _Optional[int] = ..., num_pages_freed: _Optional[int] = ..., num_embeddings_freed: _Optional[int] = ...) -> None: ...
