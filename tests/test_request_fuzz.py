"""Property tests of the request parsers (issue 10 item 8): any JSON body either validates or is refused with a
request error (a 4xx); nothing else escapes (a 500)."""

from __future__ import annotations

import contextlib
import json

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from pydantic import ValidationError

from common.errors import InvalidRequestError, MiradorError
from gateway.protocol import ChatCompletionRequest, CompletionRequest, GenerateBody
from processor import sampling
from processor.request_builder import normalize_messages

# JSON values, strings with any code point (lone surrogates included: JSON can spell them), big integers
SCALARS = (
    st.none()
    | st.booleans()
    | st.integers(min_value=-(2**70), max_value=2**70)
    | st.floats(allow_nan=False)
    | st.text(max_size=12)
)
JSON = st.recursive(
    SCALARS,
    lambda inner: st.lists(inner, max_size=4) | st.dictionaries(st.text(max_size=8), inner, max_size=4),
    max_leaves=12,
)
FIELDS = st.sampled_from(
    [
        "model", "messages", "prompt", "max_tokens", "temperature", "top_p", "top_k", "min_p", "n", "stop",
        "stop_token_ids", "seed", "logit_bias", "min_tokens", "stream", "stream_options", "logprobs",
        "top_logprobs", "chat_template_kwargs", "presence_penalty", "frequency_penalty", "repetition_penalty",
        "text", "input_ids", "sampling_params", "image_data", "rid", "max_completion_tokens", "ignore_eos",
    ]
)  # fmt: skip
BODIES = st.dictionaries(FIELDS, JSON, max_size=6)
CHAT_PARTS = st.lists(
    st.fixed_dictionaries(
        {"role": st.sampled_from(["user", "system", "assistant", "tool", "x"]) | JSON, "content": JSON}
    )
    | JSON,
    max_size=3,
)
REQUEST_ERRORS = (ValidationError, MiradorError)


def _validate(model, body):
    try:
        return model.model_validate(body)
    except REQUEST_ERRORS:
        return None


@settings(max_examples=300, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(body=BODIES, model=st.sampled_from([ChatCompletionRequest, CompletionRequest, GenerateBody]))
def test_any_body_validates_or_is_a_request_error(body, model):
    req = _validate(model, body)
    if req is None or model is GenerateBody:
        return
    # a validated request builds its sampling parameters or is refused as a request error
    with contextlib.suppress(MiradorError):
        req.to_params(defaults={}, eos_ids=(2,), max_new_tokens=16, return_logprob=False, top_logprobs=0)


@settings(max_examples=300, deadline=None)
@given(messages=CHAT_PARTS | JSON)
def test_any_messages_normalize_or_are_a_request_error(messages):
    try:
        normalized, refs = normalize_messages(messages)
    except InvalidRequestError:
        return
    json.dumps(normalized)  # what the chat template receives is plain JSON
    assert all(isinstance(r.url, str) for r in refs)


@settings(max_examples=300, deadline=None)
@given(fields=st.dictionaries(st.sampled_from(sorted(sampling.SGLANG_KEYS)), JSON, max_size=5))
def test_sglang_sampling_params_build_or_are_a_request_error(fields):
    with contextlib.suppress(MiradorError):
        sampling.build(
            sampling.from_sglang(fields), defaults={}, eos_ids=(2,), max_new_tokens=16, return_logprob=False
        )


@settings(max_examples=300, deadline=None)
@given(fields=st.dictionaries(st.sampled_from(sorted(sampling.SGLANG_KEYS)), JSON, max_size=5))
def test_generate_bodies_become_completions_or_are_request_errors(fields):
    """/generate is served as a completion: SGLang's params go through CompletionRequest's validation too, and
    what it refused (top_p=0, frequency_penalty=[]) escaped as a 500 once."""
    with contextlib.suppress(MiradorError):
        req = GenerateBody(text="hi", sampling_params=fields).to_completion("m")
        req.to_params(defaults={}, eos_ids=(2,), max_new_tokens=16, return_logprob=False, top_logprobs=0)


@pytest.mark.parametrize(
    "fields",
    [
        {"top_k": "5"},
        {"stop_token_ids": ["a"]},
        {"min_new_tokens": [1]},
        {"temperature": "hot"},
        {"seed": 1.5},
        {"top_k": float("inf")},
        {"temperature": float("nan")},
    ],
)
def test_wrong_types_in_sglang_params_are_request_errors(fields):
    with pytest.raises(MiradorError):
        sampling.build(
            sampling.from_sglang(fields), defaults={}, eos_ids=(2,), max_new_tokens=16, return_logprob=False
        )
