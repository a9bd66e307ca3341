"""SigLIP's vision transformer (HF's SiglipVisionModel without the pooling head): a conv patch embedding with
learned positions, pre-norm encoder layers (bidirectional attention over one image's patches), a final LayerNorm.
Every image is the tower's fixed square, so a batch is a plain [B, patches, width] tensor and attention is SDPA.
Parameter names match HF's (`vision_model.embeddings.*`, `vision_model.encoder.layers.*`)."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from models.layers import ACTIVATIONS
from processor.models.gemma3 import SIGLIP_DEFAULTS


class SiglipVisionEmbeddings(nn.Module):
    def __init__(self, width: int, image_size: int, patch_size: int, channels: int):
        super().__init__()
        self.patch_embedding = nn.Conv2d(channels, width, kernel_size=patch_size, stride=patch_size)
        self.num_patches = (image_size // patch_size) ** 2
        self.position_embedding = nn.Embedding(self.num_patches, width)

    def forward(self, pixel_values: torch.Tensor) -> torch.Tensor:
        # pixel_values: [B, C, S, S] -> [B, patches, width]
        x = (
            self.patch_embedding(pixel_values.to(self.patch_embedding.weight.dtype))
            .flatten(2)
            .transpose(1, 2)
        )
        return x + self.position_embedding.weight[None]


class SiglipAttention(nn.Module):
    def __init__(self, width: int, num_heads: int):
        super().__init__()
        self.num_heads, self.head_dim = num_heads, width // num_heads
        self.q_proj = nn.Linear(width, width)
        self.k_proj = nn.Linear(width, width)
        self.v_proj = nn.Linear(width, width)
        self.out_proj = nn.Linear(width, width)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        # x: [B, N, width]
        b, n, _ = x.shape

        def heads(t: torch.Tensor) -> torch.Tensor:
            return t.view(b, n, self.num_heads, self.head_dim).transpose(1, 2)

        o = F.scaled_dot_product_attention(
            heads(self.q_proj(x)), heads(self.k_proj(x)), heads(self.v_proj(x))
        )
        return self.out_proj(o.transpose(1, 2).reshape(b, n, -1))


class SiglipMLP(nn.Module):
    def __init__(self, width: int, intermediate: int, act: str):
        super().__init__()
        self.fc1 = nn.Linear(width, intermediate)
        self.fc2 = nn.Linear(intermediate, width)
        self.act = ACTIVATIONS[act]

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc2(self.act(self.fc1(x)))


class SiglipEncoderLayer(nn.Module):
    def __init__(self, width: int, intermediate: int, num_heads: int, act: str, eps: float):
        super().__init__()
        self.layer_norm1 = nn.LayerNorm(width, eps=eps)
        self.self_attn = SiglipAttention(width, num_heads)
        self.layer_norm2 = nn.LayerNorm(width, eps=eps)
        self.mlp = SiglipMLP(width, intermediate, act)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = x + self.self_attn(self.layer_norm1(x))
        return x + self.mlp(self.layer_norm2(x))


class SiglipEncoder(nn.Module):
    def __init__(self, depth: int, **layer):
        super().__init__()
        self.layers = nn.ModuleList([SiglipEncoderLayer(**layer) for _ in range(depth)])


class SiglipVisionTransformer(nn.Module):
    def __init__(self, vision_config: dict):
        super().__init__()
        v = {**SIGLIP_DEFAULTS, **vision_config}
        width = int(v["hidden_size"])
        eps = float(v["layer_norm_eps"])
        self.embeddings = SiglipVisionEmbeddings(
            width, int(v["image_size"]), int(v["patch_size"]), int(v["num_channels"])
        )
        self.encoder = SiglipEncoder(
            int(v["num_hidden_layers"]),
            width=width,
            intermediate=int(v["intermediate_size"]),
            num_heads=int(v["num_attention_heads"]),
            act=v["hidden_act"],
            eps=eps,
        )
        self.post_layernorm = nn.LayerNorm(width, eps=eps)

    def forward(self, pixel_values: torch.Tensor) -> torch.Tensor:
        # [B, C, S, S] -> last hidden state [B, patches, width]
        x = self.embeddings(pixel_values)
        for layer in self.encoder.layers:
            x = layer(x)
        return self.post_layernorm(x)


class SiglipVisionModel(nn.Module):
    """`vision_config` as config.json writes it (a dict)."""

    def __init__(self, vision_config: dict):
        super().__init__()
        self.vision_model = SiglipVisionTransformer(vision_config)

    def forward(self, pixel_values: torch.Tensor) -> torch.Tensor:
        return self.vision_model(pixel_values)
