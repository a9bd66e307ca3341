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


def test_plain_decodes_travel_in_the_compact_section_and_come_back_equal():
    from common.convert import plan_from_proto, plan_to_proto
    from common.types import SamplingParams, SeqInit, SeqStep, StepPlan

    init = SeqInit((), SamplingParams(temperature=0.0), 3)
    seqs = (
        SeqStep("d1", 7),
        SeqStep("p", 0, (1, 2, 3), True, 0, (4,), init),
        SeqStep("d2", 9),
        SeqStep("grow", 16, (), True, 1, (5,)),  # a decode that adds a page: a full entry
        SeqStep("chunk", 4, (8, 9), False),
    )
    msg = plan_to_proto(StepPlan(3, seqs, ("gone",)))
    assert list(msg.decode_seq_ids) == ["d1", "d2"] and list(msg.decode_start_pos) == [7, 9]
    assert [s.seq_id for s in msg.seqs] == ["p", "grow", "chunk"]
    back = plan_from_proto(msg)
    assert {s.seq_id: s for s in back.seqs} == {s.seq_id: s for s in seqs}
    assert back.free_seq_ids == ("gone",)
