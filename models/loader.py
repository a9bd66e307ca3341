"""Builds a model on the meta device and fills it from a directory of safetensors files (sharded or not)."""

from __future__ import annotations

import json
import logging
import time
import zlib
from pathlib import Path

import torch
from safetensors import safe_open
from torch import nn

from models.registry import LOAD_FORMATS
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
        raise FileNotFoundError(
            f"no *.safetensors weights in {model_dir} (--load-format dummy serves random weights made from its "
            "config.json)"
        )
    return files


def map_key(key: str, prefixes: tuple[tuple[str, str | None], ...]) -> str | None:
    for theirs, ours in prefixes:
        if key.startswith(theirs):
            return None if ours is None else ours + key[len(theirs) :]
    return None


def packed_target(model: nn.Module, name: str) -> tuple[str, int, int] | None:
    """For a checkpoint tensor that lives inside a fused parameter (q_proj in qkv_proj, ...): (fused parameter name,
    row offset, rows); None otherwise. The model declares `packed_modules_mapping`; fused modules carry
    `output_sizes`."""
    packed = getattr(model, "packed_modules_mapping", {})
    parts = name.split(".")
    for i, part in enumerate(parts):
        for fused, shards in packed.items():
            if part in shards:
                module = model.get_submodule(".".join([*parts[:i], fused]))
                shard = shards.index(part)
                sizes = module.output_sizes
                return ".".join([*parts[:i], fused, *parts[i + 1 :]]), sum(sizes[:shard]), sizes[shard]
    return None


def checkpoint_shapes(model: nn.Module) -> dict[str, tuple[int, ...]]:
    """Parameter names and shapes as a Hub checkpoint stores them: fused parameters split back into their parts."""
    out: dict[str, tuple[int, ...]] = {}
    packed = getattr(model, "packed_modules_mapping", {})
    for name, t in model.state_dict().items():
        parts = name.split(".")
        fused = next(((i, p) for i, p in enumerate(parts) if p in packed), None)
        if fused is None:
            out[name] = tuple(t.shape)
            continue
        i, p = fused
        sizes = model.get_submodule(".".join(parts[: i + 1])).output_sizes
        for shard, rows in zip(packed[p], sizes, strict=True):
            out[".".join([*parts[:i], shard, *parts[i + 1 :]])] = (rows, *t.shape[1:])
    return out


def dummy_tensor(
    name: str,
    shape: tuple[int, ...],
    generator: torch.Generator,
    head_scale: float,
    device: torch.device | str = "cpu",
) -> torch.Tensor:
    """A random weight that keeps activations at unit scale: biases N(0, 0.02), norm weights 1, embeddings N(0, 1),
    matrices N(0, 1/fan_in), and an output head whose logits have standard deviation `head_scale` (peaky, so
    greedy choices are not near-ties that float noise can flip)."""
    if name.endswith(".bias"):  # (LayerNorm biases too)
        return torch.randn(shape, generator=generator, device=device) * 0.02
    if (
        name.endswith(
            ("norm.weight", "layernorm.weight", "ln_q.weight", "layer_norm1.weight", "layer_norm2.weight")
        )
        or ".norm1." in name
        or ".norm2." in name
    ):
        return torch.ones(shape, device=device)
    t = torch.randn(shape, generator=generator, device=device)
    if name.endswith("embed_tokens.weight"):
        return t
    if name.endswith("lm_head.weight"):  # (language_model.lm_head.weight in LLaVA's Hub layout)
        return t * (head_scale / shape[1] ** 0.5)
    fan_in = 1
    for d in shape[1:]:
        fan_in *= d
    return t / fan_in**0.5


DUMMY_HEAD_SCALE = 10.0


def _dummy_state(
    model: nn.Module, expected: dict[str, torch.Tensor], dtype: torch.dtype, device: torch.device
) -> dict[str, torch.Tensor]:
    """Random weights made on the device, each seeded by its name: every process (worker, engine, benchmark)
    that builds the same config gets the same weights."""
    state = {}
    generator = torch.Generator(device=device)
    for name, meta in expected.items():
        generator.manual_seed(zlib.crc32(name.encode()))
        state[name] = dummy_tensor(name, tuple(meta.shape), generator, DUMMY_HEAD_SCALE, device).to(dtype)
    return state


def _checkpoint_state(
    model: nn.Module,
    model_cls: type[nn.Module],
    expected: dict[str, torch.Tensor],
    model_dir: Path,
    dtype: torch.dtype,
    device: torch.device,
) -> dict[str, torch.Tensor]:
    state: dict[str, torch.Tensor] = {}
    filled: dict[str, int] = {}  # fused parameter -> rows written so far
    files = safetensors_files(model_dir)
    t0 = time.perf_counter()
    loaded_bytes = 0
    for i, path in enumerate(files, 1):
        with safe_open(str(path), framework="pt", device="cpu") as f:
            for key in f.keys():  # noqa: SIM118 (safe_open is not a dict)
                name = map_key(key, model_cls.checkpoint_prefixes)
                if name is None:
                    continue
                target = None if name in expected else packed_target(model, name)
                if name not in expected and (target is None or target[0] not in expected):
                    continue
                tensor = f.get_tensor(key)
                want = (
                    tuple(expected[name].shape)
                    if target is None
                    else (target[2], *expected[target[0]].shape[1:])
                )
                if tuple(tensor.shape) != want:
                    raise ValueError(f"{key}: checkpoint shape {tuple(tensor.shape)} != model {want}")
                if target is None:
                    state[name] = tensor.to(device=device, dtype=dtype)
                else:
                    fused, offset, rows = target
                    if fused not in state:
                        state[fused] = torch.empty(expected[fused].shape, dtype=dtype, device=device)
                    state[fused][offset : offset + rows].copy_(tensor)
                    filled[fused] = filled.get(fused, 0) + rows
                loaded_bytes += tensor.numel() * tensor.element_size()
        logger.info(
            "loading %s weights: %d/%d files, %.2f GB, %.1f s",
            model_cls.__name__,
            i,
            len(files),
            loaded_bytes / 1e9,
            time.perf_counter() - t0,
        )
    partial = [n for n, rows in filled.items() if rows != expected[n].shape[0]]
    if partial:
        raise ValueError(f"checkpoint in {model_dir} fills fused tensors only in part, e.g. {partial[:3]}")
    return state


def load_model(
    model_cls: type[nn.Module],
    config: ModelConfig,
    model_dir: str | Path,
    dtype: torch.dtype,
    device: torch.device,
    load_format: str = "auto",
) -> nn.Module:
    """Instantiate `model_cls(config)` without allocating, then assign the checkpoint tensors it names (or random
    ones with load_format "dummy", from config.json alone, like SGLang's --load-format dummy)."""
    if load_format not in LOAD_FORMATS:
        raise ValueError(f"unknown load format {load_format!r}; choose from {', '.join(LOAD_FORMATS)}")
    model_dir = Path(model_dir)
    with torch.device("meta"):
        model = model_cls(config)
    expected = dict(model.state_dict())
    tied = getattr(config.text, "tie_word_embeddings", False) and "lm_head.weight" in expected
    if tied:
        expected.pop("lm_head.weight")
    if load_format == "dummy":
        state = _dummy_state(model, expected, dtype, device)
    else:
        state = _checkpoint_state(model, model_cls, expected, model_dir, dtype, device)
    missing = set(expected) - set(state)
    if missing:
        raise ValueError(
            f"checkpoint in {model_dir} lacks {len(missing)} tensors, e.g. {sorted(missing)[:5]}"
        )
    model.load_state_dict(state, strict=False, assign=True)
    model.tie_weights()
    after = getattr(model, "process_weights_after_loading", None)
    if after is not None:  # layout changes the kernels want (e.g. padding to aligned shapes)
        after()
    return model.eval().requires_grad_(False)
