"""Turns validated OpenAI / SGLang requests into scheduler requests and scheduler outputs into OpenAI responses
(JSON or server-sent events)."""

from __future__ import annotations

import asyncio
import json
import logging
import time
import uuid
from collections.abc import AsyncIterator
from dataclasses import dataclass
from typing import Any

from common.errors import InvalidRequestError, MiradorError, NotFoundError
from common.log import request_id_var
from common.types import GenerateOutput, GenerateRequest, TokenLogprob
from gateway.errors import sse_error
from gateway.metrics import GatewayMetrics
from gateway.protocol import ChatCompletionRequest, CompletionRequest, GenerateBody, SamplingRequest
from gateway.request_context import arrival_var
from processor import sampling
from processor.request_builder import PreparedPrompt, RequestBuilder
from scheduler_svc.client import SchedulerClient

logger = logging.getLogger(__name__)


def _chunker(rid: str, obj: str, created: int, req: SamplingRequest):
    """Formats one SSE event of a stream; usage is carried (null until the end) only with include_usage."""
    with_usage = bool(req.stream_options and req.stream_options.include_usage)
    # the fields every event repeats are encoded once per stream; an event encodes only its choices (and usage)
    head = json.dumps({"id": rid, "object": obj, "created": created, "model": req.model}, ensure_ascii=False)
    prefix = f'data: {head[:-1]}, "choices": '

    def chunk(choices: list[dict[str, Any]], usage: dict[str, Any] | None = None) -> str:
        body = json.dumps(choices, ensure_ascii=False)
        if with_usage:
            return f'{prefix}{body}, "usage": {json.dumps(usage, ensure_ascii=False)}}}\n\n'
        return f"{prefix}{body}}}\n\n"

    suffix = ', "usage": null}\n\n' if with_usage else "}\n\n"

    def delta(template: str, index: int, text: str) -> str:
        """The event of a plain text delta (no logprobs, not the last): what `chunk` writes for it, from a
        template, with only the text encoded (most events of a stream are these)."""
        return prefix + template % (index, json.dumps(text, ensure_ascii=False)) + suffix

    chunk.delta = delta
    return chunk


# the choices of a plain text delta, as json.dumps writes them (tests/test_openai_params.py checks they agree)
CHAT_DELTA = '[{"index": %d, "delta": {"content": %s}, "logprobs": null, "finish_reason": null}]'
TEXT_DELTA = '[{"index": %d, "text": %s, "logprobs": null, "finish_reason": null, "matched_stop": null}]'


@dataclass
class ModelCard:
    served_name: str
    model_path: str
    context_length: int
    eos_token_ids: tuple[int, ...]
    generation_defaults: dict[str, Any]


class OpenAIServing:
    def __init__(
        self,
        builder: RequestBuilder,
        scheduler: SchedulerClient,
        card: ModelCard,
        max_images: int,
        metrics: GatewayMetrics | None = None,
    ):
        self.metrics = metrics or GatewayMetrics(card.served_name)
        self.builder = builder
        self.tokenizer = builder.tokenizer
        self.scheduler = scheduler
        self.card = card
        self.max_images = max_images

    # ---- shared ----

    def check_model(self, name: str) -> None:
        if name not in (self.card.served_name, self.card.model_path):
            raise NotFoundError(
                f"The model `{name}` does not exist; this server serves `{self.card.served_name}`",
                param="model",
                code="model_not_found",
            )

    def _log_unknown(self, req: SamplingRequest) -> None:
        if req.unknown_fields:
            logger.warning("ignoring unknown request fields: %s", ", ".join(req.unknown_fields))

    def _build(
        self,
        req: SamplingRequest,
        prompt: PreparedPrompt,
        return_logprob: bool,
        top_logprobs: int,
        stream: bool,
        index: int = 0,
    ) -> GenerateRequest:
        if len(prompt.mm_items) > self.max_images:
            raise InvalidRequestError(f"at most {self.max_images} images per request", param="messages")
        max_new = sampling.max_new_tokens_for(
            req.requested_max_tokens, len(prompt.input_ids), self.card.context_length
        )
        params, stopping = req.to_params(
            defaults=self.card.generation_defaults,
            eos_ids=self.card.eos_token_ids,
            max_new_tokens=max_new,
            return_logprob=return_logprob,
            top_logprobs=top_logprobs,
        )
        return GenerateRequest(
            request_id=self._request_id(req, index),
            input_ids=tuple(prompt.input_ids),
            mm_items=tuple(prompt.mm_items),
            sampling=params,
            stopping=stopping,
            n=req.n,
            stream=stream,
        )

    @staticmethod
    def _request_id(req: SamplingRequest, index: int) -> str:
        """SGLang's `rid` when the body names one, else the HTTP request's id (X-Request-Id); the prompts of one
        completions request after the first get `-<i>`."""
        base = req.rid or request_id_var.get() or uuid.uuid4().hex
        return f"{base}-{index}" if index else base

    def _generate(self, greq: GenerateRequest) -> AsyncIterator[GenerateOutput]:
        arrival = arrival_var.get() or time.perf_counter()
        return self.metrics.track(self.scheduler.generate(greq), arrival, greq.stream)

    def _logprobs_chat(self, lps: list[TokenLogprob]) -> list[dict[str, Any]]:
        def entry(tid: int, lp: float) -> dict[str, Any]:
            raw = self.tokenizer.token_bytes(tid)
            return {"token": raw.decode("utf-8", errors="replace"), "logprob": lp, "bytes": list(raw)}

        return [
            {**entry(lp.token_id, lp.logprob), "top_logprobs": [entry(t, v) for t, v in lp.top_logprobs]}
            for lp in lps
        ]

    @staticmethod
    def _usage(prompt_tokens: int, completion: int, cached: int) -> dict[str, Any]:
        return {
            "prompt_tokens": prompt_tokens,
            "completion_tokens": completion,
            "total_tokens": prompt_tokens + completion,
            "prompt_tokens_details": {"cached_tokens": cached},
        }

    async def _started(self, greq: GenerateRequest) -> AsyncIterator[GenerateOutput]:
        """A streamed request's outputs, once the first has come: whatever fails before the first token (a
        prompt the scheduler refuses, an image the vision service cannot decode) is an HTTP error in OpenAI's
        shape, not a 200 stream that ends in an error event. Clients see nothing sooner either way."""
        outs = self._generate(greq)
        try:
            first = await anext(outs)
        except StopAsyncIteration:
            first = None
        except BaseException:
            await outs.aclose()
            raise

        async def rest() -> AsyncIterator[GenerateOutput]:
            try:
                if first is not None:
                    yield first
                async for out in outs:
                    yield out
            finally:
                await outs.aclose()

        return rest()

    # ---- chat ----

    async def chat(self, req: ChatCompletionRequest) -> dict[str, Any] | AsyncIterator[str]:
        self.check_model(req.model)
        self._log_unknown(req)
        prompt = await self.builder.from_messages(
            req.messages,
            add_generation_prompt=req.add_generation_prompt,
            chat_template_kwargs=req.chat_template_kwargs,
        )
        greq = self._build(req, prompt, req.logprobs, req.top_logprobs or 0, stream=req.stream)
        rid, created = f"chatcmpl-{greq.request_id}", int(time.time())
        if req.stream:
            return self._chat_stream(req, await self._started(greq), rid, created)
        choices = await self._collect(greq)
        first = next(iter(choices.values()))
        usage = [first["prompt"], sum(c["completion"] for c in choices.values()), first["cached"]]
        body = {
            "id": rid,
            "object": "chat.completion",
            "created": created,
            "model": req.model,
            "choices": [
                {
                    "index": i,
                    "message": {"role": "assistant", "content": c["text"]},
                    "logprobs": {"content": self._logprobs_chat(c["logprobs"])} if req.logprobs else None,
                    "finish_reason": c["finish"],
                    "matched_stop": c["stop"],
                    **({"token_ids": c["ids"]} if req.return_token_ids else {}),
                }
                for i, c in sorted(choices.items())
            ],
            "usage": self._usage(*usage),
        }
        if req.return_token_ids:
            body["prompt_token_ids"] = list(greq.input_ids)
        return body

    async def _chat_stream(
        self, req: ChatCompletionRequest, outs: AsyncIterator[GenerateOutput], rid: str, created: int
    ) -> AsyncIterator[str]:
        chunk = _chunker(rid, "chat.completion.chunk", created, req)

        started: set[int] = set()
        totals = [0, 0, 0]
        try:
            async for out in outs:
                i = out.index
                if i not in started:
                    started.add(i)
                    yield chunk(
                        [
                            {
                                "index": i,
                                "delta": {"role": "assistant", "content": ""},
                                "logprobs": None,
                                "finish_reason": None,
                            }
                        ]
                    )
                if (out.text or out.logprobs) and not req.logprobs:
                    yield chunk.delta(CHAT_DELTA, i, out.text)
                elif out.text or out.logprobs:
                    lp = {"content": self._logprobs_chat(out.logprobs)}
                    yield chunk(
                        [{"index": i, "delta": {"content": out.text}, "logprobs": lp, "finish_reason": None}]
                    )
                if out.finish_reason is not None:
                    totals = [
                        out.prompt_tokens,
                        totals[1] + out.completion_tokens,
                        max(totals[2], out.cached_tokens),
                    ]
                    yield chunk(
                        [
                            {
                                "index": i,
                                "delta": {},
                                "logprobs": None,
                                "finish_reason": out.finish_reason,
                                "matched_stop": out.matched_stop,
                            }
                        ]
                    )
            if req.stream_options and req.stream_options.include_usage:
                yield chunk([], self._usage(*totals))
        except MiradorError as e:
            yield sse_error(e)
        yield "data: [DONE]\n\n"

    # ---- text completions ----

    async def completions(self, req: CompletionRequest) -> dict[str, Any] | AsyncIterator[str]:
        self.check_model(req.model)
        self._log_unknown(req)
        images = [req.image_data] if isinstance(req.image_data, str) else list(req.image_data or [])
        prompts = req.prompts
        if len(prompts) > 1 and (req.stream or images):
            raise InvalidRequestError(
                "several prompts in one request cannot stream or carry images", param="prompt"
            )
        built = [await self.builder.from_prompt(p, images) for p in prompts]
        n_lp = req.logprobs or 0
        greqs = [
            self._build(req, b, req.logprobs is not None, n_lp, stream=req.stream, index=i)
            for i, b in enumerate(built)
        ]
        rid, created = f"cmpl-{greqs[0].request_id}", int(time.time())
        if req.stream:
            return self._completion_stream(req, await self._started(greqs[0]), rid, created)
        results = await asyncio.gather(*(self._collect(g) for g in greqs))
        choices, usage = [], [0, 0, 0]
        for k, per_choice in enumerate(results):
            for i, c in sorted(per_choice.items()):
                choices.append(
                    {
                        "index": k * req.n + i,
                        "text": c["text"],
                        "logprobs": self._logprobs_text(c["logprobs"]) if req.logprobs is not None else None,
                        "finish_reason": c["finish"],
                        "matched_stop": c["stop"],
                        **(
                            {"token_ids": c["ids"], "prompt_token_ids": list(greqs[k].input_ids)}
                            if req.return_token_ids
                            else {}
                        ),
                    }
                )
                usage[1] += c["completion"]
            first = next(iter(per_choice.values()))
            usage[0] += first["prompt"]
            usage[2] += first["cached"]
        return {
            "id": rid,
            "object": "text_completion",
            "created": created,
            "model": req.model,
            "choices": choices,
            "usage": self._usage(*usage),
        }

    async def _collect(self, greq: GenerateRequest) -> dict[int, dict[str, Any]]:
        choices: dict[int, dict[str, Any]] = {}
        async for out in self._generate(greq):
            c = choices.setdefault(
                out.index, {"text": "", "logprobs": [], "ids": [], "finish": None, "stop": None}
            )
            c["text"] += out.text
            c["ids"].extend(out.token_ids)
            c["logprobs"].extend(out.logprobs)
            if out.finish_reason is not None:
                c.update(
                    finish=out.finish_reason,
                    stop=out.matched_stop,
                    prompt=out.prompt_tokens,
                    completion=out.completion_tokens,
                    cached=out.cached_tokens,
                )
        return choices

    def _logprobs_text(self, lps: list[TokenLogprob]) -> dict[str, Any]:
        tokens = [self.tokenizer.token_bytes(lp.token_id).decode("utf-8", errors="replace") for lp in lps]
        return {
            "tokens": tokens,
            "token_logprobs": [lp.logprob for lp in lps],
            "top_logprobs": [
                {
                    self.tokenizer.token_bytes(t).decode("utf-8", errors="replace"): v
                    for t, v in lp.top_logprobs
                }
                for lp in lps
            ],
            "text_offset": [sum(len(t) for t in tokens[:i]) for i in range(len(tokens))],
        }

    async def _completion_stream(
        self, req: CompletionRequest, outs: AsyncIterator[GenerateOutput], rid: str, created: int
    ) -> AsyncIterator[str]:
        chunk = _chunker(rid, "text_completion", created, req)

        totals = [0, 0, 0]
        try:
            async for out in outs:
                lp = self._logprobs_text(out.logprobs) if req.logprobs is not None else None
                if lp is None and out.finish_reason is None and out.matched_stop is None:
                    if out.text:
                        yield chunk.delta(TEXT_DELTA, out.index, out.text)
                elif out.text or out.logprobs or out.finish_reason is not None:
                    yield chunk(
                        [
                            {
                                "index": out.index,
                                "text": out.text,
                                "logprobs": lp,
                                "finish_reason": out.finish_reason,
                                "matched_stop": out.matched_stop,
                            }
                        ]
                    )
                if out.finish_reason is not None:
                    totals = [
                        out.prompt_tokens,
                        totals[1] + out.completion_tokens,
                        max(totals[2], out.cached_tokens),
                    ]
            if req.stream_options and req.stream_options.include_usage:
                yield chunk([], self._usage(*totals))
        except MiradorError as e:
            yield sse_error(e)
        yield "data: [DONE]\n\n"

    # ---- SGLang's native /generate ----

    async def generate_native(self, body: GenerateBody) -> dict[str, Any] | AsyncIterator[str]:
        req = body.to_completion(self.card.served_name)
        images = [req.image_data] if isinstance(req.image_data, str) else list(req.image_data or [])
        prompt = await self.builder.from_prompt(req.prompts[0], images, "input_ids")
        greq = self._build(req, prompt, body.return_logprob, body.top_logprobs_num, stream=body.stream)

        def meta(out: GenerateOutput, text_len: int, lps: list[TokenLogprob]) -> dict[str, Any]:
            m: dict[str, Any] = {
                "id": greq.request_id,
                "prompt_tokens": out.prompt_tokens or len(greq.input_ids),
                "completion_tokens": out.completion_tokens,
                "cached_tokens": out.cached_tokens,
                "finish_reason": None,
            }
            if out.finish_reason is not None:
                fr: dict[str, Any] = {"type": out.finish_reason}
                if out.finish_reason == "length":
                    fr["length"] = out.completion_tokens
                if out.matched_stop is not None:
                    fr["matched"] = out.matched_stop
                m["finish_reason"] = fr
            if body.return_logprob:
                m["output_token_logprobs"] = [[lp.logprob, lp.token_id, None] for lp in lps]
                m["output_top_logprobs"] = [[[v, t, None] for t, v in lp.top_logprobs] for lp in lps]
            return m

        if body.stream:
            outs = await self._started(greq)

            async def stream() -> AsyncIterator[str]:
                texts: dict[int, str] = {}
                ids: dict[int, list[int]] = {}
                lps: dict[int, list[TokenLogprob]] = {}
                try:
                    async for out in outs:
                        texts[out.index] = texts.get(out.index, "") + out.text
                        ids.setdefault(out.index, []).extend(out.token_ids)
                        lps.setdefault(out.index, []).extend(out.logprobs)
                        body_ = {
                            "text": texts[out.index],
                            "output_ids": ids[out.index],
                            "index": out.index,
                            "meta_info": meta(out, len(texts[out.index]), lps[out.index]),
                        }
                        yield f"data: {json.dumps(body_, ensure_ascii=False)}\n\n"
                except MiradorError as e:
                    yield sse_error(e)
                yield "data: [DONE]\n\n"

            return stream()
        results = await self._collect(greq)
        outs = []
        for i, c in sorted(results.items()):
            fake = GenerateOutput(
                greq.request_id,
                i,
                finish_reason=c["finish"],
                matched_stop=c["stop"],
                prompt_tokens=c["prompt"],
                completion_tokens=c["completion"],
                cached_tokens=c["cached"],
            )
            outs.append(
                {
                    "text": c["text"],
                    "output_ids": c["ids"],
                    "index": i,
                    "meta_info": meta(fake, len(c["text"]), c["logprobs"]),
                }
            )
        return outs[0] if len(outs) == 1 else outs
