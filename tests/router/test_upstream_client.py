"""The providers' upstream HTTP client against raw TCP servers on loopback that answer each
request as a test scripts it: connection reuse and its bound, streamed and compressed
bodies, the keep-alive race, and every way an upstream can break an answer."""

from __future__ import annotations

import asyncio
import base64
import datetime
import gzip
import ipaddress
import socket
import ssl
import struct
import time
import zlib
from collections.abc import AsyncIterator, Awaitable, Callable

import pytest
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import NameOID

from router import upstream_client
from router.upstream_client import (
    Origin,
    Proxy,
    UpstreamConnectionError,
    UpstreamPool,
    UpstreamResponse,
    proxy_for,
    split_url,
)

Answer = Callable[[asyncio.StreamReader, asyncio.StreamWriter, int], Awaitable[None]]


class RawServer:
    """Counts connections and requests; ``answer(reader, writer, n)`` answers request ``n``
    after its head and body were read."""

    def __init__(self, answer: Answer) -> None:
        self.answer = answer
        self.connections = 0
        self.open_now = 0
        self.most_open = 0
        self.requests: list[bytes] = []
        self.url = ""

    async def handle(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        self.connections += 1
        self.open_now += 1
        self.most_open = max(self.most_open, self.open_now)
        try:
            while head := await reader.readuntil(b"\r\n\r\n"):
                length = int(
                    next(
                        line.split(b":")[1]
                        for line in head.split(b"\r\n")
                        if line.lower().startswith(b"content-length:")
                    )
                )
                self.requests.append(head + await reader.readexactly(length))
                await self.answer(reader, writer, len(self.requests))
                if writer.is_closing():
                    return
        except (asyncio.IncompleteReadError, ConnectionError):
            pass
        finally:
            self.open_now -= 1
            writer.close()


@pytest.fixture
async def listen() -> AsyncIterator[Callable[..., Awaitable[int]]]:
    """Starts asyncio servers on loopback (``listen(handle, **start_server_options)`` gives
    the port) and closes them after the test."""
    servers: list[asyncio.Server] = []

    async def start(handle: Callable, **options: object) -> int:
        server = await asyncio.start_server(handle, "127.0.0.1", 0, **options)
        servers.append(server)
        return server.sockets[0].getsockname()[1]

    yield start
    for server in servers:
        server.close()


@pytest.fixture
def serve(listen) -> Callable[[Answer], Awaitable[RawServer]]:
    async def start(answer: Answer) -> RawServer:
        raw = RawServer(answer)
        raw.url = f"http://127.0.0.1:{await listen(raw.handle)}/v1/chat/completions"
        return raw

    return start


@pytest.fixture
async def pool() -> AsyncIterator[UpstreamPool]:
    """One connection, 5 s to connect and 5 s of silence; closed after the test."""
    upstream = UpstreamPool(1, 5, 5)
    yield upstream
    await upstream.close()


def answer_json(body: bytes = b'{"ok":true}', extra: str = "") -> Answer:
    async def answer(reader, writer, n) -> None:
        writer.write(
            f"HTTP/1.1 200 OK\r\nContent-Type: application/json\r\n{extra}"
            f"Content-Length: {len(body)}\r\n\r\n".encode()
            + body
        )
        await writer.drain()

    return answer


async def post(pool: UpstreamPool, url: str, headers: dict | None = None) -> tuple[int, bytes]:
    async with pool.post(url, b'{"q":1}', headers or {"Content-Type": "application/json"}) as r:
        return r.status, await r.read()


async def test_sequential_requests_share_one_connection(serve):
    server = await serve(answer_json())
    pool = UpstreamPool(10, 5, 5)
    for _ in range(5):
        assert await post(pool, server.url) == (200, b'{"ok":true}')
    assert server.connections == 1
    assert pool.idle_connections() == 1
    head = server.requests[0].split(b"\r\n\r\n")[0].decode()
    assert head.startswith("POST /v1/chat/completions HTTP/1.1\r\n")
    assert f"Host: {server.url.split('/')[2]}" in head
    assert "Content-Length: 7" in head and "Accept-Encoding: gzip" in head
    await pool.close()
    assert pool.idle_connections() == 0


async def test_concurrent_requests_never_exceed_max_connections(serve):
    release = asyncio.Event()

    async def held(reader, writer, n) -> None:
        await release.wait()
        await answer_json()(reader, writer, n)

    server = await serve(held)
    pool = UpstreamPool(3, 5, 5)
    calls = [asyncio.ensure_future(post(pool, server.url)) for _ in range(10)]
    await asyncio.sleep(0.2)
    assert server.open_now == 3  # the other 7 wait for a slot, not for a connection
    release.set()
    assert [status for status, _ in await asyncio.gather(*calls)] == [200] * 10
    assert server.most_open == 3 and server.connections == 3
    await pool.close()


async def test_a_later_header_overrides_an_earlier_one_in_any_case(serve, pool):
    server = await serve(answer_json())
    headers = {"Content-Type": "text/plain", "content-type": "application/json", "Host": "x"}
    await post(pool, server.url, headers)
    head = server.requests[0].decode().lower()
    assert head.count("content-type:") == 1 and "content-type: application/json" in head
    assert head.count("host:") == 1 and "host: x" not in head


@pytest.mark.parametrize("value", ["a\r\nX-Injected: 1", "a\nb", "a\0b", "ключ"])
async def test_a_header_that_would_break_framing_is_refused_before_sending(serve, value, pool):
    server = await serve(answer_json())
    with pytest.raises(UpstreamConnectionError, match="header"):
        await post(pool, server.url, {"Authorization": value})
    assert server.connections == 0


async def test_a_chunked_stream_arrives_piece_by_piece(serve, pool):
    async def stream(reader, writer, n) -> None:
        writer.write(b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n")
        for piece in (b"data: 1\n\n", b"data: 2\n\n"):
            writer.write(f"{len(piece):x}\r\n".encode() + piece + b"\r\n")
            await writer.drain()
            await asyncio.sleep(0.05)
        writer.write(b"0\r\n\r\n")

    server = await serve(stream)
    arrivals = []
    async with pool.post(server.url, b"{}", {}) as resp:
        async for chunk in resp.chunks():
            arrivals.append((chunk, time.monotonic()))
    assert [chunk for chunk, _ in arrivals] == [b"data: 1\n\n", b"data: 2\n\n"]
    assert arrivals[1][1] - arrivals[0][1] > 0.03  # not buffered to the end
    assert pool.idle_connections() == 1


async def test_a_gzip_body_is_decompressed(serve, pool):
    payload = b'{"text":"' + b"x" * 10_000 + b'"}'
    server = await serve(answer_json(gzip.compress(payload), "Content-Encoding: gzip\r\n"))
    assert await post(pool, server.url) == (200, payload)


async def test_a_body_that_ends_with_the_connection_is_read_whole(serve, pool):
    async def until_close(reader, writer, n) -> None:
        writer.write(b"HTTP/1.1 200 OK\r\nConnection: close\r\n\r\n" + b"a" * 100_000)
        await writer.drain()
        writer.close()

    server = await serve(until_close)
    assert await post(pool, server.url) == (200, b"a" * 100_000)
    assert pool.idle_connections() == 0  # not reused


async def test_a_request_into_a_closing_kept_alive_connection_is_sent_again(serve, pool):
    async def close_the_second(reader, writer, n) -> None:
        if n == 2:
            writer.close()  # the keep-alive race: the server drops it as the request comes
        else:
            await answer_json()(reader, writer, n)

    server = await serve(close_the_second)
    assert (await post(pool, server.url))[0] == 200
    assert (await post(pool, server.url))[0] == 200
    assert server.connections == 2 and len(server.requests) == 3


async def test_a_new_connection_closed_without_an_answer_is_an_error(serve, pool):
    async def hang_up(reader, writer, n) -> None:
        writer.close()

    server = await serve(hang_up)
    with pytest.raises(UpstreamConnectionError, match="closed the connection"):
        await post(pool, server.url)
    assert len(server.requests) == 1  # never sent twice


async def test_a_truncated_body_is_an_error_and_the_connection_is_dropped(serve, pool):
    async def truncated(reader, writer, n) -> None:
        writer.write(b"HTTP/1.1 200 OK\r\nContent-Length: 100\r\n\r\n" + b"{" * 10)
        await writer.drain()
        writer.close()

    server = await serve(truncated)
    with pytest.raises(UpstreamConnectionError, match="closed the connection"):
        await post(pool, server.url)
    assert pool.idle_connections() == 0


async def test_malformed_http_is_an_error(serve, pool):
    async def garbage(reader, writer, n) -> None:
        writer.write(b"HTTP/1.1 OK OK\r\n\x00\x01\r\n\r\n")

    server = await serve(garbage)
    with pytest.raises(UpstreamConnectionError, match="malformed HTTP"):
        await post(pool, server.url)


async def test_silence_past_the_read_timeout_times_out_and_frees_the_slot(serve):
    async def silent(reader, writer, n) -> None:
        if n == 1:
            await asyncio.sleep(5)
        else:
            await answer_json()(reader, writer, n)

    server = await serve(silent)
    pool = UpstreamPool(1, 5, read_timeout_s=0.2)
    started = time.monotonic()
    with pytest.raises(asyncio.TimeoutError):
        await post(pool, server.url)
    assert 0.15 < time.monotonic() - started < 1
    assert (await post(pool, server.url))[0] == 200  # the one slot is free again
    await pool.close()


async def test_a_stream_left_midway_closes_its_connection_and_frees_the_slot(serve, pool):
    async def endless(reader, writer, n) -> None:
        if n > 1:
            return await answer_json()(reader, writer, n)
        writer.write(b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n")
        while not writer.is_closing():
            writer.write(b"5\r\nhello\r\n")
            await writer.drain()
            await asyncio.sleep(0.01)

    server = await serve(endless)

    async def read_a_little() -> None:
        async with pool.post(server.url, b"{}", {}) as resp:
            async for _ in resp.chunks():
                await asyncio.sleep(10)

    reader = asyncio.ensure_future(read_a_little())
    await asyncio.sleep(0.1)
    reader.cancel()
    await asyncio.gather(reader, return_exceptions=True)
    assert (await post(pool, server.url))[0] == 200
    assert server.connections == 2


async def test_a_refused_connection_is_an_error(pool):
    with pytest.raises(UpstreamConnectionError, match="cannot connect"):
        await post(pool, "http://127.0.0.1:1/v1/chat/completions")


def test_urls_are_split_and_quoted_once():
    target = split_url("https://api.example.com/v1beta/models/a b:generateContent?alt=sse")
    assert target.origin == (True, "api.example.com", 443)
    assert target.path == "/v1beta/models/a%20b:generateContent?alt=sse"
    assert split_url("http://[::1]:8080").path == "/"
    assert split_url("http://[::1]:8080").host_header == "[::1]:8080"
    for bad in ("ftp://x/", "http:///path", "http://x:99999/"):
        with pytest.raises(UpstreamConnectionError):
            split_url(bad)


async def test_an_answer_ending_after_the_pool_closed_closes_its_connection(serve):
    release = asyncio.Event()

    async def held(reader, writer, n) -> None:
        await release.wait()
        await answer_json()(reader, writer, n)

    server = await serve(held)
    pool = UpstreamPool(1, 5, 5)
    call = asyncio.ensure_future(post(pool, server.url))
    await asyncio.sleep(0.1)
    await pool.close()  # a config reload retires the provider mid-request
    release.set()
    assert (await call)[0] == 200
    assert pool.idle_connections() == 0
    await asyncio.sleep(0.05)
    assert server.open_now == 0


async def test_endless_headers_are_an_error(serve, pool):
    async def endless(reader, writer, n) -> None:
        writer.write(b"HTTP/1.1 200 OK\r\n")
        for i in range(10_000):
            writer.write(f"X-Filler-{i}: {'a' * 100}\r\n".encode())
            await writer.drain()

    server = await serve(endless)
    with pytest.raises(UpstreamConnectionError, match="bytes of headers"):
        await post(pool, server.url)


async def test_idle_connections_close_after_the_keepalive_time(serve, monkeypatch):
    monkeypatch.setattr(upstream_client, "KEEPALIVE_S", 0.2)
    server = await serve(answer_json())
    pool = UpstreamPool(5, 5, 5)
    await asyncio.gather(*(post(pool, server.url) for _ in range(3)))
    assert pool.idle_connections() == 3
    await asyncio.sleep(0.1)
    await post(pool, server.url)  # one of them is used again, so idle for longer
    await asyncio.sleep(0.15)
    assert pool.idle_connections() == 1
    await asyncio.sleep(0.15)
    assert pool.idle_connections() == 0
    await asyncio.sleep(0.05)
    assert server.open_now == 0
    await pool.close()


def self_signed(tmp_path, host: str = "127.0.0.1") -> tuple[ssl.SSLContext, str]:
    """A server TLS context for ``host`` (an address or a name) and the path of its
    certificate."""
    key = ec.generate_private_key(ec.SECP256R1())
    name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, host)])
    try:
        alt_name: x509.GeneralName = x509.IPAddress(ipaddress.ip_address(host))
    except ValueError:
        alt_name = x509.DNSName(host)
    now = datetime.datetime.now(datetime.timezone.utc)
    cert = (
        x509.CertificateBuilder()
        .subject_name(name)
        .issuer_name(name)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - datetime.timedelta(minutes=1))
        .not_valid_after(now + datetime.timedelta(hours=1))
        .add_extension(
            x509.SubjectAlternativeName([alt_name]),
            critical=False,
        )
        .add_extension(x509.BasicConstraints(ca=True, path_length=None), critical=True)
        .sign(key, hashes.SHA256())
    )
    cert_path, key_path = tmp_path / "cert.pem", tmp_path / "key.pem"
    cert_path.write_bytes(cert.public_bytes(serialization.Encoding.PEM))
    key_path.write_bytes(
        key.private_bytes(
            serialization.Encoding.PEM,
            serialization.PrivateFormat.PKCS8,
            serialization.NoEncryption(),
        )
    )
    context = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
    context.load_cert_chain(cert_path, key_path)
    return context, str(cert_path)


async def test_https_is_verified_against_the_system_certificates(tmp_path, monkeypatch):
    server_tls, cert_path = self_signed(tmp_path)
    raw = RawServer(answer_json())
    server = await asyncio.start_server(raw.handle, "127.0.0.1", 0, ssl=server_tls)
    url = f"https://127.0.0.1:{server.sockets[0].getsockname()[1]}/v1/chat/completions"
    try:
        untrusting = UpstreamPool(1, 5, 5)
        with pytest.raises(UpstreamConnectionError, match="CERTIFICATE_VERIFY_FAILED"):
            await post(untrusting, url)
        # SSL_CERT_FILE (OpenSSL's own variable) adds a CA, as for a company's TLS proxy.
        monkeypatch.setenv("SSL_CERT_FILE", cert_path)
        trusting = UpstreamPool(1, 5, 5)
        assert await post(trusting, url) == (200, b'{"ok":true}')
        assert await post(trusting, url) == (200, b'{"ok":true}')
        assert raw.connections == 1  # kept alive (the refused handshake never reached it)
        await trusting.close()
    finally:
        server.close()


async def test_interim_answers_are_skipped(serve, pool):
    async def hints_first(reader, writer, n) -> None:
        writer.write(b"HTTP/1.1 100 Continue\r\n\r\n")
        writer.write(b"HTTP/1.1 103 Early Hints\r\nLink: </a>; rel=preload\r\n\r\n")
        await answer_json()(reader, writer, n)

    server = await serve(hints_first)
    async with pool.post(server.url, b"{}", {}) as resp:
        assert resp.status == 200 and "link" not in resp.headers
        assert await resp.read() == b'{"ok":true}'
    assert await post(pool, server.url) == (200, b'{"ok":true}')
    assert server.connections == 1


async def test_a_request_lost_after_the_race_window_is_not_sent_again(serve, monkeypatch, pool):
    monkeypatch.setattr(upstream_client, "RACE_WINDOW_S", 0.1)

    async def crash_on_the_second(reader, writer, n) -> None:
        if n == 2:
            await asyncio.sleep(0.3)  # the server worked on it, then died without answering
            writer.close()
        else:
            await answer_json()(reader, writer, n)

    server = await serve(crash_on_the_second)
    assert (await post(pool, server.url))[0] == 200
    with pytest.raises(UpstreamConnectionError, match="closed the connection"):
        await post(pool, server.url)
    assert len(server.requests) == 2  # never sent twice


async def test_a_connect_that_outlasts_its_timeout_is_a_timeout():
    # A TCP server that never answers the TLS handshake.
    server = await asyncio.start_server(lambda r, w: asyncio.sleep(10), "127.0.0.1", 0)
    url = f"https://127.0.0.1:{server.sockets[0].getsockname()[1]}/v1/chat/completions"
    pool = UpstreamPool(1, connect_timeout_s=0.2, read_timeout_s=5)
    with pytest.raises(asyncio.TimeoutError, match="took over 0.2 s"):
        await post(pool, url)
    server.close()


async def test_bytes_on_an_idle_connection_close_it_and_leave_the_last_answer_alone(serve, pool):
    async def answer_then_408(reader, writer, n) -> None:
        await answer_json(extra="X-Ratelimit-Reset: 1s\r\n")(reader, writer, n)
        await asyncio.sleep(0.05)
        writer.write(b"HTTP/1.1 408 Request Timeout\r\nX-Ratelimit-Reset: 99s\r\n\r\n")

    server = await serve(answer_then_408)
    async with pool.post(server.url, b"{}", {}) as resp:
        headers = resp.headers
        await resp.read()
    await asyncio.sleep(0.1)
    assert headers["x-ratelimit-reset"] == "1s"
    assert pool.idle_connections() == 0
    assert (await post(pool, server.url))[0] == 200
    assert server.connections == 2


async def test_one_endless_header_line_is_cut_off(serve, pool):
    async def endless(reader, writer, n) -> None:
        writer.write(b"HTTP/1.1 200 OK\r\nX-Endless: ")
        for _ in range(1000):
            writer.write(b"a" * 1024)
            await writer.drain()

    server = await serve(endless)
    with pytest.raises(UpstreamConnectionError, match="bytes of headers"):
        await post(pool, server.url)


@pytest.mark.parametrize(
    "head",
    [
        b"HTTP/1.1 200 OK\r\nConnection: close\r\n\r\n",  # ends at close, but reset
        b"HTTP/1.1 200 OK\r\nTransfer-Encoding: Chunked\r\n\r\n5\r\nhello\r\n",
    ],
)
async def test_a_body_cut_by_a_reset_or_mid_chunk_is_an_error(serve, head, pool):
    async def cut(reader, writer, n) -> None:
        writer.write(head + (b'{"partial": "' if b"close" in head else b""))
        await writer.drain()
        await asyncio.sleep(0.05)
        sock = writer.get_extra_info("socket")
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
        writer.transport.abort()  # a reset, not a clean close

    server = await serve(cut)
    with pytest.raises(UpstreamConnectionError, match="closed the connection"):
        await post(pool, server.url)


async def test_a_big_answer_left_unread_does_not_stall_the_next_request(serve):
    big = b"x" * (300 * 1024)
    server = await serve(answer_json(big))
    pool = UpstreamPool(1, 5, read_timeout_s=1)
    async with pool.post(server.url, b"{}", {}) as resp:
        await asyncio.sleep(0.2)  # all of it arrives meanwhile, past the high-water mark
        assert len(await resp.read(1024)) == 1024
    assert await post(pool, server.url) == (200, big)
    await pool.close()


async def test_an_upgrade_or_a_truncated_gzip_body_is_an_error(serve, pool):
    async def upgrade(reader, writer, n) -> None:
        if n == 1:
            writer.write(b"HTTP/1.1 101 Switching Protocols\r\nUpgrade: h2c\r\n\r\n")
        else:
            body = gzip.compress(b'{"ok":true}')[:-6]
            await answer_json(body, "Content-Encoding: gzip\r\n")(reader, writer, n)

    server = await serve(upgrade)
    with pytest.raises(UpstreamConnectionError, match="malformed HTTP"):
        await post(pool, server.url)
    with pytest.raises(UpstreamConnectionError, match="truncated compressed body"):
        await post(pool, server.url)


async def test_a_compressed_body_that_inflates_past_the_bound_is_refused(serve, pool):
    # 65 KiB on the wire, 65 MiB inflated: a gzip bomb.
    bomb = gzip.compress(b"0" * (upstream_client.MAX_ANSWER_BYTES + 1024 * 1024), 9)
    server = await serve(answer_json(bomb, "Content-Encoding: gzip\r\n"))
    with pytest.raises(UpstreamConnectionError, match="answer is over 64 MiB"):
        await post(pool, server.url)


async def test_one_compressed_chunk_is_inflated_a_bounded_piece_at_a_time(serve, pool):
    payload = b"0" * (8 * 1024 * 1024)
    server = await serve(answer_json(gzip.compress(payload), "Content-Encoding: gzip\r\n"))
    async with pool.post(server.url, b"{}", {"Content-Type": "application/json"}) as resp:
        pieces = [len(piece) async for piece in resp.chunks()]
    assert sum(pieces) == len(payload)
    assert max(pieces) <= upstream_client._INFLATE_PIECE


# ---- proxies from the environment --------------------------------------------------------------


class ConnectProxy:
    """An HTTP proxy: CONNECT tunnels to the address ``routes`` gives each authority, and
    absolute-form requests answered as the origin would; ``refuse`` answers 407 instead."""

    def __init__(self, routes: dict[str, tuple[str, int]], refuse: bool = False) -> None:
        self.routes = routes
        self.refuse = refuse
        self.request_lines: list[str] = []
        self.authorizations: list[str | None] = []
        self.url = ""

    async def handle(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        head = (await reader.readuntil(b"\r\n\r\n")).decode("latin-1")
        line, *header_lines = head.split("\r\n")
        pairs = (h.split(": ", 1) for h in header_lines if h)
        headers = {name.lower(): value for name, value in pairs}
        self.request_lines.append(line)
        self.authorizations.append(headers.get("proxy-authorization"))
        if self.refuse:
            writer.write(b"HTTP/1.1 407 Proxy Authentication Required\r\nContent-Length: 0\r\n\r\n")
            writer.close()
            return
        method, target, _ = line.split(" ")
        if method != "CONNECT":
            await reader.readexactly(int(headers["content-length"]))
            await answer_json()(reader, writer, 1)
            writer.close()
            return
        up_reader, up_writer = await asyncio.open_connection(*self.routes[target])
        writer.write(b"HTTP/1.1 200 Connection established\r\n\r\n")

        async def pipe(source: asyncio.StreamReader, sink: asyncio.StreamWriter) -> None:
            while data := await source.read(65536):
                sink.write(data)
            sink.close()

        await asyncio.gather(pipe(reader, up_writer), pipe(up_reader, writer))


@pytest.fixture
def start_proxy(listen) -> Callable[..., Awaitable[ConnectProxy]]:
    async def start(routes: dict[str, tuple[str, int]], refuse: bool = False) -> ConnectProxy:
        proxy = ConnectProxy(routes, refuse)
        proxy.url = f"http://127.0.0.1:{await listen(proxy.handle)}"
        return proxy

    return start


async def test_https_goes_through_the_environments_proxy_in_a_tunnel(
    tmp_path, monkeypatch, listen, start_proxy
):
    # The origin's name is the proxy's to resolve: here it tunnels to a local TLS server.
    server_tls, cert_path = self_signed(tmp_path, "upstream.test")
    origin = RawServer(answer_json())
    routes = {"upstream.test:443": ("127.0.0.1", await listen(origin.handle, ssl=server_tls))}
    proxy = await start_proxy(routes)
    monkeypatch.setenv("SSL_CERT_FILE", cert_path)
    monkeypatch.setenv("HTTPS_PROXY", proxy.url.replace("http://", "http://me:p%40ss@"))
    pool = UpstreamPool(1, 5, 5)
    try:
        url = "https://upstream.test/v1/chat/completions"
        assert await post(pool, url) == (200, b'{"ok":true}')
        assert await post(pool, url) == (200, b'{"ok":true}')
    finally:
        await pool.close()
    assert proxy.request_lines == ["CONNECT upstream.test:443 HTTP/1.1"]  # one kept-alive tunnel
    assert proxy.authorizations == ["Basic " + base64.b64encode(b"me:p@ss").decode()]
    assert origin.requests[0].startswith(b"POST /v1/chat/completions HTTP/1.1\r\n")
    assert b"Host: upstream.test\r\n" in origin.requests[0]
    assert b"roxy-" not in origin.requests[0]  # the proxy's credentials stay with the proxy


async def test_http_goes_to_the_proxy_with_its_whole_url(monkeypatch, start_proxy):
    proxy = await start_proxy({})
    monkeypatch.setenv("HTTP_PROXY", proxy.url.replace("http://", "http://me:pw@"))
    pool = UpstreamPool(1, 5, 5)
    try:
        assert await post(pool, "http://upstream.test:8080/v1/x") == (200, b'{"ok":true}')
    finally:
        await pool.close()
    assert proxy.request_lines == ["POST http://upstream.test:8080/v1/x HTTP/1.1"]
    assert proxy.authorizations == ["Basic " + base64.b64encode(b"me:pw").decode()]


async def test_a_proxy_that_refuses_the_tunnel_is_an_error(monkeypatch, start_proxy):
    proxy = await start_proxy({}, refuse=True)
    monkeypatch.setenv("HTTPS_PROXY", proxy.url)
    pool = UpstreamPool(1, 5, 5)
    refusal = "refused a tunnel to upstream.test:443: 'HTTP/1.1 407 Proxy Authentication"
    with pytest.raises(UpstreamConnectionError, match=refusal):
        await post(pool, "https://upstream.test/v1/chat/completions")
    await pool.close()


async def test_an_unreachable_proxy_is_named_in_the_error(monkeypatch):
    monkeypatch.setenv("HTTPS_PROXY", "http://127.0.0.1:1")
    pool = UpstreamPool(1, 5, 5)
    unreachable = "cannot connect to upstream.test:443 through proxy 127.0.0.1:1"
    with pytest.raises(UpstreamConnectionError, match=unreachable):
        await post(pool, "https://upstream.test/v1/chat/completions")
    await pool.close()


async def test_loopback_and_no_proxy_hosts_go_direct(serve, monkeypatch, start_proxy):
    proxy = await start_proxy({})
    for name in ("HTTP_PROXY", "HTTPS_PROXY"):
        monkeypatch.setenv(name, proxy.url)
    server = await serve(answer_json())
    pool = UpstreamPool(1, 5, 5)
    assert await post(pool, server.url) == (200, b'{"ok":true}')  # 127.0.0.1
    await pool.close()
    assert proxy.request_lines == []


@pytest.mark.parametrize(
    ("secure", "host", "proxies", "expected"),
    [
        (True, "api.example.com", {"https": "http://p:3128"}, Proxy("p", 3128, None)),
        (True, "api.example.com", {"http": "http://p:3128"}, None),  # http's only
        (False, "api.example.com", {"all": "p:8080"}, Proxy("p", 8080, None)),  # no scheme
        (True, "api.example.com", {"https": "http://p", "no": "example.com"}, None),
        (True, "api.example.com", {"https": "http://p", "no": "*"}, None),
        (True, "localhost", {"https": "http://p"}, None),
        (True, "::1", {"https": "http://p"}, None),
        (True, "127.0.0.2", {"https": "http://p"}, None),
        (True, "::ffff:127.0.0.1", {"https": "http://p"}, None),
        (True, "localhost.", {"https": "http://p"}, None),
    ],
)
def test_which_proxy_an_origin_uses(secure, host, proxies, expected):
    assert proxy_for(Origin(secure, host, 443), proxies) == expected


@pytest.mark.parametrize(
    ("url", "shown"),
    [
        ("socks5://me:secret@p:1080", "socks5://p:1080"),
        ("https://p:3128", "https://p:3128"),
        ("http://me:secret@p:99999", "http://p:99999"),
    ],
)
def test_a_proxy_this_client_cannot_use_is_a_clear_error_without_its_password(url, shown):
    with pytest.raises(UpstreamConnectionError) as caught:
        proxy_for(Origin(True, "api.example.com", 443), {"https": url})
    message = str(caught.value)
    assert f"proxy {shown!r} from the environment" in message and "secret" not in message


async def test_a_body_in_an_encoding_not_asked_for_is_an_error(serve, pool):
    server = await serve(answer_json(b"\x1b\x00\x00", "Content-Encoding: br\r\n"))
    with pytest.raises(UpstreamConnectionError, match="in 'br' encoding; only gzip"):
        await post(pool, server.url)


async def test_a_body_of_several_gzip_members_is_inflated_whole(serve, pool):
    # The first member inflates past one piece inside a single chunk, the second follows it.
    body = gzip.compress(b"x" * 300_000) + gzip.compress(b"y")
    server = await serve(answer_json(body, "Content-Encoding: gzip\r\n"))
    assert await asyncio.wait_for(post(pool, server.url), 10) == (200, b"x" * 300_000 + b"y")


class ChunkFeed:
    """A connection stub whose gzip answer comes in ``chunks``; ``asked`` counts the chunks
    asked for so far."""

    status, reason = 200, "OK"

    def __init__(self, chunks: list[bytes]) -> None:
        self.headers = {"content-encoding": "gzip"}
        self.chunks = chunks
        self.asked = 0

    async def next_chunk(self) -> bytes | None:
        self.asked += 1
        return self.chunks.pop(0) if self.chunks else None


async def test_all_a_compressed_chunk_holds_comes_out_before_the_next_chunk_is_read():
    raw = b"".join(b'data: {"n": %d, "t": "%s"}\n\n' % (i, b"ab" * (i % 50)) for i in range(20000))
    body = gzip.compress(raw)

    def ready(cut: int) -> int:
        """What zlib can give of the first ``cut`` bytes."""
        return len(zlib.decompressobj(47).decompress(body[:cut]))

    # The first cut whose output fills a piece: around it zlib may hold output back.
    low, high = 1, len(body)
    while low < high:
        middle = (low + high) // 2
        low, high = (
            (low, middle) if ready(middle) >= upstream_client._INFLATE_PIECE else (middle + 1, high)
        )
    for cut in range(low - 5, low + 40):
        feed = ChunkFeed([body[:cut], body[cut:]])
        first, rest = [], []
        async for piece in UpstreamResponse(feed).chunks():  # type: ignore[arg-type]
            (first if feed.asked == 1 else rest).append(piece)
        assert sum(map(len, first)) == ready(cut), cut
        assert b"".join(first + rest) == raw


async def test_an_empty_body_in_an_encoding_not_asked_for_reads_as_empty(serve, pool):
    server = await serve(answer_json(b"", "Content-Encoding: br\r\n"))
    assert await post(pool, server.url) == (200, b"")
