"""Structured output requests -> a Constraint (the grammar every choice follows), and a Constraint -> the grammar
llguidance compiles. Torch-free; llguidance is imported only where a grammar is built (the scheduler)."""

from __future__ import annotations

import json
from collections.abc import Mapping
from typing import Any

from common.errors import InvalidRequestError
from common.types import CONSTRAINT_KINDS, Constraint

__all__ = ["CONSTRAINT_KINDS", "Constraint", "from_fields", "to_grammar", "to_proto"]

# compact JSON: no whitespace between tokens, so a weak or random model cannot pad until max_tokens (SGLang's
# --constrained-json-whitespace-pattern, vLLM's disable-any-whitespace); "," and ":" as separators
JSON_OPTIONS = {"whitespace_flexible": False, "item_separator": ",", "key_separator": ":"}
ANY_OBJECT = '{"type": "object"}'


def from_fields(fields: Mapping[str, Any]) -> Constraint | None:
    """The constraint a request asks for: OpenAI's response_format (json_object, json_schema), or SGLang's
    json_schema (a string or an object), regex and ebnf extras. At most one may be given."""
    given = [k for k in ("response_format", "json_schema", "regex", "ebnf") if _given(k, fields.get(k))]
    if len(given) > 1:
        raise InvalidRequestError(f"give at most one of {', '.join(given)}", param=given[1])
    if not given:
        return None
    key = given[0]
    value = fields[key]
    if key == "response_format":
        return _response_format(value)
    if key == "json_schema":
        return Constraint("json_schema", _schema_text(value, "json_schema"))
    if not isinstance(value, str) or not value:
        raise InvalidRequestError(f"{key} must be a non-empty string", param=key)
    return Constraint(key, value)


def _given(key: str, value: Any) -> bool:
    if key == "response_format":
        return (
            isinstance(value, Mapping)
            and value.get("type", "text") != "text"
            or (value is not None and not isinstance(value, Mapping))
        )
    return value is not None


def _response_format(rf: Any) -> Constraint:
    if not isinstance(rf, Mapping):
        raise InvalidRequestError("response_format must be an object", param="response_format")
    kind = rf.get("type")
    if kind == "json_object":
        return Constraint("json_object")
    if kind != "json_schema":
        raise InvalidRequestError(
            f"response_format type {kind!r} is not supported; use 'text', 'json_object' or 'json_schema'",
            param="response_format",
        )
    spec = rf.get("json_schema")
    if not isinstance(spec, Mapping):
        raise InvalidRequestError(
            "response_format json_schema needs a json_schema object with a schema", param="response_format"
        )
    schema = spec.get("schema", spec.get("schema_"))
    if schema is None:  # OpenAI lets the schema be omitted: any JSON object then
        return Constraint("json_object")
    return Constraint("json_schema", _schema_text(schema, "response_format.json_schema.schema"))


def _schema_text(schema: Any, param: str) -> str:
    if isinstance(schema, str):
        try:
            schema = json.loads(schema)
        except ValueError as e:
            raise InvalidRequestError(f"{param} is not valid JSON: {e}", param=param) from None
    if isinstance(schema, bool):
        schema = {} if schema else {"not": {}}
    if not isinstance(schema, Mapping):
        raise InvalidRequestError(f"{param} must be a JSON schema object", param=param)
    return json.dumps(schema, separators=(",", ":"))  # key order kept: it is the order properties come in


def to_grammar(c: Constraint) -> str:
    """The llguidance grammar for a constraint (not yet checked: LLMatcher construction reports errors).
    Raises ValueError for text that cannot even be converted (a schema that is not JSON, bad GBNF)."""
    from llguidance import LLMatcher, grammar_from

    if c.kind == "json_object":
        return LLMatcher.grammar_from_json_schema(ANY_OBJECT, defaults=JSON_OPTIONS)
    if c.kind == "json_schema":
        return LLMatcher.grammar_from_json_schema(c.text, defaults=JSON_OPTIONS)
    if c.kind == "regex":
        return LLMatcher.grammar_from_regex(c.text)
    if c.kind == "ebnf":
        return grammar_from("ebnf", c.text)
    return LLMatcher.grammar_from_lark(c.text)


def to_proto(c: Constraint | None):
    """The GenerateRequest.constraint field for a constraint (None: the field stays unset)."""
    from common.convert import constraint_to_proto

    return constraint_to_proto(c)
