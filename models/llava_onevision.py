"""LLaVA-OneVision's image-feature packing (what follows the SigLIP tower and the projector): the base crop's
features, then the crop grid reassembled into one feature map, unpadded, pooled by the anyres_max cap, with an
image-newline feature closing each row. The geometry is processor/models/llava_onevision.py's `FeatureGrid`.

Not served yet (issue 14): the tower, the projector and the registry entry come next.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

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
