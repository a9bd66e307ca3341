"""Issue 13, tool calling without a cluster: the qwen25 parser on fixed model outputs (streamed in every chunking
equals whole), tools/tool_choice validation, the grammar that forces calls (compiled by llguidance against the
project's tokenizer), and the chat template's tool rendering against Qwen2.5's published template."""

from __future__ import annotations

import asyncio
import json
from pathlib import Path

import llguidance
import llguidance.hf
import pytest
from transformers import PreTrainedTokenizerFast

from common.errors import InvalidRequestError
from mirador.default_model import default_model_dir
from processor.request_builder import RequestBuilder, normalize_messages
from processor.tool_parsers import TOOL_PARSERS, HermesToolParser, ToolCall, tool_parser
from processor.tools import ToolChoice, check_tools, tool_call_grammar

QWEN25_TEMPLATE = (Path(__file__).parent / "data" / "qwen2_5_instruct_chat_template.jinja").read_text()
WEATHER = {
    "type": "function",
    "function": {
        "name": "get_weather",
        "description": "Current weather in a city",
        "parameters": {
            "type": "object",
            "properties": {"city": {"type": "string"}, "unit": {"type": "string", "enum": ["c", "f"]}},
            "required": ["city"],
            "additionalProperties": False,
        },
    },
}
SEARCH = {
    "type": "function",
    "function": {
        "name": "search",
        "parameters": {
            "type": "object",
            "properties": {
                "query": {"type": "string"},
                "filters": {"type": "object", "properties": {"year": {"type": "integer"}}},
            },
            "required": ["query"],
        },
    },
}
TOOLS = [WEATHER, SEARCH]


def call_text(name: str, args: dict) -> str:
    return f'<tool_call>\n{{"name": "{name}", "arguments": {json.dumps(args)}}}\n</tool_call>'


PARIS = call_text("get_weather", {"city": "Paris"})
NESTED = {"query": "q {x}", "filters": {"year": 2024, "tags": ["a", {"b": [1, 2]}]}}

# (model output, finish reason) -> (content, [(name, arguments)], finish reason)
CASES = {
    "one call": ((PARIS, "stop"), (None, [("get_weather", {"city": "Paris"})], "tool_calls")),
    "several": (
        (PARIS + "\n" + call_text("get_weather", {"city": "Rome"}), "stop"),
        (None, [("get_weather", {"city": "Paris"}), ("get_weather", {"city": "Rome"})], "tool_calls"),
    ),
    "nested arguments": (
        (call_text("search", NESTED), "stop"),
        (None, [("search", NESTED)], "tool_calls"),
    ),
    "text before the call": (
        ("Let me check.\n\n" + PARIS, "stop"),
        ("Let me check.", [("get_weather", {"city": "Paris"})], "tool_calls"),
    ),
    "text between and after": (
        ("A " + PARIS + "\nthen\n" + PARIS + "\n", "stop"),
        ("A then", [("get_weather", {"city": "Paris"})] * 2, "tool_calls"),
    ),
    "calls in a row between texts": (
        ("A\n" + PARIS + "\n" + PARIS + "\n\nthen", "stop"),
        ("A\nthen", [("get_weather", {"city": "Paris"})] * 2, "tool_calls"),
    ),
    "no call": (
        ("Just text, <b>no</b> call < > \n", "stop"),
        ("Just text, <b>no</b> call < > \n", [], "stop"),
    ),
    "partial at max_tokens": (
        ('Sure. <tool_call>\n{"name": "get_weather", "argum', "length"),
        ('Sure. <tool_call>\n{"name": "get_weather", "argum', [], "length"),
    ),
    "closed call, then cut": (
        (PARIS + "\n<tool_call>\n{", "length"),
        ("<tool_call>\n{", [("get_weather", {"city": "Paris"})], "length"),
    ),
    "bad json": (
        ('x <tool_call>\n{"name": "get_weather", "arguments": {city: Paris}}\n</tool_call>', "stop"),
        ('x <tool_call>\n{"name": "get_weather", "arguments": {city: Paris}}\n</tool_call>', [], "stop"),
    ),
    "unknown structure": (
        ("<tool_call>\n[1, 2]\n</tool_call>", "stop"),
        ("<tool_call>\n[1, 2]\n</tool_call>", [], "stop"),
    ),
    "arguments not an object": (
        ('<tool_call>\n{"name": "f", "arguments": 3}\n</tool_call>', "stop"),
        ('<tool_call>\n{"name": "f", "arguments": 3}\n</tool_call>', [], "stop"),
    ),
    "arguments as a JSON string": (
        ('<tool_call>\n{"name": "f", "arguments": "{\\"a\\": 1}"}\n</tool_call>', "stop"),
        (None, [("f", {"a": 1})], "tool_calls"),
    ),
    "a marker prefix at the end": (("ends with <tool_ca", "stop"), ("ends with <tool_ca", [], "stop")),
}


def simplify(content, calls: list[ToolCall], finish):
    return content, [(c.name, json.loads(c.arguments)) for c in calls], finish


@pytest.mark.parametrize("name", list(CASES))
def test_parse_whole_output(name):
    (text, finish), expected = CASES[name]
    content, calls, reason = HermesToolParser().parse(text, finish)
    assert simplify(content, calls, reason) == expected
    for c in calls:
        assert c.id.startswith("call_") and len(c.id) > 10
        assert json.loads(c.arguments) is not None
    assert len({c.id for c in calls}) == len(calls)


def chunkings(text: str):
    yield [text]
    yield list(text)  # one character at a time: every marker split every way
    for size in (2, 3, 5, 7, 11):
        yield [text[i : i + size] for i in range(0, len(text), size)]


@pytest.mark.parametrize("name", list(CASES))
def test_streamed_deltas_reassemble_to_the_whole_result(name):
    (text, finish), _ = CASES[name]
    whole = simplify(*HermesToolParser().parse(text, finish))
    for chunks in chunkings(text):
        stream = HermesToolParser().stream()
        events = []
        for chunk in chunks:
            events += stream.feed(chunk)
            # never streams the markup of a call that will parse
            assert not any(isinstance(e, str) and "<tool_call>" in e for e in events) or whole[1] == []
        events += stream.finish(finish)
        content = "".join(e for e in events if isinstance(e, str))
        calls = [e for e in events if isinstance(e, ToolCall)]
        got = simplify(content or (None if calls else ""), calls, stream.finish_reason)
        assert got == whole, chunks


def test_markup_is_never_streamed_as_content():
    stream = HermesToolParser().stream()
    seen = []
    for ch in "Hi " + PARIS:
        seen += stream.feed(ch)
    assert "".join(e for e in seen if isinstance(e, str)) == "Hi"
    assert [e.name for e in seen if isinstance(e, ToolCall)] == ["get_weather"]


def test_registry_defaults_by_family():
    assert isinstance(tool_parser("", "qwen2_5_vl"), HermesToolParser)
    assert isinstance(tool_parser("hermes", "llava"), HermesToolParser)
    assert tool_parser("", "some_family") is None
    assert set(TOOL_PARSERS) >= {"qwen25", "hermes"}
    with pytest.raises(ValueError, match="unknown tool call parser"):
        tool_parser("nope", "qwen2_5_vl")


# ---- validation ----


@pytest.mark.parametrize(
    ("tools", "choice", "expected"),
    [
        (TOOLS, None, ToolChoice("auto")),
        (None, None, ToolChoice("none")),
        (None, "none", ToolChoice("none")),
        (TOOLS, "none", ToolChoice("none")),
        (TOOLS, "required", ToolChoice("required")),
        ([], "required", ToolChoice("none")),
        ([], "auto", ToolChoice("none")),
        (TOOLS, {"type": "function", "function": {"name": "search"}}, ToolChoice("function", "search")),
    ],
)
def test_tool_choice_resolution(tools, choice, expected):
    assert check_tools(tools, choice) == expected


@pytest.mark.parametrize(
    ("tools", "choice", "param", "words"),
    [
        (None, "auto", "tool_choice", "`tools` must be set"),
        (None, "required", "tool_choice", "`tools` must be set"),
        (TOOLS, "sometimes", "tool_choice", "not valid"),
        (TOOLS, {"type": "function", "function": {"name": "fly"}}, "tool_choice", "'fly'"),
        (TOOLS, {"type": "function"}, "tool_choice", "not valid"),
        (TOOLS, {"type": "function", "function": {"name": ""}}, "tool_choice", "not valid"),
        ("x", None, "tools", "list"),
        ([{"type": "retrieval"}], None, "tools[0]", "function tools"),
        ([{"type": "function"}], None, "tools[0].function", "object"),
        ([{"type": "function", "function": {"name": "a b"}}], None, "tools[0].function.name", "letters"),
        ([WEATHER, WEATHER], None, "tools[1].function.name", "two tools"),
        (
            [{"type": "function", "function": {"name": "f", "parameters": {"type": "string"}}}],
            None,
            "tools[0].function.parameters",
            "object",
        ),
        (
            [{"type": "function", "function": {"name": "f", "parameters": "{}"}}],
            None,
            "tools[0].function.parameters",
            "object",
        ),
    ],
)
def test_invalid_tools_and_choices(tools, choice, param, words):
    with pytest.raises(InvalidRequestError) as e:
        check_tools(tools, choice)
    assert e.value.param == param
    assert words in e.value.message


def test_history_tool_calls_are_validated():
    msg = {
        "role": "assistant",
        "tool_calls": [{"type": "function", "function": {"name": "f", "arguments": "{x"}}],
    }
    with pytest.raises(InvalidRequestError) as e:
        normalize_messages([{"role": "user", "content": "hi"}, msg])
    assert e.value.param == "messages[1].tool_calls[0].function.arguments"
    with pytest.raises(InvalidRequestError) as e:
        normalize_messages([{"role": "tool", "tool_call_id": 3, "content": "x"}])
    assert e.value.param == "messages[0].tool_call_id"


# ---- the grammar for "required" and a named function ----


@pytest.fixture(scope="module")
def ll_tokenizer():
    tok = PreTrainedTokenizerFast.from_pretrained(str(default_model_dir()))
    return tok, llguidance.hf.from_tokenizer(tok)


def accepts(ll_tokenizer, grammar: tuple[str, str], text: str) -> bool:
    tok, ll = ll_tokenizer
    kind, lark = grammar
    assert kind == "lark"
    matcher = llguidance.LLMatcher(ll, llguidance.LLMatcher.grammar_from_lark(lark))
    assert not matcher.is_error(), matcher.get_error()
    ids = tok.encode(text, add_special_tokens=False)
    return matcher.consume_tokens(ids) and matcher.is_accepting()


def compact(name: str, args: dict) -> str:
    return f'<tool_call>\n{{"name": "{name}", "arguments": {json.dumps(args, separators=(",", ":"))}}}\n</tool_call>'


def test_grammar_for_required(ll_tokenizer):
    grammar = tool_call_grammar(TOOLS, ToolChoice("required"))
    weather = compact("get_weather", {"city": "Paris", "unit": "c"})
    search = compact("search", {"query": "x", "filters": {"year": 2024}})
    assert accepts(ll_tokenizer, grammar, weather)
    assert accepts(ll_tokenizer, grammar, weather + "\n" + search)
    assert not accepts(ll_tokenizer, grammar, "Sure: " + weather)  # text instead of a call
    assert not accepts(ll_tokenizer, grammar, compact("fly", {"city": "Paris"}))  # not a tool
    assert not accepts(ll_tokenizer, grammar, compact("get_weather", {"unit": "c"}))  # city is required
    assert not accepts(ll_tokenizer, grammar, compact("get_weather", {"city": "P", "x": 1}))  # no extra keys
    assert not accepts(ll_tokenizer, grammar, compact("get_weather", {"city": "P", "unit": "k"}))  # enum
    assert not accepts(ll_tokenizer, grammar, compact("search", {"query": "x", "filters": {"year": "y"}}))
    assert not accepts(ll_tokenizer, grammar, "")  # at least one call


def test_grammar_for_a_named_function(ll_tokenizer):
    grammar = tool_call_grammar(TOOLS, ToolChoice("function", "search"))
    search = compact("search", {"query": "x"})
    assert accepts(ll_tokenizer, grammar, search)
    assert not accepts(ll_tokenizer, grammar, compact("get_weather", {"city": "Paris"}))
    assert not accepts(ll_tokenizer, grammar, search + "\n" + search)  # exactly one call
    # what the grammar forces is what the parser reads
    content, calls, finish = HermesToolParser().parse(search, "stop")
    assert (content, [(c.name, json.loads(c.arguments)) for c in calls], finish) == (
        None,
        [("search", {"query": "x"})],
        "tool_calls",
    )


def test_no_grammar_unless_forced():
    assert tool_call_grammar(TOOLS, ToolChoice("auto")) is None
    assert tool_call_grammar(TOOLS, ToolChoice("none")) is None


def test_function_without_parameters_takes_an_object(ll_tokenizer):
    grammar = tool_call_grammar([{"type": "function", "function": {"name": "now"}}], ToolChoice("required"))
    assert accepts(ll_tokenizer, grammar, compact("now", {}))
    assert not accepts(ll_tokenizer, grammar, '<tool_call>\n{"name": "now", "arguments": 3}\n</tool_call>')


# ---- the chat template ----

HISTORY = [
    {"role": "system", "content": "You are terse."},
    {"role": "user", "content": "Weather in Paris and Rome?"},
    {
        "role": "assistant",
        "content": None,
        "tool_calls": [
            {
                "id": "call_1",
                "type": "function",
                "function": {"name": "get_weather", "arguments": '{"city": "Paris"}'},
            },
            {
                "id": "call_2",
                "type": "function",
                "function": {"name": "get_weather", "arguments": '{"city": "Rome"}'},
            },
        ],
    },
    {"role": "tool", "tool_call_id": "call_1", "content": "20C"},
    {"role": "tool", "tool_call_id": "call_2", "content": "25C"},
    {"role": "assistant", "content": "Paris 20C, Rome 25C."},
    {"role": "user", "content": "And Oslo?"},
    {
        "role": "assistant",
        "content": "Checking.",
        "tool_calls": [
            {"id": "c3", "type": "function", "function": {"name": "search", "arguments": '{"query": "é"}'}}
        ],
    },
    {"role": "tool", "tool_call_id": "c3", "content": "-2C"},
]


@pytest.fixture(scope="module")
def builder():
    b = RequestBuilder(default_model_dir())
    yield b
    asyncio.run(b.aclose())


def reference(builder, messages, tools, **kw) -> str:
    """Qwen2.5-7B-Instruct's published template through transformers, for the same (normalized) messages."""
    normalized, _ = normalize_messages(messages)
    return builder.tokenizer.hf.apply_chat_template(
        normalized,
        chat_template=QWEN25_TEMPLATE,
        tokenize=False,
        add_generation_prompt=True,
        tools=tools,
        **kw,
    )


@pytest.mark.parametrize("with_tools", [True, False])
def test_template_renders_tools_as_qwen25(builder, with_tools):
    tools = TOOLS if with_tools else None
    ours = asyncio.run(builder.from_messages(HISTORY, tools=tools)).text
    assert ours == reference(builder, HISTORY, tools)
    assert ("# Tools" in ours) == with_tools
    assert '<tool_call>\n{"name": "get_weather", "arguments": {"city": "Paris"}}\n</tool_call>' in ours
    assert (
        "<|im_start|>user\n<tool_response>\n20C\n</tool_response>\n<tool_response>\n25C\n</tool_response>"
        in ours
    )
    ids = asyncio.run(builder.from_messages(HISTORY, tools=tools)).input_ids
    assert ids == builder.tokenizer.encode(ours)


def test_template_default_system_is_the_vision_models(builder):
    """Without a system message our template keeps Qwen2.5-VL's default system text where Qwen2.5 has its own;
    everything else is the same."""
    msgs = HISTORY[1:]
    ours = asyncio.run(builder.from_messages(msgs, tools=TOOLS)).text
    ref = reference(builder, msgs, TOOLS)
    qwen = "You are Qwen, created by Alibaba Cloud. You are a helpful assistant."
    assert ours == ref.replace(qwen, "You are a helpful assistant.")
    assert ours.startswith("<|im_start|>system\nYou are a helpful assistant.\n\n# Tools\n")


def test_tool_messages_with_text_parts_and_images_in_history(builder):
    msgs = [
        {"role": "user", "content": "hi"},
        {
            "role": "assistant",
            "tool_calls": [{"type": "function", "function": {"name": "f", "arguments": "{}"}}],
        },
        {
            "role": "tool",
            "tool_call_id": "x",
            "content": [{"type": "text", "text": "a"}, {"type": "text", "text": "b"}],
        },
    ]
    text = asyncio.run(builder.from_messages(msgs, tools=TOOLS)).text
    assert text.endswith(
        '<|im_start|>assistant\n<tool_call>\n{"name": "f", "arguments": {}}\n</tool_call><|im_end|>\n'
        "<|im_start|>user\n<tool_response>\nab\n</tool_response><|im_end|>\n<|im_start|>assistant\n"
    )


def random_walk(ll_tokenizer, lark: str, rng, max_steps: int = 300) -> str | None:
    """Sample tokens the grammar allows (biased toward closing strings and objects, so walks end) until it may
    stop; the text, or None when the walk ran out of steps."""
    import llguidance.numpy as llnp
    import numpy as np

    tok, ll = ll_tokenizer
    matcher = llguidance.LLMatcher(ll, llguidance.LLMatcher.grammar_from_lark(lark))
    mask = llnp.allocate_token_bitmask(1, ll.vocab_size)
    closing = [tok.convert_tokens_to_ids(t) for t in ('"', "}", "</tool_call>", "Ċ")]
    ids: list[int] = []
    for _ in range(max_steps):
        if matcher.is_accepting() and (matcher.is_stopped() or rng.random() < 0.5):
            return tok.decode(ids)
        llnp.fill_next_token_bitmask(matcher, mask, 0)
        bits = np.unpackbits(mask[0].view(np.uint8), bitorder="little")[: ll.vocab_size]
        bits[ll.eos_token] = 0
        allowed = np.flatnonzero(bits)
        preferred = [t for t in closing if bits[t]]
        if preferred and rng.random() < 0.4:
            token = int(rng.choice(preferred))
        else:
            token = int(rng.choice(allowed[:64]) if rng.random() < 0.7 else rng.choice(allowed))
        assert matcher.consume_token(token), matcher.get_error()
        ids.append(token)
    return None


@pytest.mark.parametrize("choice", [ToolChoice("required"), ToolChoice("function", "get_weather")])
def test_whatever_the_grammar_lets_through_parses_into_valid_calls(ll_tokenizer, choice):
    """Random walks through the grammar (what a random-weight model under the mask can write): every finished
    walk is one or more calls (one of the named function) whose arguments validate against the tool's schema."""
    import jsonschema
    import numpy as np

    rng = np.random.default_rng(13)
    schemas = {t["function"]["name"]: t["function"]["parameters"] for t in TOOLS}
    lark = tool_call_grammar(TOOLS, choice)[1]
    finished = 0
    for _ in range(12):
        text = random_walk(ll_tokenizer, lark, rng)
        if text is None:
            continue
        finished += 1
        content, calls, finish = HermesToolParser().parse(text, "stop")
        assert content is None and calls and finish == "tool_calls", text
        if choice.mode == "function":
            assert [c.name for c in calls] == [choice.name]
        for c in calls:
            jsonschema.validate(json.loads(c.arguments), schemas[c.name])
    assert finished >= 6
