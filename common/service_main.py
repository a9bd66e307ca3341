"""`mirador <service>` and `python -m <service>`: parse the service's args, set up logging, serve."""

from __future__ import annotations

import argparse
import gc
import logging
import sys
from collections.abc import Callable, Sequence

from common import event_loop
from common.args import ArgsBase
from common.log import setup_logging
from common.ports import EXIT_PORT_IN_USE, PortInUse
from common.security import configure_from_args, process_auth

logger = logging.getLogger(__name__)
# A service without a drain of its own (the vision service) stops once no call has been in flight this long:
# callers that saw it turn NOT_SERVING (pushed to their health watch) have stopped sending by then, and the
# embedding pulls that follow an encode within a step have come.
DRAIN_QUIET_S = 1.0


def parse_service_args(
    name: str, description: str, args_cls: type[ArgsBase], argv: Sequence[str] | None
) -> ArgsBase:
    parser = argparse.ArgumentParser(prog=f"mirador {name}", description=description)
    args_cls.add_cli_args(parser)
    ns = parser.parse_args(argv)
    if getattr(ns, "model_path", None):
        from processor.hub import resolve_model_path

        try:
            ns.model_path = str(resolve_model_path(ns.model_path, getattr(ns, "load_format", "auto")))
        except (FileNotFoundError, ValueError) as e:
            parser.error(str(e))
    try:
        args = args_cls.from_cli_args(ns)
        configure_from_args(args, name)  # this process's internal credentials (common/security.py)
    except ValueError as e:
        parser.error(str(e))
    return args


def settle_gc() -> None:
    """After start-up: freeze what exists (models, tokenizers, tables) out of the collector's scans and collect the
    young generation less often. Services that allocate per token spent ~7% of their time in the collector."""
    gc.collect()
    gc.freeze()
    gc.set_threshold(20_000, 50, 100)


def run_grpc_service(
    name: str,
    description: str,
    args_cls: type[ArgsBase],
    create_server: Callable,
    argv: Sequence[str] | None = None,
) -> None:
    args = parse_service_args(name, description, args_cls, argv)
    setup_logging(name, args.log_level, getattr(args, "log_format", "text"))
    from common.grpc_utils import serve_until_signal

    async def main() -> None:
        server, port, servicer = create_server(args)
        logger.info(
            "%s listening on %s:%d (callers authenticated by: %s)",
            name,
            args.host,
            port,
            process_auth().describe(),
        )
        if getattr(args, "metrics_port", 0):
            from common.metrics import start_metrics_server

            host = args.metrics_host or args.host
            bound = start_metrics_server(host, args.metrics_port)
            logger.info("%s metrics on http://%s:%d/metrics", name, host, bound)
        await serve_until_signal(
            server,
            servicer.health,
            servicer.startup,
            on_stop=getattr(servicer, "shutdown", None),
            fatal=getattr(servicer, "fatal", None),
            drain=getattr(servicer, "drain", None) or (lambda: servicer.activity.wait_quiet(DRAIN_QUIET_S)),
            drain_timeout_s=getattr(args, "graceful_shutdown_timeout", 30.0),
        )

    try:
        event_loop.run(main(), getattr(args, "event_loop", "auto"))
    except KeyboardInterrupt:
        pass
    except PortInUse as e:  # its own exit code: `mirador up` picks other ports and starts the service again
        logger.error("%s failed to start: %s", name, e)
        sys.exit(EXIT_PORT_IN_USE)
    except Exception as e:  # noqa: BLE001 - a clear last line instead of a bare traceback
        logger.exception("%s failed: %s", name, e)
        sys.exit(1)
