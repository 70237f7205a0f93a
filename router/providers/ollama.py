"""Ollama upstream: ``base_url`` is the server's root (``http://127.0.0.1:11434``, or
``https://ollama.com`` with a key); the router appends ``/api/chat``. Streams are
newline-delimited JSON."""

from __future__ import annotations

from collections.abc import AsyncIterator

from .. import ir
from ..images import inline_remote_media
from .base import HTTPProvider, with_upstream_headers


class Provider(HTTPProvider):
    """An Ollama server (another router's Ollama API too)."""

    def headers(self, key: str | None) -> dict[str, str]:
        """``Authorization: Bearer`` (Ollama's cloud); none for a local server.

        Args:
            key: The API key.
        """
        return {"Authorization": f"Bearer {key}"} if key else {}

    async def _body(self, request: ir.Request) -> dict:
        # Ollama takes images only inline.
        await inline_remote_media(request, self.media)
        return self.wire.render_request(self.with_defaults(request))

    async def complete(self, request: ir.Request, key: str | None) -> ir.Response:
        """See `BaseProvider.complete`."""
        url = f"{self.config.base_url}/api/chat"
        return await self.post_for_response(url, await self._body(request), key)

    async def stream(self, request: ir.Request, key: str | None) -> AsyncIterator[ir.StreamEvent]:
        """See `BaseProvider.stream`; an ``{"error": ...}`` line inside the 200 stream is
        raised."""
        url = f"{self.config.base_url}/api/chat"
        parser = self.wire.stream_parser()
        body = await self._body(request)
        async with self.open_sse(url, body, key, ndjson=True) as (headers, events):
            async for event in events:
                chunk = self.decode_event(event)
                if "error" in chunk:
                    raise self.wire.parse_error(chunk, 500, self.config.name)
                for item in with_upstream_headers(self.upstream_data(parser.feed, chunk), headers):
                    yield item
            for item in parser.finish():
                yield item
