"""The benchmark's requests: prompts of exact token lengths (random ids or synthetic conversation) and synthetic
images, all drawn from one seed so that every backend sees the same workload."""

from __future__ import annotations

import base64
import io
from dataclasses import dataclass, field
from typing import Any

import numpy as np
from PIL import Image

from mirador.bench.args import BenchArgs
from processor.tokenizer import Tokenizer


@dataclass
class BenchRequest:
    index: int
    prompt_ids: list[int]  # the whole prompt of a text request; the text part of an image request
    prompt_text: str  # what an image request sends as its text part
    output_len: int
    image_urls: list[str] = field(default_factory=list)  # data URIs; none: a text request

    def messages(self) -> list[dict[str, Any]]:
        """The chat an image request sends: its images, then its text."""
        parts: list[dict[str, Any]] = [
            {"type": "image_url", "image_url": {"url": u}} for u in self.image_urls
        ]
        return [{"role": "user", "content": [*parts, {"type": "text", "text": self.prompt_text}]}]

    def openai_request(self, model: str, extra: dict[str, Any]) -> tuple[str, dict[str, Any]]:
        """(path, body): text requests go to /v1/completions as token ids (exact input length), image requests to
        /v1/chat/completions. Exactly output_len tokens come back (ignore_eos, min_tokens = max_tokens)."""
        body: dict[str, Any] = {
            "model": model,
            "max_tokens": self.output_len,
            "min_tokens": self.output_len,
            "ignore_eos": True,
            "temperature": 0.0,
            "stream": True,
            # continuous_usage_stats: servers that honour it (vLLM, SGLang) give each chunk's token count
            "stream_options": {"include_usage": True, "continuous_usage_stats": True},
            **extra,
        }
        if self.image_urls:
            return "/v1/chat/completions", {**body, "messages": self.messages()}
        return "/v1/completions", {**body, "prompt": self.prompt_ids}


def build_workload(args: BenchArgs, tokenizer: Tokenizer, num: int, stream: int) -> list[BenchRequest]:
    """`num` requests; `stream` 0 is the timed run, 1 the warm-up. Lengths, ids and images come from separate
    generators, so adding images does not change the prompts."""
    if num == 0:
        return []
    lengths_rng, text_rng, image_rng = (
        np.random.default_rng(s) for s in np.random.SeedSequence([args.seed, stream]).spawn(3)
    )
    input_lens = _lengths(lengths_rng, num, args.random_input_len, args.random_range_ratio)
    output_lens = _lengths(lengths_rng, num, args.random_output_len, args.random_range_ratio)
    images = ImageSource(args, image_rng)
    vocab = base_vocab_size(tokenizer)
    prefixes = shared_prefixes(args, vocab)
    out = []
    for i in range(num):
        if args.dataset == "random":
            ids = text_rng.integers(0, vocab, size=input_lens[i]).tolist()
        elif prefixes:  # the same stream of suffixes as "random", after a group's prefix drawn independently
            group = int(lengths_rng.integers(len(prefixes)))
            ids = prefixes[group] + text_rng.integers(0, vocab, size=input_lens[i]).tolist()
        else:
            ids = conversation_ids(tokenizer, text_rng, int(input_lens[i]))
        urls = images.next() if has_images(i, args.num_images, args.image_ratio) else []
        text = exact_text(tokenizer, ids) if urls else ""
        out.append(BenchRequest(i, ids, text, int(output_lens[i]), urls))
    return out


def shared_prefixes(args: BenchArgs, vocab: int) -> list[list[int]]:
    """generated-shared-prefix: the groups' system prompts (random ids of a generator of their own, the same for
    the timed run and the warm-up, so a warm-up may cache them as real traffic would)."""
    if args.dataset != "generated-shared-prefix":
        return []
    if args.gsp_num_groups < 1 or args.gsp_system_prompt_len < 1:
        raise ValueError("--gsp-num-groups and --gsp-system-prompt-len must be >= 1")
    rng = np.random.default_rng([args.seed, 7919])
    return [
        rng.integers(0, vocab, size=args.gsp_system_prompt_len).tolist() for _ in range(args.gsp_num_groups)
    ]


def _lengths(rng: np.random.Generator, num: int, full: int, ratio: float) -> np.ndarray:
    """SGLang's --random-range-ratio: uniform in [full * ratio, full]."""
    return rng.integers(max(int(full * ratio), 1), full + 1, size=num)


def has_images(index: int, num_images: int, ratio: float) -> bool:
    """A `ratio` fraction of the requests, spread evenly (ratio 0.25: every 4th)."""
    return num_images > 0 and int((index + 1) * ratio) > int(index * ratio)


def base_vocab_size(tokenizer: Tokenizer) -> int:
    """Ids below the first added token: random prompts never hold special or image-placeholder tokens."""
    added = tokenizer.hf.added_tokens_decoder
    return min(added) if added else tokenizer.vocab_size


def exact_text(tokenizer: Tokenizer, ids: list[int], tries: int = 8) -> str:
    """A text that encodes back to len(ids) tokens where that can be reached (random ids rarely round-trip)."""
    n = len(ids)
    text = tokenizer.decode(ids)
    for _ in range(tries):
        again = tokenizer.encode(text)
        if len(again) == n:
            break
        filler = tokenizer.encode(" hello" * (n - len(again))) if len(again) < n else []
        text = tokenizer.decode((again + filler)[:n])
    return text


class ImageSource:
    """Random-noise images as data URIs: new ones per request, or one set for all with --same-image."""

    def __init__(self, args: BenchArgs, rng: np.random.Generator):
        self.num, self.size, self.format = args.num_images, args.image_wh, args.image_format
        self.rng = rng
        self.fixed = [self._one() for _ in range(self.num)] if args.same_image and self.num else None

    def next(self) -> list[str]:
        return self.fixed if self.fixed is not None else [self._one() for _ in range(self.num)]

    def _one(self) -> str:
        w, h = self.size
        pixels = self.rng.integers(0, 256, size=(h, w, 3), dtype=np.uint8)
        buf = io.BytesIO()
        Image.fromarray(pixels).save(
            buf, format=self.format.upper(), **({"quality": 90} if self.format == "jpeg" else {})
        )
        return f"data:image/{self.format};base64,{base64.b64encode(buf.getvalue()).decode()}"


# ---- synthetic conversational English (no dataset download) ----

TOPICS = (
    "the history of the printing press",
    "how vaccines train the immune system",
    "sourdough baking",
    "the rules of chess openings",
    "saving for retirement",
    "learning a second language as an adult",
    "how black holes form",
    "training for a first marathon",
    "the causes of the French Revolution",
    "keeping houseplants alive",
    "writing a cover letter",
    "how compilers optimise loops",
    "the water cycle",
    "planning a trip to Japan",
    "photosynthesis",
    "negotiating a salary",
    "the basics of music theory",
    "composting at home",
    "how GPS finds your position",
    "public speaking",
)
ASKS = (
    "Can you explain {t} in simple terms?",
    "I have been reading about {t}. Where should a beginner start?",
    "What are the most common mistakes people make with {t}?",
    "Could you give me a step by step plan for {t}?",
    "My friend says {t} is overrated. What do you think?",
    "Please summarise the key ideas behind {t}.",
    "How would you teach {t} to a curious ten year old?",
    "What changed in our understanding of {t} recently?",
)
ANSWERS = (
    "Sure! The short version is that {t} rests on a few simple ideas, and once you see them the rest follows.",
    "Great question. Most people start with the basics of {t}, then practise a little every day.",
    "There are three things to keep in mind about {t}: patience, good sources, and honest feedback.",
    "It depends on your goals, but a practical approach to {t} is to begin small and build up slowly.",
    "A common mistake with {t} is trying to do everything at once instead of focusing on one habit.",
)
DETAILS = (
    "For example, you could set aside twenty minutes each evening and keep short notes.",
    "Many experts recommend reading one good book first and then trying things yourself.",
    "If something feels confusing, break it into smaller questions and tackle them one by one.",
    "It also helps to talk with people who have done it before, since they know the pitfalls.",
    "Keep in mind that progress is rarely linear, and plateaus are perfectly normal.",
    "That said, the details vary a lot from person to person, so adjust as you go.",
)


def conversation_ids(tokenizer: Tokenizer, rng: np.random.Generator, num_tokens: int) -> list[int]:
    """A user/assistant exchange of exactly num_tokens tokens, extended turn by turn and then cut."""
    ids: list[int] = []
    while len(ids) < num_tokens:
        turn = _turn(rng)
        ids.extend(tokenizer.encode(("\n\n" if ids else "") + turn))
    return ids[:num_tokens]


def _turn(rng: np.random.Generator) -> str:
    topic = TOPICS[rng.integers(len(TOPICS))]
    ask = ASKS[rng.integers(len(ASKS))].format(t=topic)
    answer = ANSWERS[rng.integers(len(ANSWERS))].format(t=topic)
    details = " ".join(DETAILS[k] for k in rng.permutation(len(DETAILS))[: rng.integers(1, 4)])
    return f"User: {ask}\n\nAssistant: {answer} {details}"
