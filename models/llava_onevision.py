"""LLaVA-OneVision for the worker and the vision service: the language model (Qwen2 with plain 1-D rotary
positions) and the image-feature packing that follows the SigLIP tower and the projector (models/siglip_vision.py):
the base crop's features, then the crop grid reassembled into one feature map, unpadded, pooled by the anyres_max
cap, with an image-newline feature closing each row. The geometry is processor/models/llava_onevision.py's
`FeatureGrid`.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
import torch.nn.functional as F

from models.qwen2_5_vl import Qwen2_5_VLForCausalLM, Span
from processor.models.llava_onevision import FeatureGrid


def pack_image_features(
    features: torch.Tensor,  # [num_crops, side * side, hidden]: the base crop first, then the grid row by row
    grid: FeatureGrid | None,  # None: a crop of a multi-image prompt (base features only)
    image_newline: torch.Tensor,  # [hidden]
) -> torch.Tensor:  # [num_image_tokens, hidden]
    base = features[0]
    if grid is None:
        return torch.cat([base, image_newline[None].to(base)])
    side = int(round(base.shape[0] ** 0.5))
    hidden = features.shape[-1]
    x = features[1:].view(grid.rows, grid.cols, side, side, hidden)
    x = x.permute(4, 0, 2, 1, 3).reshape(hidden, grid.rows * side, grid.cols * side)  # one feature map
    x = x[:, grid.top : grid.bottom, grid.left : grid.right]
    if grid.pooled is not None:
        x = F.interpolate(x[None], list(grid.pooled), mode="bilinear")[0]
    newline = image_newline.to(x)[:, None, None].expand(hidden, x.shape[1], 1)
    x = torch.cat([x, newline], dim=-1)  # [hidden, rows, cols + 1]
    return torch.cat([base, x.flatten(1).t()])


class LlavaOnevisionForCausalLM(Qwen2_5_VLForCausalLM):
    """The Qwen2 language model of LLaVA-OneVision. Our decoder's M-RoPE with three equal position rows (and the
    whole rotary band on the first axis) is 1-D RoPE, so only the positions differ: image tokens count like text."""

    # Hub layout (language_model.model.*, language_model.lm_head.*) and transformers 5's module names
    checkpoint_prefixes = (
        ("model.language_model.", "model."),
        ("language_model.model.", "model."),
        ("language_model.lm_head.", "lm_head."),
        ("lm_head.", "lm_head."),
    )
    hub_prefix = "language_model."

    def positions(self, spans: Sequence[Span], start: int, end: int) -> torch.Tensor:
        # [3, end - start]: the sequence index on every axis
        return torch.arange(start, end, dtype=torch.long).expand(3, -1).contiguous()

    def position_delta(self, spans: Sequence[Span]) -> int:
        return 0

    def valid_span(self, num_tokens: int, grid: tuple[int, ...]) -> bool:
        """(num_crops, height, width): the positions do not depend on it; the vision service checks the count."""
        return len(grid) == 3 and min(grid) >= 1 and num_tokens >= 1
