"""Detokenization and stop checks per generated token: the previous windowed path against the streaming one.

Old: WindowedDetokenizer (two Python-side tokenizer.decode calls per token) under the previous TextStream (all
text kept, stops searched from sent - hold). New: IncrementalDetokenizer (tokenizers' DecodeStream) under
TextStream (stops searched in a bounded tail). Mixed English, Chinese and Python code with the Qwen2.5
tokenizer, one token per push as the scheduler does; µs of process CPU time per token, best of --repeats
runs (CPU time is less skewed than wall time by other work on a shared machine).

    python -m benchmarks.bench_detokenize [--tokens 1000,4000,16000] [--streams 64] [--repeats 5]
"""

from __future__ import annotations

import argparse
import os
import sys
import time
from collections.abc import Callable
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))

from mirador.default_model import default_model_dir  # noqa: E402
from processor.text_stream import IncrementalDetokenizer, TextStream, WindowedDetokenizer  # noqa: E402
from processor.tokenizer import Tokenizer  # noqa: E402
from tests.test_detokenize_fast import ReferenceTextStream  # noqa: E402

STOPS = ["</answer>", "\n\nUser:", "<|im_end|>x"]  # never in the text: every token is checked to the end
PARAGRAPHS = [
    "The scheduler plans each step a little ahead of the worker, so that the GPU never waits for the host. "
    "When a sequence finishes, its pages go back to the pool and the prefix cache keeps what may be reused.\n\n",
    "在多模态模型中，图像先被切成小块，再由视觉编码器转换为嵌入向量，最后与文本标记一起送入语言模型。"
    "这样，模型就可以回答关于图片内容的问题，例如：“这张照片里有几只猫？”\n\n",
    "```python\ndef merge_pages(pages: list[int], free: set[int]) -> list[int]:\n"
    "    # keep the order; drop pages already returned\n"
    "    return [p for p in pages if p not in free]\n```\n\n",
    "Results: 12.5 ms/step at batch 64 (±0.3), 1,050 tokens/s — a 2.1× gain over the eager path 🚀.\n\n",
]


def sample_ids(tok: Tokenizer, num_tokens: int) -> list[int]:
    ids: list[int] = []
    k = 0
    while len(ids) < num_tokens:
        ids += tok.encode(PARAGRAPHS[k % len(PARAGRAPHS)])
        k += 1
    return ids[:num_tokens]


def detok_run(cls: type, tok: Tokenizer) -> Callable[[list[list[int]]], None]:
    def run(streams: list[list[int]]) -> None:
        detoks = [cls(tok) for _ in streams]
        for step in range(len(streams[0])):
            for d, ids in zip(detoks, streams, strict=True):
                d.add([ids[step]])
        for d in detoks:
            d.flush()

    return run


def stream_run(cls: type, tok: Tokenizer, stop: list[str]) -> Callable[[list[list[int]]], None]:
    def run(streams: list[list[int]]) -> None:
        texts = [cls(tok, stop=stop) for _ in streams]
        for step in range(len(streams[0])):
            for t, ids in zip(texts, streams, strict=True):
                t.push([ids[step]])
        for t in texts:
            t.finish()

    return run


def best_us_per_token(
    run: Callable[[list[list[int]]], None], streams: list[list[int]], repeats: int
) -> float:
    n = sum(len(s) for s in streams)
    best = float("inf")
    for _ in range(repeats):
        start = time.process_time()
        run(streams)
        best = min(best, time.process_time() - start)
    return best / n * 1e6


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--tokens", default="1000,4000,16000", help="tokens of one stream, comma-separated")
    p.add_argument("--streams", type=int, default=64, help="streams interleaved token by token (last table)")
    p.add_argument("--stream-tokens", type=int, default=500, help="tokens of each interleaved stream")
    p.add_argument("--repeats", type=int, default=5)
    args = p.parse_args()
    tok = Tokenizer(default_model_dir())
    cases = [
        ("detokenize only", detok_run(WindowedDetokenizer, tok), detok_run(IncrementalDetokenizer, tok)),
        (
            "TextStream, no stops",
            stream_run(ReferenceTextStream, tok, []),
            stream_run(TextStream, tok, []),
        ),
        (
            f"TextStream, {len(STOPS)} stops",
            stream_run(ReferenceTextStream, tok, STOPS),
            stream_run(TextStream, tok, STOPS),
        ),
    ]
    rows = [(f"1 stream x {n}", [sample_ids(tok, n)]) for n in map(int, args.tokens.split(","))]
    text = sample_ids(tok, args.stream_tokens * 4)
    interleaved = [text[(k * 37) % len(text) :][: args.stream_tokens] for k in range(args.streams)]
    interleaved = [s + text[: args.stream_tokens - len(s)] for s in interleaved]
    rows.append((f"{args.streams} streams x {args.stream_tokens}", interleaved))
    decoded = tok.decode(rows[0][1][0])
    print(f"text sample: {decoded[:120]!r}...")
    print(f"load average {os.getloadavg()[0]:.1f} on {os.cpu_count()} CPUs")
    print(f"{'case':<24} {'tokens':<22} {'old µs/tok':>11} {'new µs/tok':>11} {'speed-up':>9}")
    for name, old, new in cases:
        for label, streams in rows:
            t_old = best_us_per_token(old, streams, args.repeats)
            t_new = best_us_per_token(new, streams, args.repeats)
            print(f"{name:<24} {label:<22} {t_old:>11.2f} {t_new:>11.2f} {t_old / t_new:>8.1f}x")


if __name__ == "__main__":
    main()
