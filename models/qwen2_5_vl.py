"""Qwen2.5-VL language model (Qwen2 decoder with multimodal rotary positions) for the worker.

Parameter names match the Hub checkpoint (model.layers.*, lm_head.*); the vision tower lives in
models/qwen2_5_vl_vision.py and runs in the vision service.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import nn

from models.attention import AttentionMetadata
from models.layers import GatedMLP, RMSNorm, rotate_half
from processor.model_config import ModelConfig, TextConfig

# (offset, num_tokens, (t, h, w)) of one media span in a sequence
Span = tuple[int, int, tuple[int, int, int]]


def mrope_positions(spans: Sequence[Span], start: int, end: int, merge: int) -> torch.Tensor:
    """3-axis (t, h, w) rotary positions of sequence indices [start, end): text advances all three axes together;
    an image's tokens take (base + t, base + row, base + column) and the text after it resumes at
    base + max(rows, columns), as Qwen2-VL's get_rope_index does."""
    out = torch.empty(3, end - start, dtype=torch.long)
    delta = 0  # position minus index, for text tokens at the current point
    cursor = 0
    for offset, num_tokens, (t, h, w) in sorted(spans):
        _fill_text(out, start, end, cursor, offset, delta)
        rows, cols = h // merge, w // merge
        base = offset + delta
        lo, hi = max(start, offset), min(end, offset + num_tokens)
        if lo < hi:
            k = torch.arange(lo - offset, hi - offset)
            out[0, lo - start : hi - start] = base + k // (rows * cols)
            out[1, lo - start : hi - start] = base + (k // cols) % rows
            out[2, lo - start : hi - start] = base + k % cols
        cursor = offset + num_tokens
        delta = base + max(rows, cols) - cursor
        del t
    _fill_text(out, start, end, cursor, end, delta)
    return out


def mrope_delta(spans: Sequence[Span], merge: int) -> int:
    """Position minus index for every token after the last span (what decode steps add)."""
    delta = 0
    for offset, num_tokens, (_, h, w) in sorted(spans):
        base = offset + delta
        delta = base + max(h // merge, w // merge) - (offset + num_tokens)
    return delta


def _fill_text(out: torch.Tensor, start: int, end: int, lo: int, hi: int, delta: int) -> None:
    lo, hi = max(start, lo), min(end, hi)
    if lo < hi:
        out[:, lo - start : hi - start] = torch.arange(lo + delta, hi + delta)


class MRotaryEmbedding(nn.Module):
    """cos/sin for 3-axis positions: each frequency band takes its position from one axis (mrope_section)."""

    def __init__(self, cfg: TextConfig):
        super().__init__()
        dim = cfg.head_dim
        # a plain attribute on the CPU, not a buffer: the model is built on the meta device before loading
        self.inv_freq = 1.0 / (
            cfg.rope_theta ** (torch.arange(0, dim, 2, dtype=torch.float, device="cpu") / dim)
        )
        self.mrope_section = list(cfg.mrope_section) or [dim // 2, 0, 0]
        if sum(self.mrope_section) != dim // 2:
            raise ValueError(f"mrope_section {self.mrope_section} must sum to head_dim/2 = {dim // 2}")

    def forward(self, positions: torch.Tensor, dtype: torch.dtype) -> tuple[torch.Tensor, torch.Tensor]:
        # positions: [3, num_tokens] -> cos, sin: [num_tokens, head_dim]
        if self.inv_freq.device != positions.device:
            self.inv_freq = self.inv_freq.to(positions.device)
        freqs = positions[..., None].float() * self.inv_freq  # [3, T, dim/2]
        freqs = torch.cat(
            [part[i % 3] for i, part in enumerate(freqs.split(self.mrope_section, dim=-1))], dim=-1
        )
        emb = torch.cat((freqs, freqs), dim=-1)
        return emb.cos().to(dtype), emb.sin().to(dtype)


class Qwen2_5_VLAttention(nn.Module):
    def __init__(self, cfg: TextConfig, layer_idx: int):
        super().__init__()
        self.layer_idx = layer_idx
        self.num_heads = cfg.num_attention_heads
        self.num_kv_heads = cfg.num_key_value_heads
        self.head_dim = cfg.head_dim
        self.q_proj = nn.Linear(cfg.hidden_size, self.num_heads * self.head_dim, bias=True)
        self.k_proj = nn.Linear(cfg.hidden_size, self.num_kv_heads * self.head_dim, bias=True)
        self.v_proj = nn.Linear(cfg.hidden_size, self.num_kv_heads * self.head_dim, bias=True)
        self.o_proj = nn.Linear(self.num_heads * self.head_dim, cfg.hidden_size, bias=False)

    def forward(self, x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor, attn, meta: AttentionMetadata):
        # x: [T, hidden]; cos, sin: [T, head_dim]
        n = x.shape[0]
        q = self.q_proj(x).view(n, self.num_heads, self.head_dim)
        k = self.k_proj(x).view(n, self.num_kv_heads, self.head_dim)
        v = self.v_proj(x).view(n, self.num_kv_heads, self.head_dim)
        cos, sin = cos[:, None, :], sin[:, None, :]
        q = q * cos + rotate_half(q) * sin
        k = k * cos + rotate_half(k) * sin
        o = attn.forward(self.layer_idx, q, k, v, meta)  # [T, heads, head_dim]
        return self.o_proj(o.reshape(n, -1))


class Qwen2_5_VLDecoderLayer(nn.Module):
    def __init__(self, cfg: TextConfig, layer_idx: int):
        super().__init__()
        self.self_attn = Qwen2_5_VLAttention(cfg, layer_idx)
        self.mlp = GatedMLP(cfg.hidden_size, cfg.intermediate_size, cfg.hidden_act, bias=False)
        self.input_layernorm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps)
        self.post_attention_layernorm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps)

    def forward(self, x, cos, sin, attn, meta):
        x = x + self.self_attn(self.input_layernorm(x), cos, sin, attn, meta)
        return x + self.mlp(self.post_attention_layernorm(x))


class Qwen2_5_VLTextModel(nn.Module):
    def __init__(self, cfg: TextConfig):
        super().__init__()
        self.embed_tokens = nn.Embedding(cfg.vocab_size, cfg.hidden_size)
        self.layers = nn.ModuleList([Qwen2_5_VLDecoderLayer(cfg, i) for i in range(cfg.num_hidden_layers)])
        self.norm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps)
        self.rotary_emb = MRotaryEmbedding(cfg)


class Qwen2_5_VLForCausalLM(nn.Module):
    """The worker's model: token (or merged image) embeddings in, hidden states and logits out."""

    # (checkpoint prefix, our prefix), first match wins; keys matching none are not ours (vision weights)
    checkpoint_prefixes = (
        ("model.language_model.", "model."),
        ("model.visual.", None),
        ("visual.", None),
        ("model.", "model."),
        ("lm_head.", "lm_head."),
    )
    packed_modules_mapping: dict[str, list[str]] = {}

    def __init__(self, config: ModelConfig):
        super().__init__()
        self.config = config
        self.model = Qwen2_5_VLTextModel(config.text)
        self.lm_head = nn.Linear(config.text.hidden_size, config.text.vocab_size, bias=False)
        self.merge = config.vision.spatial_merge_size if config.vision else 1
        self.attn = None  # set by the model runner: an attention backend over the worker's KV cache

    def tie_weights(self) -> None:
        if self.config.text.tie_word_embeddings:
            self.lm_head.weight = self.model.embed_tokens.weight

    def positions(self, spans: Sequence[Span], start: int, end: int) -> torch.Tensor:
        return mrope_positions(spans, start, end, self.merge)

    def position_delta(self, spans: Sequence[Span]) -> int:
        return mrope_delta(spans, self.merge)

    def embed(self, input_ids: torch.Tensor) -> torch.Tensor:
        return self.model.embed_tokens(input_ids)

    def forward(
        self, inputs_embeds: torch.Tensor, positions: torch.Tensor, meta: AttentionMetadata
    ) -> torch.Tensor:
        # inputs_embeds: [T, hidden]; positions: [3, T] -> hidden states [T, hidden]
        cos, sin = self.model.rotary_emb(positions, inputs_embeds.dtype)
        x = inputs_embeds
        for layer in self.model.layers:
            x = layer(x, cos, sin, self.attn, meta)
        return self.model.norm(x)

    def compute_logits(self, hidden: torch.Tensor) -> torch.Tensor:
        # hidden: [B, hidden] -> logits [B, vocab] in float32
        return self.lm_head(hidden).float()
