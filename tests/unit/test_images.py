"""Image decoding: what a client that sends bad image bytes is told."""

from __future__ import annotations

import io

import pytest

from shardbento.api.images import decode_image
from shardbento.errors import InvalidRequest


def _reject(data: bytes) -> InvalidRequest:
    with pytest.raises(InvalidRequest) as caught:
        decode_image(data, param="messages[0].content[1].image_url")
    return caught.value


def test_images_unrecognised_bytes_get_the_same_message_every_time() -> None:
    first, second = _reject(b"definitely not an image"), _reject(b"\x00\x01 also not one")
    assert first.status == 400
    assert first.param == "messages[0].content[1].image_url"
    assert "not a readable image" in first.message
    assert first.message == second.message  # no per-call object address from PIL's own message
    assert " at 0x" not in first.message


def test_images_truncated_png_names_the_decoding_problem() -> None:
    from PIL import Image

    buffer = io.BytesIO()
    Image.new("RGB", (32, 32), (200, 10, 10)).save(buffer, format="PNG")
    error = _reject(buffer.getvalue()[:60])
    assert "not a readable image" in error.message
    assert error.message != _reject(b"definitely not an image").message  # says what went wrong
