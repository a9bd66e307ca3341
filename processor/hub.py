"""--model: a local directory, a Hugging Face Hub id resolved through huggingface_hub (HF_HUB_OFFLINE and the local
cache are honoured), or, when the Hub cannot give it, a config Mirador bundles (Qwen2.5-VL 3B/7B/72B dimensions, no
weights: for --load-format dummy)."""

from __future__ import annotations

import os
from pathlib import Path


def resolve_model_path(model: str, load_format: str = "auto") -> Path:
    path = Path(model).expanduser()
    if path.is_dir():
        return path.resolve()
    if load_format == "dummy" and (bundled := _bundled(model)) is not None:
        return bundled
    if model.count("/") != 1 or model.startswith((".", "/")):
        raise FileNotFoundError(
            f"--model {model!r} is neither a directory nor a Hugging Face Hub id (org/name)"
        )
    try:
        return _from_hub(model)
    except FileNotFoundError:
        if (bundled := _bundled(model)) is not None:  # config and tokenizer only; weights need the Hub
            return bundled
        raise


def _bundled(model: str) -> Path | None:
    from mirador.default_model import bundled_model_dir  # the launcher's package; imported only when needed

    return bundled_model_dir(model)


def _from_hub(model: str) -> Path:
    from huggingface_hub import snapshot_download
    from huggingface_hub.errors import HfHubHTTPError, LocalEntryNotFoundError

    offline = os.environ.get("HF_HUB_OFFLINE", "").lower() in ("1", "true", "yes")
    patterns = ["*.json", "*.safetensors", "*.jinja", "*.txt", "*.model", "*.tiktoken"]
    try:
        return Path(snapshot_download(model, allow_patterns=patterns, local_files_only=offline))
    except LocalEntryNotFoundError:
        raise FileNotFoundError(
            f"{model} is not in the local Hugging Face cache and HF_HUB_OFFLINE is set"
        ) from None
    except (HfHubHTTPError, OSError) as e:
        raise FileNotFoundError(f"could not download {model} from the Hugging Face Hub: {e}") from None
