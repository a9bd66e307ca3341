"""The `mirador` command: `up` runs the whole cluster, `<service>` runs one service (what containers run),
`default-model` builds and prints the embedded model's directory."""

from __future__ import annotations

import argparse
import logging
import sys
from collections.abc import Sequence

DEFAULT_SERVED_NAME = "qwen2.5-vl-tiny"

SERVICES = {
    "gateway": ("gateway.__main__", "OpenAI-compatible HTTP gateway"),
    "scheduler": ("scheduler_svc.__main__", "scheduler gRPC service (batching, KV pages, prefix cache)"),
    "worker": ("worker_svc.__main__", "worker gRPC service (model weights, KV cache, forward passes)"),
    "vision": ("vision_svc.__main__", "vision gRPC service (image preprocessing and encoder)"),
}

TOOLS = {
    "certs": ("mirador.certs", "a private CA and per-service certificates for mutual TLS (--tls-dir)"),
    "bench": (
        "mirador.bench",
        "serving benchmark against a running gateway, or Hugging Face on the same workload",
    ),
}

USAGE = """mirador <command> [options]

commands:
  up              start gateway, scheduler, worker and vision as separate processes and wait until ready
  gateway         run the HTTP gateway alone         (mirador gateway --help)
  scheduler       run the scheduler service alone
  worker          run the worker service alone
  vision          run the vision service alone
  default-model   build (if needed) and print the embedded default model's directory (--family qwen2-vl,
                  --family llava-onevision: another family's tiny model)
  bench           benchmark a running gateway (like SGLang's bench_serving) or HF transformers
  certs           write a private CA and per-service certificates for mutual TLS (--tls-dir)

Without --model, `up` serves the embedded tiny Qwen2.5-VL (random weights) built offline on first use, under
the name "qwen2.5-vl-tiny".
"""


def main(argv: Sequence[str] | None = None) -> None:
    argv = list(sys.argv[1:] if argv is None else argv)
    if not argv or argv[0] in ("-h", "--help"):
        print(USAGE)
        sys.exit(0 if argv else 2)
    cmd, rest = argv[0], argv[1:]
    if cmd in SERVICES:
        import importlib

        importlib.import_module(SERVICES[cmd][0]).main(rest)
        return
    if cmd in TOOLS:
        import importlib

        sys.exit(importlib.import_module(TOOLS[cmd][0]).main(rest))
    if cmd == "up":
        sys.exit(_up(rest))
    if cmd == "default-model":
        sys.exit(_default_model(rest))
    print(f"mirador: unknown command {cmd!r}\n\n{USAGE}", file=sys.stderr)
    sys.exit(2)


def _up(argv: list[str]) -> int:
    from common.log import setup_logging
    from common.security import configure_from_args
    from mirador.launcher import UpArgs, run_up

    parser = argparse.ArgumentParser(
        prog="mirador up", description="Start the Mirador cluster on this machine."
    )
    UpArgs.add_cli_args(parser)
    ns = parser.parse_args(argv)
    setup_logging("mirador", ns.log_level)
    if not ns.model_path:
        from mirador.default_model import default_model_dir

        logging.getLogger("mirador").info("no --model given: using the embedded default model")
        ns.model_path = str(default_model_dir())
        ns.served_model_name = ns.served_model_name or DEFAULT_SERVED_NAME
    from common.errors import MiradorError
    from processor.hub import resolve_model_path

    try:
        ns.model_path = str(resolve_model_path(ns.model_path, ns.load_format))
        _check_architecture(ns.model_path)
        up = UpArgs.from_cli_args(ns)
        configure_from_args(up, "admin")  # up's own health checks of the services it starts
    except (FileNotFoundError, ValueError, MiradorError) as e:
        parser.error(str(e))
    return run_up(up)


def _check_architecture(model_path: str) -> None:
    """Fail before starting any service when config.json names an architecture no family serves (ValueError,
    listing the supported ones); log the family otherwise."""
    import json
    from pathlib import Path

    from models.registry import get_entry, supported_architectures

    path = Path(model_path) / "config.json"
    if not path.is_file():
        raise FileNotFoundError(f"{path} not found: --model must point at a Hugging Face model directory")
    archs = json.loads(path.read_text()).get("architectures") or []
    if not archs:
        raise ValueError(f"{path} names no architecture; supported: {', '.join(supported_architectures())}")
    get_entry(archs[0])
    logging.getLogger("mirador").info("model %s: architecture %s", model_path, archs[0])


def _default_model(argv: list[str]) -> int:
    from common.log import setup_logging

    parser = argparse.ArgumentParser(
        prog="mirador default-model",
        description="Build (once) the embedded tiny Qwen2.5-VL checkpoint, or another family's tiny model "
        "(--family), and print its directory. MIRADOR_CACHE_DIR moves the cache (~/.cache/mirador).",
    )
    from mirador.default_model import DEFAULT_FAMILY, FAMILIES, default_model_dir

    parser.add_argument(
        "--cache-dir", default=None, help="cache directory (default: $MIRADOR_CACHE_DIR or ~/.cache/mirador)"
    )
    parser.add_argument(
        "--family",
        choices=list(FAMILIES),
        default=DEFAULT_FAMILY,
        help="which family's tiny random model to build (serve it with `mirador up --model DIR`)",
    )
    ns = parser.parse_args(argv)
    setup_logging("mirador", "info")
    print(default_model_dir(ns.cache_dir, ns.family))
    return 0
