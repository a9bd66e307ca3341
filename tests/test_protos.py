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
        SeqStep("grow", 16, (), True, 1, (5,)),  # a decode that adds a page: four columns of its own
        SeqStep("chunk", 4, (8, 9), False),
        SeqStep("grow2", 32, (), True, 0, (6, 7)),  # a table rewrite (prefix cache): a full entry
    )
    msg = plan_to_proto(StepPlan(3, seqs, ("gone",)))
    assert list(msg.decode_seq_ids) == ["d1", "d2"] and list(msg.decode_start_pos) == [7, 9]
    assert list(msg.page_decode_seq_ids) == ["grow"] and list(msg.page_decode_start_pos) == [16]
    assert list(msg.page_decode_table_start) == [1] and list(msg.page_decode_page_ids) == [5]
    assert [s.seq_id for s in msg.seqs] == ["p", "chunk", "grow2"]
    back = plan_from_proto(msg)
    assert {s.seq_id: s for s in back.seqs} == {s.seq_id: s for s in seqs}
    assert back.free_seq_ids == ("gone",)


def test_decode_columns_of_a_plan_follow_its_steps_on_the_wire():
    from common.convert import plan_from_proto, plan_to_proto
    from common.types import SeqStep, StepPlan

    plan = StepPlan(
        4, (SeqStep("d0", 3), SeqStep("chunk", 4, (8, 9), False)), (), 0, (), ("d1", "d2"), (5, 6)
    )
    assert plan.num_tokens == 1 + 2 + 2
    msg = plan_to_proto(plan)
    assert list(msg.decode_seq_ids) == ["d0", "d1", "d2"] and list(msg.decode_start_pos) == [3, 5, 6]
    back = plan_from_proto(msg)  # the worker reads every step as a SeqStep
    assert back.seqs == (
        SeqStep("chunk", 4, (8, 9), False),
        SeqStep("d0", 3),
        SeqStep("d1", 5),
        SeqStep("d2", 6),
    )
    assert set(plan.expanded().seqs) == set(back.seqs) and not back.decode_seq_ids


def test_tokens_without_logprobs_travel_in_columns():
    from common.convert import step_output_from_proto, step_output_to_proto
    from common.types import SeqFailure, SeqResult, StepOutput

    out = StepOutput(
        5,
        (SeqResult("a", 11), SeqResult("b", 12, -0.25, ((12, -0.25), (3, -2.0))), SeqResult("c", 13)),
        (SeqFailure("d", "embedding_pending", "later"),),
        num_tokens=3,
        forward_ns=7,
    )
    msg = step_output_to_proto(out)
    assert list(msg.sampled_seq_ids) == ["a", "c"] and list(msg.sampled_token_ids) == [11, 13]
    assert [r.seq_id for r in msg.results] == ["b"]
    back = step_output_from_proto(msg)
    assert back.results == (out.results[1],) and back.failures == out.failures
    assert sorted(back.sampled()) == sorted(out.sampled()) == [("a", 11), ("b", 12), ("c", 13)]
    assert (back.step_id, back.num_tokens, back.forward_ns) == (5, 3, 7)


def test_output_batch_columns_keep_each_choice_in_order():
    from common.convert import outputs_from_batch, outputs_to_batch
    from common.types import GenerateOutput, TokenLogprob

    outs = [
        GenerateOutput("r1", 0, "he", [1, 2]),
        GenerateOutput("r2", 1, "", [3]),
        GenerateOutput("r1", 0, "llo", [4], logprobs=[TokenLogprob(4, -0.5, ((4, -0.5),))]),
        GenerateOutput("r1", 0, "!", [5]),  # after a message of r1: a message too
        GenerateOutput("r2", 1, " x", [6, 7]),
        GenerateOutput("r2", 0, "", [], "stop", "</s>", 3, 2, 1),
        GenerateOutput("r3", 0, "tail", [8], "length", None, 5, 9, 0),
    ]
    batch = outputs_to_batch(outs)
    assert list(batch.delta_request_ids) == ["r1", "r2", "r2"] and list(batch.delta_num_tokens) == [2, 1, 2]
    assert [m.request_id for m in batch.outputs] == ["r1", "r1", "r2", "r3"]
    back = outputs_from_batch(type(batch).FromString(batch.SerializeToString()))
    for rid in ("r1", "r2", "r3"):
        for index in (0, 1):
            assert [o for o in back if (o.request_id, o.index) == (rid, index)] == [
                o for o in outs if (o.request_id, o.index) == (rid, index)
            ]


def _delta_columns(entries):
    """DeltaColumns holding (request id, choice index, text, token ids) entries, in order."""
    from common.types import DeltaColumns

    cols = DeltaColumns()
    for rid, index, text, ids in entries:
        cols.request_ids.append(rid)
        cols.indexes.append(index)
        cols.texts.append(text)
        cols.num_tokens.append(len(ids))
        cols.token_ids += ids
    return cols


def test_delta_columns_in_an_output_batch_keep_each_choice_in_order():
    """A consumer's DeltaColumns travel whole as the batch's columns; entries of a request after one of its
    messages (steps merged while the stream was busy) become messages, so each choice reads in order."""
    from common.convert import outputs_from_batch, outputs_to_batch
    from common.types import DeltaColumns, GenerateOutput, TokenLogprob

    def columns(*entries):
        return _delta_columns(entries).take()

    step1 = columns(("r1", 0, "he", [1, 2]), ("r2", 0, "a", [3]))
    message = GenerateOutput("r1", 0, "l", [4], logprobs=[TokenLogprob(4, -0.5, ((4, -0.5),))])
    step2 = columns(("r2", 0, "b", [5]), ("r1", 0, "lo", [6, 7]))  # r1 after its message: a message
    final = GenerateOutput("r2", 0, "", [], "stop", "</s>", 3, 3, 0)
    items = [step1, message, step2, final]
    batch = outputs_to_batch(items)
    assert list(batch.delta_request_ids) == ["r1", "r2", "r2"]
    assert list(batch.delta_token_ids) == [1, 2, 3, 5]
    assert [m.request_id for m in batch.outputs] == ["r1", "r1", "r2"]
    back = outputs_from_batch(type(batch).FromString(batch.SerializeToString()))
    expected = [*step1.outputs(), message, *step2.outputs(), final]
    for rid in ("r1", "r2"):
        assert [o for o in back if o.request_id == rid] == [o for o in expected if o.request_id == rid]
    # the columns object a producer keeps appending to is left empty by take()
    cols = DeltaColumns()
    cols.request_ids.append("r9")
    taken = cols.take()
    assert len(taken) == 1 and len(cols) == 0 and cols.request_ids == []


def test_output_batch_leaves_out_the_columns_of_one_token_deltas_of_choice_0():
    """Deltas that are all one token of choice 0 (n=1, stream_interval 1) travel without delta_indexes and
    delta_num_tokens; the reader fills them in. Either column is sent as soon as one delta differs."""
    from common.convert import outputs_from_batch, outputs_to_batch
    from common.types import GenerateOutput

    def roundtrip(entries):
        cols = _delta_columns(entries)
        expected = cols.outputs()
        batch = type(outputs_to_batch([])).FromString(outputs_to_batch([cols]).SerializeToString())
        assert outputs_from_batch(batch) == expected
        return batch

    plain = roundtrip([("r1", 0, "a", [1]), ("r2", 0, "b", [2])])
    assert not plain.delta_indexes and not plain.delta_num_tokens and list(plain.delta_token_ids) == [1, 2]
    two_tokens = roundtrip([("r1", 0, "a", [1]), ("r2", 0, "bc", [2, 3])])
    assert not two_tokens.delta_indexes and list(two_tokens.delta_num_tokens) == [1, 2]
    choice_1 = roundtrip([("r1", 0, "a", [1]), ("r1", 1, "b", [2])])
    assert list(choice_1.delta_indexes) == [0, 1] and not choice_1.delta_num_tokens
    assert outputs_from_batch(outputs_to_batch([GenerateOutput("r1", 0, "x", [5])])) == [
        GenerateOutput("r1", 0, "x", [5])
    ]


def test_seq_step_init_takes_its_fields_in_order_with_their_defaults():
    """SeqStep writes its fields itself (faster than a frozen dataclass's generated __init__): the same fields,
    order and defaults, and still frozen, comparable and hashable."""
    import dataclasses
    import inspect

    import pytest

    from common.types import SeqStep

    params = list(inspect.signature(SeqStep).parameters.values())
    fields = dataclasses.fields(SeqStep)
    assert [p.name for p in params] == [f.name for f in fields]
    empty = inspect.Parameter.empty
    assert [p.default for p in params] == [
        empty if f.default is dataclasses.MISSING else f.default for f in fields
    ]
    values = ("a#0", 3, (1, 2), False, 1, (4,), None, 1, (2,))
    step = SeqStep(*values)
    assert (
        dataclasses.astuple(step) == values
        and step == SeqStep(*values)
        and hash(step) == hash(SeqStep(*values))
    )
    assert dataclasses.replace(step, start_pos=4).start_pos == 4 and step.start_pos == 3
    with pytest.raises(dataclasses.FrozenInstanceError):
        step.start_pos = 5
