"""Model output -> OpenAI tool calls: one parser per markup family (a registry keyed by parser name, with a default
per model family), and the incremental splitter that streams content and finished calls as the text arrives."""

from __future__ import annotations

import json
import uuid
from dataclasses import dataclass
from typing import Any


@dataclass(frozen=True)
class ToolCall:
    """One call as OpenAI returns it: `arguments` is a JSON string."""

    id: str
    name: str
    arguments: str

    def to_openai(self) -> dict[str, Any]:
        return {
            "id": self.id,
            "type": "function",
            "function": {"name": self.name, "arguments": self.arguments},
        }


def new_call_id() -> str:
    return f"call_{uuid.uuid4().hex[:24]}"


class ToolParser:
    """A markup family: each call is `start` + body + `end`; `parse_body` reads a body into (name, arguments as a
    JSON string), or None when it is not a well-formed call (then the text stays content)."""

    start: str
    end: str
    # the markers as lark terms for the grammar that forces calls (processor/tools.py)
    lark_start: str
    lark_end: str

    def parse_body(self, body: str) -> tuple[str, str] | None:
        raise NotImplementedError

    def stream(self) -> ToolCallStream:
        return ToolCallStream(self)

    def parse(self, text: str, finish_reason: str | None) -> tuple[str | None, list[ToolCall], str | None]:
        """A whole output -> (content, calls, finish_reason), exactly what the stream's deltas add up to."""
        s = self.stream()
        events = s.feed(text) + s.finish(finish_reason)
        content = "".join(e for e in events if isinstance(e, str))
        calls = [e for e in events if isinstance(e, ToolCall)]
        return (content or None) if calls else content, calls, s.finish_reason


class HermesToolParser(ToolParser):
    """Qwen2.5 (and Hermes): `<tool_call>\\n{"name": ..., "arguments": {...}}\\n</tool_call>`, one block per call."""

    start = "<tool_call>"
    end = "</tool_call>"
    lark_start = "<tool_call>"  # Qwen2.5's special token, not its spelling in ordinary tokens
    lark_end = "</tool_call>"

    def parse_body(self, body: str) -> tuple[str, str] | None:
        try:
            obj = json.loads(body)
        except (json.JSONDecodeError, RecursionError):
            return None
        if not isinstance(obj, dict) or not isinstance(obj.get("name"), str) or not obj["name"]:
            return None
        args = obj.get("arguments", obj.get("parameters", {}))
        if isinstance(args, str):  # some models write the arguments as a JSON string already
            try:
                args = json.loads(args)
            except json.JSONDecodeError:
                return None
        if not isinstance(args, dict):
            return None
        return obj["name"], json.dumps(args, ensure_ascii=False)


# parser name -> class; other families add theirs here
TOOL_PARSERS: dict[str, type[ToolParser]] = {"qwen25": HermesToolParser, "hermes": HermesToolParser}
# model_type -> the parser its chat template teaches
FAMILY_PARSERS = {"qwen2_5_vl": "qwen25", "qwen2_vl": "qwen25"}


def tool_parser(name: str, model_type: str) -> ToolParser | None:
    """The parser named (empty: the model family's default; None when the family has none)."""
    name = name or FAMILY_PARSERS.get(model_type, "")
    if not name:
        return None
    if name not in TOOL_PARSERS:
        raise ValueError(f"unknown tool call parser {name!r}; known: {sorted(TOOL_PARSERS)}")
    return TOOL_PARSERS[name]()


class ToolCallStream:
    """Splits one choice's text deltas into content (str) and finished calls (ToolCall). A call is held until its
    end marker and then parsed whole, so a malformed one falls back to its text as content; a tail that may start
    a marker is held back. Whitespace next to a call is dropped (content is what the model said besides its
    calls); an output without calls comes back byte for byte."""

    def __init__(self, parser: ToolParser):
        self.parser = parser
        self.buf = ""
        self.in_call = False
        self.gap = ""  # whitespace held back after the content so far
        self.gap_before_call = ""  # the gap a call dropped, restored if the call turns out malformed
        self.after_call = False  # nothing but whitespace since the last call
        self.num_calls = 0
        self.num_emitted = 0  # calls a stream has sent (their OpenAI index)
        self.finish_reason: str | None = None

    def feed(self, text: str) -> list[str | ToolCall]:
        p, out = self.parser, []
        self.buf += text
        while True:
            if self.in_call:
                k = self.buf.find(p.end)
                if k < 0:
                    return out
                body, self.buf, self.in_call = self.buf[:k], self.buf[k + len(p.end) :], False
                parsed = p.parse_body(body)
                if parsed is None:  # not a call: its text is content, whitespace before it included
                    self._content(self.gap_before_call + p.start + body + p.end, out, keep_gap=True)
                else:
                    out.append(ToolCall(new_call_id(), *parsed))
                    self.num_calls += 1
                    self.after_call = True
                    self.gap = ""
                continue
            k = self.buf.find(p.start)
            if k >= 0:
                self._content(self.buf[:k], out)
                if not self.after_call:  # calls in a row keep the gap before the first
                    self.gap_before_call = self.gap
                self.gap = ""
                self.buf, self.in_call = self.buf[k + len(p.start) :], True
                continue
            keep = _partial_suffix(self.buf, p.start)
            self._content(self.buf[: len(self.buf) - keep], out)
            self.buf = self.buf[len(self.buf) - keep :]
            return out

    def finish(self, finish_reason: str | None) -> list[str | ToolCall]:
        """The end of the output: an unclosed call (cut by max_tokens, say) stays content, as does a held tail;
        the finish reason becomes "tool_calls" when calls were made and the model stopped by itself."""
        out: list[str | ToolCall] = []
        if self.in_call:
            self._content(self.gap_before_call + self.parser.start + self.buf, out, keep_gap=True)
        else:
            self._content(self.buf, out)
        self.buf, self.in_call = "", False
        if self.num_calls == 0 and self.gap:
            out.append(self.gap)
        self.gap = ""
        self.finish_reason = "tool_calls" if self.num_calls and finish_reason == "stop" else finish_reason
        return out

    def _content(self, text: str, out: list[str | ToolCall], keep_gap: bool = False) -> None:
        if not text:
            return
        if self.after_call and not keep_gap:
            text = text.lstrip()
            if not text:
                return
            text = self.gap_before_call + text  # content resumes: as separated as before the calls
        self.after_call = False
        text = self.gap + text
        body = text.rstrip()
        self.gap = text[len(body) :]
        if body:
            out.append(body)


def _partial_suffix(text: str, marker: str) -> int:
    """Length of the longest tail of `text` that is a proper prefix of `marker`."""
    for n in range(min(len(marker) - 1, len(text)), 0, -1):
        if text.endswith(marker[:n]):
            return n
    return 0
