"""Incremental detokenization with stop strings: text is released only when it is final.

Text ending in an incomplete UTF-8 sequence is held back until the bytes complete (or the choice ends); with
stop strings, the last len(longest stop) - 1 characters are held back too, so a stop split across tokens never
leaks. The concatenation of everything released equals the tokenizer's decode of all ids (truncated at a
matched stop string). Work per id is bounded: a small window of ids is decoded, and stops are searched in the
held-back text plus the new text only.
"""

from __future__ import annotations

import functools
import json
import logging
from collections.abc import Sequence

import tokenizers
from tokenizers.decoders import DecodeStream

from processor.tokenizer import Tokenizer

logger = logging.getLogger(__name__)

_TRIM_AT = 64  # drop released ids from the window's list once this many have piled up in front of it


class WindowedDetokenizer:
    """Decodes a growing id list by windows in Python (the approach of vLLM and TGI), emitting only complete
    characters. The reference for IncrementalDetokenizer; its flush decodes the whole sequence."""

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


class IncrementalDetokenizer:
    """The windowed algorithm at O(1) per id: the tokenizers library's DecodeStream runs it in Rust when the
    tokenizer exposes its backend; otherwise (or once DecodeStream refuses a step) the same windows are
    decoded here. Only a bounded list of recent ids is kept."""

    __slots__ = (
        "tokenizer",
        "skip",
        "_backend",
        "_stream",
        "_dropped",
        "_byte_ids",
        "_clean",
        "_ids",
        "_prefix",
        "_read",
        "_num_unstepped",
        "_window_clean",
        "_stale",
        "_texts",
    )

    def __init__(self, tokenizer: Tokenizer, skip_special_tokens: bool = True):
        self.tokenizer = tokenizer
        self.skip = skip_special_tokens
        self._backend = getattr(tokenizer, "backend", None)
        self._stream = None
        self._dropped: frozenset[int] = frozenset()
        self._byte_ids: frozenset[int] = frozenset()
        self._clean: _CleanTexts | None = None
        if self._backend is not None:
            self._stream = DecodeStream(skip_special_tokens=skip_special_tokens)
            special, self._byte_ids = _stream_ids(self._backend)
            # decode() drops these anyway; keeping them out of the window keeps it small if a model emits many
            self._dropped = special if skip_special_tokens else frozenset()
            self._clean = _clean_texts(self._backend)
        self._ids: list[int] = []  # recent ids, from the current window's start on
        self._prefix = 0  # window start in _ids: the previous release began here
        self._read = 0  # ids before this were released as text
        self._num_unstepped = 0  # trailing ids in _ids not given to DecodeStream yet
        # add_token's shortcut (byte-level decoders only): while the window is one released id that decodes to
        # whole characters alone, the next such id releases exactly its own text, so Python returns it without
        # DecodeStream, which catches up (_sync) before the next id that needs it. Only ever True with a table
        # and a DecodeStream (add() clears it for good when DecodeStream is dropped), so add_token checks it alone
        self._window_clean = self._clean is not None and self._stream is not None
        # the table's list itself (fill() replaces its contents in place), one lookup less per token
        self._texts = self._clean.texts if self._clean is not None else []
        self._stale: int | None = None  # the id DecodeStream's window should hold (steps taken in Python)

    def add(self, ids: Sequence[int]) -> str:
        if self._dropped and not self._dropped.isdisjoint(ids):
            ids = [i for i in ids if i not in self._dropped]
        if not ids:
            return ""
        self._sync()
        self._window_clean = False
        self._ids.extend(ids)
        if self._byte_ids and ids[-1] in self._byte_ids:
            # A byte-fallback decoder turns a whole run of <0xXX> pieces into U+FFFDs if any byte of it is
            # invalid, even bytes that were valid alone: release nothing until the run ends.
            self._num_unstepped += len(ids)
            return ""
        if self._stream is None:
            return self._add_windowed()
        n = len(ids) + self._num_unstepped
        self._num_unstepped = 0
        try:
            text = self._stream.step(self._backend, ids[0] if n == 1 else self._ids[-n:])
        except Exception as e:  # InvalidPrefix, or a tokenizers version whose step takes one id only
            logger.debug("DecodeStream refused a step (%s); decoding windows in Python from here", e)
            self._stream = None
            return self._add_windowed()
        if text is None:
            return ""
        self._advance()
        window = self._ids[self._prefix :]
        self._window_clean = (
            len(window) == 1 and self._clean is not None and bool(self._clean.text(window[0]))
        )
        return text

    def add_token(self, token: int) -> str:
        """add([token]); in the common case (see _window_clean) a list lookup."""
        if self._window_clean:
            try:
                text = self._texts[token]
            except IndexError:  # past the tokenizer's ids (an output head may be wider)
                text = ""
            if text is None:
                text = self._clean.text(token)
            if text:
                self._stale = token
                return text
        return self.add((token,))

    def _sync(self) -> None:
        """Give DecodeStream (and the windows here) the state the shortcut left: one released id."""
        if self._stale is not None:
            self._stream = DecodeStream(skip_special_tokens=self.skip)
            self._stream.step(self._backend, self._stale)
            self._ids, self._prefix, self._read = [self._stale], 0, 1
            self._stale = None

    def flush(self) -> str:
        """The rest of the text once no more ids will come (incomplete bytes become U+FFFD, as decode does)."""
        if self._read == len(self._ids):
            return ""
        prefix, full = self._decode_window()
        if not full.startswith(prefix):
            logger.warning("incremental detokenization diverged at the end; the remainder is dropped")
            return ""
        self._advance()
        return full[len(prefix) :]

    def _add_windowed(self) -> str:
        prefix, full = self._decode_window()
        if len(full) > len(prefix) and not full.endswith("\ufffd"):
            self._advance()
            return full[len(prefix) :]
        return ""

    def _decode_window(self) -> tuple[str, str]:
        decode, window = self.tokenizer.decode, self._ids[self._prefix :]
        return decode(window[: self._read - self._prefix], self.skip), decode(window, self.skip)

    def _advance(self) -> None:
        self._prefix, self._read = self._read, len(self._ids)
        if self._prefix >= _TRIM_AT:
            del self._ids[: self._prefix]
            self._read -= self._prefix
            self._prefix = 0


@functools.lru_cache(maxsize=8)
def _stream_ids(backend: tokenizers.Tokenizer) -> tuple[frozenset[int], frozenset[int]]:
    """(ids that decode drops under skip_special_tokens, the <0xXX> pieces when the decoder has ByteFallback)."""
    special = frozenset(i for i, t in backend.get_added_tokens_decoder().items() if t.special)
    decoder = backend.decoder
    if decoder is None or b'"ByteFallback"' not in decoder.__getstate__():
        return special, frozenset()
    pieces = (backend.token_to_id(f"<0x{b:02X}>") for b in range(256))
    return special, frozenset(i for i in pieces if i is not None)


class _CleanTexts:
    """id -> its text when it decodes alone to whole characters ("" otherwise, and for added tokens), filled as
    ids are seen. Under a byte-level decoder the text of ids is the UTF-8 decode of their bytes joined, so after
    such ids any other such id adds exactly its own text. A list indexed by id (None: not seen yet), not a dict:
    sampled ids spread over the vocabulary, and a lookup in a 150k-entry dict misses the CPU caches twice (its
    index, then its entry) where the list misses once."""

    def __init__(self, backend: tokenizers.Tokenizer):
        self.backend = backend
        self.added = frozenset(backend.get_added_tokens_decoder())
        self.texts: list[str | None] = [None] * backend.get_vocab_size(with_added_tokens=True)

    def text(self, token: int) -> str:
        if 0 <= token < len(self.texts) and (text := self.texts[token]) is not None:
            return text
        if not 0 <= token < len(self.texts):
            return ""
        text = self.texts[token] = self._clean(token, self.backend.decode([token], skip_special_tokens=False))
        return text

    def _clean(self, token: int, text: str) -> str:
        """An id's text alone, or "" for an added token or a text that is not whole characters."""
        return "" if token in self.added or "\ufffd" in text else text

    def fill(self) -> None:
        """Every id's text now, in one batch decode (~0.2 s for 150k ids), instead of one decode the first time
        each id is sampled (~1 us each, and a cache miss in the hot loop)."""
        texts = self.backend.decode_batch([[i] for i in range(len(self.texts))], skip_special_tokens=False)
        # in place: detokenizers hold this list
        self.texts[:] = [self._clean(i, text) for i, text in enumerate(texts)]


def prepare_detokenizer(tokenizer: Tokenizer) -> None:
    """Fill the tokenizer's table of whole-character texts ahead of traffic (a service's start-up)."""
    backend = getattr(tokenizer, "backend", None)
    clean = _clean_texts(backend) if backend is not None else None
    if clean is not None:
        clean.fill()


@functools.lru_cache(maxsize=8)
def _clean_texts(backend: tokenizers.Tokenizer) -> _CleanTexts | None:
    decoder = backend.decoder
    if decoder is None or json.loads(decoder.__getstate__()).get("type") != "ByteLevel":
        return None
    return _CleanTexts(backend)


class TextStream:
    """Detokenizer plus stop-string matching for one choice."""

    __slots__ = ("detok", "stop", "hold", "no_stop_trim", "matched_stop", "_tail", "_num_held", "_searched")

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
        self.matched_stop: str | None = None
        # The text not released yet (at most `hold` characters between calls) after up to `hold` released
        # ones: a stop may begin in those when stops were not checked while they came (min_tokens).
        self._tail = ""
        self._num_held = 0
        self._searched = True  # _tail holds no stop (searched since it last grew)

    def push(self, ids: Sequence[int], check_stop: bool = True) -> str:
        """Add ids; return newly released text. After a stop string matches, `matched_stop` is set and the
        text is cut there (or after it with no_stop_trim)."""
        if self.matched_stop is not None:
            return ""
        delta = self.detok.add(ids)
        return self._release(delta, False, check_stop) if self.stop else delta

    def push_token(self, token: int, check_stop: bool = True) -> str:
        """push([token]), with less work."""
        if self.matched_stop is not None:
            return ""
        delta = self.detok.add_token(token)
        return self._release(delta, False, check_stop) if self.stop else delta

    def finish(self, check_stop: bool = True) -> str:
        """Release everything left (the choice ended for another reason)."""
        if self.matched_stop is not None:
            return ""
        delta = self.detok.flush()
        return self._release(delta, True, check_stop) if self.stop else delta

    def _release(self, delta: str, final: bool, check_stop: bool) -> str:
        text = self._tail + delta
        start = len(self._tail) - self._num_held
        if check_stop and (delta or not self._searched):
            end = self._find_stop(text)
            if end is not None:
                self._tail, self._num_held = "", 0
                return text[start:end]  # empty when the stop began in released text
        self._searched = check_stop or (self._searched and not delta)
        end = len(text) if final else max(start, len(text) - self.hold)
        self._tail = text[max(0, end - self.hold) :]
        self._num_held = len(text) - end
        return text[start:end]

    def _find_stop(self, text: str) -> int | None:
        """Set matched_stop to the stop that starts first in text (list order breaks ties) and return where
        the text is cut, or None."""
        best, first = -1, None
        for s in self.stop:
            i = text.find(s)
            if i >= 0 and (first is None or i < best):
                best, first = i, s
        if first is None:
            return None
        self.matched_stop = first
        return best + len(first) if self.no_stop_trim else best
