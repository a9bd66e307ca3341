"""SGLang's native /generate: one prompt or a batch (`text` as a list, `input_ids` as a list of lists), served as
text completions and answered in SGLang's shape (`text`, `output_ids`, `meta_info`)."""

from __future__ import annotations

import asyncio
import json
from collections.abc import AsyncIterator
from dataclasses import replace
from typing import Any

from common.errors import InvalidRequestError, MiradorError
from common.types import GenerateOutput, GenerateRequest, TokenLogprob
from gateway.errors import sse_error
from gateway.protocol import GenerateBody
from gateway.serving import OpenAIServing
from processor.tokenizer import Tokenizer


async def generate(serving: OpenAIServing, body: GenerateBody) -> dict[str, Any] | list | AsyncIterator[str]:
    req = body.to_completion(serving.card.served_name)
    images = [req.image_data] if isinstance(req.image_data, str) else list(req.image_data or [])
    prompts = req.prompts
    if len(prompts) > 1 and images:
        raise InvalidRequestError("a batch of prompts cannot carry images", param="image_data")
    param = "text" if body.text is not None else "input_ids"
    built = [await serving.builder.from_prompt(p, images, param) for p in prompts]
    start = body.logprob_start_len if body.return_logprob else -1
    try:
        greqs = [  # one id per prompt (the request's, then -1, -2 ...), so the scheduler can tell them apart
            serving._build(req, b, body.return_logprob, body.top_logprobs_num, body.stream, k, start)
            for k, b in enumerate(built)
        ]
    except InvalidRequestError as e:  # named as the caller wrote it: sampling_params.stop_token_ids
        if e.param:
            e.param = body.sglang_param(e.param)
        raise
    batch = body.is_batch
    if body.zero_new_tokens and any(g.prompt_logprob_from is not None for g in greqs):
        # scoring prompts: the prefill runs and nothing is generated
        greqs = [replace(g, stopping=replace(g.stopping, max_new_tokens=0, min_new_tokens=0)) for g in greqs]
    elif body.zero_new_tokens:  # nothing to generate or score: the prompt's counts, as SGLang answers
        outs = [
            _answer(body, g, k * req.n, _Choice(finish="length"), serving.tokenizer)
            for k, g in enumerate(greqs)
        ]
        if body.stream:
            return _events(outs)
        return outs if batch else outs[0]
    if body.stream:
        return _stream(body, greqs, await serving._started_all(greqs), serving.tokenizer)
    results = await asyncio.gather(*(_collect(serving, g) for g in greqs))
    outs = [
        _answer(body, greqs[k], k * req.n + i, c, serving.tokenizer)
        for k, per in enumerate(results)
        for i, c in sorted(per.items())
    ]
    return outs if batch or len(outs) > 1 else outs[0]


class _Choice:
    """One choice's result so far."""

    def __init__(self, finish: str | None = None):
        self.text = ""
        self.ids: list[int] = []
        self.logprobs: list[TokenLogprob] = []
        self.prompt_logprobs: list[TokenLogprob] = []
        self.finish = finish
        self.matched: str | int | None = None
        self.prompt = self.completion = self.cached = 0

    def add(self, out: GenerateOutput) -> None:
        self.text += out.text
        self.ids.extend(out.token_ids)
        self.logprobs.extend(out.logprobs)
        if out.prompt_logprobs:
            self.prompt_logprobs = out.prompt_logprobs
        if out.finish_reason is not None:
            self.finish, self.matched = out.finish_reason, out.matched_stop
            self.prompt, self.completion, self.cached = (
                out.prompt_tokens,
                out.completion_tokens,
                out.cached_tokens,
            )


async def _collect(serving: OpenAIServing, greq: GenerateRequest) -> dict[int, _Choice]:
    choices: dict[int, _Choice] = {}
    async for out in serving._generate(greq):
        choices.setdefault(out.index, _Choice()).add(out)
    return choices


def _answer(
    body: GenerateBody, greq: GenerateRequest, index: int, c: _Choice, tokenizer: Tokenizer
) -> dict[str, Any]:
    meta: dict[str, Any] = {
        "id": greq.request_id,
        "prompt_tokens": c.prompt or len(greq.input_ids),
        "completion_tokens": c.completion if c.finish is not None else len(c.ids),
        "cached_tokens": c.cached,
        "finish_reason": None,
    }
    if c.finish is not None:
        fr: dict[str, Any] = {"type": c.finish}
        if c.finish == "length":
            fr["length"] = c.completion
        if c.matched is not None:
            fr["matched"] = c.matched
        meta["finish_reason"] = fr
    if body.return_logprob:
        text = tokenizer.token_text if body.return_text_in_logprobs else lambda _: None
        meta["output_token_logprobs"] = [[lp.logprob, lp.token_id, text(lp.token_id)] for lp in c.logprobs]
        meta["output_top_logprobs"] = [[[v, t, text(t)] for t, v in lp.top_logprobs] for lp in c.logprobs]
        if body.logprob_start_len >= 0:  # positions logprob_start_len .. the prompt's end; 0 has none
            first = greq.input_ids[:1] if body.logprob_start_len == 0 else ()
            inputs = [[None, t, text(t)] for t in first]
            inputs += [[lp.logprob, lp.token_id, text(lp.token_id)] for lp in c.prompt_logprobs]
            meta["input_token_logprobs"] = inputs
            tops = [None for _ in first]
            tops += [[[v, t, text(t)] for t, v in lp.top_logprobs] for lp in c.prompt_logprobs]
            meta["input_top_logprobs"] = tops
    return {"text": c.text, "output_ids": c.ids, "index": index, "meta_info": meta}


async def _events(answers: list[dict[str, Any]]) -> AsyncIterator[str]:
    for a in answers:
        yield f"data: {json.dumps(a, ensure_ascii=False)}\n\n"
    yield "data: [DONE]\n\n"


async def _stream(
    body: GenerateBody,
    greqs: list[GenerateRequest],
    outs: AsyncIterator[tuple[int, GenerateOutput]],
    tokenizer: Tokenizer,
) -> AsyncIterator[str]:
    """Each event holds its choice's whole text so far (SGLang's shape); `index` is prompt x n + choice."""
    n = greqs[0].n
    choices: dict[int, _Choice] = {}
    try:
        async for k, out in outs:
            index = k * n + out.index
            c = choices.setdefault(index, _Choice())
            c.add(out)
            yield f"data: {json.dumps(_answer(body, greqs[k], index, c, tokenizer), ensure_ascii=False)}\n\n"
    except MiradorError as e:
        yield sse_error(e)
    yield "data: [DONE]\n\n"
