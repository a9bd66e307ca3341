"""python -m vision_svc: the vision gRPC service."""

from __future__ import annotations

from collections.abc import Sequence

from common.service_main import run_grpc_service
from vision_svc.config import VisionArgs

DESCRIPTION = "Vision: image preprocessing and the vision encoder, embeddings cached by content key"


def main(argv: Sequence[str] | None = None) -> None:
    from vision_svc.server import create_server

    run_grpc_service("vision", DESCRIPTION, VisionArgs, create_server, argv)


if __name__ == "__main__":
    main()
