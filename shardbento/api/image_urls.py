"""Image URLs in /v1 chat messages: data URIs always, http(s) only when the operator enables fetching."""

from __future__ import annotations

import os
from dataclasses import dataclass
from typing import Any

import anyio

from shardbento.api.images import decode_data_uri, decode_image
from shardbento.errors import InvalidRequest

ALLOW_ENV = "SHARDBENTO_ALLOW_IMAGE_URLS"
TIMEOUT_ENV = "SHARDBENTO_IMAGE_FETCH_TIMEOUT_S"
DEFAULT_FETCH_TIMEOUT_S = 10.0


@dataclass(frozen=True, slots=True)
class ImageFetchConfig:
    """Operator settings for remote images, read once when the service starts; the byte and pixel
    limits are the service's own (SHARDBENTO_MAX_IMAGE_BYTES, SHARDBENTO_MAX_IMAGE_PIXELS)."""

    allow_urls: bool = False
    timeout_s: float = DEFAULT_FETCH_TIMEOUT_S

    @classmethod
    def from_env(cls, env: dict[str, str] | None = None) -> ImageFetchConfig:
        env = dict(os.environ) if env is None else env
        try:
            return cls(
                allow_urls=env.get(ALLOW_ENV, "0").strip().lower() in ("1", "true", "yes"),
                timeout_s=float(env.get(TIMEOUT_ENV, DEFAULT_FETCH_TIMEOUT_S)),
            )
        except ValueError as exc:
            raise ValueError(f"{TIMEOUT_ENV} must be a number of seconds: {exc}") from None


async def load_image(
    url: str, config: ImageFetchConfig, *, param: str, max_bytes: int, max_pixels: int
) -> Any:
    """A decoded RGB image from a data URI or (when enabled) an http(s) URL; decoding runs off the loop."""
    if url.startswith("data:"):
        return await anyio.to_thread.run_sync(
            lambda: decode_data_uri(url, param=param, max_bytes=max_bytes, max_pixels=max_pixels)
        )
    if not url.startswith(("http://", "https://")):
        raise InvalidRequest(
            "image_url.url must be a data URI (data:image/png;base64,...) or an http(s) URL", param=param
        )
    if not config.allow_urls:
        raise InvalidRequest(
            "this server does not fetch image URLs; send the image inline as a data URI "
            f"(data:image/png;base64,...), or ask the operator to start the service with {ALLOW_ENV}=1 "
            f"(time limit: {TIMEOUT_ENV})",
            param=param,
            code="image_url_fetch_disabled",
        )
    data = await _fetch(url, config.timeout_s, max_bytes, param)
    return await anyio.to_thread.run_sync(
        lambda: decode_image(data, param=param, max_bytes=max_bytes, max_pixels=max_pixels)
    )


async def _fetch(url: str, timeout_s: float, max_bytes: int, param: str) -> bytes:
    import httpx

    try:
        with anyio.fail_after(timeout_s):  # a total limit; httpx's timeout is per read
            return await _read_limited(url, timeout_s, max_bytes, param)
    except (TimeoutError, httpx.TimeoutException):
        raise InvalidRequest(f"fetching the image took over {timeout_s} s", param=param) from None
    except httpx.HTTPError as exc:
        raise InvalidRequest(f"the image URL could not be fetched: {exc}", param=param) from None


async def _read_limited(url: str, timeout_s: float, max_bytes: int, param: str) -> bytes:
    import httpx

    chunks: list[bytes] = []
    size = 0
    async with (
        httpx.AsyncClient(timeout=timeout_s, follow_redirects=True) as client,
        client.stream("GET", url) as response,
    ):
        if response.status_code != 200:
            raise InvalidRequest(f"fetching the image returned HTTP {response.status_code}", param=param)
        async for chunk in response.aiter_bytes():
            size += len(chunk)
            if size > max_bytes:
                raise InvalidRequest(
                    f"the image at the URL is over the limit of {max_bytes} bytes", param=param
                )
            chunks.append(chunk)
    return b"".join(chunks)
