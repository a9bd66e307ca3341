"""Builds a model on the meta device and fills it from a directory of safetensors files (sharded or not)."""

from __future__ import annotations

import json
import logging
import time
from pathlib import Path

import torch
from safetensors import safe_open
from torch import nn

from processor.model_config import ModelConfig

logger = logging.getLogger(__name__)

DTYPES = {
    "float32": torch.float32,
    "float16": torch.float16,
    "bfloat16": torch.bfloat16,
    "fp32": torch.float32,
    "fp16": torch.float16,
    "bf16": torch.bfloat16,
    "half": torch.float16,
    "float": torch.float32,
}


def resolve_dtype(name: str, config: ModelConfig, device: torch.device) -> torch.dtype:
    """ "auto" is the checkpoint's dtype on a GPU and float32 on the CPU."""
    if name == "auto":
        return DTYPES.get(config.torch_dtype, torch.float32) if device.type == "cuda" else torch.float32
    if name not in DTYPES:
        raise ValueError(f"unknown dtype {name!r}; choose auto, {', '.join(sorted(DTYPES))}")
    return DTYPES[name]


def resolve_device(name: str) -> torch.device:
    """ "auto" is the current CUDA device when there is one, else the CPU; "cuda" gets its index filled in."""
    device = torch.device(("cuda" if torch.cuda.is_available() else "cpu") if name == "auto" else name)
    if device.type == "cuda" and device.index is None:
        device = torch.device("cuda", torch.cuda.current_device())
    return device


def safetensors_files(model_dir: Path) -> list[Path]:
    index = model_dir / "model.safetensors.index.json"
    if index.is_file():
        names = sorted(set(json.loads(index.read_text())["weight_map"].values()))
        return [model_dir / n for n in names]
    files = sorted(model_dir.glob("*.safetensors"))
    if not files:
        raise FileNotFoundError(f"no *.safetensors weights in {model_dir}")
    return files


def map_key(key: str, prefixes: tuple[tuple[str, str | None], ...]) -> str | None:
    for theirs, ours in prefixes:
        if key.startswith(theirs):
            return None if ours is None else ours + key[len(theirs) :]
    return None


def load_model(
    model_cls: type[nn.Module],
    config: ModelConfig,
    model_dir: str | Path,
    dtype: torch.dtype,
    device: torch.device,
) -> nn.Module:
    """Instantiate `model_cls(config)` without allocating, then assign the checkpoint tensors it names."""
    model_dir = Path(model_dir)
    with torch.device("meta"):
        model = model_cls(config)
    expected = dict(model.state_dict())
    state: dict[str, torch.Tensor] = {}
    files = safetensors_files(model_dir)
    t0 = time.perf_counter()
    loaded_bytes = 0
    for i, path in enumerate(files, 1):
        with safe_open(str(path), framework="pt", device="cpu") as f:
            for key in f.keys():  # noqa: SIM118 (safe_open is not a dict)
                name = map_key(key, model_cls.checkpoint_prefixes)
                if name is None or name not in expected:
                    continue
                tensor = f.get_tensor(key)
                if tuple(tensor.shape) != tuple(expected[name].shape):
                    raise ValueError(
                        f"{key}: checkpoint shape {tuple(tensor.shape)} != model {tuple(expected[name].shape)}"
                    )
                state[name] = tensor.to(device=device, dtype=dtype)
                loaded_bytes += state[name].numel() * state[name].element_size()
        logger.info(
            "loading %s weights: %d/%d files, %.2f GB, %.1f s",
            model_cls.__name__,
            i,
            len(files),
            loaded_bytes / 1e9,
            time.perf_counter() - t0,
        )
    tied = getattr(config.text, "tie_word_embeddings", False) and "lm_head.weight" in expected
    missing = set(expected) - set(state) - ({"lm_head.weight"} if tied else set())
    if missing:
        raise ValueError(
            f"checkpoint in {model_dir} lacks {len(missing)} tensors, e.g. {sorted(missing)[:5]}"
        )
    model.load_state_dict(state, strict=False, assign=True)
    model.tie_weights()
    return model.eval().requires_grad_(False)
