"""Request parameters -> SamplingParams and StoppingCriteria, shared by the gateway and the in-process engine.

Two vocabularies map here: OpenAI's (max_tokens, stop, logit_bias with string keys, ...) and SGLang's
`sampling_params` (max_new_tokens, min_new_tokens, ...). Defaults come from the request, then the model's
generation_config.json, then OpenAI's.
"""

from __future__ import annotations

import logging
import math
from collections.abc import Mapping, Sequence
from typing import Any

from common.errors import InvalidRequestError
from common.types import SamplingParams, StoppingCriteria

logger = logging.getLogger(__name__)

SGLANG_KEYS = {
    "max_new_tokens",
    "min_new_tokens",
    "temperature",
    "top_p",
    "top_k",
    "min_p",
    "stop",
    "stop_token_ids",
    "n",
    "presence_penalty",
    "frequency_penalty",
    "repetition_penalty",
    "ignore_eos",
    "skip_special_tokens",
    "no_stop_trim",
    "seed",
    "sampling_seed",
    "logit_bias",
}


# SGLang's constrained decoding keys: passed on as request fields (processor/constraints.py reads them)
CONSTRAINT_KEYS = ("regex", "ebnf", "json_schema", "structural_tag")


def from_sglang(sampling_params: Mapping[str, Any] | None) -> dict[str, Any]:
    """SGLang's sampling_params -> the OpenAI field names `build` takes (unknown keys are logged and dropped);
    the constraint keys keep their names."""
    sp = dict(sampling_params or {})
    if sp.get("structural_tag") is not None:
        raise InvalidRequestError(
            "sampling_params.structural_tag is not supported; use json_schema, regex or ebnf",
            param="sampling_params.structural_tag",
        )
    unknown = sorted(set(sp) - SGLANG_KEYS - set(CONSTRAINT_KEYS))
    if unknown:
        logger.warning("ignoring unknown sampling_params: %s", ", ".join(unknown))
    fields = {k: v for k, v in sp.items() if k in SGLANG_KEYS or (k in CONSTRAINT_KEYS and v is not None)}
    if "max_new_tokens" in fields:
        fields["max_tokens"] = fields.pop("max_new_tokens")
    if "min_new_tokens" in fields:
        fields["min_tokens"] = fields.pop("min_new_tokens")
    if "sampling_seed" in fields:
        fields["seed"] = fields.pop("sampling_seed")
    return fields


def build(
    fields: Mapping[str, Any],
    *,
    defaults: Mapping[str, Any],
    eos_ids: tuple[int, ...],
    max_new_tokens: int,
    return_logprob: bool = False,
    top_logprobs: int = 0,
    vocab_size: int | None = None,
) -> tuple[SamplingParams, StoppingCriteria]:
    """OpenAI-named fields (None = not given) -> the worker's and the scheduler's parameters; token ids (stop
    tokens, logit bias keys) must lie in [0, vocab_size) when it is given."""

    def pick(name: str, fallback: Any) -> Any:
        value = fields.get(name)
        return value if value is not None else defaults.get(name, fallback)

    stop = fields.get("stop")
    stops = () if stop is None else (stop,) if isinstance(stop, str) else stop
    if not isinstance(stops, list | tuple) or not all(isinstance(s, str) for s in stops):
        raise InvalidRequestError("stop must be a string or a list of strings", param="stop")
    if len(stops) > 4:
        raise InvalidRequestError("stop takes at most 4 sequences", param="stop")
    stop_token_ids = fields.get("stop_token_ids") or ()
    if not isinstance(stop_token_ids, list | tuple):
        raise InvalidRequestError("stop_token_ids must be a list of token ids", param="stop_token_ids")
    stop_ids = tuple(_integer("stop_token_ids", t) for t in stop_token_ids)
    min_tokens = _integer("min_tokens", fields.get("min_tokens") or 0)
    top_k = _integer("top_k", pick("top_k", 0))
    _in_range("stop_token_ids", *stop_ids, low=0)
    _in_range("min_tokens", min_tokens, low=0)
    _in_range("top_k", top_k, low=-1)
    ignore_eos = bool(fields.get("ignore_eos") or False)
    try:
        bias = {int(k): float(v) for k, v in (fields.get("logit_bias") or {}).items()}
    except (TypeError, ValueError, AttributeError):
        raise InvalidRequestError("logit_bias must map token ids to numbers", param="logit_bias") from None
    _in_range("logit_bias", *bias, low=0)
    if vocab_size is not None:
        _in_vocab("stop_token_ids", stop_ids, vocab_size)
        _in_vocab("logit_bias", list(bias), vocab_size)
    seed = fields.get("seed")
    if seed is not None and not (isinstance(seed, int) and not isinstance(seed, bool) and 0 <= seed < 2**63):
        raise InvalidRequestError("seed must be an integer in [0, 2**63)", param="seed")
    sampling = SamplingParams(
        temperature=_number("temperature", pick("temperature", 1.0)),
        top_p=_number("top_p", pick("top_p", 1.0)),
        top_k=top_k,
        min_p=_number("min_p", pick("min_p", 0.0)),
        seed=seed,
        presence_penalty=_number("presence_penalty", fields.get("presence_penalty") or 0.0),
        frequency_penalty=_number("frequency_penalty", fields.get("frequency_penalty") or 0.0),
        repetition_penalty=_number("repetition_penalty", pick("repetition_penalty", 1.0)),
        logit_bias=bias,
        return_logprob=return_logprob,
        top_logprobs=top_logprobs,
        min_tokens_suppress_ids=((() if ignore_eos else eos_ids) + stop_ids) if min_tokens else (),
        min_tokens=min_tokens,
    )
    stopping = StoppingCriteria(
        max_new_tokens=max_new_tokens,
        min_new_tokens=min(min_tokens, max_new_tokens),
        stop=stops,
        stop_token_ids=stop_ids,
        ignore_eos=ignore_eos,
        no_stop_trim=bool(fields.get("no_stop_trim") or False),
        skip_special_tokens=fields.get("skip_special_tokens", True) is not False,
    )
    return sampling, stopping


INT32_MAX = 2**31 - 1


def _integer(param: str, value: Any) -> int:
    """An integer field as sent (JSON numbers like 5.0 included); anything else is a 400 naming the field."""
    if (
        isinstance(value, bool)
        or not isinstance(value, int | float)
        or not math.isfinite(value)
        or value != int(value)
    ):
        raise InvalidRequestError(f"{param} must be an integer, got {value!r}", param=param)
    return int(value)


def _number(param: str, value: Any) -> float:
    if isinstance(value, bool) or not isinstance(value, int | float) or not math.isfinite(value):
        raise InvalidRequestError(f"{param} must be a number, got {value!r}", param=param)
    return float(value)


def _in_range(param: str, *values: int, low: int) -> None:
    """Integers the wire format carries as int32 (token ids, counts): out of range is a 400, never a 500."""
    for v in values:
        if not low <= v <= INT32_MAX:
            raise InvalidRequestError(f"{param} must be in [{low}, {INT32_MAX}], got {v}", param=param)


def _in_vocab(param: str, ids: Sequence[int], vocab_size: int) -> None:
    """A 400 naming every id the model has no logit for (a silently unmatched stop id, a bias on nothing)."""
    bad = sorted({t for t in ids if not 0 <= t < vocab_size})
    if bad:
        raise InvalidRequestError(
            f"{param}: token ids {bad} are outside the vocabulary [0, {vocab_size})", param=param
        )


def max_new_tokens_for(
    requested: int | None, prompt_len: int, context_length: int, param: str = "max_tokens"
) -> int:
    """The generation budget: what was asked if it fits the context, else an OpenAI-style 400."""
    room = context_length - prompt_len
    if room <= 0:
        raise InvalidRequestError(
            f"This model's maximum context length is {context_length} tokens; the prompt is {prompt_len} tokens "
            "(images included)",
            param="messages",
            code="context_length_exceeded",
        )
    if requested is None:
        return room
    if requested < 1:
        raise InvalidRequestError(f"{param} must be >= 1", param=param)
    if requested > room:
        raise InvalidRequestError(
            f"This model's maximum context length is {context_length} tokens. However, you requested "
            f"{prompt_len + requested} tokens ({prompt_len} in the prompt, {requested} for the completion)",
            param=param,
            code="context_length_exceeded",
        )
    return requested
