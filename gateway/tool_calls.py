"""Tool calls in OpenAI's shapes: the assistant message of a whole answer and the deltas of a stream (the parsing
itself is processor/tool_parsers.py)."""

from __future__ import annotations

from typing import Any

from processor.tool_parsers import ToolCall, ToolCallStream


def message(text: str | None, calls: list[ToolCall] | None) -> dict[str, Any]:
    """The assistant message: `tool_calls` only when the model called tools."""
    out: dict[str, Any] = {"role": "assistant", "content": text}
    if calls:
        out["tool_calls"] = [call.to_openai() for call in calls]
    return out


def stream_deltas(calls: ToolCallStream, text: str, finish_reason: str | None) -> list[dict[str, Any]]:
    """One output of a choice as OpenAI streams it: content deltas, and for each finished call a delta with its
    index, id, type, name and empty arguments, then one that appends the arguments (a call is sent once whole)."""
    events = calls.feed(text) if text else []
    if finish_reason is not None:
        events += calls.finish(finish_reason)
    deltas: list[dict[str, Any]] = []
    for e in events:
        if not isinstance(e, ToolCall):
            deltas.append({"content": e})
            continue
        k = calls.num_emitted
        calls.num_emitted += 1
        head = {"index": k, "id": e.id, "type": "function", "function": {"name": e.name, "arguments": ""}}
        deltas.append({"tool_calls": [head]})
        deltas.append({"tool_calls": [{"index": k, "function": {"arguments": e.arguments}}]})
    return deltas
