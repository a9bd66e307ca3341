"""python -m gateway: the OpenAI-compatible HTTP gateway."""

from __future__ import annotations

import logging
import sys
from collections.abc import Sequence

from common.log import setup_logging
from common.service_main import parse_service_args
from gateway.config import GatewayArgs

DESCRIPTION = "OpenAI-compatible HTTP gateway: chat templates, tokenization and media fetching in front of the scheduler"


def main(argv: Sequence[str] | None = None) -> None:
    args = parse_service_args("gateway", DESCRIPTION, GatewayArgs, argv)
    setup_logging("gateway", args.log_level)
    import uvicorn

    from gateway.app import create_app

    try:
        app = create_app(args)
    except (FileNotFoundError, ValueError) as e:
        logging.getLogger("gateway").error("cannot start: %s", e)
        sys.exit(2)
    logging.getLogger("gateway").info("gateway listening on http://%s:%d", args.host, args.port)
    uvicorn.run(
        app,
        host=args.host,
        port=args.port,
        log_level=args.log_level.lower(),
        access_log=False,
        timeout_graceful_shutdown=5,
        log_config=None,
    )


if __name__ == "__main__":
    main()
