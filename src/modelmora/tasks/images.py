"""Image bytes in and out: base64 and data URLs, format and size checks, decoding, PNG.

The server process runs `check_image` (base64 decode plus Pillow's header read: cheap, no
pixel is decoded) so that a wrong format, an oversized file or a decompression bomb is refused
before it is queued. The worker decodes for real (`decode_image`) in its preprocess step; an
image that passes the header check but is corrupt further in fails there, for its request
alone. Pillow only, no torch.
"""

from __future__ import annotations

import base64
import binascii
import io
import warnings
from dataclasses import dataclass
from typing import Any

from modelmora.errors import ErrorCode, ModelMoraError

ALLOWED_FORMATS = frozenset({"PNG", "JPEG", "WEBP"})


@dataclass(frozen=True, slots=True)
class ImageInfo:
    data: bytes
    format: str
    width: int
    height: int


def invalid_image(field: str, message: str, **details: Any) -> ModelMoraError:
    return ModelMoraError(ErrorCode.INVALID_IMAGE, f"{field}: {message}", {"field": field, **details})


def b64_bytes(value: str, field: str, max_bytes: int) -> bytes:
    """Plain base64 or a `data:image/...;base64,` URL, within `max_bytes` once decoded."""
    text = value.strip()
    if text.startswith("data:"):
        header, sep, text = text.partition(",")
        if not sep or not header.endswith(";base64"):
            raise invalid_image(field, "a data URL must be base64 (data:image/png;base64,...)")
    # A cheap bound before decoding: base64 grows 4/3.
    if len(text) > (max_bytes * 4) // 3 + 8:
        raise invalid_image(field, f"more than {max_bytes} bytes", limit_bytes=max_bytes)
    try:
        data = base64.b64decode(text, validate=True)
    except (binascii.Error, ValueError):
        raise invalid_image(field, "not valid base64") from None
    if len(data) > max_bytes:
        raise invalid_image(field, f"{len(data)} bytes, at most {max_bytes} allowed", limit_bytes=max_bytes)
    if not data:
        raise invalid_image(field, "empty")
    return data


def check_image(data: bytes, field: str, max_pixels: int) -> ImageInfo:
    """Format and dimensions from the header only; refuses anything but PNG, JPEG and WebP,
    and more pixels than `max_pixels` (a decompression bomb is refused before decoding)."""
    from PIL import Image, UnidentifiedImageError

    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")  # DecompressionBombWarning: we check below
            with Image.open(io.BytesIO(data)) as img:
                fmt, (width, height) = str(img.format), img.size
    except (UnidentifiedImageError, OSError, ValueError, Image.DecompressionBombError):
        raise invalid_image(field, "not a decodable PNG, JPEG or WebP image") from None
    if fmt not in ALLOWED_FORMATS:
        raise invalid_image(field, f"format {fmt} not accepted: use PNG, JPEG or WebP", format=fmt)
    if width * height > max_pixels or width <= 0 or height <= 0:
        raise invalid_image(
            field, f"{width}x{height} pixels, at most {max_pixels} allowed", limit_pixels=max_pixels
        )
    return ImageInfo(data, fmt, width, height)


def decode_image(data: bytes) -> Any:
    """The RGB picture (a PIL image), fully decoded; raises ValueError when the bytes are
    corrupt past the header (the worker turns that into INVALID_IMAGE for this input)."""
    from PIL import Image

    try:
        with Image.open(io.BytesIO(data)) as img:
            img.load()
            return img.convert("RGB")
    except (OSError, ValueError, SyntaxError, Image.DecompressionBombError) as exc:
        raise ValueError(f"corrupt image: {exc}") from exc


def png_bytes(image: Any) -> bytes:
    out = io.BytesIO()
    image.save(out, format="PNG")
    return out.getvalue()
