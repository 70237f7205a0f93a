"""The router's one fetcher of remote images (and other media).

`fetch_media` downloads an http(s) URL a client sent, with a total timeout and a size cap, as
raw bytes: the local model takes them as they are. Gemini's API takes only inline data or
Google file URIs, so `inline_remote_media` puts the bytes into the request as base64 (the IR's
inline form) before the request is rendered.
"""

from __future__ import annotations

import asyncio
import base64
import logging
import mimetypes

import aiohttp

from . import ir
from .config import LimitsConfig
from .errors import InvalidRequestError

logger = logging.getLogger(__name__)

_CHUNK = 64 * 1024


async def inline_remote_media(
    request: ir.Request, session: aiohttp.ClientSession, limits: LimitsConfig
) -> None:
    """Replace every http(s) `MediaPart` URL in ``request`` by its downloaded bytes, in base64,
    in place.

    Args:
        request: The IR request (inlined data is valid for every provider, so the request can
            still be reused for fallback targets).
        session: The HTTP session.
        limits: ``image_timeout_s`` and ``image_max_bytes``.

    Raises:
        InvalidRequestError: If a URL times out, fails, answers with an error status or is too
            large; the message names the URL.
    """
    remote = []
    for message in request.messages:
        for part in message.parts:
            inner = part.content if isinstance(part, ir.ToolResultPart) else [part]
            remote += [p for p in inner if isinstance(p, ir.MediaPart) and is_http(p.url)]
    if remote:
        await asyncio.gather(*(_inline(p, session, limits) for p in remote))


def is_http(url: str | None) -> bool:
    """Whether ``url`` is an http(s) URL (which `fetch_media` can download).

    Args:
        url: A media part's URL, or None.
    """
    return url is not None and url.startswith(("https://", "http://"))


async def _inline(part: ir.MediaPart, session: aiohttp.ClientSession, limits: LimitsConfig) -> None:
    data, part.media_type = await fetch_media(part, session, limits)
    part.data = base64.b64encode(data).decode()
    part.url = None


async def fetch_media(
    part: ir.MediaPart, session: aiohttp.ClientSession, limits: LimitsConfig
) -> tuple[bytes, str]:
    """Download a media part's http(s) URL.

    Args:
        part: The part; left as it is.
        session: The HTTP session.
        limits: ``image_timeout_s`` and ``image_max_bytes``.

    Returns:
        The body and its media type: the response's content type when it names one, else the
        part's, with a wildcard (``image/*``) resolved from the URL's extension.

    Raises:
        InvalidRequestError: If the URL times out, fails, answers with an error status or is
            too large; the message names the URL.
    """
    url = part.url
    data = bytearray()
    try:
        timeout = aiohttp.ClientTimeout(total=limits.image_timeout_s)
        async with session.get(url, timeout=timeout) as resp:
            if resp.status != 200:
                raise InvalidRequestError(
                    f"image URL {url} could not be fetched: HTTP {resp.status}", param="url"
                )
            if (resp.content_length or 0) > limits.image_max_bytes:
                raise _too_large(url, limits)
            async for chunk in resp.content.iter_chunked(_CHUNK):
                data += chunk
                if len(data) > limits.image_max_bytes:
                    raise _too_large(url, limits)
            content_type = resp.content_type
    except asyncio.TimeoutError as err:
        raise InvalidRequestError(
            f"image URL {url} timed out after {limits.image_timeout_s:g} s", param="url"
        ) from err
    except aiohttp.ClientError as err:
        raise InvalidRequestError(
            f"image URL {url} could not be fetched: {err}", param="url"
        ) from err
    media_type = part.media_type
    if "/" in content_type and not content_type.startswith(("application/octet-stream", "text/")):
        media_type = content_type
    elif media_type.endswith("/*"):
        media_type = mimetypes.guess_type(url)[0] or "image/jpeg"
    logger.debug("fetched %s (%d bytes, %s)", url, len(data), media_type)
    return bytes(data), media_type


def _too_large(url: str, limits: LimitsConfig) -> InvalidRequestError:
    return InvalidRequestError(
        f"image URL {url} is larger than the {limits.image_max_bytes} byte limit", param="url"
    )
