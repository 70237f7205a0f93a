"""OpenAI Chat Completions upstream, also any OpenAI-compatible server (vLLM, Ollama,
llama.cpp, mlx-lm): ``base_url`` ends in ``/v1`` and the router appends ``/chat/completions``."""

from __future__ import annotations

from collections.abc import AsyncIterator

from .. import ir
from .base import HTTPProvider, with_upstream_headers


class Provider(HTTPProvider):
    """OpenAI or OpenAI-compatible backend."""

    def headers(self, key: str | None) -> dict[str, str]:
        """``Authorization: Bearer``; none for keyless local servers.

        Args:
            key: The API key.
        """
        return {"Authorization": f"Bearer {key}"} if key else {}

    def _body(self, request: ir.Request) -> dict:
        return self.wire.render_request(self.with_defaults(request))

    async def complete(self, request: ir.Request, key: str | None) -> ir.Response:
        """See `BaseProvider.complete`."""
        url = f"{self.config.base_url}/chat/completions"
        return await self.post_for_response(url, self._body(request), key)

    async def stream(self, request: ir.Request, key: str | None) -> AsyncIterator[ir.StreamEvent]:
        """See `BaseProvider.stream`; an ``{"error": ...}`` chunk inside the 200 stream is
        raised."""
        url = f"{self.config.base_url}/chat/completions"
        parser = self.wire.stream_parser()
        async with self.open_sse(url, self._body(request), key) as (headers, events):
            async for event in events:
                if event.data == "[DONE]":
                    break
                chunk = self.decode_event(event)
                if "error" in chunk:
                    raise self.wire.parse_error(chunk, 500, self.config.name)
                for item in with_upstream_headers(self.upstream_data(parser.feed, chunk), headers):
                    yield item
            for item in parser.finish():
                yield item
