from protos import common_pb2 as _common_pb2
from google.protobuf.internal import containers as _containers
from google.protobuf import descriptor as _descriptor
from google.protobuf import message as _message
from collections.abc import Iterable as _Iterable, Mapping as _Mapping
from typing import ClassVar as _ClassVar, Optional as _Optional, Union as _Union

DESCRIPTOR: _descriptor.FileDescriptor

class PrepareRequest(_message.Message):
    __slots__ = ("items",)
    ITEMS_FIELD_NUMBER: _ClassVar[int]
    items: _containers.RepeatedCompositeFieldContainer[_common_pb2.MultimodalItem]
    def __init__(self, items: _Optional[_Iterable[_Union[_common_pb2.MultimodalItem, _Mapping]]] = ...) -> None: ...

class PrepareResponse(_message.Message):
    __slots__ = ("num_started",)
    NUM_STARTED_FIELD_NUMBER: _ClassVar[int]
    num_started: int
    def __init__(self, num_started: _Optional[int] = ...) -> None: ...

class EncodeRequest(_message.Message):
    __slots__ = ("items", "lease")
    ITEMS_FIELD_NUMBER: _ClassVar[int]
    LEASE_FIELD_NUMBER: _ClassVar[int]
    items: _containers.RepeatedCompositeFieldContainer[_common_pb2.MultimodalItem]
    lease: bool
    def __init__(self, items: _Optional[_Iterable[_Union[_common_pb2.MultimodalItem, _Mapping]]] = ..., lease: _Optional[bool] = ...) -> None: ...

class EncodedItem(_message.Message):
    __slots__ = ("content_key", "num_tokens", "cache_hit", "encode_ns")
    CONTENT_KEY_FIELD_NUMBER: _ClassVar[int]
    NUM_TOKENS_FIELD_NUMBER: _ClassVar[int]
    CACHE_HIT_FIELD_NUMBER: _ClassVar[int]
    ENCODE_NS_FIELD_NUMBER: _ClassVar[int]
    content_key: str
    num_tokens: int
    cache_hit: bool
    encode_ns: int
    def __init__(self, content_key: _Optional[str] = ..., num_tokens: _Optional[int] = ..., cache_hit: _Optional[bool] = ..., encode_ns: _Optional[int] = ...) -> None: ...

class EncodeResponse(_message.Message):
    __slots__ = ("items", "lease")
    ITEMS_FIELD_NUMBER: _ClassVar[int]
    LEASE_FIELD_NUMBER: _ClassVar[int]
    items: _containers.RepeatedCompositeFieldContainer[EncodedItem]
    lease: _common_pb2.EmbeddingLease
    def __init__(self, items: _Optional[_Iterable[_Union[EncodedItem, _Mapping]]] = ..., lease: _Optional[_Union[_common_pb2.EmbeddingLease, _Mapping]] = ...) -> None: ...

class GetEmbeddingsRequest(_message.Message):
    __slots__ = ("content_keys", "by_reference")
    CONTENT_KEYS_FIELD_NUMBER: _ClassVar[int]
    BY_REFERENCE_FIELD_NUMBER: _ClassVar[int]
    content_keys: _containers.RepeatedScalarFieldContainer[str]
    by_reference: bool
    def __init__(self, content_keys: _Optional[_Iterable[str]] = ..., by_reference: _Optional[bool] = ...) -> None: ...

class Embedding(_message.Message):
    __slots__ = ("content_key", "data")
    CONTENT_KEY_FIELD_NUMBER: _ClassVar[int]
    DATA_FIELD_NUMBER: _ClassVar[int]
    content_key: str
    data: _common_pb2.Tensor
    def __init__(self, content_key: _Optional[str] = ..., data: _Optional[_Union[_common_pb2.Tensor, _Mapping]] = ...) -> None: ...

class GetEmbeddingsResponse(_message.Message):
    __slots__ = ("embeddings", "missing_keys", "locations", "lease_id", "pool_id")
    EMBEDDINGS_FIELD_NUMBER: _ClassVar[int]
    MISSING_KEYS_FIELD_NUMBER: _ClassVar[int]
    LOCATIONS_FIELD_NUMBER: _ClassVar[int]
    LEASE_ID_FIELD_NUMBER: _ClassVar[int]
    POOL_ID_FIELD_NUMBER: _ClassVar[int]
    embeddings: _containers.RepeatedCompositeFieldContainer[Embedding]
    missing_keys: _containers.RepeatedScalarFieldContainer[str]
    locations: _containers.RepeatedCompositeFieldContainer[_common_pb2.EmbeddingLocation]
    lease_id: int
    pool_id: str
    def __init__(self, embeddings: _Optional[_Iterable[_Union[Embedding, _Mapping]]] = ..., missing_keys: _Optional[_Iterable[str]] = ..., locations: _Optional[_Iterable[_Union[_common_pb2.EmbeddingLocation, _Mapping]]] = ..., lease_id: _Optional[int] = ..., pool_id: _Optional[str] = ...) -> None: ...

class GetSharedPoolRequest(_message.Message):
    __slots__ = ()
    def __init__(self) -> None: ...

class SharedPool(_message.Message):
    __slots__ = ("pool_id", "kind", "num_pages", "page_rows", "hidden_size", "dtype", "device", "shm_name", "cuda_handle", "storage_size_bytes", "storage_offset_bytes", "ref_counter_handle", "ref_counter_offset", "event_handle", "event_sync_required", "probe_scale", "ready_event_handles")
    POOL_ID_FIELD_NUMBER: _ClassVar[int]
    KIND_FIELD_NUMBER: _ClassVar[int]
    NUM_PAGES_FIELD_NUMBER: _ClassVar[int]
    PAGE_ROWS_FIELD_NUMBER: _ClassVar[int]
    HIDDEN_SIZE_FIELD_NUMBER: _ClassVar[int]
    DTYPE_FIELD_NUMBER: _ClassVar[int]
    DEVICE_FIELD_NUMBER: _ClassVar[int]
    SHM_NAME_FIELD_NUMBER: _ClassVar[int]
    CUDA_HANDLE_FIELD_NUMBER: _ClassVar[int]
    STORAGE_SIZE_BYTES_FIELD_NUMBER: _ClassVar[int]
    STORAGE_OFFSET_BYTES_FIELD_NUMBER: _ClassVar[int]
    REF_COUNTER_HANDLE_FIELD_NUMBER: _ClassVar[int]
    REF_COUNTER_OFFSET_FIELD_NUMBER: _ClassVar[int]
    EVENT_HANDLE_FIELD_NUMBER: _ClassVar[int]
    EVENT_SYNC_REQUIRED_FIELD_NUMBER: _ClassVar[int]
    PROBE_SCALE_FIELD_NUMBER: _ClassVar[int]
    READY_EVENT_HANDLES_FIELD_NUMBER: _ClassVar[int]
    pool_id: str
    kind: str
    num_pages: int
    page_rows: int
    hidden_size: int
    dtype: str
    device: str
    shm_name: str
    cuda_handle: bytes
    storage_size_bytes: int
    storage_offset_bytes: int
    ref_counter_handle: bytes
    ref_counter_offset: int
    event_handle: bytes
    event_sync_required: bool
    probe_scale: float
    ready_event_handles: _containers.RepeatedScalarFieldContainer[bytes]
    def __init__(self, pool_id: _Optional[str] = ..., kind: _Optional[str] = ..., num_pages: _Optional[int] = ..., page_rows: _Optional[int] = ..., hidden_size: _Optional[int] = ..., dtype: _Optional[str] = ..., device: _Optional[str] = ..., shm_name: _Optional[str] = ..., cuda_handle: _Optional[bytes] = ..., storage_size_bytes: _Optional[int] = ..., storage_offset_bytes: _Optional[int] = ..., ref_counter_handle: _Optional[bytes] = ..., ref_counter_offset: _Optional[int] = ..., event_handle: _Optional[bytes] = ..., event_sync_required: _Optional[bool] = ..., probe_scale: _Optional[float] = ..., ready_event_handles: _Optional[_Iterable[bytes]] = ...) -> None: ...

class ReleaseEmbeddingsRequest(_message.Message):
    __slots__ = ("lease_id", "pool_id")
    LEASE_ID_FIELD_NUMBER: _ClassVar[int]
    POOL_ID_FIELD_NUMBER: _ClassVar[int]
    lease_id: int
    pool_id: str
    def __init__(self, lease_id: _Optional[int] = ..., pool_id: _Optional[str] = ...) -> None: ...

class ReleaseEmbeddingsResponse(_message.Message):
    __slots__ = ()
    def __init__(self) -> None: ...

class GetInfoRequest(_message.Message):
    __slots__ = ()
    def __init__(self) -> None: ...

class VisionInfo(_message.Message):
    __slots__ = ("architecture", "hidden_size", "dtype", "device", "cache_budget_bytes", "attention_backend", "image_processor", "cuda_graphs", "embedding_sharing")
    ARCHITECTURE_FIELD_NUMBER: _ClassVar[int]
    HIDDEN_SIZE_FIELD_NUMBER: _ClassVar[int]
    DTYPE_FIELD_NUMBER: _ClassVar[int]
    DEVICE_FIELD_NUMBER: _ClassVar[int]
    CACHE_BUDGET_BYTES_FIELD_NUMBER: _ClassVar[int]
    ATTENTION_BACKEND_FIELD_NUMBER: _ClassVar[int]
    IMAGE_PROCESSOR_FIELD_NUMBER: _ClassVar[int]
    CUDA_GRAPHS_FIELD_NUMBER: _ClassVar[int]
    EMBEDDING_SHARING_FIELD_NUMBER: _ClassVar[int]
    architecture: str
    hidden_size: int
    dtype: str
    device: str
    cache_budget_bytes: int
    attention_backend: str
    image_processor: str
    cuda_graphs: bool
    embedding_sharing: str
    def __init__(self, architecture: _Optional[str] = ..., hidden_size: _Optional[int] = ..., dtype: _Optional[str] = ..., device: _Optional[str] = ..., cache_budget_bytes: _Optional[int] = ..., attention_backend: _Optional[str] = ..., image_processor: _Optional[str] = ..., cuda_graphs: _Optional[bool] = ..., embedding_sharing: _Optional[str] = ...) -> None: ...

class GetStatsRequest(_message.Message):
    __slots__ = ()
    def __init__(self) -> None: ...

class VisionStats(_message.Message):
    __slots__ = ("encode_calls", "images_encoded", "cache_hits", "cache_entries", "cache_bytes", "evictions", "encode_ns_total", "pulls_by_reference", "pulls_by_value", "open_leases", "batches", "graph_batches", "images_prepared_ahead")
    ENCODE_CALLS_FIELD_NUMBER: _ClassVar[int]
    IMAGES_ENCODED_FIELD_NUMBER: _ClassVar[int]
    CACHE_HITS_FIELD_NUMBER: _ClassVar[int]
    CACHE_ENTRIES_FIELD_NUMBER: _ClassVar[int]
    CACHE_BYTES_FIELD_NUMBER: _ClassVar[int]
    EVICTIONS_FIELD_NUMBER: _ClassVar[int]
    ENCODE_NS_TOTAL_FIELD_NUMBER: _ClassVar[int]
    PULLS_BY_REFERENCE_FIELD_NUMBER: _ClassVar[int]
    PULLS_BY_VALUE_FIELD_NUMBER: _ClassVar[int]
    OPEN_LEASES_FIELD_NUMBER: _ClassVar[int]
    BATCHES_FIELD_NUMBER: _ClassVar[int]
    GRAPH_BATCHES_FIELD_NUMBER: _ClassVar[int]
    IMAGES_PREPARED_AHEAD_FIELD_NUMBER: _ClassVar[int]
    encode_calls: int
    images_encoded: int
    cache_hits: int
    cache_entries: int
    cache_bytes: int
    evictions: int
    encode_ns_total: int
    pulls_by_reference: int
    pulls_by_value: int
    open_leases: int
    batches: int
    graph_batches: int
    images_prepared_ahead: int
    def __init__(self, encode_calls: _Optional[int] = ..., images_encoded: _Optional[int] = ..., cache_hits: _Optional[int] = ..., cache_entries: _Optional[int] = ..., cache_bytes: _Optional[int] = ..., evictions: _Optional[int] = ..., encode_ns_total: _Optional[int] = ..., pulls_by_reference: _Optional[int] = ..., pulls_by_value: _Optional[int] = ..., open_leases: _Optional[int] = ..., batches: _Optional[int] = ..., graph_batches: _Optional[int] = ..., images_prepared_ahead: _Optional[int] = ...) -> None: ...

class FlushCacheRequest(_message.Message):
    __slots__ = ()
    def __init__(self) -> None: ...

class FlushCacheResponse(_message.Message):
    __slots__ = ("num_freed",)
    NUM_FREED_FIELD_NUMBER: _ClassVar[int]
    num_freed: int
    def __init__(self, num_freed: _Optional[int] = ...) -> None: ...
