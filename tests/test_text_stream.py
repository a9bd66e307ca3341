"""IncrementalDetokenizer and TextStream against the real Qwen2.5 tokenizer.

The reference is always `tokenizer.decode(all_ids, skip_special_tokens=...)`: whatever is released piece by
piece must concatenate to it (cut at a matched stop string), and no piece may ever carry a replacement
character that the full decode does not have at that position (a broken UTF-8 sequence released too early).
Random byte-level tokens are the interesting input: about 1.4k Qwen tokens are UTF-8 fragments.
"""

from __future__ import annotations

from collections.abc import Sequence

import pytest
from hypothesis import HealthCheck, assume, given, settings
from hypothesis import strategies as st

from mirador.default_model import default_model_dir
from processor.text_stream import IncrementalDetokenizer, TextStream
from processor.tokenizer import Tokenizer

REGULAR_MAX = 151642  # last id of the byte-level BPE vocabulary
SPECIAL_IDS = range(151643, 151665)  # <|endoftext|> ... <|file_sep|>

SETTINGS = settings(
    max_examples=150,
    deadline=None,
    derandomize=True,
    suppress_health_check=[HealthCheck.too_slow, HealthCheck.function_scoped_fixture],
)


# ---------------------------------------------------------------------------------------------- fixtures


@pytest.fixture(scope="session")
def model_dir():
    return default_model_dir()


@pytest.fixture(scope="session")
def tok(model_dir) -> Tokenizer:
    return Tokenizer(model_dir)


@pytest.fixture(scope="session")
def fragment_ids(tok) -> list[int]:
    """Ids whose bytes are not valid UTF-8 on their own (pieces of multi-byte characters)."""
    out = []
    for i in range(REGULAR_MAX + 1):
        try:
            tok.token_bytes(i).decode("utf-8")
        except UnicodeDecodeError:
            out.append(i)
    assert len(out) > 200, "expected the byte-level vocabulary to hold many UTF-8 fragments"
    return out


@pytest.fixture(scope="session")
def byte_id(tok) -> dict[int, int]:
    """byte value -> the id of the single-byte token for it."""
    table: dict[int, int] = {}
    for i in range(REGULAR_MAX + 1):
        b = tok.token_bytes(i)
        if len(b) == 1:
            table.setdefault(b[0], i)
    assert len(table) == 256
    return table


def byte_ids(byte_id: dict[int, int], text: str) -> list[int]:
    """One token per UTF-8 byte: every multi-byte character is split across tokens."""
    return [byte_id[b] for b in text.encode("utf-8")]


def chunks_of(ids: Sequence[int], sizes: Sequence[int]) -> list[list[int]]:
    """Split ids into groups of the given sizes (cycled); every group non-empty."""
    out, i, k = [], 0, 0
    sizes = list(sizes) or [1]
    while i < len(ids):
        n = max(1, sizes[k % len(sizes)])
        out.append(list(ids[i : i + n]))
        i += n
        k += 1
    return out


def assert_pieces_consistent(pieces: Sequence[str], full: str) -> None:
    """Every released character equals the full decode's character at the same position; in particular a
    U+FFFD is released only where the full decode has one, and nothing is a lone surrogate."""
    pos = 0
    for piece in pieces:
        piece.encode("utf-8")  # raises on a lone surrogate
        for k, ch in enumerate(piece):
            assert pos + k < len(full), f"released text runs past the full decode: {pieces!r} vs {full!r}"
            if ch == "\ufffd":
                assert full[pos + k] == "\ufffd", (
                    f"piece {piece!r} releases U+FFFD at {pos + k} where the full decode has {full[pos + k]!r}"
                )
            assert ch == full[pos + k], f"piece {piece!r} diverges from {full!r} at {pos + k}"
        pos += len(piece)


# ---------------------------------------------------------------------------------------------- strategies

regular_ids = st.integers(0, REGULAR_MAX)
special_ids = st.sampled_from(list(SPECIAL_IDS))


@st.composite
def id_sequences(draw, fragments: list[int], max_size: int = 24):
    """Ids from the whole vocabulary, biased toward UTF-8 fragments, with some special tokens."""
    elem = st.one_of(regular_ids, st.sampled_from(fragments), st.sampled_from(fragments), special_ids)
    return draw(st.lists(elem, min_size=1, max_size=max_size))


group_sizes = st.lists(st.integers(1, 5), min_size=1, max_size=8)


# ---------------------------------------------------------------------------------------------- (a) + (b)


class TestIncrementalDetokenizer:
    @SETTINGS
    @given(data=st.data(), skip=st.booleans(), one_at_a_time=st.booleans())
    def test_concatenation_equals_full_decode(self, tok, fragment_ids, data, skip, one_at_a_time):
        ids = data.draw(id_sequences(fragment_ids))
        sizes = [1] if one_at_a_time else data.draw(group_sizes)
        full = tok.decode(ids, skip_special_tokens=skip)
        detok = IncrementalDetokenizer(tok, skip_special_tokens=skip)
        pieces = []
        for group in chunks_of(ids, sizes):
            pieces.append(detok.add(group))
            # never released ahead of what the final text will be: no retraction is ever needed
            assert full.startswith("".join(pieces)), (ids, pieces, full)
        pieces.append(detok.flush())
        assert "".join(pieces) == full
        assert_pieces_consistent(pieces[:-1], full)

    @SETTINGS
    @given(data=st.data())
    def test_pieces_never_hold_a_broken_sequence(self, tok, fragment_ids, data):
        """Property (b) on its own: before flush, no piece carries U+FFFD where the full decode has a real
        character, and no piece is cut inside a character."""
        ids = data.draw(id_sequences(fragment_ids, max_size=32))
        full = tok.decode(ids)
        detok = IncrementalDetokenizer(tok)
        pieces = [detok.add(g) for g in chunks_of(ids, data.draw(group_sizes))]
        assert_pieces_consistent(pieces, full)

    @SETTINGS
    @given(text=st.text(min_size=1, max_size=40), data=st.data())
    def test_valid_utf8_split_into_bytes_never_releases_replacement(self, tok, byte_id, text, data):
        """Valid text fed one byte-token at a time (every multi-byte character split across tokens and across
        add() calls): no piece ever contains U+FFFD and the concatenation is the text itself."""
        assume("\ufffd" not in text)
        ids = byte_ids(byte_id, text)
        detok = IncrementalDetokenizer(tok)
        pieces = [detok.add(g) for g in chunks_of(ids, data.draw(group_sizes))]
        assert all("\ufffd" not in p for p in pieces), pieces
        assert "".join(pieces) + detok.flush() == text == tok.decode(ids)
        # nothing was left for flush: every character had completed by the last add()
        assert "".join(pieces) == text

    def test_incomplete_tail_becomes_replacement_only_at_flush(self, tok, byte_id):
        ids = byte_ids(byte_id, "ab") + [byte_id[0xE4], byte_id[0xBD]]  # "ab" + 2 of the 3 bytes of "你"
        detok = IncrementalDetokenizer(tok)
        out = [detok.add([i]) for i in ids]
        assert "".join(out) == "ab"
        assert detok.flush() == tok.decode(ids)[2:]
        assert tok.decode(ids).startswith("ab\ufffd")

    def test_special_tokens_skipped_or_kept(self, tok):
        ids = tok.encode("Hi") + [151645] + tok.encode(" there")
        for skip in (True, False):
            detok = IncrementalDetokenizer(tok, skip_special_tokens=skip)
            out = "".join(detok.add([i]) for i in ids) + detok.flush()
            assert out == tok.decode(ids, skip_special_tokens=skip)
        assert "<|im_end|>" not in tok.decode(ids, skip_special_tokens=True)


class TestTextStreamWithoutStops:
    @SETTINGS
    @given(data=st.data(), skip=st.booleans())
    def test_stream_equals_full_decode(self, tok, fragment_ids, data, skip):
        ids = data.draw(id_sequences(fragment_ids))
        stream = TextStream(tok, skip_special_tokens=skip)
        pieces = [stream.push(g) for g in chunks_of(ids, data.draw(group_sizes))]
        pieces.append(stream.finish())
        full = tok.decode(ids, skip_special_tokens=skip)
        assert "".join(pieces) == full
        assert_pieces_consistent(pieces[:-1], full)
        assert stream.matched_stop is None


# ---------------------------------------------------------------------------------------------- (c) stops


def run(
    stream: TextStream,
    groups: Sequence[Sequence[int]],
    expected_prefix_of: str | None = None,
    finish: bool = True,
) -> list[str]:
    """Feed the groups as the scheduler does: no more pushes once a stop string matched."""
    pieces = []
    for g in groups:
        if stream.matched_stop is not None:
            break
        pieces.append(stream.push(g))
        if expected_prefix_of is not None:
            assert expected_prefix_of.startswith("".join(pieces)), (pieces, expected_prefix_of)
    if finish:
        pieces.append(stream.finish())
    return pieces


MULTIBYTE_STOPS = ["你好", "é!", "\U0001f642", "ab\U0001f600c", "\n\n", "STOP", "ü"]


class TestStopStrings:
    @pytest.mark.parametrize("stop", MULTIBYTE_STOPS)
    @pytest.mark.parametrize("no_stop_trim", [False, True])
    def test_split_stop_one_byte_per_token_and_per_push(self, tok, byte_id, stop, no_stop_trim):
        before, after = "xy z-", "tail text 你好 é! \U0001f642 more"
        text = before + stop + after
        ids = byte_ids(byte_id, text)
        stream = TextStream(tok, stop=[stop], no_stop_trim=no_stop_trim)
        expected = before + (stop if no_stop_trim else "")
        pieces = run(stream, [[i] for i in ids], expected_prefix_of=expected)
        assert "".join(pieces) == expected
        assert stream.matched_stop == stop

    @pytest.mark.parametrize("stop", MULTIBYTE_STOPS)
    def test_stop_chars_never_leak_before_the_stop_completes(self, tok, byte_id, stop):
        """Push every byte of the stop but the last: none of the stop's characters may have been released."""
        before = "lead "
        ids = byte_ids(byte_id, before + stop)
        stream = TextStream(tok, stop=[stop])
        released = "".join(stream.push([i]) for i in ids[:-1])
        assert released == before[: len(released)]
        assert len(released) <= len(before)
        assert stream.matched_stop is None
        released += stream.push(ids[-1:])
        assert released == before
        assert stream.matched_stop == stop
        assert stream.finish() == ""

    @SETTINGS
    @given(
        prefix=st.text(alphabet="ab é你好\U0001f642!\n", max_size=12),
        suffix=st.text(alphabet="ab é你好\U0001f642!\n", max_size=12),
        stop=st.sampled_from(MULTIBYTE_STOPS),
        sizes=group_sizes,
        no_stop_trim=st.booleans(),
        mixed=st.booleans(),
    )
    def test_stop_property_random_split(self, tok, byte_id, prefix, suffix, stop, sizes, no_stop_trim, mixed):
        text = prefix + stop + suffix
        # ids: either one token per byte, or real BPE tokens for the text around a byte-split stop
        if mixed:
            ids = tok.encode(prefix) + byte_ids(byte_id, stop) + tok.encode(suffix)
        else:
            ids = byte_ids(byte_id, text)
        full = tok.decode(ids)
        assert full == text
        i = full.find(stop)
        expected = full[: i + len(stop)] if no_stop_trim else full[:i]
        stream = TextStream(tok, stop=[stop], no_stop_trim=no_stop_trim)
        pieces = run(stream, chunks_of(ids, sizes), expected_prefix_of=expected)
        assert "".join(pieces) == expected
        assert stream.matched_stop == stop

    @SETTINGS
    @given(data=st.data(), no_stop_trim=st.booleans())
    def test_stop_property_random_ids(self, tok, fragment_ids, data, no_stop_trim):
        """A stop taken from the decode of random ids (possibly spanning fragment tokens) cuts the stream at its
        first occurrence, however the ids are grouped into pushes."""
        ids = data.draw(id_sequences(fragment_ids, max_size=20))
        full = tok.decode(ids)
        assume(len(full.replace("\ufffd", "")) >= 2)
        a = data.draw(st.integers(0, len(full) - 1))
        b = data.draw(st.integers(a + 1, min(len(full), a + 6)))
        stop = full[a:b]
        assume("\ufffd" not in stop)
        i = full.find(stop)
        expected = full[: i + len(stop)] if no_stop_trim else full[:i]
        stream = TextStream(tok, stop=[stop], no_stop_trim=no_stop_trim)
        pieces = run(stream, chunks_of(ids, data.draw(group_sizes)), expected_prefix_of=expected)
        assert "".join(pieces) == expected
        assert stream.matched_stop == stop

    @SETTINGS
    @given(data=st.data())
    def test_absent_stop_releases_everything(self, tok, fragment_ids, data):
        ids = data.draw(id_sequences(fragment_ids))
        full = tok.decode(ids)
        stop = "\x00never\x00"
        stream = TextStream(tok, stop=[stop, "Z\x01"])
        pieces = run(stream, chunks_of(ids, data.draw(group_sizes)), expected_prefix_of=full)
        assert "".join(pieces) == full
        assert stream.matched_stop is None

    def test_text_after_stop_in_same_push_is_not_released(self, tok):
        stream = TextStream(tok, stop=["STOP"])
        out = stream.push(tok.encode("hello STOP and then some more text"))
        assert out == "hello "
        assert stream.matched_stop == "STOP"
        assert stream.finish() == ""

    def test_no_stop_trim_includes_the_stop(self, tok):
        stream = TextStream(tok, stop=["你好"], no_stop_trim=True)
        out = stream.push(tok.encode("abc你好def")) + stream.finish()
        assert out == "abc你好"
        assert stream.matched_stop == "你好"

    @pytest.mark.parametrize("order", [0, 1])
    def test_earliest_stop_wins_regardless_of_list_order(self, tok, byte_id, order):
        stops = ["你好", "c", "é!"]
        stops = stops if order == 0 else stops[::-1]
        ids = byte_ids(byte_id, "é!abc你好")
        # all at once: "é!" (position 0) is the earliest
        s = TextStream(tok, stop=stops)
        assert s.push(ids) + s.finish() == ""
        assert s.matched_stop == "é!"
        # with a text where "c" comes first
        ids = byte_ids(byte_id, "abc你好é!")
        for groups in ([ids], [[i] for i in ids]):
            s = TextStream(tok, stop=stops)
            assert "".join(run(s, groups)) == "ab"
            assert s.matched_stop == "c"

    def test_earliest_position_wins_within_one_push(self, tok):
        """Two stops complete in the same push: the one that starts first cuts the text."""
        for stops in (["cd", "bcde"], ["bcde", "cd"]):
            s = TextStream(tok, stop=stops)
            assert s.push(tok.encode("abcdef")) + s.finish() == "a"
            assert s.matched_stop == "bcde"

    def test_stop_appearing_only_at_finish_is_caught(self, tok, byte_id):
        """The last push ends in an incomplete character, so its text ("!") is only decoded by flush();
        the stop "b!" must still be found there and nothing past it released."""
        stream = TextStream(tok, stop=["b!"])
        out = stream.push(byte_ids(byte_id, "ab"))
        out += stream.push([byte_id[ord("!")], byte_id[0xE4]])  # "!" + lead byte: window ends in U+FFFD
        assert stream.matched_stop is None
        assert "!" not in out
        out += stream.finish()
        assert out == "a"
        assert stream.matched_stop == "b!"

    def test_stop_held_back_text_released_at_finish_when_no_match(self, tok, byte_id):
        stream = TextStream(tok, stop=["你好吗"])
        ids = byte_ids(byte_id, "xx你好")  # a prefix of the stop at the end: held back, then released
        out = "".join(stream.push([i]) for i in ids)
        assert "你" not in out
        out += stream.finish()
        assert out == "xx你好"
        assert stream.matched_stop is None

    def test_stop_ignored_while_check_stop_false_then_text_released(self, tok):
        stream = TextStream(tok, stop=["END"])
        out = stream.push(tok.encode("abcEND"), check_stop=False)
        assert stream.matched_stop is None
        out += stream.finish(check_stop=False)
        assert out == "abcEND"

    def test_empty_stop_strings_are_ignored(self, tok):
        stream = TextStream(tok, stop=["", "xyz"])
        out = stream.push(tok.encode("hello")) + stream.finish()
        assert out == "hello"
        assert stream.matched_stop is None

    def test_push_after_stop_releases_nothing(self, tok):
        """After a stop matched, the choice is over: more ids (e.g. a token already in flight) must not
        release text past the stop, neither from push() nor from finish()."""
        stream = TextStream(tok, stop=["STOP"])
        out = stream.push(tok.encode("one STOP two"))
        assert out == "one " and stream.matched_stop == "STOP"
        late = stream.push(tok.encode(" three four five six"))
        late += stream.finish()
        assert late == "", f"text after the stop was released: {late!r}"
