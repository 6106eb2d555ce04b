"""Decoding user images with limits: bytes that are not an image, or too many pixels, are a 400."""

from __future__ import annotations

import base64
import binascii
import io
import re
from typing import Any

from shardbento.errors import InvalidRequest

DEFAULT_MAX_IMAGE_BYTES = 10 * 1024 * 1024
DEFAULT_MAX_IMAGE_PIXELS = 40_000_000
ALLOWED_FORMATS = ("PNG", "JPEG", "WEBP", "GIF", "BMP")
_DATA_URI = re.compile(r"^data:image/[a-zA-Z0-9.+-]+;base64,(?P<data>.*)$", re.DOTALL)


def decode_image(
    data: bytes,
    *,
    param: str = "image",
    max_bytes: int = DEFAULT_MAX_IMAGE_BYTES,
    max_pixels: int = DEFAULT_MAX_IMAGE_PIXELS,
) -> Any:
    """A verified RGB PIL image, or InvalidRequest naming the parameter and the limit."""
    from PIL import Image, UnidentifiedImageError

    if len(data) > max_bytes:
        raise InvalidRequest(f"image is {len(data)} bytes; the limit is {max_bytes} bytes", param=param)
    try:
        with Image.open(io.BytesIO(data)) as probe:
            width, height = probe.size
            image_format = probe.format
            if width * height > max_pixels:
                raise InvalidRequest(
                    f"image is {width}x{height} = {width * height} pixels; the limit is {max_pixels}",
                    param=param,
                )
            probe.verify()
        if image_format not in ALLOWED_FORMATS:
            raise InvalidRequest(f"image format {image_format} is not one of {ALLOWED_FORMATS}", param=param)
        with Image.open(io.BytesIO(data)) as image:
            return image.convert("RGB")
    except InvalidRequest:
        raise
    except UnidentifiedImageError:  # its message names an in-memory object address, different per call
        raise InvalidRequest(
            "the bytes sent are not a readable image: no image format PIL knows matches them", param=param
        ) from None
    except (OSError, SyntaxError, ValueError, Image.DecompressionBombError) as exc:
        raise InvalidRequest(f"the bytes sent are not a readable image: {exc}", param=param) from None


def decode_data_uri(uri: str, *, param: str, **limits: int) -> Any:
    """An image from a `data:image/...;base64,` URI."""
    match = _DATA_URI.match(uri)
    if match is None:
        raise InvalidRequest("expected a data URI of the form data:image/<type>;base64,<data>", param=param)
    try:
        data = base64.b64decode(match.group("data"), validate=True)
    except (binascii.Error, ValueError):
        raise InvalidRequest("the image data URI is not valid base64", param=param) from None
    return decode_image(data, param=param, **limits)
