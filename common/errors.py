"""Domain errors and the one place that maps them to gRPC status codes and HTTP statuses."""

from __future__ import annotations

import logging

import grpc


class MiradorError(Exception):
    """Base for errors that carry a status; `param` names the offending request field where there is one."""

    grpc_code = grpc.StatusCode.INTERNAL
    error_type = "internal_error"

    def __init__(self, message: str, *, param: str | None = None, code: str | None = None):
        super().__init__(message)
        self.message = message
        self.param = param
        self.code = code


class InvalidRequestError(MiradorError):
    grpc_code = grpc.StatusCode.INVALID_ARGUMENT
    error_type = "invalid_request_error"


class NotFoundError(MiradorError):
    grpc_code = grpc.StatusCode.NOT_FOUND
    error_type = "not_found_error"


class PayloadTooLargeError(MiradorError):
    grpc_code = grpc.StatusCode.INVALID_ARGUMENT
    error_type = "invalid_request_error"
    http_status = 413


class ResourceExhaustedError(MiradorError):
    grpc_code = grpc.StatusCode.RESOURCE_EXHAUSTED
    error_type = "server_overloaded"


class UnavailableError(MiradorError):
    grpc_code = grpc.StatusCode.UNAVAILABLE
    error_type = "service_unavailable"


class DeadlineExceededError(MiradorError):
    grpc_code = grpc.StatusCode.DEADLINE_EXCEEDED
    error_type = "timeout"


class CancelledError(MiradorError):
    grpc_code = grpc.StatusCode.CANCELLED
    error_type = "cancelled"


_HTTP_BY_GRPC = {
    grpc.StatusCode.INVALID_ARGUMENT: 400,
    grpc.StatusCode.OUT_OF_RANGE: 400,
    grpc.StatusCode.FAILED_PRECONDITION: 400,
    grpc.StatusCode.NOT_FOUND: 404,
    grpc.StatusCode.ALREADY_EXISTS: 409,
    grpc.StatusCode.RESOURCE_EXHAUSTED: 429,
    grpc.StatusCode.UNAVAILABLE: 503,
    grpc.StatusCode.DEADLINE_EXCEEDED: 504,
    grpc.StatusCode.CANCELLED: 499,
    grpc.StatusCode.UNAUTHENTICATED: 401,
    grpc.StatusCode.PERMISSION_DENIED: 403,
    grpc.StatusCode.UNIMPLEMENTED: 501,
}

_ERROR_BY_GRPC = {
    grpc.StatusCode.INVALID_ARGUMENT: InvalidRequestError,
    grpc.StatusCode.NOT_FOUND: NotFoundError,
    grpc.StatusCode.RESOURCE_EXHAUSTED: ResourceExhaustedError,
    grpc.StatusCode.UNAVAILABLE: UnavailableError,
    grpc.StatusCode.DEADLINE_EXCEEDED: DeadlineExceededError,
    grpc.StatusCode.CANCELLED: CancelledError,
}


def http_status(error: MiradorError) -> int:
    return getattr(error, "http_status", None) or _HTTP_BY_GRPC.get(error.grpc_code, 500)


def from_rpc_error(exc: grpc.RpcError, what: str) -> MiradorError:
    """Turn a failed client call into the domain error of the same status, naming the callee."""
    code = exc.code() if hasattr(exc, "code") else grpc.StatusCode.UNKNOWN
    details = exc.details() if hasattr(exc, "details") else str(exc)
    return from_status(code, details, what)


def from_status(code: grpc.StatusCode, details: str, what: str) -> MiradorError:
    """The domain error of a status (a gRPC call's, or a local stream's status frame), naming the callee."""
    cls = _ERROR_BY_GRPC.get(code, MiradorError)
    if cls in (UnavailableError, DeadlineExceededError, MiradorError):
        return cls(f"{what}: {details or code.name}")
    return cls(details or code.name)


async def abort_with(context, error: Exception) -> None:
    """Abort a grpc.aio call with the status of a domain error; ValueError is a bad argument; anything else is
    INTERNAL and logged with its traceback."""
    if isinstance(error, MiradorError):
        await context.abort(error.grpc_code, error.message)
    if isinstance(error, ValueError):
        await context.abort(grpc.StatusCode.INVALID_ARGUMENT, str(error))
    logging.getLogger(__name__).error("internal error", exc_info=error)
    await context.abort(grpc.StatusCode.INTERNAL, f"{type(error).__name__}: {error}")
