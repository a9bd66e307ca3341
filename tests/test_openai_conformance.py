"""The applicable cases of the peers' OpenAI-server suites, re-expressed against a real cluster with the official
client: shapes, types, indices, usage arithmetic and error codes, never answer content (the default model's weights
are random). Each case names the peer test it comes from: SGLang's test/srt/openai_server/ and
test_vision_openai_server*.py, vLLM's tests/entrypoints/openai/."""

from __future__ import annotations

import re

import openai
import pytest

from common.types import GenerateRequest
from processor.tokenizer import Tokenizer
from tests.helpers import SERVED, Cluster, image_part, noise_image

PROMPT = "The capital of France is"
CHAT = [
    {"role": "system", "content": "You are a helpful AI assistant"},
    {"role": "user", "content": "What is the capital of France? Answer in a few words."},
]


@pytest.fixture(scope="module")
def cluster(default_model, log_dir):
    c = Cluster(default_model, "--page-size", "8", log_dir=log_dir, name="conformance")
    yield c
    c.stop()


@pytest.fixture(scope="module")
def client(cluster):
    return openai.OpenAI(base_url=cluster.base_url + "/v1", api_key="unused", max_retries=0)


@pytest.fixture(scope="module")
def tokenizer(default_model):
    return Tokenizer(default_model)


# ---- completions ----


# SGLang basic/test_openai_server.py::TestOpenAIServer::test_completion (run_completion)
@pytest.mark.parametrize("echo", [False, True])
@pytest.mark.parametrize("logprobs", [None, 5])
@pytest.mark.parametrize("use_list_input", [False, True])
@pytest.mark.parametrize("n", [1, 2])
@pytest.mark.parametrize("token_input", [False, True])
def test_completion(client, tokenizer, echo, logprobs, use_list_input, n, token_input):
    prompt = tokenizer.encode(PROMPT) if token_input else PROMPT
    num_prompt_tokens = len(tokenizer.encode(PROMPT))
    prompts = [prompt, prompt] if use_list_input else prompt
    kw = {
        "model": SERVED,
        "prompt": prompts,
        "temperature": 0,
        "max_tokens": 32,
        "logprobs": logprobs,
        "n": n,
    }
    r = client.completions.create(**kw, echo=echo)
    if echo:
        assert all(c.text.startswith(PROMPT) for c in r.choices)
    num_choices = 2 if use_list_input else 1
    assert len(r.choices) == num_choices * n
    assert [c.index for c in r.choices] == list(range(num_choices * n))
    if logprobs:
        lp = r.choices[0].logprobs
        assert isinstance(lp.tokens[0], str) and isinstance(lp.top_logprobs[1], dict)
        assert 0 < len(lp.top_logprobs[1]) <= logprobs
        if echo:  # the prompt's tokens come first; nothing predicts the first one
            assert lp.token_logprobs[0] is None and lp.top_logprobs[0] is None
            assert "".join(lp.tokens[:num_prompt_tokens]) == PROMPT and len(lp.tokens) > num_prompt_tokens
            assert None not in lp.token_logprobs[1:]
        else:  # the first logprob is the first output token's
            assert lp.token_logprobs[0] is not None
        assert len(lp.tokens) == len(lp.token_logprobs) == len(lp.top_logprobs) == len(lp.text_offset)
    else:
        assert r.choices[0].logprobs is None
    assert r.id and r.created and r.object == "text_completion"
    assert r.usage.prompt_tokens == num_prompt_tokens * num_choices
    assert r.usage.completion_tokens > 0
    assert r.usage.total_tokens == r.usage.prompt_tokens + r.usage.completion_tokens


# SGLang basic/test_openai_server.py::TestOpenAIServer::test_completion_stream (run_completion_stream)
@pytest.mark.parametrize(("echo", "logprobs"), [(False, None), (False, 5), (True, None), (True, 5)])
@pytest.mark.parametrize("use_list_input", [False, True])
@pytest.mark.parametrize("n", [1, 2])
def test_completion_stream(client, echo, logprobs, use_list_input, n):
    prompts = [PROMPT, PROMPT] if use_list_input else PROMPT
    stream = client.completions.create(
        model=SERVED,
        prompt=prompts,
        temperature=0,
        max_tokens=32,
        echo=echo,
        logprobs=logprobs,
        n=n,
        stream=True,
        stream_options={"include_usage": True},
    )
    seen: set[int] = set()
    usages = []
    for chunk in stream:
        assert chunk.id and chunk.created
        if chunk.usage is not None:
            usages.append(chunk.usage)
            assert chunk.choices == []
            continue
        choice = chunk.choices[0]
        first_event = choice.index not in seen
        if echo and first_event:
            assert choice.text.startswith(PROMPT)
        seen.add(choice.index)
        if logprobs and choice.logprobs and choice.logprobs.tokens:
            assert isinstance(choice.logprobs.tokens[0], str)
            first = choice.logprobs.top_logprobs[0]
            if echo and first_event:  # the prompt's first token: null entries
                assert first is None and choice.logprobs.token_logprobs[0] is None
            else:
                assert isinstance(first, dict) and first
    assert seen == set(range((2 if use_list_input else 1) * n))
    assert len(usages) == 1
    usage = usages[0]
    assert usage.prompt_tokens > 0 and usage.completion_tokens > 0
    assert usage.total_tokens == usage.prompt_tokens + usage.completion_tokens


# vLLM completion/test_completion.py::test_single_completion
def test_single_completion(client):
    r = client.completions.create(model=SERVED, prompt="Hello, my name is", max_tokens=5, temperature=0.0)
    assert r.id and len(r.choices) == 1
    assert r.choices[0].finish_reason in ("length", "stop")
    assert r.usage.total_tokens == r.usage.prompt_tokens + r.usage.completion_tokens
    assert r.usage.completion_tokens <= 5


# vLLM completion/test_completion.py::test_zero_logprobs: logprobs=0 gives the sampled token's logprob, no top ones
def test_zero_logprobs(client):
    r = client.completions.create(
        model=SERVED, prompt=[0, 0, 0, 0, 0], max_tokens=5, temperature=0.0, logprobs=0
    )
    lp = r.choices[0].logprobs
    assert lp is not None and len(lp.token_logprobs) == 5
    assert all(isinstance(v, float) for v in lp.token_logprobs)
    assert all(len(t) <= 1 for t in lp.top_logprobs)


# vLLM completion/test_completion.py::test_too_many_completion_logprobs (OpenAI's limit is 5, ours 20 as SGLang's)
def test_too_many_completion_logprobs(client):
    with pytest.raises(openai.BadRequestError):
        client.completions.create(model=SERVED, prompt=[0, 0, 0, 0, 0], max_tokens=5, logprobs=21)
    with pytest.raises(openai.BadRequestError):  # streamed: refused before the stream starts
        client.completions.create(
            model=SERVED, prompt=[0, 0, 0, 0, 0], max_tokens=5, logprobs=21, stream=True
        )


# vLLM completion/test_completion.py::test_completion_streaming: the stream's text is the answer's text
def test_completion_streaming(client):
    kw = {"model": SERVED, "prompt": "What is an LLM?", "max_tokens": 5, "temperature": 0.0}
    single = client.completions.create(**kw)
    chunks = [c.choices[0].text for c in client.completions.create(**kw, stream=True) if c.choices]
    finishes = [c.choices[0].finish_reason for c in client.completions.create(**kw, stream=True) if c.choices]
    assert "".join(chunks) == single.choices[0].text
    assert finishes[-1] == single.choices[0].finish_reason and finishes.count(None) == len(finishes) - 1


# vLLM completion/test_completion.py::test_parallel_streaming: n choices, each indexed, each finished once
def test_parallel_streaming(client):
    n = 3
    stream = client.completions.create(
        model=SERVED, prompt="What is an LLM?", max_tokens=8, n=n, temperature=1.0, stream=True, seed=42
    )
    texts = [""] * n
    finishes = [0] * n
    for chunk in stream:
        c = chunk.choices[0]
        texts[c.index] += c.text
        finishes[c.index] += c.finish_reason is not None
    assert finishes == [1] * n and all(isinstance(t, str) for t in texts)


# vLLM completion/test_completion.py::test_completion_stream_options: include_usage (null until the last event,
# which has no choices) and continuous_usage_stats (counts on every event)
@pytest.mark.parametrize("continuous", [False, True])
def test_completion_stream_options(client, continuous):
    opts = {"include_usage": True, "continuous_usage_stats": continuous}
    chunks = list(
        client.completions.create(
            model=SERVED,
            prompt="What is the capital of France?",
            max_tokens=5,
            temperature=0.0,
            stream=True,
            stream_options=opts,
        )
    )
    final = chunks[-1]
    assert final.choices == [] and final.usage.completion_tokens > 0
    assert final.usage.total_tokens == final.usage.prompt_tokens + final.usage.completion_tokens
    for c in chunks[:-1]:
        if continuous:
            assert c.usage is not None
            assert c.usage.total_tokens == c.usage.prompt_tokens + c.usage.completion_tokens
        else:
            assert c.usage is None
    with pytest.raises(openai.BadRequestError):  # stream_options without stream
        client.completions.create(model=SERVED, prompt="x", max_tokens=5, stream=False, stream_options=opts)


# vLLM completion/test_completion.py::test_batch_completions: a batch of prompts, answered and streamed
def test_batch_completions(client):
    prompts = ["Hello, my name is"] * 2
    r = client.completions.create(model=SERVED, prompt=prompts, max_tokens=5, temperature=0.0)
    assert len(r.choices) == 2 and r.choices[0].text == r.choices[1].text  # greedy, same prompt
    texts = ["", ""]
    for chunk in client.completions.create(
        model=SERVED, prompt=prompts, max_tokens=5, temperature=0.0, stream=True
    ):
        texts[chunk.choices[0].index] += chunk.choices[0].text
    assert texts == [c.text for c in r.choices]


# vLLM completion/test_empty_prompt_list.py and test_prompt_validation.py::test_empty_prompt
@pytest.mark.parametrize("prompt", ["", [], [[]]])
def test_empty_prompt_is_400(client, prompt):
    with pytest.raises(openai.BadRequestError):
        client.completions.create(model=SERVED, prompt=prompt, max_tokens=5)


# vLLM completion/test_completion_text_offset.py: offsets start at 0 and grow by each token's length
def test_completion_text_offset(client):
    r = client.completions.create(model=SERVED, prompt="Hello", max_tokens=6, temperature=0, logprobs=1)
    lp = r.choices[0].logprobs
    assert lp.text_offset[0] == 0
    assert [b - a for a, b in zip(lp.text_offset, lp.text_offset[1:], strict=False)] == [
        len(t) for t in lp.tokens[:-1]
    ]


# SGLang validation/test_request_length_validation.py: a prompt past the context, max_tokens past the context
def test_request_length_validation(client, cluster):
    context = cluster.http.get("/server_info").json()["context_length"]
    with pytest.raises(openai.BadRequestError) as e:
        client.completions.create(model=SERVED, prompt=[9707] * (context + 1), max_tokens=5)
    assert e.value.body["code"] == "context_length_exceeded"
    with pytest.raises(openai.BadRequestError) as e:
        client.chat.completions.create(model=SERVED, messages=CHAT, max_tokens=context)
    assert e.value.body["code"] == "context_length_exceeded"


# SGLang validation/test_openai_server_ignore_eos.py: ignore_eos runs to max_tokens
def test_ignore_eos(client):
    r = client.chat.completions.create(
        model=SERVED, messages=CHAT, max_tokens=20, temperature=0, extra_body={"ignore_eos": True}
    )
    assert r.usage.completion_tokens == 20 and r.choices[0].finish_reason == "length"


# SGLang validation/test_matched_stop.py: matched_stop names the stop string, the stop token id, or is null
def test_matched_stop(client, tokenizer):
    base = client.completions.create(
        model=SERVED,
        prompt=PROMPT,
        max_tokens=8,
        temperature=0,
        extra_body={"ignore_eos": True, "return_token_ids": True},
    )
    ids = base.choices[0].model_extra["token_ids"]
    assert base.choices[0].model_extra["matched_stop"] is None
    by_id = client.completions.create(
        model=SERVED, prompt=PROMPT, max_tokens=8, temperature=0, extra_body={"stop_token_ids": [ids[2]]}
    )
    assert by_id.choices[0].finish_reason == "stop" and by_id.choices[0].model_extra["matched_stop"] == ids[2]
    word = tokenizer.decode(ids[:4])[-2:]
    if word.strip():
        by_str = client.completions.create(
            model=SERVED, prompt=PROMPT, max_tokens=8, temperature=0, stop=[word]
        )
        assert by_str.choices[0].finish_reason == "stop"
        assert by_str.choices[0].model_extra["matched_stop"] == word


# SGLang features/test_cache_report.py: the second identical prompt reports cached tokens, within the prompt
def test_cache_report(client):
    messages = [{"role": "user", "content": "Tell me a long story about the sea. " * 6}]
    first = client.chat.completions.create(model=SERVED, messages=messages, max_tokens=1)
    second = client.chat.completions.create(model=SERVED, messages=messages, max_tokens=1)
    cached = second.usage.prompt_tokens_details.cached_tokens
    assert 0 < cached < second.usage.prompt_tokens
    assert first.usage.prompt_tokens == second.usage.prompt_tokens


# ---- chat ----


# SGLang basic/test_openai_server.py::TestOpenAIServer::test_chat_completion (run_chat_completion)
@pytest.mark.parametrize("logprobs", [None, 5])
@pytest.mark.parametrize("n", [1, 2])
def test_chat_completion(client, logprobs, n):
    r = client.chat.completions.create(
        model=SERVED,
        messages=CHAT,
        temperature=0,
        max_tokens=16,
        logprobs=logprobs is not None,
        top_logprobs=logprobs,
        n=n,
    )
    if logprobs:
        top = r.choices[0].logprobs.content[0].top_logprobs
        assert isinstance(top[0].token, str) and len(top) == logprobs
    assert len(r.choices) == n and [c.index for c in r.choices] == list(range(n))
    assert r.choices[0].message.role == "assistant" and isinstance(r.choices[0].message.content, str)
    assert r.id and r.created and r.object == "chat.completion"
    assert r.usage.prompt_tokens > 0 and r.usage.completion_tokens > 0
    assert r.usage.total_tokens == r.usage.prompt_tokens + r.usage.completion_tokens


# SGLang basic/test_openai_server.py::TestOpenAIServer::test_chat_completion_stream (run_chat_completion_stream)
@pytest.mark.parametrize("logprobs", [None, 5])
@pytest.mark.parametrize("n", [1, 2])
def test_chat_completion_stream(client, logprobs, n):
    stream = client.chat.completions.create(
        model=SERVED,
        messages=CHAT,
        temperature=0,
        max_tokens=16,
        logprobs=logprobs is not None,
        top_logprobs=logprobs,
        stream=True,
        stream_options={"include_usage": True},
        n=n,
    )
    firsts: set[int] = set()
    finishes: dict[int, int] = {}
    for chunk in stream:
        assert chunk.id and chunk.created and chunk.object == "chat.completion.chunk"
        if chunk.usage is not None:
            assert chunk.usage.prompt_tokens > 0 and chunk.usage.completion_tokens > 0
            continue
        c = chunk.choices[0]
        if c.finish_reason is not None:
            finishes[c.index] = finishes.get(c.index, 0) + 1
        if c.index not in firsts:
            assert c.delta.role == "assistant"
            firsts.add(c.index)
            continue
        if logprobs and c.finish_reason is None:
            top = c.logprobs.content[0].top_logprobs
            assert isinstance(top[0].token, str) and len(top) == logprobs
        assert isinstance(c.delta.content, str) or c.finish_reason
    assert firsts == set(range(n))
    assert finishes == dict.fromkeys(range(n), 1)  # exactly one finish_reason chunk per choice


# vLLM chat_completion/test_chat.py::test_no_logprobs_chat, test_zero_logprobs_chat, test_some_logprobs_chat
@pytest.mark.parametrize(("logprobs", "top"), [(False, None), (True, 0), (True, 5)])
def test_chat_logprobs(client, logprobs, top):
    r = client.chat.completions.create(
        model=SERVED,
        messages=CHAT,
        max_completion_tokens=5,
        temperature=0.0,
        logprobs=logprobs,
        top_logprobs=top,
    )
    if not logprobs:
        assert r.choices[0].logprobs is None
        return
    content = r.choices[0].logprobs.content
    assert content is not None and len(content) <= 5
    assert all(len(t.top_logprobs) == top for t in content)


# vLLM chat_completion/test_chat.py::test_too_many_chat_logprobs, also top_logprobs without logprobs
def test_too_many_chat_logprobs(client):
    with pytest.raises(openai.BadRequestError):
        client.chat.completions.create(
            model=SERVED, messages=CHAT, max_tokens=5, logprobs=True, top_logprobs=21
        )
    with pytest.raises(openai.BadRequestError):
        client.chat.completions.create(model=SERVED, messages=CHAT, max_tokens=5, top_logprobs=2)


# vLLM chat_completion/test_chat.py::test_single_chat_session: a two-turn session keeps its shape
def test_single_chat_session(client):
    messages = [*CHAT]
    r = client.chat.completions.create(
        model=SERVED, messages=messages, max_completion_tokens=10, logprobs=True, top_logprobs=5
    )
    assert r.id and len(r.choices) == 1
    assert r.usage.completion_tokens <= 10
    assert r.usage.total_tokens == r.usage.prompt_tokens + r.usage.completion_tokens
    messages += [
        {"role": "assistant", "content": r.choices[0].message.content},
        {"role": "user", "content": "more"},
    ]
    again = client.chat.completions.create(model=SERVED, messages=messages, max_completion_tokens=10)
    assert again.usage.prompt_tokens > r.usage.prompt_tokens


# vLLM chat_completion/test_chat.py::test_chat_streaming: the stream's content is the answer's content
def test_chat_streaming(client):
    kw = {"model": SERVED, "messages": CHAT, "max_completion_tokens": 10, "temperature": 0.0}
    single = client.chat.completions.create(**kw)
    chunks = list(client.chat.completions.create(**kw, stream=True))
    content = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
    assert content == single.choices[0].message.content
    assert chunks[-1].choices[0].finish_reason == single.choices[0].finish_reason


# vLLM chat_completion/test_chat.py::test_chat_completion_stream_options
def test_chat_completion_stream_options(client):
    kw = {"model": SERVED, "messages": CHAT, "max_completion_tokens": 10, "temperature": 0.0, "stream": True}
    plain = list(client.chat.completions.create(**kw, stream_options={"include_usage": False}))
    assert all(c.usage is None for c in plain)
    with_usage = list(client.chat.completions.create(**kw, stream_options={"include_usage": True}))
    assert all(c.usage is None for c in with_usage[:-1])
    last = with_usage[-1]
    assert (
        last.choices == []
        and last.usage.total_tokens == last.usage.prompt_tokens + last.usage.completion_tokens
    )
    continuous = list(
        client.chat.completions.create(
            **kw, stream_options={"include_usage": True, "continuous_usage_stats": True}
        )
    )
    assert all(c.usage is not None for c in continuous)


# vLLM chat_completion/test_chat.py::test_response_format_json_object / json_schema, SGLang test_json_mode and
# basic/test_openai_server.py::test_regex: served (grammar-constrained decoding); tests/test_structured_output.py
# samples hundreds of them, this checks the official client's parameters reach it
@pytest.mark.parametrize(
    ("extra", "check"),
    [
        ({"response_format": {"type": "json_object"}}, None),
        (
            {
                "response_format": {
                    "type": "json_schema",
                    "json_schema": {
                        "name": "n",
                        "schema": {
                            "type": "object",
                            "properties": {"a": {"type": "integer", "minimum": 0, "maximum": 9}},
                            "required": ["a"],
                            "additionalProperties": False,
                        },
                    },
                },
            },
            r'\{"a":[0-9]\}',
        ),
        ({"extra_body": {"regex": "[0-9]+"}}, "[0-9]+"),
        ({"extra_body": {"ebnf": 'root ::= "a"'}}, "a"),
    ],
)
def test_structured_output_is_served(client, extra, check):
    r = client.chat.completions.create(model=SERVED, messages=CHAT, max_tokens=12, **extra)
    text = r.choices[0].message.content
    if check is not None:
        assert re.fullmatch(check, text), text
    else:
        assert text.startswith("{")


# SGLang function_call/test_tool_choice.py (tool_choice "auto", "required", a named function) and vLLM
# chat_completion/test_tool_choice_null.py: "auto" and "none" are served (random weights call no tool); "required"
# and a named function need grammar-constrained decoding to be enforced, so until it is wired they are refused
@pytest.mark.parametrize(
    "choice", ["auto", "required", {"type": "function", "function": {"name": "f"}}, "none"]
)
def test_tool_choice(client, choice):
    # no argument can be added (additionalProperties false): a sampled call is always short enough to finish
    # within the test's max_tokens (free extra keys made it flaky: 64 tokens of random arguments ran out)
    params = {"type": "object", "properties": {}, "additionalProperties": False}
    tools = [{"type": "function", "function": {"name": "f", "parameters": params}}]
    kw = {"model": SERVED, "messages": CHAT, "max_tokens": 2, "tools": tools, "tool_choice": choice}
    if choice in ("none", "auto"):
        r = client.chat.completions.create(**kw)
        assert r.choices[0].message.tool_calls is None and r.choices[0].finish_reason in ("stop", "length")
    elif "constraint" in GenerateRequest.__dataclass_fields__:  # grammar support merged: the call is forced
        r = client.chat.completions.create(**{**kw, "max_tokens": 64})
        assert (
            r.choices[0].finish_reason == "tool_calls"
            and r.choices[0].message.tool_calls[0].function.name == "f"
        )
    else:
        with pytest.raises(openai.BadRequestError) as e:
            client.chat.completions.create(**kw)
        assert "grammar" in e.value.body["message"]


# vLLM chat_completion/test_chat_logit_bias_validation.py and test_chat_stop_token_ids_validation.py
def test_ids_outside_the_vocabulary(client):
    with pytest.raises(openai.BadRequestError) as e:
        client.chat.completions.create(model=SERVED, messages=CHAT, max_tokens=5, logit_bias={"999999": 1.0})
    assert "999999" in e.value.body["message"]
    with pytest.raises(openai.BadRequestError) as e:
        client.chat.completions.create(
            model=SERVED, messages=CHAT, max_tokens=5, extra_body={"stop_token_ids": [999999]}
        )
    assert "999999" in e.value.body["message"]
    r = client.chat.completions.create(model=SERVED, messages=CHAT, max_tokens=5, logit_bias={"100": 1.0})
    assert r.choices[0].finish_reason in ("stop", "length")


# vLLM basic/test_return_token_ids.py: token ids answered and streamed agree with usage
@pytest.mark.parametrize("stream", [False, True])
def test_return_token_ids(client, stream):
    kw = {
        "model": SERVED,
        "messages": CHAT,
        "max_tokens": 10,
        "temperature": 0,
        "extra_body": {"return_token_ids": True},
    }
    if not stream:
        r = client.chat.completions.create(**kw)
        assert len(r.model_extra["prompt_token_ids"]) == r.usage.prompt_tokens
        assert len(r.choices[0].model_extra["token_ids"]) == r.usage.completion_tokens
        return
    chunks = list(client.chat.completions.create(**kw, stream=True, stream_options={"include_usage": True}))
    prompt_ids = [c.model_extra["prompt_token_ids"] for c in chunks if c.model_extra.get("prompt_token_ids")]
    ids = [t for c in chunks for ch in c.choices for t in (ch.model_extra.get("token_ids") or [])]
    assert len(prompt_ids) == 1 and len(prompt_ids[0]) == chunks[-1].usage.prompt_tokens
    assert len(ids) == chunks[-1].usage.completion_tokens


# ---- models, errors ----


# SGLang basic/test_openai_server.py::TestOpenAIServer::test_model_list / test_retrieve_model
def test_models(client):
    models = list(client.models.list())
    assert len(models) == 1 and models[0].id == SERVED and models[0].object == "model"
    assert client.models.retrieve(SERVED).id == SERVED
    with pytest.raises(openai.NotFoundError):
        client.models.retrieve("non-existent-model")


# vLLM completion/test_completion.py (model not found) and SGLang validation/test_request_body_validation.py
def test_unknown_model_and_bad_bodies(client, cluster):
    with pytest.raises(openai.NotFoundError) as e:
        client.completions.create(model="no-such-model", prompt="x", max_tokens=2)
    assert e.value.body["code"] == "model_not_found"
    for body in ([], "x", {"messages": "not a list"}, {"messages": []}):
        r = cluster.http.post("/v1/chat/completions", json=body)
        assert r.status_code == 400 and set(r.json()["error"]) == {"message", "type", "param", "code"}


# vLLM basic/test_basic.py::test_check_health
def test_check_health(cluster):
    assert cluster.http.get("/health").status_code == 200


# ---- images ----


# SGLang test_vision_openai_server_common.py::test_single_image_chat_completion (shape and usage, not content)
@pytest.mark.parametrize("stream", [False, True])
def test_single_image_chat_completion(client, stream):
    messages = [
        {
            "role": "user",
            "content": [image_part(noise_image(64, 48, 1)), {"type": "text", "text": "Describe this image."}],
        }
    ]
    kw = {"model": SERVED, "messages": messages, "temperature": 0, "max_tokens": 8}
    if not stream:
        r = client.chat.completions.create(**kw)
        assert isinstance(r.choices[0].message.content, str)
        assert r.usage.prompt_tokens > 0 and r.usage.completion_tokens > 0
        return
    chunks = list(client.chat.completions.create(**kw, stream=True, stream_options={"include_usage": True}))
    assert chunks[0].choices[0].delta.role == "assistant"
    assert chunks[-1].usage.completion_tokens > 0


# SGLang test_vision_openai_server_common.py::test_multi_images_chat_completion: two images count more tokens than one
def test_multi_images_chat_completion(client):
    one = [image_part(noise_image(64, 48, 2))]
    two = [*one, image_part(noise_image(48, 64, 3))]
    usage = []
    for images in (one, two):
        content = [*images, {"type": "text", "text": "Compare."}]
        r = client.chat.completions.create(
            model=SERVED, messages=[{"role": "user", "content": content}], max_tokens=2
        )
        usage.append(r.usage.prompt_tokens)
    assert usage[1] > usage[0]


# SGLang test_vision_openai_server_common.py::test_mixed_batch / test_regex (for VLMs): several concurrent image
# requests, each answered with its own index and usage
def test_parallel_image_requests(client):
    from concurrent.futures import ThreadPoolExecutor

    def ask(seed):
        content = [image_part(noise_image(40 + seed, 40, seed)), {"type": "text", "text": "What is it?"}]
        return client.chat.completions.create(
            model=SERVED, messages=[{"role": "user", "content": content}], max_tokens=4, temperature=0, n=2
        )

    with ThreadPoolExecutor(4) as pool:
        for r in pool.map(ask, range(4)):
            assert [c.index for c in r.choices] == [0, 1]
            assert r.usage.total_tokens == r.usage.prompt_tokens + r.usage.completion_tokens


# SGLang test_srt_endpoint.py::TestSRTEndpoint::test_logprob_start_len, test_logprob_with_chunked_prefill and
# test_logprob_grammar's shape: a batch of prompts, each start inside its prompt; prompt_tokens = start + number of
# input logprobs, completion_tokens = number of output logprobs; the input tokens' texts end the prompt
@pytest.mark.parametrize("max_new_tokens", [0, 4])
def test_generate_logprob_start_len(cluster, max_new_tokens):
    prompts = ["I have a very good idea on how to", "Today is a sunny day and I like"]
    for start in (0, 2, 5):
        body = {
            "text": prompts,
            "sampling_params": {"temperature": 0, "max_new_tokens": max_new_tokens, "ignore_eos": True},
            "return_logprob": True,
            "top_logprobs_num": 5,
            "return_text_in_logprobs": True,
            "logprob_start_len": start,
        }
        r = cluster.http.post("/generate", json=body)
        assert r.status_code == 200, r.text
        for prompt, res in zip(prompts, r.json(), strict=True):
            meta = res["meta_info"]
            assert meta["prompt_tokens"] == start + len(meta["input_token_logprobs"])
            assert len(meta["input_top_logprobs"]) == len(meta["input_token_logprobs"])
            assert prompt.endswith("".join(e[2] for e in meta["input_token_logprobs"]))
            assert meta["completion_tokens"] == len(meta["output_token_logprobs"]) == max_new_tokens
            assert res["text"] == "".join(e[2] for e in meta["output_token_logprobs"])
