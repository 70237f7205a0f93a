"""The contract of a wire format, one class per direction.

A `ClientFormat` is what a client speaks to the router: it reads the client's HTTP request
into a `ClientCall` and renders the router's answers (responses, streams, errors, token counts
and model listings) in the client's wire shape. An `UpstreamFormat` is what the router speaks
to a provider: it renders IR requests and parses the provider's responses, streams and errors.
Both translate only through the IR (`router.ir`); `router.formats.registry` finds them. A
format's class binds its module's functions where they fit the contract as they are
(``render_response = staticmethod(render_response)``) and writes a method only where it adds
something (a path, a header, a flag).
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from dataclasses import dataclass
from typing import Protocol

from aiohttp import web

from .. import ir
from ..errors import GatewayError, NotFoundError
from ..sse import SSEEvent, encode_comment, encode_event


@dataclass
class ClientCall:
    """What a client asked for.

    Args:
        request: The IR request (its ``model`` is the client's model name).
        count_tokens: Count the prompt's tokens instead of generating.
        sse: Stream as server-sent events (False: Gemini's stream as one JSON array).
    """

    request: ir.Request
    count_tokens: bool = False
    sse: bool = True


class StreamRenderer(Protocol):
    """Renders one response stream for a client; one per stream, since stream grammars need
    state (open blocks, indexes, pending tool calls)."""

    def render_stream_event(self, event: ir.StreamEvent) -> list[SSEEvent]:
        """Render one IR stream event as the format's events (possibly none)."""
        ...

    def render_error(self, err: GatewayError) -> list[SSEEvent]:
        """The format's in-stream error event, once the stream has started."""
        ...


class StreamWriter(Protocol):
    """Puts a rendered stream on the HTTP response.

    ``content_type`` is the response's content type; ``keepalive`` the bytes sent while the
    router waits for the first content (None: this stream takes no keep-alives).
    """

    content_type: str
    keepalive: bytes | None

    async def write(self, out: web.StreamResponse, events: list[SSEEvent]) -> None:
        """Write rendered events."""
        ...

    async def close(self, out: web.StreamResponse) -> None:
        """End the stream."""
        ...


class SSEWriter:
    """Writes a stream as server-sent events.

    Args:
        keepalive: The client format's keep-alive bytes.
    """

    content_type = "text/event-stream"

    def __init__(self, keepalive: bytes) -> None:
        self.keepalive: bytes | None = keepalive

    async def write(self, out: web.StreamResponse, events: list[SSEEvent]) -> None:
        """See `StreamWriter.write`."""
        if events:
            await out.write(b"".join(encode_event(e) for e in events))

    async def close(self, out: web.StreamResponse) -> None:
        """See `StreamWriter.close`."""
        await out.write_eof()


class NDJSONWriter:
    """Writes a stream as newline-delimited JSON (Ollama's streams): each rendered event's data
    is one JSON object on its own line. No keep-alives: a client reads every line as JSON."""

    content_type = "application/x-ndjson"
    keepalive = None

    async def write(self, out: web.StreamResponse, events: list[SSEEvent]) -> None:
        """See `StreamWriter.write`."""
        if events:
            await out.write(b"".join(e.data.encode() + b"\n" for e in events))

    async def close(self, out: web.StreamResponse) -> None:
        """See `StreamWriter.close`."""
        await out.write_eof()


class ClientFormat(ABC):
    """The client side of a wire format.

    ``name`` names it; ``paths`` are the POST routes it serves; ``keepalive`` is what its
    streams send while waiting (an SSE comment unless the format has its own ping).
    """

    name: str
    paths: tuple[str, ...]
    keepalive: bytes = encode_comment("ping")

    @abstractmethod
    def parse_call(self, body: dict, http: web.Request) -> ClientCall:
        """Read a client request.

        Args:
            body: The decoded JSON body.
            http: The HTTP request (path, query and headers some formats read).

        Raises:
            GatewayError: Naming the first invalid or unsupported field, or a 404 for a
                method the format does not serve.
        """

    @abstractmethod
    def render_response(self, response: ir.Response, request: ir.Request) -> dict:
        """Render a complete response.

        Args:
            response: The IR response.
            request: The client's request.
        """

    @abstractmethod
    def stream_renderer(self, request: ir.Request) -> StreamRenderer:
        """A renderer for one response stream.

        Args:
            request: The client's request.
        """

    @abstractmethod
    def render_error(self, err: GatewayError) -> tuple[int, dict]:
        """Render an error as the format's HTTP status and JSON body.

        Args:
            err: The error.
        """

    @abstractmethod
    def render_model(self, name: str) -> dict:
        """One model's description (``GET .../models/{name}``).

        Args:
            name: The model's name on this router.
        """

    @abstractmethod
    def render_models(self, names: list[str]) -> dict:
        """The model listing (``GET .../models``).

        Args:
            names: The models configured on this router.
        """

    def stream_writer(self, call: ClientCall) -> StreamWriter:
        """How a stream reaches the client: server-sent events with this format's keep-alive.

        Args:
            call: The client's call.
        """
        return SSEWriter(self.keepalive)

    def render_token_count(self, tokens: int) -> dict:
        """Render a token count; formats whose `parse_call` never asks for one keep this.

        Args:
            tokens: The prompt's tokens.

        Raises:
            NotFoundError: Always: the format has no token counting.
        """
        raise NotFoundError(f"{self.name} has no token counting endpoint")


class UpstreamStreamParser(Protocol):
    """Turns one upstream response stream into IR stream events; one per stream."""

    def feed(self, data: dict, event: str | None = None) -> list[ir.StreamEvent]:
        """Translate one decoded stream event (``event`` is its SSE event name)."""
        ...

    def finish(self) -> list[ir.StreamEvent]:
        """The events at the end of the stream (its single `ir.StreamEnd`)."""
        ...


class UpstreamFormat(ABC):
    """The upstream side of a wire format, as a provider speaks it."""

    name: str

    @abstractmethod
    def render_request(self, request: ir.Request) -> dict:
        """Render an IR request as the upstream's request body.

        Args:
            request: The IR request (its ``model`` is the upstream model name).

        Raises:
            InvalidRequestError: If the request holds what the format cannot express.
        """

    @abstractmethod
    def parse_response(self, body: dict) -> ir.Response:
        """Parse the upstream's complete response.

        Args:
            body: The decoded JSON response.
        """

    @abstractmethod
    def stream_parser(self) -> UpstreamStreamParser:
        """A parser for one upstream response stream."""

    @abstractmethod
    def parse_error(self, data: dict, default_status: int, source: str) -> GatewayError:
        """Turn the upstream's error object into a router error.

        Args:
            data: The decoded error object.
            default_status: The status to assume when the object names none.
            source: Who sent it (a provider's name), named at the start of the message.
        """
