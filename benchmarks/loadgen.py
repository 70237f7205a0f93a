"""The client side of the gateway benchmark: one request in a client format, checked for
completeness, and closed-loop load at a fixed concurrency.

Every request is classified:

- ``answer``: a complete answer. A body with the fake's full text, or a stream that ends
  properly (OpenAI: a ``finish_reason`` then ``data: [DONE]``; Anthropic: ``message_stop``)
  and carries every text piece in order.
- ``error``: a clean error. A 4xx/5xx with an error body in the client's format, or a stream
  whose last event is the format's error event and that then ends properly.
- ``torn``: anything else (a cut connection, a truncated body or stream, a wrong shape).
- ``hang``: no complete response within the client timeout.

Text pieces are ``"{i}@{ns}"`` (see `benchmarks.fake_provider`): for a stream, each piece's
delay is the client's ``time.monotonic_ns()`` on reading it minus ``ns``, the fake's clock
(both CLOCK_MONOTONIC, so comparable across processes on one machine).
"""

from __future__ import annotations

import asyncio
import json
import time
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field

import aiohttp

ANSWER, ERROR, TORN, HANG = "answer", "error", "torn", "hang"
CLIENT_FORMATS = ("openai", "anthropic")
# The key clients present to the gateways (both are configured with it; the fake ignores it).
CLIENT_KEY = "sk-bench-client-key"
PATHS = {"openai": "/v1/chat/completions", "anthropic": "/v1/messages"}


@dataclass
class Sample:
    """One request's result.

    Args:
        outcome: ``answer``, ``error``, ``torn`` or ``hang``.
        status: The HTTP status (0 when none arrived).
        start_ns: ``time.monotonic_ns()`` when the request was sent.
        latency_s: Until the response was complete.
        ttfb_s: Until the first text piece arrived (streams only).
        piece_lags_ns: Per streamed piece: arrival minus the fake's send time.
        detail: Why it is not an answer (the error message or what was wrong).
    """

    outcome: str
    status: int
    start_ns: int
    latency_s: float
    ttfb_s: float | None = None
    piece_lags_ns: list[int] = field(default_factory=list)
    detail: str = ""


def request_body(client: str, model: str, stream: bool, ident: str) -> dict:
    """A minimal chat request in a client format; ``ident`` is the user text.

    Args:
        client: ``openai`` or ``anthropic``.
        model: The model name.
        stream: Ask for a stream.
        ident: The user text (the fake draws its faults from it).
    """
    body = {
        "model": model,
        "messages": [{"role": "user", "content": ident}],
        "max_tokens": 64,
        "stream": stream,
    }
    if client == "openai" and stream:
        body["stream_options"] = {"include_usage": True}
    return body


def pieces_in_order(text: str, expected: int) -> bool:
    """Whether ``text`` is exactly the fake's pieces ``0@.. 1@.. ...`` up to ``expected``.

    Args:
        text: The answer text.
        expected: How many pieces the fake sends.
    """
    pieces = text.split()
    return len(pieces) == expected and all(
        p.partition("@")[0] == str(i) for i, p in enumerate(pieces)
    )


def is_error_body(client: str, body: object) -> bool:
    """Whether ``body`` is an error in the client's format.

    Args:
        client: ``openai`` or ``anthropic``.
        body: The decoded JSON.
    """
    if not isinstance(body, dict) or not isinstance(body.get("error"), dict):
        return False
    error = body["error"]
    if client == "anthropic":
        return body.get("type") == "error" and {"type", "message"} <= error.keys()
    return {"message", "type"} <= error.keys()


def answer_text(client: str, body: object) -> str | None:
    """The text of a non-streaming answer, or None if the body is not one.

    Args:
        client: ``openai`` or ``anthropic``.
        body: The decoded JSON.
    """
    if not isinstance(body, dict):
        return None
    if client == "anthropic":
        blocks = body.get("content")
        if body.get("type") != "message" or not isinstance(blocks, list):
            return None
        return "".join(b.get("text", "") for b in blocks if isinstance(b, dict))
    choices = body.get("choices")
    if not isinstance(choices, list) or not choices or not isinstance(choices[0], dict):
        return None
    message = choices[0].get("message") or {}
    return message.get("content") if isinstance(message.get("content"), str) else None


class _StreamCheck:
    """Follows one stream's events in a client format: its text, its end, its error."""

    def __init__(self, client: str) -> None:
        self.client = client
        self.text: list[str] = []
        self.finished = False  # the format's proper end was seen
        self.error: str | None = None  # an error event was seen
        self.after_end = False  # something came after the end or the error

    def feed(self, data: str) -> str | None:
        """Take one ``data:`` payload; returns the text piece it carries, if any."""
        if self.finished or self.error is not None:
            self.after_end = True
            return None
        if self.client == "openai":
            if data == "[DONE]":
                self.finished = True
                return None
            event = json.loads(data)
            if "error" in event:
                self.error = str((event.get("error") or {}).get("message"))
                return None
            for choice in event.get("choices") or []:
                piece = (choice.get("delta") or {}).get("content")
                if piece:
                    self.text.append(piece)
                    return piece
            return None
        event = json.loads(data)
        kind = event.get("type")
        if kind == "message_stop":
            self.finished = True
        elif kind == "error":
            self.error = str((event.get("error") or {}).get("message"))
        elif kind == "content_block_delta":
            piece = (event.get("delta") or {}).get("text")
            if piece:
                self.text.append(piece)
                return piece
        return None


async def send(
    session: aiohttp.ClientSession,
    base_url: str,
    client: str,
    model: str,
    stream: bool,
    ident: str,
    pieces: int,
    timeout_s: float = 30.0,
) -> Sample:
    """Send one chat request and classify what came back.

    Args:
        session: The client session.
        base_url: The gateway (or fake) root, e.g. ``http://127.0.0.1:8080``.
        client: The client format, ``openai`` or ``anthropic``.
        model: The model name.
        stream: Ask for a stream.
        ident: The user text.
        pieces: How many text pieces a complete answer has.
        timeout_s: A response not complete by then is a ``hang``.
    """
    body = request_body(client, model, stream, ident)
    if client == "anthropic":
        headers = {"anthropic-version": "2023-06-01", "x-api-key": CLIENT_KEY}
    else:
        headers = {"Authorization": f"Bearer {CLIENT_KEY}"}
    start = time.monotonic_ns()
    state: dict = {"status": 0}
    try:
        async with asyncio.timeout(timeout_s):
            return await _exchange(
                session, base_url + PATHS[client], body, headers, client, pieces, start, state
            )
    except TimeoutError:
        return Sample(HANG, state["status"], start, _since(start), detail="timed out")
    except (aiohttp.ClientError, ConnectionError) as err:
        detail = f"{type(err).__name__}: {err}"
        return Sample(TORN, state["status"], start, _since(start), detail=detail)


def _since(start_ns: int) -> float:
    return (time.monotonic_ns() - start_ns) / 1e9


async def _exchange(
    session: aiohttp.ClientSession,
    url: str,
    body: dict,
    headers: dict,
    client: str,
    pieces: int,
    start: int,
    state: dict,
) -> Sample:
    async with session.post(url, json=body, headers=headers) as resp:
        state["status"] = resp.status
        stream = resp.content_type == "text/event-stream"
        if not stream:
            raw = await resp.read()
            latency = _since(start)
            try:
                decoded = json.loads(raw)
            except (json.JSONDecodeError, UnicodeDecodeError):
                return Sample(TORN, resp.status, start, latency, detail="body is not JSON")
            if resp.status >= 400:
                if is_error_body(client, decoded):
                    message = str(decoded["error"].get("message"))
                    return Sample(ERROR, resp.status, start, latency, detail=message)
                return Sample(TORN, resp.status, start, latency, detail="malformed error body")
            text = answer_text(client, decoded)
            if text is None or not pieces_in_order(text, pieces):
                return Sample(TORN, resp.status, start, latency, detail="incomplete answer")
            return Sample(ANSWER, resp.status, start, latency)
        check = _StreamCheck(client)
        first: int | None = None
        lags: list[int] = []
        async for line in resp.content:
            if not line.startswith(b"data:"):
                continue
            now = time.monotonic_ns()
            piece = check.feed(line[5:].strip().decode())
            if piece is not None:
                first = first or now
                sent = int(piece.partition("@")[2] or 0)
                if sent:
                    lags.append(now - sent)
        latency = _since(start)
        ttfb = (first - start) / 1e9 if first else None
        if check.after_end:
            outcome, detail = TORN, "events after the end of the stream"
        elif check.error is not None:
            outcome, detail = ERROR, check.error
        elif not check.finished:
            outcome, detail = TORN, "stream ended without its final event"
        elif not pieces_in_order("".join(check.text), pieces):
            outcome, detail = TORN, "stream text incomplete or out of order"
        else:
            outcome, detail = ANSWER, ""
        return Sample(outcome, resp.status, start, latency, ttfb, lags, detail)


@dataclass
class LoadRun:
    """The samples of one closed-loop run and its measured window.

    Args:
        samples: Requests started inside the window (for latencies).
        window_s: The window's length.
        answered: Complete answers that arrived inside the window, whenever their request
            started (for throughput).
        cpu_s: CPU time this process (the load generator) used during the window.
    """

    samples: list[Sample]
    window_s: float
    answered: int
    cpu_s: float


async def drive(
    send_one: Callable[[int], Awaitable[Sample]],
    concurrency: int,
    warmup_s: float,
    duration_s: float | None = None,
    requests: int | None = None,
) -> LoadRun:
    """Closed-loop load: ``concurrency`` workers each send a request as soon as their last one
    finishes.

    The warm-up lasts ``warmup_s`` and until every worker has had an answer (so a slow system
    is measured in its steady state, not while its first requests pile up). Then the window
    runs for ``duration_s``, its samples being the requests that end inside it; or it takes
    ``requests`` requests, its samples being those. Exactly one of the two must be given.

    Args:
        send_one: Sends request number ``n`` and returns its sample.
        concurrency: Requests in flight at once.
        warmup_s: Least load before the window.
        duration_s: The window's length.
        requests: The window's request count.

    Raises:
        ValueError: Unless exactly one of ``duration_s`` and ``requests`` is given.
    """
    if (duration_s is None) == (requests is None):
        raise ValueError("drive: give exactly one of duration_s and requests")
    warm_after = time.monotonic_ns() + int(warmup_s * 1e9)
    # The window: [start, end) in monotonic ns, set once the warm-up is over.
    window: dict[str, int] = {}
    started_in_window: list[Sample] = []
    everything: list[Sample] = []
    state = {"sent": 0, "in_window": 0, "first_answers": 0}
    cpu_start: list[float] = []

    def open_window(now: int) -> None:
        window["start"] = now
        if duration_s is not None:
            window["end"] = now + int(duration_s * 1e9)
        cpu_start.append(time.process_time())

    async def worker() -> None:
        first = True
        while True:
            now = time.monotonic_ns()
            if "end" in window and now >= window["end"]:
                return
            in_window = "start" in window
            if in_window and requests is not None:
                if state["in_window"] >= requests:
                    return
                state["in_window"] += 1
            n = state["sent"]
            state["sent"] += 1
            sample = await send_one(n)
            everything.append(sample)
            if in_window:
                started_in_window.append(sample)
            if first:
                first = False
                state["first_answers"] += 1
            done = time.monotonic_ns()
            if not window and state["first_answers"] == concurrency and done >= warm_after:
                open_window(done)

    await asyncio.gather(*(worker() for _ in range(concurrency)))
    finished = time.monotonic_ns()
    if not window:  # every request ended before the warm-up did
        open_window(finished)
    start, end = window["start"], window.get("end", finished)

    def ends_inside(s: Sample) -> bool:
        return start <= s.start_ns + int(s.latency_s * 1e9) <= end

    samples = started_in_window if requests is not None else list(filter(ends_inside, everything))
    answered = sum(1 for s in everything if s.outcome == ANSWER and ends_inside(s))
    cpu_s = time.process_time() - cpu_start[0]
    return LoadRun(samples, max(end - start, 1) / 1e9, answered, cpu_s)
