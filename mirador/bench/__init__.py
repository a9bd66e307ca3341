"""`mirador bench`: a serving benchmark like SGLang's bench_serving, against a running gateway or through Hugging
Face transformers on the same workload."""

from mirador.bench.cli import main

__all__ = ["main"]
