"""The scheduler core against a fake worker that checks the KV layout it is told to use.

The fake worker keeps a slot -> (content, position) map for the paged KV cache, exactly as the step protocol
describes it (page tables and their updates, inits, frees, decode-from-last-sample). Its "model" picks the next
token as a hash of everything it reads back from the KV pages, so any wrong page table, a cache hit on the wrong
prefix (or the wrong image), a lost page or a double use shows up as an output that differs from the reference:
the same hash applied to the request alone.
"""

from __future__ import annotations

import dataclasses
import hashlib
import random
from dataclasses import dataclass

import pytest

from common.types import (
    DeltaColumns,
    GenerateRequest,
    MultimodalItem,
    SamplingParams,
    SeqFailure,
    SeqResult,
    StepOutput,
    StepPlan,
    StoppingCriteria,
)
from scheduler_svc.scheduler import Scheduler, SchedulerPolicy

VOCAB = 500
EOS = 7


def next_token(content: tuple) -> int:
    digest = hashlib.blake2b(repr(content).encode(), digest_size=8).digest()
    return int.from_bytes(digest, "little") % VOCAB


class FakeTokenizer:
    """Enough of processor.tokenizer.Tokenizer for TextStream: one character per token."""

    def decode(self, ids, skip_special_tokens=True):
        return "".join(chr(0x4E00 + i) for i in ids if not (skip_special_tokens and i == EOS))


class FakeWorker:
    def __init__(
        self,
        page_size: int,
        fail_rate: float = 0.0,
        rng: random.Random | None = None,
        defer_rate: float = 0.0,
        columns: str = "none",
    ):
        self.page_size = page_size
        # "none": every token as a SeqResult; "ordered": in the packed columns, in plan order (as the worker
        # answers); "shuffled": in the columns, in another order
        self.columns = columns
        self.defer_rate = defer_rate  # sequences left out while their embeddings are "still being pulled"
        self.prefetched: set[str] = set()
        self.kv: dict[int, tuple] = {}
        self.seqs: dict[str, dict] = {}
        self.failed: set[str] = set()
        self.fail_rate = fail_rate
        self.rng = rng or random.Random(0)
        self.steps = 0

    def step(self, plan: StepPlan) -> StepOutput:
        plan = plan.expanded()  # plain decodes travel in columns
        self.steps += 1
        self.prefetched.update(plan.prefetch_keys)
        for sid in plan.free_seq_ids:
            self.seqs.pop(sid, None)
            self.failed.discard(sid)
        written: dict[int, str] = {}
        results, failures, pending_writes = [], [], []
        for s in plan.seqs:
            assert len({x.seq_id for x in plan.seqs}) == len(plan.seqs), "a sequence twice in one step"
            if s.seq_id in self.failed and s.init is None:
                failures.append(SeqFailure(s.seq_id, "embedding_missing", "failed earlier"))
                continue
            self.failed.discard(s.seq_id)
            if s.init is not None:
                spans = {}
                for m in s.init.mm_items:
                    for j in range(m.num_tokens):
                        spans[m.offset + j] = ("img", m.content_key, j)
                self.seqs[s.seq_id] = {
                    "table": [],
                    "spans": spans,
                    "last": s.init.output_token_ids[-1] if s.init.output_token_ids else None,
                }
            st = self.seqs[s.seq_id]  # KeyError: a step for a sequence the worker does not hold
            if s.page_ids:
                end = s.page_table_start + len(s.page_ids)
                st["table"].extend([0] * max(0, end - len(st["table"])))
                st["table"][s.page_table_start : end] = s.page_ids
            tokens = list(s.input_ids) or [st["last"]]
            assert tokens[0] is not None, "decode before any sample"
            covers_image = any(s.start_pos <= p < s.start_pos + len(tokens) for p in st["spans"])
            if covers_image and self.rng.random() < self.fail_rate:
                failures.append(SeqFailure(s.seq_id, "embedding_missing", "evicted"))
                self.failed.add(s.seq_id)
                continue
            if covers_image:
                keys = {
                    st["spans"][p][1] for p in st["spans"] if s.start_pos <= p < s.start_pos + len(tokens)
                }
                assert keys <= self.prefetched, "a prefill of an image the worker was never told to pull"
                if len(plan.seqs) > 1 and self.rng.random() < self.defer_rate:
                    failures.append(SeqFailure(s.seq_id, "embedding_pending", "still pulling"))
                    self.failed.add(s.seq_id)
                    continue
            slot = lambda i, t=st["table"]: t[i // self.page_size] * self.page_size + i % self.page_size  # noqa: E731
            content = []
            for i in range(s.start_pos):
                assert slot(i) not in written, "reads a slot another sequence writes in the same step"
                value, pos = self.kv[slot(i)]
                assert pos == i, f"{s.seq_id}: slot of position {i} holds position {pos}"
                content.append(value)
            for j, tok in enumerate(tokens):
                i = s.start_pos + j
                assert i // self.page_size < len(st["table"]) and st["table"][i // self.page_size] > 0, (
                    "no page"
                )
                assert slot(i) not in written, f"two sequences write slot {slot(i)} in one step"
                written[slot(i)] = s.seq_id
                value = st["spans"].get(i, tok)
                pending_writes.append((slot(i), (value, i)))
                content.append(value)
            if s.sample:
                tok = next_token(tuple(content))
                st["last"] = tok
                results.append(SeqResult(s.seq_id, tok))
        for k, v in pending_writes:
            self.kv[k] = v
        if self.columns == "none":
            return StepOutput(plan.step_id, tuple(results), tuple(failures), plan.num_tokens)
        if self.columns == "shuffled":
            self.rng.shuffle(results)
        return StepOutput(
            plan.step_id,
            (),
            tuple(failures),
            plan.num_tokens,
            sampled_seq_ids=tuple(r.seq_id for r in results),
            sampled_token_ids=tuple(r.token_id for r in results),
        )


def reference(req: GenerateRequest) -> list[int]:
    content = list(req.input_ids)
    for m in req.mm_items:
        for j in range(m.num_tokens):
            content[m.offset + j] = ("img", m.content_key, j)
    out = []
    while len(out) < req.stopping.max_new_tokens:
        tok = next_token(tuple(content))
        out.append(tok)
        content.append(tok)
        if tok == EOS and not req.stopping.ignore_eos:
            break
    return out


@dataclass
class Workload:
    requests: list[GenerateRequest]
    abort_at: dict[str, int]


def make_workload(rng: random.Random, n: int, image_keys: int = 3) -> Workload:
    system = [rng.randrange(10, VOCAB) for _ in range(rng.randrange(5, 30))]
    reqs, abort_at = [], {}
    for k in range(n):
        prompt = (system if rng.random() < 0.6 else []) + [
            rng.randrange(10, VOCAB) for _ in range(rng.randrange(1, 40))
        ]
        items = []
        if rng.random() < 0.5:
            for _ in range(rng.randrange(1, 3)):
                off = len(prompt)
                size = rng.randrange(1, 12)
                prompt += [9] * size  # the placeholder id; the key decides the content
                items.append(MultimodalItem(f"key{rng.randrange(image_keys)}", off, size, (1, 2, 2 * size)))
                prompt += [rng.randrange(10, VOCAB) for _ in range(rng.randrange(0, 5))]
        req = GenerateRequest(
            request_id=f"r{k}",
            input_ids=tuple(prompt),
            mm_items=tuple(items),
            sampling=SamplingParams(temperature=0.0),
            stopping=StoppingCriteria(max_new_tokens=rng.randrange(1, 25), ignore_eos=rng.random() < 0.3),
            n=1 if rng.random() < 0.8 else rng.randrange(2, 4),
        )
        reqs.append(req)
        if rng.random() < 0.1:
            abort_at[req.request_id] = rng.randrange(1, 30)
    return Workload(reqs, abort_at)


def run(
    workload: Workload,
    *,
    num_pages: int,
    page_size: int,
    chunk: int,
    cache: bool,
    overlap: bool,
    fail_rate: float = 0.0,
    defer_rate: float = 0.0,
    mixed: bool = False,
    lpm: bool = False,
    max_running: int = 16,
    arrival_steps: int = 5,
    seed: int = 0,
    columns: str = "none",
    deltas: DeltaColumns | None = None,
    texts: dict[tuple[str, int], str] | None = None,
    stream_interval: int = 1,
    mixed_budget: int = 0,
):
    rng = random.Random(seed)
    policy = SchedulerPolicy(
        page_size=page_size,
        num_pages=num_pages,
        context_length=4096,
        max_running_requests=max_running,
        chunked_prefill_size=chunk,
        max_prefill_tokens=64,
        enable_prefix_cache=cache,
        enable_mixed_chunk=mixed,
        mixed_prefill_tokens=mixed_budget,
        schedule_policy="lpm" if lpm else "fcfs",
        eos_token_ids=(EOS,),
        stream_interval=stream_interval,
    )
    core = Scheduler(policy, FakeTokenizer())
    worker = FakeWorker(page_size, fail_rate, rng, defer_rate, columns)
    pending = list(workload.requests)
    outputs: dict[tuple[str, int], list[int]] = {}
    finish: dict[tuple[str, int], str] = {}
    inflight: list[StepPlan] = []
    step = 0
    while pending or core.requests or inflight:
        step += 1
        assert step < 20000, "no progress"
        for _ in range(rng.randrange(0, arrival_steps + 1)):
            if pending:
                core.add_request(pending.pop(0), deltas=deltas)
        for rid, at in workload.abort_at.items():
            if at == step:
                core.abort_request(rid)
        for rid, items in core.encode_requests:
            core.on_encoded(rid, [m.content_key for m in items], 1, len(items), 0)
        core.encode_requests.clear()
        plan = core.schedule()
        if plan is not None:
            inflight.append(plan)
        if inflight and (len(inflight) > (1 if overlap else 0) or plan is None):
            core.process_output(worker.step(inflight.pop(0)))
        # as SchedulerLoop._deliver: a consumer's delta columns first, then the outputs
        for out in [*(deltas.take().outputs() if deltas is not None else ()), *core.outputs]:
            assert out.error is None, out.error
            outputs.setdefault((out.request_id, out.index), []).extend(out.token_ids)
            if texts is not None:
                texts[(out.request_id, out.index)] = texts.get((out.request_id, out.index), "") + out.text
            if out.finish_reason:
                finish[(out.request_id, out.index)] = out.finish_reason
        core.outputs.clear()
    # nothing leaks: every page is free or held by the prefix cache, nothing locked, queues empty
    assert not core.running and not core.waiting
    assert core.cache.num_locked_pages == 0
    assert core.allocator.num_free + core.cache.num_cached_pages == core.allocator.num_usable
    return outputs, finish, core


CONFIGS = [
    dict(num_pages=400, page_size=4, chunk=64, cache=True, overlap=True),
    dict(num_pages=400, page_size=4, chunk=3, cache=True, overlap=True),
    dict(num_pages=400, page_size=1, chunk=-1, cache=True, overlap=False),
    dict(num_pages=400, page_size=8, chunk=5, cache=False, overlap=True),
    dict(num_pages=40, page_size=4, chunk=16, cache=True, overlap=True),  # tiny pool: preemption
    dict(num_pages=80, page_size=2, chunk=7, cache=False, overlap=False),  # small pool, no cache
    dict(num_pages=60, page_size=4, chunk=9, cache=True, overlap=True, fail_rate=0.2),  # re-encode path
    dict(num_pages=400, page_size=4, chunk=9, cache=True, overlap=True, defer_rate=0.3),  # pulls still coming
    dict(num_pages=400, page_size=4, chunk=5, cache=True, overlap=True, mixed=True),  # decodes beside prompts
    dict(num_pages=40, page_size=4, chunk=16, cache=True, overlap=True, mixed=True),  # ... with preemption
    dict(num_pages=400, page_size=4, chunk=64, cache=True, overlap=True, mixed=True, mixed_budget=6),
    dict(num_pages=400, page_size=1, chunk=-1, cache=True, overlap=False, mixed=True, mixed_budget=6),
    dict(num_pages=60, page_size=4, chunk=9, cache=True, overlap=True, lpm=True),  # longest prefix first
]


@pytest.mark.parametrize("seed", range(12))
@pytest.mark.parametrize("cfg", range(len(CONFIGS)))
def test_batched_equals_alone(cfg, seed):
    workload = make_workload(random.Random(seed * 31 + cfg), n=24)
    outputs, finish, core = run(workload, seed=seed, **CONFIGS[cfg])
    for req in workload.requests:
        for i in range(req.n):
            key = (req.request_id, i)
            if req.request_id in workload.abort_at and finish.get(key) == "abort":
                continue
            assert outputs.get(key) == reference(req), f"{key} differs from the request run alone"
            assert finish[key] == (
                "stop" if outputs[key][-1] == EOS and not req.stopping.ignore_eos else "length"
            )


class CountingColumns(DeltaColumns):
    __slots__ = ("num_taken",)

    def __init__(self):
        super().__init__()
        self.num_taken = 0

    def take(self) -> DeltaColumns:
        taken = super().take()
        self.num_taken += len(taken)
        return taken


@pytest.mark.parametrize("columns", ["ordered", "shuffled"])
@pytest.mark.parametrize("cfg", [0, 4, 6, 8])
def test_tokens_and_deltas_in_columns_match_alone(cfg, columns, monkeypatch):
    """Tokens in the result's columns (in plan order, applied inline; in another order, looked up) and streamed
    deltas in a consumer's columns give every choice what it gets alone, mostly without the general path."""
    calls = []
    general = Scheduler._on_sample
    monkeypatch.setattr(Scheduler, "_on_sample", lambda self, *a: calls.append(1) or general(self, *a))
    workload = make_workload(random.Random(cfg * 7 + 1), n=24)
    deltas = CountingColumns()
    outputs, finish, core = run(workload, seed=cfg, columns=columns, deltas=deltas, **CONFIGS[cfg])
    for req in workload.requests:
        for i in range(req.n):
            key = (req.request_id, i)
            if req.request_id in workload.abort_at and finish.get(key) == "abort":
                continue
            assert outputs.get(key) == reference(req), f"{key} differs from the request run alone"
    tokens = core.stats.generated_tokens_total
    assert len(calls) < 0.8 * tokens, (len(calls), tokens)  # the inline path took the rest
    assert deltas.num_taken > 0.25 * tokens, (deltas.num_taken, tokens)


@pytest.mark.parametrize("interval", [1, 3])
def test_inline_path_equals_general_path_with_stop_strings(interval):
    """Text, ids and finish reasons are the same through the inline path and delta columns as through the
    general path and one output each, with stop strings (cut mid-stream) and a stream interval."""
    workload = make_workload(random.Random(5), n=24)
    for k, req in enumerate(workload.requests):
        ref = reference(req)
        if k % 2 and len(ref) > 3:  # a stop string from the middle of its own output: it must end there
            stop = FakeTokenizer().decode(ref[len(ref) // 2 : len(ref) // 2 + 2])
            stopping = dataclasses.replace(req.stopping, stop=(stop,))
            workload.requests[k] = dataclasses.replace(req, stopping=stopping)
    texts_general: dict = {}
    general = run(workload, texts=texts_general, stream_interval=interval, **CONFIGS[0])
    texts_inline: dict = {}
    inline = run(
        workload,
        texts=texts_inline,
        stream_interval=interval,
        columns="ordered",
        deltas=DeltaColumns(),
        **CONFIGS[0],
    )
    assert texts_inline == texts_general
    assert inline[0] == general[0] and inline[1] == general[1]
    assert "stop" in general[1].values()
    assert any(r.stopping.stop for r in workload.requests)


def test_tiny_pool_preempts_and_still_matches():
    workload = make_workload(random.Random(99), n=30)
    outputs, _, core = run(
        workload, num_pages=24, page_size=4, chunk=8, cache=True, overlap=True, arrival_steps=30
    )
    assert core.stats.num_preemptions > 0
    for req in workload.requests:
        if req.request_id not in workload.abort_at:
            assert outputs[(req.request_id, 0)] == reference(req)


def test_prefix_cache_hits_and_never_mixes_images():
    base = list(range(100, 140))
    img = lambda key: MultimodalItem(key, 40, 8, (1, 4, 8))  # noqa: E731
    reqs = [
        GenerateRequest(
            f"r{k}",
            tuple(base + [9] * 8 + [200, 201]),
            (img(key),),
            SamplingParams(0.0),
            StoppingCriteria(max_new_tokens=5, ignore_eos=True),
        )
        for k, key in enumerate("aab")
    ]
    wl = Workload(reqs, {})
    outputs, _, core = run(
        wl, num_pages=200, page_size=4, chunk=64, cache=True, overlap=True, arrival_steps=1
    )
    for r in reqs:
        assert outputs[(r.request_id, 0)] == reference(r)
    assert outputs[("r0", 0)] == outputs[("r1", 0)] != outputs[("r2", 0)]
    assert core.stats.prefix_cache_hit_tokens >= 40  # r1 reused r0's text and image pages


def test_abort_frees_pages_within_a_step():
    policy = SchedulerPolicy(
        page_size=4,
        num_pages=100,
        context_length=4096,
        max_running_requests=8,
        chunked_prefill_size=64,
        max_prefill_tokens=64,
        enable_prefix_cache=False,
        eos_token_ids=(EOS,),
    )
    core = Scheduler(policy, FakeTokenizer())
    worker = FakeWorker(4)
    core.add_request(
        GenerateRequest(
            "x",
            tuple(range(10, 30)),
            (),
            SamplingParams(0.0),
            StoppingCriteria(max_new_tokens=1000, ignore_eos=True),
        )
    )
    for _ in range(5):
        core.process_output(worker.step(core.schedule()))
    assert core.allocator.num_free < core.allocator.num_usable
    assert core.abort_request("x")
    assert core.allocator.num_free == core.allocator.num_usable
    plan = core.schedule()
    assert plan is not None and plan.free_seq_ids == ("x#0",) and not plan.seqs
    assert core.outputs[-1].finish_reason == "abort"


def test_n_choices_share_the_prompt_pages():
    prompt = tuple(range(10, 50))
    req = GenerateRequest(
        "n", prompt, (), SamplingParams(0.0), StoppingCriteria(max_new_tokens=3, ignore_eos=True), n=3
    )
    outputs, _, core = run(
        Workload([req], {}), num_pages=100, page_size=4, chunk=64, cache=True, overlap=True
    )
    assert [outputs[("n", i)] for i in range(3)] == [reference(req)] * 3
    assert core.stats.prefix_cache_hit_tokens >= 2 * 36  # choices 1 and 2 reuse choice 0's full prompt pages


def test_chunking_off_runs_each_prompt_whole():
    policy = SchedulerPolicy(
        page_size=4,
        num_pages=200,
        context_length=4096,
        max_running_requests=8,
        chunked_prefill_size=-1,
        max_prefill_tokens=16,
        enable_prefix_cache=False,
    )
    core = Scheduler(policy, FakeTokenizer())
    core.add_request(GenerateRequest("a", tuple(range(10, 50)), (), SamplingParams(0.0), StoppingCriteria(2)))
    plan = core.schedule()
    assert [len(s.input_ids) for s in plan.seqs] == [40]


def test_sequence_that_outgrows_the_pool_ends_with_length():
    req = GenerateRequest(
        "big",
        tuple(range(10, 40)),
        (),
        SamplingParams(0.0),
        StoppingCriteria(max_new_tokens=100, ignore_eos=True),
    )
    outputs, finish, _ = run(
        Workload([req], {}), num_pages=21, page_size=2, chunk=8, cache=True, overlap=True
    )
    out = outputs[("big", 0)]
    assert finish[("big", 0)] == "length"
    assert 0 < len(out) < 100 and out == reference(req)[: len(out)]


def small_scheduler(**overrides) -> Scheduler:
    """A scheduler over 100 pages of 4 tokens, 8 running, 64-token chunks; fields overridden by keyword."""
    fields = dict(
        page_size=4, num_pages=100, context_length=4096, max_running_requests=8,
        chunked_prefill_size=64, max_prefill_tokens=64,
    )  # fmt: skip
    return Scheduler(SchedulerPolicy(**{**fields, **overrides}), FakeTokenizer())


def test_image_prefill_waits_one_step_after_its_prefetch_while_others_run():
    core = small_scheduler(eos_token_ids=(EOS,))
    worker = FakeWorker(4)
    stopping = StoppingCriteria(max_new_tokens=50, ignore_eos=True)
    core.add_request(GenerateRequest("text", (11, 12, 13), stopping=stopping))
    core.process_output(worker.step(core.schedule()))  # running
    item = MultimodalItem("img", 1, 4, (1, 2, 8))
    core.add_request(GenerateRequest("image", (11, 9, 9, 9, 9, 12), (item,), stopping=stopping))
    plan = core.schedule()
    assert {s.seq_id for s in plan.seqs} == {"text#0"} and core.encode_requests
    core.process_output(worker.step(plan))
    core.on_encoded("image", ["img"])
    carried = core.schedule()  # tells the worker to pull; the prefill is not in it
    assert carried.prefetch_keys == ("img",) and len(carried.seqs) == 1
    core.process_output(worker.step(carried))
    plan = core.schedule()  # the pull has had this step
    assert len(plan.seqs) == 1 and not plan.prefetch_keys
    core.process_output(worker.step(plan))
    plan = core.schedule()
    assert {s.seq_id for s in plan.seqs} == {"image#0"}  # a prompt step (decodes wait for the next)
    assert core.stats.embedding_prefetches == 1


def test_idle_batch_admits_an_image_with_its_prefetch():
    core = small_scheduler()
    item = MultimodalItem("img", 1, 4, (1, 2, 8))
    core.add_request(GenerateRequest("image", (11, 9, 9, 9, 9, 12), (item,)))
    assert core.schedule() is None and core.encode_requests
    core.on_encoded("image", ["img"])
    plan = core.schedule()
    assert plan.prefetch_keys == ("img",) and [s.seq_id for s in plan.seqs] == ["image#0"]


def test_a_leased_image_is_admitted_in_the_step_that_carries_its_lease():
    """With a lease the worker copies the rows as the step starts: no step of waiting for a pull, even while
    others run. A lease nobody will use is still handed to the worker, to be ended."""
    from common.types import EmbeddingLease, EmbeddingLocation

    core = small_scheduler(eos_token_ids=(EOS,))
    worker = FakeWorker(4)
    stopping = StoppingCriteria(max_new_tokens=50, ignore_eos=True)
    core.add_request(GenerateRequest("text", (11, 12, 13), stopping=stopping))
    core.process_output(worker.step(core.schedule()))  # running
    item = MultimodalItem("img", 1, 4, (1, 2, 8))
    core.add_request(GenerateRequest("image", (11, 9, 9, 9, 9, 12), (item,), stopping=stopping))
    plan = core.schedule()
    core.process_output(worker.step(plan))
    lease = EmbeddingLease("pool", 3, (EmbeddingLocation("img", (1,), 4),))
    core.on_encoded("image", ["img"], lease=lease)
    carried = core.schedule()
    assert carried.prefetch_keys == ("img",) and carried.prefetch_leases == (lease,)
    assert {s.seq_id for s in carried.seqs} == {"image#0"}  # a prompt step: the decodes wait for the next
    core.process_output(worker.step(carried))
    assert not core.schedule().prefetch_leases  # handed over once
    core.hand_back(lease)
    assert core.has_work
    plan = core.schedule()
    assert plan.prefetch_leases == (EmbeddingLease("pool", 3, ()),)  # to end, nothing to copy


@pytest.mark.parametrize("mixed", [False, True])
def test_prompt_steps_leave_decodes_out_unless_mixed(mixed):
    core = small_scheduler(enable_mixed_chunk=mixed)
    worker = FakeWorker(4)
    stopping = StoppingCriteria(max_new_tokens=20, ignore_eos=True)
    core.add_request(GenerateRequest("a", (11, 12, 13), stopping=stopping))
    core.process_output(worker.step(core.schedule()))
    core.add_request(GenerateRequest("b", (21, 22), stopping=stopping))
    plan = core.schedule()
    ids = {s.seq_id for s in plan.seqs}
    assert ids == ({"a#0", "b#0"} if mixed else {"b#0"})
    core.process_output(worker.step(plan))
    assert {s.seq_id for s in core.schedule().seqs} == {"a#0", "b#0"}  # then both decode


def test_mixed_steps_keep_to_the_mixed_budget_while_decoding():
    """With --mixed-prefill-tokens, a step that carries decodes takes at most that many prompt tokens; an idle
    batch takes the whole --max-prefill-tokens; with chunking off a longer prompt still runs, alone."""
    stopping = StoppingCriteria(max_new_tokens=20, ignore_eos=True)
    core = small_scheduler(enable_mixed_chunk=True, mixed_prefill_tokens=8)
    worker = FakeWorker(4)
    core.add_request(GenerateRequest("a", tuple(range(10, 50)), stopping=stopping))  # 40 tokens, idle
    first = core.schedule()
    assert [(s.seq_id, len(s.input_ids)) for s in first.seqs] == [("a#0", 40)]
    core.process_output(worker.step(first))
    core.add_request(GenerateRequest("b", tuple(range(100, 120)), stopping=stopping))  # 20 tokens
    core.add_request(GenerateRequest("c", tuple(range(200, 210)), stopping=stopping))
    rows = []
    while core.waiting or any(s.in_prompt for s in core.running):
        plan = core.schedule()
        assert "a#0" in plan.decode_seq_ids or any(s.seq_id == "a#0" for s in plan.seqs)  # decodes ride along
        rows.append(sum(len(s.input_ids) for s in plan.seqs if s.seq_id != "a#0" and s.start_pos < 20))
        assert rows[-1] <= 8
        core.process_output(worker.step(plan))
    assert rows == [8, 8, 8, 6]  # b: 8, 8, its last 4 and c's first 4, then c's last 6

    unsplit = small_scheduler(enable_mixed_chunk=True, mixed_prefill_tokens=8, chunked_prefill_size=-1)
    unsplit.add_request(GenerateRequest("a", (11, 12, 13), stopping=stopping))
    unsplit.process_output(worker.step(unsplit.schedule()))
    unsplit.add_request(GenerateRequest("long", tuple(range(10, 30)), stopping=stopping))
    plan = unsplit.schedule()
    # past the budget: the whole prompt, beside the decode
    assert [(s.seq_id, len(s.input_ids)) for s in plan.seqs] == [("a#0", 1), ("long#0", 20)]


def test_lpm_admits_the_request_sharing_a_cached_prefix_first():
    core = small_scheduler(num_pages=200, max_running_requests=1, schedule_policy="lpm")
    worker = FakeWorker(4)
    shared = tuple(range(20, 40))
    core.add_request(GenerateRequest("warm", shared + (1,), stopping=StoppingCriteria(max_new_tokens=1)))
    while core.requests:
        core.process_output(worker.step(core.schedule()))
    core.add_request(
        GenerateRequest("other", tuple(range(60, 80)), stopping=StoppingCriteria(max_new_tokens=1))
    )
    core.add_request(GenerateRequest("sharer", shared + (2,), stopping=StoppingCriteria(max_new_tokens=1)))
    plan = core.schedule()
    assert [s.seq_id for s in plan.seqs] == ["sharer#0"]  # later, but 20 of its tokens are cached


def test_plain_decodes_are_planned_in_columns():
    """With overlap, a decode that needs no new page is two list entries in the plan; one that crosses into a new
    page is a full step carrying the page."""
    core = small_scheduler(enable_prefix_cache=False)
    worker = FakeWorker(4)
    stop = StoppingCriteria(max_new_tokens=100, ignore_eos=True)
    core.add_request(GenerateRequest("a", tuple(range(10, 16)), (), SamplingParams(0.0), stop))  # 6 tokens
    core.add_request(GenerateRequest("b", tuple(range(10, 17)), (), SamplingParams(0.0), stop))  # 7 tokens
    prefill = core.schedule()
    assert {s.seq_id for s in prefill.seqs} == {"a#0", "b#0"} and not prefill.decode_seq_ids
    decode = core.schedule()  # written before the prefill's result: positions 6 and 7
    assert decode.decode_seq_ids == ("a#0", "b#0") and decode.decode_start_pos == (6, 7) and not decode.seqs
    core.process_output(worker.step(prefill))
    grow = core.schedule()  # positions 7 (page 2 has room) and 8 (needs a third page)
    assert grow.decode_seq_ids == ("a#0",) and grow.decode_start_pos == (7,)
    assert [(s.seq_id, s.start_pos, s.page_table_start, len(s.page_ids)) for s in grow.seqs] == [
        ("b#0", 8, 2, 1)
    ]
    for plan in (decode, grow):
        core.process_output(worker.step(plan))
    assert [len(o.token_ids) for o in core.outputs] == [1, 1, 1, 1, 1, 1]


def test_requests_past_max_queued_are_refused_with_resource_exhausted():
    from common.errors import ResourceExhaustedError

    core = small_scheduler(max_queued_requests=2, max_running_requests=1)
    stopping = StoppingCriteria(max_new_tokens=5, ignore_eos=True)
    core.add_request(GenerateRequest("a", (11, 12, 13), stopping=stopping))
    core.add_request(GenerateRequest("b", (11, 12, 13), stopping=stopping, n=2))  # n > 1 counts once
    with pytest.raises(ResourceExhaustedError, match="max-queued-requests"):
        core.add_request(GenerateRequest("c", (11, 12, 13), stopping=stopping))
    FakeWorker(4).step(core.schedule())  # "a" is admitted (one running at most): room for one more
    core.add_request(GenerateRequest("c", (11, 12, 13), stopping=stopping))
    with pytest.raises(ResourceExhaustedError):
        core.add_request(GenerateRequest("d", (11, 12, 13), stopping=stopping))


def test_decodes_keep_their_pace_while_an_older_prompt_spends_the_mixed_budget():
    """Stepped without overlap, every decode travels as a step row: one behind an older sequence's prompt chunk
    that took the whole mixed budget must still run in that step."""
    stopping = StoppingCriteria(max_new_tokens=30, ignore_eos=True)
    core = small_scheduler(enable_mixed_chunk=True, mixed_prefill_tokens=8, chunked_prefill_size=8)
    worker = FakeWorker(4)
    core.add_request(GenerateRequest("a", tuple(range(100, 200)), stopping=stopping))  # 100 tokens, 8 a step
    core.add_request(GenerateRequest("b", (11, 12, 13), stopping=stopping))
    plan = core.schedule()  # idle: the whole budget; a's first chunk and all of b
    assert [(s.seq_id, len(s.input_ids)) for s in plan.seqs] == [("a#0", 8), ("b#0", 3)]
    core.process_output(worker.step(plan))
    steps = 0
    while any(s.in_prompt for s in core.running):
        plan = core.schedule()
        rows = {s.seq_id: len(s.input_ids) for s in plan.seqs}
        assert rows.get("a#0") == (8 if steps < 11 else 4) and "b#0" in rows  # b decodes in each of a's steps
        core.process_output(worker.step(plan))
        steps += 1
    assert steps == 12  # 11 more chunks of 8, then the last 4


@pytest.mark.parametrize(
    "device, flag, mixed",
    [("cuda:0", None, True), ("cpu", None, False), ("cuda:0", False, False), ("cpu", True, True)],
)
def test_mixed_chunks_default_on_with_a_gpu_worker(default_model, device, flag, mixed):
    from common.types import WorkerInfo
    from scheduler_svc.config import SchedulerArgs
    from scheduler_svc.server import resolve_policy

    worker = WorkerInfo("Qwen2_5_VLForConditionalGeneration", 100, 16, 4096, 1000, "bfloat16", device)
    args = SchedulerArgs(model_path=str(default_model), enable_mixed_chunk=flag, mixed_prefill_tokens=700)
    policy = resolve_policy(args, worker, (EOS,))
    assert policy.enable_mixed_chunk is mixed and policy.mixed_prefill_tokens == 700
