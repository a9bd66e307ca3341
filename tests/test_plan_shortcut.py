"""The scheduler's shortcuts (Sequence.plain_until: a sequence that decoded plainly in the step before is planned
again without re-checking every condition; a decode into a new page planned inline; a step whose other rows all
sample applied with its plain decodes) against the general paths: two cores fed the same requests, aborts, worker
answers and timing must send the same steps and produce the same outputs, step by step. A change that can end a
plain decode (a page, the page table, the worker's state, a finish, an output limit, results arriving before the
next plan) and does not reset the bound shows up here as a differing plan."""

from __future__ import annotations

import dataclasses
import random

import pytest

from common.types import StepPlan
from scheduler_svc.scheduler import Scheduler, SchedulerPolicy
from tests.test_scheduler_core import EOS, FakeTokenizer, FakeWorker, make_workload

CONFIGS = [
    dict(num_pages=400, page_size=4, chunk=64, cache=True),
    dict(num_pages=400, page_size=1, chunk=-1, cache=True),
    dict(num_pages=400, page_size=8, chunk=5, cache=False),
    dict(num_pages=40, page_size=4, chunk=16, cache=True),  # tiny pool: preemption, eviction
    dict(num_pages=60, page_size=2, chunk=7, cache=False),  # small pages: decodes that find no free page
    dict(num_pages=60, page_size=4, chunk=9, cache=True, fail_rate=0.2),  # re-encode: released, requeued
    dict(num_pages=400, page_size=4, chunk=9, cache=True, defer_rate=0.3),  # deferred: released, requeued
    dict(num_pages=400, page_size=4, chunk=5, cache=True, mixed=True),
    dict(num_pages=40, page_size=4, chunk=16, cache=True, mixed=True),
    dict(num_pages=400, page_size=4, chunk=64, cache=True, context=112),  # output limits set by the context
]


def _core(cfg: dict, shortcut: bool) -> Scheduler:
    policy = SchedulerPolicy(
        page_size=cfg["page_size"],
        num_pages=cfg["num_pages"],
        context_length=cfg.get("context", 4096),
        max_running_requests=12,
        chunked_prefill_size=cfg["chunk"],
        max_prefill_tokens=64,
        enable_prefix_cache=cfg["cache"],
        enable_mixed_chunk=cfg.get("mixed", False),
        eos_token_ids=(EOS,),
    )
    core = Scheduler(policy, FakeTokenizer())
    core.plain_shortcut = shortcut
    return core


def _comparable(plan: StepPlan | None) -> StepPlan | None:
    return None if plan is None else dataclasses.replace(plan, sent_unix_ns=0)


def run_lockstep(cfg: dict, seed: int) -> tuple[int, int]:
    """Drive a core with the shortcuts and one without through one random history; returns how many plain
    decodes and how many of them the shortcut planned."""
    rng = random.Random(seed)
    workload = make_workload(random.Random(seed * 7 + 1), n=28)
    fast, slow = _core(cfg, True), _core(cfg, False)
    # tokens in the columns in plan order (as the worker answers), as SeqResults, or in the columns shuffled
    columns = ("ordered", "none", "shuffled")[seed % 3]
    worker = FakeWorker(cfg["page_size"], cfg.get("fail_rate", 0.0), rng, cfg.get("defer_rate", 0.0), columns)
    pending = list(workload.requests)
    inflight: list[StepPlan] = []
    plain = shortcut_taken = 0
    step = 0
    while pending or fast.requests or inflight:
        step += 1
        assert step < 20000, "no progress"
        for _ in range(rng.randrange(0, 3)):
            if pending:
                req = pending.pop(0)
                fast.add_request(req)
                slow.add_request(req)
        for rid, at in workload.abort_at.items():
            if at == step:
                assert fast.abort_request(rid) == slow.abort_request(rid)
        assert fast.encode_requests == slow.encode_requests
        for core in (fast, slow):
            for rid, items in core.encode_requests:
                core.on_encoded(rid, [m.content_key for m in items], 1, len(items), 0)
            core.encode_requests.clear()
        # which sequences the shortcut may take this step: a bound above num_computed and a sample in flight
        armed = {s.seq_id for s in fast.running if s.num_computed < s.plain_until and s.num_pending_samples}
        plan = fast.schedule()
        assert _comparable(plan) == _comparable(slow.schedule()), f"step {step}: the plans differ"
        if plan is not None:
            inflight.append(plan)
            plain += len(plan.decode_seq_ids)
            shortcut_taken += len(armed & set(plan.decode_seq_ids))
        # 0 to all of the steps in flight are answered before the next plan: results may overtake the planner
        # (no sample in flight) or lag two steps behind it
        answer = len(inflight) if plan is None else rng.choice([0, 1, 1, 1, 2, len(inflight)])
        for _ in range(min(answer, len(inflight))):
            out = worker.step(inflight.pop(0))
            fast.process_output(out)
            slow.process_output(out)
        assert fast.outputs == slow.outputs, f"step {step}: the outputs differ"
        for out in fast.outputs:
            assert out.error is None, out.error
        fast.outputs.clear()
        slow.outputs.clear()
        assert [s.seq_id for s in fast.running] == [s.seq_id for s in slow.running]
        assert [(s.num_computed, s.num_pending_samples, s.page_ids) for s in fast.running] == [
            (s.num_computed, s.num_pending_samples, s.page_ids) for s in slow.running
        ]
    return plain, shortcut_taken


@pytest.mark.parametrize("seed", range(6))
@pytest.mark.parametrize("cfg", range(len(CONFIGS)))
def test_shortcut_plans_equal_full_checks(cfg, seed):
    plain, taken = run_lockstep(CONFIGS[cfg], seed)
    if CONFIGS[cfg]["page_size"] > 1:  # (with one-token pages every decode takes a new page: the inline path)
        assert taken > 0, "the shortcut was never taken: the comparison tests nothing"


def test_shortcut_is_taken_in_steady_decoding():
    """Most plain decodes of a long steady run come from the shortcut (else the speed-up is gone)."""
    plain = taken = 0
    for seed in range(3):
        p, t = run_lockstep(dict(num_pages=400, page_size=16, chunk=64, cache=True), seed)
        plain, taken = plain + p, taken + t
    assert taken > 0.5 * plain
