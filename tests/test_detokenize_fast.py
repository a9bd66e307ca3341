"""The streaming detokenizer and stop search against the windowed reference and the full decode.

IncrementalDetokenizer (DecodeStream in Rust) must release, add by add, exactly what WindowedDetokenizer (the
previous implementation, kept as the reference) releases on the byte-level Qwen2.5 tokenizer; TextStream must
release, push by push, what the previous TextStream (re-scanning all its text, below) released. Byte-fallback
and Metaspace tokenizers, built here, check the cases where windows meet non-local decoders.
"""

from __future__ import annotations

import dataclasses
import json
import random
from collections.abc import Sequence
from pathlib import Path

import pytest
from tokenizers import AddedToken, decoders, models
from tokenizers import Tokenizer as RustTokenizer

from mirador.default_model import default_model_dir
from processor.text_stream import IncrementalDetokenizer, TextStream, WindowedDetokenizer
from processor.tokenizer import Tokenizer

REGULAR_MAX = 151642
SPECIAL_IDS = list(range(151643, 151665))  # special=True up to 151656, plain added tokens after
ALPHABET = (
    "the quick brown fox jumps over lazy dogs. 你好世界，这是一个测试。 def f(x):\n    return x ** 2  # "
    "😀🎉🙂 é ü ß ¿ 𝔘 \t{}[]()<>'\"` STOP END\n\n"
)


class ReferenceTextStream:
    """The previous TextStream, verbatim but for its detokenizer: all text kept, stops searched from sent - hold."""

    def __init__(self, tokenizer, *, skip_special_tokens=True, stop=(), no_stop_trim=False):
        self.detok = WindowedDetokenizer(tokenizer, skip_special_tokens)
        self.stop = [s for s in stop if s]
        self.hold = max((len(s) for s in self.stop), default=1) - 1
        self.no_stop_trim = no_stop_trim
        self.text = ""
        self.sent = 0
        self.matched_stop = None

    def push(self, ids, check_stop=True):
        if self.matched_stop is not None:
            return ""
        self.text += self.detok.add(ids)
        return self._release(final=False, check_stop=check_stop)

    def finish(self, check_stop=True):
        if self.matched_stop is None:
            self.text += self.detok.flush()
        return self._release(final=True, check_stop=check_stop)

    def _release(self, final, check_stop):
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


class CountingTokenizer:
    """Our Tokenizer with no backend (forces the Python windows) and a record of every decode's length."""

    def __init__(self, tok: Tokenizer):
        self.tok = tok
        self.decoded_lengths: list[int] = []

    def decode(self, ids, skip_special_tokens=True):
        self.decoded_lengths.append(len(ids))
        return self.tok.decode(ids, skip_special_tokens)


# ---------------------------------------------------------------------------------------------- fixtures


@pytest.fixture(scope="module")
def tok() -> Tokenizer:
    return Tokenizer(default_model_dir())


@pytest.fixture(scope="module")
def pools(tok) -> dict[str, list[int]]:
    """Ids by kind: UTF-8 fragments, single-byte tokens, real BPE tokens of mixed text, special tokens."""
    fragments, single_bytes = [], {}
    for i in range(REGULAR_MAX + 1):
        b = tok.token_bytes(i)
        if len(b) == 1:
            single_bytes.setdefault(b[0], i)
        try:
            b.decode("utf-8")
        except UnicodeDecodeError:
            fragments.append(i)
    assert len(fragments) > 200 and len(single_bytes) == 256
    return {
        "fragment": fragments,
        "byte": [single_bytes[b] for b in range(256)],
        "text": sorted(set(tok.encode(ALPHABET * 3))),
        "special": SPECIAL_IDS,
    }


def random_ids(rng: random.Random, tok: Tokenizer, pools, n: int) -> list[int]:
    """Runs of real text tokens, text split into one token per UTF-8 byte, fragments and special tokens."""
    ids: list[int] = []
    while len(ids) < n:
        kind = rng.random()
        if kind < 0.35:
            ids += tok.encode("".join(rng.choice(ALPHABET) for _ in range(rng.randint(1, 12))))
        elif kind < 0.6:
            text = "".join(rng.choice(ALPHABET) for _ in range(rng.randint(1, 4)))
            ids += [pools["byte"][b] for b in text.encode()]
        elif kind < 0.8:
            ids += rng.choices(pools["fragment"], k=rng.randint(1, 3))
        elif kind < 0.9:
            ids.append(rng.choice(pools["special"]))
        else:
            ids.append(rng.randint(0, REGULAR_MAX))
    return ids[:n]


def groups_of(rng: random.Random, ids: Sequence[int], one_at_a_time: bool) -> list[list[int]]:
    out, i = [], 0
    while i < len(ids):
        n = 1 if one_at_a_time else rng.randint(1, 5)
        out.append(list(ids[i : i + n]))
        i += n
    return out


def random_stops(rng: random.Random, full: str) -> list[str]:
    """Stops cut from the text itself (so they match, possibly across tokens) and some that never match."""
    stops = []
    for _ in range(rng.randint(1, 3)):
        if full and rng.random() < 0.7:
            a = rng.randrange(len(full))
            stops.append(full[a : a + rng.randint(1, 6)])
        else:
            stops.append(rng.choice(["你好", "\n\n", "STOP", "🙂", "é!", "\x00never", "x"]))
    return stops


# ---------------------------------------------------------------------------------------------- detokenizer


class TestEquivalence:
    @pytest.mark.parametrize("seed", range(4))
    def test_pieces_equal_windowed_reference_and_full_decode(self, tok, pools, seed):
        rng = random.Random(seed)
        for trial in range(150):
            ids = random_ids(rng, tok, pools, rng.randint(1, 40))
            skip = rng.random() < 0.5
            groups = groups_of(rng, ids, one_at_a_time=rng.random() < 0.5)
            new, ref = IncrementalDetokenizer(tok, skip), WindowedDetokenizer(tok, skip)
            got = [new.add(g) for g in groups] + [new.flush()]
            want = [ref.add(g) for g in groups] + [ref.flush()]
            assert got == want, (seed, trial, ids, skip)
            assert "".join(got) == tok.decode(ids, skip_special_tokens=skip), (seed, trial, ids)

    @pytest.mark.parametrize("seed", range(4))
    def test_text_stream_equals_reference_stream(self, tok, pools, seed):
        """Random stops, no_stop_trim, and stops not checked for the first pushes (min_tokens): every push
        releases what the previous TextStream released, and the stop found is the same."""
        rng = random.Random(100 + seed)
        for trial in range(150):
            ids = random_ids(rng, tok, pools, rng.randint(1, 40))
            skip = rng.random() < 0.7
            stops = random_stops(rng, tok.decode(ids, skip_special_tokens=skip))
            no_stop_trim = rng.random() < 0.3
            min_pushes = rng.choice([0, 0, rng.randint(1, 10)])
            kwargs = dict(skip_special_tokens=skip, stop=stops, no_stop_trim=no_stop_trim)
            new, ref = TextStream(tok, **kwargs), ReferenceTextStream(tok, **kwargs)
            got, want = [], []
            for k, g in enumerate(groups_of(rng, ids, one_at_a_time=rng.random() < 0.5)):
                got.append(new.push(g, check_stop=k >= min_pushes))
                want.append(ref.push(g, check_stop=k >= min_pushes))
                assert new._num_held <= new.hold and len(new._tail) <= 2 * new.hold
            got.append(new.finish())
            want.append(ref.finish())
            where = (seed, trial, ids, kwargs, min_pushes)
            assert got == want, where
            assert new.matched_stop == ref.matched_stop, where
            if min_pushes == 0:
                # the stop that completes first wins (a longer one starting earlier may still be incomplete);
                # the text is cut at its first occurrence
                full, s = tok.decode(ids, skip_special_tokens=skip), new.matched_stop
                if s is None:
                    assert not any(x in full for x in stops), where
                else:
                    full = full[: full.find(s) + (len(s) if no_stop_trim else 0)]
                assert "".join(got) == full, where

    def test_long_mixed_text(self, tok):
        text = (
            "Streaming 文本 with emoji 🙂🎉 and code: `for i in range(10): print(i)`\n"
            "第二段：中文标点、数字 12345 和 English words.\n"
        ) * 80
        ids = tok.encode(text)
        assert len(ids) > 2000
        detok = IncrementalDetokenizer(tok)
        assert "".join(detok.add([i]) for i in ids) + detok.flush() == text
        assert len(detok._ids) <= 64 + 8, "the detokenizer keeps more than a bounded window of ids"


class TestBoundedWork:
    def test_windowed_path_decodes_only_small_windows(self, tok):
        """Without a backend the windows are decoded in Python: every decode is short, at flush too (the
        reference decodes the whole sequence there)."""
        ids = tok.encode("一二三四五六七八九十 and some words in between 🙂 " * 60)
        counting = CountingTokenizer(tok)
        detok = IncrementalDetokenizer(counting)
        text = "".join(detok.add([i]) for i in ids) + detok.flush()
        assert text == tok.decode(ids)
        assert max(counting.decoded_lengths) <= 8

        counting.decoded_lengths.clear()
        ref = WindowedDetokenizer(counting)
        assert "".join(ref.add([i]) for i in ids) + ref.flush() == text
        assert max(counting.decoded_lengths) == len(ids)  # the check above can fail

    def test_rust_path_does_not_call_python_decode_per_token(self, tok):
        calls = []

        class Spy(Tokenizer):
            def decode(self, ids, skip_special_tokens=True):
                calls.append(len(ids))
                return super().decode(ids, skip_special_tokens)

        spy = object.__new__(Spy)
        spy.__dict__.update(tok.__dict__)
        detok = IncrementalDetokenizer(spy)
        ids = tok.encode("hello 世界 " * 100) + [151645]
        assert "".join(detok.add([i]) for i in ids) + detok.flush() == tok.decode(ids)
        assert calls == []

    def test_stop_search_looks_at_a_bounded_tail(self, tok):
        stream = TextStream(tok, stop=["<<END>>", "zz"])
        ids = tok.encode("lorem ipsum dolor sit amet, 中文也有 " * 200 + "<<END>> after")
        pieces = []
        for i in ids:
            pieces.append(stream.push([i]))
            assert len(stream._tail) <= 2 * stream.hold
            if stream.matched_stop:
                break
        assert "".join(pieces) + stream.finish() == "lorem ipsum dolor sit amet, 中文也有 " * 200
        assert stream.matched_stop == "<<END>>"


class TestFallbacks:
    def test_no_backend_matches_reference(self, tok, pools):
        rng = random.Random(7)
        for _ in range(100):
            ids = random_ids(rng, tok, pools, rng.randint(1, 30))
            groups = groups_of(rng, ids, one_at_a_time=False)
            new = IncrementalDetokenizer(CountingTokenizer(tok))
            ref = WindowedDetokenizer(tok)
            got = [new.add(g) for g in groups] + [new.flush()]
            assert got == [ref.add(g) for g in groups] + [ref.flush()]

    def test_refused_step_continues_in_python(self, tok, pools):
        """DecodeStream raising mid-stream (InvalidPrefix, or an old tokenizers whose step takes one id) hands
        over to the Python windows with nothing lost or repeated."""

        class Refusing:
            def step(self, backend, ids):
                raise TypeError("argument 'id': 'list' object cannot be interpreted as an integer")

        rng = random.Random(11)
        for _ in range(60):
            ids = random_ids(rng, tok, pools, rng.randint(2, 30))
            cut = rng.randrange(1, len(ids))
            detok = IncrementalDetokenizer(tok)
            out = [detok.add([i]) for i in ids[:cut]]
            detok._stream = Refusing()
            out += [detok.add([i]) for i in ids[cut:]] + [detok.flush()]
            assert "".join(out) == tok.decode(ids)
            assert detok._stream is None

    def test_clean_up_spaces_tokenizer_has_no_backend(self, tok):
        clean = object.__new__(Tokenizer)
        clean.__dict__.update({k: v for k, v in tok.__dict__.items() if k != "backend"})
        clean.hf = type("Hf", (), {"clean_up_tokenization_spaces": True, "backend_tokenizer": object()})()
        assert clean.backend is None
        assert tok.backend is tok.hf.backend_tokenizer


# ---------------------------------------------------------------------------------------------- other decoders

SP_PIECES = ["▁", "▁hello", "▁world", "hello", "lo", "▁你好", "你", "好", "!", "▁a", "b", "é", "▁😀", "\n"]


def sentencepiece_style(tmp: Path, decoder) -> tuple[Tokenizer, int]:
    """A Llama-2-like tokenizer: ▁ for spaces, <0xXX> byte pieces, <s> and </s> special."""
    vocab = {"<unk>": 0, "<s>": 1, "</s>": 2}
    vocab.update({f"<0x{b:02X}>": 3 + b for b in range(256)})
    vocab.update({p: 259 + k for k, p in enumerate(SP_PIECES)})
    rust = RustTokenizer(models.BPE(vocab=vocab, merges=[], unk_token="<unk>", byte_fallback=True))
    rust.decoder = decoder
    rust.add_special_tokens([AddedToken("<s>", special=True), AddedToken("</s>", special=True)])
    rust.save(str(tmp / "tokenizer.json"))
    (tmp / "tokenizer_config.json").write_text(json.dumps({"clean_up_tokenization_spaces": False}))
    return Tokenizer(tmp), len(vocab)


BYTE_FALLBACK = decoders.Sequence(
    [decoders.Replace("▁", " "), decoders.ByteFallback(), decoders.Fuse(), decoders.Strip(" ", 1, 0)]
)


@pytest.mark.parametrize("kind", ["byte_fallback", "metaspace"])
def test_sentencepiece_style_streams_equal_full_decode(tmp_path, kind):
    decoder = BYTE_FALLBACK if kind == "byte_fallback" else decoders.Metaspace("▁", prepend_scheme="always")
    sp, vocab_size = sentencepiece_style(tmp_path, decoder)
    by_piece = {p: sp.token_to_id(p) for p in SP_PIECES}
    rng = random.Random(3)
    for trial in range(600):
        if rng.random() < 0.5:
            ids = [rng.randrange(vocab_size) for _ in range(rng.randint(1, 14))]
        else:  # valid characters as byte pieces between words, the way byte fallback is used
            ids = []
            for _ in range(rng.randint(1, 6)):
                ids.append(by_piece[rng.choice(SP_PIECES)])
                ids += [3 + b for b in rng.choice(["ü", "你", "🙂", "x"]).encode()]
        skip = rng.random() < 0.5
        full = sp.decode(ids, skip_special_tokens=skip)
        detok = IncrementalDetokenizer(sp, skip)
        pieces = []
        for g in groups_of(rng, ids, one_at_a_time=rng.random() < 0.5):
            pieces.append(detok.add(g))
            assert full.startswith("".join(pieces)), (trial, sp.convert_ids_to_tokens(ids), pieces, full)
        assert "".join(pieces) + detok.flush() == full, (trial, sp.convert_ids_to_tokens(ids))


def test_byte_fallback_run_is_held_until_it_ends(tmp_path):
    """ByteFallback decodes a run of <0xXX> pieces as one: one invalid byte turns the whole run, valid bytes
    included, into U+FFFDs. The windowed reference had released the valid byte already and diverged from
    the full decode; the stream holds a run back until a non-byte piece (or the end) closes it."""
    sp, _ = sentencepiece_style(tmp_path, BYTE_FALLBACK)
    ids = [sp.token_to_id("▁hello"), 3 + ord("A"), 3 + 0xE4, sp.token_to_id("▁world")]
    full = sp.decode(ids)
    assert full == "hello\ufffd\ufffd world"
    ref = WindowedDetokenizer(sp)
    assert "".join(ref.add([i]) for i in ids) + ref.flush() != full  # the reference released "A"
    detok = IncrementalDetokenizer(sp)
    out = [detok.add([i]) for i in ids]
    assert out == ["hello", "", "", "\ufffd\ufffd world"]
    assert detok.flush() == ""
    # a valid run is released as soon as the next piece comes
    detok = IncrementalDetokenizer(sp)
    ids = [3 + b for b in "ü".encode()] + [sp.token_to_id("!")]
    assert [detok.add([i]) for i in ids] == ["", "", "ü!"]


@pytest.mark.parametrize("seed", range(4))
def test_add_token_equals_add(tok, pools, seed):
    """add_token (a lookup while ids decode to whole characters alone, DecodeStream otherwise) releases what
    add() of the same single id releases, interleaved with multi-id adds, special ids and byte pieces."""
    rng = random.Random(200 + seed)
    for trial in range(150):
        ids = random_ids(rng, tok, pools, rng.randint(1, 60))
        skip = rng.random() < 0.5
        new, ref = IncrementalDetokenizer(tok, skip), WindowedDetokenizer(tok, skip)
        got, want = [], []
        for g in groups_of(rng, ids, one_at_a_time=rng.random() < 0.7):
            got.append(new.add_token(g[0]) if len(g) == 1 else new.add(g))
            want.append(ref.add(g))
        got.append(new.flush())
        want.append(ref.flush())
        assert got == want, (seed, trial, ids, skip)
        assert "".join(got) == tok.decode(ids, skip_special_tokens=skip), (seed, trial, ids)


def test_add_token_takes_the_shortcut_for_plain_text(tok):
    ids = tok.encode("The quick brown fox jumps over the lazy dog, again and again. " * 8)
    detok = IncrementalDetokenizer(tok)
    calls = 0

    class Counting:
        def __init__(self, inner):
            self.inner = inner

        def step(self, backend, token):
            nonlocal calls
            calls += 1
            return self.inner.step(backend, token)

    detok._stream = Counting(detok._stream)
    assert "".join(detok.add_token(i) for i in ids) + detok.flush() == tok.decode(ids)
    assert calls == 0


def test_prepared_table_equals_the_one_filled_as_ids_come(tok):
    """prepare_detokenizer's batch decode of the whole vocabulary gives every id the text the lazy fill gives
    it (added tokens and ids that are not whole characters alone: ""), and add_token then uses it."""
    from processor.text_stream import _clean_texts, _CleanTexts, prepare_detokenizer

    lazy, batch = _CleanTexts(tok.backend), _CleanTexts(tok.backend)
    batch.fill()
    assert None not in batch.texts
    assert [lazy.text(i) for i in range(len(lazy.texts))] == batch.texts
    assert any(t == "" for t in batch.texts) and sum(bool(t) for t in batch.texts) > 100_000
    prepare_detokenizer(tok)
    assert None not in _clean_texts(tok.backend).texts
    ids = tok.encode("prepared: the quick brown fox, 你好世界 ü") + [
        len(batch.texts) + 5
    ]  # one past the table
    detok = IncrementalDetokenizer(tok)
    assert "".join(detok.add_token(i) for i in ids) + detok.flush() == tok.decode(ids)


@pytest.mark.parametrize("seed", range(4))
def test_scheduler_inline_path_streams_what_decode_gives(tok, pools, seed, monkeypatch):
    """The scheduler applies the common token inline (the detokenizer's add_token, its shortcut a list lookup):
    the text streamed through its delta columns (and the final output) must equal decode() of the ids, across runs
    of whole-character tokens (the shortcut) and fragments, byte tokens and special tokens (DecodeStream, which
    must catch up on the ids the shortcut released). The scheduler's other tests use a one-character-per-id
    tokenizer, which never takes the shortcut."""
    from common.types import DeltaColumns, GenerateRequest, StepOutput, StoppingCriteria
    from processor.text_stream import prepare_detokenizer
    from scheduler_svc.scheduler import Scheduler, SchedulerPolicy

    general = []  # tokens that went through the general path instead of the inline one
    on_sample = Scheduler._on_sample
    monkeypatch.setattr(Scheduler, "_on_sample", lambda self, *a: general.append(1) or on_sample(self, *a))
    prepare_detokenizer(tok)
    rng = random.Random(seed)
    script = [i for i in random_ids(rng, tok, pools, 300) if i not in SPECIAL_IDS or rng.random() < 0.5]
    policy = SchedulerPolicy(
        page_size=16,
        num_pages=64,
        context_length=4096,
        max_running_requests=4,
        chunked_prefill_size=-1,
        max_prefill_tokens=4096,
        vocab_size=len(tok.backend.get_vocab()) + 1024,
    )
    core = Scheduler(policy, tok)
    deltas = DeltaColumns()
    stopping = StoppingCriteria(max_new_tokens=len(script), ignore_eos=True)
    core.add_request(GenerateRequest("r", (1, 2, 3), stopping=stopping), deltas=deltas)
    sampled, text, inflight = iter(script), [], []
    while core.requests:
        plan = core.schedule()  # one step ahead of the results, as the service runs: decodes go in columns
        if plan is not None:
            inflight.append(plan)
        if len(inflight) > 1 or (plan is None and inflight):
            done = inflight.pop(0)
            ids = [s.seq_id for s in done.seqs if s.sample] + list(done.decode_seq_ids)
            out = StepOutput(done.step_id, (), (), done.num_tokens, sampled_seq_ids=tuple(ids))
            core.process_output(dataclasses.replace(out, sampled_token_ids=tuple(next(sampled) for _ in ids)))
        text += [o.text for o in deltas.take().outputs()] + [o.text for o in core.outputs]
        core.outputs.clear()
    assert "".join(text) == tok.decode(script)
    assert len(general) < 0.1 * len(script)  # the inline path took the rest
