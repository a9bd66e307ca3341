"""Llama 3.2 Vision's tower and projector for the vision service: tiles of one image with pre/post aspect-ratio
(tile) embeddings, a gated positional embedding, local then gated global encoder layers over all tiles of the
image, the intermediate local outputs concatenated to the last hidden state, and a linear projector to the language
model's width. The output is the image's cross-attention states: [max_num_tiles * (patches + 1), text_hidden].

Parameter names match HF (vision_model.*, multi_modal_projector.*): the Hub checkpoint's; transformers 5's
model.vision_model.* map onto them. Attention is plain SDPA with HF's tile mask (a padding token is hidden only
from padding tokens, as HF and Meta's reference do).
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import torch
from torch import nn

from models.layers import ACTIVATIONS
from processor.model_config import ModelConfig, VisionConfig
from processor.models.mllama import MllamaVisionOptions, parse_mllama_vision_options


class MllamaPrecomputedAspectRatioEmbedding(nn.Module):
    def __init__(self, cfg: VisionConfig, opts: MllamaVisionOptions):
        super().__init__()
        self.max_num_tiles, self.hidden_size = opts.max_num_tiles, cfg.hidden_size
        self.embedding = nn.Embedding(
            len(opts.supported_aspect_ratios) + 1, opts.max_num_tiles * cfg.hidden_size
        )
        self.gate = nn.Parameter(torch.zeros(1))

    def forward(self, x: torch.Tensor, aspect_ratio_ids: torch.Tensor) -> torch.Tensor:
        # x: [images, tiles, tokens, hidden]; aspect_ratio_ids: [images]
        e = self.embedding(aspect_ratio_ids).reshape(-1, self.max_num_tiles, 1, self.hidden_size)
        return x + e * self.gate.tanh()


class MllamaPrecomputedPositionEmbedding(nn.Module):
    def __init__(self, cfg: VisionConfig, opts: MllamaVisionOptions):
        super().__init__()
        self.max_num_tiles = opts.max_num_tiles
        self.num_patches = (cfg.image_size // cfg.patch_size) ** 2 + 1
        self.hidden_size = cfg.hidden_size
        self.gate = nn.Parameter(torch.zeros(1))
        self.embedding = nn.Parameter(torch.zeros(self.num_patches, cfg.hidden_size))
        self.tile_embedding = nn.Embedding(
            len(opts.supported_aspect_ratios) + 1, opts.max_num_tiles * self.num_patches * cfg.hidden_size
        )

    def forward(self, x: torch.Tensor, aspect_ratio_ids: torch.Tensor) -> torch.Tensor:
        # x: [images, tiles, patches + 1, hidden]
        gate = self.gate.tanh()
        x = x + ((1 - gate) * self.embedding).view(1, 1, self.num_patches, self.hidden_size)
        tile = self.tile_embedding(aspect_ratio_ids).reshape(
            x.shape[0], self.max_num_tiles, self.num_patches, self.hidden_size
        )
        return x + gate * tile


class MllamaVisionMLP(nn.Module):
    def __init__(self, cfg: VisionConfig):
        super().__init__()
        self.fc1 = nn.Linear(cfg.hidden_size, cfg.intermediate_size)
        self.fc2 = nn.Linear(cfg.intermediate_size, cfg.hidden_size)
        self.act = ACTIVATIONS[cfg.hidden_act]

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc2(self.act(self.fc1(x)))


class MllamaVisionAttention(nn.Module):
    def __init__(self, cfg: VisionConfig):
        super().__init__()
        self.num_heads, self.head_dim = cfg.num_heads, cfg.hidden_size // cfg.num_heads
        width = self.num_heads * self.head_dim
        self.q_proj = nn.Linear(cfg.hidden_size, width, bias=False)
        self.k_proj = nn.Linear(cfg.hidden_size, width, bias=False)
        self.v_proj = nn.Linear(cfg.hidden_size, width, bias=False)
        self.o_proj = nn.Linear(width, cfg.hidden_size, bias=False)

    def forward(self, x: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        # x: [images, L, hidden]; mask: [images, 1, L, L] additive
        b, n, _ = x.shape

        def heads(t: torch.Tensor) -> torch.Tensor:
            return t.view(b, n, self.num_heads, self.head_dim).transpose(1, 2)

        q, k, v = heads(self.q_proj(x)), heads(self.k_proj(x)), heads(self.v_proj(x))
        o = nn.functional.scaled_dot_product_attention(q, k, v, attn_mask=mask, scale=self.head_dim**-0.5)
        return self.o_proj(o.transpose(1, 2).reshape(b, n, -1))


class MllamaVisionEncoderLayer(nn.Module):
    def __init__(self, cfg: VisionConfig, is_gated: bool):
        super().__init__()
        self.self_attn = MllamaVisionAttention(cfg)
        self.mlp = MllamaVisionMLP(cfg)
        self.input_layernorm = nn.LayerNorm(cfg.hidden_size, eps=cfg.layer_norm_eps)
        self.post_attention_layernorm = nn.LayerNorm(cfg.hidden_size, eps=cfg.layer_norm_eps)
        self.is_gated = is_gated
        if is_gated:
            self.gate_attn = nn.Parameter(torch.full((1,), math.pi / 4))
            self.gate_ffn = nn.Parameter(torch.full((1,), math.pi / 4))

    def forward(self, x: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        h = self.self_attn(self.input_layernorm(x), mask)
        x = x + (self.gate_attn.tanh() * h if self.is_gated else h)
        h = self.mlp(self.post_attention_layernorm(x))
        return x + (self.gate_ffn.tanh() * h if self.is_gated else h)


class MllamaVisionEncoder(nn.Module):
    def __init__(self, cfg: VisionConfig, num_layers: int, is_gated: bool):
        super().__init__()
        self.layers = nn.ModuleList([MllamaVisionEncoderLayer(cfg, is_gated) for _ in range(num_layers)])


class MllamaVisionTower(nn.Module):
    """HF's MllamaVisionModel; forward returns the last hidden state with the intermediate outputs concatenated."""

    def __init__(self, cfg: VisionConfig, opts: MllamaVisionOptions):
        super().__init__()
        self.cfg, self.opts = cfg, opts
        self.num_patches = (cfg.image_size // cfg.patch_size) ** 2 + 1
        self.patch_embedding = nn.Conv2d(
            cfg.in_channels, cfg.hidden_size, cfg.patch_size, cfg.patch_size, padding="valid", bias=False
        )
        self.class_embedding = nn.Parameter(torch.zeros(cfg.hidden_size))
        self.gated_positional_embedding = MllamaPrecomputedPositionEmbedding(cfg, opts)
        self.pre_tile_positional_embedding = MllamaPrecomputedAspectRatioEmbedding(cfg, opts)
        self.post_tile_positional_embedding = MllamaPrecomputedAspectRatioEmbedding(cfg, opts)
        self.layernorm_pre = nn.LayerNorm(cfg.hidden_size)
        self.layernorm_post = nn.LayerNorm(cfg.hidden_size)
        self.transformer = MllamaVisionEncoder(cfg, cfg.depth, is_gated=False)
        self.global_transformer = MllamaVisionEncoder(cfg, opts.num_global_layers, is_gated=True)

    def forward(
        self, pixel_values: torch.Tensor, aspect_ratio_ids: torch.Tensor, num_tiles: torch.Tensor
    ) -> torch.Tensor:
        # pixel_values: [images, max_tiles, C, S, S] (padding tiles zero); aspect_ratio_ids, num_tiles: [images]
        # -> [images, max_tiles, patches + 1, hidden * (1 + len(intermediate_layers_indices))]
        b, tiles, c, s, _ = pixel_values.shape
        w = self.patch_embedding.weight
        x = (
            self.patch_embedding(pixel_values.reshape(b * tiles, c, s, s).to(w.dtype))
            .flatten(2)
            .transpose(1, 2)
        )
        dim = x.shape[-1]
        x = self.pre_tile_positional_embedding(x.reshape(b, tiles, -1, dim), aspect_ratio_ids)
        x = x.reshape(b * tiles, -1, dim)
        x = torch.cat([self.class_embedding.expand(b * tiles, 1, dim), x], dim=1)
        n = x.shape[1]
        x = self.gated_positional_embedding(x.reshape(b, tiles, n, dim), aspect_ratio_ids)
        x = self.layernorm_pre(x)
        pad = (8 - n % 8) % 8  # HF pads each tile to a multiple of 8 tokens
        x = nn.functional.pad(x, (0, 0, 0, pad))
        length = n + pad
        # a token is padding when its tile is past the image's tiles or it is one of the 8-alignment rows
        is_pad = torch.ones(b, tiles, length, dtype=torch.bool, device=x.device)
        is_pad[:, :, :n] = (
            torch.arange(tiles, device=x.device)[None, :, None] >= num_tiles.to(x.device)[:, None, None]
        )
        is_pad = is_pad.reshape(b, tiles * length)
        # HF: (pad_i * pad_j) * finfo.min: only padding-to-padding pairs are hidden
        mask = (is_pad[:, :, None] & is_pad[:, None, :]).to(x.dtype) * torch.finfo(x.dtype).min
        mask = mask[:, None]
        x = x.reshape(b, tiles * length, dim)
        wanted = set(self.opts.intermediate_layers_indices)
        saved: dict[int, torch.Tensor] = {}  # local layer index -> its output (HF's hidden_states[i])
        for i, layer in enumerate(self.transformer.layers):
            x = layer(x, mask)
            if i in wanted:
                saved[i] = x
        x = self.layernorm_post(x)
        x = self.post_tile_positional_embedding(x.reshape(b, tiles, length, dim), aspect_ratio_ids)
        x = x.reshape(b, tiles * length, dim)
        for layer in self.global_transformer.layers:
            x = layer(x, mask)
        x = x.reshape(b, tiles, length, dim)[:, :, :n]
        inter = torch.stack([saved[i] for i in self.opts.intermediate_layers_indices], dim=-1)
        inter = inter.reshape(b, tiles, length, -1)[:, :, :n]
        return torch.cat([x, inter], dim=-1)


class MllamaVisionModel(nn.Module):
    """The vision service's model: tower + projector -> cross-attention states per image."""

    checkpoint_prefixes = (
        ("vision_model.", "vision_model."),
        ("model.vision_model.", "vision_model."),
        ("multi_modal_projector.", "multi_modal_projector."),
        ("model.multi_modal_projector.", "multi_modal_projector."),
    )
    hub_prefix = ""
    packed_modules_mapping: dict[str, tuple[str, ...]] = {}
    supports_cuda_graphs = False

    def __init__(self, config: ModelConfig):
        super().__init__()
        cfg = config.vision
        if cfg is None:
            raise ValueError(f"{config.architecture} has no vision_config")
        self.options = opts = parse_mllama_vision_options(config.raw)
        self.vision_model = MllamaVisionTower(cfg, opts)
        self.multi_modal_projector = nn.Linear(opts.vision_output_dim, config.text.hidden_size, bias=True)
        self.attention_backend = "torch_sdpa"

    def tie_weights(self) -> None:
        pass

    @property
    def dtype(self) -> torch.dtype:
        return self.multi_modal_projector.weight.dtype

    def set_attention_backend(self, name: str) -> str:
        return self.attention_backend

    def forward(self, pixel_values: torch.Tensor, grids: Sequence[tuple[int, int, int]]) -> torch.Tensor:
        """The vision service's call: pixel_values [images * max_tiles, C, S, S] (each image's tiles, padding
        tiles zero), grids (1, tiles high, tiles wide) -> cross-attention states [images * max_tiles * (patches +
        1), text_hidden], image by image; the images of a batch run in one forward."""
        from processor.models.mllama import aspect_ratio_id

        tiles = self.options.max_num_tiles
        dev = pixel_values.device
        ids = torch.tensor([aspect_ratio_id(h, w, tiles) for _, h, w in grids], device=dev)
        num_tiles = torch.tensor([h * w for _, h, w in grids], device=dev)
        pixels = pixel_values.reshape(len(grids), tiles, *pixel_values.shape[1:])
        out = self.encode_tiles(pixels, ids, num_tiles)
        return out.reshape(-1, out.shape[-1])

    def encode_tiles(
        self, pixel_values: torch.Tensor, aspect_ratio_ids: torch.Tensor, num_tiles: torch.Tensor
    ) -> torch.Tensor:
        # -> [images, max_tiles * (patches + 1), text_hidden]
        x = self.vision_model(pixel_values, aspect_ratio_ids, num_tiles)
        out = self.multi_modal_projector(x)
        return out.reshape(out.shape[0], -1, out.shape[-1])
