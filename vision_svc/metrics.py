"""The vision service's Prometheus metrics: preprocessing and encode histograms the encoder reports into, and the
embedding cache's counters and gauges read from the encoder at scrape time."""

from __future__ import annotations

from collections.abc import Callable, Iterator

from prometheus_client import Histogram

from common.metrics import PREFIX, STEP_BUCKETS, ScrapeCollector, counter, gauge

_histograms: tuple[Histogram, Histogram] | None = None


def _vision_histograms() -> tuple[Histogram, Histogram]:
    global _histograms
    if _histograms is None:
        _histograms = (
            Histogram(
                PREFIX + "vision_preprocess_seconds",
                "Host preprocessing of one image (key check, decode, resize), seconds.",
                ["model_name", "service"],
                buckets=STEP_BUCKETS,
            ),
            Histogram(
                PREFIX + "vision_encode_seconds",
                "Device half of one encoder batch (normalize, patchify, the tower, into the cache), seconds.",
                ["model_name", "service"],
                buckets=STEP_BUCKETS,
            ),
        )
    return _histograms


def install(encoder_ref: Callable, model_name: str) -> ScrapeCollector:
    """Export the encoder that `encoder_ref()` returns (None while it loads), and hook its timings."""
    labels = {"model_name": model_name, "service": "vision"}
    pre, enc = _vision_histograms()
    pre_child, enc_child = pre.labels(model_name, "vision"), enc.labels(model_name, "vision")

    def hook(encoder) -> None:
        encoder.on_preprocessed = pre_child.observe
        encoder.on_batch_encoded = enc_child.observe

    def collect() -> Iterator:
        e = encoder_ref()
        if e is None:
            return
        s, cache = e.stats, e.cache
        yield counter(
            "embedding_cache_queries",
            "Images asked of the vision service (once per key and call).",
            labels,
            s.images_requested,
        )
        yield counter(
            "embedding_cache_hits",
            "Of them, images answered from the embedding cache (or an encode in flight).",
            labels,
            s.cache_hits,
        )
        yield counter(
            "vision_images_encoded", "Images run through the vision tower.", labels, s.images_encoded
        )
        yield counter(
            "vision_images_prepared_ahead",
            "Images an encode found already decoded by the gateway's Prepare hint.",
            labels,
            s.prepared_ahead,
        )
        yield counter(
            "embedding_cache_evictions", "Embeddings evicted from the cache.", labels, cache.evictions
        )
        yield gauge(
            "embedding_cache_bytes", "Bytes of embeddings held in the cache.", labels, cache.num_bytes
        )
        yield gauge(
            "embedding_cache_capacity_bytes", "The cache's budget, bytes.", labels, cache.budget_bytes
        )
        yield gauge("embedding_cache_entries", "Images held in the cache.", labels, len(cache))

    collector = ScrapeCollector("vision", collect)
    collector.hook = hook
    return collector
