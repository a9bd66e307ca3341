"""python -m scheduler_svc: the scheduler gRPC service."""

from __future__ import annotations

from collections.abc import Sequence

from common.service_main import run_grpc_service
from scheduler_svc.config import SchedulerArgs

DESCRIPTION = "Scheduler: request queue, continuous batching, KV page tables, prefix cache and detokenization"


def main(argv: Sequence[str] | None = None) -> None:
    from scheduler_svc.server import create_server

    run_grpc_service("scheduler", DESCRIPTION, SchedulerArgs, create_server, argv)


if __name__ == "__main__":
    main()
