from protos import common_pb2 as _common_pb2
from google.protobuf.internal import containers as _containers
from google.protobuf import descriptor as _descriptor
from google.protobuf import message as _message
from collections.abc import Iterable as _Iterable, Mapping as _Mapping
from typing import ClassVar as _ClassVar, Optional as _Optional, Union as _Union

DESCRIPTOR: _descriptor.FileDescriptor

class EncodeRequest(_message.Message):
    __slots__ = ("items",)
    ITEMS_FIELD_NUMBER: _ClassVar[int]
    items: _containers.RepeatedCompositeFieldContainer[_common_pb2.MultimodalItem]
    def __init__(self, items: _Optional[_Iterable[_Union[_common_pb2.MultimodalItem, _Mapping]]] = ...) -> None: ...

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
    __slots__ = ("items",)
    ITEMS_FIELD_NUMBER: _ClassVar[int]
    items: _containers.RepeatedCompositeFieldContainer[EncodedItem]
    def __init__(self, items: _Optional[_Iterable[_Union[EncodedItem, _Mapping]]] = ...) -> None: ...

class GetEmbeddingsRequest(_message.Message):
    __slots__ = ("content_keys",)
    CONTENT_KEYS_FIELD_NUMBER: _ClassVar[int]
    content_keys: _containers.RepeatedScalarFieldContainer[str]
    def __init__(self, content_keys: _Optional[_Iterable[str]] = ...) -> None: ...

class Embedding(_message.Message):
    __slots__ = ("content_key", "data")
    CONTENT_KEY_FIELD_NUMBER: _ClassVar[int]
    DATA_FIELD_NUMBER: _ClassVar[int]
    content_key: str
    data: _common_pb2.Tensor
    def __init__(self, content_key: _Optional[str] = ..., data: _Optional[_Union[_common_pb2.Tensor, _Mapping]] = ...) -> None: ...

class GetEmbeddingsResponse(_message.Message):
    __slots__ = ("embeddings", "missing_keys")
    EMBEDDINGS_FIELD_NUMBER: _ClassVar[int]
    MISSING_KEYS_FIELD_NUMBER: _ClassVar[int]
    embeddings: _containers.RepeatedCompositeFieldContainer[Embedding]
    missing_keys: _containers.RepeatedScalarFieldContainer[str]
    def __init__(self, embeddings: _Optional[_Iterable[_Union[Embedding, _Mapping]]] = ..., missing_keys: _Optional[_Iterable[str]] = ...) -> None: ...

class GetInfoRequest(_message.Message):
    __slots__ = ()
    def __init__(self) -> None: ...

class VisionInfo(_message.Message):
    __slots__ = ("architecture", "hidden_size", "dtype", "device", "cache_budget_bytes")
    ARCHITECTURE_FIELD_NUMBER: _ClassVar[int]
    HIDDEN_SIZE_FIELD_NUMBER: _ClassVar[int]
    DTYPE_FIELD_NUMBER: _ClassVar[int]
    DEVICE_FIELD_NUMBER: _ClassVar[int]
    CACHE_BUDGET_BYTES_FIELD_NUMBER: _ClassVar[int]
    architecture: str
    hidden_size: int
    dtype: str
    device: str
    cache_budget_bytes: int
    def __init__(self, architecture: _Optional[str] = ..., hidden_size: _Optional[int] = ..., dtype: _Optional[str] = ..., device: _Optional[str] = ..., cache_budget_bytes: _Optional[int] = ...) -> None: ...

class GetStatsRequest(_message.Message):
    __slots__ = ()
    def __init__(self) -> None: ...

class VisionStats(_message.Message):
    __slots__ = ("encode_calls", "images_encoded", "cache_hits", "cache_entries", "cache_bytes", "evictions", "encode_ns_total")
    ENCODE_CALLS_FIELD_NUMBER: _ClassVar[int]
    IMAGES_ENCODED_FIELD_NUMBER: _ClassVar[int]
    CACHE_HITS_FIELD_NUMBER: _ClassVar[int]
    CACHE_ENTRIES_FIELD_NUMBER: _ClassVar[int]
    CACHE_BYTES_FIELD_NUMBER: _ClassVar[int]
    EVICTIONS_FIELD_NUMBER: _ClassVar[int]
    ENCODE_NS_TOTAL_FIELD_NUMBER: _ClassVar[int]
    encode_calls: int
    images_encoded: int
    cache_hits: int
    cache_entries: int
    cache_bytes: int
    evictions: int
    encode_ns_total: int
    def __init__(self, encode_calls: _Optional[int] = ..., images_encoded: _Optional[int] = ..., cache_hits: _Optional[int] = ..., cache_entries: _Optional[int] = ..., cache_bytes: _Optional[int] = ..., evictions: _Optional[int] = ..., encode_ns_total: _Optional[int] = ...) -> None: ...
