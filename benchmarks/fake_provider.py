"""A fast fake LLM provider for gateway benchmarks: OpenAI ``/v1/chat/completions`` and
Anthropic ``/v1/messages`` on loopback, with faults injected on demand.

It is a raw asyncio protocol speaking just enough HTTP/1.1 (Content-Length request bodies,
keep-alive, pipelining; chunked responses for streams), so that it costs a fraction of what
the gateway under test costs per request. Answers are fixed: ``chunks`` text pieces
``"{i}@{ns} "``, where ``ns`` is ``time.monotonic_ns()`` when the fake wrote the piece (0 in a
non-streaming answer), so a client on the same machine can tell how long each streamed piece
took to reach it. Streams send the pieces ``chunk_interval_s`` apart (0: all at once).

Faults, for a soak run: a ``fault_rate`` share of requests, drawn deterministically from the
seed, the request's last user text and how many times that text has been seen (so a retry of
the same request draws again), gets one of:

- ``reset``: the connection is reset (RST) right after the request is read;
- ``429``: a rate-limit error with ``retry-after-ms`` (half of them) or ``Retry-After``;
- ``500``: a server error in the provider's format;
- ``slow``: the answer starts after a delay drawn in ``[0, 2 * slow_s]``;
- ``cut``: the answer stops halfway (a stream after half its pieces, a body after half its
  bytes) and the connection is reset.

Scripted faults, for traffic mixes: every request that arrives within a ``windows`` entry
``(kind, start_s, end_s)`` (seconds since the fake started) gets that fault (``429`` for a
burst of rate limits, ``500`` or ``reset`` for an outage). ``latency_s`` and
``max_concurrency`` make a slow backend of bounded capacity (a local model): each answer takes
``latency_s`` and at most ``max_concurrency`` are answered at once, the others wait in line.

``GET /stats`` returns the counts (requests, faults by kind, open connections); ``POST
/stats/reset`` zeroes them.

Run it as ``python -m benchmarks.fake_provider --port N``; it writes ``listening on
HOST:PORT`` to stdout once it accepts connections (``--port 0`` picks a free port).
"""

from __future__ import annotations

import argparse
import asyncio
import json
import logging
import random
import socket
import struct
import sys
import time
from collections import Counter
from dataclasses import dataclass

logger = logging.getLogger(__name__)

FAULT_KINDS = ("reset", "429", "500", "slow", "cut")
# Requests larger than this are refused (the fake is for benchmarks, not uploads).
MAX_REQUEST_BYTES = 1 << 20


@dataclass
class FakeConfig:
    """What the fake answers and which faults it injects.

    Args:
        chunks: Text pieces per answer (stream deltas).
        chunk_interval_s: Pause between two streamed pieces.
        fault_rate: Share of requests that get a fault (0 to 1).
        faults: The fault kinds drawn from, equally likely (see the module docstring).
        seed: Seed of the fault draws.
        slow_s: A ``slow`` fault delays the answer by a draw in ``[0, 2 * slow_s]``.
        retry_after_ms: The wait a ``429`` asks for.
    """

    chunks: int = 20
    chunk_interval_s: float = 0.0
    fault_rate: float = 0.0
    faults: tuple[str, ...] = FAULT_KINDS
    seed: int = 0
    slow_s: float = 0.3
    retry_after_ms: int = 100
    windows: tuple[tuple[str, float, float], ...] = ()
    latency_s: float = 0.0
    max_concurrency: int = 0

    def __post_init__(self) -> None:
        for kind, start_s, end_s in self.windows:
            if kind not in ("429", "500", "reset") or not 0 <= start_s <= end_s:
                raise ValueError(f"windows: ({kind!r}, {start_s}, {end_s}) is not a fault window")
        if self.latency_s < 0 or self.max_concurrency < 0:
            raise ValueError("latency_s and max_concurrency must be >= 0")
        if self.chunks < 1:
            raise ValueError(f"chunks: must be >= 1, got {self.chunks}")
        if not 0.0 <= self.fault_rate <= 1.0:
            raise ValueError(f"fault_rate: must be within [0, 1], got {self.fault_rate}")
        unknown = sorted(set(self.faults) - set(FAULT_KINDS))
        if unknown or not self.faults:
            raise ValueError(
                f"faults: unknown kind(s) {', '.join(unknown) or '(none given)'}; "
                f"choose from {', '.join(FAULT_KINDS)}"
            )
        if self.chunk_interval_s < 0 or self.slow_s < 0 or self.retry_after_ms < 0:
            raise ValueError("chunk_interval_s, slow_s and retry_after_ms must be >= 0")


@dataclass
class Fault:
    """One injected fault: its kind and, for ``slow``, the delay."""

    kind: str
    delay_s: float = 0.0


class FakeState:
    """Counters and the fault draws shared by all connections of one fake.

    Args:
        config: The fake's config.
    """

    def __init__(self, config: FakeConfig) -> None:
        self.config = config
        self.requests = 0
        self.faults: Counter[str] = Counter()
        self.connections = 0
        self._seen: Counter[str] = Counter()
        self.started = time.monotonic()
        # Answers in progress at once (a slow backend's capacity); None: unlimited.
        self.capacity = (
            asyncio.Semaphore(config.max_concurrency) if config.max_concurrency else None
        )

    @property
    def answers_later(self) -> bool:
        """Whether answers need the event loop (faults, delays), not the fast path."""
        config = self.config
        return (
            config.fault_rate > 0
            or bool(config.windows)
            or config.latency_s > 0
            or (self.capacity is not None)
        )

    def window_fault(self) -> Fault | None:
        """The fault of the ``windows`` entry that holds now, if any."""
        now = time.monotonic() - self.started
        for kind, start_s, end_s in self.config.windows:
            if start_s <= now < end_s:
                self.faults[kind] += 1
                return Fault(kind)
        return None

    def draw(self, ident: str) -> Fault | None:
        """The fault for this arrival of a request, if any.

        Args:
            ident: The request's last user text (the same for every retry of one request).
        """
        if self.config.fault_rate <= 0:
            return None
        attempt = self._seen[ident]
        self._seen[ident] += 1
        rng = random.Random(f"{self.config.seed}/{ident}/{attempt}")
        if rng.random() >= self.config.fault_rate:
            return None
        kind = self.config.faults[rng.randrange(len(self.config.faults))]
        self.faults[kind] += 1
        return Fault(kind, rng.uniform(0.0, 2.0 * self.config.slow_s))

    def stats(self) -> dict:
        """The counters as JSON-ready data."""
        return {
            "requests": self.requests,
            "faults": dict(self.faults),
            "connections": self.connections,
        }

    def reset(self) -> None:
        """Zero the counters and forget the requests seen."""
        self.requests = 0
        self.faults.clear()
        self._seen.clear()


# ---- the answers ----------------------------------------------------------------------------


def _piece(i: int, ns: int) -> str:
    return f"{i}@{ns} "


def _openai_body(model: str, chunks: int) -> dict:
    text = "".join(_piece(i, 0) for i in range(chunks))
    return {
        "id": "chatcmpl-fake",
        "object": "chat.completion",
        "created": 0,
        "model": model,
        "choices": [
            {
                "index": 0,
                "message": {"role": "assistant", "content": text},
                "finish_reason": "stop",
            }
        ],
        "usage": {"prompt_tokens": 10, "completion_tokens": chunks, "total_tokens": 10 + chunks},
    }


def _anthropic_body(model: str, chunks: int) -> dict:
    text = "".join(_piece(i, 0) for i in range(chunks))
    return {
        "id": "msg_fake",
        "type": "message",
        "role": "assistant",
        "model": model,
        "content": [{"type": "text", "text": text}],
        "stop_reason": "end_turn",
        "stop_sequence": None,
        "usage": {"input_tokens": 10, "output_tokens": chunks},
    }


def _sse(data: dict | str, event: str | None = None) -> bytes:
    payload = data if isinstance(data, str) else json.dumps(data, separators=(",", ":"))
    head = f"event: {event}\n" if event else ""
    return f"{head}data: {payload}\n\n".encode()


class _OpenAIStream:
    """The events of an OpenAI Chat Completions stream."""

    def __init__(self, model: str, chunks: int, usage: bool) -> None:
        self._base = {"id": "chatcmpl-fake", "object": "chat.completion.chunk", "created": 0}
        self._model = model
        self._chunks = chunks
        self._usage = usage

    def _chunk(self, choices: list, **extra: object) -> bytes:
        return _sse({**self._base, "model": self._model, "choices": choices, **extra})

    def head(self) -> bytes:
        delta = {"role": "assistant", "content": ""}
        return self._chunk([{"index": 0, "delta": delta, "finish_reason": None}])

    def piece(self, i: int) -> bytes:
        delta = {"content": _piece(i, time.monotonic_ns())}
        return self._chunk([{"index": 0, "delta": delta, "finish_reason": None}])

    def tail(self) -> bytes:
        out = self._chunk([{"index": 0, "delta": {}, "finish_reason": "stop"}])
        if self._usage:
            usage = {
                "prompt_tokens": 10,
                "completion_tokens": self._chunks,
                "total_tokens": 10 + self._chunks,
            }
            out += self._chunk([], usage=usage)
        return out + _sse("[DONE]")


class _AnthropicStream:
    """The events of an Anthropic Messages stream."""

    def __init__(self, model: str, chunks: int) -> None:
        self._model = model
        self._chunks = chunks

    def head(self) -> bytes:
        message = {**_anthropic_body(self._model, 0), "content": [], "stop_reason": None}
        message["usage"] = {"input_tokens": 10, "output_tokens": 1}
        block = {"type": "text", "text": ""}
        return _sse({"type": "message_start", "message": message}, "message_start") + _sse(
            {"type": "content_block_start", "index": 0, "content_block": block},
            "content_block_start",
        )

    def piece(self, i: int) -> bytes:
        delta = {"type": "text_delta", "text": _piece(i, time.monotonic_ns())}
        return _sse(
            {"type": "content_block_delta", "index": 0, "delta": delta}, "content_block_delta"
        )

    def tail(self) -> bytes:
        delta = {"stop_reason": "end_turn", "stop_sequence": None}
        return (
            _sse({"type": "content_block_stop", "index": 0}, "content_block_stop")
            + _sse(
                {
                    "type": "message_delta",
                    "delta": delta,
                    "usage": {"output_tokens": self._chunks},
                },
                "message_delta",
            )
            + _sse({"type": "message_stop"}, "message_stop")
        )


def _error_body(kind: str, status: int, message: str) -> dict:
    """The provider's error body (``kind``: ``openai`` or ``anthropic``)."""
    if kind == "anthropic":
        etype = "rate_limit_error" if status == 429 else "api_error"
        return {"type": "error", "error": {"type": etype, "message": message}}
    etype = "rate_limit_error" if status == 429 else "server_error"
    return {"error": {"message": message, "type": etype, "param": None, "code": None}}


def _last_user_text(body: dict) -> str:
    """The text of the last message (a string, or the text blocks of a content list)."""
    messages = body.get("messages")
    if not isinstance(messages, list) or not messages or not isinstance(messages[-1], dict):
        return ""
    content = messages[-1].get("content")
    if isinstance(content, str):
        return content
    if isinstance(content, list):
        return "".join(b.get("text", "") for b in content if isinstance(b, dict))
    return ""


# ---- HTTP -----------------------------------------------------------------------------------

_REASONS = {200: "OK", 400: "Bad Request", 404: "Not Found", 429: "Too Many Requests"}
_REASONS |= {500: "Internal Server Error", 501: "Not Implemented"}


def _head(status: int, headers: dict[str, str]) -> bytes:
    lines = [f"HTTP/1.1 {status} {_REASONS.get(status, 'Status')}"]
    lines += [f"{k}: {v}" for k, v in headers.items()]
    return ("\r\n".join(lines) + "\r\n\r\n").encode("latin-1")


def _json_response(status: int, body: dict, keep_alive: bool, extra: dict | None = None) -> bytes:
    raw = json.dumps(body, separators=(",", ":")).encode()
    headers = {"Content-Type": "application/json", "Content-Length": str(len(raw))}
    headers["Connection"] = "keep-alive" if keep_alive else "close"
    return _head(status, {**headers, **(extra or {})}) + raw


def _chunk(data: bytes) -> bytes:
    return b"%x\r\n%s\r\n" % (len(data), data)


@dataclass
class _Request:
    method: str
    path: str
    keep_alive: bool
    body: bytes


class _Connection(asyncio.Protocol):
    """One client connection: parses requests in order and answers them one at a time."""

    def __init__(self, state: FakeState) -> None:
        self._state = state
        self._buf = bytearray()
        self._transport: asyncio.Transport | None = None
        self._busy = False
        self._closed = False

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self._transport = transport
        self._state.connections += 1

    def connection_lost(self, exc: Exception | None) -> None:
        self._closed = True
        self._state.connections -= 1

    def data_received(self, data: bytes) -> None:
        self._buf += data
        self._serve()

    def _serve(self) -> None:
        while not self._busy and not self._closed:
            request = self._parse()
            if request is None:
                return
            self._busy = True
            if not self._answer(request):
                asyncio.ensure_future(self._answer_later(request))
                return
            self._busy = False
            if not request.keep_alive:
                self._transport.close()
                return

    def _parse(self) -> _Request | None:
        end = self._buf.find(b"\r\n\r\n")
        if end < 0:
            if len(self._buf) > MAX_REQUEST_BYTES:
                self._fail(400, "request head too large")
            return None
        lines = bytes(self._buf[:end]).decode("latin-1").split("\r\n")
        parts = lines[0].split(" ")
        if len(parts) != 3:
            self._fail(400, f"malformed request line {lines[0][:80]!r}")
            return None
        method, path, version = parts
        headers = {}
        for line in lines[1:]:
            name, _, value = line.partition(":")
            headers[name.strip().lower()] = value.strip()
        if "chunked" in headers.get("transfer-encoding", "").lower():
            self._fail(501, "chunked request bodies are not supported; send Content-Length")
            return None
        try:
            length = int(headers.get("content-length", "0"))
        except ValueError:
            self._fail(400, "Content-Length is not a number")
            return None
        if length > MAX_REQUEST_BYTES:
            self._fail(400, f"request body of {length} bytes is over {MAX_REQUEST_BYTES}")
            return None
        if len(self._buf) < end + 4 + length:
            return None
        body = bytes(self._buf[end + 4 : end + 4 + length])
        del self._buf[: end + 4 + length]
        connection = headers.get("connection", "").lower()
        keep_alive = connection != "close" and not (
            version == "HTTP/1.0" and connection != "keep-alive"
        )
        return _Request(method, path.split("?", 1)[0], keep_alive, body)

    def _fail(self, status: int, message: str) -> None:
        self._transport.write(_json_response(status, _error_body("openai", status, message), False))
        self._transport.close()
        self._closed = True

    def _answer(self, request: _Request) -> bool:
        """Answer at once when possible (no stream, no fault); False: needs `_answer_later`."""
        if request.path == "/stats" and request.method == "GET":
            self._transport.write(_json_response(200, self._state.stats(), request.keep_alive))
            return True
        if request.path == "/stats/reset" and request.method == "POST":
            self._state.reset()
            self._transport.write(_json_response(200, {"ok": True}, request.keep_alive))
            return True
        kind = {"/v1/chat/completions": "openai", "/v1/messages": "anthropic"}.get(request.path)
        if kind is None or request.method != "POST":
            body = _error_body("openai", 404, f"no route {request.method} {request.path}")
            self._transport.write(_json_response(404, body, request.keep_alive))
            return True
        try:
            body = json.loads(request.body)
        except (json.JSONDecodeError, UnicodeDecodeError):
            body = None
        if not isinstance(body, dict):
            error = _error_body(kind, 400, "request body is not a JSON object")
            self._transport.write(_json_response(400, error, request.keep_alive))
            return True
        self._state.requests += 1
        if body.get("stream") or self._state.answers_later:
            return False
        self._transport.write(self._complete(kind, body, request.keep_alive))
        return True

    def _complete(self, kind: str, body: dict, keep_alive: bool) -> bytes:
        model = str(body.get("model", ""))
        chunks = self._state.config.chunks
        answer = _openai_body(model, chunks) if kind == "openai" else _anthropic_body(model, chunks)
        return _json_response(200, answer, keep_alive)

    async def _answer_later(self, request: _Request) -> None:
        state = self._state
        if state.capacity is None:
            await self._answer_after_latency(request)
            return
        async with state.capacity:
            await self._answer_after_latency(request)

    async def _answer_after_latency(self, request: _Request) -> None:
        fault = self._state.window_fault()
        if self._state.config.latency_s:
            await asyncio.sleep(self._state.config.latency_s)
        await self._reply(request, fault)

    async def _reply(self, request: _Request, fault: Fault | None) -> None:
        kind = "openai" if request.path == "/v1/chat/completions" else "anthropic"
        body = json.loads(request.body)
        fault = fault or self._state.draw(_last_user_text(body))
        keep_alive = request.keep_alive
        if fault is not None and fault.kind == "slow":
            await asyncio.sleep(fault.delay_s)
        if self._closed:
            return
        if fault is not None and fault.kind == "reset":
            self._reset()
            return
        if fault is not None and fault.kind in ("429", "500"):
            status = int(fault.kind)
            extra = {}
            if status == 429:
                ms = self._state.config.retry_after_ms
                # Half the 429s say retry-after-ms (OpenAI), half Retry-After in seconds.
                if self._state.faults["429"] % 2:
                    extra["retry-after-ms"] = str(ms)
                else:
                    extra["Retry-After"] = f"{ms / 1000:g}"
            error = _error_body(kind, status, f"injected fault {fault.kind}")
            self._transport.write(_json_response(status, error, keep_alive, extra))
        elif body.get("stream"):
            if not await self._stream(kind, body, keep_alive, fault):
                return
        else:
            raw = self._complete(kind, body, keep_alive)
            if fault is not None and fault.kind == "cut":
                self._transport.write(raw[: len(raw) // 2])
                self._reset()
                return
            self._transport.write(raw)
        self._busy = False
        if not keep_alive:
            self._transport.close()
            return
        self._serve()

    async def _stream(self, kind: str, body: dict, keep_alive: bool, fault: Fault | None) -> bool:
        """Write a stream; False if the connection was reset or went away."""
        model = str(body.get("model", ""))
        chunks = self._state.config.chunks
        interval = self._state.config.chunk_interval_s
        if kind == "openai":
            usage = bool((body.get("stream_options") or {}).get("include_usage"))
            events = _OpenAIStream(model, chunks, usage)
        else:
            events = _AnthropicStream(model, chunks)
        headers = {
            "Content-Type": "text/event-stream",
            "Cache-Control": "no-cache",
            "Transfer-Encoding": "chunked",
            "Connection": "keep-alive" if keep_alive else "close",
        }
        self._transport.write(_head(200, headers) + _chunk(events.head() + events.piece(0)))
        for i in range(1, chunks):
            if interval:
                await asyncio.sleep(interval)
            if self._closed:
                return False
            if fault is not None and fault.kind == "cut" and i == chunks // 2:
                self._reset()
                return False
            self._transport.write(_chunk(events.piece(i)))
        self._transport.write(_chunk(events.tail()) + b"0\r\n\r\n")
        return True

    def _reset(self) -> None:
        """Drop the connection with a TCP RST (SO_LINGER 0) instead of a clean FIN."""
        sock = self._transport.get_extra_info("socket")
        if sock is not None:
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
        self._transport.abort()
        self._closed = True


async def serve(config: FakeConfig, host: str = "127.0.0.1", port: int = 0) -> asyncio.Server:
    """Start the fake on the running loop.

    Args:
        config: What to answer and which faults to inject.
        host: Listen address.
        port: Listen port (0: a free one; read it from ``server.sockets[0]``).

    Raises:
        OSError: If the address cannot be bound.
    """
    state = FakeState(config)
    loop = asyncio.get_running_loop()
    return await loop.create_server(lambda: _Connection(state), host, port, backlog=4096)


async def _main(config: FakeConfig, host: str, port: int) -> None:
    server = await serve(config, host, port)
    bound = server.sockets[0].getsockname()
    sys.stdout.write(f"listening on {bound[0]}:{bound[1]}\n")
    sys.stdout.flush()
    async with server:
        await server.serve_forever()


def main(argv: list[str] | None = None) -> int:
    """Run the fake until interrupted.

    Args:
        argv: Command-line arguments (defaults to ``sys.argv[1:]``).

    Returns:
        The exit status (2 for bad options or an address that cannot be bound).
    """
    parser = argparse.ArgumentParser(prog="python -m benchmarks.fake_provider", description=__doc__)
    parser.add_argument("--host", default="127.0.0.1")
    parser.add_argument("--port", type=int, default=0)
    parser.add_argument("--chunks", type=int, default=20)
    parser.add_argument("--chunk-interval", type=float, default=0.0, help="seconds")
    parser.add_argument("--fault-rate", type=float, default=0.0)
    parser.add_argument("--faults", default=",".join(FAULT_KINDS))
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--slow", type=float, default=0.3, help="seconds (mean delay of slow)")
    parser.add_argument("--retry-after-ms", type=int, default=100)
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.WARNING, format="%(levelname)s %(name)s: %(message)s")
    try:
        config = FakeConfig(
            chunks=args.chunks,
            chunk_interval_s=args.chunk_interval,
            fault_rate=args.fault_rate,
            faults=tuple(k for k in args.faults.split(",") if k),
            seed=args.seed,
            slow_s=args.slow,
            retry_after_ms=args.retry_after_ms,
        )
    except ValueError as err:
        logger.error("%s", err)
        return 2
    try:
        asyncio.run(_main(config, args.host, args.port))
    except OSError as err:
        logger.error("cannot listen on %s:%d: %s", args.host, args.port, err)
        return 2
    except KeyboardInterrupt:
        return 0
    return 0


if __name__ == "__main__":
    sys.exit(main())
