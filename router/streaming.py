"""Streaming an answer to the client: open the upstream stream with fallback while sending
keep-alives, then write the rendered events, ending with the format's error event if the
stream fails after it started."""

from __future__ import annotations

import asyncio
import logging
from collections.abc import AsyncIterator, Awaitable

from aiohttp import web

from . import ir
from .attempts import open_stream
from .backends import CONFIG
from .errors import GatewayError
from .fallback import run_with_fallback
from .formats.base import ClientCall, ClientFormat
from .logs import RequestContext

logger = logging.getLogger(__name__)


class _StreamResponse(web.StreamResponse):
    # The headers go out with the first bytes of the body, in one segment (as a web.Response's).
    _send_headers_immediately = False


async def stream_answer(
    request: web.Request,
    fmt: ClientFormat,
    call: ClientCall,
    context: RequestContext,
    affinity: str | None,
) -> web.StreamResponse:
    """Serve a streaming call in the client's format.

    Args:
        request: The HTTP request.
        fmt: The client's format.
        call: The client's call (its request has ``stream`` set).
        context: The request's context.
        affinity: The conversation id for key affinity (`request_affinity`).

    Raises:
        GatewayError: If every target failed before anything was sent to the client.
    """
    ir_request = call.request
    renderer = fmt.stream_renderer(ir_request)
    writer = fmt.stream_writer(call)
    out = _StreamResponse(
        headers={"Content-Type": writer.content_type, "Cache-Control": "no-cache"}
    )
    keepalive = request.app[CONFIG].limits.keepalive_s if writer.keepalive else 0
    try:
        opening = run_with_fallback(request.app, context, ir_request, open_stream, affinity)
        started = await _first_events(request, opening, out, keepalive, writer.keepalive)
    except ConnectionResetError:
        logger.info("client left while model=%s was starting", ir_request.model)
        return out
    if isinstance(started, GatewayError):
        # Headers went out with keep-alives before every target failed.
        await writer.write(out, renderer.render_error(started))
        await writer.close(out)
        return out
    buffered, events = started
    try:
        if not out.prepared:
            await out.prepare(request)
        # One write up to the first content: the client gets its first byte in one segment.
        await writer.write(
            out, [e for event in buffered for e in renderer.render_stream_event(event)]
        )
        async for event in events:
            await writer.write(out, renderer.render_stream_event(event))
    except GatewayError as err:
        logger.warning(
            "stream for model=%s failed after it started: %s", ir_request.model, err.message
        )
        await writer.write(out, renderer.render_error(err))
    except ConnectionResetError:
        logger.info("client disconnected from a stream for model=%s", ir_request.model)
        return out
    except Exception:
        # The headers are sent, so the error middleware can no longer answer: end the stream
        # with the format's error event instead of corrupting it.
        logger.exception("stream for model=%s failed with a router bug", ir_request.model)
        await writer.write(out, renderer.render_error(GatewayError("internal router error")))
    finally:
        await events.aclose()
    await writer.close(out)
    return out


async def _first_events(
    request: web.Request,
    opening: Awaitable[tuple[list[ir.StreamEvent], AsyncIterator[ir.StreamEvent]]],
    out: web.StreamResponse,
    keepalive: float,
    ping: bytes | None,
) -> tuple[list[ir.StreamEvent], AsyncIterator[ir.StreamEvent]] | GatewayError:
    """Await ``opening`` (the stream opened with fallback). While no target has produced
    content for ``keepalive`` seconds, send the headers and ``ping`` (the format's keep-alive)
    every ``keepalive`` seconds, so proxies with idle timeouts keep the connection; fallback
    still works since no content was sent.

    Returns:
        The buffered first events and the rest of the stream, or the final error if the
        headers were already sent (before that, the error is raised).
    """
    task = asyncio.ensure_future(opening)
    try:
        while not task.done():
            await asyncio.wait({task}, timeout=keepalive or None)
            if task.done():
                break
            if not out.prepared:
                await out.prepare(request)
            await out.write(ping)
    finally:
        if not task.done():
            task.cancel()
    try:
        return task.result()
    except GatewayError as err:
        if not out.prepared:
            raise
        return err
