"""Structured output (issue 13) through a real cluster: hundreds of sampled choices at temperature 1 over several
JSON schemas parse and validate, streaming and not, with n > 1 and with an image; regex and EBNF on chat,
completions and /generate; unconstrained requests batched with constrained ones keep their outputs; invalid specs
are a 400 before any stream; a grammar that cannot close ends with "length"; logprobs stay finite."""

from __future__ import annotations

import json
import math
import re
from concurrent.futures import ThreadPoolExecutor

import jsonschema
import openai
import pytest

from tests.helpers import SERVED, Cluster, image_part, noise_image

SCHEMAS = {
    "nested": {
        "type": "object",
        "properties": {
            "user": {
                "type": "object",
                "properties": {
                    "id": {"type": "integer", "minimum": 1, "maximum": 999},
                    "key": {"type": "string", "format": "uuid"},
                    "ip": {"type": "string", "format": "ipv4"},
                },
                "required": ["id", "key", "ip"],
                "additionalProperties": False,
            },
            "ok": {"type": "boolean"},
        },
        "required": ["user", "ok"],
        "additionalProperties": False,
    },
    "array": {
        "type": "object",
        "properties": {
            "xs": {
                "type": "array",
                "items": {"type": "integer", "minimum": 0, "maximum": 9},
                "minItems": 2,
                "maxItems": 4,
            },
            "more": {"type": "array", "items": {"type": "boolean"}, "maxItems": 2},
        },
        "required": ["xs", "more"],
        "additionalProperties": False,
    },
    "enum_number": {
        "type": "object",
        "properties": {
            "color": {"enum": ["red", "green", "blue"]},
            "score": {"type": "number", "minimum": 0, "maximum": 1},
            "level": {"type": "integer", "minimum": -3, "maximum": 3},
        },
        "required": ["color", "score", "level"],
        "additionalProperties": False,
    },
    "pattern_format": {
        "type": "object",
        "properties": {
            "code": {"type": "string", "pattern": "^[A-Z]{2}-[0-9]{3}$"},
            "day": {"type": "string", "format": "date"},
        },
        "required": ["code", "day"],
        "additionalProperties": False,
    },
    "optional": {
        "type": "object",
        "properties": {
            "name": {"type": "string", "minLength": 1, "maxLength": 8},
            "nick": {"type": "string", "maxLength": 4},
        },
        "required": ["name"],
        "additionalProperties": False,
    },
}
CHECKER = jsonschema.FormatChecker()


@pytest.fixture(scope="module")
def cluster(default_model, log_dir):
    c = Cluster(default_model, "--page-size", "8", log_dir=log_dir, name="grammar")
    yield c
    c.stop()


@pytest.fixture(scope="module")
def client(cluster):
    return openai.OpenAI(base_url=cluster.base_url + "/v1", api_key="unused", max_retries=0, timeout=120)


def _response_format(name: str) -> dict:
    return {"type": "json_schema", "json_schema": {"name": name, "schema": SCHEMAS[name], "strict": True}}


def _chat(
    client, name: str, i: int, stream: bool, n: int = 2, pad: int = 0, **extra
) -> list[tuple[str, str]]:
    """(text, finish_reason) of each choice; `pad` words of preamble make the prompt longer."""
    preamble = " ".join(f"w{i}x{j}" for j in range(pad))
    messages = [
        {"role": "user", "content": f"{preamble}Request {i}: describe item {i * 7 % 13} as {name} JSON."}
    ]
    kw = dict(model=SERVED, messages=messages, max_tokens=96, temperature=1.0, n=n, seed=i, **extra)
    if "response_format" not in kw:
        kw["response_format"] = _response_format(name)
    if not stream:
        r = client.chat.completions.create(**kw)
        return [(c.message.content, c.finish_reason) for c in sorted(r.choices, key=lambda c: c.index)]
    texts, reasons = [""] * n, [None] * n
    for chunk in client.chat.completions.create(stream=True, **kw):
        for c in chunk.choices:
            texts[c.index] += c.delta.content or ""
            reasons[c.index] = c.finish_reason or reasons[c.index]
    return list(zip(texts, reasons, strict=True))


@pytest.mark.parametrize("stream", [False, True])
def test_sampled_json_validates_against_its_schema(cluster, client, stream):
    jobs = [(name, i) for name in SCHEMAS for i in range(20)]
    with ThreadPoolExecutor(32) as pool:
        results = list(pool.map(lambda job: _chat(client, *job, stream=stream), jobs))
    num = 0
    distinct: dict[str, set[str]] = {}
    for (name, _), choices in zip(jobs, results, strict=True):
        for text, reason in choices:
            assert reason == "stop", (name, text)
            jsonschema.validate(json.loads(text), SCHEMAS[name], format_checker=CHECKER)
            assert "\n" not in text and ": " not in text  # compact JSON by default
            distinct.setdefault(name, set()).add(text)
            num += 1
    assert num == 200
    assert sum(len(v) for v in distinct.values()) > 20  # sampled, not one greedy answer per schema


def _tokens(cluster, i: int) -> list[int]:
    messages = [{"role": "user", "content": f"Tell me about the number {i}."}]
    body = cluster.chat_ok(messages, max_tokens=24, temperature=0, return_token_ids=True, ignore_eos=True)
    return body["choices"][0]["token_ids"]


def test_unconstrained_requests_batched_with_constrained_keep_their_outputs(cluster, client):
    alone = [_tokens(cluster, i) for i in range(6)]
    with ThreadPoolExecutor(24) as pool:
        constrained = [pool.submit(_chat, client, name, i, False) for name in SCHEMAS for i in range(3)]
        plain = [pool.submit(_tokens, cluster, i) for i in range(6)]
        together = [f.result() for f in plain]
        for f in constrained:
            assert all(reason == "stop" for _, reason in f.result())
    assert together == alone


def test_json_object_with_an_image(cluster, client):
    messages = [
        {
            "role": "user",
            "content": [image_part(noise_image(64, 48, seed=3)), {"type": "text", "text": "JSON please"}],
        }
    ]
    for stream in (False, True):
        kw = dict(
            model=SERVED,
            messages=messages,
            max_tokens=48,
            temperature=1.0,
            n=2,
            response_format={"type": "json_object"},
        )
        if stream:
            texts = [""] * 2
            for chunk in client.chat.completions.create(stream=True, **kw):
                for c in chunk.choices:
                    texts[c.index] += c.delta.content or ""
        else:
            texts = [c.message.content for c in client.chat.completions.create(**kw).choices]
        for text in texts:
            if text.startswith("{") and not text.endswith("}"):
                continue  # a long object cut by max_tokens: a prefix of one
            assert isinstance(json.loads(text), dict), text


def test_regex_and_ebnf_on_every_route(cluster, client):
    r = client.chat.completions.create(
        model=SERVED,
        messages=[{"role": "user", "content": "A code"}],
        max_tokens=16,
        n=4,
        extra_body={"regex": "[A-F]{2}[0-9]{2}"},
    )
    assert all(re.fullmatch("[A-F]{2}[0-9]{2}", c.message.content) for c in r.choices)
    assert all(c.finish_reason == "stop" for c in r.choices)
    r = client.completions.create(
        model=SERVED, prompt="Answer:", max_tokens=8, n=3, extra_body={"ebnf": 'root ::= "yes" | "no"'}
    )
    assert {c.text for c in r.choices} <= {"yes", "no"}
    body = {
        "text": ["Once", "Twice"],
        "sampling_params": {
            "max_new_tokens": 32,
            "temperature": 1.0,
            "json_schema": json.dumps(SCHEMAS["array"]),
        },
    }
    out = cluster.http.post("/generate", json=body)
    assert out.status_code == 200, out.text
    for item in out.json():
        jsonschema.validate(json.loads(item["text"]), SCHEMAS["array"])
    out = cluster.http.post(
        "/generate", json={"text": "x", "sampling_params": {"max_new_tokens": 8, "regex": "(ab|cd){2}"}}
    )
    assert re.fullmatch("(ab|cd){2}", out.json()["text"])


@pytest.mark.parametrize(
    ("body", "words"),
    [
        ({"regex": "[a-"}, "unclosed character class"),
        ({"ebnf": "root ::= undefined_rule"}, "undefined_rule"),
        (
            {
                "response_format": {
                    "type": "json_schema",
                    "json_schema": {"name": "x", "schema": {"type": "foo"}},
                }
            },
            "foo",
        ),
        ({"response_format": {"type": "xml"}}, "xml"),
        ({"response_format": {"type": "json_object"}, "regex": "a"}, "at most one"),
        ({"json_schema": "{not json"}, "not valid JSON"),
    ],
)
@pytest.mark.parametrize("stream", [False, True])
def test_invalid_specs_are_400_before_any_stream(cluster, body, words, stream):
    r = cluster.chat([{"role": "user", "content": "hi"}], max_tokens=4, stream=stream, **body)
    assert r.status_code == 400, r.text
    assert r.headers["content-type"].startswith("application/json")
    assert words in r.json()["error"]["message"]


def test_invalid_generate_spec_is_400(cluster):
    r = cluster.http.post("/generate", json={"text": "x", "sampling_params": {"json_schema": '{"type": 1}'}})
    assert r.status_code == 400, r.text


def test_grammar_that_cannot_close_ends_with_length(client):
    r = client.chat.completions.create(
        model=SERVED,
        messages=[{"role": "user", "content": "JSON"}],
        max_tokens=4,
        response_format=_response_format("nested"),
    )
    c = r.choices[0]
    assert c.finish_reason == "length" and r.usage.completion_tokens == 4
    assert c.message.content.startswith('{"user":{')


def test_logprobs_stay_finite(cluster):
    r = cluster.chat(
        [{"role": "user", "content": "digits"}],
        max_tokens=8,
        temperature=1.0,
        logprobs=True,
        top_logprobs=5,
        regex="[0-9]{4}",
    )
    assert r.status_code == 200
    assert "Infinity" not in r.text and "NaN" not in r.text
    content = r.json()["choices"][0]["logprobs"]["content"]
    assert len(content) >= 1
    for entry in content:
        assert math.isfinite(entry["logprob"]) and entry["logprob"] <= 0
        assert all(math.isfinite(t["logprob"]) for t in entry["top_logprobs"])


def test_server_info_shows_the_grammar_backend(cluster, client):
    _chat(client, "optional", 0, stream=False)
    _chat(client, "optional", 0, stream=False)
    info = cluster.http.get("/server_info").json()["grammar_info"]
    assert info["backend"] == "llguidance" and info["version"] == "1.9.1"
    assert info["compiles"] >= 1 and info["cache_hits"] >= 1 and info["compile_seconds_total"] > 0
    metrics = cluster.scrape("scheduler")
    assert "mirador:grammar_compile_seconds_count" in metrics


@pytest.mark.slow
def test_constrained_requests_survive_preemption(default_model, log_dir):
    c = Cluster(
        default_model,
        "--max-total-tokens",
        "640",
        "--page-size",
        "4",
        "--chunked-prefill-size",
        "32",
        log_dir=log_dir,
        name="grammar-preempt",
    )
    try:
        client = openai.OpenAI(base_url=c.base_url + "/v1", api_key="unused", max_retries=0, timeout=120)
        jobs = [(name, i) for name in ("nested", "pattern_format", "optional") for i in range(8)]
        with ThreadPoolExecutor(24) as pool:
            results = list(pool.map(lambda job: _chat(client, *job, stream=False, n=1, pad=40), jobs))
        for (name, _), choices in zip(jobs, results, strict=True):
            for text, reason in choices:
                assert reason == "stop", text
                jsonschema.validate(json.loads(text), SCHEMAS[name], format_checker=CHECKER)
        assert c.stats().num_preemptions > 0, "the pool was meant to be too small for the batch"
    finally:
        c.stop()
