"""The provider interface, and the HTTP plumbing shared by the cloud providers.

A provider turns an IR request into a result, nothing else: key choice, fallback and
rendering for the client happen elsewhere. An HTTP provider has a connection pool of its own
(``max_connections`` in its config), apart from the other providers' and from the media
fetcher's. An in-process backend (the local MLX model) subclasses `BaseProvider` directly and
ignores ``key``.
"""

from __future__ import annotations

import asyncio
import dataclasses
import json
import logging
import math
from abc import ABC, abstractmethod
from collections.abc import AsyncIterator, Callable
from contextlib import aclosing, asynccontextmanager
from typing import TypeVar

import orjson

from .. import ir
from ..config import ProviderConfig
from ..errors import (
    GatewayError,
    GatewayTimeoutError,
    InvalidRequestError,
    UpstreamError,
    error_for_status,
    parse_retry_after,
)
from ..formats.fields import error_message
from ..formats.registry import upstream_format
from ..images import MediaFetcher
from ..sse import EventTooLarge, SSEDecoder, SSEEvent
from ..upstream_client import (
    MAX_ANSWER_BYTES,
    UpstreamConnectionError,
    UpstreamPool,
    UpstreamResponse,
    answer_too_large,
)

T = TypeVar("T")

logger = logging.getLogger(__name__)

# Upstream error bodies are read only this far.
_ERROR_BODY_LIMIT = 64 * 1024
# Sent with every request body (a provider's configured headers may override them).
JSON_HEADERS = {"Content-Type": "application/json"}
_CHARS_PER_TOKEN = 4
_TOKENS_PER_MEDIA = 258


class BaseProvider(ABC):
    """A backend that serves IR requests.

    Args:
        config: This provider's config (``config.name`` names it in errors).
        media: The app's media fetcher (for providers that inline media URLs).
    """

    def __init__(self, config: ProviderConfig, media: MediaFetcher) -> None:
        self.config = config
        self.media = media

    def counters(self) -> dict[str, float]:
        """Counters this provider keeps itself (the local model's prompt cache), by name, for
        the metrics; none by default."""
        return {}

    async def close(self) -> None:
        """Release what the provider holds; the app calls it at shutdown."""
        logger.debug("provider %s closed", self.config.name)

    def with_defaults(self, request: ir.Request) -> ir.Request:
        """Apply this provider's ``default_max_tokens`` when the client gave none.

        Args:
            request: The IR request.
        """
        if request.max_tokens is None and self.config.default_max_tokens is not None:
            return dataclasses.replace(request, max_tokens=self.config.default_max_tokens)
        return request

    @abstractmethod
    async def complete(self, request: ir.Request, key: str | None) -> ir.Response:
        """Serve a non-streaming request.

        Args:
            request: The IR request; ``request.model`` is this provider's model name.
            key: The API key to use (None for keyless backends).

        Raises:
            GatewayError: Typed by cause; ``retryable`` ones let the router fall back.
        """

    @abstractmethod
    def stream(self, request: ir.Request, key: str | None) -> AsyncIterator[ir.StreamEvent]:
        """Serve a streaming request as an async iterator of IR events.

        The events follow the IR stream contract: one StreamStart, then PartStart/PartDelta
        in part order, then exactly one StreamEnd.

        Args:
            request: The IR request; ``request.model`` is this provider's model name.
            key: The API key to use (None for keyless backends).

        Raises:
            GatewayError: Typed by cause, possibly after some events were yielded.
        """

    def context_window(self) -> int | None:
        """Prompt plus output tokens a request may hold, when the router knows it (the local
        model's); None otherwise."""
        return None

    def queue_depth(self) -> int:
        """Requests waiting inside the backend itself (the local engine's queue); 0 for
        remote providers, whose queues the router cannot see."""
        return 0

    async def count_tokens(self, request: ir.Request, key: str | None) -> ir.TokenCount:
        """Count the prompt's tokens. The default is an estimate (4 characters per token,
        a flat 258 per image or file); providers with a counting endpoint override it.

        Args:
            request: The IR request.
            key: The API key to use.
        """
        return ir.TokenCount(estimate_tokens(request))


def estimate_tokens(request: ir.Request) -> int:
    """An estimate of a request's prompt tokens: 4 characters per token, a flat 258 per image
    or file (as Gemini counts an image).

    Args:
        request: The IR request.
    """
    chars = 0
    media = 0
    for message in request.messages:
        for part in message.parts:
            inner = part.content if isinstance(part, ir.ToolResultPart) else [part]
            for item in inner:
                if isinstance(item, ir.MediaPart):
                    media += 1
                elif isinstance(item, ir.ToolCallPart):
                    chars += len(item.name) + len(item.arguments)
                else:
                    chars += len(getattr(item, "text", ""))
    for tool in request.tools:
        chars += len(tool.name) + len(tool.description or "") + len(json.dumps(tool.parameters))
    return math.ceil(chars / _CHARS_PER_TOKEN) + media * _TOKENS_PER_MEDIA


class HTTPProvider(BaseProvider):
    """JSON-over-HTTP plumbing: one place maps transport and status errors to `GatewayError`.

    ``wire`` is the provider's upstream format (`router.formats.registry.upstream_format`).
    The upstream answer's headers travel with what it returns: on the `ir.Response`, the
    `ir.StreamStart` or the `GatewayError` (the key pool reads rate-limit resets from them).
    ``pool`` is the provider's own, with at most ``config.max_connections`` connections.
    """

    def __init__(self, config: ProviderConfig, media: MediaFetcher) -> None:
        super().__init__(config, media)
        self.wire = upstream_format(config)
        self.pool = UpstreamPool(
            config.max_connections, config.connect_timeout_s, read_timeout_s=config.timeout_s
        )

    async def close(self) -> None:
        """Close the provider's connection pool."""
        await self.pool.close()
        await super().close()

    @abstractmethod
    def headers(self, key: str | None) -> dict[str, str]:
        """Auth and version headers for one call.

        Args:
            key: The API key (None: send no auth header).
        """

    async def post_json(
        self, url: str, body: dict, key: str | None, headers: dict[str, str] | None = None
    ) -> tuple[dict, dict[str, str]]:
        """POST a JSON body and return the decoded JSON answer.

        Args:
            url: The endpoint.
            body: The request body.
            key: The API key.
            headers: Extra headers for this call.

        Returns:
            The decoded answer and the answer's headers (lower-case names).

        Raises:
            GatewayError: Mapped from the upstream status, a transport error or bad JSON.
        """
        try:
            async with self._post(url, body, key, headers) as resp:
                raw = await resp.read()
        except asyncio.TimeoutError as err:
            raise GatewayTimeoutError(f"{self.config.name}: upstream timed out") from err
        except UpstreamConnectionError as err:
            raise UpstreamError(f"{self.config.name}: upstream connection failed: {err}") from err
        try:
            return orjson.loads(raw), resp.headers
        except orjson.JSONDecodeError as err:
            raise UpstreamError(f"{self.config.name}: upstream sent invalid JSON") from err

    async def post_for_response(
        self, url: str, body: dict, key: str | None, headers: dict[str, str] | None = None
    ) -> ir.Response:
        """`post_json`, with the answer parsed by the upstream format into an `ir.Response`
        that carries the answer's headers.

        Raises:
            GatewayError: As `post_json`, and a 502 for a malformed answer.
        """
        answer, received = await self.post_json(url, body, key, headers)
        response = self.upstream_data(self.wire.parse_response, answer)
        response.upstream_headers = received
        return response

    @asynccontextmanager
    async def open_sse(
        self,
        url: str,
        body: dict,
        key: str | None,
        headers: dict[str, str] | None = None,
        *,
        ndjson: bool = False,
    ) -> AsyncIterator[tuple[dict[str, str], AsyncIterator[SSEEvent]]]:
        """POST a JSON body and open the server-sent events of the answer (with ``ndjson``,
        its newline-delimited JSON: each line is one event's data, as Ollama streams).

        A `GatewayError` raised inside the block (an error event in the 200 stream, a
        truncated stream) gets the answer's headers, unless it has its own.

        Args:
            url: The endpoint.
            body: The request body.
            key: The API key.
            headers: Extra headers for this call.
            ndjson: Whether the answer is newline-delimited JSON rather than SSE.

        Yields:
            The answer's headers (lower-case names) and its events.

        Raises:
            GatewayError: Mapped from the upstream status or a transport error.
        """
        try:
            async with self._post(url, body, key, headers) as resp:
                received = resp.headers
                decode = _decode_lines if ndjson else _decode_sse
                async with aclosing(decode(resp)) as events:
                    try:
                        yield received, events
                    except GatewayError as err:
                        if err.upstream_headers is None:
                            err.upstream_headers = received
                        raise
        except asyncio.TimeoutError as err:
            raise GatewayTimeoutError(f"{self.config.name}: upstream stream timed out") from err
        except UpstreamConnectionError as err:
            raise UpstreamError(f"{self.config.name}: upstream stream failed: {err}") from err

    @asynccontextmanager
    async def _post(
        self, url: str, body: dict, key: str | None, headers: dict[str, str] | None
    ) -> AsyncIterator[UpstreamResponse]:
        """POST a JSON body; an error status raises before the answer is read."""
        all_headers = {
            **JSON_HEADERS,
            **self.config.headers,
            **(headers or {}),
            **self.headers(key),
        }
        async with self.pool.post(url, orjson.dumps(body), all_headers) as resp:
            if resp.status >= 400:
                raise await self._status_error(resp)
            yield resp

    async def _status_error(self, resp: UpstreamResponse) -> GatewayError:
        raw = await resp.read(_ERROR_BODY_LIMIT)
        text = raw.decode("utf-8", "replace")
        retry_after = parse_retry_after(resp.headers.get("retry-after"))
        body = None
        try:
            body = json.loads(text)
        except json.JSONDecodeError:
            message = text.strip()[:500] or resp.reason or "no details"
        else:
            message = error_message(body)
            if retry_after is None:
                retry_after = _google_retry_delay(body)
        # Not logged here: the message may echo the key, and the caller logs it scrubbed.
        return error_for_status(
            resp.status,
            f"{self.config.name} ({self.config.type}) returned HTTP {resp.status}: {message}",
            retry_after=retry_after,
            upstream_body=body,
            upstream_headers=resp.headers,
        )

    def upstream_data(self, parse: Callable[..., T], *args: object) -> T:
        """Run an upstream format's parser on upstream data; its validation errors become 502s.

        Args:
            parse: The parser.
            *args: Its arguments.

        Raises:
            UpstreamError: If the upstream's data is malformed.
        """
        try:
            return parse(*args)
        except InvalidRequestError as err:
            raise UpstreamError(
                f"{self.config.name}: unexpected upstream response: {err.message}"
            ) from err
        except (AttributeError, KeyError, TypeError, ValueError) as err:
            # A field of an unexpected JSON type (e.g. a list where an object belongs).
            raise UpstreamError(
                f"{self.config.name}: malformed upstream response ({type(err).__name__}: {err})"
            ) from err

    def decode_event(self, event: SSEEvent) -> dict:
        """Decode one SSE event's JSON data.

        Args:
            event: The event.

        Raises:
            UpstreamError: If the data is not a JSON object.
        """
        try:
            data = orjson.loads(event.data)
        except orjson.JSONDecodeError as err:
            raise UpstreamError(f"{self.config.name}: upstream sent invalid stream data") from err
        if not isinstance(data, dict):
            raise UpstreamError(f"{self.config.name}: upstream stream event is not an object")
        return data


def _google_retry_delay(body: object) -> float | None:
    """Google sends no Retry-After header but a ``RetryInfo`` detail (``"retryDelay": "31s"``)."""
    error = body.get("error") if isinstance(body, dict) else None
    details = error.get("details") if isinstance(error, dict) else None
    for detail in details if isinstance(details, list) else []:
        delay = detail.get("retryDelay") if isinstance(detail, dict) else None
        if isinstance(delay, str) and delay.endswith("s"):
            return parse_retry_after(delay[:-1])
    return None


def with_upstream_headers(
    events: list[ir.StreamEvent], headers: dict[str, str]
) -> list[ir.StreamEvent]:
    """Put the stream's answer headers on its `ir.StreamStart`, if ``events`` holds it.

    Args:
        events: Events just parsed from the stream.
        headers: The answer's headers.
    """
    for event in events:
        if isinstance(event, ir.StreamStart):
            event.upstream_headers = headers
    return events


async def _decode_sse(resp: UpstreamResponse) -> AsyncIterator[SSEEvent]:
    decoder = SSEDecoder(max_pending=MAX_ANSWER_BYTES)
    try:
        async for chunk in resp.chunks():
            for event in decoder.feed(chunk):
                yield event
        for event in decoder.flush():
            yield event
    except EventTooLarge as err:
        raise answer_too_large() from err


async def _decode_lines(resp: UpstreamResponse) -> AsyncIterator[SSEEvent]:
    """Newline-delimited JSON as events: each non-empty line is one event's data."""
    buffer = bytearray()
    async for chunk in resp.chunks():
        buffer += chunk
        if b"\n" not in chunk:  # split only where a line ends: each byte is scanned once
            if len(buffer) > MAX_ANSWER_BYTES:
                raise answer_too_large()
            continue
        *lines, rest = buffer.split(b"\n")
        buffer = rest  # already a bytearray of its own
        for line in lines:
            if line.strip():
                yield SSEEvent(line.decode("utf-8", "replace"))
    if buffer.strip():
        yield SSEEvent(buffer.decode("utf-8", "replace"))
