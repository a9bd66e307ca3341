#!/usr/bin/env bash
# Regenerate protos/*_pb2*.py from the repo root so imports read `from protos import x_pb2`.
set -euo pipefail
cd "$(dirname "$0")/.."
python -m grpc_tools.protoc -I . --python_out=. --grpc_python_out=. --pyi_out=. protos/*.proto
