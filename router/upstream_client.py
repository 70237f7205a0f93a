"""A lean HTTP/1.1 client for the providers' upstream calls.

Why not aiohttp's client: on the router's hot path (one JSON POST and its answer, or one
POST and its event stream) aiohttp's ClientSession adds 0.31-0.41 ms of Python per request
on loopback, while asyncio protocols over httptools' parser (llhttp, as Node uses) add
0.21 ms. This client does only what the providers need: POST, keep-alive connections pooled
per origin and bounded per provider, TLS with the system's certificates, chunked and
streamed answers with flow control, gzip, a connect timeout and a read timeout (the silence
between upstream bytes, not a whole long stream), and the proxy the environment names
(`proxy_for`). No cookies or redirects: the providers' APIs need none, and a cookie one
client's answer sets must never go out with another client's request. The media fetcher keeps
aiohttp (GET, redirects checked per hop).
"""

from __future__ import annotations

import asyncio
import base64
import collections
import ipaddress
import re
import socket
import ssl
import zlib
from collections.abc import AsyncIterator, Iterator, Mapping
from contextlib import asynccontextmanager
from functools import lru_cache
from typing import NamedTuple
from urllib.parse import quote, unquote, urlsplit
from urllib.request import getproxies_environment, proxy_bypass_environment

import aiohappyeyeballs
import httptools

from .config import is_loopback

USER_AGENT = "smolvlm-router"
# An idle connection is closed after this long (as aiohttp's client does): servers drop idle
# connections after 5-75 s, and a request sent into one that is closing is lost.
KEEPALIVE_S = 15.0
# A kept-alive connection lost this soon after a request, before any answer, was closing as
# the request went out (the server's close crossed it): about one round trip, far less than
# any model takes to answer.
RACE_WINDOW_S = 0.5
# A streamed answer the caller reads slower than the upstream sends stops being read from
# the socket past this many buffered bytes, so TCP pushes back on the upstream.
_HIGH_WATER = 256 * 1024
_LOW_WATER = 64 * 1024
# An answer's headers may take this many bytes (aiohttp's client allows 8 KiB per line).
_HEADER_LIMIT = 64 * 1024
# The most of one answer the router holds at once: a whole body, or a streamed event (or
# line) not yet complete. An upstream that sends without end, or a small compressed body that
# inflates to gigabytes, gets an error instead of the router's memory.
MAX_ANSWER_BYTES = 64 * 1024 * 1024
# A compressed body is inflated this much at a time, however much one chunk expands.
_INFLATE_PIECE = 256 * 1024
# A header name is an RFC 9110 token; a value may hold no line break or NUL.
_TOKEN = re.compile(r"[!#$%&'*+\-.^_`|~0-9A-Za-z]+")
_BREAKS_FRAMING = re.compile(r"[\r\n\0]")


class UpstreamConnectionError(Exception):
    """The connection could not be made, or broke or carried malformed HTTP before the
    answer was complete."""


class Origin(NamedTuple):
    """Where a URL's requests go: one pool of idle connections per origin."""

    secure: bool
    host: str
    port: int


class Target(NamedTuple):
    """A URL split once for every request to it."""

    origin: Origin
    path: str
    host_header: str


class Proxy(NamedTuple):
    """An HTTP proxy: where it listens, and its ``Proxy-Authorization`` value, if any."""

    host: str
    port: int
    authorization: str | None


def proxy_for(origin: Origin, proxies: Mapping[str, str]) -> Proxy | None:
    """The proxy an origin's requests go through: ``HTTPS_PROXY`` (``HTTP_PROXY`` for http
    URLs), else ``ALL_PROXY``, unless ``NO_PROXY`` names the host (urllib's reading: ``*``,
    names and domain suffixes). Loopback hosts never go through a proxy, which could not
    reach them.

    Args:
        origin: The origin.
        proxies: `urllib.request.getproxies_environment`'s mapping.

    Raises:
        UpstreamConnectionError: If the proxy is not an ``http://host[:port]`` one (the
            message leaves out any credentials).
    """
    url = proxies.get("https" if origin.secure else "http") or proxies.get("all")
    if not url or _is_loopback(origin.host) or proxy_bypass_environment(origin.host, proxies):
        return None
    parts = urlsplit(url if "://" in url else f"http://{url}")
    shown = parts._replace(netloc=parts.netloc.rpartition("@")[2]).geturl()
    try:
        port = parts.port or 80
    except ValueError:
        port = None
    if parts.scheme != "http" or not parts.hostname or port is None:
        raise UpstreamConnectionError(
            f"proxy {shown!r} from the environment: only http://host[:port] proxies work here"
        )
    authorization = None
    if parts.username is not None:
        credentials = f"{unquote(parts.username)}:{unquote(parts.password or '')}"
        authorization = "Basic " + base64.b64encode(credentials.encode()).decode()
    return Proxy(parts.hostname, port, authorization)


def _is_loopback(host: str) -> bool:
    """`is_loopback`, also for a name with its final dot, ``*.localhost`` and an IPv4
    loopback address written as IPv6 (``::ffff:127.0.0.1``)."""
    name = host.rstrip(".")
    if is_loopback(name) or name.endswith(".localhost"):
        return True
    try:
        mapped = ipaddress.IPv6Address(host).ipv4_mapped
    except ValueError:
        return False
    return mapped is not None and mapped.is_loopback


@lru_cache(maxsize=1024)
def split_url(url: str) -> Target:
    """Split an http(s) URL into its origin, request target and Host header.

    Args:
        url: The URL.

    Raises:
        UpstreamConnectionError: If it is not an http(s) URL with a host.
    """
    parts = urlsplit(url)
    if parts.scheme not in ("http", "https") or not parts.hostname:
        raise UpstreamConnectionError(f"not an http(s) URL: {url!r}")
    secure = parts.scheme == "https"
    try:
        port = parts.port or (443 if secure else 80)
    except ValueError as err:
        raise UpstreamConnectionError(f"bad port in {url!r}") from err
    # Quote what may not stand raw in a request line; what is quoted already stays as it is.
    path = quote(parts.path or "/", safe="/%:@!$&'()*+,;=-._~")
    if parts.query:
        path += "?" + quote(parts.query, safe="/%:@!$&'()*+,;=-._~?")
    host = parts.netloc.rpartition("@")[2]
    return Target(Origin(secure, parts.hostname, port), path, host)


def request_head(target: Target, headers: Mapping[str, str], body_length: int) -> bytes:
    """The request line and headers of a POST, ready to send.

    Later headers override earlier ones of the same name in any case; Host, Content-Length
    and Connection are the client's own.

    Args:
        target: The split URL.
        headers: The request's headers.
        body_length: The body's length in bytes.

    Raises:
        UpstreamConnectionError: If a header name or value would break the request's framing.
    """
    merged = {
        "user-agent": ("User-Agent", USER_AGENT),
        "accept-encoding": ("Accept-Encoding", "gzip"),
    }
    for name, value in headers.items():
        merged[name.lower()] = (name, value)
    for own in ("host", "content-length", "connection", "transfer-encoding"):
        merged.pop(own, None)
    lines = [f"POST {target.path} HTTP/1.1", f"Host: {target.host_header}"]
    for name, value in merged.values():
        if not _TOKEN.fullmatch(name) or _BREAKS_FRAMING.search(value):
            raise UpstreamConnectionError(f"header {name!r} holds a character HTTP forbids there")
        lines.append(f"{name}: {value}")
    lines.append(f"Content-Length: {body_length}\r\n\r\n")
    try:
        return "\r\n".join(lines).encode("latin-1")
    except UnicodeEncodeError as err:
        raise UpstreamConnectionError("a header holds a character HTTP cannot carry") from err


class _Connection(asyncio.Protocol):
    """One keep-alive connection and the answer it is receiving."""

    def __init__(self, loop: asyncio.AbstractEventLoop, read_timeout_s: float) -> None:
        self._loop = loop
        self._read_timeout_s = read_timeout_s
        self.transport: asyncio.Transport | None = None
        self.closed = False
        self.idle_since = 0.0
        self._reset()

    def _reset(self) -> None:
        self._parser = httptools.HttpResponseParser(self)
        self.reason = ""
        self.headers: dict[str, str] = {}
        self._head_bytes = 0
        self.idle = False
        self.headers_done = False
        self._interim = False
        self.keep_alive = False
        self.complete = False
        self.received_any = False
        self.error: Exception | None = None
        self._chunks: collections.deque[bytes] = collections.deque()
        self._buffered = 0
        self._paused = False
        self._waiter: asyncio.Future | None = None

    # asyncio.Protocol

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = transport  # type: ignore[assignment]

    def data_received(self, data: bytes) -> None:
        if self.idle:
            # Nothing may come between answers (a 408 before a close, a stray body).
            self.close()
            return
        self.received_any = True
        try:
            self._parser.feed_data(data)
        except (httptools.HttpParserError, httptools.HttpParserUpgrade) as err:
            self._fail(UpstreamConnectionError(f"upstream sent malformed HTTP: {err!r}"))
            self.close()
            return
        if not self.headers_done:
            # Counted as received: httptools buffers a header line whole before its callback.
            self._head_bytes += len(data)
            if self._head_bytes > _HEADER_LIMIT:
                self._fail(
                    UpstreamConnectionError(f"upstream sent over {_HEADER_LIMIT} bytes of headers")
                )
                self.close()

    def connection_lost(self, exc: Exception | None) -> None:
        self.closed = True
        if exc is None and self.headers_done and not self.complete and self._ends_at_close():
            self.complete = True
            self._wake()
        elif not self.complete:
            reason = f": {exc}" if exc else ""
            self._fail(UpstreamConnectionError(f"upstream closed the connection{reason}"))

    # httptools' callbacks

    def on_status(self, status: bytes) -> None:
        self.reason += status.decode("latin-1")  # in pieces when the line spans two reads

    def on_header(self, name: bytes, value: bytes) -> None:
        key = name.decode("latin-1").lower()
        text = value.decode("latin-1")
        self.headers[key] = f"{self.headers[key]}, {text}" if key in self.headers else text

    def on_headers_complete(self) -> None:
        if 100 <= self.status < 200:
            # An interim answer (100 Continue, 103 Early Hints): the real one follows.
            self.headers = {}
            self._interim = True
            return
        self.headers_done = True
        # Read now: llhttp forgets it once the message is complete.
        self.keep_alive = self._parser.should_keep_alive()
        self._wake()

    def on_body(self, body: bytes) -> None:
        self._chunks.append(body)
        self._buffered += len(body)
        if self._buffered > _HIGH_WATER and not self._paused and self.transport:
            self._paused = True
            self.transport.pause_reading()
        self._wake()

    def on_message_complete(self) -> None:
        if self._interim:
            self._interim = False
            return
        self.complete = True
        self._wake()

    # used by the pool and the response

    @property
    def status(self) -> int:
        return self._parser.get_status_code()

    def reusable(self) -> bool:
        """Whether the answer was read to its end on a connection the server keeps open."""
        return self.complete and self.keep_alive and not self.closed and not self._paused

    def send(self, data: bytes) -> None:
        self._reset()
        self.transport.write(data)

    def close(self) -> None:
        self.closed = True
        if self.transport is not None:
            self.transport.close()

    async def wait_headers(self) -> None:
        while not self.headers_done:
            await self._wait()

    async def next_chunk(self) -> bytes | None:
        """The next piece of the body as received, or None at its end."""
        while not self._chunks:
            if self.complete:
                return None
            await self._wait()
        chunk = self._chunks.popleft()
        self._buffered -= len(chunk)
        if self._paused and self._buffered < _LOW_WATER:
            self._paused = False
            self.transport.resume_reading()
        return chunk

    def _ends_at_close(self) -> bool:
        """An answer with neither a length nor chunked framing ends when the connection does."""
        framing = self.headers.get("transfer-encoding", "").lower()
        return "content-length" not in self.headers and "chunked" not in framing

    async def _wait(self) -> None:
        if self.error is not None:
            raise self.error
        waiter = self._waiter = self._loop.create_future()
        timer = self._loop.call_later(self._read_timeout_s, _time_out, waiter)
        try:
            await waiter
        finally:
            timer.cancel()
            self._waiter = None

    def _wake(self) -> None:
        if self._waiter is not None and not self._waiter.done():
            self._waiter.set_result(None)

    def _fail(self, error: Exception) -> None:
        if self.error is None:
            self.error = error
        if self._waiter is not None and not self._waiter.done():
            self._waiter.set_exception(error)


def _time_out(waiter: asyncio.Future) -> None:
    if not waiter.done():
        waiter.set_exception(asyncio.TimeoutError())


class UpstreamResponse:
    """An upstream answer: its status and headers at once, its body as read."""

    def __init__(self, connection: _Connection) -> None:
        self._connection = connection
        self.status = connection.status
        self.reason = connection.reason
        # Lower-case names; repeated headers joined with ", ".
        self.headers = connection.headers
        self._encoding = self.headers.get("content-encoding", "").strip().lower()
        # wbits 47 reads a gzip or a zlib header, whichever the server sent.
        compressed = self._encoding in ("gzip", "deflate")
        self._inflate = zlib.decompressobj(47) if compressed else None
        self._inflate_fed = False

    async def chunks(self) -> AsyncIterator[bytes]:
        """The body, piece by piece as it arrives (decompressed, in pieces of at most
        ``_INFLATE_PIECE`` bytes).

        Raises:
            UpstreamConnectionError: If the body is in an encoding the client did not ask for.
        """
        while (chunk := await self._connection.next_chunk()) is not None:
            if self._inflate is None:
                if self._encoding not in ("", "identity"):  # an empty body reads as one
                    raise UpstreamConnectionError(
                        f"upstream sent a body in {self._encoding!r} encoding; only gzip was "
                        "accepted"
                    )
                yield chunk
                continue
            for piece in self._inflated(chunk):
                yield piece
        if self._inflate is not None:
            if tail := self._inflate.flush():
                yield tail
            if self._inflate_fed and not self._inflate.eof:
                raise UpstreamConnectionError("upstream sent a truncated compressed body")

    async def read(self, limit: int | None = None) -> bytes:
        """The body (decompressed), or its first ``limit`` bytes.

        Args:
            limit: Stop once this many bytes are read (None: read to the end).

        Raises:
            UpstreamConnectionError: If the body is over `MAX_ANSWER_BYTES`.
        """
        body = bytearray()
        async for chunk in self.chunks():
            body += chunk
            if limit is not None and len(body) >= limit:
                return bytes(body[:limit])
            if len(body) > MAX_ANSWER_BYTES:
                raise answer_too_large()
        return bytes(body)

    def _inflated(self, chunk: bytes) -> Iterator[bytes]:
        self._inflate_fed = True
        while True:
            try:
                piece = self._inflate.decompress(chunk, _INFLATE_PIECE)
            except zlib.error as err:
                raise UpstreamConnectionError(
                    f"upstream sent a corrupt compressed body: {err}"
                ) from err
            if piece:
                yield piece
            if self._inflate.eof:
                # Past a gzip member's end: another may follow (RFC 1952), else garbage.
                chunk = self._inflate.unused_data
                if not chunk:
                    return
                self._inflate = zlib.decompressobj(47)
                continue
            chunk = self._inflate.unconsumed_tail
            # A full piece may leave output inside zlib even with no input left.
            if not chunk and len(piece) < _INFLATE_PIECE:
                return


def answer_too_large() -> UpstreamConnectionError:
    """The error for an answer, or one of its events, over `MAX_ANSWER_BYTES`."""
    return UpstreamConnectionError(f"upstream answer is over {MAX_ANSWER_BYTES >> 20} MiB")


async def _tunnel(
    loop: asyncio.AbstractEventLoop, sock: socket.socket, origin: Origin, proxy: Proxy
) -> None:
    """Ask the proxy on ``sock`` for a tunnel to ``origin`` (CONNECT); TLS runs inside it."""
    authority = (
        f"[{origin.host}]:{origin.port}" if ":" in origin.host else f"{origin.host}:{origin.port}"
    )
    lines = [f"CONNECT {authority} HTTP/1.1", f"Host: {authority}"]
    if proxy.authorization:
        lines.append(f"Proxy-Authorization: {proxy.authorization}")
    await loop.sock_sendall(sock, ("\r\n".join(lines) + "\r\n\r\n").encode("latin-1"))
    where = f"proxy {proxy.host}:{proxy.port}"
    head = b""
    while (end := head.find(b"\r\n\r\n")) == -1:
        if len(head) > _HEADER_LIMIT:
            raise UpstreamConnectionError(f"{where} sent over {_HEADER_LIMIT} bytes of headers")
        chunk = await loop.sock_recv(sock, 65536)
        if not chunk:
            raise UpstreamConnectionError(f"{where} closed the connection before a tunnel opened")
        head += chunk
    status = head[: head.find(b"\r\n")].decode("latin-1")
    code = status.split(" ", 2)[1] if status.startswith("HTTP/1.") and " " in status else ""
    if not (code.isdigit() and 200 <= int(code) < 300):
        raise UpstreamConnectionError(f"{where} refused a tunnel to {authority}: {status!r}")
    if end + 4 != len(head):  # the origin speaks first only after the TLS hello
        raise UpstreamConnectionError(f"{where} sent bytes after opening a tunnel to {authority}")


class UpstreamPool:
    """Keep-alive connections to the upstreams of one provider, at most ``max_connections``
    open or being opened at once (streams included; further requests wait for a slot).

    Args:
        max_connections: The bound on connections.
        connect_timeout_s: How long a new connection (TLS included) may take.
        read_timeout_s: The longest silence while waiting for the answer's next bytes.
    """

    def __init__(self, max_connections: int, connect_timeout_s: float, read_timeout_s: float):
        self.max_connections = max_connections
        self._connect_timeout_s = connect_timeout_s
        self._read_timeout_s = read_timeout_s
        self._slots = asyncio.Semaphore(max_connections)
        self._idle: dict[Origin, list[_Connection]] = {}
        self._tls: ssl.SSLContext | None = None
        self._closed = False
        self._sweep_timer: asyncio.TimerHandle | None = None
        # The proxy settings at start, and the proxy of each origin seen (None: direct).
        self._proxies = getproxies_environment()
        self._proxy_of: dict[Origin, Proxy | None] = {}

    def idle_connections(self) -> int:
        """Open connections waiting for a request."""
        return sum(not c.closed for pool in self._idle.values() for c in pool)

    @asynccontextmanager
    async def post(
        self, url: str, body: bytes, headers: Mapping[str, str]
    ) -> AsyncIterator[UpstreamResponse]:
        """POST ``body`` and yield the answer once its headers have arrived.

        The connection goes back to the pool if the body was read to its end; otherwise
        (an error, a stream the caller left) it is closed.

        Args:
            url: The http(s) URL.
            body: The request body.
            headers: The request's headers.

        Raises:
            UpstreamConnectionError: The connection failed or the answer was malformed.
            TimeoutError: The connection or the answer's next bytes took too long.
        """
        target = split_url(url)
        proxy = self._proxy(target.origin)
        if proxy is not None and not target.origin.secure:
            # An http request goes to the proxy with its whole URL (HTTPS ones tunnel).
            target = target._replace(path=f"http://{target.host_header}{target.path}")
            if proxy.authorization:
                headers = {**headers, "Proxy-Authorization": proxy.authorization}
        data = request_head(target, headers, len(body)) + body
        async with self._slots:
            connection = await self._send(target.origin, data)
            try:
                yield UpstreamResponse(connection)
            finally:
                self._release(target.origin, connection)

    async def close(self) -> None:
        """Close the idle connections; connections in use close when their answer ends."""
        self._closed = True
        if self._sweep_timer is not None:
            self._sweep_timer.cancel()
        for pool in self._idle.values():
            for connection in pool:
                connection.close()
        self._idle.clear()

    async def _send(self, origin: Origin, data: bytes) -> _Connection:
        """Send a request and wait for its answer's headers.

        A reused connection lost within `RACE_WINDOW_S` of the request, before any byte of an
        answer, was being closed by the server as the request went out (the keep-alive race):
        the request is sent once more, on a new connection. A later loss is not retried here,
        as the server may have acted on the request (the fallback loop decides what follows).
        """
        loop = asyncio.get_running_loop()
        while True:
            connection = self._reusable(origin)
            reused = connection is not None
            if connection is None:
                connection = await self._connect(origin)
            sent_at = loop.time()
            connection.send(data)
            try:
                await connection.wait_headers()
                return connection
            except UpstreamConnectionError:
                connection.close()
                crossed = loop.time() - sent_at < RACE_WINDOW_S and not connection.received_any
                if not (reused and crossed):
                    raise
            except BaseException:
                connection.close()
                raise

    def _reusable(self, origin: Origin) -> _Connection | None:
        pool = self._idle.get(origin)
        now = asyncio.get_running_loop().time()
        while pool:
            connection = pool.pop()  # the most recently used: the least likely to be stale
            if not connection.closed and now - connection.idle_since < KEEPALIVE_S:
                return connection
            connection.close()
        return None

    async def _connect(self, origin: Origin) -> _Connection:
        where = f"{origin.host}:{origin.port}"
        if (proxy := self._proxy(origin)) is not None:
            where += f" through proxy {proxy.host}:{proxy.port}"
        try:
            return await asyncio.wait_for(self._open(origin), self._connect_timeout_s)
        except asyncio.TimeoutError:  # an OSError too from Python 3.11: caught first
            raise asyncio.TimeoutError(
                f"connecting to {where} took over {self._connect_timeout_s} s"
            ) from None
        except OSError as err:
            raise UpstreamConnectionError(f"cannot connect to {where}: {err}") from err

    def _proxy(self, origin: Origin) -> Proxy | None:
        if not self._proxies:
            return None
        if origin not in self._proxy_of:
            self._proxy_of[origin] = proxy_for(origin, self._proxies)
        return self._proxy_of[origin]

    async def _open(self, origin: Origin) -> _Connection:
        """Resolve, connect with Happy Eyeballs (RFC 8305: a dual-stack host whose IPv6 path
        drops packets still answers over IPv4, as with aiohttp), then TLS; through the
        origin's proxy, if it has one (a CONNECT tunnel for https)."""
        loop = asyncio.get_running_loop()
        proxy = self._proxy(origin)
        host, port = (proxy.host, proxy.port) if proxy else (origin.host, origin.port)
        addresses = await loop.getaddrinfo(host, port, type=socket.SOCK_STREAM)
        sock = await aiohappyeyeballs.start_connection(addresses, happy_eyeballs_delay=0.25)
        tls = self._tls_context() if origin.secure else None
        try:
            if proxy is not None and origin.secure:
                await _tunnel(loop, sock, origin, proxy)
            _, connection = await loop.create_connection(
                lambda: _Connection(loop, self._read_timeout_s),
                sock=sock,
                ssl=tls,
                server_hostname=origin.host if tls else None,
            )
        except BaseException:
            sock.close()
            raise
        return connection

    def _release(self, origin: Origin, connection: _Connection) -> None:
        if connection.reusable() and not self._closed:
            loop = asyncio.get_running_loop()
            connection.idle_since = loop.time()
            connection.idle = True
            self._idle.setdefault(origin, []).append(connection)
            if self._sweep_timer is None:
                self._sweep_timer = loop.call_later(KEEPALIVE_S, self._sweep)
        else:
            connection.close()

    def _sweep(self) -> None:
        """Close the connections idle for KEEPALIVE_S; come back when the next one will be."""
        loop = asyncio.get_running_loop()
        now = loop.time()
        oldest = now
        for pool in self._idle.values():
            # Each list is in the order its connections went idle (reuse takes the newest).
            while pool and (pool[0].closed or now - pool[0].idle_since >= KEEPALIVE_S):
                pool.pop(0).close()
            if pool:
                oldest = min(oldest, pool[0].idle_since)
        has_idle = any(self._idle.values())
        self._sweep_timer = (
            loop.call_later(oldest + KEEPALIVE_S - now, self._sweep) if has_idle else None
        )

    def _tls_context(self) -> ssl.SSLContext:
        if self._tls is None:
            self._tls = ssl.create_default_context()
        return self._tls
