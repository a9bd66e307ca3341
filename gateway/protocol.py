"""OpenAI (and SGLang-extra) request bodies, validated with pydantic; unknown fields are kept aside and logged."""

from __future__ import annotations

from typing import Any

from pydantic import BaseModel, ConfigDict, Field, PrivateAttr, ValidationError, model_validator

from common.errors import InvalidRequestError
from common.types import Constraint, SamplingParams, StoppingCriteria
from processor import constraints, sampling
from processor.tools import ToolChoice, check_tools

MAX_CHOICES = 1024  # completions one request may ask for (prompts x n)
# a completion field -> the SGLang sampling_params key it comes from
_FROM_SGLANG = {k: k for k in sampling.SGLANG_KEYS} | {
    "max_tokens": "max_new_tokens",
    "min_tokens": "min_new_tokens",
}


class StreamOptions(BaseModel):
    include_usage: bool = False
    continuous_usage_stats: bool = False


class SamplingRequest(BaseModel):
    """Fields shared by chat and text completions."""

    model_config = ConfigDict(extra="allow")

    model: str | None = None  # the served model when omitted, as SGLang and vLLM do
    max_tokens: int | None = Field(None, ge=1)
    max_completion_tokens: int | None = Field(None, ge=1)
    temperature: float | None = Field(None, ge=0)
    top_p: float | None = Field(None, gt=0, le=1)
    top_k: int | None = Field(None, ge=-1)
    min_p: float | None = Field(None, ge=0, le=1)
    n: int = Field(1, ge=1, le=128)
    stop: str | list[str] | None = None
    stop_token_ids: list[int] | None = None
    seed: int | None = None
    presence_penalty: float | None = Field(None, ge=-2, le=2)
    frequency_penalty: float | None = Field(None, ge=-2, le=2)
    repetition_penalty: float | None = Field(None, gt=0)
    logit_bias: dict[str, float] | None = None
    min_tokens: int = Field(0, ge=0)
    ignore_eos: bool = False
    skip_special_tokens: bool = True
    no_stop_trim: bool = False
    stream: bool = False
    stream_options: StreamOptions | None = None
    user: str | None = None
    rid: str | None = None
    return_token_ids: bool = False  # vLLM extra: prompt_token_ids and each choice's token_ids in the response
    # vLLM extra: prompts share prefix-cache pages only with prompts of the same salt (tenant isolation)
    cache_salt: str | None = Field(None, min_length=1, max_length=256)
    # structured output (grammar-constrained decoding): OpenAI's response_format, SGLang's extras
    response_format: dict[str, Any] | None = None
    regex: str | None = None
    ebnf: str | None = None
    json_schema: str | dict[str, Any] | None = None
    structural_tag: str | dict[str, Any] | None = None
    _constraint: Constraint | None = PrivateAttr(default=None)

    @model_validator(mode="after")
    def _check(self):
        if isinstance(self.stop, list) and len(self.stop) > 4:
            raise InvalidRequestError("stop takes at most 4 sequences", param="stop")
        if isinstance(self.stop, list) and not all(isinstance(s, str) for s in self.stop):
            raise InvalidRequestError("stop must be a string or a list of strings", param="stop")
        if self.stream_options is not None and not self.stream:
            raise InvalidRequestError(
                "stream_options is only allowed when stream is true", param="stream_options"
            )
        for k, v in (self.logit_bias or {}).items():
            if not k.lstrip("-").isdigit():
                raise InvalidRequestError(f"logit_bias keys must be token ids, got {k!r}", param="logit_bias")
            if not -100 <= v <= 100:
                raise InvalidRequestError("logit_bias values must be in [-100, 100]", param="logit_bias")
        if self.seed is not None and not 0 <= self.seed < 2**63:
            raise InvalidRequestError("seed must be in [0, 2**63)", param="seed")
        if self.structural_tag is not None:
            raise InvalidRequestError(
                "structural_tag is not supported; use response_format, regex or ebnf", param="structural_tag"
            )
        self._constraint = constraints.from_fields(
            {k: getattr(self, k) for k in ("response_format", "json_schema", "regex", "ebnf")}
        )
        return self

    @property
    def constraint(self) -> Constraint | None:
        """The grammar every choice follows (structured output), or None."""
        return self._constraint

    @property
    def unknown_fields(self) -> list[str]:
        return sorted(self.model_extra or {})

    @property
    def requested_max_tokens(self) -> int | None:
        return self.max_completion_tokens if self.max_completion_tokens is not None else self.max_tokens

    def to_params(
        self,
        *,
        defaults: dict[str, Any],
        eos_ids: tuple[int, ...],
        max_new_tokens: int,
        return_logprob: bool,
        top_logprobs: int,
        vocab_size: int | None = None,
    ) -> tuple[SamplingParams, StoppingCriteria]:
        return sampling.build(
            self.model_dump(),
            defaults=defaults,
            eos_ids=eos_ids,
            max_new_tokens=max_new_tokens,
            return_logprob=return_logprob,
            top_logprobs=top_logprobs,
            vocab_size=vocab_size,
        )


class ChatCompletionRequest(SamplingRequest):
    messages: list[Any]
    logprobs: bool = False
    top_logprobs: int | None = Field(None, ge=0, le=20)
    chat_template_kwargs: dict[str, Any] | None = None
    add_generation_prompt: bool = True
    continue_final_message: bool = False
    tools: list[Any] | None = None
    tool_choice: str | dict[str, Any] | None = None
    _tool_choice: ToolChoice = PrivateAttr(default=ToolChoice("none"))

    @model_validator(mode="after")
    def _check_logprobs(self):
        if self.top_logprobs and not self.logprobs:
            raise InvalidRequestError("top_logprobs requires logprobs to be true", param="top_logprobs")
        if not self.messages:
            raise InvalidRequestError("messages must be a non-empty list", param="messages")
        self._tool_choice = check_tools(self.tools, self.tool_choice)
        if self.continue_final_message and self.add_generation_prompt:
            raise InvalidRequestError(
                "continue_final_message and add_generation_prompt cannot both be true",
                param="continue_final_message",
            )
        if self.continue_final_message and (
            not isinstance(self.messages[-1], dict) or self.messages[-1].get("role") != "assistant"
        ):
            raise InvalidRequestError(
                "continue_final_message needs the last message to be the assistant's",
                param="continue_final_message",
            )
        return self

    @property
    def resolved_tool_choice(self) -> ToolChoice:
        """tool_choice with OpenAI's default filled in ("auto" with tools, else "none")."""
        return self._tool_choice


class CompletionRequest(SamplingRequest):
    prompt: str | list[int] | list[str] | list[list[int]]
    logprobs: int | None = Field(None, ge=0, le=20)
    echo: bool = False
    suffix: str | None = None
    image_data: str | list[str] | None = None  # SGLang extra: images for a multimodal raw prompt

    @model_validator(mode="after")
    def _check_prompt(self):
        if self.suffix:
            raise InvalidRequestError("suffix is not supported", param="suffix")
        if self.prompt == "" or self.prompt == []:
            raise InvalidRequestError("prompt must not be empty", param="prompt")
        if len(self.prompts) * self.n > MAX_CHOICES:
            raise InvalidRequestError(
                f"prompts x n is {len(self.prompts) * self.n}; one request may ask for at most {MAX_CHOICES} "
                "completions",
                param="prompt",
            )
        return self

    @property
    def prompts(self) -> list[str | list[int]]:
        p = self.prompt
        if isinstance(p, str):
            return [p]
        if p and isinstance(p[0], int):
            return [p]
        return list(p)


class GenerateBody(BaseModel):
    """SGLang's native /generate."""

    model_config = ConfigDict(extra="allow")

    text: str | list[str] | None = None
    input_ids: list[int] | list[list[int]] | None = None
    image_data: str | list[str] | None = None
    sampling_params: dict[str, Any] = Field(default_factory=dict)
    stream: bool = False
    return_logprob: bool = False
    top_logprobs_num: int = Field(0, ge=0, le=20)
    # SGLang: prompt log-probabilities from this position to the prompt's end (-1: none); position 0 has none
    logprob_start_len: int = Field(-1, ge=-1)
    return_text_in_logprobs: bool = False  # each logprob entry's third element: the token's text, not null
    rid: str | None = None
    cache_salt: str | None = None  # as on the OpenAI routes (vLLM's)

    def to_completion(self, model: str) -> CompletionRequest:
        """The same request as a text completion, which is how it is served; a field it refuses is named as the
        caller wrote it (`sampling_params.max_new_tokens`, not `max_tokens`)."""
        fields = sampling.from_sglang(self.sampling_params)
        fields.setdefault("max_tokens", 128)
        if self.zero_new_tokens:  # answered without generating; the rest of the request is still checked
            fields["max_tokens"] = 1
        body = {"model": model, "prompt": self.text or self.input_ids, "image_data": self.image_data}
        try:
            return CompletionRequest.model_validate(
                {**body, "stream": self.stream, "rid": self.rid, "cache_salt": self.cache_salt, **fields}
            )
        except ValidationError as e:  # e.g. top_p=0 or frequency_penalty=[]: each was a 500 once
            first = e.errors()[0]
            param = self.sglang_param(".".join(str(x) for x in first.get("loc", ())))
            raise InvalidRequestError(f"{param}: {first.get('msg', 'invalid value')}", param=param) from None
        except InvalidRequestError as e:
            if e.param:
                e.param = self.sglang_param(e.param)
            raise

    @property
    def zero_new_tokens(self) -> bool:
        """max_new_tokens 0: SGLang answers with the prompt's meta_info and no completion tokens."""
        value = self.sampling_params.get("max_new_tokens")
        return isinstance(value, int | float) and not isinstance(value, bool) and value == 0

    def sglang_param(self, name: str) -> str:
        head, dot, rest = name.partition(".")
        if head == "prompt":
            head = "text" if self.text is not None else "input_ids"
        elif head in _FROM_SGLANG:
            head = f"sampling_params.{_FROM_SGLANG[head]}"
        return head + dot + rest

    @model_validator(mode="after")
    def _check(self):
        if (self.text is None) == (self.input_ids is None):
            raise InvalidRequestError("give exactly one of text and input_ids", param="text")
        prompts = [self.text] if isinstance(self.text, str) else self.text or self.input_ids
        if self.input_ids and isinstance(self.input_ids[0], int):
            prompts = [self.input_ids]
        if not prompts or any(not p for p in prompts):
            raise InvalidRequestError(
                "the prompt must not be empty", param="text" if self.text is not None else "input_ids"
            )
        n = self.sampling_params.get("n")
        n = n if isinstance(n, int) and not isinstance(n, bool) and n > 0 else 1  # n itself is checked later
        if len(prompts) * n > MAX_CHOICES:
            raise InvalidRequestError(f"a batch may ask for at most {MAX_CHOICES} completions", param="text")
        return self

    @property
    def is_batch(self) -> bool:
        """`text` as a list or `input_ids` as a list of lists: the answer is a list too."""
        return isinstance(self.text, list) or bool(self.input_ids and isinstance(self.input_ids[0], list))
