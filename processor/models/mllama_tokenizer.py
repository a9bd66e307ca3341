"""The tiny mllama model's tokenizer, built offline: the real Llama 3 byte-level BPE ranks shipped by the PyPI
package llama-models (llama_models/llama3/tokenizer.model), Llama 3's pre-tokenizer pattern, its 256 special
tokens (ids 128000-128255, named as llama-models names them, except 128011, which Llama 3.2 Vision's HF tokenizer
keeps reserved) and <|image|> = 128256 (image_token_index of meta-llama/Llama-3.2-11B-Vision-Instruct)."""

from __future__ import annotations

import importlib.util
import json
from importlib import resources
from pathlib import Path

LLAMA3_PATTERN = (
    r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}{1,3}| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|"
    r"\s+(?!\S)|\s+"
)
NUM_BASE_TOKENS = 128000
IMAGE_TOKEN_ID = 128256
_NAMED = [
    "<|begin_of_text|>",
    "<|end_of_text|>",
    "<|reserved_special_token_0|>",
    "<|reserved_special_token_1|>",
    "<|finetune_right_pad_id|>",
    "<|step_id|>",
    "<|start_header_id|>",
    "<|end_header_id|>",
    "<|eom_id|>",
    "<|eot_id|>",
    "<|python_tag|>",
    "<|reserved_special_token_2|>",  # llama-models' <|image|>; HF's mllama tokenizer puts <|image|> at 128256
]


def llama3_special_tokens() -> list[tuple[int, str]]:
    reserved = [f"<|reserved_special_token_{3 + i}|>" for i in range(256 - len(_NAMED))]
    tokens = list(enumerate(_NAMED + reserved, start=NUM_BASE_TOKENS))
    return [*tokens, (IMAGE_TOKEN_ID, "<|image|>")]


def llama3_ranks_file() -> Path:
    spec = importlib.util.find_spec("llama_models")  # only its data file is needed: do not import the package
    if spec is None or not spec.submodule_search_locations:
        raise RuntimeError("the llama-models package is missing: pip install llama-models==0.3.0")
    return Path(list(spec.submodule_search_locations)[0]) / "llama3" / "tokenizer.model"


def build_mllama_tokenizer(dst: Path) -> None:
    """Writes tokenizer.json, tokenizer_config.json and chat_template.json into dst (replacing any there)."""
    from tokenizers import AddedToken
    from transformers.convert_slow_tokenizer import TikTokenConverter

    tok = TikTokenConverter(vocab_file=str(llama3_ranks_file()), pattern=LLAMA3_PATTERN).converted()
    decoder = {}
    for tid, content in llama3_special_tokens():
        if tok.add_special_tokens([AddedToken(content, special=True, normalized=False)]) != 1:
            raise RuntimeError(f"could not add {content}")
        if tok.token_to_id(content) != tid:
            raise RuntimeError(f"{content} got id {tok.token_to_id(content)}, expected {tid}")
        decoder[str(tid)] = {
            "content": content,
            "lstrip": False,
            "normalized": False,
            "rstrip": False,
            "single_word": False,
            "special": True,
        }
    tok.save(str(dst / "tokenizer.json"))
    template = resources.files("processor").joinpath("templates/mllama.jinja").read_text()
    cfg = {
        "added_tokens_decoder": decoder,
        "bos_token": "<|begin_of_text|>",
        "eos_token": "<|eot_id|>",
        "pad_token": "<|finetune_right_pad_id|>",
        "chat_template": template,
        "clean_up_tokenization_spaces": True,
        "model_input_names": ["input_ids", "attention_mask"],
        "model_max_length": 131072,
        "tokenizer_class": "PreTrainedTokenizerFast",
    }
    (dst / "tokenizer_config.json").write_text(json.dumps(cfg, indent=2, ensure_ascii=False) + "\n")
    (dst / "chat_template.json").write_text(json.dumps({"chat_template": template}, indent=2) + "\n")
