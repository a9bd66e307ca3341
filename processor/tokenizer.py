"""The model's tokenizer and chat template, loaded without torch (PreTrainedTokenizerFast, not AutoTokenizer)."""

from __future__ import annotations

import json
import logging
from collections.abc import Sequence
from functools import cached_property
from pathlib import Path
from typing import Any

import tokenizers
from transformers import PreTrainedTokenizerFast

from common.errors import InvalidRequestError

logger = logging.getLogger(__name__)


class Tokenizer:
    def __init__(self, model_dir: str | Path):
        model_dir = Path(model_dir)
        if not (model_dir / "tokenizer.json").is_file():
            raise FileNotFoundError(
                f"{model_dir}/tokenizer.json not found: the model directory needs a fast tokenizer"
            )
        self.hf = PreTrainedTokenizerFast.from_pretrained(str(model_dir))
        self.chat_template = self.hf.chat_template or _processor_chat_template(model_dir)
        self.vocab_size = len(self.hf)
        self.all_special_ids = set(self.hf.all_special_ids)
        self.eos_token_id = self.hf.eos_token_id
        self._added_ids = set(self.hf.added_tokens_decoder)
        self._byte_decoder = _byte_decoder() if _is_byte_level(self.hf) else None

    def encode(self, text: str) -> list[int]:
        return self.hf.encode(text, add_special_tokens=False)

    def decode(self, ids: Sequence[int], skip_special_tokens: bool = True) -> str:
        return self.hf.decode(list(ids), skip_special_tokens=skip_special_tokens)

    @cached_property
    def backend(self) -> tokenizers.Tokenizer | None:
        """The Rust tokenizer whose decode() ours returns unchanged, for streaming decoders (None when ours
        post-processes it: clean-up of tokenization spaces)."""
        return None if self.hf.clean_up_tokenization_spaces else self.hf.backend_tokenizer

    def convert_ids_to_tokens(self, ids: Sequence[int]) -> list[str]:
        return self.hf.convert_ids_to_tokens(list(ids))

    def token_text(self, token_id: int) -> str:
        """A token's own text (a piece of a UTF-8 character shows as U+FFFD), as logprob entries name tokens."""
        return self.token_bytes(token_id).decode("utf-8", errors="replace")

    def token_bytes(self, token_id: int) -> bytes:
        """The raw bytes a token stands for (byte-level BPE pieces may be part of a UTF-8 character)."""
        if self._byte_decoder is None:
            return self.decode([token_id], skip_special_tokens=False).encode()
        piece = self.hf.convert_ids_to_tokens(int(token_id))
        if piece is None:
            return b""
        if token_id in self._added_ids:
            return piece.encode()
        try:
            return bytes(self._byte_decoder[c] for c in piece)
        except KeyError:
            return piece.encode()

    def token_to_id(self, token: str) -> int | None:
        tid = self.hf.convert_tokens_to_ids(token)
        return None if tid is None or tid == self.hf.unk_token_id else int(tid)

    def apply_chat_template(
        self, messages: list[dict[str, Any]], add_generation_prompt: bool = True, **kwargs: Any
    ) -> str:
        if not self.chat_template:
            raise InvalidRequestError(
                "this model has no chat template; use /v1/completions with a raw prompt", param="messages"
            )
        return self.hf.apply_chat_template(
            messages,
            chat_template=self.chat_template,
            tokenize=False,
            add_generation_prompt=add_generation_prompt,
            **kwargs,
        )


def _processor_chat_template(model_dir: Path) -> str | None:
    """Older VLM checkpoints keep the template in chat_template.json (the processor's) only."""
    for name in ("chat_template.jinja", "chat_template.json"):
        path = model_dir / name
        if path.is_file():
            text = path.read_text()
            return json.loads(text)["chat_template"] if name.endswith(".json") else text
    return None


def _is_byte_level(hf: PreTrainedTokenizerFast) -> bool:
    decoder = json.loads(hf.backend_tokenizer.to_str()).get("decoder") or {}
    return decoder.get("type") == "ByteLevel"


def _byte_decoder() -> dict[str, int]:
    """GPT-2's reversible byte <-> printable character table, inverted."""
    bs = (
        list(range(ord("!"), ord("~") + 1))
        + list(range(ord("¡"), ord("¬") + 1))
        + list(range(ord("®"), ord("ÿ") + 1))
    )
    cs = bs[:]
    n = 0
    for b in range(256):
        if b not in bs:
            bs.append(b)
            cs.append(256 + n)
            n += 1
    return {chr(c): b for b, c in zip(bs, cs, strict=True)}
