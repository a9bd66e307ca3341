"""Gemma 3's vision side for the vision service: the SigLIP tower (models/siglip_vision.py, through its
post-layernorm) and the multimodal projector (average-pool the patch grid to mm_tokens_per_image soft tokens, RMSNorm
with (1 + weight), project to the language model's width). Parameter names match the Hub checkpoint's
`vision_tower.vision_model.*` and `multi_modal_projector.*`; transformers 5's `model.vision_tower.*` maps onto them.
Attention goes through the vision attention registry (kernels/vision.py): each image is one equal-length segment."""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import nn

from kernels.vision import VISION_ATTENTION_BACKENDS, resolve_vision_attention
from models.gemma3 import Gemma3RMSNorm
from models.siglip_vision import SiglipVisionModel
from processor.model_config import ModelConfig, VisionConfig


class Gemma3MultiModalProjector(nn.Module):
    def __init__(self, vision: VisionConfig, text_hidden: int):
        super().__init__()
        width = vision.hidden_size
        self.mm_input_projection_weight = nn.Parameter(torch.zeros(width, text_hidden))
        self.mm_soft_emb_norm = Gemma3RMSNorm(width, eps=vision.layer_norm_eps)
        self.patches_per_image = vision.image_size // vision.patch_size
        self.kernel_size = vision.spatial_merge_size  # (image_size / patch) / sqrt(mm_tokens_per_image)

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
    hub_prefix = ""  # our names are the Hub checkpoint's
    packed_modules_mapping: dict[str, tuple[str, ...]] = {"qkv_proj": ("q_proj", "k_proj", "v_proj")}
    supports_cuda_graphs = False  # fixed-size images: one eager forward per batch

    def __init__(self, config: ModelConfig):
        super().__init__()
        cfg = config.vision
        if cfg is None:
            raise ValueError(f"{config.architecture} has no vision_config")
        self.vision_tower = SiglipVisionModel(cfg, cfg.depth, post_layernorm=True)
        self.multi_modal_projector = Gemma3MultiModalProjector(cfg, config.text.hidden_size)
        self.attention_backend = "auto"

    def tie_weights(self) -> None:
        pass

    @property
    def dtype(self) -> torch.dtype:
        return self.multi_modal_projector.mm_input_projection_weight.dtype

    def set_attention_backend(self, name: str) -> str:
        w = self.multi_modal_projector.mm_input_projection_weight
        self.attention_backend = resolve_vision_attention(name, w.device, w.dtype)
        return self.attention_backend

    def forward(self, pixel_values: torch.Tensor, grids: Sequence[tuple[int, int, int]]) -> torch.Tensor:
        # pixel_values: [images, C, S, S] -> soft tokens [images * tokens, text_hidden], image by image
        if pixel_values.shape[0] != len(grids):
            raise ValueError(f"{pixel_values.shape[0]} images for {len(grids)} grids")
        attention = VISION_ATTENTION_BACKENDS[
            resolve_vision_attention(self.attention_backend, pixel_values.device, self.dtype)
        ].forward
        x = self.vision_tower.vision_model(pixel_values, attention)  # [images * patches, vision hidden]
        out = self.multi_modal_projector(x.view(pixel_values.shape[0], -1, x.shape[-1]))
        return out.reshape(-1, out.shape[-1])
