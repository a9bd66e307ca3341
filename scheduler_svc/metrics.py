"""The scheduler's Prometheus metrics: counters and gauges read from the core's own stats when Prometheus scrapes,
and the two histograms the core reports into once per step or admission (StepObserver)."""

from __future__ import annotations

from collections.abc import Callable, Iterator

from prometheus_client import Histogram
from prometheus_client.core import CounterMetricFamily

from common.metrics import PREFIX, REQUEST_BUCKETS, STEP_BUCKETS, ScrapeCollector, counter, gauge
from scheduler_svc.scheduler import Scheduler, StepObserver

_histograms: tuple[Histogram, Histogram, Histogram] | None = None


def _scheduler_histograms() -> tuple[Histogram, Histogram, Histogram]:
    global _histograms
    if _histograms is None:
        _histograms = (
            Histogram(
                PREFIX + "forward_step_seconds",
                "Worker time of one step (device time on a GPU), by mode: prefill (the step carries prompt "
                "chunks) or decode (decodes only).",
                ["model_name", "service", "mode"],
                buckets=STEP_BUCKETS,
            ),
            Histogram(
                PREFIX + "queue_time_seconds",
                "Time from a request's arrival at the scheduler to its first admission into the running batch "
                "(waiting for images to be encoded included).",
                ["model_name", "service"],
                buckets=REQUEST_BUCKETS,
            ),
            Histogram(
                PREFIX + "grammar_compile_seconds",
                "Time to compile one structured-output grammar (JSON schema, regex, EBNF, Lark) into a matcher, "
                "on the grammar threads; cache hits are not compiled again.",
                ["model_name", "service"],
                buckets=STEP_BUCKETS,
            ),
        )
    return _histograms


class PrometheusObserver(StepObserver):
    def __init__(self, model_name: str):
        step, queue, grammar = _scheduler_histograms()
        self._prefill = step.labels(model_name, "scheduler", "prefill")
        self._decode = step.labels(model_name, "scheduler", "decode")
        self._queue = queue.labels(model_name, "scheduler")
        self._grammar = grammar.labels(model_name, "scheduler")

    def step(self, has_prompt_work: bool, seconds: float) -> None:
        (self._prefill if has_prompt_work else self._decode).observe(seconds)

    def queued(self, seconds: float) -> None:
        self._queue.observe(seconds)

    def grammar_compiled(self, seconds: float) -> None:
        self._grammar.observe(seconds)


def install(core_ref: Callable[[], Scheduler | None], model_name: str) -> ScrapeCollector:
    """Export the scheduler core that `core_ref()` returns (None until it is built) at every scrape."""
    labels = {"model_name": model_name, "service": "scheduler"}

    def collect() -> Iterator:
        core = core_ref()
        if core is None:
            return
        s, snap = core.stats, core.snapshot()
        yield counter(
            "prompt_tokens",
            "Prompt tokens admitted (images' placeholder tokens included).",
            labels,
            s.prompt_tokens_total,
        )
        yield counter("generation_tokens", "Tokens generated.", labels, s.generated_tokens_total)
        yield counter(
            "cached_tokens",
            "Prompt tokens served from the prefix cache (at first admission).",
            labels,
            s.cached_tokens_total,
        )
        yield counter(
            "prefix_cache_queries",
            "Prompt tokens looked up in the prefix cache (vLLM's name).",
            labels,
            s.prompt_tokens_total,
        )
        yield counter(
            "prefix_cache_hits",
            "Prompt tokens the prefix cache held (vLLM's name).",
            labels,
            s.cached_tokens_total,
        )
        yield counter(
            "num_preemptions", "Running sequences preempted to free KV pages.", labels, s.num_preemptions
        )
        yield counter(
            "num_aborted_requests",
            "Requests aborted (client gone, cancelled or failed).",
            labels,
            s.requests_aborted,
        )
        yield counter("num_steps", "Steps sent to the worker.", labels, s.num_steps)
        fam = CounterMetricFamily(
            PREFIX + "num_requests",
            "Sequences (choices) finished, by finish reason.",
            labels=["model_name", "service", "finish_reason"],
        )
        for reason in ("stop", "length", "abort"):  # bounded: always these three, zeros included
            fam.add_metric([model_name, "scheduler", reason], s.finish_reasons.get(reason, 0))
        yield fam
        yield gauge("num_running_reqs", "Sequences in the running batch.", labels, snap["num_running"])
        yield gauge(
            "num_queue_reqs", "Sequences waiting (queued, encoding or preempted).", labels, snap["num_queued"]
        )
        yield gauge(
            "kv_pages_used",
            "KV pages referenced by live sequences or the prefix cache.",
            labels,
            snap["kv_pages_used"],
        )
        yield gauge("kv_pages_total", "KV pages in the pool.", labels, snap["kv_pages_total"])
        yield gauge(
            "kv_pages_cached",
            "KV pages held only by the prefix cache (evictable).",
            labels,
            snap["kv_pages_cached"],
        )
        if snap["encoder_pages_total"]:  # families with an encoder cache (Llama 3.2 Vision)
            yield gauge(
                "encoder_pages_used",
                "Encoder-cache pages (one image's cross-attention K/V each) held by live sequences.",
                labels,
                snap["encoder_pages_used"],
            )
            yield gauge(
                "encoder_pages_total", "Encoder-cache pages in the pool.", labels, snap["encoder_pages_total"]
            )
        usage = snap["kv_pages_used"] / max(1, snap["kv_pages_total"])
        yield gauge("token_usage", "Share of the KV pool in use, 0 to 1 (SGLang's name).", labels, usage)
        yield gauge("gen_throughput", "Recent generation throughput, tokens/s.", labels, s.gen_throughput())
        grammar = core.grammar.info() if core.grammar is not None else {}
        yield counter(
            "grammar_compiles", "Structured-output grammars compiled.", labels, grammar.get("compiles", 0)
        )
        yield counter(
            "grammar_cache_hits",
            "Structured-output requests whose grammar was already compiled (or compiling).",
            labels,
            grammar.get("cache_hits", 0),
        )

    return ScrapeCollector("scheduler", collect)
