"""The bodies the routes send (gateway/serving.py builds them as plain dicts), declared for the published OpenAPI
schema; tests/test_schema_fuzz.py checks every answer against them."""

from __future__ import annotations

from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field


class _Out(BaseModel):
    """A body with exactly these fields: the schema says additionalProperties false, so an undeclared one fails
    the schema test."""

    model_config = ConfigDict(extra="forbid")


class ErrorInfo(_Out):
    message: str
    type: str
    param: str | None
    code: str | int | None


class ErrorResponse(_Out):
    error: ErrorInfo


class PromptTokensDetails(_Out):
    cached_tokens: int


class Usage(_Out):
    prompt_tokens: int
    completion_tokens: int
    total_tokens: int
    prompt_tokens_details: PromptTokensDetails


class TopLogprob(_Out):
    token: str
    logprob: float
    bytes: list[int]


class ChatTokenLogprob(TopLogprob):
    top_logprobs: list[TopLogprob]


class ChatLogprobs(_Out):
    content: list[ChatTokenLogprob]


class FunctionCall(_Out):
    name: str
    arguments: str = Field(description="a JSON object, as a string")


class ToolCall(_Out):
    id: str
    type: Literal["function"]
    function: FunctionCall


class AssistantMessage(_Out):
    role: Literal["assistant"]
    content: str | None = Field(description="null when the message holds tool calls and no text")
    tool_calls: list[ToolCall] = Field(default=None, description="when the model called tools")


class ChatChoice(_Out):
    index: int
    message: AssistantMessage
    logprobs: ChatLogprobs | None
    finish_reason: str | None
    matched_stop: int | str | None
    token_ids: list[int] = Field(default=None, description="with return_token_ids")


class ChatCompletionResponse(_Out):
    id: str
    object: Literal["chat.completion"]
    created: int
    model: str
    choices: list[ChatChoice]
    usage: Usage
    prompt_token_ids: list[int] = Field(default=None, description="with return_token_ids")


class CompletionLogprobs(_Out):
    tokens: list[str]
    # null for an echoed prompt's first token, which nothing precedes (as OpenAI and vLLM answer)
    token_logprobs: list[float | None]
    top_logprobs: list[dict[str, float] | None]
    text_offset: list[int]


class CompletionChoice(_Out):
    index: int
    text: str
    logprobs: CompletionLogprobs | None
    finish_reason: str | None
    matched_stop: int | str | None
    token_ids: list[int] = Field(default=None, description="with return_token_ids")
    prompt_token_ids: list[int] = Field(default=None, description="with return_token_ids")


class CompletionResponse(_Out):
    id: str
    object: Literal["text_completion"]
    created: int
    model: str
    choices: list[CompletionChoice]
    usage: Usage


class FunctionCallDelta(_Out):
    name: str = Field(default=None, description="in a call's first delta")
    arguments: str = Field(description="appended to the call's arguments so far")


class ToolCallDelta(_Out):
    index: int
    id: str = Field(default=None, description="in a call's first delta")
    type: Literal["function"] = Field(default=None, description="in a call's first delta")
    function: FunctionCallDelta


class ChatDelta(_Out):
    role: Literal["assistant"] = Field(default=None, description="in each choice's first event")
    content: str = Field(
        default=None, description="absent in each choice's last event and in tool call deltas"
    )
    tool_calls: list[ToolCallDelta] = Field(
        default=None, description="a call's first delta (index, id, type, name), then its arguments"
    )


class ChatChunkChoice(_Out):
    index: int
    delta: ChatDelta
    logprobs: ChatLogprobs | None
    finish_reason: str | None
    matched_stop: int | str | None = Field(default=None, description="in each choice's last event")
    token_ids: list[int] = Field(default=None, description="with return_token_ids: this event's token ids")


class ChatCompletionChunk(_Out):
    """One event of a streamed chat completion."""

    id: str
    object: Literal["chat.completion.chunk"]
    created: int
    model: str
    choices: list[ChatChunkChoice]
    usage: Usage | None = Field(
        default=None,
        description="with stream_options.include_usage: null until the end; with continuous_usage_stats: the "
        "counts so far on every event",
    )
    prompt_token_ids: list[int] = Field(
        default=None, description="with return_token_ids: in each choice's first event"
    )


class CompletionChunkChoice(_Out):
    index: int
    text: str
    logprobs: CompletionLogprobs | None
    finish_reason: str | None
    matched_stop: int | str | None
    token_ids: list[int] = Field(default=None, description="with return_token_ids: this event's token ids")
    prompt_token_ids: list[int] = Field(
        default=None, description="with return_token_ids: in each choice's first event"
    )


class CompletionChunk(_Out):
    """One event of a streamed text completion."""

    id: str
    object: Literal["text_completion"]
    created: int
    model: str
    choices: list[CompletionChunkChoice]
    usage: Usage | None = Field(
        default=None,
        description="with stream_options.include_usage: null until the end; with continuous_usage_stats: the "
        "counts so far on every event",
    )


class FinishReason(_Out):
    type: str
    length: int = Field(default=None, description="when type is 'length'")
    matched: int | str = Field(default=None, description="the stop string or token id that ended it")


class GenerateMeta(_Out):
    id: str
    prompt_tokens: int
    completion_tokens: int
    cached_tokens: int
    finish_reason: FinishReason | None
    output_token_logprobs: list[tuple[float, int, str | None]] = Field(
        default=None, description="with return_logprob"
    )
    output_top_logprobs: list[list[tuple[float, int, str | None]]] = Field(
        default=None, description="with return_logprob"
    )
    input_token_logprobs: list[tuple[float | None, int, str | None]] = Field(
        default=None,
        description="with return_logprob and logprob_start_len at or past the prompt's end: empty",
    )
    input_top_logprobs: list[list[tuple[float, int, str | None]]] = Field(
        default=None,
        description="with return_logprob and logprob_start_len at or past the prompt's end: empty",
    )


class GenerateResponse(_Out):
    text: str
    output_ids: list[int]
    index: int
    meta_info: GenerateMeta


class ModelEntry(_Out):
    id: str
    object: Literal["model"]
    created: int
    owned_by: str
    root: str
    max_model_len: int


class ModelList(_Out):
    object: Literal["list"]
    data: list[ModelEntry]


class FlushCacheResult(_Out):
    flushed: Literal[True]
    num_pages_freed: int
    num_embeddings_freed: int


class ModelInfo(_Out):
    model_path: str
    served_model_name: str
    architecture: str
    is_generation: bool
    is_multimodal: bool
    has_image_understanding: bool
    context_length: int


class ServerInfo(BaseModel):
    """The scheduler's ServerInfo message (every field, by its proto name) and what the gateway adds."""

    model_config = ConfigDict(extra="allow")

    context_length: int
    scheduler_args: dict[str, Any]
    worker_info: dict[str, Any]
    vision_info: dict[str, Any]
    grammar_info: dict[str, Any] = Field(
        default_factory=dict,
        description="structured output: the grammar backend (llguidance), its version and compiled-grammar cache",
    )
    stats: dict[str, int | float] = Field(
        description="live statistics only (counters and gauges), JSON numbers; configuration is the other keys"
    )
    gateway_args: dict[str, Any]
    version: str
    model_dir: str
