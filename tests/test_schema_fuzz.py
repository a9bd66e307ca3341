"""schemathesis against the live gateway's published OpenAPI schema (issue 10 item 8): for requests generated from
the schema, valid and invalid, the gateway never answers 5xx, and every answer (status, media type, JSON body,
each streamed event, Retry-After) is one the schema declares."""

from __future__ import annotations

import collections
import math
from typing import Any

import pytest
import requests
import schemathesis
from hypothesis import HealthCheck, given, reject, settings
from hypothesis import strategies as st
from schemathesis.checks import not_a_server_error
from schemathesis.specs.openapi.checks import (
    content_type_conformance,
    response_headers_conformance,
    response_schema_conformance,
    status_code_conformance,
)

from tests.helpers import Cluster

CHECKS = [
    not_a_server_error,
    status_code_conformance,
    content_type_conformance,
    response_headers_conformance,
    response_schema_conformance,
]
pytestmark = pytest.mark.slow


CONTEXT = 96  # tokens: a short context makes a completion cheap; max_tokens past it is a 400
MAX_TOKENS_ASKED = CONTEXT  # generated requests that may ask for more (n x prompts x max_tokens) are skipped


@pytest.fixture(scope="module")
def cluster(default_model, log_dir):
    c = Cluster(default_model, "--context-length", str(CONTEXT), log_dir=log_dir, name="schema-fuzz")
    yield c
    c.stop()


@pytest.fixture(scope="module")
def session():
    with requests.Session() as s:
        s.trust_env = False  # no proxy: loopback only
        yield s


@pytest.fixture(scope="module")
def api_schema(cluster):
    return schemathesis.openapi.from_dict(cluster.http.get("/openapi.json").json())


# every route the gateway publishes: a new one fails test_the_schema_lists_every_route until it is fuzzed here too
GENERATING = ["/v1/chat/completions", "/v1/completions", "/generate"]
INFO = [
    "/v1/models",
    "/v1/models/{model_id}",
    "/health",
    "/model_info",
    "/get_model_info",
    "/server_info",
    "/get_server_info",
    "/metrics",
]
ACTIONS = ["/flush_cache"]  # POST without a body
EXAMPLES = 60  # requests per generating route


def _names_a_remote_url(value: Any) -> bool:
    """The gateway fetches http(s) image URLs; generated requests must not make it reach past loopback."""
    if isinstance(value, str):
        return ":" in value and value.split(":", 1)[0].strip().lower() in ("http", "https")
    if isinstance(value, dict):
        return any(_names_a_remote_url(k) or _names_a_remote_url(v) for k, v in value.items())
    if isinstance(value, list):
        return any(_names_a_remote_url(v) for v in value)
    return False


def _count(value: Any, default: int) -> int:
    ok = (
        isinstance(value, int | float) and not isinstance(value, bool) and math.isfinite(value) and value >= 1
    )
    return int(value) if ok else default


def _tokens_asked(body: Any) -> int:
    """An upper bound on the tokens a generated body asks the cluster for (pydantic also takes 2.0 for 2)."""
    if not isinstance(body, dict):
        return 0
    params = body.get("sampling_params")
    params = params if isinstance(params, dict) else body  # /generate's are SGLang's
    per_completion = min(
        CONTEXT,
        *(_count(params.get(k), CONTEXT) for k in ("max_tokens", "max_completion_tokens", "max_new_tokens")),
    )
    prompt = body.get("prompt", body.get("text", body.get("input_ids")))  # /generate takes batches too
    num_prompts = len(prompt) if isinstance(prompt, list) and prompt and not isinstance(prompt[0], int) else 1
    return per_completion * _count(params.get("n"), 1) * num_prompts


def test_the_schema_lists_every_route(api_schema):
    published = {(op.ok().method.upper(), op.ok().path) for op in api_schema.get_all_operations()}
    assert published == {("POST", p) for p in GENERATING + ACTIONS} | {("GET", p) for p in INFO}


def _fuzz(operation, cluster, session, max_examples: int) -> None:
    # valid requests reach deeper (the scheduler, the worker, streaming) than invalid ones: two of three
    positive, negative = (operation.as_strategy(generation_mode=m) for m in schemathesis.GenerationMode)

    @given(case=st.one_of(positive, positive, negative))
    @settings(
        max_examples=max_examples, deadline=None, database=None, suppress_health_check=list(HealthCheck)
    )
    def run(case):
        if _names_a_remote_url(case.body) or _tokens_asked(case.body) > MAX_TOKENS_ASKED:
            reject()
        r = case.call_and_validate(base_url=cluster.base_url, session=session, checks=CHECKS, timeout=180)
        streamed = r.headers.get("content-type", [""])[0].startswith("text/event-stream")
        seen[(r.status_code, "stream" if streamed else "json")] += 1

    seen = collections.Counter()
    run()
    print(f"{operation.label}: {dict(seen)}")


@pytest.mark.parametrize("path", GENERATING)
def test_generated_requests_get_declared_answers_and_never_5xx(api_schema, cluster, session, path):
    _fuzz(api_schema[path]["POST"], cluster, session, EXAMPLES)


@pytest.mark.parametrize("path", GENERATING)
def test_the_schemas_own_examples_succeed_as_declared(api_schema, cluster, session, path):
    """The published examples (an image, a stream with usage, logprobs, several prompts) each answer 200 in the
    declared shape, streamed events included, so the check of 200 answers never rests on chance."""
    operation = api_schema[path]["POST"]
    examples = operation.definition.raw["requestBody"]["content"]["application/json"]["examples"]
    assert len(examples) >= 2
    for name, example in examples.items():
        case = operation.Case(body=example["value"], media_type="application/json")
        r = case.call_and_validate(base_url=cluster.base_url, session=session, checks=CHECKS, timeout=180)
        assert r.status_code == 200, (name, r.text)
        if example["value"].get("stream"):
            assert r.text.rstrip().endswith("data: [DONE]"), (name, r.text)


@pytest.mark.parametrize("path", INFO)
def test_info_routes_answer_as_declared(api_schema, cluster, session, path):
    _fuzz(api_schema[path]["GET"], cluster, session, 3)


@pytest.mark.parametrize("path", ACTIONS)
def test_actions_answer_as_declared(api_schema, cluster, session, path):
    _fuzz(api_schema[path]["POST"], cluster, session, 3)
