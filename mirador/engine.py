"""The in-process engine, like SGLang's offline `Engine`: the same scheduler core, worker model runner, vision
encoder and request building as the cluster, without HTTP or gRPC. For batch jobs and notebooks.

    from mirador.engine import Engine
    with Engine() as engine:                                    # the embedded default model
        out = engine.generate("The capital of France is", sampling_params={"max_new_tokens": 8})
        print(out["text"], out["meta_info"]["completion_tokens"])
        chat = engine.chat([{"role": "user", "content": "Hello"}], sampling_params={"temperature": 0})
"""

from __future__ import annotations

import asyncio
import queue
import threading
import uuid
from collections.abc import AsyncIterator, Iterator
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

from common.types import GenerateOutput, GenerateRequest, StepPlan, TokenLogprob
from processor import constraints, sampling
from processor.media import MediaPolicy
from processor.model_config import load_generation_defaults, load_generation_eos
from processor.request_builder import PreparedPrompt, RequestBuilder

_END = object()


class _InProcessWorker:
    """WorkerBackend over a ModelRunner, pipelined as the worker service is: steps launch in order on one thread
    and their results are awaited on another, so step N+1 is queued on the device while step N runs."""

    def __init__(self, runner):
        self.runner = runner
        self._executor = ThreadPoolExecutor(1, thread_name_prefix="engine-step")
        self._collector = ThreadPoolExecutor(1, thread_name_prefix="engine-collect")

    def submit(self, plan: StepPlan) -> asyncio.Future:
        loop = asyncio.get_running_loop()
        launched = loop.run_in_executor(self._executor, self.runner.launch, plan.expanded())

        async def result():
            return await loop.run_in_executor(self._collector, self.runner.collect, await launched)

        return asyncio.ensure_future(result())

    def close(self) -> None:
        self._executor.shutdown(wait=True)
        self._collector.shutdown(wait=True)


class Engine:
    def __init__(
        self,
        model: str | Path | None = None,
        *,
        dtype: str = "auto",
        device: str = "auto",
        page_size: int = 16,
        max_total_tokens: int | None = None,
        mem_fraction_static: float = 0.85,
        load_format: str = "auto",
        attention_backend: str = "auto",
        disable_cuda_graph: bool = False,
        cuda_graph_max_bs: int | None = None,
        piecewise_cuda_graph_max_tokens: int = 2048,
        max_running_requests: int | None = None,
        chunked_prefill_size: int | None = None,
        max_prefill_tokens: int = 16384,
        context_length: int | None = None,
        disable_radix_cache: bool = False,
        disable_overlap_schedule: bool = False,
        embedding_cache_mb: int = 1024,
        vision_mem_fraction: float = 0.08,
        random_seed: int | None = None,
        media_policy: MediaPolicy | None = None,
    ):
        from mirador.default_model import default_model_dir
        from processor.hub import resolve_model_path
        from scheduler_svc.config import SchedulerArgs
        from scheduler_svc.server import resolve_policy
        from vision_svc.encoder import EncoderConfig, VisionEncoder
        from worker_svc.model_runner import ModelRunner, RunnerConfig

        self.model_path = str(resolve_model_path(str(model)) if model else default_model_dir())
        self.builder = RequestBuilder(self.model_path, media_policy or MediaPolicy())
        self.tokenizer = self.builder.tokenizer
        config = self.builder.config
        self.encoder = (
            VisionEncoder(
                EncoderConfig(
                    self.model_path,
                    dtype,
                    device,
                    embedding_cache_mb << 20,
                    load_format=load_format,  # one process: no per-process cap, the runner leaves the share
                    share_embeddings=False,  # the runner reads the pool in this process
                )
            )
            if config.is_multimodal
            else None
        )
        self.runner = ModelRunner(
            RunnerConfig(
                model_path=self.model_path,
                dtype=dtype,
                device=device,
                page_size=page_size,
                max_total_tokens=max_total_tokens,
                mem_fraction_static=mem_fraction_static,
                attention_backend=attention_backend,
                seed=random_seed,
                load_format=load_format,
                max_running_requests=max_running_requests,
                disable_cuda_graph=disable_cuda_graph,
                cuda_graph_max_bs=cuda_graph_max_bs,
                piecewise_cuda_graph_max_tokens=piecewise_cuda_graph_max_tokens,
                max_prefill_tokens=max_prefill_tokens,
                vision_mem_fraction=vision_mem_fraction if config.is_multimodal else 0.0,
            ),
            self.encoder,
        )
        self.runner.warmup()
        args = SchedulerArgs(
            model_path=self.model_path,
            max_running_requests=max_running_requests,
            chunked_prefill_size=chunked_prefill_size,
            max_prefill_tokens=max_prefill_tokens,
            context_length=context_length,
            disable_radix_cache=disable_radix_cache,
            disable_overlap_schedule=disable_overlap_schedule,
        )
        self.policy = resolve_policy(
            args,
            self.runner.info(),
            load_generation_eos(self.model_path),
            self.runner.model_config.architecture,
            self.runner.model_config.image_token_id,
        )
        self.generation_defaults = load_generation_defaults(self.model_path)
        self._worker = _InProcessWorker(self.runner)
        self._loop = asyncio.new_event_loop()
        self._thread = threading.Thread(target=self._loop.run_forever, name="mirador-engine", daemon=True)
        self._thread.start()
        self._sched = self._call(self._start_loop(args))

    async def _start_loop(self, args):
        from scheduler_svc.loop import SchedulerLoop
        from scheduler_svc.scheduler import Scheduler

        loop = SchedulerLoop(
            Scheduler(self.policy, self.tokenizer),
            self._worker,
            self.encoder,
            overlap=not args.disable_overlap_schedule,
            step_timeout_s=args.step_timeout_s,
        )
        loop.start()
        return loop

    def _call(self, coro):
        return asyncio.run_coroutine_threadsafe(coro, self._loop).result()

    # ---- building requests ----

    def _request(
        self,
        prompt: PreparedPrompt,
        sampling_params: dict[str, Any] | None,
        *,
        return_logprob: bool,
        top_logprobs: int,
        stream: bool,
        rid: str | None,
    ) -> GenerateRequest:
        fields = sampling.from_sglang(sampling_params)
        max_new = sampling.max_new_tokens_for(
            fields.get("max_tokens", 128),
            len(prompt.input_ids),
            self.policy.context_length,
            param="max_new_tokens",
        )
        sp, stop = sampling.build(
            fields,
            defaults=self.generation_defaults,
            eos_ids=self.policy.eos_token_ids,
            max_new_tokens=max_new,
            return_logprob=return_logprob,
            top_logprobs=top_logprobs,
            vocab_size=self.policy.vocab_size,
        )
        return GenerateRequest(
            rid or uuid.uuid4().hex,
            tuple(prompt.input_ids),
            tuple(prompt.mm_items),
            sp,
            stop,
            n=int(fields.get("n") or 1),
            stream=stream,
            constraint=constraints.from_fields(fields),
        )

    async def _prepare_generate(self, prompt, input_ids, image_data, **kw) -> GenerateRequest:
        images = [image_data] if isinstance(image_data, str) else list(image_data or [])
        prepared = await self.builder.from_prompt(prompt if prompt is not None else list(input_ids), images)
        return self._request(prepared, **kw)

    async def _prepare_chat(self, messages, **kw) -> GenerateRequest:
        return self._request(await self.builder.from_messages(messages), **kw)

    # ---- running ----

    async def _collect(self, req: GenerateRequest) -> list[dict[str, Any]]:
        choices: dict[int, dict[str, Any]] = {}
        async for out in self._sched.generate(req):
            c = choices.setdefault(out.index, {"text": "", "output_ids": [], "logprobs": []})
            c["text"] += out.text
            c["output_ids"].extend(out.token_ids)
            c["logprobs"].extend(out.logprobs)
            if out.finish_reason is not None:
                c["meta_info"] = _meta(req, out, c["logprobs"])
        return [
            {"text": c["text"], "output_ids": c["output_ids"], "index": i, "meta_info": c["meta_info"]}
            for i, c in sorted(choices.items())
        ]

    async def async_generate(
        self,
        prompt: str | None = None,
        sampling_params: dict[str, Any] | None = None,
        input_ids: list[int] | None = None,
        image_data: str | list[str] | None = None,
        return_logprob: bool = False,
        top_logprobs_num: int = 0,
        rid: str | None = None,
        stream: bool = False,
    ):
        req = await self._prepare_generate(
            prompt,
            input_ids,
            image_data,
            sampling_params=sampling_params,
            return_logprob=return_logprob,
            top_logprobs=top_logprobs_num,
            stream=stream,
            rid=rid,
        )
        if stream:
            return self._stream(req)
        out = await self._collect(req)
        return out[0] if len(out) == 1 else out

    async def _stream(self, req: GenerateRequest) -> AsyncIterator[dict[str, Any]]:
        async for out in self._sched.generate(req):
            yield {
                "text": out.text,
                "output_ids": out.token_ids,
                "index": out.index,
                "meta_info": _meta(req, out, out.logprobs) if out.finish_reason else None,
            }

    def generate(
        self,
        prompt: str | list[str] | None = None,
        sampling_params: dict[str, Any] | None = None,
        input_ids: list[int] | list[list[int]] | None = None,
        image_data: Any = None,
        return_logprob: bool = False,
        top_logprobs_num: int = 0,
        stream: bool = False,
    ):
        """SGLang's Engine.generate: a prompt (or input_ids), or a list of them, each batched with the others.
        Returns {"text", "output_ids", "meta_info"} per prompt (a list for a list); with stream=True an iterator
        of deltas for a single prompt."""
        batch = isinstance(prompt, list) or (
            input_ids is not None and input_ids and isinstance(input_ids[0], list)
        )
        if stream:
            if batch:
                raise ValueError("stream=True takes a single prompt")
            return self._iterate(
                self.async_generate(
                    prompt,
                    sampling_params,
                    input_ids,
                    image_data,
                    return_logprob,
                    top_logprobs_num,
                    stream=True,
                )
            )
        if not batch:
            return self._call(
                self.async_generate(
                    prompt, sampling_params, input_ids, image_data, return_logprob, top_logprobs_num
                )
            )
        prompts = prompt if prompt is not None else [None] * len(input_ids)
        ids = input_ids if input_ids is not None else [None] * len(prompt)
        images = (
            image_data
            if isinstance(image_data, list) and len(image_data) == len(prompts)
            else [image_data] * len(prompts)
        )

        async def run_all():
            return await asyncio.gather(
                *(
                    self.async_generate(p, sampling_params, i, im, return_logprob, top_logprobs_num)
                    for p, i, im in zip(prompts, ids, images, strict=True)
                )
            )

        return self._call(run_all())

    async def async_chat(
        self,
        messages: list[dict[str, Any]],
        sampling_params: dict[str, Any] | None = None,
        return_logprob: bool = False,
        top_logprobs_num: int = 0,
        rid: str | None = None,
    ):
        req = await self._prepare_chat(
            messages,
            sampling_params=sampling_params,
            return_logprob=return_logprob,
            top_logprobs=top_logprobs_num,
            stream=False,
            rid=rid,
        )
        out = await self._collect(req)
        return out[0] if len(out) == 1 else out

    def chat(
        self,
        messages: list[dict[str, Any]] | list[list[dict[str, Any]]],
        sampling_params: dict[str, Any] | None = None,
        return_logprob: bool = False,
        top_logprobs_num: int = 0,
    ):
        """OpenAI chat messages (text and image_url parts) through the model's chat template; a list of
        conversations runs batched."""
        if messages and isinstance(messages[0], list):

            async def run_all():
                return await asyncio.gather(
                    *(self.async_chat(m, sampling_params, return_logprob, top_logprobs_num) for m in messages)
                )

            return self._call(run_all())
        return self._call(self.async_chat(messages, sampling_params, return_logprob, top_logprobs_num))

    def _iterate(self, agen_coro) -> Iterator[dict[str, Any]]:
        q: queue.Queue = queue.Queue()

        async def pump():
            try:
                async for item in await agen_coro:
                    q.put(item)
            except BaseException as e:  # noqa: BLE001 - re-raised in the caller's thread
                q.put(e)
            q.put(_END)

        asyncio.run_coroutine_threadsafe(pump(), self._loop)
        while (item := q.get()) is not _END:
            if isinstance(item, BaseException):
                raise item
            yield item

    def stats(self) -> dict[str, Any]:
        """The scheduler's gauges and counters, as its Stats RPC reports them."""
        core = self._sched.core
        return {**core.snapshot(), **core.stats.counters()}

    def shutdown(self) -> None:
        if self._loop.is_closed():
            return
        self._call(self._sched.stop())
        self._call(self.builder.aclose())
        self._loop.call_soon_threadsafe(self._loop.stop)
        self._thread.join(10)
        self._worker.close()
        self._loop.close()
        # the weights, KV cache and graphs go with the last references: free the device memory now
        self.runner = self.encoder = self._worker = self._sched = None
        import gc

        import torch

        gc.collect()
        if torch.cuda.is_available():
            torch.cuda.empty_cache()

    def __enter__(self) -> Engine:
        return self

    def __exit__(self, *exc) -> None:
        self.shutdown()


def _meta(req: GenerateRequest, out: GenerateOutput, lps: list[TokenLogprob]) -> dict[str, Any]:
    finish: dict[str, Any] = {"type": out.finish_reason}
    if out.finish_reason == "length":
        finish["length"] = out.completion_tokens
    if out.matched_stop is not None:
        finish["matched"] = out.matched_stop
    meta = {
        "id": req.request_id,
        "prompt_tokens": out.prompt_tokens,
        "completion_tokens": out.completion_tokens,
        "cached_tokens": out.cached_tokens,
        "finish_reason": finish,
    }
    if req.sampling.return_logprob:
        meta["output_token_logprobs"] = [[lp.logprob, lp.token_id, None] for lp in lps]
        meta["output_top_logprobs"] = [[[v, t, None] for t, v in lp.top_logprobs] for lp in lps]
    return meta
