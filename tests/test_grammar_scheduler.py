"""The scheduler's side of constrained decoding against a fake worker that samples uniformly among the tokens each
step's bitmask allows: masks follow the pipelined step protocol (a constrained sequence never samples while its
previous token is in flight), survive preemption and n > 1, and the outputs validate against their schemas."""

from __future__ import annotations

import json
import random

import jsonschema
import numpy as np
import pytest

from common.types import (
    Constraint,
    GenerateRequest,
    SamplingParams,
    SeqResult,
    StepOutput,
    StepPlan,
    StoppingCriteria,
)
from processor.tokenizer import Tokenizer
from scheduler_svc.grammar import GrammarBackend
from scheduler_svc.scheduler import Scheduler, SchedulerPolicy

VOCAB = 151936
EOS = (151645, 151643)
SCHEMA = {
    "type": "object",
    "properties": {
        "name": {"type": "string", "maxLength": 6},
        "n": {"type": "integer", "minimum": -5, "maximum": 500},
        "tags": {"type": "array", "items": {"enum": ["x", "y", "z"]}, "minItems": 1, "maxItems": 3},
    },
    "required": ["name", "n", "tags"],
    "additionalProperties": False,
}


@pytest.fixture(scope="module")
def tokenizer(default_model):
    return Tokenizer(default_model)


@pytest.fixture(scope="module")
def backend(tokenizer):
    b = GrammarBackend(tokenizer.hf, VOCAB, EOS)
    yield b
    b.close()


class UniformWorker:
    """Samples uniformly among the allowed tokens of masked sequences, a fixed token for the others."""

    def __init__(self, seed: int):
        self.rng = random.Random(seed)
        self.words = -(-VOCAB // 32)
        self.masked_steps = 0

    def step(self, plan: StepPlan) -> StepOutput:
        masks = {}
        if plan.mask_seq_ids:
            self.masked_steps += 1
            bits = np.frombuffer(plan.token_bitmask, dtype="<i4").reshape(len(plan.mask_seq_ids), self.words)
            for seq_id, row in zip(plan.mask_seq_ids, bits, strict=True):
                masks[seq_id] = np.flatnonzero(np.unpackbits(row.view(np.uint8), bitorder="little")[:VOCAB])
        results = []
        for s in plan.expanded().seqs:
            if s.sample:
                allowed = masks.get(s.seq_id)
                token = int(self.rng.choice(allowed)) if allowed is not None else 1000
                results.append(SeqResult(s.seq_id, token))
        return StepOutput(plan.step_id, tuple(results), num_tokens=plan.num_tokens)


def drive(core: Scheduler, worker: UniformWorker, max_steps: int = 5000) -> dict[str, list]:
    """The loop's order: step N+1 is planned before step N's result is read (overlap depth 1)."""
    outputs: dict[str, list] = {}
    inflight: list[tuple[StepPlan, StepOutput]] = []
    in_flight_samples: set[str] = set()
    for _ in range(max_steps):
        for rid, c in core.grammar_requests:
            core.on_grammar(rid, core.grammar.compile(c).result())
        core.grammar_requests.clear()
        plan = core.schedule() if len(inflight) <= 1 else None
        if plan is not None:
            sampled = {s.seq_id for s in plan.expanded().seqs if s.sample}
            masked = set(plan.mask_seq_ids)
            assert masked <= sampled
            assert not (masked & in_flight_samples), (
                "a constrained sequence sampled before its last token came"
            )
            in_flight_samples |= sampled
            inflight.append((plan, worker.step(plan)))
        if inflight and (len(inflight) > 1 or plan is None):
            done_plan, out = inflight.pop(0)
            in_flight_samples -= {s.seq_id for s in done_plan.expanded().seqs if s.sample}
            core.process_output(out)
        for o in core.outputs:
            outputs.setdefault(f"{o.request_id}#{o.index}", []).append(o)
        core.outputs.clear()
        if not core.requests and not inflight:
            return outputs
    raise AssertionError("did not finish")


def _policy(num_pages: int) -> SchedulerPolicy:
    return SchedulerPolicy(
        page_size=4,
        num_pages=num_pages,
        context_length=4096,
        max_running_requests=16,
        chunked_prefill_size=8,
        max_prefill_tokens=32,
        eos_token_ids=EOS,
        vocab_size=VOCAB,
    )


def _request(i: int, constraint: Constraint | None, n: int = 1, max_new: int = 64) -> GenerateRequest:
    return GenerateRequest(
        request_id=f"r{i}",
        input_ids=tuple(range(100 + i, 110 + i + i % 7)),
        sampling=SamplingParams(temperature=1.0),
        stopping=StoppingCriteria(max_new_tokens=max_new),
        n=n,
        constraint=constraint,
    )


@pytest.mark.parametrize(("num_pages", "preempts"), [(400, False), (40, True)])
def test_constrained_outputs_validate_under_pipelining_and_preemption(
    tokenizer, backend, num_pages, preempts
):
    core = Scheduler(_policy(num_pages), tokenizer)
    core.grammar = backend
    schema = Constraint("json_schema", json.dumps(SCHEMA))
    for i in range(12):
        core.add_request(_request(i, schema if i % 3 else None, n=2 if i % 4 == 1 else 1))
    outputs = drive(core, UniformWorker(seed=num_pages))
    assert (core.stats.num_preemptions > 0) == preempts
    num_valid = 0
    for key, outs in outputs.items():
        rid = int(key[1:].split("#")[0])
        text = "".join(o.text for o in outs)
        if rid % 3 == 0:
            assert outs[-1].finish_reason == "length"  # unconstrained: the fixed token until max_new_tokens
            continue
        assert outs[-1].finish_reason == "stop", text
        assert "\ufffd" not in text  # whole UTF-8 characters only, even from uniformly drawn byte tokens
        jsonschema.validate(json.loads(text), SCHEMA)  # json.loads is strict: no raw control characters
        num_valid += 1
    assert num_valid == 8 + 2  # requests 1, 2, 4, 5, 7, 8, 10, 11; 1 and 5 have two choices
    assert core._num_constrained == 0  # every matcher released


def test_constraint_that_cannot_finish_ends_with_length(tokenizer, backend):
    core = Scheduler(_policy(200), tokenizer)
    core.grammar = backend
    core.add_request(_request(0, Constraint("regex", "a{50}"), max_new=5))
    outputs = drive(core, UniformWorker(seed=1))
    (outs,) = outputs.values()
    assert outs[-1].finish_reason == "length" and outs[-1].completion_tokens == 5


def test_regex_and_ebnf_finish_with_stop(tokenizer, backend):
    core = Scheduler(_policy(200), tokenizer)
    core.grammar = backend
    core.add_request(_request(0, Constraint("regex", "[0-9]{3}-(yes|no)")))
    core.add_request(_request(1, Constraint("ebnf", 'root ::= "cat" | "dog" " " [a-c]')))
    outputs = drive(core, UniformWorker(seed=2))
    texts = {k: "".join(o.text for o in v) for k, v in outputs.items()}
    import re

    assert re.fullmatch(r"[0-9]{3}-(yes|no)", texts["r0#0"])
    assert texts["r1#0"] in {"cat", "dog a", "dog b", "dog c"}
    assert all(v[-1].finish_reason == "stop" for v in outputs.values())


def test_backend_caches_and_names_errors(backend):
    before = backend.info()
    c = Constraint("regex", "[a-f]{4}")
    first = backend.compile(c).result()
    assert backend.compile(Constraint("regex", "[a-f]{4}")).result() is first
    info = backend.info()
    assert info["cache_hits"] == before["cache_hits"] + 1 and info["compiles"] == before["compiles"] + 1
    assert info["backend"] == "llguidance" and info["version"] == "1.9.1"
    for bad, words in [
        (Constraint("regex", "[a-"), "unclosed character class"),
        (Constraint("json_schema", '{"type": "foo"}'), "foo"),
        (Constraint("ebnf", "root ::= missing"), "missing"),
        (Constraint("lark", "start: x"), "x"),
    ]:
        with pytest.raises(Exception) as e:
            backend.compile(bad).result()
        assert type(e.value).__name__ == "InvalidRequestError" and words in str(e.value), e.value
    mask = backend.fill([first.deep_copy(), first.deep_copy()])
    assert mask.shape == (2, -(-VOCAB // 32)) and mask.dtype == np.int32
    allowed = np.flatnonzero(np.unpackbits(mask[0].view(np.uint8), bitorder="little"))
    assert 0 < len(allowed) < VOCAB and all(backend_decode_ok(first, t) for t in allowed[:50])


def backend_decode_ok(template, token: int) -> bool:
    return template.deep_copy().consume_token(int(token))
