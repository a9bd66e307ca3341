"""Process-wide logging setup: one line per record (plain text or JSON), tagged with the service name and, inside a
request's context, its request id."""

from __future__ import annotations

import contextvars
import json
import logging
import sys
import time

# The request a coroutine (or a thread it handed work to) is working for; log records made there carry it.
request_id_var: contextvars.ContextVar[str] = contextvars.ContextVar("request_id", default="")
# the gRPC metadata key that carries it on calls made for one request (the Connect stream carries it in its fields)
REQUEST_ID_METADATA = "x-request-id"


class _RequestId(logging.Filter):
    def filter(self, record: logging.LogRecord) -> bool:
        if not getattr(record, "request_id", ""):
            record.request_id = request_id_var.get()
        return True


class _Text(logging.Formatter):
    def format(self, record: logging.LogRecord) -> str:
        line = super().format(record)
        return f"{line} [rid={record.request_id}]" if record.request_id else line


class JsonFormatter(logging.Formatter):
    """One JSON object per line: time (UTC, ISO 8601), level, service, logger, message, request_id when there is
    one, and the exception's traceback when there is one."""

    def __init__(self, service: str):
        super().__init__()
        self.service = service

    def format(self, record: logging.LogRecord) -> str:
        ts = time.strftime("%Y-%m-%dT%H:%M:%S", time.gmtime(record.created))
        out = {
            "time": f"{ts}.{int(record.msecs):03d}Z",
            "level": record.levelname,
            "service": self.service,
            "logger": record.name,
            "message": record.getMessage(),
        }
        if record.request_id:
            out["request_id"] = record.request_id
        if record.exc_info:
            out["exception"] = self.formatException(record.exc_info)
        return json.dumps(out, ensure_ascii=False)


def setup_logging(service: str, level: str = "info", log_format: str = "text") -> None:
    handler = logging.StreamHandler(sys.stderr)
    handler.addFilter(_RequestId())
    if log_format == "json":
        handler.setFormatter(JsonFormatter(service))
    else:
        fmt = f"[%(asctime)s {service}] %(levelname)s %(name)s: %(message)s"
        handler.setFormatter(_Text(fmt, datefmt="%Y-%m-%d %H:%M:%S"))
    root = logging.getLogger()
    root.handlers[:] = [handler]
    root.setLevel(level.upper())
    for noisy in ("httpx", "httpcore", "urllib3", "PIL", "filelock"):
        logging.getLogger(noisy).setLevel(logging.WARNING)
