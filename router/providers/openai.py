"""OpenAI Chat Completions upstream, also any OpenAI-compatible server (vLLM, Ollama,
llama.cpp, mlx-lm): ``base_url`` ends in ``/v1`` and the router appends ``/chat/completions``."""

from __future__ import annotations

from collections.abc import AsyncIterator
from urllib.parse import urlparse

from .. import ir
from ..adapters import openai as wire
from ..errors import GatewayError, error_for_status
from .base import HTTPProvider, error_message


class Provider(HTTPProvider):
    """OpenAI or OpenAI-compatible backend."""

    @property
    def _compatible(self) -> bool:
        return urlparse(self.config.base_url).hostname != "api.openai.com"

    def headers(self, key: str | None) -> dict[str, str]:
        """``Authorization: Bearer``; none for keyless local servers.

        Args:
            key: The API key.
        """
        return {"Authorization": f"Bearer {key}"} if key else {}

    def _body(self, request: ir.Request) -> dict:
        return wire.render_request(self.with_defaults(request), compatible=self._compatible)

    async def complete(self, request: ir.Request, key: str | None) -> ir.Response:
        """See `BaseProvider.complete`."""
        url = f"{self.config.base_url}/chat/completions"
        body = await self.post_json(url, self._body(request), key)
        return self.upstream_data(wire.parse_response, body)

    async def stream(self, request: ir.Request, key: str | None) -> AsyncIterator[ir.StreamEvent]:
        """See `BaseProvider.stream`."""
        url = f"{self.config.base_url}/chat/completions"
        parser = wire.StreamParser()
        async for event in self.post_sse(url, self._body(request), key):
            if event.data == "[DONE]":
                break
            chunk = self.decode_event(event)
            if "error" in chunk:
                raise self.stream_error(chunk)
            for item in self.upstream_data(parser.parse_stream_event, chunk):
                yield item
        for item in parser.finish():
            yield item

    def stream_error(self, chunk: dict) -> GatewayError:
        """The error for an ``{"error": ...}`` chunk inside a 200 stream.

        Args:
            chunk: The error chunk.
        """
        error = chunk["error"] if isinstance(chunk["error"], dict) else {}
        code = error.get("code")
        status = code if isinstance(code, int) else 500
        return error_for_status(status, f"{self.config.name}: {error_message(chunk)}")
