"""Decompression bombs (issue 14): an image's decoded size is read from its header and capped
per request, before any pixel is decoded."""

from __future__ import annotations

import base64
import io
from typing import Any

import pytest

from modelmora.config import LimitsSettings
from modelmora.errors import ErrorCode, ModelMoraError
from modelmora.tasks.images import bytes_per_pixel, check_image
from modelmora.tasks.specs import parse_input


def png(side: int, mode: str = "1") -> bytes:
    from PIL import Image

    out = io.BytesIO()
    Image.new(mode, (side, side)).save(out, format="PNG", optimize=True)
    return out.getvalue()


BOMB = png(6320)  # 4.9 KB of 1-bit PNG: 39.9 MP, under the 40 MP limit


@pytest.fixture(autouse=True)
def nothing_is_decoded(monkeypatch: pytest.MonkeyPatch) -> None:
    """The checks read headers only: decoding a pixel here is a failure."""
    from PIL import Image, ImageFile

    def refuse(*_args: Any, **_kwargs: Any) -> Any:
        raise AssertionError("an image was decoded")

    monkeypatch.setattr(ImageFile.ImageFile, "load", refuse)
    monkeypatch.setattr(Image.Image, "convert", refuse)


def _parse(images: list[bytes], **limits: Any) -> Any:
    data = {"image": [base64.b64encode(i).decode() for i in images]}
    return parse_input("img2embed", data, {}, LimitsSettings(**limits))


def test_the_bomb_is_small_and_under_the_pixel_limit() -> None:
    assert len(BOMB) < 6_000
    assert LimitsSettings().max_image_pixels > 6320 * 6320


def test_one_bomb_is_refused_from_its_header() -> None:
    with pytest.raises(ModelMoraError) as err:
        _parse([BOMB])
    assert err.value.code is ErrorCode.INVALID_IMAGE
    assert err.value.details["field"] == "input_data.image[0]"
    assert err.value.details["decoded_bytes"] == 6320 * 6320 * 3  # converted to RGB
    assert err.value.details["limit_bytes"] == 64 << 20


def test_ten_bombs_that_fit_alone_are_refused_together() -> None:
    cap = 200 << 20  # one bomb fits
    assert _parse([BOMB], max_decoded_image_bytes_per_request=cap).inputs == [BOMB]
    with pytest.raises(ModelMoraError) as err:
        _parse([BOMB] * 10, max_decoded_image_bytes_per_request=cap)
    assert err.value.code is ErrorCode.PAYLOAD_TOO_LARGE
    assert err.value.code.http_status == 413
    assert err.value.details == {
        "field": "input_data.image",
        "decoded_bytes": 10 * 6320 * 6320 * 3,
        "limit_bytes": cap,
    }


def test_ordinary_images_pass() -> None:
    small = png(224, "RGB")
    assert len(_parse([small] * 100).inputs) == 100  # 15 MB decoded together


@pytest.mark.parametrize(
    ("mode", "size"), [("1", 3), ("L", 3), ("P", 3), ("RGB", 3), ("RGBA", 4), ("I;16", 3), ("I", 4), ("F", 4)]
)
def test_bytes_per_pixel(mode: str, size: int) -> None:
    assert bytes_per_pixel(mode) == size


def test_check_image_reports_the_decoded_size() -> None:
    info = check_image(png(100, "RGBA"), "f", 10**9)
    assert (info.width, info.height, info.decoded_bytes) == (100, 100, 40_000)
