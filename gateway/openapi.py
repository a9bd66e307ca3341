"""The published OpenAPI schema: each route's request body and every answer it gives (status, media type, body),
so that clients and tests/test_schema_fuzz.py can check requests and responses against it."""

from __future__ import annotations

from typing import Any

from fastapi import FastAPI
from fastapi.openapi.utils import get_openapi
from pydantic import BaseModel

from gateway.protocol import ChatCompletionRequest, CompletionRequest, GenerateBody
from gateway.responses import (
    ChatCompletionChunk,
    CompletionChunk,
    ErrorResponse,
    FlushCacheResult,
    GenerateResponse,
)
from processor import sampling
from processor.request_builder import ROLES


def _error(description: str, retry_after: bool = False) -> dict[str, Any]:
    out: dict[str, Any] = {"model": ErrorResponse, "description": description}
    if retry_after:
        out["headers"] = {
            "Retry-After": {"description": "seconds to wait", "required": True, "schema": {"type": "integer"}}
        }
    return out


def _sse(event: type[BaseModel]) -> dict[str, Any]:
    """With `stream`: each event's data is one JSON object (an error in OpenAI's shape if the request fails after
    its first output), and the last is `[DONE]` (OpenAPI 3.1 reads this schema per event)."""
    refs = [{"$ref": f"#/components/schemas/{m.__name__}"} for m in (event, ErrorResponse)]
    data = {"type": "string", "contentMediaType": "application/json", "contentSchema": {"anyOf": refs}}
    return {
        "text/event-stream": {
            "schema": {
                "type": "object",
                "required": ["data"],
                "properties": {"data": {"anyOf": [{"const": "[DONE]"}, data]}},
            }
        }
    }


_UNAUTHORIZED = _error("--api-key is set and the request does not carry it (/health is open by default)")

# what every generating route may answer besides its 200
GENERATION_ERRORS: dict[int | str, dict[str, Any]] = {
    400: _error("the request is invalid (the message and `param` say where)"),
    401: _UNAUTHORIZED,
    404: _error("the model is not served here"),
    413: _error("the body, an image, or the images of a request together are too large"),
    429: _error("the scheduler's queue is full (--max-queued-requests)", retry_after=True),
    503: _error("not ready, restarting or shutting down", retry_after=True),
    504: _error("the request ran past --request-timeout-s"),
}


def generation_responses(model: Any, event: type[BaseModel]) -> dict[int | str, dict[str, Any]]:
    ok = {"model": model, "content": _sse(event), "description": "the result; with stream, events"}
    return {200: ok, **GENERATION_ERRORS}


def info_responses(model: type[BaseModel]) -> dict[int | str, dict[str, Any]]:
    return {200: {"model": model}, 401: _UNAUTHORIZED}


def model_responses(model: type[BaseModel]) -> dict[int | str, dict[str, Any]]:
    return {200: {"model": model}, 401: _UNAUTHORIZED, 404: _error("the model is not served here")}


FLUSH_RESPONSES: dict[int | str, dict[str, Any]] = {
    200: {"model": FlushCacheResult, "description": "both caches are empty (what a lease held stays)"},
    400: _error("requests are running or queued: nothing was flushed"),
    401: _UNAUTHORIZED,
    503: _error("not ready, restarting or shutting down", retry_after=True),
}

HEALTH_RESPONSES: dict[int | str, dict[str, Any]] = {
    200: {"description": "every service is serving (no body)", "content": None},
    401: _UNAUTHORIZED,
    503: _error("the scheduler, worker or vision service is not serving", retry_after=True),
}


METRICS_RESPONSES: dict[int | str, dict[str, Any]] = {
    200: {
        "description": "Prometheus text exposition of the gateway's metrics (every worker process's, merged)",
        "content": {"text/plain": {"schema": {"type": "string"}}},
    },
    401: _UNAUTHORIZED,
}


# OpenAI chat messages as processor.request_builder.normalize_messages reads them (it does the checking)
_IMAGE_URL = {
    "type": "string",
    "minLength": 1,
    "description": "data: URI, http(s) URL, or an allowed local path",
}
TOOL_SCHEMA = {
    "type": "object",
    "required": ["function"],
    "properties": {
        "type": {"const": "function"},
        "function": {
            "type": "object",
            "required": ["name"],
            "properties": {
                "name": {"type": "string", "pattern": "^[a-zA-Z0-9_-]{1,64}$"},
                "description": {"type": "string"},
                "parameters": {"type": "object"},
                "strict": {"type": ["boolean", "null"]},
            },
        },
    },
}

MESSAGE_SCHEMA = {
    "type": "object",
    "required": ["role"],
    "properties": {
        "role": {"type": "string", "enum": sorted(ROLES)},
        "content": {
            "anyOf": [
                {"type": "string"},
                {"type": "null"},
                {
                    "type": "array",
                    "items": {
                        "anyOf": [
                            {
                                "type": "object",
                                "required": ["type", "text"],
                                "properties": {"type": {"const": "text"}, "text": {"type": "string"}},
                            },
                            {
                                "type": "object",
                                "required": ["type", "image_url"],
                                "properties": {
                                    "type": {"const": "image_url"},
                                    "image_url": {
                                        "anyOf": [
                                            _IMAGE_URL,
                                            {
                                                "type": "object",
                                                "required": ["url"],
                                                "properties": {"url": _IMAGE_URL},
                                            },
                                        ]
                                    },
                                },
                            },
                        ]
                    },
                },
            ]
        },
        "tool_calls": {
            "type": "array",
            "items": {
                "type": "object",
                "required": ["function"],
                "properties": {
                    "id": {"type": "string"},
                    "type": {"const": "function"},
                    "function": {
                        "type": "object",
                        "required": ["name"],
                        "properties": {
                            "name": {"type": "string", "minLength": 1},
                            "arguments": {"type": "string", "contentMediaType": "application/json"},
                        },
                    },
                },
            },
        },
        "tool_call_id": {"type": "string"},
    },
}

_REQUEST_BODIES: dict[str, type[BaseModel]] = {
    "/v1/chat/completions": ChatCompletionRequest,
    "/v1/completions": CompletionRequest,
    "/generate": GenerateBody,
}
_EVENTS = (ChatCompletionChunk, CompletionChunk, GenerateResponse, ErrorResponse)


def _body_rules(model_names: list[str], vocab_size: int) -> dict[str, dict[str, Any]]:
    """What the validators (gateway/protocol.py, processor/) check in code, said in JSON Schema where it can be;
    a field's rule replaces the schema pydantic derives from its type."""
    token_id = {"type": "integer", "minimum": 0, "maximum": vocab_size - 1}
    token_ids = {"type": "array", "minItems": 1, "items": token_id}
    sampling = {
        "model": {"type": "string", "enum": model_names},
        "stop": {
            "anyOf": [
                {"type": "string"},
                {"type": "array", "items": {"type": "string"}, "maxItems": 4},
                {"type": "null"},
            ]
        },
        "logit_bias": {
            "anyOf": [
                {
                    "type": "object",
                    "propertyNames": {"pattern": "^[0-9]+$"},
                    "additionalProperties": {"type": "number", "minimum": -100, "maximum": 100},
                },
                {"type": "null"},
            ]
        },
        "seed": {"anyOf": [{"type": "integer", "minimum": 0, "maximum": 2**63 - 1}, {"type": "null"}]},
        "stop_token_ids": {"anyOf": [{"type": "array", "items": token_id}, {"type": "null"}]},
        # structured output (at most one of these); an invalid schema, regex or grammar is a 400 naming it
        "response_format": {
            "anyOf": [
                {"type": "object", "properties": {"type": {"const": "text"}}, "required": ["type"]},
                {"type": "object", "properties": {"type": {"const": "json_object"}}, "required": ["type"]},
                {
                    "type": "object",
                    "properties": {
                        "type": {"const": "json_schema"},
                        "json_schema": {
                            "type": "object",
                            "properties": {
                                "name": {"type": "string"},
                                "schema": {"type": "object"},
                                "strict": {"anyOf": [{"type": "boolean"}, {"type": "null"}]},
                            },
                        },
                    },
                    "required": ["type", "json_schema"],
                },
                {"type": "null"},
            ]
        },
        "json_schema": {"anyOf": [{"type": "string"}, {"type": "object"}, {"type": "null"}]},
        "regex": {"anyOf": [{"type": "string", "minLength": 1}, {"type": "null"}]},
        "ebnf": {"anyOf": [{"type": "string", "minLength": 1}, {"type": "null"}]},
        "structural_tag": {"type": "null"},  # not supported: a 400 that says so
    }
    chat_only = {
        "tools": {"anyOf": [{"type": "array", "items": TOOL_SCHEMA}, {"type": "null"}]},
        "tool_choice": {
            "anyOf": [
                {"enum": ["none", "auto", "required"]},
                {
                    "type": "object",
                    "required": ["function"],
                    "properties": {
                        "type": {"const": "function"},
                        "function": {
                            "type": "object",
                            "required": ["name"],
                            "properties": {"name": {"type": "string", "minLength": 1}},
                        },
                    },
                },
                {"type": "null"},
            ]
        },
    }
    prompt = {
        "anyOf": [
            {"type": "string", "minLength": 1},
            token_ids,
            {"type": "array", "minItems": 1, "items": {"type": "string"}},
            {"type": "array", "minItems": 1, "items": token_ids},
        ]
    }
    return {
        "ChatCompletionRequest": {
            **sampling,
            **chat_only,
            "messages": {"type": "array", "minItems": 1, "items": MESSAGE_SCHEMA},
        },
        "CompletionRequest": {**sampling, "prompt": prompt, "echo": {"type": "boolean"}},
        "GenerateBody": {
            "text": {
                "anyOf": [
                    {"type": "string", "minLength": 1},
                    {"type": "array", "minItems": 1, "items": {"type": "string", "minLength": 1}},
                ]
            },
            "input_ids": {"anyOf": [token_ids, {"type": "array", "minItems": 1, "items": token_ids}]},
        },
    }


# a 32x32 PNG, for the examples
_PNG = (
    "data:image/png;base64,iVBORw0KGgoAAAANSUhEUgAAACAAAAAgCAIAAAD8GO2jAAAAN0lEQVR42mMUqbjDQArYcsOHJPVMDDQGoxaMWjBqw"
    "agFoxZQAzCeCNAYDaJRC0YtGLVg1IJRCwAnoAS/gNSb3wAAAABJRU5ErkJggg=="
)


def _examples(model: str) -> dict[str, dict[str, dict[str, Any]]]:
    image = {"type": "image_url", "image_url": {"url": _PNG}}
    user = {"role": "user", "content": [image, {"type": "text", "text": "What is this?"}]}
    return {
        "ChatCompletionRequest": {
            "image": {"model": model, "messages": [user], "max_tokens": 8, "temperature": 0},
            "stream": {
                "model": model,
                "messages": [{"role": "user", "content": "Hello!"}],
                "max_tokens": 8,
                "stream": True,
                "stream_options": {"include_usage": True},
            },
            "logprobs": {
                "model": model,
                "messages": [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Hi"}],
                "max_tokens": 4,
                "logprobs": True,
                "top_logprobs": 2,
                "n": 2,
            },
        },
        "CompletionRequest": {
            "text": {"model": model, "prompt": "Once upon a time", "max_tokens": 8, "logprobs": 2},
            "several_prompts": {
                "model": model,
                "prompt": [[9707, 11], [1879]],
                "max_tokens": 4,
                "return_token_ids": True,
            },
            "image": {
                "model": model,
                "prompt": "Describe the image.",
                "image_data": _PNG,
                "max_tokens": 4,
                "stream": True,
            },
        },
        "GenerateBody": {
            "text": {"text": "Once upon a time", "sampling_params": {"max_new_tokens": 8, "temperature": 0}},
            "stream": {
                "input_ids": [9707, 11, 1879],
                "sampling_params": {"max_new_tokens": 4, "n": 2},
                "stream": True,
                "return_logprob": True,
                "top_logprobs_num": 2,
            },
        },
    }


def _add(components: dict[str, Any], model: type[BaseModel], mode: str) -> dict[str, Any]:
    body = model.model_json_schema(ref_template="#/components/schemas/{model}", mode=mode)
    for name, definition in body.pop("$defs", {}).items():
        components.setdefault(name, definition)
    components[model.__name__] = body
    return body


def _sglang_params(completion: dict[str, Any]) -> dict[str, Any]:
    """SGLang's sampling_params: the completion fields they become (processor/sampling.py), by SGLang's names;
    other keys are ignored."""
    openai_name = {"max_new_tokens": "max_tokens", "min_new_tokens": "min_tokens", "sampling_seed": "seed"}
    props = {k: completion["properties"][openai_name.get(k, k)] for k in sorted(sampling.SGLANG_KEYS)}
    return {"type": "object", "title": "Sampling Params", "properties": props}


def _request_body(
    components: dict[str, Any], model: type[BaseModel], model_names: list[str], vocab_size: int
) -> dict[str, Any]:
    body = _add(components, model, mode="validation")
    for name, rule in _body_rules(model_names, vocab_size)[model.__name__].items():
        kept = {k: v for k, v in body["properties"][name].items() if k in ("title", "default", "description")}
        body["properties"][name] = {**kept, **rule}
    if model is GenerateBody:
        body["oneOf"] = [{"required": ["text"]}, {"required": ["input_ids"]}]
        body["properties"]["sampling_params"] = _sglang_params(components[CompletionRequest.__name__])
    examples = _examples(model_names[0])[model.__name__]
    return {
        "required": True,
        "content": {
            "application/json": {
                "schema": {"$ref": f"#/components/schemas/{model.__name__}"},
                "examples": {name: {"value": value} for name, value in examples.items()},
            }
        },
    }


def install(app: FastAPI, model_names: list[str], vocab_size: int) -> None:
    """The routes read their bodies themselves (size cap, depth, lone surrogates: gateway/app.py), so FastAPI
    sees no body parameter; this adds each body's schema and examples, with `model` one of the names served
    here (the first is the examples') and token ids below `vocab_size`."""

    def openapi() -> dict[str, Any]:
        if app.openapi_schema:
            return app.openapi_schema
        schema = get_openapi(
            title=app.title, version=app.version, description=app.description, routes=app.routes
        )
        components = schema.setdefault("components", {}).setdefault("schemas", {})
        for event in _EVENTS:  # referenced by the streamed answers' schemas
            _add(components, event, mode="serialization")
        for path, model in _REQUEST_BODIES.items():
            schema["paths"][path]["post"]["requestBody"] = _request_body(
                components, model, model_names, vocab_size
            )
        app.openapi_schema = schema
        return schema

    app.openapi = openapi
