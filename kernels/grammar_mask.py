"""Grammar masks on a logits batch: tokens a row's bitmask does not allow become -inf, every constrained row of
the batch in one launch. A Triton kernel and the plain-torch reference it is tested against.

Bitmask layout (llguidance's, xgrammar's): int32 words, bit (t % 32) of word (t // 32) set means token t is
allowed; tokens at or past 32 * num_words are not allowed.
"""

from __future__ import annotations

import torch

from kernels._triton import HAS_TRITON, triton_enabled

BLOCK_WORDS = 64  # words per program: 2,048 tokens


def apply_token_bitmask_ref(logits: torch.Tensor, bitmask: torch.Tensor, rows: torch.Tensor) -> None:
    """logits [B, V] float (modified in place); bitmask [R, W] int32; rows [R] int64: the logits row of mask r."""
    vocab = logits.shape[1]
    num_rows, num_words = bitmask.shape
    bits = _bit_values(bitmask.device)
    allowed = (bitmask[:, :, None] & bits).view(num_rows, num_words * 32) != 0  # [R, 32 W]
    n = min(vocab, num_words * 32)
    whole = num_rows == logits.shape[0] and bool((rows == torch.arange(num_rows, device=rows.device)).all())
    sub = logits if whole else logits.index_select(0, rows)
    sub[:, :n].masked_fill_(~allowed[:, :n], float("-inf"))
    sub[:, n:] = float("-inf")  # tokens past the mask are not allowed
    if not whole:
        logits.index_copy_(0, rows, sub)


_BITS: dict[torch.device, torch.Tensor] = {}


def _bit_values(device: torch.device) -> torch.Tensor:
    """[32] int32: 1 << k for each bit (bit 31 is the sign bit)."""
    if device not in _BITS:
        _BITS[device] = torch.tensor(
            [1 << k for k in range(31)] + [-(1 << 31)], dtype=torch.int32, device=device
        )
    return _BITS[device]


if HAS_TRITON:
    import triton
    import triton.language as tl

    @triton.jit
    def _apply_bitmask_kernel(
        logits_ptr,
        bitmask_ptr,
        rows_ptr,
        vocab,
        num_words,
        logits_stride,
        BLOCK_WORDS: tl.constexpr,
    ):
        r = tl.program_id(0)
        block = tl.program_id(1)
        row = tl.load(rows_ptr + r).to(tl.int64)
        words = block * BLOCK_WORDS + tl.arange(0, BLOCK_WORDS)
        w = tl.load(bitmask_ptr + r * num_words + words, mask=words < num_words, other=0)
        bits = tl.arange(0, 32)
        allowed = ((w[:, None] >> bits[None, :]) & 1) != 0  # [BLOCK_WORDS, 32]
        tokens = words[:, None] * 32 + bits[None, :]
        out = logits_ptr + row * logits_stride + tokens
        tl.store(out, float("-inf"), mask=(tokens < vocab) & ~allowed)


def apply_token_bitmask_triton(logits: torch.Tensor, bitmask: torch.Tensor, rows: torch.Tensor) -> None:
    """The kernel: one program per (masked row, 2,048 tokens); arguments as apply_token_bitmask_ref."""
    if logits.stride(1) != 1:
        raise ValueError("logits rows must be contiguous")
    num_rows, num_words = bitmask.shape
    vocab = logits.shape[1]
    # tokens past the mask are disallowed too: cover the whole vocabulary with (zero) words
    total_words = max(num_words, -(-vocab // 32))
    grid = (num_rows, triton.cdiv(total_words, BLOCK_WORDS))
    _apply_bitmask_kernel[grid](
        logits, bitmask.contiguous(), rows, vocab, num_words, logits.stride(0), BLOCK_WORDS=BLOCK_WORDS
    )


def apply_token_bitmask(logits: torch.Tensor, bitmask: torch.Tensor, rows: torch.Tensor) -> None:
    """Mask logits rows `rows` with `bitmask` in place: the kernel on CUDA tensors, the reference elsewhere."""
    if not len(rows):
        return
    if triton_enabled(logits):
        apply_token_bitmask_triton(logits, bitmask, rows)
    else:
        apply_token_bitmask_ref(logits, bitmask, rows)
