"""The worker's warm-up: steps that run every kernel variant serving will meet, before the first request does."""

from __future__ import annotations

from common.types import MultimodalItem, SamplingParams, SeqInit, SeqStep, StepPlan


def warmup_plans(page_size: int, num_pages: int) -> list[StepPlan]:
    """Steps that run every kernel variant serving will meet before the first request does (Triton compiles a
    variant the first time it sees a new specialisation, which would stall a live step for a second): prefills of
    awkward and aligned lengths, several sequences at once, a step mixing decodes with a prefill chunk, decodes of
    the whole batch, the sampler's greedy, truncated, penalised and log-prob paths; then frees everything."""
    lengths = (17, 16, 32, 5)
    params = (
        SamplingParams(temperature=0.0),
        SamplingParams(temperature=0.7, top_p=0.9, top_k=50, seed=1),
        SamplingParams(temperature=0.0, repetition_penalty=1.1, frequency_penalty=0.1, return_logprob=True,
                       top_logprobs=2),
        SamplingParams(temperature=1.0, min_p=0.05),
    )  # fmt: skip
    need = [-(-(n + 4) // page_size) for n in lengths]
    if sum(need) >= num_pages:  # a tiny KV cache: one short sequence
        lengths, params, need = lengths[:1], params[:1], need[:1]
    pages, first = [], 1
    for n in need:
        pages.append(tuple(range(first, first + n)))
        first += n
    ids = [tuple(range(100, 100 + n)) for n in lengths]

    def init(i: int) -> SeqInit:
        return SeqInit((), params[i], lengths[i], ids[i] if params[i].needs_prompt_ids else ())

    def prefill(i: int, sample: bool = True, upto: int | None = None) -> SeqStep:
        return SeqStep(f"warmup-{i}", 0, ids[i][:upto], sample, 0, pages[i], init(i))

    def decode(i: int, extra: int) -> SeqStep:
        return SeqStep(f"warmup-{i}", lengths[i] + extra, (), True)

    if len(lengths) == 1:
        return [StepPlan(0, (prefill(0),)), StepPlan(0, (decode(0, 0),)), StepPlan(0, (), ("warmup-0",))]
    last = len(lengths) - 1
    return [
        StepPlan(0, (prefill(0),)),
        StepPlan(0, (prefill(1), prefill(2))),
        StepPlan(0, (decode(0, 0), decode(1, 0), decode(2, 0), prefill(last, False, 2))),
        StepPlan(0, (decode(0, 1), decode(1, 1), decode(2, 1),
                     SeqStep(f"warmup-{last}", 2, ids[last][2:], True))),
        StepPlan(0, tuple(decode(i, 2 if i < last else 0) for i in range(len(lengths)))),
        StepPlan(0, (), tuple(f"warmup-{i}" for i in range(len(lengths)))),
    ]  # fmt: skip


WARMUP_IMAGE_KEY = "warmup-image"


def image_warmup_plans(
    page_size: int, num_pages: int, grid: tuple[int, int, int], merge: int
) -> list[StepPlan]:
    """A prompt with an image span in its middle (embedding rows replace token embeddings, M-RoPE positions
    follow the image grid), alone and beside a decode; then frees it. The caller makes the embedding of
    WARMUP_IMAGE_KEY resident first."""
    n_img = grid[0] * grid[1] * grid[2] // (merge * merge)
    ids = (100,) * 3 + (0,) * n_img + (101,) * 5
    need = -(-(len(ids) + 4) // page_size)
    if need + 1 >= num_pages:
        return []
    item = MultimodalItem(WARMUP_IMAGE_KEY, 3, n_img, grid)
    init = SeqInit((item,), SamplingParams(temperature=0.0), len(ids))
    pages = tuple(range(1, need + 1))
    return [
        StepPlan(0, (SeqStep("warmup-image", 0, ids, True, 0, pages, init),)),
        StepPlan(0, (SeqStep("warmup-image", len(ids), (), True),)),
        StepPlan(0, (), ("warmup-image",)),
    ]


def encoder_warmup_plans(page_size: int, num_pages: int, image_token_id: int) -> list[StepPlan]:
    """Families with an encoder cache (Llama 3.2 Vision): a prompt with one <|image|> whose K/V go into encoder
    page 1 (projections and the page write), its cross-attention prefill and a decode; then frees it. The caller
    makes the embedding of WARMUP_IMAGE_KEY resident first."""
    ids = (100,) * 3 + (image_token_id,) + (101,) * 5
    need = -(-(len(ids) + 4) // page_size)
    if need + 1 >= num_pages:
        return []
    item = MultimodalItem(WARMUP_IMAGE_KEY, 3, 1, (1, 1, 1))
    init = SeqInit((item,), SamplingParams(temperature=0.0), len(ids), encoder_page_ids=(1,))
    pages = tuple(range(1, need + 1))
    return [
        StepPlan(0, (SeqStep("warmup-image", 0, ids, True, 0, pages, init),)),
        StepPlan(0, (SeqStep("warmup-image", len(ids), (), True),)),
        StepPlan(0, (), ("warmup-image",)),
    ]
