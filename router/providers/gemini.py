"""Gemini upstream: ``base_url`` is the host; the router appends
``/v1beta/models/{model}:generateContent`` (``:streamGenerateContent?alt=sse`` for streams)."""

from __future__ import annotations

from collections.abc import AsyncIterator
from urllib.parse import quote

from .. import ir
from ..images import inline_remote_media
from .base import HTTPProvider, with_upstream_headers


class Provider(HTTPProvider):
    """Gemini (Google AI Studio) backend."""

    def headers(self, key: str | None) -> dict[str, str]:
        """``x-goog-api-key``.

        Args:
            key: The API key.
        """
        return {"x-goog-api-key": key} if key else {}

    def _url(self, model: str, method: str) -> str:
        return f"{self.config.base_url}/v1beta/models/{quote(model, safe='-._~')}:{method}"

    async def _body(self, request: ir.Request) -> dict:
        await inline_remote_media(request, self.media)
        return self.wire.render_request(self.with_defaults(request))

    async def complete(self, request: ir.Request, key: str | None) -> ir.Response:
        """See `BaseProvider.complete`."""
        url = self._url(request.model, "generateContent")
        return await self.post_for_response(url, await self._body(request), key)

    async def stream(self, request: ir.Request, key: str | None) -> AsyncIterator[ir.StreamEvent]:
        """See `BaseProvider.stream`."""
        url = self._url(request.model, "streamGenerateContent") + "?alt=sse"
        parser = self.wire.stream_parser()
        async with self.open_sse(url, await self._body(request), key) as (headers, events):
            async for event in events:
                chunk = self.decode_event(event)
                for item in with_upstream_headers(self.upstream_data(parser.feed, chunk), headers):
                    yield item
            for item in parser.finish():
                yield item

    async def count_tokens(self, request: ir.Request, key: str | None) -> ir.TokenCount:
        """See `BaseProvider.count_tokens`; asks ``:countTokens`` with the full request (system
        prompt and tools included)."""
        inner = {"model": f"models/{request.model}", **(await self._body(request))}
        answer, headers = await self.post_json(
            self._url(request.model, "countTokens"), {"generateContentRequest": inner}, key
        )
        return ir.TokenCount(int(answer.get("totalTokens") or 0), headers)
