"""Grammar-constrained decoding on the scheduler's side (llguidance): grammars compiled on a thread pool and
cached by a hash of the spec, a matcher per sequence, and the allowed-token bitmasks of a step's constrained
sequences, filled together (llguidance's own threads, the GIL released)."""

from __future__ import annotations

import asyncio
import hashlib
import logging
import threading
import time
from collections import OrderedDict
from collections.abc import Callable, Sequence
from concurrent.futures import Future, ThreadPoolExecutor
from typing import Any

import numpy as np

from common.errors import InvalidRequestError
from common.types import Constraint
from processor import constraints

logger = logging.getLogger(__name__)


def spec_key(c: Constraint) -> str:
    return hashlib.sha256(f"{c.kind}\0{c.text}".encode()).hexdigest()


class GrammarBackend:
    """Compiles constraints into llguidance matchers for one tokenizer and vocabulary (the logits' width)."""

    name = "llguidance"

    def __init__(
        self,
        hf_tokenizer: Any,  # transformers.PreTrainedTokenizerFast
        vocab_size: int,
        eos_token_ids: Sequence[int],
        *,
        max_workers: int = 2,
        cache_size: int = 256,
        on_compile: Callable[[float], None] | None = None,
    ):
        import llguidance

        self.version = getattr(llguidance, "__version__", "")
        self.vocab_size = vocab_size
        self.num_words = -(-vocab_size // 32)
        self.cache_size = cache_size
        self.on_compile = on_compile
        self._pool = ThreadPoolExecutor(max_workers, thread_name_prefix="grammar")
        self._tokenizer: Future = self._pool.submit(
            self._build_tokenizer, hf_tokenizer, vocab_size, list(eos_token_ids)
        )
        self._executor = llguidance.LLExecutor(max_workers)
        self._cache: OrderedDict[str, Future] = OrderedDict()
        self._lock = threading.Lock()  # the cache's counters are also read by /server_info and metrics
        self.num_compiles = 0
        self.num_cache_hits = 0
        self.num_errors = 0
        self.compile_seconds_total = 0.0

    @staticmethod
    def _build_tokenizer(hf_tokenizer: Any, vocab_size: int, eos: list[int]):
        import llguidance.hf

        t0 = time.perf_counter()
        tok = llguidance.hf.from_tokenizer(hf_tokenizer, n_vocab=vocab_size, eos_token=eos or None)
        logger.info("grammar backend: llguidance tokenizer ready in %.2f s", time.perf_counter() - t0)
        return tok

    async def ready(self) -> None:
        """Once the tokenizer is built, or has failed to (logged; each compile then fails with that error)."""
        built = asyncio.wrap_future(self._tokenizer)
        await asyncio.wait([built])
        if built.exception() is not None:
            logger.error("grammar backend: the llguidance tokenizer failed to build: %s", built.exception())

    def compile(self, c: Constraint) -> Future:
        """A future of the compiled grammar (a matcher in its start state, to copy per sequence); it raises
        InvalidRequestError naming the problem. Equal specs share one compile."""
        key = spec_key(c)
        with self._lock:
            fut = self._cache.get(key)
            if fut is not None:
                self._cache.move_to_end(key)
                self.num_cache_hits += 1
                return fut
            fut = self._pool.submit(self._compile, c)
            self._cache[key] = fut
            while len(self._cache) > self.cache_size:
                self._cache.popitem(last=False)
        return fut

    def _compile(self, c: Constraint):
        from llguidance import LLMatcher

        tokenizer = self._tokenizer.result()
        t0 = time.perf_counter()
        try:
            try:
                grammar = constraints.to_grammar(c)
            except ValueError as e:
                raise InvalidRequestError(f"invalid {c.kind}: {e}", param=_PARAM[c.kind]) from None
            matcher = LLMatcher(tokenizer, grammar, log_level=0)
            if matcher.is_error():
                raise InvalidRequestError(f"invalid {c.kind}: {matcher.get_error()}", param=_PARAM[c.kind])
            return matcher
        except InvalidRequestError:
            with self._lock:
                self.num_errors += 1
            raise
        finally:
            seconds = time.perf_counter() - t0
            with self._lock:
                self.num_compiles += 1
                self.compile_seconds_total += seconds
            if self.on_compile is not None:
                self.on_compile(seconds)

    def fill(self, matchers: Sequence[Any]) -> np.ndarray:
        """Allowed-token bitmasks [len(matchers), num_words] int32 of the matchers' current states."""
        from llguidance.numpy import fill_next_token_bitmask_par

        mask = np.empty((len(matchers), self.num_words), dtype=np.int32)
        fill_next_token_bitmask_par(self._executor, [(m, i) for i, m in enumerate(matchers)], mask)
        return mask

    def info(self) -> dict[str, Any]:
        with self._lock:
            return {
                "backend": self.name,
                "version": self.version,
                "whitespace": "compact",
                "cache_size": self.cache_size,
                "cache_entries": len(self._cache),
                "cache_hits": self.num_cache_hits,
                "compiles": self.num_compiles,
                "compile_errors": self.num_errors,
                "compile_seconds_total": round(self.compile_seconds_total, 6),
                "tokenizer_ready": self._tokenizer.done(),
            }

    def close(self) -> None:
        self._pool.shutdown(wait=False, cancel_futures=True)


# the request field each kind comes from, for the 400's `param`
_PARAM = {
    "json_schema": "response_format",
    "json_object": "response_format",
    "regex": "regex",
    "ebnf": "ebnf",
    "lark": "tool_choice",
}
