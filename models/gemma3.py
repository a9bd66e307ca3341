"""Gemma 3's language model for the worker: scaled embeddings, (1 + weight) RMSNorms, q/k norms, pre/post
feed-forward norms, a GELU-tanh MLP, interleaved sliding-window and global layers with their own rope bases,
optional logit softcapping. Image tokens attend to their whole image (the attention backend's bidirectional
spans, from the metadata the runner builds when `bidirectional_image_spans` is set).

Parameter names match HF's Gemma3TextModel (model.layers.*); the checkpoint's language_model.model.* (Hub) and
model.language_model.* (transformers 5) map onto them. The output head is the embedding (Gemma ties them).
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import nn

from models.layers import MergedGatedMLP, MergedLinear, rotate_half
from processor.model_config import ModelConfig, TextConfig
from processor.models.gemma3 import Gemma3TextOptions, parse_gemma3_text

Span = tuple[int, int, tuple[int, int, int]]
# torch.mm(..., out_dtype=) exists from torch 2.8 (CUDA only)
_MM_OUT_DTYPE = tuple(int(v) for v in torch.__version__.split(".")[:2]) >= (2, 8)


class Gemma3RMSNorm(nn.Module):
    """x / rms(x) * (1 + weight), in float32, cast back last (HF's Gemma3RMSNorm)."""

    def __init__(self, dim: int, eps: float = 1e-6):
        super().__init__()
        self.weight = nn.Parameter(torch.zeros(dim))
        self.eps = eps

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        xf = x.float()
        out = xf * torch.rsqrt(xf.pow(2).mean(-1, keepdim=True) + self.eps)
        return (out * (1.0 + self.weight.float())).type_as(x)


class Gemma3Rotary:
    """Plain rotary embedding (rotate-half), one base per layer kind; linear scaling divides the frequencies."""

    def __init__(self, head_dim: int, base: float, factor: float = 1.0):
        # on the CPU even while the model is built on the meta device; moved to the model's by the first forward
        steps = torch.arange(0, head_dim, 2, dtype=torch.float, device="cpu") / head_dim
        self.inv_freq = 1.0 / (base**steps) / factor

    def cos_sin(self, positions: torch.Tensor, dtype: torch.dtype) -> tuple[torch.Tensor, torch.Tensor]:
        # positions: [T] -> cos, sin: [T, 1, head_dim]
        if self.inv_freq.device != positions.device:
            self.inv_freq = self.inv_freq.to(positions.device)
        freqs = positions.float()[:, None] * self.inv_freq[None, :]
        emb = torch.cat((freqs, freqs), dim=-1)
        return emb.cos().to(dtype)[:, None, :], emb.sin().to(dtype)[:, None, :]


class Gemma3Attention(nn.Module):
    def __init__(self, cfg: TextConfig, opts: Gemma3TextOptions, layer_idx: int):
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
        self.q_norm = Gemma3RMSNorm(self.head_dim, cfg.rms_norm_eps)
        self.k_norm = Gemma3RMSNorm(self.head_dim, cfg.rms_norm_eps)
        self.is_sliding = opts.layer_types[layer_idx] == "sliding_attention"
        # passed to the backend on every call: static per layer, so graphs replay them as they were captured
        self.attn_kwargs = {}
        if self.is_sliding:
            self.attn_kwargs["window"] = opts.sliding_window
        if opts.attn_logit_softcapping:
            self.attn_kwargs["softcap"] = float(opts.attn_logit_softcapping)

    def forward(self, x: torch.Tensor, cos_sin, attn, meta) -> torch.Tensor:
        # x: [T, hidden]; cos, sin: [T, 1, head_dim]
        n = x.shape[0]
        q, k, v = self.qkv_proj(x).split([self.q_size, self.kv_size, self.kv_size], dim=-1)
        q = self.q_norm(q.view(n, self.num_heads, self.head_dim))
        k = self.k_norm(k.view(n, self.num_kv_heads, self.head_dim))
        v = v.view(n, self.num_kv_heads, self.head_dim)
        cos, sin = cos_sin
        q = q * cos + rotate_half(q) * sin
        k = k * cos + rotate_half(k) * sin
        o = attn.forward(self.layer_idx, q, k, v, meta, **self.attn_kwargs)  # [T, heads, head_dim]
        return self.o_proj(o.reshape(n, self.q_size))


class Gemma3DecoderLayer(nn.Module):
    def __init__(self, cfg: TextConfig, opts: Gemma3TextOptions, layer_idx: int):
        super().__init__()
        self.self_attn = Gemma3Attention(cfg, opts, layer_idx)
        self.mlp = MergedGatedMLP(cfg.hidden_size, cfg.intermediate_size, opts.hidden_activation, bias=False)
        eps = cfg.rms_norm_eps
        self.input_layernorm = Gemma3RMSNorm(cfg.hidden_size, eps)
        self.post_attention_layernorm = Gemma3RMSNorm(cfg.hidden_size, eps)
        self.pre_feedforward_layernorm = Gemma3RMSNorm(cfg.hidden_size, eps)
        self.post_feedforward_layernorm = Gemma3RMSNorm(cfg.hidden_size, eps)

    def forward(self, x, cos_sin, attn, meta):
        h = self.self_attn(self.input_layernorm(x), cos_sin, attn, meta)
        x = x + self.post_attention_layernorm(h)
        h = self.mlp(self.pre_feedforward_layernorm(x))
        return x + self.post_feedforward_layernorm(h)


class Gemma3TextModel(nn.Module):
    def __init__(self, cfg: TextConfig, opts: Gemma3TextOptions):
        super().__init__()
        self.embed_tokens = nn.Embedding(cfg.vocab_size, cfg.hidden_size)
        self.layers = nn.ModuleList([Gemma3DecoderLayer(cfg, opts, i) for i in range(cfg.num_hidden_layers)])
        self.norm = Gemma3RMSNorm(cfg.hidden_size, cfg.rms_norm_eps)


class Gemma3ForCausalLM(nn.Module):
    """The worker's model: token (or image) embeddings in, hidden states and logits out."""

    # (checkpoint prefix, our prefix), first match wins; the tower and projector belong to the vision service
    checkpoint_prefixes = (
        ("language_model.model.", "model."),
        ("model.language_model.", "model."),
        ("language_model.lm_head.", None),
        ("lm_head.", None),
        ("vision_tower.", None),
        ("model.vision_tower.", None),
        ("multi_modal_projector.", None),
        ("model.multi_modal_projector.", None),
        ("model.", "model."),
    )
    hub_prefix = "language_model."  # where the Hub checkpoint keeps our names (the tiny-model builder)
    packed_modules_mapping: dict[str, tuple[str, ...]] = {
        "qkv_proj": ("q_proj", "k_proj", "v_proj"),
        "gate_up_proj": ("gate_proj", "up_proj"),
    }
    bidirectional_image_spans = True

    def __init__(self, config: ModelConfig):
        super().__init__()
        self.config = config
        self.options = opts = parse_gemma3_text(config.raw)
        text = config.text
        self.model = Gemma3TextModel(text, opts)
        self.attention_scale = opts.query_pre_attn_scalar**-0.5
        self.rotary = {
            "full_attention": Gemma3Rotary(text.head_dim, opts.rope_theta, opts.rope_linear_factor),
            "sliding_attention": Gemma3Rotary(text.head_dim, opts.rope_local_base_freq),
        }
        self.embed_scale = text.hidden_size**0.5
        self.attn = None  # set by the model runner: an attention backend over the worker's KV cache

    def tie_weights(self) -> None:
        pass  # the output head is the embedding itself (compute_logits)

    def positions(self, spans: Sequence[Span], start: int, end: int) -> torch.Tensor:
        # one position per token (images included); three equal rows, the runner's [3, T] layout
        return torch.arange(start, end).expand(3, end - start)

    def position_delta(self, spans: Sequence[Span]) -> int:
        return 0

    def valid_span(self, num_tokens: int, grid: tuple[int, ...]) -> bool:
        """Whether an image span of num_tokens fits its (1, h, w) patch grid pooled by the projector's kernel (the
        bidirectional span is the image's tokens, so a wrong count would open attention to the wrong rows)."""
        if len(grid) != 3:
            return False
        t, h, w = grid
        m = self.config.vision.spatial_merge_size if self.config.vision else 1
        return min(t, h, w) >= 1 and not h % m and not w % m and t * h * w // m**2 == num_tokens

    def embed(self, input_ids: torch.Tensor) -> torch.Tensor:
        # HF scales by sqrt(hidden) cast to the weight's dtype; image rows replace these unscaled
        w = self.model.embed_tokens.weight
        return self.model.embed_tokens(input_ids) * torch.tensor(self.embed_scale, dtype=w.dtype)

    def forward(self, inputs_embeds: torch.Tensor, positions: torch.Tensor, meta) -> torch.Tensor:
        # inputs_embeds: [T, hidden]; positions: [3, T] (equal rows) -> final hidden states [T, hidden]
        pos = positions[0]
        cos_sin = {kind: r.cos_sin(pos, inputs_embeds.dtype) for kind, r in self.rotary.items()}
        x = inputs_embeds
        for layer in self.model.layers:
            kind = "sliding_attention" if layer.self_attn.is_sliding else "full_attention"
            x = layer(x, cos_sin[kind], self.attn, meta)
        return self.model.norm(x)

    def compute_logits(self, hidden: torch.Tensor) -> torch.Tensor:
        # hidden: [B, hidden] -> logits [B, vocab] in float32
        weight = self.model.embed_tokens.weight
        if hidden.is_cuda and hidden.dtype != torch.float32 and _MM_OUT_DTYPE:
            # float32 straight out of the accumulator, as Qwen's head does: bf16 logits would tie greedy choices
            logits = torch.mm(hidden, weight.t(), out_dtype=torch.float32)
        else:
            logits = torch.nn.functional.linear(hidden, weight).float()
        cap = self.options.final_logit_softcapping
        if cap:
            logits = torch.tanh(logits / cap) * cap
        return logits
