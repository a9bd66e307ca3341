"""Qwen2.5-VL language model (Qwen2 decoder with multimodal rotary positions) for the worker; Qwen2-VL's is the
same model (the registry maps both architectures here).

Parameter names match the Hub checkpoint (model.layers.*, lm_head.*); the vision towers live in
models/qwen2_5_vl_vision.py and models/qwen2_vl_vision.py and run in the vision service.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import nn

from kernels.rotary import apply_mrope
from models.layers import MergedGatedMLP, MergedLinear, RMSNorm, transpose_linears
from processor.model_config import ModelConfig, TextConfig

# torch.mm(..., out_dtype=) exists from torch 2.8 (CUDA only)
_MM_OUT_DTYPE = tuple(int(v) for v in torch.__version__.split(".")[:2]) >= (2, 8)

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
    """Multimodal rotary embedding: each frequency band takes its position from one axis (mrope_section), applied
    to q and k in place by one kernel (kernels/rotary.py)."""

    def __init__(self, cfg: TextConfig):
        super().__init__()
        dim = cfg.head_dim
        # a plain attribute, not a buffer: the model is built on the meta device before loading; moved to the
        # model's device by the first forward (the worker's warm-up, before any CUDA graph is captured)
        self.inv_freq = 1.0 / (
            cfg.rope_theta ** (torch.arange(0, dim, 2, dtype=torch.float, device="cpu") / dim)
        )
        self.mrope_section = tuple(cfg.mrope_section) or (dim // 2, 0, 0)
        if sum(self.mrope_section) != dim // 2:
            raise ValueError(f"mrope_section {self.mrope_section} must sum to head_dim/2 = {dim // 2}")

    def forward(self, q: torch.Tensor, k: torch.Tensor, positions: torch.Tensor) -> None:
        # q: [T, heads, head_dim], k: [T, kv_heads, head_dim] (views of the fused projection); positions: [3, T]
        if self.inv_freq.device != q.device:
            self.inv_freq = self.inv_freq.to(q.device)
        apply_mrope(q, k, positions, self.inv_freq, self.mrope_section)


class Qwen2_5_VLAttention(nn.Module):
    def __init__(self, cfg: TextConfig, layer_idx: int):
        super().__init__()
        self.layer_idx = layer_idx
        self.num_heads = cfg.num_attention_heads
        self.num_kv_heads = cfg.num_key_value_heads
        self.head_dim = cfg.head_dim
        self.q_size = self.num_heads * self.head_dim
        self.kv_size = self.num_kv_heads * self.head_dim
        self.qkv_proj = MergedLinear(cfg.hidden_size, [self.q_size, self.kv_size, self.kv_size], bias=True)
        self.o_proj = nn.Linear(self.q_size, cfg.hidden_size, bias=False)

    def forward(self, x: torch.Tensor, positions: torch.Tensor, rotary: MRotaryEmbedding, attn, meta):
        # x: [T, hidden]; positions: [3, T]
        n = x.shape[0]
        q, k, v = self.qkv_proj(x).split([self.q_size, self.kv_size, self.kv_size], dim=-1)
        q = q.view(n, self.num_heads, self.head_dim)
        k = k.view(n, self.num_kv_heads, self.head_dim)
        v = v.view(n, self.num_kv_heads, self.head_dim)
        rotary(q, k, positions)
        o = attn.forward(self.layer_idx, q, k, v, meta)  # [T, heads, head_dim]
        return self.o_proj(o.reshape(n, self.q_size))


class Qwen2_5_VLDecoderLayer(nn.Module):
    def __init__(self, cfg: TextConfig, layer_idx: int):
        super().__init__()
        self.self_attn = Qwen2_5_VLAttention(cfg, layer_idx)
        self.mlp = MergedGatedMLP(cfg.hidden_size, cfg.intermediate_size, cfg.hidden_act, bias=False)
        self.input_layernorm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps)
        self.post_attention_layernorm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps)

    def forward(self, x, residual, positions, rotary, attn, meta):
        # the residual stream is carried apart from the layer output so that each add fuses with the next norm
        if residual is None:
            residual = x
            h = self.input_layernorm(x)
        else:
            h, residual = self.input_layernorm(x, residual)
        h = self.self_attn(h, positions, rotary, attn, meta)
        h, residual = self.post_attention_layernorm(h, residual)
        return self.mlp(h), residual


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
    # fused parameters and the checkpoint tensors stacked into them (along the output dimension, in this order)
    packed_modules_mapping: dict[str, tuple[str, ...]] = {
        "qkv_proj": ("q_proj", "k_proj", "v_proj"),
        "gate_up_proj": ("gate_proj", "up_proj"),
    }

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

    def process_weights_after_loading(self) -> None:
        # on a GPU the decoder layers' projections keep their weights as [in, out] (KNLinear: faster cuBLASLt
        # GEMMs at every batch size measured on an H100); the CPU keeps nn.Linear's layout
        if self.lm_head.weight.is_cuda:
            for layer in self.model.layers:
                transpose_linears(layer)

    def positions(self, spans: Sequence[Span], start: int, end: int) -> torch.Tensor:
        return mrope_positions(spans, start, end, self.merge)

    def position_delta(self, spans: Sequence[Span]) -> int:
        return mrope_delta(spans, self.merge)

    def valid_span(self, num_tokens: int, grid: tuple[int, ...]) -> bool:
        """Whether an image span of num_tokens fits its (t, h, w) patch grid (the positions come from it)."""
        if len(grid) != 3:
            return False
        t, h, w = grid
        m = self.merge
        return min(t, h, w) >= 1 and not h % m and not w % m and t * h * w // m**2 == num_tokens

    def embed(self, input_ids: torch.Tensor) -> torch.Tensor:
        return self.model.embed_tokens(input_ids)

    def forward(self, inputs_embeds: torch.Tensor, positions: torch.Tensor, meta) -> torch.Tensor:
        # inputs_embeds: [T, hidden]; positions: [3, T] -> final hidden states [T, hidden]
        x, residual = inputs_embeds, None
        rotary = self.model.rotary_emb
        for layer in self.model.layers:
            x, residual = layer(x, residual, positions, rotary, self.attn, meta)
        out, _ = self.model.norm(x, residual)
        return out

    def compute_logits(self, hidden: torch.Tensor) -> torch.Tensor:
        # hidden: [B, hidden] -> logits [B, vocab] in float32
        if hidden.is_cuda and hidden.dtype != torch.float32 and _MM_OUT_DTYPE:
            # float32 straight out of the GEMM's accumulator: bf16 logits near 30 are 0.125 apart, so top choices
            # would tie exactly and greedy decoding would turn on rounding (torch >= 2.8 on CUDA)
            return torch.mm(hidden, self.lm_head.weight.t(), out_dtype=torch.float32)
        return self.lm_head(hidden).float()
