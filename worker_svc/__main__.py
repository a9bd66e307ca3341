"""python -m worker_svc: the worker gRPC service."""

from __future__ import annotations

from collections.abc import Sequence

from common.service_main import run_grpc_service
from worker_svc.config import WorkerArgs

DESCRIPTION = "Worker: model weights and paged KV cache; runs the steps the scheduler streams"


def main(argv: Sequence[str] | None = None) -> None:
    from worker_svc.server import create_server

    run_grpc_service("worker", DESCRIPTION, WorkerArgs, create_server, argv)


if __name__ == "__main__":
    main()
