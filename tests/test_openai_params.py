"""Every sampling and stopping parameter of the OpenAI surface through the cluster, with the official client,
streaming and not; text completions, SGLang's /generate, /model_info, and the in-process Engine (issue 4)."""

from __future__ import annotations

import json
from concurrent.futures import ThreadPoolExecutor

import openai
import pytest
import torch

from tests.helpers import SERVED, Cluster, HFReference, image_part, noise_image

EOS = 151645
HOT = 5  # temperature at which the peaky default model samples diverse tokens


@pytest.fixture(scope="module")
def cluster(default_model, log_dir):
    c = Cluster(default_model, "--page-size", "8", log_dir=log_dir, name="params")
    yield c
    c.stop()


@pytest.fixture(scope="module")
def client(cluster):
    return openai.OpenAI(base_url=cluster.base_url + "/v1", api_key="unused", max_retries=0)


def ask(client, content="Tell me a story.", stream=False, **kw):
    """(content, finish_reason, choice, usage) for one choice, streaming or not; streams are reassembled."""
    messages = [{"role": "user", "content": content}]
    if not stream:
        r = client.chat.completions.create(model=SERVED, messages=messages, **kw)
        return r.choices[0].message.content, r.choices[0].finish_reason, r.choices[0], r.usage
    chunks = list(
        client.chat.completions.create(
            model=SERVED, messages=messages, stream=True, stream_options={"include_usage": True}, **kw
        )
    )
    text = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
    final = [c.choices[0] for c in chunks if c.choices and c.choices[0].finish_reason]
    assert len(final) == 1
    return text, final[0].finish_reason, final[0], chunks[-1].usage


def ids(client, content="Tell me a story.", **kw) -> list[int]:
    r = client.chat.completions.create(
        model=SERVED,
        messages=[{"role": "user", "content": content}],
        extra_body={"return_token_ids": True, **kw.pop("extra_body", {})},
        **kw,
    )
    return r.choices[0].model_extra["token_ids"]


@pytest.mark.parametrize("stream", [False, True])
def test_greedy_limits_of_sampling(client, stream):
    greedy = ask(client, stream=stream, max_tokens=10, temperature=0)[0]
    assert ask(client, stream=stream, max_tokens=10, temperature=1.0, extra_body={"top_k": 1})[0] == greedy
    assert ask(client, stream=stream, max_tokens=10, temperature=1.0, top_p=1e-9)[0] == greedy
    assert ask(client, stream=stream, max_tokens=10, temperature=1.0, extra_body={"min_p": 1.0})[0] == greedy


@pytest.mark.parametrize("stream", [False, True])
def test_max_tokens_and_max_completion_tokens(client, stream):
    for kw in ({"max_tokens": 7}, {"max_completion_tokens": 7}):
        _, finish, _, usage = ask(client, stream=stream, temperature=0, **kw)
        assert finish == "length" and usage.completion_tokens == 7


def test_seed_streaming_equals_non_streaming(client):
    text = ask(client, max_tokens=12, temperature=HOT, seed=77)[0]
    assert ask(client, stream=True, max_tokens=12, temperature=HOT, seed=77)[0] == text
    assert ask(client, stream=True, max_tokens=12, temperature=HOT, seed=78)[0] != text


@pytest.mark.parametrize(
    "kw",
    [{"presence_penalty": 2.0}, {"frequency_penalty": 2.0}, {"extra_body": {"repetition_penalty": 1000.0}}],
)
def test_penalties_streaming_equals_non_streaming(client, kw):
    forced = {"logit_bias": {"1000": 60}}
    text = ask(client, max_tokens=8, temperature=0, **forced, **kw)[0]
    assert ask(client, stream=True, max_tokens=8, temperature=0, **forced, **kw)[0] == text


def test_generation_config_defaults_apply_unless_the_request_sets_them(tmp_path, default_model):
    from processor import sampling
    from processor.model_config import load_generation_defaults

    (tmp_path / "generation_config.json").write_text(
        json.dumps(
            {
                "eos_token_id": [151645],
                "temperature": 0.3,
                "top_k": 5,
                "top_p": 0.9,
                "repetition_penalty": 1.05,
                "do_sample": True,
            }
        )
    )
    defaults = load_generation_defaults(tmp_path)
    assert defaults == {"temperature": 0.3, "top_k": 5, "top_p": 0.9, "repetition_penalty": 1.05}
    sp, _ = sampling.build({}, defaults=defaults, eos_ids=(151645,), max_new_tokens=8)
    assert (sp.temperature, sp.top_k, sp.top_p, sp.repetition_penalty) == (0.3, 5, 0.9, 1.05)
    sp, _ = sampling.build(
        {"temperature": 0.0, "top_k": 0}, defaults=defaults, eos_ids=(151645,), max_new_tokens=8
    )
    assert (sp.temperature, sp.top_k, sp.top_p) == (0.0, 0, 0.9)


def test_seed_reproducible_even_with_batch_companions(client):
    alone = ids(client, max_tokens=16, temperature=HOT, seed=1234)
    assert ids(client, max_tokens=16, temperature=HOT, seed=1234) == alone
    assert ids(client, max_tokens=16, temperature=HOT, seed=999) != alone  # the seed matters on this model

    def companion(k):
        return ids(client, f"Other traffic {k}", max_tokens=24, temperature=HOT)

    with ThreadPoolExecutor(6) as pool:
        others = [pool.submit(companion, k) for k in range(5)]
        batched = pool.submit(ids, client, max_tokens=16, temperature=HOT, seed=1234).result()
        [o.result() for o in others]
    assert batched == alone


@pytest.mark.parametrize("stream", [False, True])
def test_n_choices(client, cluster, stream):
    kw = dict(max_tokens=8, temperature=HOT, seed=7, n=3)
    if stream:
        chunks = list(
            client.chat.completions.create(
                model=SERVED,
                stream=True,
                messages=[{"role": "user", "content": "Pick three"}],
                stream_options={"include_usage": True},
                **kw,
            )
        )
        texts = {i: "" for i in range(3)}
        for c in chunks:
            for ch in c.choices:
                texts[ch.index] += ch.delta.content or ""
        usage = chunks[-1].usage
    else:
        r = client.chat.completions.create(
            model=SERVED, messages=[{"role": "user", "content": "Pick three"}], **kw
        )
        texts = {c.index: c.message.content for c in r.choices}
        usage = r.usage
    assert sorted(texts) == [0, 1, 2]
    assert len(set(texts.values())) > 1  # seeded choices draw different streams
    assert usage.completion_tokens == 24
    before = cluster.stats().prefix_cache_hit_tokens
    prompt = f"Pick three ({stream}) " + "and explain why " * 6
    greedy = client.chat.completions.create(
        model=SERVED, messages=[{"role": "user", "content": prompt}], max_tokens=8, temperature=0, n=3
    )
    assert len({c.message.content for c in greedy.choices}) == 1
    # choices 1 and 2 start from choice 0's prompt pages (all but the last partial page)
    full_pages = (greedy.usage.prompt_tokens - 1) // 8 * 8
    assert cluster.stats().prefix_cache_hit_tokens - before >= 2 * full_pages > 0


def _reference(client, content="Write a long answer.", n=40):
    r = client.chat.completions.create(
        model=SERVED,
        messages=[{"role": "user", "content": content}],
        max_tokens=n,
        temperature=0,
        extra_body={"return_token_ids": True, "ignore_eos": True},
    )
    return r.choices[0].message.content, r.choices[0].model_extra["token_ids"]


@pytest.mark.parametrize("stream", [False, True])
def test_stop_strings_never_leak_even_across_chunks(client, cluster, stream):
    text, toks = _reference(client)
    from processor.tokenizer import Tokenizer

    t = Tokenizer(client_model_dir(cluster))
    pieces = [t.decode(toks[: i + 1]) for i in range(len(toks))]
    # a stop that starts in one token and ends in the next: the last char of token k and the first of token k+1
    for k in range(5, len(toks) - 1):
        a, b = pieces[k - 1], pieces[k]
        if len(b) - len(a) >= 1 and len(a) >= 1 and not b.endswith("\ufffd"):
            stop = a[-1] + b[len(a)]
            break
    expect = text[: text.index(stop)]
    got, finish, choice, _ = ask(
        client,
        "Write a long answer.",
        stream=stream,
        max_tokens=40,
        temperature=0,
        stop=[stop, "never-appears-1", "never-appears-2", "never-appears-3"],
        extra_body={"ignore_eos": True},
    )
    assert got == expect and finish == "stop"
    assert choice.model_extra["matched_stop"] == stop
    kept, *_ = ask(
        client,
        "Write a long answer.",
        stream=stream,
        max_tokens=40,
        temperature=0,
        stop=stop,
        extra_body={"ignore_eos": True, "no_stop_trim": True},
    )
    assert kept == expect + stop


def client_model_dir(cluster) -> str:
    return cluster.http.get("/model_info").json()["model_path"]


def test_multibyte_stop_string(client, cluster):
    text, _ = _reference(client, "Écris en français, s'il te plaît", 60)
    candidates = [ch for ch in text if ord(ch) > 127 and ch != "\ufffd"]
    if not candidates:
        pytest.skip("no multi-byte character in this output")
    stop = candidates[len(candidates) // 2]
    got, finish, *_ = ask(
        client,
        "Écris en français, s'il te plaît",
        max_tokens=60,
        temperature=0,
        stop=stop,
        extra_body={"ignore_eos": True},
    )
    assert got == text[: text.index(stop)] and finish == "stop"
    assert stop.encode() and len(stop.encode()) > 1


@pytest.mark.parametrize("stream", [False, True])
def test_stop_token_ids(client, stream):
    _, toks = _reference(client)
    stop_id = toks[6]
    r = client.chat.completions.create(
        model=SERVED,
        messages=[{"role": "user", "content": "Write a long answer."}],
        max_tokens=40,
        temperature=0,
        stream=False,
        extra_body={"stop_token_ids": [stop_id], "ignore_eos": True, "return_token_ids": True},
    )
    got = r.choices[0].model_extra["token_ids"]
    assert got == toks[: toks.index(stop_id) + 1]
    assert r.choices[0].finish_reason == "stop" and r.choices[0].model_extra["matched_stop"] == stop_id
    text, finish, *_ = ask(
        client,
        "Write a long answer.",
        stream=stream,
        max_tokens=40,
        temperature=0,
        extra_body={"stop_token_ids": [stop_id], "ignore_eos": True},
    )
    assert finish == "stop"


@pytest.mark.parametrize("stream", [False, True])
def test_min_tokens_ignore_eos_and_logit_bias(client, stream):
    forced = {"logit_bias": {str(EOS): 100}}
    text, finish, _, usage = ask(client, stream=stream, max_tokens=20, temperature=0, **forced)
    assert (text, finish, usage.completion_tokens) == ("", "stop", 1)  # the biased EOS comes at once
    _, finish, _, usage = ask(
        client, stream=stream, max_tokens=20, temperature=0, extra_body={"min_tokens": 5}, **forced
    )
    assert finish == "stop" and usage.completion_tokens == 6  # EOS held back for 5 tokens
    _, finish, _, usage = ask(
        client, stream=stream, max_tokens=9, temperature=0, extra_body={"ignore_eos": True}, **forced
    )
    assert finish == "length" and usage.completion_tokens == 9


def _top(client, **kw):
    r = client.chat.completions.create(
        model=SERVED,
        messages=[{"role": "user", "content": "Count with me"}],
        max_tokens=2,
        temperature=0,
        logprobs=True,
        top_logprobs=20,
        **kw,
    )
    return r.choices[0].logprobs.content


def test_presence_and_frequency_penalties_shift_logprobs_exactly(client):
    """At step 2 the first token has appeared once: the gap between its log-prob and any other token's shrinks
    by exactly presence + frequency penalty (normalization cancels in the difference). A logit bias keeps the
    first token among the top 20 at step 2 in every run, so the gap is always visible."""
    first = ids(client, "Count with me", max_tokens=1, temperature=0)[0]
    bias = {str(first): 40}
    base = _top(client, logit_bias=bias)
    token = tuple(base[0].bytes)
    for kw, shift in (
        ({"presence_penalty": 1.5}, 1.5),
        ({"frequency_penalty": 0.75}, 0.75),
        ({"presence_penalty": 0.5, "frequency_penalty": 1.0}, 1.5),
    ):
        pen = _top(client, logit_bias=bias, **kw)
        assert tuple(pen[0].bytes) == token  # step 1 has no history: no penalty yet
        step_b = {tuple(e.bytes): e.logprob for e in base[1].top_logprobs}
        step_p = {tuple(e.bytes): e.logprob for e in pen[1].top_logprobs}
        other = next(t for t in step_b if t in step_p and t != token)
        shrink = (step_b[token] - step_b[other]) - (step_p[token] - step_p[other])
        assert abs(shrink - shift) < 1e-3, (kw, shrink)


def test_repetition_penalty_changes_repeats(client):
    forced = ids(client, max_tokens=6, temperature=0, logit_bias={"1000": 60})
    assert forced == [1000] * 6
    penalized = ids(
        client,
        max_tokens=6,
        temperature=0,
        logit_bias={"1000": 60},
        extra_body={"repetition_penalty": 1000.0},
    )
    assert penalized[0] == 1000 and 1000 not in penalized[1:]


@pytest.mark.parametrize("stream", [False, True])
def test_logprobs_shape(client, stream):
    messages = [{"role": "user", "content": "Hi"}]
    if stream:
        chunks = list(
            client.chat.completions.create(
                model=SERVED,
                messages=messages,
                max_tokens=5,
                temperature=0,
                logprobs=True,
                top_logprobs=3,
                stream=True,
            )
        )
        entries = [
            e for c in chunks if c.choices and c.choices[0].logprobs for e in c.choices[0].logprobs.content
        ]
    else:
        r = client.chat.completions.create(
            model=SERVED, messages=messages, max_tokens=5, temperature=0, logprobs=True, top_logprobs=3
        )
        entries = r.choices[0].logprobs.content
    assert len(entries) == 5
    for e in entries:
        assert len(e.top_logprobs) == 3 and e.logprob <= 0 and isinstance(e.bytes, list)
        assert e.top_logprobs[0].logprob >= e.top_logprobs[1].logprob >= e.top_logprobs[2].logprob
        assert abs(e.top_logprobs[0].logprob - e.logprob) < 1e-5  # greedy: the sampled token is the top one


def test_greedy_logprobs_equal_hf_log_softmax(cluster, default_model):
    hf = HFReference(default_model)
    msgs = [
        {"role": "user", "content": [image_part(noise_image(90, 60, 3)), {"type": "text", "text": "Look"}]}
    ]
    body = cluster.chat_ok(
        msgs, max_tokens=6, temperature=0, logprobs=True, top_logprobs=2, return_token_ids=True
    )
    prompt, out = body["prompt_token_ids"], body["choices"][0]["token_ids"]
    inputs = hf.inputs(
        [{"role": "user", "content": [{"type": "image"}, {"type": "text", "text": "Look"}]}],
        [noise_image(90, 60, 3)],
    )
    full = torch.tensor([prompt + out])
    with torch.no_grad():
        logits = hf.model(
            input_ids=full,
            attention_mask=torch.ones_like(full),
            pixel_values=inputs["pixel_values"],
            image_grid_thw=inputs["image_grid_thw"],
            mm_token_type_ids=(full == 151655).int(),
        ).logits[0]
    ref = torch.log_softmax(logits.float(), -1)
    got = [e["logprob"] for e in body["choices"][0]["logprobs"]["content"]]
    for k, tok in enumerate(out):
        assert abs(got[k] - float(ref[len(prompt) - 1 + k, tok])) < 1e-3


def test_include_usage_and_finish_reasons(client):
    chunks = list(
        client.chat.completions.create(
            model=SERVED,
            messages=[{"role": "user", "content": "x"}],
            max_tokens=3,
            stream=True,
            stream_options={"include_usage": True},
        )
    )
    assert chunks[-1].choices == [] and chunks[-1].usage.completion_tokens == 3
    assert all(c.usage is None for c in chunks[:-1])


def test_broken_utf8_never_streams(client):
    """A random-weight model emits byte fragments; streamed text never carries a broken sequence and adds up to
    the non-streamed text."""
    full = ask(
        client,
        "Speak in many scripts: 日本語 العربية हिन्दी",
        max_tokens=120,
        temperature=0,
        extra_body={"ignore_eos": True},
    )[0]
    chunks = list(
        client.chat.completions.create(
            model=SERVED,
            stream=True,
            max_tokens=120,
            temperature=0,
            messages=[{"role": "user", "content": "Speak in many scripts: 日本語 العربية हिन्दी"}],
            extra_body={"ignore_eos": True},
        )
    )
    pieces = [c.choices[0].delta.content for c in chunks if c.choices and c.choices[0].delta.content]
    assert "".join(pieces) == full
    for p in pieces:
        p.encode("utf-8")  # no lone surrogates


def test_unknown_fields_are_ignored_and_logged(cluster):
    r = cluster.chat([{"role": "user", "content": "hi"}], max_tokens=2, some_future_field={"x": 1})
    assert r.status_code == 200
    assert "some_future_field" in cluster.log()


@pytest.mark.parametrize(
    "body,param",
    [
        ({"temperature": -0.1}, "temperature"),
        ({"top_p": 0}, "top_p"),
        ({"top_p": 1.5}, "top_p"),
        ({"n": 0}, "n"),
        ({"max_tokens": 0}, "max_tokens"),
        ({"stop": ["a", "b", "c", "d", "e"]}, "stop"),
        ({"top_logprobs": 21, "logprobs": True}, "top_logprobs"),
        ({"top_logprobs": 2}, "top_logprobs"),
        ({"presence_penalty": 3}, "presence_penalty"),
        ({"logit_bias": {"x": 1}}, "logit_bias"),
        ({"stream_options": {"include_usage": True}}, "stream_options"),
    ],
)
def test_out_of_range_is_400_naming_the_parameter(cluster, body, param):
    r = cluster.chat([{"role": "user", "content": "hi"}], **body)
    assert r.status_code == 400, r.text
    assert param in r.json()["error"]["param"]


@pytest.mark.parametrize("stream", [False, True])
def test_text_completions(client, stream):
    chat_ids = None
    kw = dict(model=SERVED, max_tokens=6, temperature=0)
    if stream:
        chunks = list(client.completions.create(prompt="Once upon a time", stream=True, **kw))
        text = "".join(c.choices[0].text for c in chunks if c.choices)
        assert chunks[-1].choices[0].finish_reason == "length"
    else:
        r = client.completions.create(prompt="Once upon a time", logprobs=2, **kw)
        text = r.choices[0].text
        assert len(r.choices[0].logprobs.tokens) == 6 and len(r.choices[0].logprobs.top_logprobs[0]) == 2
        by_ids = client.completions.create(prompt=[12522, 5193, 264, 882], **kw)  # "Once upon a time"
        assert by_ids.choices[0].text == text
        two = client.completions.create(prompt=["Once upon a time", "In a galaxy"], **kw)
        assert [c.index for c in two.choices] == [0, 1] and two.choices[0].text == text
    assert text and chat_ids is None


def test_native_generate(cluster):
    body = {"text": "Once upon a time", "sampling_params": {"max_new_tokens": 6, "temperature": 0}}
    r = cluster.http.post("/generate", json=body).json()
    assert r["meta_info"]["completion_tokens"] == 6 and r["meta_info"]["finish_reason"]["type"] == "length"
    by_ids = cluster.http.post(
        "/generate",
        json={
            "input_ids": [12522, 5193, 264, 882],
            "sampling_params": {"max_new_tokens": 6, "temperature": 0},
        },
    ).json()
    assert by_ids["output_ids"] == r["output_ids"]
    from tests.helpers import data_uri, png_bytes

    img = cluster.http.post(
        "/generate",
        json={
            "text": "Describe",
            "image_data": data_uri(png_bytes(noise_image(56, 56, 2))),
            "sampling_params": {"max_new_tokens": 3},
        },
    ).json()
    assert (
        img["meta_info"]["prompt_tokens"] == 7
    )  # vision start, 4 image tokens (56x56), vision end, "Describe"
    with cluster.http.stream("POST", "/generate", json={**body, "stream": True}) as s:
        events = [json.loads(ln[6:]) for ln in s.iter_lines() if ln.startswith("data: {")]
    assert events[-1]["text"] == r["text"] and events[-1]["meta_info"]["finish_reason"]["type"] == "length"


def test_model_info(cluster):
    for path in ("/model_info", "/get_model_info"):
        info = cluster.http.get(path).json()
        assert info["has_image_understanding"] is True and info["model_path"]


def test_engine_gives_the_cluster_outputs(cluster, default_model):
    from mirador.engine import Engine
    from tests.helpers import data_uri, png_bytes

    img = data_uri(png_bytes(noise_image(70, 50, 9)))
    messages = [
        {
            "role": "user",
            "content": [
                {"type": "image_url", "image_url": {"url": img}},
                {"type": "text", "text": "What is it?"},
            ],
        }
    ]
    cl_chat = cluster.chat_ok(messages, max_tokens=8, temperature=0, return_token_ids=True)
    cl_gen = cluster.http.post(
        "/generate", json={"text": "Hello there", "sampling_params": {"max_new_tokens": 8, "temperature": 0}}
    ).json()
    cl_seeded = cluster.http.post(
        "/generate",
        json={"text": "Hello there", "sampling_params": {"max_new_tokens": 8, "temperature": HOT, "seed": 5}},
    ).json()
    with Engine(default_model, page_size=8) as engine:
        chat = engine.chat(messages, sampling_params={"max_new_tokens": 8, "temperature": 0})
        gen = engine.generate("Hello there", sampling_params={"max_new_tokens": 8, "temperature": 0})
        seeded = engine.generate(
            "Hello there", sampling_params={"max_new_tokens": 8, "temperature": HOT, "seed": 5}
        )
        batch = engine.generate(
            ["Hello there", "Hello there"], sampling_params={"max_new_tokens": 8, "temperature": 0}
        )
    assert chat["output_ids"] == cl_chat["choices"][0]["token_ids"]
    assert chat["text"] == cl_chat["choices"][0]["message"]["content"]
    assert gen["output_ids"] == cl_gen["output_ids"]
    assert seeded["output_ids"] == cl_seeded["output_ids"]
    assert [b["output_ids"] for b in batch] == [gen["output_ids"]] * 2


@pytest.mark.parametrize("with_usage", [False, True])
@pytest.mark.parametrize("text", ["plain", 'quotes " and \\ slashes', "ünïcödé ✓", "line\nbreak\t", ""])
def test_plain_delta_events_are_what_the_general_encoder_writes(with_usage, text):
    """Plain text deltas are written from templates (gateway/serving.py); byte for byte what `chunk` writes."""
    from gateway.protocol import ChatCompletionRequest
    from gateway.serving import CHAT_DELTA, TEXT_DELTA, OpenAIServing, _chunker

    req = ChatCompletionRequest(
        model="m",
        messages=[{"role": "user", "content": "x"}],
        stream=True,
        stream_options={"include_usage": True} if with_usage else None,
    )
    chunk = _chunker("rid-1", "chat.completion.chunk", 123, req)
    for index in (0, 3):
        chat = [{"index": index, "delta": {"content": text}, "logprobs": None, "finish_reason": None}]
        assert chunk.delta(CHAT_DELTA, index, text) == chunk(chat)
        plain = [
            {"index": index, "text": text, "logprobs": None, "finish_reason": None, "matched_stop": None}
        ]
        assert chunk.delta(TEXT_DELTA, index, text) == chunk(plain)
        event = json.loads(chunk.delta(CHAT_DELTA, index, text).removeprefix("data: "))
        assert event["choices"][0]["delta"]["content"] == text
    # continuous_usage_stats: the usage so far closes every plain delta, from a template too
    req = ChatCompletionRequest(
        model="m",
        messages=[{"role": "user", "content": "x"}],
        stream=True,
        stream_options={"include_usage": True, "continuous_usage_stats": True},
    )
    chunk = _chunker("rid-1", "chat.completion.chunk", 123, req)
    counts = (17, 5, 16)
    chat = [{"index": 1, "delta": {"content": text}, "logprobs": None, "finish_reason": None}]
    assert chunk.delta(CHAT_DELTA, 1, text, counts) == chunk(chat, OpenAIServing._usage(*counts))
    plain = [{"index": 1, "text": text, "logprobs": None, "finish_reason": None, "matched_stop": None}]
    assert chunk.delta(TEXT_DELTA, 1, text, counts) == chunk(plain, OpenAIServing._usage(*counts))
