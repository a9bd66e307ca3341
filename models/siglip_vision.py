"""SigLIP vision tower (HF's SiglipVisionModel without the pooling head; the one SigLIP of the code base) and
LLaVA-OneVision's vision side around it: the multimodal projector, and the packing of each image's crop features
(models/llava_onevision.py). Gemma 3's vision side (models/gemma3_vision.py) uses the same tower. Runs in the vision
service; parameter names match the Hub checkpoint's `vision_tower.*`, `multi_modal_projector.*` and `image_newline`.

Every crop (or image: SigLIP's input is a fixed square) is one fixed-size attention segment, so the crops of a batch
go through the vision attention registry (kernels/vision.py) as a dense batch of equal segments: varlen/cuDNN on
CUDA in half precision, the SDPA reference on the CPU. LLaVA reads a feature layer before the post-layernorm (not
built then); Gemma 3 reads the post-layernorm's output.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import nn

from kernels.vision import VISION_ATTENTION_BACKENDS, Segments, resolve_vision_attention, tile_table
from models.layers import ACTIVATIONS, MergedLinear
from models.llava_onevision import pack_image_features
from processor.model_config import ModelConfig, VisionConfig
from processor.models.llava_onevision import LlavaOnevisionMediaSpec

Grid = tuple[int, int, int]  # (num_crops, height, width): processor/models/llava_onevision.py


def crop_segments(num_crops: int, length: int, device: torch.device) -> Segments:
    """Attention segments of `num_crops` crops of `length` patches each, packed back to back."""
    import numpy as np

    cu = np.arange(num_crops + 1, dtype=np.int32) * length
    return Segments(
        cu_seqlens=torch.from_numpy(cu).to(device),
        max_len=length,
        bounds=tuple(cu.tolist()),
        tiles=torch.from_numpy(tile_table(cu)).to(device),
        uniform=length,
    )


class SiglipVisionEmbeddings(nn.Module):
    def __init__(self, cfg: VisionConfig):
        super().__init__()
        self.patch_embedding = nn.Conv2d(
            cfg.in_channels, cfg.hidden_size, kernel_size=cfg.patch_size, stride=cfg.patch_size
        )
        self.num_positions = (cfg.image_size // cfg.patch_size) ** 2
        self.position_embedding = nn.Embedding(self.num_positions, cfg.hidden_size)

    def forward(self, pixel_values: torch.Tensor) -> torch.Tensor:
        # pixel_values: [B, C, S, S] -> [B * P, hidden], crop by crop
        x = self.patch_embedding(pixel_values.to(self.patch_embedding.weight.dtype))
        x = x.flatten(2).transpose(1, 2) + self.position_embedding.weight
        return x.reshape(-1, x.shape[-1])


class SiglipAttention(nn.Module):
    def __init__(self, cfg: VisionConfig):
        super().__init__()
        self.num_heads = cfg.num_heads
        self.head_dim = cfg.hidden_size // cfg.num_heads
        self.qkv_proj = MergedLinear(cfg.hidden_size, [cfg.hidden_size] * 3, bias=True)
        self.out_proj = nn.Linear(cfg.hidden_size, cfg.hidden_size)

    def forward(self, x: torch.Tensor, seg: Segments, attention) -> torch.Tensor:
        # x: [N, hidden] -> [N, hidden]
        n = x.shape[0]
        q, k, v = self.qkv_proj(x).view(n, 3, self.num_heads, self.head_dim).unbind(1)
        o = attention(q, k, v, seg, self.head_dim**-0.5)  # [N, heads, head_dim]
        return self.out_proj(o.reshape(n, -1))


class SiglipMLP(nn.Module):
    def __init__(self, cfg: VisionConfig):
        super().__init__()
        self.fc1 = nn.Linear(cfg.hidden_size, cfg.intermediate_size)
        self.fc2 = nn.Linear(cfg.intermediate_size, cfg.hidden_size)
        self.act = ACTIVATIONS[cfg.hidden_act]

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc2(self.act(self.fc1(x)))


class SiglipEncoderLayer(nn.Module):
    def __init__(self, cfg: VisionConfig):
        super().__init__()
        self.layer_norm1 = nn.LayerNorm(cfg.hidden_size, eps=cfg.layer_norm_eps)
        self.self_attn = SiglipAttention(cfg)
        self.layer_norm2 = nn.LayerNorm(cfg.hidden_size, eps=cfg.layer_norm_eps)
        self.mlp = SiglipMLP(cfg)

    def forward(self, x: torch.Tensor, seg: Segments, attention) -> torch.Tensor:
        x = x + self.self_attn(self.layer_norm1(x), seg, attention)
        return x + self.mlp(self.layer_norm2(x))


class SiglipEncoder(nn.Module):
    def __init__(self, cfg: VisionConfig, num_layers: int):
        super().__init__()
        self.layers = nn.ModuleList([SiglipEncoderLayer(cfg) for _ in range(num_layers)])


class SiglipVisionTransformer(nn.Module):
    """The tower's first `num_layers` encoder layers, then the post-layernorm when `post_layernorm` (HF's
    last_hidden_state, Gemma 3's input); without it, hidden_states[num_layers] (LLaVA's `vision_feature_layer`)."""

    def __init__(self, cfg: VisionConfig, num_layers: int, post_layernorm: bool = False):
        super().__init__()
        self.embeddings = SiglipVisionEmbeddings(cfg)
        self.encoder = SiglipEncoder(cfg, num_layers)
        self.post_layernorm = (
            nn.LayerNorm(cfg.hidden_size, eps=cfg.layer_norm_eps) if post_layernorm else None
        )

    def forward(self, pixel_values: torch.Tensor, attention) -> torch.Tensor:
        # pixel_values: [B, C, S, S] -> [B * P, hidden]
        x = self.embeddings(pixel_values)
        seg = crop_segments(pixel_values.shape[0], self.embeddings.num_positions, x.device)
        for layer in self.encoder.layers:
            x = layer(x, seg, attention)
        return x if self.post_layernorm is None else self.post_layernorm(x)


class SiglipVisionModel(nn.Module):
    def __init__(self, cfg: VisionConfig, num_layers: int, post_layernorm: bool = False):
        super().__init__()
        self.vision_model = SiglipVisionTransformer(cfg, num_layers, post_layernorm)


class LlavaOnevisionMultiModalProjector(nn.Module):
    def __init__(self, vision_hidden: int, text_hidden: int, act: str, bias: bool):
        super().__init__()
        self.linear_1 = nn.Linear(vision_hidden, text_hidden, bias=bias)
        self.act = ACTIVATIONS[act]
        self.linear_2 = nn.Linear(text_hidden, text_hidden, bias=bias)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.linear_2(self.act(self.linear_1(x)))


def feature_layers(raw: dict, depth: int) -> int:
    """Encoder layers to run for config.json's `vision_feature_layer` (hidden_states[0] is the embeddings)."""
    layer = raw.get("vision_feature_layer", -1)
    if not isinstance(layer, int):
        raise ValueError(f"vision_feature_layer {layer!r}: only one feature layer is supported")
    n = layer if layer >= 0 else depth + 1 + layer
    if not 0 <= n <= depth:
        raise ValueError(f"vision_feature_layer {layer} is outside a tower of {depth} layers")
    return n


class LlavaOnevisionVisionModel(nn.Module):
    """crops [num_crops, C, S, S] (each image's base crop, then its tiles row by row) + grids -> packed image
    embeddings [sum of num_tokens, text hidden], image by image in the order given."""

    checkpoint_prefixes = (
        # transformers 5's module names: its SiglipVisionModel holds the embeddings and encoder itself
        ("model.vision_tower.vision_model.", "vision_tower.vision_model."),
        ("model.vision_tower.", "vision_tower.vision_model."),
        ("model.multi_modal_projector.", "multi_modal_projector."),
        ("model.image_newline", "image_newline"),
        ("vision_tower.", "vision_tower."),
        ("multi_modal_projector.", "multi_modal_projector."),
        ("image_newline", "image_newline"),
    )
    packed_modules_mapping: dict[str, tuple[str, ...]] = {"qkv_proj": ("q_proj", "k_proj", "v_proj")}
    hub_prefix = ""  # our names are the Hub checkpoint's
    # the crop count per batch varies with every image's layout: run eagerly (no padded graph buckets)
    supports_cuda_graphs = False

    def __init__(self, config: ModelConfig):
        super().__init__()
        cfg = config.vision
        if cfg is None:
            raise ValueError(f"{config.architecture} has no vision_config")
        raw = config.raw
        if raw.get("vision_feature_select_strategy", "full") != "full":
            raise ValueError(
                "only vision_feature_select_strategy 'full' is supported (SigLIP has no CLS token)"
            )
        self.cfg = cfg
        self.spec = LlavaOnevisionMediaSpec.from_configs(raw, {})
        self.vision_tower = SiglipVisionModel(cfg, feature_layers(raw, cfg.depth))
        self.multi_modal_projector = LlavaOnevisionMultiModalProjector(
            cfg.hidden_size,
            config.text.hidden_size,
            raw.get("projector_hidden_act", "gelu"),
            bool(raw.get("multimodal_projector_bias", True)),
        )
        self.image_newline = nn.Parameter(torch.empty(config.text.hidden_size))
        self.attention_backend = "auto"

    def tie_weights(self) -> None:
        pass

    @property
    def dtype(self) -> torch.dtype:
        return self.multi_modal_projector.linear_1.weight.dtype

    def set_attention_backend(self, name: str) -> str:
        w = self.multi_modal_projector.linear_1.weight
        self.attention_backend = resolve_vision_attention(name, w.device, w.dtype)
        return self.attention_backend

    def forward(self, pixel_values: torch.Tensor, grids: Sequence[Grid]) -> torch.Tensor:
        counts = [int(g[0]) for g in grids]
        if pixel_values.shape[0] != sum(counts):
            raise ValueError(f"{pixel_values.shape[0]} crops for grids of {sum(counts)}")
        attention = VISION_ATTENTION_BACKENDS[
            resolve_vision_attention(self.attention_backend, pixel_values.device, self.dtype)
        ].forward
        x = self.vision_tower.vision_model(pixel_values, attention)  # [num_crops * P, vision hidden]
        x = self.multi_modal_projector(x).view(pixel_values.shape[0], -1, self.image_newline.shape[0])
        out = [
            pack_image_features(feats, self.spec.feature_grid_of(tuple(g)), self.image_newline)
            for feats, g in zip(x.split(counts), grids, strict=True)
        ]
        return torch.cat(out)

    def extra_checkpoint_shapes(self) -> dict[str, tuple[int, ...]]:
        """Tensors of a full checkpoint that this module does not read (the tower's post-layernorm): the
        tiny-model builder writes them so that transformers loads the checkpoint without missing keys."""
        return {
            f"vision_tower.vision_model.post_layernorm.{k}": (self.cfg.hidden_size,)
            for k in ("weight", "bias")
        }
