"""Proto <-> domain conversions for every message the services exchange (torch-free; tensors excluded)."""

from __future__ import annotations

import json
from collections.abc import Iterable
from dataclasses import asdict

from common.errors import InvalidRequestError
from common.types import (
    CONSTRAINT_KINDS,
    Constraint,
    DeltaColumns,
    EmbeddingLease,
    EmbeddingLocation,
    EncodedItem,
    GenerateOutput,
    GenerateRequest,
    MultimodalItem,
    PromptLogprobs,
    SamplingParams,
    SeqFailure,
    SeqInit,
    SeqResult,
    SeqStep,
    StepOutput,
    StepPlan,
    StoppingCriteria,
    TokenLogprob,
    WorkerInfo,
)
from protos import common_pb2, scheduler_pb2, vision_pb2, worker_pb2

_MODALITY = {"image": common_pb2.MODALITY_IMAGE, "video": common_pb2.MODALITY_VIDEO}
_MODALITY_BACK = {v: k for k, v in _MODALITY.items()}
_FINISH = {
    None: scheduler_pb2.FINISH_REASON_UNSPECIFIED,
    "stop": scheduler_pb2.FINISH_REASON_STOP,
    "length": scheduler_pb2.FINISH_REASON_LENGTH,
    "abort": scheduler_pb2.FINISH_REASON_ABORT,
}
_FINISH_BACK = {v: k for k, v in _FINISH.items()}
_FAILURE = {
    "embedding_missing": worker_pb2.FAILURE_REASON_EMBEDDING_MISSING,
    "internal": worker_pb2.FAILURE_REASON_INTERNAL,
    "embedding_pending": worker_pb2.FAILURE_REASON_EMBEDDING_PENDING,
}
_FAILURE_BACK = {v: k for k, v in _FAILURE.items()}


def mm_item_to_proto(m: MultimodalItem, with_data: bool = True) -> common_pb2.MultimodalItem:
    return common_pb2.MultimodalItem(
        modality=_MODALITY[m.modality],
        content_key=m.content_key,
        offset=m.offset,
        num_tokens=m.num_tokens,
        grid_thw=list(m.grid_thw),
        data=m.data if with_data else b"",
    )


def mm_item_from_proto(p: common_pb2.MultimodalItem) -> MultimodalItem:
    if p.modality not in _MODALITY_BACK:
        raise ValueError("multimodal item without a modality")
    if len(p.grid_thw) != 3:
        raise ValueError("multimodal item grid_thw must have 3 entries")
    return MultimodalItem(
        p.content_key, p.offset, p.num_tokens, tuple(p.grid_thw), _MODALITY_BACK[p.modality], p.data
    )


def sampling_to_proto(s: SamplingParams) -> common_pb2.SamplingParams:
    return common_pb2.SamplingParams(
        temperature=s.temperature,
        top_p=s.top_p,
        top_k=s.top_k,
        min_p=s.min_p,
        seed=s.seed,
        presence_penalty=s.presence_penalty,
        frequency_penalty=s.frequency_penalty,
        repetition_penalty=s.repetition_penalty,
        logit_bias=s.logit_bias,
        return_logprob=s.return_logprob,
        top_logprobs=s.top_logprobs,
        min_tokens_suppress_ids=list(s.min_tokens_suppress_ids),
        min_tokens=s.min_tokens,
    )


def sampling_from_proto(p: common_pb2.SamplingParams) -> SamplingParams:
    return SamplingParams(
        temperature=p.temperature,
        top_p=p.top_p,
        top_k=p.top_k,
        min_p=p.min_p,
        seed=p.seed if p.HasField("seed") else None,
        presence_penalty=p.presence_penalty,
        frequency_penalty=p.frequency_penalty,
        repetition_penalty=p.repetition_penalty,
        logit_bias=dict(p.logit_bias),
        return_logprob=p.return_logprob,
        top_logprobs=p.top_logprobs,
        min_tokens_suppress_ids=tuple(p.min_tokens_suppress_ids),
        min_tokens=p.min_tokens,
    )


def request_to_proto(r: GenerateRequest) -> scheduler_pb2.GenerateRequest:
    s = r.stopping
    return scheduler_pb2.GenerateRequest(
        request_id=r.request_id,
        input_ids=list(r.input_ids),
        mm_items=[mm_item_to_proto(m) for m in r.mm_items],
        sampling=sampling_to_proto(r.sampling),
        stopping=scheduler_pb2.StoppingCriteria(
            max_new_tokens=s.max_new_tokens,
            min_new_tokens=s.min_new_tokens,
            stop=list(s.stop),
            stop_token_ids=list(s.stop_token_ids),
            ignore_eos=s.ignore_eos,
            no_stop_trim=s.no_stop_trim,
            skip_special_tokens=s.skip_special_tokens,
        ),
        n=r.n,
        stream=r.stream,
        cache_salt=r.cache_salt,
        logprob_start_len=r.logprob_start_len if r.logprob_start_len >= 0 else None,
        constraint=constraint_to_proto(r.constraint),
    )


def request_from_proto(p: scheduler_pb2.GenerateRequest) -> GenerateRequest:
    s = p.stopping
    return GenerateRequest(
        request_id=p.request_id,
        input_ids=tuple(p.input_ids),
        mm_items=tuple(mm_item_from_proto(m) for m in p.mm_items),
        sampling=sampling_from_proto(p.sampling),
        stopping=StoppingCriteria(
            max_new_tokens=s.max_new_tokens,
            min_new_tokens=s.min_new_tokens,
            stop=tuple(s.stop),
            stop_token_ids=tuple(s.stop_token_ids),
            ignore_eos=s.ignore_eos,
            no_stop_trim=s.no_stop_trim,
            skip_special_tokens=s.skip_special_tokens,
        ),
        n=max(1, p.n),
        stream=p.stream,
        cache_salt=p.cache_salt,
        logprob_start_len=p.logprob_start_len if p.HasField("logprob_start_len") else -1,
        constraint=constraint_from_proto(p.constraint) if p.HasField("constraint") else None,
    )


def constraint_to_proto(c: Constraint | None) -> common_pb2.Constraint | None:
    if c is None:
        return None
    return common_pb2.Constraint(
        kind=common_pb2.ConstraintKind.Value(f"CONSTRAINT_KIND_{c.kind.upper()}"), text=c.text
    )


def constraint_from_proto(p: common_pb2.Constraint) -> Constraint:
    """Raises InvalidRequestError for a kind this build does not know (a newer caller's)."""
    name = common_pb2.ConstraintKind.Name(p.kind) if p.kind in common_pb2.ConstraintKind.values() else ""
    kind = name.removeprefix("CONSTRAINT_KIND_").lower()
    if kind not in CONSTRAINT_KINDS:
        raise InvalidRequestError(f"constraint kind {p.kind} is not supported", param="constraint")
    return Constraint(kind, p.text)


def output_to_proto(
    o: GenerateOutput, msg: scheduler_pb2.GenerateResponse | None = None
) -> scheduler_pb2.GenerateResponse:
    """The message for one output, filled into `msg` when given (e.g. `batch.outputs.add()`: no copy)."""
    if msg is None:
        msg = scheduler_pb2.GenerateResponse()
    msg.request_id = o.request_id
    msg.index = o.index
    msg.text = o.text
    msg.token_ids.extend(o.token_ids)
    if o.finish_reason is not None:
        msg.finish_reason = _FINISH[o.finish_reason]
        u = msg.usage
        u.prompt_tokens, u.completion_tokens, u.cached_tokens = (
            o.prompt_tokens,
            o.completion_tokens,
            o.cached_tokens,
        )
    _logprobs_to_proto(o.logprobs, msg.logprobs)
    _logprobs_to_proto(o.prompt_logprobs, msg.prompt_logprobs)
    if isinstance(o.matched_stop, str):
        msg.matched_stop_str = o.matched_stop
    elif isinstance(o.matched_stop, int):
        msg.matched_stop_token = o.matched_stop
    return msg


def output_from_proto(p: scheduler_pb2.GenerateResponse) -> GenerateOutput:
    which = p.WhichOneof("matched_stop")
    return GenerateOutput(
        request_id=p.request_id,
        index=p.index,
        text=p.text,
        token_ids=list(p.token_ids),
        finish_reason=_FINISH_BACK[p.finish_reason],
        matched_stop=getattr(p, which) if which else None,
        prompt_tokens=p.usage.prompt_tokens,
        completion_tokens=p.usage.completion_tokens,
        cached_tokens=p.usage.cached_tokens,
        logprobs=_logprobs_from_proto(p.logprobs),
        prompt_logprobs=_logprobs_from_proto(p.prompt_logprobs),
    )


def _logprobs_to_proto(lps: list[TokenLogprob], field) -> None:
    for lp in lps:
        m = field.add(token_id=lp.token_id, logprob=lp.logprob)
        for t, v in lp.top_logprobs:
            m.top_logprobs.add(token_id=t, logprob=v)


def _logprobs_from_proto(field) -> list[TokenLogprob]:
    return [
        TokenLogprob(lp.token_id, lp.logprob, tuple((t.token_id, t.logprob) for t in lp.top_logprobs))
        for lp in field
    ]


def outputs_to_batch(
    outs: Iterable[GenerateOutput | DeltaColumns], batch: scheduler_pb2.OutputBatch | None = None
) -> scheduler_pb2.OutputBatch:
    """Outputs into one OutputBatch: plain deltas (no finish, logprobs or error; and DeltaColumns whole) in its
    columns, the rest as messages; a request's deltas after one of its messages go as messages too, so reading
    deltas first keeps each choice's order."""
    if batch is None:
        batch = scheduler_pb2.OutputBatch()
    rids, indexes, texts, counts, token_ids = [], [], [], [], []
    as_messages: set[str] = set()
    for o in outs:
        if type(o) is DeltaColumns:
            if not as_messages or as_messages.isdisjoint(o.request_ids):
                rids += o.request_ids
                indexes += o.indexes
                texts += o.texts
                counts += o.num_tokens
                token_ids += o.token_ids
                continue
            items = o.outputs()  # some of its requests already went as messages: entry by entry
        else:
            items = (o,)
        for d in items:
            if (
                d.finish_reason is None
                and not d.logprobs
                and not d.prompt_logprobs
                and d.error is None
                and d.request_id not in as_messages
            ):
                rids.append(d.request_id)
                indexes.append(d.index)
                texts.append(d.text)
                counts.append(len(d.token_ids))
                token_ids += d.token_ids
                continue
            output_to_proto(d, batch.outputs.add())
            as_messages.add(d.request_id)
    n = len(rids)
    batch.delta_request_ids.extend(rids)
    if indexes.count(0) != n:  # left empty when every delta is of choice 0 (n=1: always)
        batch.delta_indexes.extend(indexes)
    batch.delta_texts.extend(texts)
    if counts.count(1) != n:  # left empty when every delta is one token (stream_interval 1: nearly always)
        batch.delta_num_tokens.extend(counts)
    batch.delta_token_ids.extend(token_ids)
    return batch


def outputs_from_batch(batch: scheduler_pb2.OutputBatch) -> list[GenerateOutput]:
    """The outputs of an OutputBatch in an order that keeps each choice's (its errors excepted)."""
    token_ids = list(batch.delta_token_ids)
    num_deltas = len(batch.delta_request_ids)
    indexes = batch.delta_indexes or [0] * num_deltas  # empty: every delta is of choice 0
    counts = batch.delta_num_tokens or [1] * num_deltas  # empty: every delta is one token
    outs, end = [], 0
    for rid, index, text, n in zip(batch.delta_request_ids, indexes, batch.delta_texts, counts, strict=True):
        outs.append(GenerateOutput(rid, index, text, token_ids[end : end + n]))
        end += n
    outs += [output_from_proto(m) for m in batch.outputs]
    return outs


def plan_to_proto(plan: StepPlan) -> worker_pb2.StepRequest:
    req = worker_pb2.StepRequest(
        step_id=plan.step_id,
        free_seq_ids=plan.free_seq_ids,
        sent_unix_ns=plan.sent_unix_ns,
        prefetch_keys=plan.prefetch_keys,
        prefetch_leases=[lease_to_proto(x) for x in plan.prefetch_leases],
        mask_seq_ids=plan.mask_seq_ids,
        token_bitmask=plan.token_bitmask,
    )
    add = req.seqs.add
    decode_ids, decode_pos = [], []
    page_ids, page_pos, page_starts, page_pages = [], [], [], []
    for s in plan.seqs:
        if s.init is None and not s.input_ids and s.sample and not s.logprob_targets:
            if not s.page_ids:  # a plain decode: two fields
                decode_ids.append(s.seq_id)
                decode_pos.append(s.start_pos)
                continue
            if len(s.page_ids) == 1:  # a decode into a new page: four (a message costs ~10x more to build)
                page_ids.append(s.seq_id)
                page_pos.append(s.start_pos)
                page_starts.append(s.page_table_start)
                page_pages.append(s.page_ids[0])
                continue
        msg = add(
            seq_id=s.seq_id,
            page_table_start=s.page_table_start,
            page_ids=s.page_ids,
            start_pos=s.start_pos,
            sample=s.sample,
        )
        if s.input_ids or s.logprob_targets:  # a decode with a new page has neither: set only what is there
            msg.input_ids.extend(s.input_ids)
            msg.logprob_row_start = s.logprob_row_start
            msg.logprob_targets.extend(s.logprob_targets)
        if s.init is not None:
            i = s.init
            init = msg.init
            init.SetInParent()  # present even when every field is a default
            init.mm_items.extend(mm_item_to_proto(m, with_data=False) for m in i.mm_items)
            init.sampling.CopyFrom(sampling_to_proto(i.sampling))
            init.num_prompt_tokens = i.num_prompt_tokens
            init.prompt_token_ids.extend(i.prompt_token_ids)
            init.output_token_ids.extend(i.output_token_ids)
            init.encoder_page_ids.extend(i.encoder_page_ids)
    if page_ids:
        req.page_decode_seq_ids.extend(page_ids)
        req.page_decode_start_pos.extend(page_pos)
        req.page_decode_table_start.extend(page_starts)
        req.page_decode_page_ids.extend(page_pages)
    req.decode_seq_ids.extend(decode_ids)
    req.decode_start_pos.extend(decode_pos)
    req.decode_seq_ids.extend(plan.decode_seq_ids)
    req.decode_start_pos.extend(plan.decode_start_pos)
    return req


def plan_from_proto(p: worker_pb2.StepRequest) -> StepPlan:
    seqs = []
    for s in p.seqs:
        init = None
        if s.HasField("init"):
            i = s.init
            init = SeqInit(
                tuple(mm_item_from_proto(m) for m in i.mm_items),
                sampling_from_proto(i.sampling),
                i.num_prompt_tokens,
                tuple(i.prompt_token_ids),
                tuple(i.output_token_ids),
                tuple(i.encoder_page_ids),
            )
        seqs.append(
            SeqStep(
                s.seq_id,
                s.start_pos,
                tuple(s.input_ids),
                s.sample,
                s.page_table_start,
                tuple(s.page_ids),
                init,
                s.logprob_row_start,
                tuple(s.logprob_targets),
            )
        )
    if p.page_decode_seq_ids:
        columns = (
            p.page_decode_seq_ids,
            p.page_decode_start_pos,
            p.page_decode_table_start,
            p.page_decode_page_ids,
        )
        seqs.extend(
            SeqStep(sid, pos, (), True, table_start, (page,))
            for sid, pos, table_start, page in zip(*columns, strict=True)
        )
    seqs.extend(SeqStep(sid, pos) for sid, pos in zip(p.decode_seq_ids, p.decode_start_pos, strict=True))
    return StepPlan(
        p.step_id,
        tuple(seqs),
        tuple(p.free_seq_ids),
        p.sent_unix_ns,
        tuple(p.prefetch_keys),
        prefetch_leases=tuple(lease_from_proto(x) for x in p.prefetch_leases),
        mask_seq_ids=tuple(p.mask_seq_ids),
        token_bitmask=p.token_bitmask,
    )


def step_output_to_proto(o: StepOutput) -> worker_pb2.StepResult:
    """Tokens without logprobs (a logprob of 0 and no alternatives reads back the same) go in the columns."""
    msg = worker_pb2.StepResult(
        step_id=o.step_id,
        failures=[
            worker_pb2.SequenceFailure(seq_id=f.seq_id, reason=_FAILURE[f.reason], message=f.message)
            for f in o.failures
        ],
        num_tokens=o.num_tokens,
        prepare_ns=o.prepare_ns,
        forward_ns=o.forward_ns,
        start_unix_ns=o.start_unix_ns,
        end_unix_ns=o.end_unix_ns,
        sampled_seq_ids=o.sampled_seq_ids,
        sampled_token_ids=o.sampled_token_ids,
    )
    plain = [r for r in o.results if not r.logprob and not r.top_logprobs]
    msg.sampled_seq_ids.extend([r.seq_id for r in plain])
    msg.sampled_token_ids.extend([r.token_id for r in plain])
    if len(plain) < len(o.results):
        add = msg.results.add
        for r in o.results:
            if r.logprob or r.top_logprobs:
                m = add(seq_id=r.seq_id, token_id=r.token_id, logprob=r.logprob)
                for t, v in r.top_logprobs:
                    m.top_logprobs.add(token_id=t, logprob=v)
    for p in o.prompt_logprobs:
        m = msg.prompt_logprobs.add(seq_id=p.seq_id, logprobs=p.logprobs)
        if p.top_logprobs:
            m.num_top = len(p.top_logprobs[0])
            m.top_token_ids.extend(t for row in p.top_logprobs for t, _ in row)
            m.top_logprobs.extend(v for row in p.top_logprobs for _, v in row)
    return msg


def _prompt_logprobs_from_proto(p: worker_pb2.PromptLogprobs) -> PromptLogprobs:
    k, ids, values = p.num_top, list(p.top_token_ids), list(p.top_logprobs)
    top = tuple(
        tuple(zip(ids[i * k : (i + 1) * k], values[i * k : (i + 1) * k], strict=True))
        for i in range(len(p.logprobs))
    )
    return PromptLogprobs(p.seq_id, tuple(p.logprobs), top if k else ())


def step_output_from_proto(p: worker_pb2.StepResult) -> StepOutput:
    # read once a step: repeated fields copied by slicing (one C call, not one per item), empty ones not iterated
    return StepOutput(
        step_id=p.step_id,
        results=tuple(
            SeqResult(r.seq_id, r.token_id, r.logprob, tuple((t.token_id, t.logprob) for t in r.top_logprobs))
            for r in p.results
        )
        if p.results
        else (),
        failures=tuple(
            SeqFailure(f.seq_id, _FAILURE_BACK.get(f.reason, "internal"), f.message) for f in p.failures
        )
        if p.failures
        else (),
        num_tokens=p.num_tokens,
        prepare_ns=p.prepare_ns,
        forward_ns=p.forward_ns,
        start_unix_ns=p.start_unix_ns,
        end_unix_ns=p.end_unix_ns,
        sampled_seq_ids=tuple(p.sampled_seq_ids[:]),
        sampled_token_ids=tuple(p.sampled_token_ids[:]),
        prompt_logprobs=tuple(_prompt_logprobs_from_proto(x) for x in p.prompt_logprobs)
        if p.prompt_logprobs
        else (),
    )


def worker_info_to_proto(w: WorkerInfo) -> worker_pb2.WorkerInfo:
    return worker_pb2.WorkerInfo(**asdict(w))


def worker_info_from_proto(p: worker_pb2.WorkerInfo) -> WorkerInfo:
    return WorkerInfo(
        p.architecture,
        p.num_pages,
        p.page_size,
        p.context_length,
        p.vocab_size,
        p.dtype,
        p.device,
        p.tp_rank,
        p.tp_size,
        p.kv_cache_bytes,
        p.attention_backend,
        p.max_running_requests,
        p.embedding_transport,
        p.epoch,
        p.num_encoder_pages,
        p.encoder_page_tokens,
        p.step_socket,
    )


def worker_info_json(w: WorkerInfo) -> str:
    return json.dumps(asdict(w))


def encoded_from_proto(p: vision_pb2.EncodedItem) -> EncodedItem:
    return EncodedItem(p.content_key, p.num_tokens, p.cache_hit, p.encode_ns)


def encoded_to_proto(e: EncodedItem) -> vision_pb2.EncodedItem:
    return vision_pb2.EncodedItem(
        content_key=e.content_key, num_tokens=e.num_tokens, cache_hit=e.cache_hit, encode_ns=e.encode_ns
    )


def location_to_proto(loc: EmbeddingLocation) -> common_pb2.EmbeddingLocation:
    return common_pb2.EmbeddingLocation(
        content_key=loc.content_key, page_ids=loc.page_ids, num_rows=loc.num_rows, ready_event=loc.ready_event
    )


def location_from_proto(p: common_pb2.EmbeddingLocation) -> EmbeddingLocation:
    return EmbeddingLocation(p.content_key, tuple(p.page_ids), p.num_rows, p.ready_event)


def lease_to_proto(lease: EmbeddingLease) -> common_pb2.EmbeddingLease:
    return common_pb2.EmbeddingLease(
        pool_id=lease.pool_id,
        lease_id=lease.lease_id,
        locations=[location_to_proto(loc) for loc in lease.locations],
    )


def lease_from_proto(p: common_pb2.EmbeddingLease) -> EmbeddingLease:
    return EmbeddingLease(
        p.pool_id,
        p.lease_id,
        tuple(location_from_proto(x) for x in p.locations),
    )
