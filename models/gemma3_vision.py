"""Gemma 3's vision side for the vision service: the SigLIP tower (models/siglip.py) and the multimodal projector
(average-pool the patch grid to mm_tokens_per_image soft tokens, RMSNorm with (1 + weight), project to the
language model's width). Parameter names match the Hub checkpoint's `vision_tower.vision_model.*` and
`multi_modal_projector.*`; transformers 5's `model.vision_tower.*` maps onto them."""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import nn

from models.gemma3 import Gemma3RMSNorm
from models.siglip import SiglipVisionModel
from processor.model_config import ModelConfig
from processor.models.gemma3 import SIGLIP_DEFAULTS


class Gemma3MultiModalProjector(nn.Module):
    def __init__(self, vision: dict, text_hidden: int, tokens_per_image: int):
        super().__init__()
        vision = {**SIGLIP_DEFAULTS, **vision}
        width = int(vision["hidden_size"])
        self.mm_input_projection_weight = nn.Parameter(torch.zeros(width, text_hidden))
        self.mm_soft_emb_norm = Gemma3RMSNorm(width, eps=float(vision["layer_norm_eps"]))
        self.patches_per_image = int(vision["image_size"]) // int(vision["patch_size"])
        self.kernel_size = self.patches_per_image // int(tokens_per_image**0.5)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        # x: [B, patches, width] -> [B, tokens, text_hidden]
        b, _, width = x.shape
        grid = (
            x.transpose(1, 2).reshape(b, width, self.patches_per_image, self.patches_per_image).contiguous()
        )
        pooled = nn.functional.avg_pool2d(grid, self.kernel_size, self.kernel_size).flatten(2).transpose(1, 2)
        return torch.matmul(self.mm_soft_emb_norm(pooled), self.mm_input_projection_weight).type_as(x)


class Gemma3VisionModel(nn.Module):
    checkpoint_prefixes = (
        ("vision_tower.vision_model.", "vision_tower.vision_model."),
        ("model.vision_tower.vision_model.", "vision_tower.vision_model."),
        ("model.vision_tower.", "vision_tower.vision_model."),
        ("multi_modal_projector.", "multi_modal_projector."),
        ("model.multi_modal_projector.", "multi_modal_projector."),
    )
    checkpoint_write_prefix = ""  # our names are the Hub's
    packed_modules_mapping: dict[str, tuple[str, ...]] = {}
    supports_cuda_graph = False  # fixed-size images: one eager forward per batch

    def __init__(self, config: ModelConfig):
        super().__init__()
        vision = config.raw["vision_config"]
        self.vision_tower = SiglipVisionModel(vision)
        self.multi_modal_projector = Gemma3MultiModalProjector(
            vision, config.text.hidden_size, int(config.raw.get("mm_tokens_per_image", 256))
        )
        self.attention_backend = "sdpa"

    def tie_weights(self) -> None:
        pass

    def set_attention_backend(self, name: str) -> str:
        """Every image has the same number of patches: SDPA over the batch is the one backend."""
        if name not in ("auto", "sdpa", "torch"):
            raise ValueError(f"the Gemma 3 tower attends with SDPA only, not {name!r}")
        return self.attention_backend

    def forward(self, pixel_values: torch.Tensor, grids: Sequence[tuple[int, int, int]]) -> torch.Tensor:
        # pixel_values: [images, C, S, S] -> soft tokens [images * tokens, text_hidden], image by image
        out = self.multi_modal_projector(self.vision_tower(pixel_values))
        return out.reshape(-1, out.shape[-1])
