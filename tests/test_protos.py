"""The committed generated code matches the .proto files (regenerated into a temp dir and compared)."""

from __future__ import annotations

import shutil
import subprocess
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent


def test_generated_protos_are_fresh(tmp_path):
    (tmp_path / "protos").mkdir()
    for proto in (REPO / "protos").glob("*.proto"):
        shutil.copy(proto, tmp_path / "protos" / proto.name)
    protos = sorted(str(p.relative_to(tmp_path)) for p in (tmp_path / "protos").glob("*.proto"))
    subprocess.run(
        [
            sys.executable,
            "-m",
            "grpc_tools.protoc",
            "-I",
            ".",
            "--python_out=.",
            "--grpc_python_out=.",
            "--pyi_out=.",
            *protos,
        ],
        cwd=tmp_path,
        check=True,
    )
    generated = sorted(p.name for p in (tmp_path / "protos").glob("*_pb2*.py*"))
    committed = sorted(p.name for p in (REPO / "protos").glob("*_pb2*.py*"))
    assert generated == committed
    stale = [
        n for n in generated if (tmp_path / "protos" / n).read_bytes() != (REPO / "protos" / n).read_bytes()
    ]
    assert not stale, f"regenerate with scripts/gen_protos.sh: {stale}"


def test_generated_code_requires_the_pinned_grpc_minor():
    text = (REPO / "protos" / "worker_pb2_grpc.py").read_text()
    assert "GRPC_GENERATED_VERSION = '1.84.0'" in text, (
        "generate with grpcio-tools==1.84.0 (the GPU machine has 1.84)"
    )


def test_every_proto_field_is_documented():
    import re

    for proto in (REPO / "protos").glob("*.proto"):
        lines = proto.read_text().splitlines()
        for i, line in enumerate(lines):
            if re.match(r"\s+(repeated |optional )?(map<[^>]+>|[\w.]+) \w+ = \d+;", line):
                assert lines[i - 1].strip().startswith("///"), (
                    f"{proto.name}:{i + 1} lacks a /// comment: {line.strip()}"
                )
