"""Issue 11 items 1 and 2 through a real cluster: features not implemented are refused (never ignored), ids outside
the vocabulary are named, and the behaviour the peers' clients rely on (completions' default max_tokens, several
prompts streamed, text_offset across chunks, continuous usage, streamed token ids, an optional model, models.retrieve,
OpenAI-shaped 404/405, continue_final_message, chat_template_kwargs, /generate batches and max_new_tokens 0)."""

from __future__ import annotations

import json
import time
from concurrent.futures import ThreadPoolExecutor

import openai
import pytest

from processor.tokenizer import Tokenizer
from tests.helpers import SERVED, Cluster

VOCAB = 151936  # the default model's logits


@pytest.fixture(scope="module")
def cluster(default_model, log_dir):
    c = Cluster(default_model, "--page-size", "8", log_dir=log_dir, name="gaps")
    yield c
    c.stop()


@pytest.fixture(scope="module")
def tokenizer(default_model):
    return Tokenizer(default_model)


@pytest.fixture(scope="module")
def client(cluster):
    return openai.OpenAI(base_url=cluster.base_url + "/v1", api_key="unused", max_retries=0)


USER = [{"role": "user", "content": "Tell me a story."}]


def _events(cluster, path: str, body: dict) -> list[dict]:
    with cluster.http.stream("POST", path, json=body) as r:
        assert r.status_code == 200, r.read()
        lines = [ln for ln in r.iter_lines() if ln]
    assert lines[-1] == "data: [DONE]"
    return [json.loads(ln.removeprefix("data: ")) for ln in lines[:-1]]


def _error(r, status: int, param: str | None) -> str:
    assert r.status_code == status, r.text
    err = r.json()["error"]
    assert set(err) == {"message", "type", "param", "code"}
    assert err["param"] == param
    return err["message"]


# ---- item 1: refused, never ignored ----


@pytest.mark.parametrize(
    ("body", "param"),
    [
        ({"structural_tag": {"type": "structural_tag"}}, "structural_tag"),
    ],
)
def test_unimplemented_features_are_refused(cluster, body, param):
    msg = _error(cluster.chat(USER, max_tokens=2, **body), 400, param)
    assert "not supported" in msg
    r = cluster.http.post("/v1/completions", json={"model": SERVED, "prompt": "a", "max_tokens": 2, **body})
    assert "not supported" in _error(r, 400, param)  # completions take the same fields


@pytest.mark.parametrize("key", ["structural_tag"])
def test_generate_constraints_are_refused(cluster, key):
    r = cluster.http.post("/generate", json={"text": "a", "sampling_params": {key: "x", "max_new_tokens": 2}})
    assert "not supported" in _error(r, 400, f"sampling_params.{key}")


def test_text_response_format_and_tool_choice_none_are_served(client):
    r = client.chat.completions.create(
        model=SERVED, messages=USER, max_tokens=2, response_format={"type": "text"}, tool_choice="none"
    )
    assert r.usage.completion_tokens == 2


def test_tools_with_tool_choice_none_are_served(client):
    """tool_choice none: no tool is called and the output is not parsed; the tools still go to the chat template
    (as vLLM renders them). Tool calling itself: tests/test_tool_calls_api.py."""
    tool = {"type": "function", "function": {"name": "get_weather", "parameters": {"type": "object"}}}
    r = client.chat.completions.create(
        model=SERVED, messages=USER, max_tokens=2, tools=[tool], tool_choice="none"
    )
    assert r.usage.completion_tokens == 2 and not r.choices[0].message.tool_calls


def test_ids_outside_the_vocabulary_are_named(cluster):
    bad = [VOCAB, VOCAB + 7]
    msg = _error(cluster.chat(USER, max_tokens=2, stop_token_ids=[5, *bad]), 400, "stop_token_ids")
    assert all(str(t) in msg for t in bad) and "[5," not in msg
    msg = _error(
        cluster.chat(USER, max_tokens=2, logit_bias={str(t): 1 for t in [3, *bad]}), 400, "logit_bias"
    )
    assert all(str(t) in msg for t in bad)
    r = cluster.http.post(
        "/generate", json={"text": "a", "sampling_params": {"stop_token_ids": bad, "max_new_tokens": 2}}
    )
    assert all(str(t) in _error(r, 400, "sampling_params.stop_token_ids") for t in bad)
    # the last id of the vocabulary is one
    assert cluster.chat(USER, max_tokens=2, stop_token_ids=[VOCAB - 1]).status_code == 200


@pytest.mark.parametrize("stream", [False, True])
def test_generate_max_new_tokens_zero(cluster, stream):
    body = {"input_ids": [1, 2, 3, 4, 5], "sampling_params": {"max_new_tokens": 0}, "stream": stream}
    if stream:
        out = _events(cluster, "/generate", body)[-1]
    else:
        r = cluster.http.post("/generate", json=body)
        assert r.status_code == 200, r.text
        out = r.json()
    assert out["text"] == "" and out["output_ids"] == []
    assert out["meta_info"]["prompt_tokens"] == 5 and out["meta_info"]["completion_tokens"] == 0
    assert out["meta_info"]["finish_reason"] == {"type": "length", "length": 0}
    r = cluster.http.post("/generate", json={**body, "sampling_params": {"max_new_tokens": -1}})
    _error(r, 400, "sampling_params.max_new_tokens")


# ---- item 2: missing behaviour ----


def test_completions_default_to_16_tokens(client):
    r = client.completions.create(model=SERVED, prompt="Once upon a time", extra_body={"ignore_eos": True})
    assert r.usage.completion_tokens == 16 and r.choices[0].finish_reason == "length"


def test_several_prompts_stream_with_their_index(client):
    kw = {"model": SERVED, "max_tokens": 4, "temperature": 0, "n": 2, "extra_body": {"ignore_eos": True}}
    prompts = ["Once upon a time", "The weather today", "In a galaxy"]
    full = client.completions.create(prompt=prompts, **kw)
    chunks = list(
        client.completions.create(prompt=prompts, stream=True, stream_options={"include_usage": True}, **kw)
    )
    texts: dict[int, str] = {}
    for c in chunks:
        for ch in c.choices:
            texts[ch.index] = texts.get(ch.index, "") + ch.text
    assert sorted(texts) == list(range(6))
    assert [texts[c.index] for c in full.choices] == [c.text for c in full.choices]
    assert chunks[-1].usage.model_dump() == full.usage.model_dump()


def test_streamed_text_offset_continues_across_chunks(client):
    kw = {"model": SERVED, "prompt": "Once upon a time", "max_tokens": 8, "temperature": 0, "logprobs": 1}
    full = client.completions.create(**kw, extra_body={"ignore_eos": True})
    chunks = list(client.completions.create(**kw, stream=True, extra_body={"ignore_eos": True}))
    offsets = [o for c in chunks for ch in c.choices if ch.logprobs for o in ch.logprobs.text_offset]
    assert offsets == full.choices[0].logprobs.text_offset
    assert len(offsets) == 8 and offsets == sorted(offsets) and offsets[-1] > 0


@pytest.mark.parametrize("path", ["chat", "completions"])
def test_continuous_usage_stats(client, path):
    opts = {"include_usage": True, "continuous_usage_stats": True}
    kw = {
        "model": SERVED,
        "max_tokens": 6,
        "stream": True,
        "stream_options": opts,
        "extra_body": {"ignore_eos": True},
    }
    if path == "chat":
        chunks = list(client.chat.completions.create(messages=USER, **kw))
    else:
        chunks = list(client.completions.create(prompt="Once upon a time", **kw))
    assert all(c.usage is not None for c in chunks)
    counts = [c.usage.completion_tokens for c in chunks]
    assert counts == sorted(counts) and counts[-1] == 6 and counts[0] < 6
    for c in chunks:
        assert c.usage.total_tokens == c.usage.prompt_tokens + c.usage.completion_tokens
        assert c.usage.prompt_tokens == chunks[-1].usage.prompt_tokens


def test_streamed_chat_returns_token_ids(client):
    kw = {"model": SERVED, "messages": USER, "max_tokens": 6, "temperature": 0}
    full = client.chat.completions.create(**kw, extra_body={"return_token_ids": True})
    chunks = list(client.chat.completions.create(**kw, stream=True, extra_body={"return_token_ids": True}))
    assert chunks[0].model_extra["prompt_token_ids"] == full.model_extra["prompt_token_ids"]
    assert all("prompt_token_ids" not in c.model_extra for c in chunks[1:])
    streamed = [t for c in chunks for ch in c.choices for t in (ch.model_extra.get("token_ids") or [])]
    assert streamed == full.choices[0].model_extra["token_ids"]


def test_streamed_completion_returns_token_ids(client):
    kw = {"model": SERVED, "prompt": "Once upon a time", "max_tokens": 6, "temperature": 0}
    full = client.completions.create(**kw, extra_body={"return_token_ids": True})
    chunks = list(client.completions.create(**kw, stream=True, extra_body={"return_token_ids": True}))
    firsts = [ch.model_extra.get("prompt_token_ids") for c in chunks for ch in c.choices]
    assert firsts[0] == full.choices[0].model_extra["prompt_token_ids"] and not any(firsts[1:])
    streamed = [t for c in chunks for ch in c.choices for t in (ch.model_extra.get("token_ids") or [])]
    assert streamed == full.choices[0].model_extra["token_ids"]


def test_model_may_be_omitted(cluster):
    for path, body in [
        ("/v1/chat/completions", {"messages": USER}),
        ("/v1/completions", {"prompt": "Hello"}),
    ]:
        r = cluster.http.post(path, json={**body, "max_tokens": 2})
        assert r.status_code == 200, r.text
        assert r.json()["model"] == SERVED
    events = _events(cluster, "/v1/chat/completions", {"messages": USER, "max_tokens": 2, "stream": True})
    assert {e["model"] for e in events} == {SERVED}


def test_models_retrieve_and_openai_shaped_404_405(cluster, client):
    m = client.models.retrieve(SERVED)
    assert m.id == SERVED and m.object == "model"
    with pytest.raises(openai.NotFoundError) as e:
        client.models.retrieve("no-such-model")
    assert e.value.body["code"] == "model_not_found"
    _error(cluster.http.get("/v1/no-such-route"), 404, None)
    _error(cluster.http.get("/v1/chat/completions"), 405, None)
    assert "POST" in cluster.http.get("/v1/chat/completions").headers["allow"]
    _error(cluster.http.delete("/v1/models"), 405, None)


def test_continue_final_message(client, tokenizer):
    """The last assistant turn stays open: its text ends the prompt with no end-of-turn token after it."""
    partial = [*USER, {"role": "assistant", "content": "Once upon"}]
    kw = {"model": SERVED, "max_tokens": 1, "extra_body": {"return_token_ids": True}}
    r = client.chat.completions.create(
        messages=partial,
        **{
            **kw,
            "extra_body": {
                **kw["extra_body"],
                "continue_final_message": True,
                "add_generation_prompt": False,
            },
        },
    )
    text = tokenizer.decode(r.model_extra["prompt_token_ids"], skip_special_tokens=False)
    assert text.endswith("<|im_start|>assistant\nOnce upon")
    closed = client.chat.completions.create(messages=partial, **kw).model_extra["prompt_token_ids"]
    assert tokenizer.decode(closed, skip_special_tokens=False).endswith(
        "Once upon<|im_end|>\n<|im_start|>assistant\n"
    )
    with pytest.raises(openai.BadRequestError):  # both at once cannot be honoured
        client.chat.completions.create(
            messages=partial, **{**kw, "extra_body": {"continue_final_message": True}}
        )


def test_chat_template_kwargs_reach_the_template(client):
    """A kwarg the template reads changes the prompt (Qwen2.5-VL's template reads add_vision_id)."""
    image = {"type": "image_url", "image_url": {"url": _PNG}}
    messages = [{"role": "user", "content": [image, {"type": "text", "text": "hi"}]}]
    kw = {"model": SERVED, "messages": messages, "max_tokens": 1}
    plain = client.chat.completions.create(**kw).usage.prompt_tokens
    vision_id = client.chat.completions.create(
        **kw, extra_body={"chat_template_kwargs": {"add_vision_id": True}}
    ).usage.prompt_tokens
    assert vision_id > plain


_PNG = (
    "data:image/png;base64,iVBORw0KGgoAAAANSUhEUgAAACAAAAAgCAIAAAD8GO2jAAAAN0lEQVR42mMUqbjDQArYcsOHJPVMDDQGoxaMWjBqw"
    "agFoxZQAzCeCNAYDaJRC0YtGLVg1IJRCwAnoAS/gNSb3wAAAABJRU5ErkJggg=="
)


@pytest.mark.parametrize("field", ["text", "input_ids"])
def test_generate_batches(cluster, field):
    prompts = ["Once upon a time", "The weather"] if field == "text" else [[1, 2, 3], [4, 5, 6, 7]]
    sp = {"max_new_tokens": 3, "temperature": 0, "ignore_eos": True}
    r = cluster.http.post("/generate", json={field: prompts, "sampling_params": sp})
    assert r.status_code == 200, r.text
    outs = r.json()
    assert isinstance(outs, list) and [o["index"] for o in outs] == [0, 1]
    for p, o in zip(prompts, outs, strict=True):
        single = cluster.http.post("/generate", json={field: p, "sampling_params": sp}).json()
        assert o["output_ids"] == single["output_ids"] and o["text"] == single["text"]
        assert o["meta_info"]["prompt_tokens"] == single["meta_info"]["prompt_tokens"]
    events = _events(cluster, "/generate", {field: prompts, "sampling_params": sp, "stream": True})
    last = {e["index"]: e for e in events}
    assert [last[i]["output_ids"] for i in (0, 1)] == [o["output_ids"] for o in outs]
    one = cluster.http.post("/generate", json={field: prompts[:1], "sampling_params": sp}).json()
    assert isinstance(one, list) and len(one) == 1  # a batch of one is still a list


# ---- caches: flush_cache, cache_salt, cached_tokens ----

LONG = "The quick brown fox jumps over the lazy dog. " * 8  # several KV pages of 8 tokens


def _cached(cluster, salt: str | None = None, image: bool = False) -> int:
    content = (
        [{"type": "image_url", "image_url": {"url": _PNG}}, {"type": "text", "text": LONG}] if image else LONG
    )
    body = {"max_tokens": 1, **({"cache_salt": salt} if salt else {})}
    r = cluster.chat([{"role": "user", "content": content}], **body)
    assert r.status_code == 200, r.text
    return r.json()["usage"]["prompt_tokens_details"]["cached_tokens"]


def test_flush_cache(cluster):
    _cached(cluster)
    _cached(cluster, image=True)
    assert _cached(cluster) > 0
    r = cluster.http.post("/flush_cache")
    assert r.status_code == 200, r.text
    assert r.json()["flushed"] is True
    assert r.json()["num_pages_freed"] > 0 and r.json()["num_embeddings_freed"] >= 1
    assert _cached(cluster) == 0
    before = cluster.stats().vision_cache_hits
    _cached(cluster, image=True)
    assert cluster.stats().vision_cache_hits == before  # the image was encoded again


def test_flush_cache_refused_while_a_request_runs(cluster):
    """While a request is live nothing is flushed (a 400 that says why); the tiny model may finish a request
    between two calls, so a few tries are allowed."""
    body = {"model": SERVED, "prompt": "a", "max_tokens": 200, "n": 4, "ignore_eos": True}
    for _ in range(5):
        with ThreadPoolExecutor(1) as pool:
            done = pool.submit(cluster.http.post, "/v1/completions", json=body)
            while not done.done() and cluster.stats().num_running == 0:
                time.sleep(0.01)
            r = cluster.http.post("/flush_cache")
            assert done.result().status_code == 200
        if r.status_code == 400:
            assert "running" in _error(r, 400, None)
            return
    pytest.fail("every flush found the cluster idle")


@pytest.mark.parametrize("image", [False, True])
def test_cache_salt_isolates_tenants(cluster, image):
    assert cluster.http.post("/flush_cache").status_code == 200
    _cached(cluster, "tenant-a", image)
    assert _cached(cluster, "tenant-a", image) > 0  # a tenant shares with itself
    assert _cached(cluster, "tenant-b", image) == 0  # never with another
    assert _cached(cluster, None, image) == 0  # nor with requests that carry no salt
    assert _cached(cluster, None, image) > 0
    r = cluster.chat(USER, max_tokens=1, cache_salt="")
    _error(r, 400, "cache_salt")


def test_cache_key_salt_changes_the_first_page_and_image_values():
    from common.types import MultimodalItem
    from scheduler_svc.sequence import cache_key

    item = MultimodalItem("img-key", 2, 3, (1, 2, 6), "image", b"")
    ids = [5, 6, 7, 7, 7, 8]
    plain, a, b = cache_key(ids, (item,)), cache_key(ids, (item,), "a"), cache_key(ids, (item,), "b")
    assert plain[0] == 5 and len({plain[0], a[0], b[0]}) == 3
    assert len({plain[2], a[2], b[2]}) == 3  # image-aware values are salted too
    assert plain[1] == a[1] == b[1] and plain[5] == a[5] == b[5]


# ---- item 3: echo; /generate's logprob options (prompt log-probabilities: tests/test_prompt_logprobs.py) ----


@pytest.mark.parametrize("token_input", [False, True])
def test_echo_puts_the_prompt_first(client, tokenizer, token_input):
    """SGLang's run_completion with echo: each choice's text starts with its prompt, streamed or not."""
    prompts = ["Once upon a time", "The weather"]
    given = [tokenizer.encode(p) for p in prompts] if token_input else prompts
    kw = {"model": SERVED, "prompt": given, "max_tokens": 4, "temperature": 0, "echo": True}
    plain = client.completions.create(**{**kw, "echo": False})
    r = client.completions.create(**kw)
    assert [c.text for c in r.choices] == [p + c.text for p, c in zip(prompts, plain.choices, strict=True)]
    assert r.usage.model_dump() == plain.usage.model_dump()
    texts: dict[int, str] = {}
    for chunk in client.completions.create(**kw, stream=True):
        for ch in chunk.choices:
            texts[ch.index] = texts.get(ch.index, "") + ch.text
    assert [texts[i] for i in range(2)] == [c.text for c in r.choices]


def test_generate_logprob_options(cluster, tokenizer):
    sp = {"max_new_tokens": 3, "temperature": 0}
    body = {"input_ids": [1, 2, 3, 4], "sampling_params": sp, "return_logprob": True, "top_logprobs_num": 2}
    plain = cluster.http.post("/generate", json=body).json()["meta_info"]
    assert all(e[2] is None for e in plain["output_token_logprobs"])
    assert "input_token_logprobs" not in plain
    texts = cluster.http.post("/generate", json={**body, "return_text_in_logprobs": True}).json()["meta_info"]
    assert [e[2] for e in texts["output_token_logprobs"]] == [
        tokenizer.token_bytes(e[1]).decode("utf-8", errors="replace") for e in plain["output_token_logprobs"]
    ]
    assert all(isinstance(e[2], str) for top in texts["output_top_logprobs"] for e in top)
    # from position 0: the first entry is null (nothing predicts it); from the prompt's end, nothing to give
    start = cluster.http.post("/generate", json={**body, "logprob_start_len": 0}).json()["meta_info"]
    assert [e[1] for e in start["input_token_logprobs"]] == [1, 2, 3, 4]
    assert start["input_token_logprobs"][0][0] is None and start["input_top_logprobs"][0] is None
    assert all(len(top) == 2 for top in start["input_top_logprobs"][1:])
    far = cluster.http.post(
        "/generate", json={**body, "logprob_start_len": 2**33}
    )  # schemathesis found a 500
    assert far.status_code == 200 and far.json()["meta_info"]["input_token_logprobs"] == []
    end = cluster.http.post("/generate", json={**body, "logprob_start_len": 4}).json()["meta_info"]
    assert end["input_token_logprobs"] == [] and len(end["output_token_logprobs"]) == 3


def test_scheduler_refuses_ids_outside_the_vocabulary_from_grpc_callers(cluster):
    """Callers that skip the gateway (grpcurl, another client) get INVALID_ARGUMENT, not a failed worker step."""
    import grpc

    from protos import common_pb2, scheduler_pb2

    for sampling, stopping in [
        (
            common_pb2.SamplingParams(
                temperature=1.0, top_p=1.0, repetition_penalty=1.0, logit_bias={VOCAB + 1: 2.0}
            ),
            {},
        ),
        (
            common_pb2.SamplingParams(temperature=1.0, top_p=1.0, repetition_penalty=1.0),
            {"stop_token_ids": [VOCAB]},
        ),
    ]:
        req = scheduler_pb2.GenerateRequest(
            request_id=f"grpc-vocab-{len(stopping)}",
            input_ids=[1, 2, 3],
            sampling=sampling,
            stopping=scheduler_pb2.StoppingCriteria(max_new_tokens=2, **stopping),
            n=1,
        )
        with pytest.raises(grpc.RpcError) as e:
            list(cluster._stub.Generate(req, timeout=30))
        assert e.value.code() == grpc.StatusCode.INVALID_ARGUMENT and str(VOCAB) in e.value.details()
    assert cluster.chat(USER, max_tokens=2).status_code == 200


@pytest.mark.parametrize(("key", "value"), [("temperature", -1), ("max_new_tokens", -1), ("top_p", 2)])
def test_generate_invalid_sampling_params_are_400s_on_a_kept_connection(cluster, key, value):
    """The issue's cases (once 500s that dropped the keep-alive connection; fixed with 5220f1e): a 400 naming the
    parameter, and the same connection serves the next request."""
    r = cluster.http.post("/generate", json={"text": "a", "sampling_params": {key: value}})
    _error(r, 400, f"sampling_params.{key}")
    assert r.headers.get("connection", "keep-alive") != "close"
    ok = cluster.http.post("/generate", json={"text": "a", "sampling_params": {"max_new_tokens": 1}})
    assert ok.status_code == 200


def test_echo_with_logprobs_fits_the_declared_response(cluster):
    """echo + logprobs: the prompt's first token has a null log-probability and null alternatives (as OpenAI and
    vLLM), and the answer fits the response model /openapi.json declares (the schema fuzz found it did not)."""
    from gateway.responses import CompletionResponse

    body = {
        "model": SERVED,
        "prompt": "Once upon",
        "max_tokens": 2,
        "temperature": 0,
        "echo": True,
        "logprobs": 1,
    }
    r = cluster.http.post("/v1/completions", json=body)
    assert r.status_code == 200, r.text
    lp = r.json()["choices"][0]["logprobs"]
    assert lp["token_logprobs"][0] is None and lp["top_logprobs"][0] is None
    assert all(isinstance(x, float) for x in lp["token_logprobs"][1:])
    CompletionResponse.model_validate(r.json())
