"""python -m gateway: the OpenAI-compatible HTTP gateway."""

from __future__ import annotations

import atexit
import dataclasses
import json
import logging
import os
import shutil
import signal
import sys
import tempfile
from collections.abc import Sequence

from common import event_loop
from common.log import setup_logging
from common.security import configure_from_args
from common.service_main import parse_service_args
from gateway.config import GatewayArgs

DESCRIPTION = "OpenAI-compatible HTTP gateway: chat templates, tokenization and media fetching in front of the scheduler"


def main(argv: Sequence[str] | None = None) -> None:
    args = parse_service_args("gateway", DESCRIPTION, GatewayArgs, argv)
    setup_logging("gateway", args.log_level, args.log_format)
    import uvicorn

    if args.gateway_workers > 1:
        _share_metrics(args)  # before prometheus-client is imported (by gateway.app)
    from gateway.app import create_app

    try:
        app = create_app(args)
    except (FileNotFoundError, ValueError) as e:
        logging.getLogger("gateway").error("cannot start: %s", e)
        sys.exit(2)
    logging.getLogger("gateway").info(
        "gateway listening on http://%s:%d (%d worker process%s, event loop %s)",
        args.host,
        args.port,
        args.gateway_workers,
        "es" if args.gateway_workers > 1 else "",
        event_loop.resolve(args.event_loop),
    )
    common = dict(
        host=args.host,
        port=args.port,
        log_level=args.log_level.lower(),
        access_log=False,
        timeout_graceful_shutdown=args.graceful_shutdown_timeout,
        log_config=None,
        loop=event_loop.resolve(
            args.event_loop
        ),  # the HTTP parser: httptools when installed (uvicorn's auto)
    )
    # uvicorn drains on SIGTERM (--graceful-shutdown-timeout), restores the handler it found and raises the signal
    # again: with this handler that ends in exit 0, so supervisors see a clean stop rather than death by signal
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(0))
    if args.gateway_workers == 1:
        uvicorn.run(app, **common)
        return
    # several processes: each builds its own app (and scheduler stream) from the same arguments
    os.environ[ARGS_ENV] = json.dumps(dataclasses.asdict(args))
    uvicorn.run("gateway.__main__:app_from_env", factory=True, workers=args.gateway_workers, **common)


ARGS_ENV = "MIRADOR_GATEWAY_ARGS"


def _share_metrics(args: GatewayArgs) -> None:
    """prometheus-client's multiprocess mode: every worker process writes its samples to files in one directory
    and /metrics, in whichever process answers, merges them. The directory is this gateway's alone and starts
    empty (files of an earlier run would add their counts)."""
    from gateway.metrics import MULTIPROC_ENV

    path = args.metrics_multiproc_dir or tempfile.mkdtemp(prefix="mirador-gateway-metrics-")
    os.makedirs(path, exist_ok=True)
    for name in os.listdir(path):
        if name.endswith(".db"):
            os.remove(os.path.join(path, name))
    os.environ[MULTIPROC_ENV] = path
    if not args.metrics_multiproc_dir:
        atexit.register(shutil.rmtree, path, True)


def app_from_env():
    """The app of one gateway worker process (uvicorn imports this in each)."""
    from gateway.app import create_app

    args = GatewayArgs(**json.loads(os.environ[ARGS_ENV]))
    setup_logging("gateway", args.log_level, args.log_format)
    configure_from_args(args, "gateway")
    return create_app(args)


if __name__ == "__main__":
    main()
