"""Llama 3.2 Vision's language model for the worker: Llama 3 self-attention layers (llama3-scaled rotary, GQA) and,
every few layers, a tanh-gated cross-attention layer whose queries come from the text and whose K/V come from the
request's images (the *encoder cache*, computed once from the vision service's cross-attention states; they never
change). Images are not tokens in the sequence: <|image|> is an ordinary embedded token.

The encoder K/V live in pages (EncoderCache, the runner's second cache): `write_encoder_cache` fills a sequence's
pages once from the vision service's cross-attention states.
Cross layers follow HF's MllamaCrossAttentionDecoderLayer: a sequence without images skips them; a token that sees
no image still attends over all the sequence's encoder tokens (HF's masking quirk) and only its MLP output is
zeroed (full_text_row_masked_out_mask). The cross attention is kernels/cross_attention.py's torch reference
(paged_cross_attention).

Parameter names match HF's MllamaTextModel (model.layers.*, lm_head.*); the Hub checkpoint's language_model.model.*
and language_model.lm_head.*, and transformers 5's model.language_model.* and lm_head.* map onto them.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass

import torch
from torch import nn

from kernels.cross_attention import paged_cross_attention, store_encoder_kv, tile_visibility
from models.layers import MergedGatedMLP, MergedLinear, RMSNorm, rotate_half
from processor.model_config import ModelConfig, TextConfig
from processor.models.mllama import MllamaTextOptions, parse_mllama_text

Span = tuple[int, int, tuple[int, int, int]]


def llama3_inv_freq(head_dim: int, theta: float, scaling: dict) -> torch.Tensor:
    """Llama 3's rope frequencies (transformers' _compute_llama3_parameters); plain ones without scaling."""
    # on the CPU even while the model is built on the meta device; moved to the model's by the first forward
    steps = torch.arange(0, head_dim, 2, dtype=torch.int64, device="cpu").float()
    inv_freq = 1.0 / (theta ** (steps / head_dim))
    if not scaling:
        return inv_freq
    factor = float(scaling["factor"])
    low, high = float(scaling["low_freq_factor"]), float(scaling["high_freq_factor"])
    old_len = float(scaling["original_max_position_embeddings"])
    low_wavelen, high_wavelen = old_len / low, old_len / high
    wavelen = 2 * math.pi / inv_freq
    scaled = torch.where(wavelen > low_wavelen, inv_freq / factor, inv_freq)
    smooth = (old_len / wavelen - low) / (high - low)
    smoothed = (1 - smooth) * scaled / factor + smooth * scaled
    medium = ~(wavelen < high_wavelen) & ~(wavelen > low_wavelen)
    return torch.where(medium, smoothed, scaled)


class EncoderCache:
    """The second kind of KV: every cross layer's encoder K and V, [num_cross_layers, num_pages, page_size,
    kv_heads, head_dim] each, written once per sequence (its first prefill) and read by every later step. Page 0
    is never handed out, as in the self-attention cache."""

    def __init__(
        self,
        num_cross_layers: int,
        num_pages: int,
        page_size: int,
        num_kv_heads: int,
        head_dim: int,
        dtype: torch.dtype,
        device: torch.device,
    ):
        shape = (num_cross_layers, num_pages, page_size, num_kv_heads, head_dim)
        self.k = torch.zeros(shape, dtype=dtype, device=device)
        self.v = torch.zeros(shape, dtype=dtype, device=device)
        self.page_size = page_size


@dataclass
class SequenceImages:
    """One sequence's encoder pages and what each of its tokens sees (from the prompt: processor/models/mllama.py's
    image_token_ranges and the images' tile counts)."""

    page_table: torch.Tensor  # [pages] int64: its encoder rows (images * max_tiles * tokens), page by page
    encoder_len: int
    ranges: list[tuple[int, int]]  # per image: [start, end) of the prompt tokens that see it
    num_tiles: list[int]  # per image
    prompt_len: int


@dataclass
class CrossAttentionBatch:
    """Per sequence of the step (in the packed order), its images or None (a text-only sequence)."""

    sequences: list[SequenceImages | None]
    q_start: list[int]
    q_lens: list[int]
    positions: torch.Tensor  # [T]


class MllamaSelfAttention(nn.Module):
    def __init__(self, cfg: TextConfig, layer_idx: int):
        super().__init__()
        self.layer_idx = layer_idx
        self.num_heads, self.num_kv_heads, self.head_dim = (
            cfg.num_attention_heads,
            cfg.num_key_value_heads,
            cfg.head_dim,
        )
        self.q_size, self.kv_size = self.num_heads * self.head_dim, self.num_kv_heads * self.head_dim
        self.qkv_proj = MergedLinear(cfg.hidden_size, [self.q_size, self.kv_size, self.kv_size], bias=False)
        self.o_proj = nn.Linear(self.q_size, cfg.hidden_size, bias=False)

    def forward(self, x: torch.Tensor, cos_sin, attn, meta) -> torch.Tensor:
        # x: [T, hidden]; cos, sin: [T, 1, head_dim]
        n = x.shape[0]
        q, k, v = self.qkv_proj(x).split([self.q_size, self.kv_size, self.kv_size], dim=-1)
        q, k = q.view(n, self.num_heads, self.head_dim), k.view(n, self.num_kv_heads, self.head_dim)
        cos, sin = cos_sin
        q = q * cos + rotate_half(q) * sin
        k = k * cos + rotate_half(k) * sin
        o = attn.forward(self.layer_idx, q, k, v.view(n, self.num_kv_heads, self.head_dim), meta)
        return self.o_proj(o.reshape(n, self.q_size))


class MllamaSelfAttentionDecoderLayer(nn.Module):
    def __init__(self, cfg: TextConfig, layer_idx: int):
        super().__init__()
        self.self_attn = MllamaSelfAttention(cfg, layer_idx)
        self.mlp = MergedGatedMLP(cfg.hidden_size, cfg.intermediate_size, cfg.hidden_act, bias=False)
        self.input_layernorm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps)
        self.post_attention_layernorm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps)

    def forward(self, x, cos_sin, attn, meta, cross: CrossAttentionBatch | None, cache=None):
        x = x + self.self_attn(self.input_layernorm(x), cos_sin, attn, meta)
        return x + self.mlp(self.post_attention_layernorm(x))


class MllamaTextCrossAttention(nn.Module):
    def __init__(self, cfg: TextConfig):
        super().__init__()
        self.num_heads, self.num_kv_heads = cfg.num_attention_heads, cfg.num_key_value_heads
        self.head_dim = cfg.hidden_size // cfg.num_attention_heads
        self.q_proj = nn.Linear(cfg.hidden_size, self.num_heads * self.head_dim, bias=False)
        self.k_proj = nn.Linear(cfg.hidden_size, self.num_kv_heads * self.head_dim, bias=False)
        self.v_proj = nn.Linear(cfg.hidden_size, self.num_kv_heads * self.head_dim, bias=False)
        self.o_proj = nn.Linear(self.num_heads * self.head_dim, cfg.hidden_size, bias=False)
        self.q_norm = RMSNorm(self.head_dim, cfg.rms_norm_eps)
        self.k_norm = RMSNorm(self.head_dim, cfg.rms_norm_eps)

    def project_kv(self, states: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        # states: [S, hidden] (the projector's output) -> K, V: [S, kv_heads, head_dim]
        s = states.shape[0]
        # per-head norms on 2-D rows: the fused GPU norm takes [rows, width]
        k = self.k_norm(self.k_proj(states).view(-1, self.head_dim)).view(s, self.num_kv_heads, self.head_dim)
        return k, self.v_proj(states).view(s, self.num_kv_heads, self.head_dim)


class MllamaCrossAttentionDecoderLayer(nn.Module):
    def __init__(self, cfg: TextConfig, cross_idx: int):
        super().__init__()
        self.cross_idx = cross_idx  # index into a sequence's encoder cache
        self.cross_attn = MllamaTextCrossAttention(cfg)
        self.input_layernorm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps)
        self.cross_attn_attn_gate = nn.Parameter(torch.zeros(1))
        self.mlp = MergedGatedMLP(cfg.hidden_size, cfg.intermediate_size, cfg.hidden_act, bias=False)
        self.post_attention_layernorm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps)
        self.cross_attn_mlp_gate = nn.Parameter(torch.zeros(1))
        self.tokens_per_tile = 0
        self.max_num_tiles = 0

    def forward(
        self, x, cos_sin, attn, meta, cross: CrossAttentionBatch | None, cache: EncoderCache | None = None
    ):
        if cross is None:
            return x
        out = x.clone()
        ca = self.cross_attn
        for seq, start, q_len in zip(cross.sequences, cross.q_start, cross.q_lens, strict=True):
            if seq is None or q_len == 0:
                continue  # HF skips cross layers for a sequence without images
            h_in = x[start : start + q_len]
            h = self.input_layernorm(h_in)
            q = ca.q_norm(ca.q_proj(h).view(-1, ca.head_dim)).view(q_len, ca.num_heads, ca.head_dim)
            visible = tile_visibility(
                cross.positions[start : start + q_len],
                seq.ranges,
                seq.num_tiles,
                self.max_num_tiles,
                self.tokens_per_tile,
                seq.prompt_len,
            )
            o, has_image = paged_cross_attention(
                q,
                cache.k[self.cross_idx],
                cache.v[self.cross_idx],
                seq.page_table,
                seq.encoder_len,
                visible,
                ca.head_dim**-0.5,
            )
            h_in = h_in + self.cross_attn_attn_gate.tanh() * ca.o_proj(o.reshape(q_len, -1))
            m = self.mlp(self.post_attention_layernorm(h_in)) * has_image[:, None].to(h_in.dtype)
            out[start : start + q_len] = h_in + self.cross_attn_mlp_gate.tanh() * m
        return out


class MllamaTextModel(nn.Module):
    def __init__(self, cfg: TextConfig, opts: MllamaTextOptions):
        super().__init__()
        self.embed_tokens = nn.Embedding(cfg.vocab_size + 8, cfg.hidden_size)
        cross = list(opts.cross_attention_layers)
        self.layers = nn.ModuleList(
            [
                MllamaCrossAttentionDecoderLayer(cfg, cross.index(i))
                if i in cross
                else MllamaSelfAttentionDecoderLayer(cfg, i)
                for i in range(cfg.num_hidden_layers)
            ]
        )
        self.norm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps)


class MllamaForCausalLM(nn.Module):
    """The worker's model: token embeddings (and the step's encoder caches) in, hidden states and logits out.
    Self-attention layers keep their layer index for the KV cache (cross layers own no paged KV)."""

    checkpoint_prefixes = (
        ("language_model.model.", "model."),
        ("model.language_model.", "model."),
        ("language_model.lm_head.", "lm_head."),
        ("lm_head.", "lm_head."),
        ("vision_model.", None),
        ("model.vision_model.", None),
        ("multi_modal_projector.", None),
        ("model.multi_modal_projector.", None),
    )
    hub_prefix = "language_model."
    # the cross layers loop over the step's sequences with shapes of their own: eager steps only (no decode or
    # piecewise CUDA graphs yet)
    supports_cuda_graphs = False
    packed_modules_mapping: dict[str, tuple[str, ...]] = {
        "qkv_proj": ("q_proj", "k_proj", "v_proj"),
        "gate_up_proj": ("gate_proj", "up_proj"),
    }

    def __init__(self, config: ModelConfig):
        super().__init__()
        self.config = config
        self.options = opts = parse_mllama_text(config.raw)
        text = config.text
        self.model = MllamaTextModel(text, opts)
        self.lm_head = nn.Linear(text.hidden_size, text.vocab_size, bias=False)
        self.inv_freq = llama3_inv_freq(text.head_dim, opts.rope_theta, opts.rope_scaling)
        vision = config.vision
        from processor.models.mllama import num_vision_tokens, parse_mllama_vision_options

        max_tiles = parse_mllama_vision_options(config.raw).max_num_tiles
        for layer in self.model.layers:
            if isinstance(layer, MllamaCrossAttentionDecoderLayer) and vision is not None:
                layer.tokens_per_tile = num_vision_tokens(vision.image_size, vision.patch_size)
                layer.max_num_tiles = max_tiles
        self.image_token_id = int(config.raw.get("image_token_index", 128256))
        self.attn = None  # set by the model runner: an attention backend over the worker's KV cache
        self.encoder_cache: EncoderCache | None = None  # set by the model runner: the cross layers' K/V pages

    def tie_weights(self) -> None:
        pass

    @property
    def cross_layers(self) -> list[MllamaCrossAttentionDecoderLayer]:
        return [m for m in self.model.layers if isinstance(m, MllamaCrossAttentionDecoderLayer)]

    def new_encoder_cache(self, num_pages: int, page_size: int, dtype: torch.dtype, device) -> EncoderCache:
        text = self.config.text
        head_dim = text.hidden_size // text.num_attention_heads
        return EncoderCache(
            len(self.cross_layers), num_pages, page_size, text.num_key_value_heads, head_dim, dtype, device
        )

    @property
    def num_input_embeddings(self) -> int:
        """Token ids the embedding takes: the vocabulary plus <|image|> (128256) and HF's spare rows."""
        return self.model.embed_tokens.num_embeddings

    @property
    def encoder_page_tokens(self) -> int:
        """Encoder rows of one image (every tile slot, padding tiles included): one encoder-cache page."""
        layer = self.cross_layers[0]
        return layer.max_num_tiles * layer.tokens_per_tile

    def encoder_bytes_per_page(self, dtype: torch.dtype) -> int:
        text = self.config.text
        head_dim = text.hidden_size // text.num_attention_heads
        per_row = 2 * text.num_key_value_heads * head_dim * torch.empty((), dtype=dtype).element_size()
        return len(self.cross_layers) * self.encoder_page_tokens * per_row

    def valid_span(self, num_tokens: int, grid: tuple[int, int, int]) -> bool:
        """An image is one <|image|> token; its grid (1, tiles high, tiles wide) one of the supported layouts."""
        from processor.models.mllama import supported_aspect_ratios

        max_tiles = self.cross_layers[0].max_num_tiles
        return num_tokens == 1 and grid[0] == 1 and (grid[1], grid[2]) in supported_aspect_ratios(max_tiles)

    def sequence_images(
        self, spans: Sequence[Span], encoder_pages: Sequence[int], prompt_len: int, device
    ) -> SequenceImages | None:
        """A sequence's cross-attention inputs from its image spans (one <|image|> each) and encoder pages (one
        image each, so its rows are its pages' rows in order); None without images (cross layers skipped)."""
        if not spans:
            return None
        from processor.models.mllama import image_token_ranges

        ids = [0] * prompt_len
        for off, _, _ in spans:
            ids[off] = 1
        return SequenceImages(
            page_table=torch.tensor(list(encoder_pages), dtype=torch.int64, device=device),
            encoder_len=len(spans) * self.encoder_page_tokens,
            ranges=image_token_ranges(ids, 1),
            num_tiles=[g[1] * g[2] for _, _, g in spans],
            prompt_len=prompt_len,
        )

    @staticmethod
    def cross_batch(
        sequences: list[SequenceImages | None], q_start: list[int], q_lens: list[int], positions: torch.Tensor
    ) -> CrossAttentionBatch:
        return CrossAttentionBatch(sequences, q_start, q_lens, positions)

    def write_encoder_cache(self, states: torch.Tensor, page_table: torch.Tensor) -> None:
        """Fill one sequence's encoder pages, once: states [images * max_tiles * tokens, hidden] (the vision
        service's output, images in prompt order) -> every cross layer's K/V in `self.encoder_cache`."""
        cache = self.encoder_cache
        for i, layer in enumerate(self.cross_layers):
            k, v = layer.cross_attn.project_kv(states)
            store_encoder_kv(k, v, cache.k[i], cache.v[i], page_table)

    def positions(self, spans: Sequence[Span], start: int, end: int) -> torch.Tensor:
        return torch.arange(start, end).expand(3, end - start)

    def position_delta(self, spans: Sequence[Span]) -> int:
        return 0

    def embed(self, input_ids: torch.Tensor) -> torch.Tensor:
        return self.model.embed_tokens(input_ids)

    def forward(
        self,
        inputs_embeds: torch.Tensor,
        positions: torch.Tensor,
        meta,
        cross: CrossAttentionBatch | None = None,
    ) -> torch.Tensor:
        # inputs_embeds: [T, hidden]; positions: [3, T] (equal rows) -> final hidden states [T, hidden]
        if cross is None:
            cross = getattr(meta, "encoder", None)  # the worker's step: its runner puts it on the metadata
        pos = positions[0]
        if self.inv_freq.device != pos.device:
            self.inv_freq = self.inv_freq.to(pos.device)
        freqs = pos.float()[:, None] * self.inv_freq[None, :]
        emb = torch.cat((freqs, freqs), dim=-1)
        dtype = inputs_embeds.dtype
        cos_sin = (emb.cos().to(dtype)[:, None, :], emb.sin().to(dtype)[:, None, :])
        x = inputs_embeds
        for layer in self.model.layers:
            x = layer(x, cos_sin, self.attn, meta, cross, self.encoder_cache)
        return self.model.norm(x)

    def compute_logits(self, hidden: torch.Tensor) -> torch.Tensor:
        return self.lm_head(hidden).float()
