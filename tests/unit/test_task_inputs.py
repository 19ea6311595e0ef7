"""parse_input for txt2txt, img2embed, img2txt and txt2img: fields, ranges, images, groups."""

from __future__ import annotations

import base64
import io
import struct
import zlib
from typing import Any

import pytest
from PIL import Image

from modelmora.config import LimitsSettings
from modelmora.errors import ErrorCode, ModelMoraError
from modelmora.tasks.specs import parse_input

LIMITS = LimitsSettings(max_items=4, max_text_chars=50, max_image_bytes=50_000, max_image_pixels=10_000)


def png(width: int = 8, height: int = 8, fmt: str = "PNG") -> bytes:
    out = io.BytesIO()
    Image.new("RGB", (width, height), (10, 200, 30)).save(out, format=fmt)
    return out.getvalue()


def b64(data: bytes) -> str:
    return base64.b64encode(data).decode()


def bomb_png(width: int, height: int) -> bytes:
    """A PNG header that claims a huge picture (a decompression bomb is refused from it)."""
    ihdr = struct.pack("!IIBBBBB", width, height, 8, 2, 0, 0, 0)
    chunk = b"IHDR" + ihdr
    return b"\x89PNG\r\n\x1a\n" + struct.pack("!I", 13) + chunk + struct.pack("!I", zlib.crc32(chunk))


def fails(task: str, input_data: dict[str, Any], params: dict[str, Any] | None = None) -> ModelMoraError:
    with pytest.raises(ModelMoraError) as info:
        parse_input(task, input_data, params or {}, LIMITS)
    return info.value


def test_txt2txt_defaults_and_groups() -> None:
    parsed = parse_input("txt2txt", {"text": "hi"}, {}, LIMITS)
    assert parsed.inputs == ["hi"] and parsed.single
    assert parsed.params["max_tokens"] == 64 and parsed.params["temperature"] == 1.0
    assert parsed.params["stop"] == [] and parsed.params["seed"] is None
    assert parsed.group is None
    greedy = parse_input("txt2txt", {"text": "hi"}, {"seed": 3, "temperature": 0}, LIMITS)
    assert greedy.group is None  # greedy is deterministic whatever the batch
    a = parse_input("txt2txt", {"text": "a"}, {"seed": 3, "temperature": 0.7}, LIMITS)
    b = parse_input("txt2txt", {"text": "b"}, {"seed": 3, "temperature": 0.7}, LIMITS)
    c = parse_input("txt2txt", {"text": "c"}, {"seed": 4, "temperature": 0.7}, LIMITS)
    assert a.group == b.group != c.group and a.group is not None


def test_txt2txt_messages() -> None:
    msgs = [{"role": "system", "content": "be brief"}, {"role": "user", "content": "hi"}]
    parsed = parse_input("txt2txt", {"messages": msgs}, {"stop": "\n"}, LIMITS)
    assert parsed.inputs == [{"messages": msgs}] and parsed.single
    assert parsed.params["stop"] == ["\n"]


@pytest.mark.parametrize(
    ("params", "field"),
    [
        ({"max_tokens": 0}, "parameters.max_tokens"),
        ({"max_tokens": 5000}, "parameters.max_tokens"),
        ({"max_tokens": 2.5}, "parameters.max_tokens"),
        ({"max_tokens": "10"}, "parameters.max_tokens"),
        ({"temperature": -0.1}, "parameters.temperature"),
        ({"temperature": 2.5}, "parameters.temperature"),
        ({"temperature": True}, "parameters.temperature"),
        ({"top_p": 0}, "parameters.top_p"),
        ({"top_p": 1.1}, "parameters.top_p"),
        ({"top_k": -1}, "parameters.top_k"),
        ({"repetition_penalty": 0}, "parameters.repetition_penalty"),
        ({"seed": -1}, "parameters.seed"),
        ({"seed": 2**64}, "parameters.seed"),
        ({"stop": ["a", "b", "c", "d", "e"]}, "parameters.stop"),
        ({"stop": [""]}, "parameters.stop[0]"),
        ({"stop": 3}, "parameters.stop"),
        ({"nope": 1}, "parameters.nope"),
    ],
)
def test_txt2txt_parameters_are_range_checked(params: dict[str, Any], field: str) -> None:
    error = fails("txt2txt", {"text": "hi"}, params)
    assert error.code is ErrorCode.VALIDATION_ERROR
    assert error.details["errors"][0]["field"] == field


@pytest.mark.parametrize(
    ("input_data", "field"),
    [
        ({"messages": []}, "input_data.messages"),
        ({"messages": [{"role": "king", "content": "x"}]}, "input_data.messages[0].role"),
        ({"messages": [{"role": "user", "content": 3}]}, "input_data.messages[0].content"),
        ({"messages": [{"role": "user", "content": "x", "x": 1}]}, "input_data.messages[0]"),
        ({"messages": [{"role": "user", "content": "x"}], "text": "y"}, "input_data"),
        ({"image": "x"}, "input_data.image"),
    ],
)
def test_txt2txt_bad_input(input_data: dict[str, Any], field: str) -> None:
    error = fails("txt2txt", input_data)
    assert error.details["errors"][0]["field"] == field


@pytest.mark.parametrize("fmt", ["PNG", "JPEG", "WEBP"])
def test_images_in_each_accepted_format(fmt: str) -> None:
    data = png(fmt=fmt)
    parsed = parse_input("img2embed", {"image": b64(data)}, {"normalize": True}, LIMITS)
    assert parsed.inputs == [data] and parsed.single and parsed.params == {"normalize": True}
    data_url = "data:image/png;base64," + b64(data)
    listed = parse_input("img2txt", {"image": [data_url, data]}, {}, LIMITS)
    assert listed.inputs == [data, data] and not listed.single


@pytest.mark.parametrize(
    ("image", "field"),
    [
        ("not base64!!", "input_data.image"),
        (b64(b"hello, not an image"), "input_data.image"),
        (b64(png(fmt="GIF")), "input_data.image"),  # a real image, not an accepted format
        (b64(png(200, 200)), "input_data.image"),  # 40,000 pixels > 10,000
        (b64(bomb_png(100_000, 100_000)), "input_data.image"),  # a bomb, from its header
        (b64(b"\x00" * 60_000), "input_data.image"),  # over max_image_bytes
        ("data:image/png,rawbytes", "input_data.image"),
    ],
)
def test_bad_images_are_invalid_image(image: str, field: str) -> None:
    error = fails("img2embed", {"image": image})
    assert error.code is ErrorCode.INVALID_IMAGE
    assert error.details["field"] == field


def test_image_urls_are_refused_by_default_and_the_bad_item_is_named() -> None:
    error = fails("img2txt", {"image": [b64(png()), "https://example.com/cat.png"]})
    assert error.code is ErrorCode.VALIDATION_ERROR
    assert error.details["errors"][0]["field"] == "input_data.image[1]"
    assert fails("img2embed", {"image": [b64(png())] * 5}).code is ErrorCode.TOO_MANY_INPUTS


def test_txt2img_parameters() -> None:
    parsed = parse_input("txt2img", {"text": "a cat"}, {"width": 64, "height": 32, "steps": 2}, LIMITS)
    assert parsed.params["width"] == 64 and parsed.params["steps"] == 2
    assert parsed.params["response_format"] == "url" and parsed.params["num_images"] == 1
    other = parse_input(
        "txt2img", {"text": "a dog"}, {"width": 64, "height": 32, "steps": 2, "seed": 1}, LIMITS
    )
    assert parsed.group == other.group  # seeds differ per image, sizes must not
    assert parsed.group != parse_input("txt2img", {"text": "x"}, {"width": 72}, LIMITS).group


@pytest.mark.parametrize(
    ("params", "field"),
    [
        ({"width": 63}, "parameters.width"),
        ({"height": 4}, "parameters.height"),
        ({"width": 8192}, "parameters.width"),
        ({"width": 512, "height": 512}, "parameters.width"),  # over max_image_pixels
        ({"steps": 0}, "parameters.steps"),
        ({"guidance_scale": -1}, "parameters.guidance_scale"),
        ({"num_images": 9}, "parameters.num_images"),
        ({"response_format": "png"}, "parameters.response_format"),
        ({"negative_prompt": 5}, "parameters.negative_prompt"),
    ],
)
def test_txt2img_bad_parameters(params: dict[str, Any], field: str) -> None:
    error = fails("txt2img", {"text": "a cat"}, params)
    assert error.code is ErrorCode.VALIDATION_ERROR
    assert error.details["errors"][0]["field"] == field
