"""OpenAI's error body for every failure: {"error": {"message", "type", "param", "code"}}."""

from __future__ import annotations

import json

from fastapi.responses import JSONResponse
from pydantic import ValidationError

from common.errors import InvalidRequestError, MiradorError, http_status


def error_body(message: str, type_: str, param: str | None = None, code: str | int | None = None) -> dict:
    return {"error": {"message": message, "type": type_, "param": param, "code": code}}


RETRY_AFTER_S = 1  # what 429 (overloaded) and 503 (not ready, restarting) responses tell clients to wait


def error_response(error: MiradorError) -> JSONResponse:
    status = http_status(error)
    headers = {"Retry-After": str(RETRY_AFTER_S)} if status in (429, 503) else None
    return JSONResponse(
        error_body(error.message, error.error_type, error.param, error.code or status),
        status,
        headers=headers,
    )


def from_validation_error(e: ValidationError) -> InvalidRequestError:
    first = e.errors()[0]
    loc = [str(x) for x in first.get("loc", ()) if x != "body"]
    param = ".".join(loc) or None
    return InvalidRequestError(
        f"{param + ': ' if param else ''}{first.get('msg', 'invalid value')}", param=param
    )


def sse_error(error: MiradorError) -> str:
    """An error inside a stream that already sent HTTP 200."""
    body = error_body(error.message, error.error_type, error.param, error.code or http_status(error))
    return f"data: {json.dumps(body)}\n\n"
