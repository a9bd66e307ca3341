"""Incremental detokenization with stop strings: text is released only when it is final.

Text ending in an incomplete UTF-8 sequence is held back until the bytes complete (or the choice ends); with
stop strings, the last len(longest stop) - 1 characters are held back too, so a stop split across tokens never
leaks. The concatenation of everything released equals the tokenizer's decode of all ids (truncated at a
matched stop string).
"""

from __future__ import annotations

import logging
from collections.abc import Sequence

from processor.tokenizer import Tokenizer

logger = logging.getLogger(__name__)


class IncrementalDetokenizer:
    """Decodes a growing id list by windows (the approach of vLLM and TGI), emitting only complete characters."""

    def __init__(self, tokenizer: Tokenizer, skip_special_tokens: bool = True):
        self.tokenizer = tokenizer
        self.skip = skip_special_tokens
        self.ids: list[int] = []
        self.prefix_offset = 0
        self.read_offset = 0
        self.emitted: list[str] = []

    def add(self, ids: Sequence[int]) -> str:
        self.ids.extend(ids)
        decode = self.tokenizer.decode
        prefix = decode(self.ids[self.prefix_offset : self.read_offset], self.skip)
        full = decode(self.ids[self.prefix_offset :], self.skip)
        if len(full) > len(prefix) and not full.endswith("\ufffd"):
            delta = full[len(prefix) :]
            self.prefix_offset, self.read_offset = self.read_offset, len(self.ids)
            self.emitted.append(delta)
            return delta
        return ""

    def flush(self) -> str:
        """The rest of the text once no more ids will come (incomplete bytes become U+FFFD, as decode does)."""
        full = self.tokenizer.decode(self.ids, self.skip)
        done = "".join(self.emitted)
        if not full.startswith(done):
            logger.warning(
                "incremental detokenization diverged from the full decode; sending the remainder only"
            )
            return ""
        self.emitted.append(full[len(done) :])
        return full[len(done) :]


class TextStream:
    """Detokenizer plus stop-string matching for one choice."""

    def __init__(
        self,
        tokenizer: Tokenizer,
        *,
        skip_special_tokens: bool = True,
        stop: Sequence[str] = (),
        no_stop_trim: bool = False,
    ):
        self.detok = IncrementalDetokenizer(tokenizer, skip_special_tokens)
        self.stop = [s for s in stop if s]
        self.hold = max((len(s) for s in self.stop), default=1) - 1
        self.no_stop_trim = no_stop_trim
        self.text = ""  # all final text so far
        self.sent = 0  # characters of `text` released
        self.matched_stop: str | None = None

    def push(self, ids: Sequence[int], check_stop: bool = True) -> str:
        """Add ids; return newly released text. After a stop string matches, `matched_stop` is set and the
        text is cut there (or after it with no_stop_trim)."""
        if self.matched_stop is not None:
            return ""
        self.text += self.detok.add(ids)
        return self._release(final=False, check_stop=check_stop)

    def finish(self, check_stop: bool = True) -> str:
        """Release everything left (the choice ended for another reason)."""
        if self.matched_stop is None:
            self.text += self.detok.flush()
        return self._release(final=True, check_stop=check_stop)

    def _release(self, final: bool, check_stop: bool) -> str:
        if self.matched_stop is None and self.stop and check_stop:
            start = max(0, self.sent - self.hold)
            best = None
            for s in self.stop:
                i = self.text.find(s, start)
                if i >= 0 and (best is None or i < best[0]):
                    best = (i, s)
            if best is not None:
                i, s = best
                self.matched_stop = s
                self.text = self.text[: i + len(s)] if self.no_stop_trim else self.text[:i]
                final = True
        end = len(self.text) if final or not self.stop else max(self.sent, len(self.text) - self.hold)
        out = self.text[self.sent : end]
        self.sent = end
        return out
