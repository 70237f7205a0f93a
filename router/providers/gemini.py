"""Gemini upstream: ``base_url`` is the host; the router appends
``/v1beta/models/{model}:generateContent`` (``:streamGenerateContent?alt=sse`` for streams)."""

from __future__ import annotations

from collections.abc import AsyncIterator
from urllib.parse import quote

from .. import ir
from ..adapters import gemini as wire
from ..images import inline_remote_media
from .base import HTTPProvider


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
        await inline_remote_media(request, self.session, self.limits)
        return wire.render_request(self.with_defaults(request))

    async def complete(self, request: ir.Request, key: str | None) -> ir.Response:
        """See `BaseProvider.complete`."""
        body = await self.post_json(
            self._url(request.model, "generateContent"), await self._body(request), key
        )
        return self.upstream_data(wire.parse_response, body)

    async def stream(self, request: ir.Request, key: str | None) -> AsyncIterator[ir.StreamEvent]:
        """See `BaseProvider.stream`."""
        url = self._url(request.model, "streamGenerateContent") + "?alt=sse"
        parser = wire.StreamParser()
        async for event in self.post_sse(url, await self._body(request), key):
            for item in self.upstream_data(parser.parse_stream_event, self.decode_event(event)):
                yield item
        for item in parser.finish():
            yield item

    async def count_tokens(self, request: ir.Request, key: str | None) -> int:
        """Ask ``:countTokens`` with the full request (system prompt and tools included).

        Args:
            request: The IR request.
            key: The API key.
        """
        inner = {"model": f"models/{request.model}", **(await self._body(request))}
        answer = await self.post_json(
            self._url(request.model, "countTokens"), {"generateContentRequest": inner}, key
        )
        return int(answer.get("totalTokens") or 0)
