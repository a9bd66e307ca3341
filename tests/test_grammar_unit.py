"""Grammar-constrained decoding, piece by piece: request fields -> Constraint, the bitmask kernel against its
reference, the sampler's masked rows, and the scheduler's grammar backend (compile cache, errors, masks)."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch

from common.convert import constraint_from_proto, constraint_to_proto
from common.errors import InvalidRequestError
from common.types import Constraint, SamplingParams
from kernels._triton import triton_testable
from kernels.grammar_mask import apply_token_bitmask, apply_token_bitmask_ref, apply_token_bitmask_triton
from processor import constraints

# ---- request fields -> Constraint ----


def test_fields_to_constraint():
    schema = {"type": "object", "properties": {"b": {"type": "integer"}, "a": {"type": "string"}}}
    rf = {"type": "json_schema", "json_schema": {"name": "x", "schema": schema, "strict": True}}
    c = constraints.from_fields({"response_format": rf})
    assert c.kind == "json_schema" and json.loads(c.text) == schema
    assert list(json.loads(c.text)["properties"]) == ["b", "a"]  # property order is kept: it is the output's
    assert constraints.from_fields({"response_format": {"type": "json_object"}}) == Constraint("json_object")
    assert constraints.from_fields({"response_format": {"type": "text"}}) is None
    assert constraints.from_fields({}) is None
    assert constraints.from_fields({"regex": "[ab]+"}) == Constraint("regex", "[ab]+")
    assert constraints.from_fields({"ebnf": 'root ::= "a"'}) == Constraint("ebnf", 'root ::= "a"')
    assert constraints.from_fields({"json_schema": '{"type": "string"}'}).kind == "json_schema"
    assert constraints.from_fields({"json_schema": {"type": "string"}}).text == '{"type":"string"}'
    for c in (Constraint("lark", 'start: "x"'), Constraint("json_object")):
        assert constraint_from_proto(constraints.to_proto(c)) == c
    assert constraint_to_proto(None) is None


@pytest.mark.parametrize(
    ("fields", "param"),
    [
        ({"response_format": {"type": "xml"}}, "response_format"),
        ({"response_format": {"type": "json_schema"}}, "response_format"),
        ({"response_format": "json"}, "response_format"),
        ({"regex": "a", "ebnf": 'root ::= "a"'}, "ebnf"),
        ({"response_format": {"type": "json_object"}, "regex": "a"}, "regex"),
        ({"json_schema": "{not json"}, "json_schema"),
        ({"json_schema": "[1, 2]"}, "json_schema"),
        ({"regex": ""}, "regex"),
    ],
)
def test_bad_fields_are_named(fields, param):
    with pytest.raises(InvalidRequestError) as e:
        constraints.from_fields(fields)
    assert e.value.param == param


def test_constraint_kind_is_checked():
    with pytest.raises(ValueError):
        Constraint("xml", "")


# ---- the bitmask kernel ----


def _expected(logits: torch.Tensor, bitmask: torch.Tensor, rows: torch.Tensor) -> torch.Tensor:
    """Bit by bit with numpy, independent of both implementations."""
    out = logits.clone()
    bits = np.unpackbits(bitmask.numpy().view(np.uint8), axis=1, bitorder="little").astype(bool)
    vocab = logits.shape[1]
    for r, row in enumerate(rows.tolist()):
        allowed = np.zeros(vocab, dtype=bool)
        n = min(vocab, bits.shape[1])
        allowed[:n] = bits[r, :n]
        out[row, torch.from_numpy(~allowed)] = float("-inf")
    return out


@pytest.mark.parametrize(("vocab", "num_words"), [(1000, 30), (1000, 32), (4099, 129), (151936, 4748)])
def test_bitmask_reference(vocab, num_words):
    g = torch.Generator().manual_seed(vocab)
    logits = torch.randn(6, vocab, generator=g)
    bitmask = torch.randint(-(2**31), 2**31 - 1, (3, num_words), dtype=torch.int32, generator=g)
    rows = torch.tensor([5, 0, 3])
    got = logits.clone()
    apply_token_bitmask_ref(got, bitmask, rows)
    assert torch.equal(got, _expected(logits, bitmask, rows))
    assert torch.equal(got[[1, 2, 4]], logits[[1, 2, 4]])  # rows without a mask are untouched


@pytest.mark.skipif(not triton_testable(), reason="needs a GPU or Triton's interpreter")
@pytest.mark.parametrize(("vocab", "num_words"), [(1000, 30), (4099, 129), (5000, 200)])
def test_bitmask_kernel_matches_reference(vocab, num_words):
    device = "cuda" if torch.cuda.is_available() else "cpu"
    g = torch.Generator().manual_seed(vocab)
    logits = torch.randn(5, vocab, generator=g)
    bitmask = torch.randint(-(2**31), 2**31 - 1, (2, num_words), dtype=torch.int32, generator=g)
    bitmask[1, :3] = 0  # whole words masked
    rows = torch.tensor([4, 1])
    ref = logits.clone()
    apply_token_bitmask_ref(ref, bitmask, rows)
    got = logits.to(device)
    apply_token_bitmask_triton(got, bitmask.to(device), rows.to(device))
    assert torch.equal(got.cpu(), ref)


def test_bitmask_no_rows_is_a_no_op():
    logits = torch.randn(2, 64)
    before = logits.clone()
    apply_token_bitmask(logits, torch.zeros(0, 2, dtype=torch.int32), torch.zeros(0, dtype=torch.int64))
    assert torch.equal(logits, before)


# ---- the sampler with masks ----


def _only(tokens: list[int], num_words: int) -> np.ndarray:
    mask = np.zeros(num_words, dtype=np.uint32)
    for t in tokens:
        mask[t // 32] |= np.uint32(1 << (t % 32))
    return mask.view(np.int32)


def test_sampler_masks_rows_and_keeps_logprobs_finite():
    from worker_svc.sampler import Sampler

    vocab, batch = 300, 4
    sampler = Sampler(torch.device("cpu"), vocab, max_rows=8, seed=0)
    params = [
        SamplingParams(temperature=1.0, return_logprob=True, top_logprobs=5, seed=1),
        SamplingParams(temperature=0.0),
        SamplingParams(temperature=1.0, seed=3),
        SamplingParams(temperature=0.0, return_logprob=True, top_logprobs=3),
    ]
    for row, p in enumerate(params):
        sampler.add_row(row, p, (), ())
    g = torch.Generator().manual_seed(0)
    logits = torch.randn(batch, vocab, generator=g) * 5
    allowed = {0: [17, 250], 3: [299]}
    words = -(-vocab // 32)
    masks = (np.stack([_only(allowed[0], words), _only(allowed[3], words)]), np.array([0, 3]))
    free = sampler.sample(logits.clone(), [0, 1, 2, 3]).result()  # the same rows without masks
    for row, p in enumerate(params):
        sampler.remove_row(row)
        sampler.add_row(row, p, (), ())
    out = sampler.sample(logits.clone(), [0, 1, 2, 3], masks).result()
    assert out.token_ids[0] in allowed[0] and out.token_ids[3] == 299
    assert out.token_ids[1:3] == free.token_ids[1:3]  # unconstrained rows: unchanged
    assert all(np.isfinite(out.logprobs[b]) for b in (0, 3))
    assert all(np.isfinite(lp) for b in (0, 3) for _, lp in out.top_logprobs[b])


def test_bitmask_reference_on_the_whole_batch():
    g = torch.Generator().manual_seed(1)
    logits = torch.randn(3, 200, generator=g)
    bitmask = torch.randint(-(2**31), 2**31 - 1, (3, 6), dtype=torch.int32, generator=g)  # 192 < 200 tokens
    rows = torch.arange(3)
    got = logits.clone()
    apply_token_bitmask_ref(got, bitmask, rows)
    assert torch.equal(got, _expected(logits, bitmask, rows))


def test_masks_cross_the_step_protocol():
    from common.convert import plan_from_proto, plan_to_proto
    from common.types import SeqStep, StepPlan

    bitmask = np.arange(6, dtype="<i4").tobytes()
    plan = StepPlan(3, (SeqStep("a#0", 5), SeqStep("b#0", 7)), mask_seq_ids=("b#0",), token_bitmask=bitmask)
    back = plan_from_proto(plan_to_proto(plan))
    assert back.mask_seq_ids == ("b#0",) and back.token_bitmask == bitmask


def test_the_grammar_backend_keeps_the_scheduler_torch_free(default_model):
    import subprocess
    import sys

    code = (
        "import sys\n"
        "from processor.tokenizer import Tokenizer\n"
        "from scheduler_svc.grammar import GrammarBackend\n"
        "from common.types import Constraint\n"
        f"b = GrammarBackend(Tokenizer({str(default_model)!r}).hf, 151936, (151645,))\n"
        "m = b.compile(Constraint('json_object')).result()\n"
        "b.fill([m])\n"
        "print('torch' in sys.modules)\n"
    )
    out = subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, timeout=120, check=True
    )
    assert out.stdout.strip() == "False", out.stderr


def test_ready_waits_for_the_tokenizer_and_a_failed_build_fails_compiles_not_startup(
    default_model, caplog, monkeypatch
):
    """The scheduler awaits `ready()` before SERVING (llguidance holds the GIL while it builds); a tokenizer that
    does not build is logged there, and each constrained request then fails with that error."""
    import asyncio
    import threading

    from processor.tokenizer import Tokenizer
    from scheduler_svc.grammar import GrammarBackend

    gate = threading.Event()
    real = GrammarBackend._build_tokenizer

    def held(*args):
        gate.wait(30)
        return real(*args)

    async def ready_after_gate(backend: GrammarBackend) -> bool:
        waiting = asyncio.ensure_future(backend.ready())
        await asyncio.sleep(0.2)
        early = waiting.done()
        gate.set()
        await asyncio.wait_for(waiting, 60)
        return early

    monkeypatch.setattr(GrammarBackend, "_build_tokenizer", staticmethod(held))
    try:
        good = GrammarBackend(Tokenizer(default_model).hf, 151936, (151645,))
        assert asyncio.run(ready_after_gate(good)) is False
        assert good.info()["tokenizer_ready"]
        good.compile(Constraint("json_object")).result(timeout=60)
    finally:
        gate.set()  # the builds below pass straight through
    bad = GrammarBackend(object(), 151936, (151645,))  # not a fast HF tokenizer: llguidance refuses it
    with caplog.at_level("ERROR", logger="scheduler_svc.grammar"):
        asyncio.run(bad.ready())
    assert "failed to build" in caplog.text
    with pytest.raises(ValueError):
        bad.compile(Constraint("json_object")).result(timeout=60)


def test_sglang_sampling_params_carry_constraints():
    from processor import sampling

    fields = sampling.from_sglang({"max_new_tokens": 8, "regex": "[0-9]+", "json_schema": None})
    assert fields == {"max_tokens": 8, "regex": "[0-9]+"}
    assert constraints.from_fields(fields) == Constraint("regex", "[0-9]+")
    with pytest.raises(InvalidRequestError) as e:
        sampling.from_sglang({"structural_tag": "{}"})
    assert e.value.param == "sampling_params.structural_tag"


@pytest.mark.parametrize("temperature", [1e30, 2e307, float("inf")])
def test_a_huge_temperature_keeps_masked_tokens_out(temperature):
    """A temperature past float32's range must not turn masked logits into NaN (-inf / inf): the draw stays
    among the allowed tokens, near-uniformly (found by the schema fuzz: 2e307 sampled token 0 outside a grammar)."""
    from worker_svc.sampler import Sampler

    vocab, n = 64, 400
    sampler = Sampler(torch.device("cpu"), vocab, max_rows=n, seed=0)
    for row in range(n):
        sampler.add_row(row, SamplingParams(temperature=temperature, return_logprob=True), (), ())
    allowed = [5, 40, 63]
    words = -(-vocab // 32)
    masks = (np.stack([_only(allowed, words)] * n), np.arange(n))
    logits = torch.randn(n, vocab, generator=torch.Generator().manual_seed(0)) * 5
    out = sampler.sample(logits, list(range(n)), masks).result()
    assert set(out.token_ids) == set(allowed)  # every allowed token drawn (near-uniform), nothing else
    assert all(np.isfinite(lp) for lp in out.logprobs)
