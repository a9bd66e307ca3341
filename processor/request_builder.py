"""OpenAI-style messages (or a raw prompt) -> token ids with expanded image placeholders and media items.

Shared by the gateway and the in-process engine. Media is fetched concurrently; only image headers are read here
(size, orientation, format): the vision service decodes the pixels.
"""

from __future__ import annotations

import asyncio
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from common.errors import InvalidRequestError, PayloadTooLargeError
from common.types import MultimodalItem
from processor.media import MediaFetcher, MediaPolicy, content_key, image_data_uri, image_size
from processor.model_config import ModelConfig, load_model_config
from processor.models import media_spec_class
from processor.tokenizer import Tokenizer
from processor.tools import template_tool_calls

ROLES = {"system", "user", "assistant", "developer", "tool"}
_INLINE_BYTES = 1 << 20  # images smaller than this are described on the event loop
_INLINE_CHARS = 32_768  # texts shorter than this are tokenized on the event loop
# apply_chat_template arguments the builder sets itself (they change what it returns, or clash with ours)
_RESERVED_TEMPLATE_KWARGS = {
    "tokenize",
    "return_dict",
    "return_tensors",
    "return_assistant_tokens_mask",
    "chat_template",
    "conversation",
    "messages",
    "add_generation_prompt",
    "continue_final_message",
    "tools",
}


@dataclass
class PreparedPrompt:
    input_ids: list[int]
    mm_items: list[MultimodalItem]
    text: str = ""


@dataclass(frozen=True)
class ImageRef:
    """An image of a request before fetching: where it came from and which message part names it."""

    url: str
    param: str


class RequestBuilder:
    def __init__(
        self, model_dir: str | Path, policy: MediaPolicy | None = None, tokenizer: Tokenizer | None = None
    ):
        self.model_dir = Path(model_dir)
        self.config: ModelConfig = load_model_config(model_dir)
        self.tokenizer = tokenizer or Tokenizer(model_dir)
        self.policy = policy or MediaPolicy()
        self.fetcher = MediaFetcher(self.policy)
        self.media_spec = (
            media_spec_class(self.config.model_type).from_model_dir(model_dir)
            if self.config.is_multimodal
            else None
        )
        self.image_token_id = self.config.image_token_id
        # called with a request's images as soon as they are fetched and described, before the chat template
        # and tokenization (the gateway hints the vision service to start decoding them)
        self.on_images: Callable[[list[MultimodalItem]], None] | None = None

    async def aclose(self) -> None:
        await self.fetcher.aclose()

    # ---- chat ----

    async def from_messages(
        self,
        messages: list[dict[str, Any]],
        *,
        add_generation_prompt: bool = True,
        continue_final_message: bool = False,
        tools: list[dict[str, Any]] | None = None,
        chat_template_kwargs: dict[str, Any] | None = None,
    ) -> PreparedPrompt:
        """`continue_final_message` leaves the last (assistant) turn open, so the model continues its text;
        `tools` are rendered by the template as the model was trained to see them."""
        reserved = sorted(set(chat_template_kwargs or {}) & _RESERVED_TEMPLATE_KWARGS)
        if reserved:
            raise InvalidRequestError(
                f"chat_template_kwargs may not set {', '.join(reserved)}", param="chat_template_kwargs"
            )
        normalized, refs = normalize_messages(messages)
        if refs and self.media_spec is None:
            raise InvalidRequestError(
                f"model {self.config.architecture} does not take images", param="messages"
            )
        if tools and "tools" not in (self.tokenizer.chat_template or ""):
            # the template would drop them silently: the model would never learn of its tools
            raise InvalidRequestError("this model's chat template does not render tools", param="tools")
        extra = {"tools": tools} if tools else {}
        if continue_final_message:
            extra["continue_final_message"] = True
        images = await self.load_images(refs)  # first: their decoding can start while the text is tokenized
        text = self.tokenizer.apply_chat_template(
            normalized, add_generation_prompt=add_generation_prompt, **extra, **(chat_template_kwargs or {})
        )
        expand = getattr(self.media_spec, "expand_image_markers", None)
        if expand is not None:  # Gemma 3: the template's <start_of_image> becomes the image's whole sequence
            text = expand(text)
        ids = await self._encode(text)
        return self._expand(ids, images, text)

    async def warmup(self) -> None:
        """Build one image chat (a tiny JPEG and PNG by data URI) so the first request pays no lazy imports,
        decoder plugin set-up or template compilation."""
        if self.media_spec is None:
            return
        from PIL import Image

        img = Image.new("RGB", (56, 56), (90, 120, 150))
        parts = [{"type": "image_url", "image_url": {"url": image_data_uri(img, f)}} for f in ("JPEG", "PNG")]
        await self.from_messages([{"role": "user", "content": [*parts, {"type": "text", "text": "warm-up"}]}])

    # ---- raw prompts ----

    async def from_prompt(
        self, prompt: str | list[int], image_urls: list[str] | None = None, param: str = "prompt"
    ) -> PreparedPrompt:
        """A completion prompt (text or ids); each image fills one placeholder of the prompt, in order, or is
        prepended with the model's vision markers when the prompt has none."""
        expand = getattr(self.media_spec, "expand_image_markers", None)
        if expand is not None and image_urls and isinstance(prompt, str):
            prompt = expand(prompt)  # Gemma 3: a typed <start_of_image> becomes the image's sequence
        ids = await self._encode(prompt) if isinstance(prompt, str) else list(prompt)
        vocab = self.config.text.vocab_size
        if not isinstance(prompt, str) and not all(0 <= t < vocab for t in ids):
            raise InvalidRequestError(f"token ids must be in [0, {vocab})", param=param)
        refs = [ImageRef(u, f"image_data[{i}]") for i, u in enumerate(image_urls or [])]
        if refs and self.media_spec is None:
            raise InvalidRequestError(
                f"model {self.config.architecture} does not take images", param="image_data"
            )
        if refs and ids.count(self.image_token_id) == 0:
            marker = self.tokenizer.encode(self.media_spec.image_marker)
            ids = marker * len(refs) + ids
        images = await self.load_images(refs)
        return self._expand(ids, images, prompt if isinstance(prompt, str) else "")

    async def _encode(self, text: str) -> list[int]:
        """Token ids of a text; a long one is tokenized on a thread (the tokenizer releases the GIL), so a 50 MB
        prompt does not stall every other request and /health for seconds."""
        if len(text) < _INLINE_CHARS:
            return self.tokenizer.encode(text)
        return await asyncio.to_thread(self.tokenizer.encode, text)

    async def load_images(
        self, refs: list[ImageRef]
    ) -> list[tuple[ImageRef, bytes, str, tuple[int, int, int]]]:
        if len(refs) > self.policy.max_images:  # before any fetch: 96 URLs must not cost 96 downloads
            raise InvalidRequestError(
                f"at most {self.policy.max_images} images per request, got {len(refs)}",
                param=refs[self.policy.max_images].param.split(".")[0].split("[")[0] or None,
            )
        datas = await asyncio.gather(*(self.fetcher.fetch(r.url, r.param) for r in refs))

        async def describe(ref: ImageRef, data: bytes, num_images: int):
            if len(data) < _INLINE_BYTES:  # a header read and a short hash: cheaper than a thread hop
                return self._describe(ref, data, num_images)
            return await asyncio.to_thread(self._describe, ref, data, num_images)

        described = await asyncio.gather(
            *(describe(r, d, len(refs)) for r, d in zip(refs, datas, strict=True))
        )
        total = sum(pixels for *_, pixels in described)
        if total > self.policy.max_request_pixels:  # what the vision service would decode for this request
            raise PayloadTooLargeError(
                f"the request's images hold {total} pixels; at most {self.policy.max_request_pixels} per request",
                param="messages",
            )
        images = [d[:4] for d in described]
        if self.on_images is not None and images:
            self.on_images(
                [
                    MultimodalItem(key, 0, self.media_spec.num_image_tokens(grid), grid, "image", data)
                    for _ref, data, key, grid in images
                ]
            )
            await asyncio.sleep(0)  # one turn of the loop: a hint's call goes out now, not after tokenization
        return images

    def _describe(
        self, ref: ImageRef, data: bytes, num_images: int
    ) -> tuple[ImageRef, bytes, str, tuple[int, int, int], int]:
        """The image's grid in a prompt of `num_images` images (a family may lay out an image differently when it
        has company) and its content key: the bytes and whatever else the family says fixes the embedding."""
        width, height = image_size(data, self.policy, ref.param)
        grid = self.media_spec.image_grid(width, height, num_images)
        key = content_key(data, self.media_spec.item_settings(grid))
        return ref, data, key, grid, width * height

    def _expand(self, ids: list[int], images, text: str) -> PreparedPrompt:
        pads = (
            [i for i, t in enumerate(ids) if t == self.image_token_id]
            if self.image_token_id is not None
            else []
        )
        if len(pads) != len(images):
            raise InvalidRequestError(
                f"the prompt has {len(pads)} image placeholders for {len(images)} images; placeholder tokens "
                "cannot be typed into text",
                param="messages",
            )
        out: list[int] = []
        items: list[MultimodalItem] = []
        prev = 0
        for pos, (_ref, data, key, grid) in zip(pads, images, strict=True):
            out.extend(ids[prev:pos])
            n = self.media_spec.num_image_tokens(grid)
            items.append(MultimodalItem(key, len(out), n, grid, "image", data))
            out.extend([self.image_token_id] * n)
            prev = pos + 1
        out.extend(ids[prev:])
        return PreparedPrompt(out, items, text)


def normalize_messages(messages: Any) -> tuple[list[dict[str, Any]], list[ImageRef]]:
    """Validate OpenAI chat messages; returns template-ready messages (images as {"type": "image"}) and the
    image references in prompt order."""
    if not isinstance(messages, list) or not messages:
        raise InvalidRequestError("messages must be a non-empty list", param="messages")
    out: list[dict[str, Any]] = []
    refs: list[ImageRef] = []
    for i, msg in enumerate(messages):
        if not isinstance(msg, dict):
            raise InvalidRequestError(f"messages[{i}] must be an object", param=f"messages[{i}]")
        role = msg.get("role")
        if not isinstance(role, str) or role not in ROLES:
            raise InvalidRequestError(
                f"messages[{i}].role must be one of {sorted(ROLES)}, got {role!r}",
                param=f"messages[{i}].role",
            )
        if role == "assistant" and msg.get("tool_calls") is not None:
            msg = {**msg, "tool_calls": template_tool_calls(msg["tool_calls"], f"messages[{i}].tool_calls")}
        if role == "tool" and not isinstance(msg.get("tool_call_id", ""), str):
            raise InvalidRequestError(
                f"messages[{i}].tool_call_id must be a string", param=f"messages[{i}].tool_call_id"
            )
        content = msg.get("content")
        if content is None:
            content = ""
        if isinstance(content, str):
            out.append({**msg, "role": "system" if role == "developer" else role, "content": content})
            continue
        if not isinstance(content, list):
            raise InvalidRequestError(
                f"messages[{i}].content must be a string or a list of parts", param=f"messages[{i}].content"
            )
        parts = []
        for j, part in enumerate(content):
            where = f"messages[{i}].content[{j}]"
            if not isinstance(part, dict):
                raise InvalidRequestError(f"{where} must be an object", param=where)
            kind = part.get("type")
            if kind == "text":
                if not isinstance(part.get("text"), str):
                    raise InvalidRequestError(f"{where}.text must be a string", param=f"{where}.text")
                parts.append({"type": "text", "text": part["text"]})
            elif kind == "image_url":
                spec = part.get("image_url")
                url = spec.get("url") if isinstance(spec, dict) else spec
                if not isinstance(url, str) or not url:
                    raise InvalidRequestError(
                        f"{where}.image_url.url must be a non-empty string", param=f"{where}.image_url"
                    )
                if role not in ("user", "system"):
                    raise InvalidRequestError(
                        f"{where}: images are accepted in user messages only", param=where
                    )
                refs.append(ImageRef(url, f"{where}.image_url"))
                parts.append({"type": "image"})
            else:
                raise InvalidRequestError(
                    f"{where}.type {kind!r} is not supported; use 'text' or 'image_url'",
                    param=f"{where}.type",
                )
        out.append({**msg, "role": "system" if role == "developer" else role, "content": parts})
    return out, refs
