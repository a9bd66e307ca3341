"""Issue 13, tool calling over HTTP with the official `openai` client: the real gateway app over a scripted scheduler
(random weights never call a tool by themselves), so `message.tool_calls` and streamed tool-call deltas are read from
fixed model outputs; then a real cluster renders tools and a tool-message history and serves them."""

from __future__ import annotations

import asyncio
import json
from collections.abc import AsyncIterator

import httpx
import openai
import pytest

from common.types import GenerateOutput, GenerateRequest
from gateway.app import create_app
from gateway.config import GatewayArgs
from gateway.serving import OpenAIServing
from tests.helpers import SERVED, Cluster
from tests.test_tool_parsers import NESTED, PARIS, TOOLS, call_text

ROME = call_text("get_weather", {"city": "Rome"})
USER = [{"role": "user", "content": "Weather in Paris?"}]


class ScriptedScheduler:
    """The scheduler client's surface, answering every request with `script`: text chunks and a finish reason
    (each chunk one token), for each of the request's n choices."""

    def __init__(self):
        self.script: tuple[list[str], str] = (["hello"], "stop")
        self.requests: list[GenerateRequest] = []

    async def generate(self, req: GenerateRequest) -> AsyncIterator[GenerateOutput]:
        self.requests.append(req)
        chunks, finish = self.script
        for index in range(req.n):
            for k, text in enumerate(chunks):
                last = k == len(chunks) - 1
                yield GenerateOutput(
                    req.request_id,
                    index,
                    text,
                    [1000 + k],
                    finish if last else None,
                    prompt_tokens=len(req.input_ids),
                    completion_tokens=len(chunks),
                )
            await asyncio.sleep(0)


@pytest.fixture(scope="module")
def scripted(default_model):
    app = create_app(GatewayArgs(model_path=str(default_model), served_model_name=SERVED))
    gw = app.state.gateway
    fake = ScriptedScheduler()
    gw.scheduler = fake
    gw.serving = OpenAIServing(gw.builder, fake, gw.card, 32, gw.metrics, gw.tool_parser)
    gw._synced = True
    return app, fake


def run(scripted, chunks: list[str], finish: str, **kw):
    """One chat completion through the app with the official async client; streamed ones come back as the list
    of chunks."""
    app, fake = scripted
    fake.script = (chunks, finish)

    async def main():
        transport = httpx.ASGITransport(app=app)
        async with httpx.AsyncClient(transport=transport, base_url="http://gateway") as http:
            client = openai.AsyncOpenAI(
                base_url="http://gateway/v1", api_key="x", http_client=http, max_retries=0
            )
            args = {"model": SERVED, "messages": USER, "max_tokens": 50, **kw}
            if kw.get("stream"):
                return [c async for c in await client.chat.completions.create(**args)]
            return await client.chat.completions.create(**args)

    return asyncio.run(main())


def split(text: str, size: int) -> list[str]:
    return [text[i : i + size] for i in range(0, len(text), size)]


OUTPUTS = {
    "one call": [PARIS],
    "two calls after text": ["Let me look.\n", PARIS, "\n", ROME],
    "nested arguments": [call_text("search", NESTED)],
    "no call": ["It is sunny ", "<in Paris>."],
    "malformed": ['<tool_call>\n{"name": "get_weather", "arguments": {oops}}\n</tool_call>'],
}


def reassemble(chunks) -> tuple[str | None, list[dict], str]:
    """A stream's deltas put back together the way OpenAI's client libraries accumulate them."""
    content, calls, finish = None, {}, None
    for chunk in chunks:
        for choice in chunk.choices:
            d = choice.delta
            if d.content:
                content = (content or "") + d.content
            for tc in d.tool_calls or []:
                if tc.index not in calls:
                    # a call's first delta names it
                    assert tc.id and tc.id.startswith("call_") and tc.type == "function" and tc.function.name
                    calls[tc.index] = {"id": tc.id, "name": tc.function.name, "arguments": ""}
                else:
                    assert tc.id is None and tc.function.name is None
                calls[tc.index]["arguments"] += tc.function.arguments or ""
            finish = choice.finish_reason or finish
    return content, [calls[k] for k in sorted(calls)], finish


def summary(content, calls, finish):
    return content, [(c["name"], json.loads(c["arguments"])) for c in calls], finish


@pytest.mark.parametrize("name", list(OUTPUTS))
def test_openai_client_reads_tool_calls_streamed_and_not(scripted, name):
    text = "".join(OUTPUTS[name])
    r = run(scripted, OUTPUTS[name], "stop", tools=TOOLS)
    msg = r.choices[0].message
    calls = [
        {"id": c.id, "name": c.function.name, "arguments": c.function.arguments} for c in msg.tool_calls or []
    ]
    whole = summary(msg.content, calls, r.choices[0].finish_reason)
    if name in ("no call", "malformed"):
        assert whole == (text, [], "stop") and msg.tool_calls is None
    else:
        assert whole[2] == "tool_calls" and whole[1] and all(c.type == "function" for c in msg.tool_calls)
        assert "<tool_call>" not in (msg.content or "")
    for size in (1, 4, 50):
        chunks = run(scripted, split(text, size), "stop", tools=TOOLS, stream=True)
        content, streamed_calls, finish = reassemble(chunks)
        assert summary(content, streamed_calls, finish) == whole, size
        assert (
            all("<tool_call>" not in (c.choices[0].delta.content or "") for c in chunks if c.choices)
            or not calls
        )


def test_fixed_outputs_in_detail(scripted):
    r = run(scripted, ["Let me look.\n", PARIS, "\n", ROME], "stop", tools=TOOLS)
    msg = r.choices[0].message
    assert msg.content == "Let me look."
    assert [(c.function.name, json.loads(c.function.arguments)) for c in msg.tool_calls] == [
        ("get_weather", {"city": "Paris"}),
        ("get_weather", {"city": "Rome"}),
    ]
    assert msg.tool_calls[0].id != msg.tool_calls[1].id
    r = run(scripted, [PARIS], "stop", tools=TOOLS)
    assert r.choices[0].message.content is None  # OpenAI's null beside tool calls
    assert r.choices[0].finish_reason == "tool_calls"


def test_partial_call_at_max_tokens_stays_content(scripted):
    cut = ['<tool_call>\n{"name": "get_weather", ', '"arguments": {"ci']
    r = run(scripted, cut, "length", tools=TOOLS)
    assert r.choices[0].finish_reason == "length"
    assert r.choices[0].message.content == "".join(cut) and r.choices[0].message.tool_calls is None
    content, calls, finish = reassemble(run(scripted, cut, "length", tools=TOOLS, stream=True))
    assert (content, calls, finish) == ("".join(cut), [], "length")


def test_tool_choice_none_leaves_the_output_alone(scripted):
    """tool_choice "none": the tools are still rendered (as vLLM does) but nothing is parsed."""
    app, fake = scripted
    r = run(scripted, [PARIS], "stop", tools=TOOLS, tool_choice="none")
    assert r.choices[0].message.content == PARIS and r.choices[0].finish_reason == "stop"
    assert r.choices[0].message.tool_calls is None
    prompt = app.state.gateway.builder.tokenizer.decode(
        fake.requests[-1].input_ids, skip_special_tokens=False
    )
    assert "# Tools" in prompt and '"name": "get_weather"' in prompt
    r = run(scripted, [PARIS], "stop")  # no tools at all
    assert r.choices[0].message.content == PARIS


def test_each_choice_parses_its_own_calls(scripted):
    chunks = run(scripted, split(PARIS, 3), "stop", tools=TOOLS, n=2, stream=True)
    for i in range(2):
        mine = [c for c in chunks if c.choices and c.choices[0].index == i]
        content, calls, finish = reassemble(mine)
        assert summary(content, calls, finish) == (None, [("get_weather", {"city": "Paris"})], "tool_calls")


def test_tool_calls_with_logprobs_and_token_ids(scripted):
    r = run(
        scripted,
        [PARIS],
        "stop",
        tools=TOOLS,
        stream=True,
        logprobs=False,
        extra_body={"return_token_ids": True},
    )
    content, calls, finish = reassemble(r)
    assert finish == "tool_calls" and calls and content is None


def test_bodies_and_events_match_the_published_schema(scripted):
    """The raw JSON of a tool-call answer and of each streamed event validates against gateway/responses.py (what
    the OpenAPI schema publishes), so undeclared or misspelled fields fail here."""
    from gateway.responses import ChatCompletionChunk, ChatCompletionResponse

    app, fake = scripted
    fake.script = (split("Hi " + PARIS, 5), "stop")

    async def main():
        transport = httpx.ASGITransport(app=app)
        async with httpx.AsyncClient(transport=transport, base_url="http://gateway") as http:
            body = {"model": SERVED, "messages": USER, "tools": TOOLS}
            whole = (await http.post("/v1/chat/completions", json=body)).json()
            raw = (await http.post("/v1/chat/completions", json={**body, "stream": True})).text
        return whole, raw

    whole, raw = asyncio.run(main())
    ChatCompletionResponse.model_validate(whole)
    call = whole["choices"][0]["message"]["tool_calls"][0]
    assert set(call) == {"id", "type", "function"} and set(call["function"]) == {"name", "arguments"}
    events = [json.loads(line[6:]) for line in raw.splitlines() if line.startswith("data: {")]
    for event in events:
        ChatCompletionChunk.model_validate(event)
    deltas = [e["choices"][0]["delta"] for e in events if e["choices"]]
    first = next(d for d in deltas if "tool_calls" in d)["tool_calls"][0]
    assert first["function"]["arguments"] == "" and first["index"] == 0 and first["type"] == "function"
    assert (
        "finish_reason" in events[-1]["choices"][0]
        and events[-1]["choices"][0]["finish_reason"] == "tool_calls"
    )


# ---- through a real cluster ----


@pytest.fixture(scope="module")
def cluster(default_model, log_dir):
    c = Cluster(default_model, "--page-size", "8", log_dir=log_dir, name="tools")
    yield c
    c.stop()


@pytest.fixture(scope="module")
def client(cluster):
    return openai.OpenAI(base_url=cluster.base_url + "/v1", api_key="unused", max_retries=0)


HISTORY = [
    {"role": "user", "content": "Weather in Paris?"},
    {
        "role": "assistant",
        "content": None,
        "tool_calls": [
            {
                "id": "call_1",
                "type": "function",
                "function": {"name": "get_weather", "arguments": '{"city": "Paris"}'},
            }
        ],
    },
    {"role": "tool", "tool_call_id": "call_1", "content": "20C and sunny"},
]


def test_tool_history_runs_through_the_cluster(client, cluster, default_model):
    """The default model's random weights do not call tools: the answer is content, whole and streamed alike,
    and the prompt the cluster computed is the template's rendering of the tools and the history."""
    from processor.tokenizer import Tokenizer

    kw = {"model": SERVED, "messages": HISTORY, "max_tokens": 6, "tools": TOOLS, "temperature": 0}
    r = client.chat.completions.create(**kw, extra_body={"return_token_ids": True})
    assert r.choices[0].finish_reason in ("stop", "length") and r.choices[0].message.tool_calls is None
    prompt = Tokenizer(default_model).decode(r.prompt_token_ids, skip_special_tokens=False)
    assert "# Tools" in prompt
    assert '<tool_call>\n{"name": "get_weather", "arguments": {"city": "Paris"}}\n</tool_call>' in prompt
    assert prompt.endswith(
        "<|im_start|>user\n<tool_response>\n20C and sunny\n</tool_response><|im_end|>\n<|im_start|>assistant\n"
    )
    streamed = "".join(
        c.choices[0].delta.content or ""
        for c in client.chat.completions.create(**kw, stream=True)
        if c.choices
    )
    assert streamed == r.choices[0].message.content


# grammar-constrained decoding (issue 13's other half) gives requests a `constraint`; until it is merged and
# OpenAIServing._constrain attaches the tool grammar, "required" and a named function are refused
GRAMMAR_SUPPORT = "constraint" in GenerateRequest.__dataclass_fields__
FORCED = [
    ("required", None),
    ({"type": "function", "function": {"name": "get_weather"}}, "get_weather"),
]


@pytest.mark.skipif(
    not GRAMMAR_SUPPORT, reason="needs grammar-constrained decoding (not merged on this branch)"
)
@pytest.mark.parametrize(("choice", "name"), FORCED)
@pytest.mark.parametrize("stream", [False, True])
def test_forced_tool_calls_through_the_cluster(client, choice, name, stream):
    """Random weights at temperature 1 under the tool grammar: every choice ends in tool calls whose arguments
    validate against their tool's schema (and name the function asked for), streamed or not."""
    import jsonschema

    schemas = {t["function"]["name"]: t["function"]["parameters"] for t in TOOLS}
    kw = {"model": SERVED, "messages": USER, "tools": TOOLS, "tool_choice": choice, "max_tokens": 200}
    kw |= {"temperature": 1.0, "n": 4, "seed": 5}
    if stream:
        chunks = list(client.chat.completions.create(**kw, stream=True))
        results = [reassemble([c for c in chunks if c.choices and c.choices[0].index == i]) for i in range(4)]
    else:
        r = client.chat.completions.create(**kw)
        results = [
            (
                c.message.content,
                [
                    {"name": t.function.name, "arguments": t.function.arguments}
                    for t in c.message.tool_calls or []
                ],
                c.finish_reason,
            )
            for c in r.choices
        ]
    for content, calls, finish in results:
        assert finish == "tool_calls" and calls and content is None
        for call in calls:
            assert name is None or call["name"] == name
            jsonschema.validate(json.loads(call["arguments"]), schemas[call["name"]])


@pytest.mark.parametrize(
    ("extra", "param", "words"),
    [
        *(
            []
            if GRAMMAR_SUPPORT
            else [({"tool_choice": choice}, "tool_choice", "grammar") for choice, _ in FORCED]
        ),
        ({"tool_choice": {"type": "function", "function": {"name": "fly"}}}, "tool_choice", "'fly'"),
        (
            {"tools": [{"type": "function", "function": {"name": "bad name"}}]},
            "tools[0].function.name",
            "letters",
        ),
    ],
)
def test_refusals_are_400s_naming_the_problem(cluster, extra, param, words):
    body = {"model": SERVED, "messages": USER, "max_tokens": 2, "tools": TOOLS, **extra}
    for stream in (False, True):
        r = cluster.http.post("/v1/chat/completions", json={**body, "stream": stream})
        assert r.status_code == 400, r.text
        assert r.json()["error"]["param"] == param and words in r.json()["error"]["message"]
