"""The simulated worker (benchmarks/sim_worker.py) keeps the real worker's contract: its step stream validates and
fails like the real one, its tokens follow the KV content (prefix hits and recomputes continue exactly), and the
real scheduler loop over it streams the same text it returns whole, through reused and aborted request ids."""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses

import pytest

from benchmarks.sim_worker import SimWorkerArgs, create_server
from common.errors import InvalidRequestError, MiradorError
from common.types import GenerateRequest, SamplingParams, SeqInit, SeqStep, StepPlan, StoppingCriteria
from worker_svc.client import WorkerClient

EOS_AFTER = 30


@contextlib.asynccontextmanager
async def sim_worker(model_dir, **overrides):
    values = {"step_ms": 2.0, "eos_after": EOS_AFTER, **overrides}
    args = SimWorkerArgs(model_path=str(model_dir), port=0, **values)
    server, port, servicer = create_server(args)
    await server.start()
    await servicer.startup()
    try:
        yield f"127.0.0.1:{port}", servicer
    finally:
        await server.stop(0)


def _init(n_prompt: int, **sampling) -> SeqInit:
    return SeqInit((), SamplingParams(temperature=0.0, **sampling), n_prompt)


def test_step_stream_validates_and_follows_the_kv(default_model):
    prompt = tuple(range(1000, 1020))  # 20 tokens: pages of 16 -> 2 pages

    async def main():
        async with sim_worker(default_model, step_ms=20.0) as (address, servicer):
            client = WorkerClient(address)
            info = await client.info()
            assert (info.device, info.max_running_requests, info.page_size) == ("sim", 512, 16)
            # a prompt, then two decodes written before the first result is read
            futs = [
                client.submit(StepPlan(1, (SeqStep("a", 0, prompt, True, 0, (1, 2), _init(20)),))),
                client.submit(StepPlan(2, (SeqStep("a", 20, ()),))),
                client.submit(StepPlan(3, (SeqStep("a", 21, ()),))),
            ]
            outs = [await f for f in futs]
            a = [o.sampled()[0][1] for o in outs]
            pool = set(servicer.core.pool.tolist())
            assert all(t in pool for t in a) and len(set(a)) == 3
            # the device runs steps back to back: each starts when the previous one ends
            assert (
                outs[1].start_unix_ns == outs[0].end_unix_ns and outs[2].start_unix_ns == outs[1].end_unix_ns
            )
            assert all(o.forward_ns == 20_000_000 for o in outs)

            # the same prompt on other pages, and a prefix hit on a's first page: the same tokens follow
            out = await client.submit(
                StepPlan(
                    4,
                    (
                        SeqStep("b", 0, prompt, True, 0, (3, 4), _init(20)),
                        SeqStep("c", 16, prompt[16:], True, 0, (1, 5), _init(20)),
                    ),
                )
            )
            assert [t for _, t in out.sampled()] == [a[0], a[0]]
            # a recompute after preemption: prompt and outputs as a prefill, the worker re-initialized
            redo = SeqInit((), SamplingParams(temperature=0.0), 20, (), (a[0],))
            out = await client.submit(StepPlan(5, (SeqStep("a", 0, (*prompt, a[0]), True, 0, (6, 7), redo),)))
            assert out.sampled()[0][1] == a[1]

            # failures as the real worker reports them
            out = await client.submit(
                StepPlan(
                    6,
                    (
                        SeqStep("unknown", 0, (1, 2), True, 0, (8,)),  # no init
                        SeqStep("b", 20, ()),  # fine
                        SeqStep("c", 32, ()),  # position 32 needs a third page
                    ),
                )
            )
            assert [sid for sid, _ in out.sampled()] == ["b"]
            why = {f.seq_id: f.message for f in out.failures}
            assert "unknown" in why["unknown"] and "too short" in why["c"]
            out = await client.submit(StepPlan(7, (SeqStep("c", 20, ()),)))  # fails until re-initialized
            assert "earlier step" in out.failures[0].message
            out = await client.submit(StepPlan(8, (SeqStep("c", 0, prompt, True, 0, (9, 10), _init(20)),)))
            assert out.sampled()[0][1] == a[0] and not out.failures

            # freed sequences are gone; a second scheduler may not drive the same worker
            await client.submit(StepPlan(9, (), ("a", "b", "c")))
            assert servicer.core.counters.live_seqs == 0
            other = WorkerClient(address)
            with pytest.raises(MiradorError):
                await other.submit(StepPlan(1, ()))
            await other.close()
            await client.close()

    asyncio.run(main())


async def _collect(loop, req: GenerateRequest):
    text, ids, last = "", [], None
    async for out in loop.generate(req):
        text, ids, last = text + out.text, ids + out.token_ids, out
    return text, ids, last


def _request(
    rid: str, ids, stream: bool, max_tokens: int = 24, sampling: SamplingParams | None = None, **stopping
) -> GenerateRequest:
    return GenerateRequest(
        rid,
        tuple(ids),
        sampling=sampling or SamplingParams(temperature=0.0),
        stopping=StoppingCriteria(max_new_tokens=max_tokens, **stopping),
        stream=stream,
    )


def test_scheduler_loop_over_sim_worker(default_model):
    from processor.model_config import load_generation_eos
    from scheduler_svc.config import SchedulerArgs
    from scheduler_svc.loop import SchedulerLoop
    from scheduler_svc.scheduler import Scheduler
    from scheduler_svc.server import resolve_policy

    async def main():
        async with sim_worker(default_model, all_scripts=True) as (address, servicer):
            tokenizer = servicer.tokenizer
            prompts = [tokenizer.encode(f"Prompt {k}: a story about the number {k * 37}.") for k in range(6)]
            worker = WorkerClient(address)
            eos = load_generation_eos(default_model)
            policy = resolve_policy(SchedulerArgs(model_path=str(default_model)), await worker.info(), eos)
            loop = SchedulerLoop(Scheduler(policy, tokenizer), worker, None)
            loop.start()
            try:
                # every prompt streamed and whole at the same time: same text, same ids, nothing lost
                runs = [
                    _collect(loop, _request(f"{k}-{stream}", p, stream, max_tokens=16 + k))
                    for k, p in enumerate(prompts)
                    for stream in (True, False)
                ]
                outs = await asyncio.gather(*runs)
                for k in range(len(prompts)):
                    streamed, whole = outs[2 * k], outs[2 * k + 1]
                    assert streamed[0] == whole[0] and streamed[1] == whole[1] and whole[0]
                    assert whole[2].completion_tokens == len(whole[1]) == 16 + k
                    assert whole[2].finish_reason == "length"

                # a live request id is refused; once finished it can be used again
                first = loop.generate(_request("rid", prompts[0], True, max_tokens=200))
                await first.__anext__()
                with pytest.raises(InvalidRequestError):
                    await _collect(loop, _request("rid", prompts[1], True))
                # aborted mid-stream: the caller leaves, the worker is told to free the sequence
                await first.aclose()
                assert not loop.core.requests
                for _ in range(200):
                    if servicer.core.counters.live_seqs == 0:
                        break
                    await asyncio.sleep(0.01)
                assert servicer.core.counters.live_seqs == 0
                again = await _collect(loop, _request("rid", prompts[0], True, max_tokens=16))
                assert again[:2] == outs[1][:2]  # its pages came back from the prefix cache: same tokens

                # EOS (output token EOS_AFTER) stops a request unless ignore_eos or min_tokens holds it back
                _, ids, stop = await _collect(loop, _request("eos", prompts[2], False, max_tokens=40))
                assert (stop.finish_reason, stop.matched_stop, len(ids)) == ("stop", eos[0], EOS_AFTER + 1)
                _, ids, held = await _collect(loop, _request("eos", prompts[2], True, 40, ignore_eos=True))
                assert (held.finish_reason, len(ids), ids[EOS_AFTER]) == ("length", 40, eos[0])
                suppress = SamplingParams(temperature=0.0, min_tokens=35, min_tokens_suppress_ids=eos)
                _, ids, held = await _collect(
                    loop, _request("eos", prompts[2], True, 40, suppress, min_new_tokens=35)
                )
                assert (held.finish_reason, len(ids)) == ("length", 40) and not set(ids) & set(eos)
                assert servicer.core.counters.failures == 0
            finally:
                await loop.stop()
                await worker.close()

    asyncio.run(main())


def test_routed_sink_gets_delta_columns_with_the_same_text(default_model):
    """A sink opened as a route (a Connect stream's outbox) gets its requests' plain deltas as DeltaColumns, one
    object per step for all of them, then finishes as outputs; read back as the servicer sends them (one
    OutputBatch), every stream has the text and ids of the same request run whole."""
    from common.convert import outputs_from_batch, outputs_to_batch
    from common.mailbox import Mailbox
    from common.types import DeltaColumns
    from processor.model_config import load_generation_eos
    from scheduler_svc.config import SchedulerArgs
    from scheduler_svc.loop import SchedulerLoop
    from scheduler_svc.scheduler import Scheduler
    from scheduler_svc.server import resolve_policy

    async def main():
        async with sim_worker(default_model, all_scripts=True) as (address, servicer):
            tokenizer = servicer.tokenizer
            prompts = [tokenizer.encode(f"Routed {k}: the weather on day {k * 11}.") for k in range(5)]
            worker = WorkerClient(address)
            eos = load_generation_eos(default_model)
            policy = resolve_policy(SchedulerArgs(model_path=str(default_model)), await worker.info(), eos)
            loop = SchedulerLoop(Scheduler(policy, tokenizer), worker, None)
            loop.start()
            sink = Mailbox()
            loop.open_route(sink)
            try:
                for k, p in enumerate(prompts):
                    loop.attach(_request(f"s{k}", p, True, max_tokens=20 + k), sink)
                whole = await asyncio.gather(
                    *(
                        _collect(loop, _request(f"w{k}", p, False, max_tokens=20 + k))
                        for k, p in enumerate(prompts)
                    )
                )
                got: dict[str, tuple[str, list[int]]] = {}
                finished, num_columns = set(), 0
                while len(finished) < len(prompts):
                    items = await sink.take_all()
                    num_columns += sum(type(i) is DeltaColumns for i in items)
                    for out in outputs_from_batch(outputs_to_batch(items)):
                        text, ids = got.get(out.request_id, ("", []))
                        got[out.request_id] = (text + out.text, ids + out.token_ids)
                        if out.finish_reason is not None:
                            finished.add(out.request_id)
                            loop.detach(out.request_id)
                assert num_columns > 10
                for k in range(len(prompts)):
                    assert got[f"s{k}"] == whole[k][:2] and len(whole[k][1]) == 20 + k
            finally:
                loop.close_route(sink)
                await loop.stop()
                await worker.close()

    asyncio.run(main())


def test_plain_decode_columns_take_a_fast_path_with_the_same_output(default_model):
    """SimCore.step_request reads plain decodes from their columns without a SeqStep each: over a random history
    (prompts, decodes into new pages, seeds, logprobs, min_tokens and EOS, frees, an unknown sequence) it gives
    the same results, failures, counters and KV as the SeqStep path, with the columns in the real worker's order
    (the plain decodes last)."""
    import random

    import numpy as np

    from benchmarks.sim_worker import SimCore, _load_tokenizer, text_token_ids
    from common.convert import plan_from_proto, plan_to_proto
    from protos import worker_pb2

    args = SimWorkerArgs(model_path=str(default_model), eos_after=12, num_pages=4096)
    tok = _load_tokenizer(str(default_model))
    pool, eos = text_token_ids(tok), (tok.hf.eos_token_id,)
    slow, fast = SimCore(args, pool, eos, 4096), SimCore(args, pool, eos, 4096)
    rng = random.Random(7)
    live: dict[str, list[int]] = {}  # seq id -> [next position, pages held]
    next_page, fast_steps = 1, 0
    for step_id in range(1, 120):
        seqs, frees = [], []
        for sid in list(live):
            if rng.random() < 0.04:
                frees.append(sid)
                del live[sid]
        for _ in range(rng.randrange(0, 3)):  # new prompts
            sid, n = f"s{step_id}-{len(seqs)}", rng.randrange(5, 40)
            pages = -(-n // 16)
            sampling = {"seed": rng.randrange(100)} if rng.random() < 0.5 else {}
            if rng.random() < 0.2:
                sampling.update(return_logprob=True, top_logprobs=2)
            if rng.random() < 0.3:
                sampling.update(min_tokens=20, min_tokens_suppress_ids=eos)
            ids = tuple(rng.randrange(100, 5000) for _ in range(n))
            seqs.append(
                SeqStep(
                    sid, 0, ids, True, 0, tuple(range(next_page, next_page + pages)), _init(n, **sampling)
                )
            )
            live[sid] = [n, pages]
            next_page += pages
        for sid, (pos, pages) in list(live.items()):
            if any(s.seq_id == sid for s in seqs):
                continue
            if pos + 1 > pages * 16:  # a decode into a new page
                seqs.append(SeqStep(sid, pos, (), True, pages, (next_page,)))
                live[sid][1] += 1
                next_page += 1
            else:
                seqs.append(SeqStep(sid, pos))
            live[sid][0] += 1
        if step_id % 17 == 0:
            seqs.append(SeqStep("never-initialised", 3))
        wire = plan_to_proto(StepPlan(step_id, tuple(seqs), tuple(frees))).SerializeToString()
        want, want_ns = slow.step(plan_from_proto(worker_pb2.StepRequest.FromString(wire)))
        req = worker_pb2.StepRequest.FromString(wire)
        decodes = list(req.decode_seq_ids)
        took_fast = bool(decodes) and fast._plain_decodes(decodes, list(req.decode_start_pos)) is not None
        got, got_ns = fast.step_request(req)
        assert sorted(got.sampled()) == sorted(want.sampled()) and got.failures == want.failures
        assert (got_ns, got.num_tokens) == (want_ns, want.num_tokens)

        def with_logprobs(out):
            return {r.seq_id: r for r in out.results if r.logprob or r.top_logprobs}

        assert with_logprobs(got) == with_logprobs(want)
        if took_fast:
            fast_steps += 1
            plain = tuple(i for i in decodes if i not in with_logprobs(want))
            assert got.sampled_seq_ids[len(got.sampled_seq_ids) - len(plain) :] == plain
    assert np.array_equal(slow.kv, fast.kv)
    counters = [dataclasses.asdict(c.counters) for c in (slow, fast)]
    for c in counters:
        c.pop("host_ns")
    assert counters[0] == counters[1]
    assert fast_steps > 50  # most steps took the fast path
