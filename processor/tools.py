"""Tool definitions and tool_choice: validation (OpenAI's shapes, vLLM's rules), past tool calls made ready for the
chat template, and the grammar that forces a call when tool_choice is "required" or names a function."""

from __future__ import annotations

import json
import re
from dataclasses import dataclass
from typing import Any

from common.errors import InvalidRequestError

_NAME = re.compile(r"^[a-zA-Z0-9_-]{1,64}$")  # OpenAI's rule for function names
_CHOICE_USAGE = 'use "none", "auto", "required" or {"type": "function", "function": {"name": "my_function"}}'


@dataclass(frozen=True)
class ToolChoice:
    """What the model may do: "none", "auto", "required" (at least one call) or "function" (exactly `name`)."""

    mode: str
    name: str = ""

    @property
    def parses(self) -> bool:
        """Whether the output is read for calls."""
        return self.mode != "none"

    @property
    def forced(self) -> bool:
        """Whether a grammar must force the calls."""
        return self.mode in ("required", "function")


def check_tools(tools: Any, tool_choice: Any) -> ToolChoice:
    """Validate `tools` and `tool_choice` (a 400 naming the problem) and resolve the choice: "auto" when tools are
    given without a choice (OpenAI's default), "none" without tools; "required" or "auto" with an empty list of
    tools act as "none" (vLLM does so for "required", following OpenAI)."""
    if tools is not None:
        _check_tool_list(tools)
    if tool_choice is None:
        return ToolChoice("auto" if tools else "none")
    if tool_choice == "none":
        return ToolChoice("none")
    if tools is None:
        raise InvalidRequestError("When using `tool_choice`, `tools` must be set.", param="tool_choice")
    if isinstance(tool_choice, str):
        if tool_choice not in ("auto", "required"):
            raise InvalidRequestError(
                f"tool_choice {tool_choice!r} is not valid; {_CHOICE_USAGE}", param="tool_choice"
            )
        return ToolChoice(tool_choice if tools else "none")  # nothing to call
    function = tool_choice.get("function") if isinstance(tool_choice, dict) else None
    name = function.get("name") if isinstance(function, dict) else None
    if tool_choice.get("type", "function") != "function" or not isinstance(name, str) or not name:
        raise InvalidRequestError(f"tool_choice is not valid; {_CHOICE_USAGE}", param="tool_choice")
    if name not in {t["function"]["name"] for t in tools}:
        raise InvalidRequestError(
            f"tool_choice names the function {name!r}, which is not in `tools`", param="tool_choice"
        )
    return ToolChoice("function", name)


def _check_tool_list(tools: Any) -> None:
    if not isinstance(tools, list):
        raise InvalidRequestError("tools must be a list of function tools", param="tools")
    seen: set[str] = set()
    for i, tool in enumerate(tools):
        where = f"tools[{i}]"
        if not isinstance(tool, dict) or tool.get("type", "function") != "function":
            raise InvalidRequestError(
                f'{where} must be {{"type": "function", "function": {{...}}}}; only function tools are supported',
                param=where,
            )
        fn = tool.get("function")
        if not isinstance(fn, dict):
            raise InvalidRequestError(f"{where}.function must be an object", param=f"{where}.function")
        name = fn.get("name")
        if not isinstance(name, str) or not _NAME.match(name):
            raise InvalidRequestError(
                f"{where}.function.name must be 1-64 letters, digits, underscores or dashes, got {name!r}",
                param=f"{where}.function.name",
            )
        if name in seen:
            raise InvalidRequestError(f"two tools are named {name!r}", param=f"{where}.function.name")
        seen.add(name)
        if not isinstance(fn.get("description", ""), str):
            raise InvalidRequestError(
                f"{where}.function.description must be a string", param=f"{where}.function.description"
            )
        params = fn.get("parameters")
        if params is not None and (not isinstance(params, dict) or params.get("type", "object") != "object"):
            raise InvalidRequestError(
                f"{where}.function.parameters must be a JSON Schema of an object",
                param=f"{where}.function.parameters",
            )


def template_tool_calls(tool_calls: Any, where: str) -> list[dict[str, Any]]:
    """An assistant message's past calls as the chat template renders them: `arguments` as an object (OpenAI
    sends a JSON string; templates write it with `tojson`, as vLLM prepares it)."""
    if not isinstance(tool_calls, list):
        raise InvalidRequestError(f"{where} must be a list", param=where)
    out = []
    for j, call in enumerate(tool_calls):
        at = f"{where}[{j}]"
        fn = call.get("function") if isinstance(call, dict) else None
        if not isinstance(fn, dict) or not isinstance(fn.get("name"), str) or not fn["name"]:
            raise InvalidRequestError(
                f"{at}.function.name must be a non-empty string", param=f"{at}.function"
            )
        args = fn.get("arguments", {})
        if isinstance(args, str):
            try:
                args = json.loads(args) if args.strip() else {}
            except json.JSONDecodeError:
                raise InvalidRequestError(
                    f"{at}.function.arguments is not valid JSON", param=f"{at}.function.arguments"
                ) from None
        if not isinstance(args, dict):
            raise InvalidRequestError(
                f"{at}.function.arguments must be a JSON object", param=f"{at}.function.arguments"
            )
        out.append({**call, "type": "function", "function": {**fn, "arguments": args}})
    return out


def tool_call_grammar(
    tools: list[dict[str, Any]], choice: ToolChoice, start: str = "<tool_call>", end: str = "</tool_call>"
) -> tuple[str, str] | None:
    """("lark", grammar) for llguidance that forces `start`\\n{"name": "<f>", "arguments": <f's parameters>}\\n`end`:
    one or more calls of any tool for "required", exactly one call of the named function for "function"; None
    when nothing is forced. `start` and `end` are lark terms: bare `<tool_call>` is the tokenizer's special token
    of that name (a quoted string would be its spelling in ordinary tokens). Arguments are compact JSON."""
    if not choice.forced:
        return None
    chosen = [
        t["function"] for t in tools if choice.mode == "required" or t["function"]["name"] == choice.name
    ]
    lines = [
        'start: call ("\\n" call)*' if choice.mode == "required" else "start: call",
        "call: " + " | ".join(f"call_{i}" for i in range(len(chosen))),
    ]
    for i, fn in enumerate(chosen):
        schema = {**(fn.get("parameters") or {"type": "object", "properties": {}})}
        schema["x-guidance"] = {"whitespace_flexible": False}
        head = json.dumps('\n{"name": ' + json.dumps(fn["name"]) + ', "arguments": ')
        lines.append(f'call_{i}: {start} {head} args_{i} "}}\\n" {end}')
        lines.append(f"args_{i}: %json {json.dumps(schema)}")
    return "lark", "\n".join(lines) + "\n"
