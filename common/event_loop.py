"""The event loop a service runs on: uvloop where it is installed (`--event-loop auto`, the default), else asyncio's.
uvloop's transports and selector are C (libuv): the gateway writes one socket message per streamed event and the
scheduler wakes once or more per step, so both spend much of their CPU in the loop itself (BENCHMARKS.md, issue 9).
grpc.aio runs on either loop."""

from __future__ import annotations

import asyncio
import importlib.util
import logging
from collections.abc import Callable, Coroutine
from typing import Any

logger = logging.getLogger(__name__)
CHOICES = ("auto", "uvloop", "asyncio")


def resolve(choice: str) -> str:
    """'uvloop' or 'asyncio' for a `--event-loop` value; ValueError for uvloop asked for and not installed."""
    if choice not in CHOICES:
        raise ValueError(f"--event-loop must be one of {', '.join(CHOICES)}, not {choice!r}")
    installed = importlib.util.find_spec("uvloop") is not None
    if choice == "uvloop" and not installed:
        raise ValueError("--event-loop uvloop: uvloop is not installed (pip install uvloop), or use asyncio")
    if choice == "auto":
        return "uvloop" if installed else "asyncio"
    return choice


def loop_factory(choice: str) -> Callable[[], asyncio.AbstractEventLoop]:
    if resolve(choice) == "uvloop":
        import uvloop

        return uvloop.new_event_loop
    return asyncio.new_event_loop


def run(main: Coroutine[Any, Any, Any], choice: str = "auto") -> Any:
    """asyncio.run(main) on the chosen loop."""
    logger.info("event loop: %s", resolve(choice))
    with asyncio.Runner(loop_factory=loop_factory(choice)) as runner:
        return runner.run(main)
