"""One upstream attempt, as the fallback loop runs it: a complete answer, a token count or an
opened stream, each under the request's first-byte and idle timeouts and holding its key's
lease until it is done."""

from __future__ import annotations

import asyncio
import sys
from collections.abc import AsyncIterator, Awaitable
from typing import TypeVar

from . import ir
from .config import TimeoutsConfig
from .errors import GatewayError, GatewayTimeoutError
from .keys import Lease, classify_failure
from .logs import RequestContext
from .providers.base import BaseProvider

T = TypeVar("T")


if sys.version_info >= (3, 11):

    async def within(call: Awaitable[T], limit: float) -> T:
        """``call``'s result, or `asyncio.TimeoutError` after ``limit`` seconds.

        ``asyncio.timeout`` where it exists: ``wait_for`` before Python 3.12 runs the call in
        a task of its own, a cost paid for every streamed event.
        """
        async with asyncio.timeout(limit):
            return await call

else:

    async def within(call: Awaitable[T], limit: float) -> T:
        """``call``'s result, or `asyncio.TimeoutError` after ``limit`` seconds."""
        return await asyncio.wait_for(call, limit)


async def complete(
    provider: BaseProvider, request: ir.Request, lease: Lease, context: RequestContext
) -> ir.Response:
    """A complete answer; its usage counts for the request.

    Args:
        provider: The provider.
        request: The request for it.
        lease: The key's lease, released with the answer's tokens.
        context: The client request's context.
    """
    call = provider.complete(request, lease.key)
    response = await first_byte(call, provider.config.name, context.timeouts)
    context.upstream_headers = response.upstream_headers
    lease.release(response.usage.total_tokens)
    context.count_usage(response.usage)
    return response


async def count_tokens(
    provider: BaseProvider, request: ir.Request, lease: Lease, context: RequestContext
) -> int:
    """The prompt's token count; its answer's headers count for the key like a completion's.

    Args:
        provider: The provider.
        request: The request for it.
        lease: The key's lease.
        context: The client request's context.
    """
    call = provider.count_tokens(request, lease.key)
    count = await first_byte(call, provider.config.name, context.timeouts)
    context.upstream_headers = count.upstream_headers
    lease.release()
    return count.input_tokens


async def open_stream(
    provider: BaseProvider,
    request: ir.Request,
    lease: Lease,
    context: RequestContext | None = None,
) -> tuple[list[ir.StreamEvent], AsyncIterator[ir.StreamEvent]]:
    """Start an upstream stream and buffer it up to its first delta (or its end), so that a
    failure before any content (e.g. an overloaded error inside a 200, right after
    ``message_start`` and ``content_block_start``) can still fall back. The rest of the stream
    holds the key's lease until the stream ends.

    Args:
        provider: The provider.
        request: The request for it.
        lease: The key's lease.
        context: The client request's context (None outside a request: default timeouts,
            nothing recorded).

    Returns:
        The buffered events and the rest of the stream.
    """
    events = bounded(provider.stream(request, lease.key), provider.config.name, context)
    buffered: list[ir.StreamEvent] = []
    try:
        async for event in events:
            buffered.append(event)
            if isinstance(event, ir.PartDelta | ir.StreamEnd):
                break
    except BaseException:
        await events.aclose()
        raise
    if context is not None and buffered and isinstance(buffered[0], ir.StreamStart):
        context.upstream_headers = buffered[0].upstream_headers
    return buffered, LeasedStream(buffered, events, lease)


async def bounded(
    events: AsyncIterator[ir.StreamEvent], name: str, context: RequestContext | None
) -> AsyncIterator[ir.StreamEvent]:
    """An upstream stream under the first-byte and idle timeouts (each a retryable 504 while
    nothing was sent to the client); its final usage counts for the request.

    Args:
        events: The provider's stream.
        name: The provider's name, for the error message.
        context: The client request's context (None: default timeouts).

    Raises:
        GatewayTimeoutError: When a timeout passes without an event.
    """
    timeouts = context.timeouts if context is not None else TimeoutsConfig()
    limit, waiting_for = timeouts.first_byte_s, "first byte"
    try:
        while True:
            try:
                event = await within(anext(events), limit)
            except StopAsyncIteration:
                return
            except asyncio.TimeoutError as err:
                raise GatewayTimeoutError(
                    f"{name}: no {waiting_for} from the upstream within {limit:g} s"
                ) from err
            if isinstance(event, ir.StreamEnd) and context is not None:
                context.count_usage(event.usage)
            yield event
            limit, waiting_for = timeouts.idle_s, "data"
    finally:
        await events.aclose()


async def first_byte(call: Awaitable[T], name: str, timeouts: TimeoutsConfig) -> T:
    """A non-streaming upstream call under the first-byte timeout (its answer is its first
    byte).

    Args:
        call: The provider call.
        name: The provider's name, for the error message.
        timeouts: The request's timeouts.

    Raises:
        GatewayTimeoutError: When the answer takes longer.
    """
    limit = timeouts.first_byte_s
    try:
        return await within(call, limit)
    except asyncio.TimeoutError as err:
        raise GatewayTimeoutError(
            f"{name}: no answer from the upstream within {limit:g} s"
        ) from err


class LeasedStream:
    """The rest of a stream, holding its key's lease until the stream ends or is closed.

    A class rather than an async generator: ``aclose`` on a generator that never started
    skips its ``finally``, and a client that leaves before the first buffered event is written
    would leak the key's concurrency slot.

    Args:
        buffered: The events already read (their usage, if the stream ended, is the lease's).
        events: The rest of the upstream stream.
        lease: The key's lease.
    """

    def __init__(
        self, buffered: list[ir.StreamEvent], events: AsyncIterator[ir.StreamEvent], lease: Lease
    ) -> None:
        ends = [e for e in buffered if isinstance(e, ir.StreamEnd)]
        self._tokens = ends[-1].usage.total_tokens if ends else 0
        self._events = events
        self._lease = lease

    def __aiter__(self) -> LeasedStream:
        return self

    async def __anext__(self) -> ir.StreamEvent:
        try:
            event = await anext(self._events)
        except StopAsyncIteration:
            await self.aclose()
            raise
        except GatewayError as err:
            # Past the first delta there is no retry, but a rate limit still cools the key.
            self._lease.fail(classify_failure(err))
            err.message = self._lease.scrub(err.message)
            await self.aclose()
            raise
        if isinstance(event, ir.StreamEnd):
            self._tokens = event.usage.total_tokens
        return event

    async def aclose(self) -> None:
        """Release the key (with the usage the stream reported) and close the upstream."""
        self._lease.release(self._tokens)
        await self._events.aclose()

    def __del__(self) -> None:
        # A stream dropped without aclose (its handler cancelled as the stream opened) must
        # still give its key's slot back; asyncio finalizes the upstream generator itself.
        self._lease.release(self._tokens)
