"""Turns validated OpenAI / SGLang requests into scheduler requests and scheduler outputs into OpenAI responses
(JSON or server-sent events)."""

from __future__ import annotations

import asyncio
import json
import logging
import time
import uuid
from collections.abc import AsyncIterator
from dataclasses import dataclass, replace
from typing import Any

from common.errors import InvalidRequestError, MiradorError, NotFoundError
from common.log import request_id_var
from common.types import Constraint, GenerateOutput, GenerateRequest, TokenLogprob
from gateway import tool_calls
from gateway.errors import sse_error
from gateway.metrics import GatewayMetrics, RequestTimer
from gateway.protocol import ChatCompletionRequest, CompletionRequest, SamplingRequest
from gateway.request_context import arrival_var
from processor import sampling
from processor.media import image_data_uri
from processor.request_builder import PreparedPrompt, RequestBuilder
from processor.tool_parsers import ToolCallStream, ToolParser
from processor.tools import tool_call_grammar
from scheduler_svc.client import SchedulerClient

logger = logging.getLogger(__name__)

# json.dumps(x, ensure_ascii=False) without building a JSONEncoder per call (0.8 us, then 0.1 us to encode a delta's
# text): the same output, for every event of every stream
_dumps = json.JSONEncoder(ensure_ascii=False).encode


def _chunker(rid: str, obj: str, created: int, req: SamplingRequest):
    """Formats one SSE event of a stream; usage is carried (null until the end) only with include_usage or
    continuous_usage_stats (then every event carries the counts so far, and `chunk` writes them all)."""
    opts = req.stream_options
    with_usage = bool(opts and (opts.include_usage or opts.continuous_usage_stats))
    # the fields every event repeats are encoded once per stream; an event encodes only its choices (and usage)
    head = _dumps({"id": rid, "object": obj, "created": created, "model": req.model})
    prefix = f'data: {head[:-1]}, "choices": '

    def chunk(
        choices: list[dict[str, Any]],
        usage: dict[str, Any] | None = None,
        extra: dict[str, Any] | None = None,
    ) -> str:
        body = _dumps(choices)
        tail = ", " + _dumps(extra)[1:-1] if extra else ""
        if with_usage:
            return f'{prefix}{body}, "usage": {_dumps(usage)}{tail}}}\n\n'
        return f"{prefix}{body}{tail}}}\n\n"

    suffix = ', "usage": null}\n\n' if with_usage else "}\n\n"

    def delta(template: str, index: int, text: str, counts: tuple[int, int, int] | None = None) -> str:
        """The event of a plain text delta (no logprobs, not the last): what `chunk` writes for it, from a
        template, with only the text encoded (most events of a stream are these). `counts` (prompt, completion,
        cached) is the usage so far that continuous_usage_stats puts on every event."""
        text = template % (index, _dumps(text))
        if counts is None:
            return prefix + text + suffix
        prompt, completion, cached = counts
        return prefix + text + USAGE_SUFFIX % (prompt, completion, prompt + completion, cached)

    chunk.delta = delta
    return chunk


class _StreamUsage:
    """A stream's token counts: the scheduler's exact ones for each finished choice, the ids seen so far for the
    others (what continuous_usage_stats reports on every event). Kept as running totals: `counts` is read for
    every event of such a stream."""

    def __init__(self, greqs: list[GenerateRequest]):
        self.prompt = sum(len(g.input_ids) for g in greqs)
        self.seen: dict[tuple[int, int], int] = {}
        self.completion = 0  # the finished choices' exact counts plus the ids seen of the others
        self.cached: dict[int, int] = {}
        self.cached_total = 0
        self.first_sent: set[int] = set()  # choices whose prompt_token_ids went out (return_token_ids)

    @staticmethod
    def continuous(req: SamplingRequest) -> bool:
        return bool(req.stream_options and req.stream_options.continuous_usage_stats)

    def add(self, k: int, out: GenerateOutput) -> None:
        n = len(out.token_ids)
        if out.finish_reason is None:
            if n:
                key = (k, out.index)
                self.seen[key] = self.seen.get(key, 0) + n
                self.completion += n
            return
        # the choice's exact count replaces the ids counted so far (a finish may carry the last ids too)
        self.completion += out.completion_tokens - self.seen.pop((k, out.index), 0)
        cached = max(self.cached.get(k, 0), out.cached_tokens)
        self.cached_total += cached - self.cached.get(k, 0)
        self.cached[k] = cached

    def counts(self) -> tuple[int, int, int]:
        """(prompt, completion, cached) tokens so far."""
        return self.prompt, self.completion, self.cached_total

    def total(self) -> dict[str, Any]:
        return OpenAIServing._usage(*self.counts())

    def now(self, req: SamplingRequest) -> dict[str, Any] | None:
        """The usage an event carries: the counts so far with continuous_usage_stats, else null."""
        return self.total() if self.continuous(req) else None


DEFAULT_COMPLETION_MAX_TOKENS = 16  # OpenAI's, SGLang's and vLLM's default for /v1/completions
# the choices of a plain text delta, as json.dumps writes them (tests/test_openai_params.py checks they agree)
CHAT_DELTA = '[{"index": %d, "delta": {"content": %s}, "logprobs": null, "finish_reason": null}]'
TEXT_DELTA = '[{"index": %d, "text": %s, "logprobs": null, "finish_reason": null, "matched_stop": null}]'
# OpenAIServing._usage as json.dumps writes it, closing the event (continuous_usage_stats on a plain delta)
USAGE_SUFFIX = (
    ', "usage": {"prompt_tokens": %d, "completion_tokens": %d, "total_tokens": %d, '
    '"prompt_tokens_details": {"cached_tokens": %d}}}\n\n'
)


async def _tagged(
    first: GenerateOutput | None,
    rest: AsyncIterator[GenerateOutput],
    k: int | None = 0,
    timer: RequestTimer | None = None,
) -> AsyncIterator[Any]:
    """A started request's outputs, its first (already read and timed) then the rest, as `(k, output)` pairs the
    way `_merge` gives several, or bare with `k=None`; `timer` times the rest here. One generator per token on
    the hot path, not two."""
    try:
        if first is not None:
            yield first if k is None else (k, first)
        async for out in rest:
            if timer is not None:
                timer.output(len(out.token_ids))
            yield out if k is None else (k, out)
        if timer is not None:
            timer.end()
    finally:
        if timer is not None:
            timer.flush()
        await rest.aclose()


async def _merge(streams: list[AsyncIterator[GenerateOutput]]) -> AsyncIterator[tuple[int, GenerateOutput]]:
    """Outputs of several streams in arrival order, tagged with their stream's position; the first error ends
    all of them (each closed, so the scheduler aborts what still runs)."""
    queue: asyncio.Queue = asyncio.Queue()

    async def pump(k: int, stream: AsyncIterator[GenerateOutput]) -> None:
        try:
            async for out in stream:
                queue.put_nowait((k, out))
        except Exception as e:  # noqa: BLE001 - handed to the consumer, which raises it
            queue.put_nowait((k, e))
            return
        queue.put_nowait((k, None))

    tasks = [asyncio.create_task(pump(k, s)) for k, s in enumerate(streams)]
    try:
        left = len(tasks)
        while left:
            k, item = await queue.get()
            if item is None:
                left -= 1
            elif isinstance(item, Exception):
                raise item
            else:
                yield k, item
    finally:
        for t in tasks:
            t.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)
        for stream in streams:
            await stream.aclose()


def _warmup_image_uri(size: int = 448) -> str:
    """A noise JPEG as a data URI: the common image size of a chat request, content the decoder has to work on."""
    from PIL import Image

    return image_data_uri(Image.effect_noise((size, size), 48).convert("RGB"), "JPEG", quality=90)


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
        tool_parser: ToolParser | None = None,
    ):
        self.metrics = metrics or GatewayMetrics(card.served_name)
        self.tool_parser = tool_parser
        self.builder = builder
        self.tokenizer = builder.tokenizer
        self.scheduler = scheduler
        self.card = card
        self.max_images = max_images

    # ---- shared ----

    def check_model(self, req: SamplingRequest) -> None:
        """The model asked for is served here; one not named is (both peers default to the served model)."""
        if req.model is None:
            req.model = self.card.served_name
        name = req.model
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
        logprob_start_len: int = -1,
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
            vocab_size=self.builder.config.text.vocab_size,
        )
        return GenerateRequest(
            request_id=self._request_id(req, index),
            input_ids=tuple(prompt.input_ids),
            mm_items=tuple(prompt.mm_items),
            sampling=params,
            stopping=stopping,
            n=req.n,
            stream=stream,
            cache_salt=req.cache_salt or "",
            # at or past the prompt's end there is nothing to score (and 2**33 would not fit the proto's int32)
            logprob_start_len=logprob_start_len if logprob_start_len < len(prompt.input_ids) else -1,
            constraint=req.constraint,
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

    async def _started(
        self, greq: GenerateRequest
    ) -> tuple[GenerateOutput | None, AsyncIterator[GenerateOutput], RequestTimer]:
        """A streamed request's first output (None when it ended without one), the rest, and the timer that
        times them (`_tagged` feeds it), once the first has come: whatever fails before the first token (a prompt
        the scheduler refuses, an image the vision service cannot decode) is an HTTP error in OpenAI's shape, not
        a 200 stream that ends in an error event. Clients see nothing sooner either way."""
        timer = self.metrics.timer(arrival_var.get() or time.perf_counter())
        outs = self.scheduler.generate(greq)
        try:
            first = await anext(outs)
        except StopAsyncIteration:
            return None, outs, timer
        except BaseException:
            await outs.aclose()
            raise
        timer.output(len(first.token_ids))
        return first, outs, timer

    async def _started_all(self, greqs: list[GenerateRequest]) -> AsyncIterator[tuple[int, GenerateOutput]]:
        """Several requests' outputs as they come, each tagged with its request's position; all have started
        (an error before any first output is an HTTP error, as in `_started`)."""
        started = await asyncio.gather(*(self._started(g) for g in greqs), return_exceptions=True)
        errors = [e for e in started if isinstance(e, BaseException)]
        if errors:
            for s in started:
                if not isinstance(s, BaseException):
                    await s[1].aclose()
            raise errors[0]
        if len(started) == 1:
            first, rest, timer = started[0]
            return _tagged(first, rest, 0, timer)
        return _merge([_tagged(first, rest, None, timer) for first, rest, timer in started])

    async def warmup(self) -> None:
        """One request through the whole cluster before the gateway reports ready, as SGLang's server warm-up:
        what the services set up lazily on a first request (channels, the JPEG decoder, the first kernels of a
        request's shapes, files the page cache has not seen) is paid here, not by the first user. A 448 x 448
        JPEG rides along when the model takes images and the scheduler has a vision service. It goes straight
        to the scheduler, outside the gateway's metrics; its id and cache salt start with `warmup-`, so nothing it
        leaves in the caches is ever matched (a gateway starting beside others that serve must not flush theirs)."""
        tag = uuid.uuid4().hex
        content: list[dict[str, Any]] = [{"type": "text", "text": "What is in this picture?"}]
        info = await self.scheduler.server_info()
        if self.builder.media_spec is not None and json.loads(info.vision_info_json or "{}"):
            content.insert(0, {"type": "image_url", "image_url": {"url": _warmup_image_uri()}})
        req = ChatCompletionRequest.model_validate(
            {
                "model": self.card.served_name,
                "messages": [{"role": "user", "content": content}],
                "max_tokens": 1,
                "rid": f"warmup-{tag}",
                "cache_salt": f"warmup-{tag}",  # its prefix pages match no user's: no flush needed after it
            }
        )
        prompt = await self.builder.from_messages(req.messages, add_generation_prompt=True)
        async for _ in self.scheduler.generate(self._build(req, prompt, False, 0, stream=False)):
            pass

    # ---- chat ----

    async def chat(self, req: ChatCompletionRequest) -> dict[str, Any] | AsyncIterator[str]:
        self.check_model(req)
        self._log_unknown(req)
        prompt = await self.builder.from_messages(
            req.messages,
            add_generation_prompt=req.add_generation_prompt,
            continue_final_message=req.continue_final_message,
            tools=req.tools,
            chat_template_kwargs=req.chat_template_kwargs,
        )
        parser = self._tool_parser_for(req)
        greq = self._build(req, prompt, req.logprobs, req.top_logprobs or 0, stream=req.stream)
        if parser is not None:
            grammar = tool_call_grammar(
                req.tools, req.resolved_tool_choice, parser.lark_start, parser.lark_end
            )
            greq = self._constrain(greq, grammar)
        rid, created = f"chatcmpl-{greq.request_id}", int(time.time())
        if req.stream:
            return self._chat_stream(req, await self._started_all([greq]), rid, created, greq, parser)
        choices = await self._collect(greq)
        if parser is not None:
            for c in choices.values():
                c["text"], c["calls"], c["finish"] = parser.parse(c["text"], c["finish"])
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
                    "message": tool_calls.message(c["text"], c.get("calls")),
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
        self,
        req: ChatCompletionRequest,
        outs: AsyncIterator[GenerateOutput],
        rid: str,
        created: int,
        greq: GenerateRequest,
        parser: ToolParser | None = None,
    ) -> AsyncIterator[str]:
        chunk = _chunker(rid, "chat.completion.chunk", created, req)
        usage = _StreamUsage([greq])
        plain = not (req.logprobs or req.return_token_ids or parser)
        calls: dict[int, ToolCallStream] = {}  # choice -> its tool call splitter (with a parser)
        continuous = usage.continuous(req)
        started: set[int] = set()
        try:
            async for _, out in outs:
                i = out.index
                if i not in started:
                    started.add(i)
                    first = {"index": i, "delta": {"role": "assistant", "content": ""}}
                    extra = {"prompt_token_ids": list(greq.input_ids)} if req.return_token_ids else None
                    yield chunk([{**first, "logprobs": None, "finish_reason": None}], usage.now(req), extra)
                usage.add(0, out)
                if (out.text or out.logprobs) and plain:
                    yield chunk.delta(CHAT_DELTA, i, out.text, usage.counts() if continuous else None)
                elif parser is not None:
                    for event in self._tool_stream_events(req, calls.setdefault(i, parser.stream()), out):
                        yield chunk([event], usage.now(req))
                    if out.finish_reason is not None:
                        out = replace(out, finish_reason=calls[i].finish_reason)
                elif out.text or out.logprobs or (out.token_ids and req.return_token_ids):
                    lp = {"content": self._logprobs_chat(out.logprobs)} if req.logprobs else None
                    choice = {
                        "index": i,
                        "delta": {"content": out.text},
                        "logprobs": lp,
                        "finish_reason": None,
                    }
                    if req.return_token_ids:
                        choice["token_ids"] = list(out.token_ids)
                    yield chunk([choice], usage.now(req))
                if out.finish_reason is not None:
                    last = {"index": i, "delta": {}, "logprobs": None, "finish_reason": out.finish_reason}
                    yield chunk([{**last, "matched_stop": out.matched_stop}], usage.now(req))
            if req.stream_options and req.stream_options.include_usage:
                yield chunk([], usage.total())
        except MiradorError as e:
            yield sse_error(e)
        yield "data: [DONE]\n\n"

    # ---- tool calls ----

    def _tool_parser_for(self, req: ChatCompletionRequest) -> ToolParser | None:
        """The parser that reads this request's output for calls; None when tool_choice is "none" (or no tools),
        where the output is plain content."""
        if not req.resolved_tool_choice.parses:
            return None
        if self.tool_parser is None:
            raise InvalidRequestError(
                "tool calling needs a tool call parser for this model: start the gateway with --tool-call-parser",
                param="tool_choice",
            )
        return self.tool_parser

    @staticmethod
    def _constrain(greq: GenerateRequest, grammar: tuple[str, str] | None) -> GenerateRequest:
        """The one place where the grammar that forces tool calls ("lark", text) joins the request."""
        if grammar is None:
            return greq
        if greq.constraint is not None:
            raise InvalidRequestError(
                'tool_choice "required" or a named function cannot be combined with response_format, regex, ebnf '
                "or json_schema",
                param="tool_choice",
            )
        return replace(greq, constraint=Constraint(*grammar))

    def _tool_stream_events(
        self, req: ChatCompletionRequest, calls: ToolCallStream, out: GenerateOutput
    ) -> list[dict[str, Any]]:
        """The choices of one output's tool-call stream events; its logprobs and token ids ride on the first
        (an empty delta when the output added nothing yet: a call still open, a held marker)."""
        deltas = tool_calls.stream_deltas(calls, out.text, out.finish_reason)
        if not deltas and (out.logprobs or (out.token_ids and req.return_token_ids)):
            deltas.append({})
        choices = []
        for n, delta in enumerate(deltas):
            choice = {"index": out.index, "delta": delta, "logprobs": None, "finish_reason": None}
            if n == 0 and req.logprobs:
                choice["logprobs"] = {"content": self._logprobs_chat(out.logprobs)}
            if n == 0 and req.return_token_ids:
                choice["token_ids"] = list(out.token_ids)
            choices.append(choice)
        return choices

    # ---- text completions ----

    async def completions(self, req: CompletionRequest) -> dict[str, Any] | AsyncIterator[str]:
        self.check_model(req)
        self._log_unknown(req)
        if req.requested_max_tokens is None:
            req.max_tokens = DEFAULT_COMPLETION_MAX_TOKENS
        images = [req.image_data] if isinstance(req.image_data, str) else list(req.image_data or [])
        prompts = req.prompts
        if len(prompts) > 1 and images:
            raise InvalidRequestError("several prompts in one request cannot carry images", param="prompt")
        built = [await self.builder.from_prompt(p, images) for p in prompts]
        n_lp = req.logprobs or 0
        prompt_lps = 0 if req.echo and req.logprobs is not None else -1  # echo scores the prompt's tokens
        greqs = [
            self._build(req, b, req.logprobs is not None, n_lp, req.stream, i, logprob_start_len=prompt_lps)
            for i, b in enumerate(built)
        ]
        rid, created = f"cmpl-{greqs[0].request_id}", int(time.time())
        echoes = [self._echo(p, b) if req.echo else "" for p, b in zip(prompts, built, strict=True)]
        if req.stream:
            outs = await self._started_all(greqs)
            return self._completion_stream(req, outs, rid, created, greqs, echoes)
        results = await asyncio.gather(*(self._collect(g) for g in greqs))
        choices, usage = [], [0, 0, 0]
        for k, per_choice in enumerate(results):
            for i, c in sorted(per_choice.items()):
                choices.append(
                    {
                        "index": k * req.n + i,
                        "text": echoes[k] + c["text"],
                        "logprobs": self._logprobs_text(
                            c["logprobs"], 0, greqs[k], c["prompt_lps"] if req.echo else None
                        )
                        if req.logprobs is not None
                        else None,
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

    def _echo(self, prompt: str | list[int], built: PreparedPrompt) -> str:
        """The prompt as `echo` puts it before the completion: as written, or token ids decoded."""
        if isinstance(prompt, str):
            return prompt
        return self.tokenizer.decode(built.input_ids, skip_special_tokens=False)

    async def _collect(self, greq: GenerateRequest) -> dict[int, dict[str, Any]]:
        choices: dict[int, dict[str, Any]] = {}
        async for out in self._generate(greq):
            c = choices.setdefault(
                out.index,
                {"text": "", "logprobs": [], "ids": [], "finish": None, "stop": None, "prompt_lps": []},
            )
            if out.prompt_logprobs:
                c["prompt_lps"] = out.prompt_logprobs
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

    def _logprobs_text(
        self,
        lps: list[TokenLogprob],
        offset: int = 0,
        greq: GenerateRequest | None = None,
        prompt_lps: list[TokenLogprob] | None = None,
    ) -> dict[str, Any]:
        """OpenAI's legacy logprobs; `text_offset` counts characters from `offset` (a stream's text so far). With
        echo, the prompt's tokens come first (`prompt_lps`: positions 1 on; the first token has null entries)."""
        text = self.tokenizer.token_text
        ids = [lp.token_id for lp in lps]
        values: list[float | None] = [lp.logprob for lp in lps]
        tops: list[dict[str, float] | None] = [{text(t): v for t, v in lp.top_logprobs} for lp in lps]
        if greq is not None and prompt_lps is not None:
            ids[:0] = greq.input_ids
            values[:0] = [None, *(lp.logprob for lp in prompt_lps)]
            tops[:0] = [None, *({text(t): v for t, v in lp.top_logprobs} for lp in prompt_lps)]
        tokens = [text(t) for t in ids]
        offsets = []
        for t in tokens:
            offsets.append(offset)
            offset += len(t)
        return {"tokens": tokens, "token_logprobs": values, "top_logprobs": tops, "text_offset": offsets}

    async def _completion_stream(
        self,
        req: CompletionRequest,
        outs: AsyncIterator[tuple[int, GenerateOutput]],
        rid: str,
        created: int,
        greqs: list[GenerateRequest],
        echoes: list[str],
    ) -> AsyncIterator[str]:
        """Each event's choice index is prompt x n + choice, as in the answer that does not stream; with echo, a
        choice's first event starts with its prompt."""
        chunk = _chunker(rid, "text_completion", created, req)
        usage = _StreamUsage(greqs)
        plain = not (req.logprobs is not None or req.return_token_ids)
        continuous = usage.continuous(req)
        offsets: dict[int, int] = {}  # choice -> characters of its logprob tokens so far
        echoed: set[int] = set()  # choices whose first event (with the prompt) went out
        try:
            async for k, out in outs:
                index = k * req.n + out.index
                usage.add(k, out)
                echo = bool(echoes[k]) and index not in echoed  # this choice's first event: the prompt first
                if echo:
                    echoed.add(index)
                    out = replace(out, text=echoes[k] + out.text)
                lp = None
                if req.logprobs is not None:
                    prompt_lps = out.prompt_logprobs if echo else None
                    lp = self._logprobs_text(out.logprobs, offsets.get(index, 0), greqs[k], prompt_lps)
                    offsets[index] = offsets.get(index, 0) + sum(len(t) for t in lp["tokens"])
                if plain and out.finish_reason is None and out.matched_stop is None:
                    if out.text:
                        yield chunk.delta(TEXT_DELTA, index, out.text, usage.counts() if continuous else None)
                elif out.text or out.logprobs or out.token_ids or out.finish_reason is not None:
                    choice = {
                        "index": index,
                        "text": out.text,
                        "logprobs": lp,
                        "finish_reason": out.finish_reason,
                        "matched_stop": out.matched_stop,
                    }
                    if req.return_token_ids:
                        choice["token_ids"] = list(out.token_ids)
                        if index not in usage.first_sent:
                            choice["prompt_token_ids"] = list(greqs[k].input_ids)
                            usage.first_sent.add(index)
                    yield chunk([choice], usage.now(req))
            if req.stream_options and req.stream_options.include_usage:
                yield chunk([], usage.total())
        except MiradorError as e:
            yield sse_error(e)
        yield "data: [DONE]\n\n"
