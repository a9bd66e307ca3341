"""processor.request_builder: message validation, chat prompts with images (placeholder expansion and offsets)
checked against the Hugging Face tokenizer's own chat template rendering, and raw prompts."""

from __future__ import annotations

import asyncio
import base64
import io
import json

import pytest
from PIL import Image
from transformers import PreTrainedTokenizerFast

from common.errors import InvalidRequestError
from mirador.default_model import default_model_dir
from processor.media import content_key, decode_image
from processor.models.qwen2_vl import Qwen2VLMediaSpec
from processor.request_builder import RequestBuilder, normalize_messages

IMAGE_PAD = 151655
VISION_START = 151652
VISION_END = 151653


# ---------------------------------------------------------------------------------------------- fixtures


@pytest.fixture(scope="session")
def model_dir():
    return default_model_dir()


@pytest.fixture(scope="session")
def builder(model_dir):
    b = RequestBuilder(model_dir)
    yield b
    asyncio.run(b.aclose())


@pytest.fixture(scope="session")
def hf_tok(model_dir) -> PreTrainedTokenizerFast:
    tok = PreTrainedTokenizerFast.from_pretrained(str(model_dir))
    if not tok.chat_template:
        tok.chat_template = json.loads((model_dir / "chat_template.json").read_text())["chat_template"]
    return tok


@pytest.fixture(scope="session")
def spec(model_dir) -> Qwen2VLMediaSpec:
    return Qwen2VLMediaSpec.from_model_dir(model_dir)


def png(w: int, h: int, color=(10, 20, 30)) -> bytes:
    buf = io.BytesIO()
    img = Image.new("RGB", (w, h), color)
    img.putpixel((0, 0), (w % 256, h % 256, 7))  # distinct content per size
    img.save(buf, "PNG")
    return buf.getvalue()


def uri(data: bytes) -> str:
    return "data:image/png;base64," + base64.b64encode(data).decode()


def image_part(data: bytes, as_string: bool = False) -> dict:
    return {"type": "image_url", "image_url": uri(data) if as_string else {"url": uri(data)}}


def text_part(text: str) -> dict:
    return {"type": "text", "text": text}


def n_tokens(spec: Qwen2VLMediaSpec, data: bytes) -> int:
    img = Image.open(io.BytesIO(data))
    return spec.num_image_tokens(spec.image_grid(img.width, img.height))


def to_template_messages(messages: list[dict]) -> list[dict]:
    """OpenAI parts -> the {"type": "image"} parts HF chat templates expect."""
    out = []
    for m in messages:
        c = m["content"]
        if isinstance(c, list):
            c = [{"type": "image"} if p["type"] == "image_url" else p for p in c]
        out.append({**m, "content": c})
    return out


def expected_ids(hf_tok, messages, counts, **kw) -> list[int]:
    text = hf_tok.apply_chat_template(
        to_template_messages(messages), tokenize=False, add_generation_prompt=True, **kw
    )
    ids = hf_tok.encode(text, add_special_tokens=False)
    out, k = [], 0
    for t in ids:
        if t == IMAGE_PAD:
            out.extend([IMAGE_PAD] * counts[k])
            k += 1
        else:
            out.append(t)
    assert k == len(counts)
    return out


def runs_of(ids: list[int], token: int) -> list[tuple[int, int]]:
    """(start, length) of each maximal run of `token`."""
    runs, i = [], 0
    while i < len(ids):
        if ids[i] == token:
            j = i
            while j < len(ids) and ids[j] == token:
                j += 1
            runs.append((i, j - i))
            i = j
        else:
            i += 1
    return runs


def check_items(prompt, spec, images: list[bytes]) -> None:
    """Items in prompt order: each names a run of image tokens of its length, with the image's grid, bytes and
    content key; the runs are the only image tokens and are framed by vision markers."""
    assert len(prompt.mm_items) == len(images)
    assert runs_of(prompt.input_ids, IMAGE_PAD) == [(it.offset, it.num_tokens) for it in prompt.mm_items]
    prev_end = -1
    for item, data in zip(prompt.mm_items, images, strict=True):
        decoded = decode_image(data)
        assert item.grid_thw == spec.image_grid(decoded.width, decoded.height)
        assert item.num_tokens == spec.num_image_tokens(item.grid_thw) == n_tokens(spec, data)
        assert item.offset > prev_end
        assert prompt.input_ids[item.offset - 1] == VISION_START
        assert prompt.input_ids[item.end] == VISION_END
        assert item.data == data
        assert item.content_key == content_key(data, spec.fingerprint())
        assert item.modality == "image"
        prev_end = item.end
    assert prompt.input_ids.count(IMAGE_PAD) == sum(it.num_tokens for it in prompt.mm_items)


# ---------------------------------------------------------------------------------------------- normalize_messages


class TestNormalizeMessages:
    def test_string_content(self):
        msgs, refs = normalize_messages(
            [{"role": "system", "content": "be brief"}, {"role": "user", "content": "hi"}]
        )
        assert msgs == [{"role": "system", "content": "be brief"}, {"role": "user", "content": "hi"}]
        assert refs == []

    def test_none_content_and_developer_role(self):
        msgs, _ = normalize_messages(
            [{"role": "developer", "content": "rules"}, {"role": "assistant", "content": None}]
        )
        assert msgs == [{"role": "system", "content": "rules"}, {"role": "assistant", "content": ""}]

    def test_parts(self):
        a, b = uri(png(56, 56)), uri(png(60, 60))
        msgs, refs = normalize_messages(
            [
                {
                    "role": "user",
                    "content": [
                        text_part("look"),
                        {"type": "image_url", "image_url": a},
                        {"type": "image_url", "image_url": {"url": b}},
                        text_part("ok?"),
                    ],
                }
            ]
        )
        assert msgs == [
            {
                "role": "user",
                "content": [
                    {"type": "text", "text": "look"},
                    {"type": "image"},
                    {"type": "image"},
                    {"type": "text", "text": "ok?"},
                ],
            }
        ]
        assert [r.url for r in refs] == [a, b]
        assert [r.param for r in refs] == [
            "messages[0].content[1].image_url",
            "messages[0].content[2].image_url",
        ]

    def test_refs_in_prompt_order_across_messages(self):
        a, b, c = (uri(png(56 + i, 56)) for i in range(3))
        _, refs = normalize_messages(
            [
                {"role": "user", "content": [image_part_url(a)]},
                {"role": "assistant", "content": "sure"},
                {"role": "user", "content": [text_part("and"), image_part_url(b), image_part_url(c)]},
            ]
        )
        assert [r.url for r in refs] == [a, b, c]
        assert refs[1].param == "messages[2].content[1].image_url"

    @pytest.mark.parametrize("messages", [None, {}, "hi", {"role": "user", "content": "x"}, [], ()])
    def test_not_a_non_empty_list(self, messages):
        with pytest.raises(InvalidRequestError) as e:
            normalize_messages(messages)
        assert e.value.param == "messages"

    def test_message_not_object(self):
        with pytest.raises(InvalidRequestError) as e:
            normalize_messages([{"role": "user", "content": "a"}, "b"])
        assert e.value.param == "messages[1]"

    @pytest.mark.parametrize("role", ["bot", None, "", "User", 3])
    def test_bad_role(self, role):
        with pytest.raises(InvalidRequestError) as e:
            normalize_messages([{"role": "user", "content": "a"}, {"role": role, "content": "b"}])
        assert e.value.param == "messages[1].role"

    def test_missing_role(self):
        with pytest.raises(InvalidRequestError) as e:
            normalize_messages([{"content": "b"}])
        assert e.value.param == "messages[0].role"

    @pytest.mark.parametrize("content", [3, {"type": "text", "text": "x"}, 1.5, True])
    def test_bad_content(self, content):
        with pytest.raises(InvalidRequestError) as e:
            normalize_messages([{"role": "user", "content": content}])
        assert e.value.param == "messages[0].content"

    def test_part_not_object(self):
        with pytest.raises(InvalidRequestError) as e:
            normalize_messages([{"role": "user", "content": [text_part("a"), "b"]}])
        assert e.value.param == "messages[0].content[1]"

    @pytest.mark.parametrize(
        "part",
        [
            {"type": "input_audio", "input_audio": {}},
            {"type": "video_url"},
            {"text": "no type"},
            {"type": None},
            {"type": "image"},
        ],
    )
    def test_unknown_part_type_names_the_part(self, part):
        with pytest.raises(InvalidRequestError) as e:
            normalize_messages(
                [
                    {"role": "system", "content": "s"},
                    {"role": "user", "content": [text_part("a"), text_part("b"), part]},
                ]
            )
        assert e.value.param == "messages[1].content[2].type"

    @pytest.mark.parametrize("text", [None, 3, ["a"]])
    def test_text_part_needs_string(self, text):
        with pytest.raises(InvalidRequestError) as e:
            normalize_messages([{"role": "user", "content": [{"type": "text", "text": text}]}])
        assert e.value.param == "messages[0].content[0].text"

    @pytest.mark.parametrize("role", ["assistant", "tool"])
    def test_image_outside_user_message(self, role):
        with pytest.raises(InvalidRequestError) as e:
            normalize_messages(
                [
                    {"role": "user", "content": "hi"},
                    {"role": role, "content": [text_part("x"), image_part(png(56, 56))]},
                ]
            )
        assert e.value.param == "messages[1].content[1]"
        assert "user" in e.value.message

    @pytest.mark.parametrize("image_url", [None, {}, {"url": ""}, {"url": None}, "", {"href": "x"}, 5])
    def test_missing_url(self, image_url):
        part = {"type": "image_url"} if image_url is None else {"type": "image_url", "image_url": image_url}
        with pytest.raises(InvalidRequestError) as e:
            normalize_messages([{"role": "user", "content": [text_part("x"), part]}])
        assert e.value.param == "messages[0].content[1].image_url"


def image_part_url(url: str) -> dict:
    return {"type": "image_url", "image_url": {"url": url}}


# ---------------------------------------------------------------------------------------------- from_messages


class TestFromMessages:
    def test_one_image_exact_prompt(self, builder, spec, hf_tok):
        img = png(56, 56)
        msgs = [{"role": "user", "content": [image_part(img), text_part("What is this?")]}]
        p = asyncio.run(builder.from_messages(msgs))
        assert p.text == (
            "<|im_start|>system\nYou are a helpful assistant.<|im_end|>\n<|im_start|>user\n"
            "<|vision_start|><|image_pad|><|vision_end|>What is this?<|im_end|>\n"
            "<|im_start|>assistant\n"
        )
        n = n_tokens(spec, img)
        assert n == 4
        head = hf_tok.encode(
            "<|im_start|>system\nYou are a helpful assistant.<|im_end|>\n<|im_start|>user\n<|vision_start|>",
            add_special_tokens=False,
        )
        tail = hf_tok.encode(
            "<|vision_end|>What is this?<|im_end|>\n<|im_start|>assistant\n", add_special_tokens=False
        )
        assert p.input_ids == head + [IMAGE_PAD] * n + tail
        assert p.mm_items[0].offset == len(head)
        check_items(p, spec, [img])

    @pytest.mark.parametrize("size", [(56, 56), (28, 28), (300, 200), (200, 300), (1000, 30), (641, 479)])
    def test_image_token_count_matches_spec(self, builder, spec, hf_tok, size):
        img = png(*size)
        msgs = [{"role": "user", "content": [text_part("Describe:"), image_part(img, as_string=True)]}]
        p = asyncio.run(builder.from_messages(msgs))
        assert p.input_ids.count(IMAGE_PAD) == n_tokens(spec, img)
        assert p.input_ids == expected_ids(hf_tok, msgs, [n_tokens(spec, img)])
        check_items(p, spec, [img])

    def test_two_images_and_an_earlier_turn(self, builder, spec, hf_tok):
        a, b, c = png(56, 56), png(112, 56), png(84, 140)
        msgs = [
            {"role": "system", "content": "You describe images."},
            {"role": "user", "content": [image_part(a), text_part("What is this?")]},
            {"role": "assistant", "content": "A square."},
            {
                "role": "user",
                "content": [text_part("Compare"), image_part(b), text_part("with"), image_part(c)],
            },
        ]
        p = asyncio.run(builder.from_messages(msgs))
        counts = [n_tokens(spec, x) for x in (a, b, c)]
        assert counts == [4, 8, 15]
        assert p.input_ids == expected_ids(hf_tok, msgs, counts)
        check_items(p, spec, [a, b, c])
        offsets = [it.offset for it in p.mm_items]
        assert offsets == sorted(offsets) and len(set(offsets)) == 3

    def test_same_image_twice_same_key_distinct_offsets(self, builder, spec):
        a = png(70, 70)
        msgs = [{"role": "user", "content": [image_part(a), text_part("and again"), image_part(a)]}]
        p = asyncio.run(builder.from_messages(msgs))
        check_items(p, spec, [a, a])
        assert p.mm_items[0].content_key == p.mm_items[1].content_key
        assert p.mm_items[0].offset < p.mm_items[1].offset

    def test_image_in_system_message_and_add_vision_id(self, builder, spec, hf_tok):
        a, b = png(56, 84), png(84, 56)
        msgs = [
            {"role": "system", "content": [text_part("Reference:"), image_part(a)]},
            {"role": "user", "content": [image_part(b), text_part("Same?")]},
        ]
        p = asyncio.run(builder.from_messages(msgs, chat_template_kwargs={"add_vision_id": True}))
        assert "Picture 2: " in p.text
        assert p.input_ids == expected_ids(
            hf_tok, msgs, [n_tokens(spec, a), n_tokens(spec, b)], add_vision_id=True
        )
        check_items(p, spec, [a, b])

    def test_text_only(self, builder, hf_tok):
        msgs = [{"role": "user", "content": "Hello there"}]
        p = asyncio.run(builder.from_messages(msgs))
        assert p.mm_items == []
        assert p.input_ids == expected_ids(hf_tok, msgs, [])
        p2 = asyncio.run(builder.from_messages(msgs, add_generation_prompt=False))
        assert not p2.text.endswith("<|im_start|>assistant\n")

    @pytest.mark.parametrize(
        "where", ["text_part_with_image", "text_part_alone", "string_content", "system", "assistant_turn"]
    )
    def test_typed_image_placeholder_refused(self, builder, where):
        img = png(56, 56)
        msgs = {
            "text_part_with_image": [
                {"role": "user", "content": [image_part(img), text_part("x <|image_pad|> y")]}
            ],
            "text_part_alone": [{"role": "user", "content": [text_part("<|image_pad|>")]}],
            "string_content": [
                {"role": "user", "content": "see <|vision_start|><|image_pad|><|vision_end|>"}
            ],
            "system": [
                {"role": "system", "content": "<|image_pad|>"},
                {"role": "user", "content": [image_part(img), text_part("hi")]},
            ],
            "assistant_turn": [
                {"role": "user", "content": [image_part(img)]},
                {"role": "assistant", "content": "<|image_pad|><|image_pad|>"},
                {"role": "user", "content": "and?"},
            ],
        }[where]
        with pytest.raises(InvalidRequestError) as e:
            asyncio.run(builder.from_messages(msgs))
        assert "placeholder" in e.value.message

    def test_bad_image_names_the_part(self, builder):
        msgs = [
            {
                "role": "user",
                "content": [
                    text_part("x"),
                    {"type": "image_url", "image_url": {"url": "data:image/png;base64,@@@"}},
                ],
            }
        ]
        with pytest.raises(InvalidRequestError) as e:
            asyncio.run(builder.from_messages(msgs))
        assert e.value.param == "messages[0].content[1].image_url"

    def test_not_an_image_names_the_part(self, builder):
        msgs = [
            {
                "role": "user",
                "content": [
                    image_part(png(56, 56)),
                    text_part("x"),
                    {"type": "image_url", "image_url": uri(b"hello, not an image")},
                ],
            }
        ]
        with pytest.raises(InvalidRequestError) as e:
            asyncio.run(builder.from_messages(msgs))
        assert e.value.param == "messages[0].content[2].image_url"


# ---------------------------------------------------------------------------------------------- from_prompt


class TestFromPrompt:
    def test_string_without_images(self, builder, hf_tok):
        p = asyncio.run(builder.from_prompt("The capital of France is"))
        assert p.input_ids == hf_tok.encode("The capital of France is", add_special_tokens=False)
        assert p.mm_items == [] and p.text == "The capital of France is"

    def test_ids_without_images(self, builder):
        ids = [785, 6722, 315, 9625, 374]
        p = asyncio.run(builder.from_prompt(ids))
        assert p.input_ids == ids and p.mm_items == []

    @pytest.mark.parametrize("as_ids", [False, True])
    def test_images_without_placeholders_get_markers_prepended(self, builder, spec, hf_tok, as_ids):
        a, b = png(56, 56), png(112, 56)
        prompt = "Describe both."
        prompt_ids = hf_tok.encode(prompt, add_special_tokens=False)
        p = asyncio.run(builder.from_prompt(prompt_ids if as_ids else prompt, [uri(a), uri(b)]))
        na, nb = n_tokens(spec, a), n_tokens(spec, b)
        assert p.input_ids == (
            [VISION_START]
            + [IMAGE_PAD] * na
            + [VISION_END]
            + [VISION_START]
            + [IMAGE_PAD] * nb
            + [VISION_END]
            + prompt_ids
        )
        assert [it.offset for it in p.mm_items] == [1, 1 + na + 2]
        check_items(p, spec, [a, b])

    @pytest.mark.parametrize("as_ids", [False, True])
    def test_placeholders_in_prompt_filled_in_order(self, builder, spec, hf_tok, as_ids):
        a, b = png(56, 56), png(56, 112)
        prompt = (
            "First <|vision_start|><|image_pad|><|vision_end|> then "
            "<|vision_start|><|image_pad|><|vision_end|> end"
        )
        ids = hf_tok.encode(prompt, add_special_tokens=False)
        assert ids.count(IMAGE_PAD) == 2
        p = asyncio.run(builder.from_prompt(ids if as_ids else prompt, [uri(a), uri(b)]))
        na, nb = n_tokens(spec, a), n_tokens(spec, b)
        i1 = ids.index(IMAGE_PAD)
        i2 = ids.index(IMAGE_PAD, i1 + 1)
        assert (
            p.input_ids == ids[:i1] + [IMAGE_PAD] * na + ids[i1 + 1 : i2] + [IMAGE_PAD] * nb + ids[i2 + 1 :]
        )
        assert p.mm_items[0].offset == i1
        assert p.mm_items[1].offset == i2 - 1 + na
        check_items(p, spec, [a, b])

    @pytest.mark.parametrize(
        "prompt,n_images",
        [("<|image_pad|> and <|image_pad|>", 1), ("<|image_pad|>", 2), ("<|image_pad|> alone", 0)],
    )
    def test_placeholder_count_mismatch(self, builder, prompt, n_images):
        with pytest.raises(InvalidRequestError):
            asyncio.run(builder.from_prompt(prompt, [uri(png(56, 56))] * n_images))

    def test_image_errors_name_image_data(self, builder):
        with pytest.raises(InvalidRequestError) as e:
            asyncio.run(builder.from_prompt("x", [uri(png(56, 56)), "data:image/png;base64,%%%"]))
        assert e.value.param == "image_data[1]"


def test_images_are_handed_on_as_soon_as_they_are_fetched(model_dir):
    """`on_images` sees each image (key, grid, tokens, bytes) before the chat template and tokenization run: the
    gateway's hint to the vision service to start decoding."""
    b = RequestBuilder(model_dir)
    seen, order = [], []
    b.on_images = lambda items: (seen.extend(items), order.append("images"))
    encode = b.tokenizer.encode
    b.tokenizer.encode = lambda text: (order.append("tokenize"), encode(text))[1]
    buf = io.BytesIO()
    Image.new("RGB", (84, 56), (10, 200, 30)).save(buf, format="PNG")
    uri = "data:image/png;base64," + base64.b64encode(buf.getvalue()).decode()
    msgs = [
        {
            "role": "user",
            "content": [{"type": "image_url", "image_url": {"url": uri}}, {"type": "text", "text": "hi"}],
        }
    ]
    try:
        prompt = asyncio.run(b.from_messages(msgs))
    finally:
        asyncio.run(b.aclose())
    assert order == ["images", "tokenize"]
    (item,) = prompt.mm_items
    assert [(m.content_key, m.grid_thw, m.num_tokens, m.data) for m in seen] == [
        (item.content_key, item.grid_thw, item.num_tokens, item.data)
    ]
