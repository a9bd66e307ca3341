"""Process-wide logging setup: one line per record, tagged with the service name."""

from __future__ import annotations

import logging
import sys


def setup_logging(service: str, level: str = "info") -> None:
    fmt = f"[%(asctime)s {service}] %(levelname)s %(name)s: %(message)s"
    handler = logging.StreamHandler(sys.stderr)
    handler.setFormatter(logging.Formatter(fmt, datefmt="%Y-%m-%d %H:%M:%S"))
    root = logging.getLogger()
    root.handlers[:] = [handler]
    root.setLevel(level.upper())
    for noisy in ("httpx", "httpcore", "urllib3", "PIL", "filelock"):
        logging.getLogger(noisy).setLevel(logging.WARNING)
