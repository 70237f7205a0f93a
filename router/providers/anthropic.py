"""Anthropic Messages upstream: ``base_url`` is the host, the router appends ``/v1/messages``."""

from __future__ import annotations

from collections.abc import AsyncIterator

from .. import ir
from .base import HTTPProvider, with_upstream_headers

ANTHROPIC_VERSION = "2023-06-01"
# Fields that /v1/messages/count_tokens accepts.
_COUNT_FIELDS = ("model", "messages", "system", "tools", "tool_choice", "thinking")


class Provider(HTTPProvider):
    """Anthropic backend."""

    def headers(self, key: str | None) -> dict[str, str]:
        """``x-api-key`` and ``anthropic-version``.

        Args:
            key: The API key.
        """
        headers = {"anthropic-version": ANTHROPIC_VERSION}
        if key:
            headers["x-api-key"] = key
        return headers

    async def complete(self, request: ir.Request, key: str | None) -> ir.Response:
        """See `BaseProvider.complete`."""
        url = f"{self.config.base_url}/v1/messages"
        return await self.post_for_response(url, self._body(request), key, _beta(request))

    async def stream(self, request: ir.Request, key: str | None) -> AsyncIterator[ir.StreamEvent]:
        """See `BaseProvider.stream`; an ``error`` event inside the 200 stream is raised."""
        url = f"{self.config.base_url}/v1/messages"
        parser = self.wire.stream_parser()
        body = self._body(request)
        async with self.open_sse(url, body, key, _beta(request)) as (headers, events):
            async for event in events:
                data = self.decode_event(event)
                for item in with_upstream_headers(
                    self.upstream_data(parser.feed, data, event.event), headers
                ):
                    yield item
                if data.get("type") == "message_stop":
                    break
            for item in parser.finish():
                yield item

    async def count_tokens(self, request: ir.Request, key: str | None) -> ir.TokenCount:
        """See `BaseProvider.count_tokens`; asks ``/v1/messages/count_tokens``."""
        body = self._body(request)
        body = {k: v for k, v in body.items() if k in _COUNT_FIELDS}
        url = f"{self.config.base_url}/v1/messages/count_tokens"
        answer, headers = await self.post_json(url, body, key, _beta(request))
        return ir.TokenCount(int(answer.get("input_tokens") or 0), headers)

    def _body(self, request: ir.Request) -> dict:
        return self.wire.render_request(self.with_defaults(request))


def _beta(request: ir.Request) -> dict[str, str]:
    """The client's ``anthropic-beta`` flags, passed through to Anthropic."""
    return {"anthropic-beta": ",".join(request.anthropic_beta)} if request.anthropic_beta else {}
