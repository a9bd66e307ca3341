"""Architecture name -> model classes, imported lazily so a service loads only what it runs."""

from __future__ import annotations

import importlib
from dataclasses import dataclass


@dataclass(frozen=True)
class ModelEntry:
    """Dotted "module:Class" paths for the parts of one model family."""

    language_model: str
    vision_model: str | None = None
    image_processor: str | None = None  # the exact path: HF's processor step for step, float32 on the host
    fast_image_processor: str | None = (
        None  # host decodes to uint8, the vision device normalizes and patchifies
    )
    # the tokens of one image attend to each other both ways (Gemma 3): prefill chunks never cut an image
    bidirectional_image_spans: bool = False


# How weights are obtained: the checkpoint's safetensors ("auto" and "safetensors"), or random ones made from
# config.json alone ("dummy", for benchmarks without a checkpoint, as SGLang's --load-format dummy).
LOAD_FORMATS = ("auto", "safetensors", "dummy")

_REGISTRY: dict[str, ModelEntry] = {
    "Qwen2_5_VLForConditionalGeneration": ModelEntry(
        language_model="models.qwen2_5_vl:Qwen2_5_VLForCausalLM",
        vision_model="models.qwen2_5_vl_vision:Qwen2_5_VisionTransformer",
        image_processor="models.qwen2_vl_image:Qwen2VLImagePreprocessor",
        fast_image_processor="models.qwen2_vl_image:FastQwen2VLImagePreprocessor",
    ),
    # the same Qwen2 language model with M-RoPE; its own tower (LayerNorm blocks, fc1/fc2 MLP, no windows)
    "Qwen2VLForConditionalGeneration": ModelEntry(
        language_model="models.qwen2_5_vl:Qwen2_5_VLForCausalLM",
        vision_model="models.qwen2_vl_vision:Qwen2VisionTransformer",
        image_processor="models.qwen2_vl_image:Qwen2VLImagePreprocessor",
        fast_image_processor="models.qwen2_vl_image:FastQwen2VLImagePreprocessor",
    ),
    # Qwen2 language model with 1-D rotary positions; SigLIP tower, projector and anyres packing; crops of the
    # exact (host) path only
    "LlavaOnevisionForConditionalGeneration": ModelEntry(
        language_model="models.llava_onevision:LlavaOnevisionForCausalLM",
        vision_model="models.siglip_vision:LlavaOnevisionVisionModel",
        image_processor="models.llava_onevision_image:LlavaOnevisionImagePreprocessor",
    ),
    # SigLIP tower + average-pool projector (256 soft tokens); sliding-window and global layers, bidirectional
    # attention within each image
    "Gemma3ForConditionalGeneration": ModelEntry(
        language_model="models.gemma3:Gemma3ForCausalLM",
        vision_model="models.gemma3_vision:Gemma3VisionModel",
        image_processor="models.gemma3_image:Gemma3ImagePreprocessor",
        bidirectional_image_spans=True,
    ),
    # Llama 3 with tanh-gated cross-attention layers over an encoder cache of each image's tile states (the
    # worker's second paged KV kind; the scheduler shares its pages by image); tiled tower + projector
    "MllamaForConditionalGeneration": ModelEntry(
        language_model="models.mllama:MllamaForCausalLM",
        vision_model="models.mllama_vision:MllamaVisionModel",
        image_processor="models.mllama_image:MllamaTilePreprocessor",
    ),
}


def supported_architectures() -> list[str]:
    return sorted(_REGISTRY)


def get_entry(architecture: str) -> ModelEntry:
    try:
        return _REGISTRY[architecture]
    except KeyError:
        raise ValueError(
            f"architecture {architecture!r} is not supported; supported: {', '.join(supported_architectures())}"
        ) from None


def load_class(path: str) -> type:
    module, _, name = path.partition(":")
    return getattr(importlib.import_module(module), name)


def language_model_class(architecture: str) -> type:
    return load_class(get_entry(architecture).language_model)


def vision_model_class(architecture: str) -> type:
    entry = get_entry(architecture)
    if entry.vision_model is None:
        raise ValueError(f"{architecture} has no vision encoder")
    return load_class(entry.vision_model)


def image_preprocessor_class(architecture: str) -> type:
    entry = get_entry(architecture)
    if entry.image_processor is None:
        raise ValueError(f"{architecture} has no image processor")
    return load_class(entry.image_processor)


def fast_image_preprocessor_class(architecture: str) -> type | None:
    entry = get_entry(architecture)
    return load_class(entry.fast_image_processor) if entry.fast_image_processor else None
