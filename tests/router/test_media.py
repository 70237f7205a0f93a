"""Media URL fetching in front of hostile clients, on loopback: only permitted addresses
(checked on every hop's resolved address, DNS answers pinned), per-request limits, its own
connection pool, and errors that reveal nothing of the router's network."""

from __future__ import annotations

import asyncio
import ipaddress
import socket
import time

import pytest
from aiohttp import web
from aiohttp.abc import AbstractResolver, ResolveResult

from benchmarks.gateways import free_port
from router import ir
from router.backends import MEDIA, PROVIDERS
from router.config import Config, ConfigError, MediaConfig
from router.errors import InvalidRequestError
from router.images import (
    MediaFetcher,
    MediaNotAllowed,
    address_allowed,
    check_url,
    is_public_address,
)
from tests.router.helpers import OPENAI_BODY, PNG_BYTES, make_config

# ---- the address policy ------------------------------------------------------------------------

NOT_PUBLIC = [
    "127.0.0.1",  # loopback
    "127.255.255.254",
    "10.1.2.3",  # private
    "172.16.0.1",
    "192.168.1.1",
    "169.254.169.254",  # link-local (cloud metadata)
    "100.64.0.1",  # shared address space (CGNAT)
    "224.0.0.1",  # multicast
    "240.0.0.1",  # reserved
    "255.255.255.255",
    "0.0.0.0",  # unspecified
    "192.0.2.1",  # documentation
    "::1",
    "::",
    "fe80::1",
    "fc00::1",
    "ff02::1",
    "fec0::1",  # site-local
    "::ffff:127.0.0.1",  # IPv4-mapped
    "::ffff:10.0.0.1",
    "::ffff:169.254.169.254",
    "::127.0.0.1",  # IPv4-compatible
    "64:ff9b::7f00:1",  # NAT64 of 127.0.0.1
    "64:ff9b::a00:1",  # NAT64 of 10.0.0.1
    "64:ff9b:1::808:808",  # local-use NAT64
    "2002:7f00:1::",  # 6to4 of 127.0.0.1
    "2001:db8::1",  # documentation
]
PUBLIC = ["8.8.8.8", "93.184.216.34", "2606:4700:4700::1111", "::ffff:8.8.8.8", "64:ff9b::808:808"]


@pytest.mark.parametrize("address", NOT_PUBLIC)
def test_non_public_addresses_are_refused_in_every_form(address):
    assert not is_public_address(ipaddress.ip_address(address))
    assert not address_allowed(ipaddress.ip_address(address), MediaConfig())


@pytest.mark.parametrize("address", PUBLIC)
def test_public_addresses_are_allowed(address):
    assert is_public_address(ipaddress.ip_address(address))


def test_allow_and_deny_lists():
    media = MediaConfig(allow=["127.0.0.1/32", "images.corp", "*.cdn.corp"], deny=["8.8.0.0/16"])
    assert address_allowed(ipaddress.ip_address("127.0.0.1"), media)
    assert address_allowed(ipaddress.ip_address("::ffff:127.0.0.1"), media)
    assert not address_allowed(ipaddress.ip_address("127.0.0.2"), media)
    assert not address_allowed(ipaddress.ip_address("8.8.8.8"), media)  # denied beats public
    assert address_allowed(ipaddress.ip_address("10.0.0.1"), media, allowed_host=True)
    assert media.allow_hosts == ["images.corp", "*.cdn.corp"]
    # Only the allow-list: public addresses are refused too.
    only = MediaConfig(allow_public=False, allow=["127.0.0.1/32"])
    assert not address_allowed(ipaddress.ip_address("93.184.216.34"), only)
    # The deny-list wins over the allow-list.
    both = MediaConfig(allow=["127.0.0.0/8"], deny=["127.0.0.2/32"])
    assert not address_allowed(ipaddress.ip_address("127.0.0.2"), both)


@pytest.mark.parametrize(
    "url",
    [
        "http://127.0.0.1/x.png",
        "http://[::1]/x.png",
        "http://[::ffff:127.0.0.1]/x.png",
        "http://[::ffff:7f00:1]/x.png",
        "http://[64:ff9b::7f00:1]/x.png",
        "http://169.254.169.254/latest/meta-data/",
        "http://2130706433/x.png",  # 127.0.0.1 as one number
        "http://127.1/x.png",
        "http://0177.0.0.1/x.png",
        "ftp://example.com/x.png",
        "http://blocked.example/x.png",
        "http://a.blocked.example/x.png",
    ],
)
def test_literal_and_denied_hosts_are_refused_before_connecting(url):
    from yarl import URL

    media = MediaConfig(deny=["blocked.example", "*.blocked.example"])
    with pytest.raises(MediaNotAllowed):
        check_url(URL(url), media)


def test_media_config_is_validated():
    cfg = Config.from_dict(
        {
            "providers": {"p": {"type": "openai", "keys": ["k"], "max_connections": 5}},
            "models": {"m": [{"provider": "p", "model": "x"}]},
            "media": {"allow": ["10.0.0.0/8", "Images.Example.com."], "max_urls": 2},
        }
    )
    assert cfg.media.allow_hosts == ["images.example.com"] and cfg.media.max_urls == 2
    assert cfg.providers["p"].max_connections == 5
    for bad, where in [
        ({"media": {"allow": ["not a host!"]}}, "media.allow[0]"),
        ({"media": {"deny": [5]}}, "media.deny[0]"),
        ({"media": {"max_urls": 0}}, "media.max_urls"),
        ({"media": {"max_redirects": -1}}, "media.max_redirects"),
        ({"media": {"colour": 1}}, "media"),
    ]:
        with pytest.raises(ConfigError, match=where.replace("[", r"\[").replace("]", r"\]")):
            Config.from_dict(
                {
                    "providers": {"p": {"type": "openai", "keys": ["k"]}},
                    "models": {"m": [{"provider": "p", "model": "x"}]},
                    **bad,
                }
            )
    with pytest.raises(ConfigError, match="providers.p.max_connections"):
        Config.from_dict(
            {
                "providers": {"p": {"type": "openai", "keys": ["k"], "max_connections": 0}},
                "models": {"m": [{"provider": "p", "model": "x"}]},
            }
        )


# ---- fixtures: an image server on two loopback addresses, a scripted resolver ------------------


class Images:
    """An image server on 127.0.0.1 and 127.0.0.2 (same port); every hit is recorded with the
    local address it reached."""

    def __init__(self) -> None:
        self.port = free_port()
        self.hits: list[tuple[str, str]] = []  # (local address, path)
        self.in_flight = 0
        self.most_in_flight = 0
        app = web.Application()
        app.router.add_get("/image.png", self.image)
        app.router.add_get("/slow.png", self.slow)
        app.router.add_get("/big", self.big)
        app.router.add_get("/chunked", self.chunked)
        app.router.add_get("/redirect", self.redirect)
        app.router.add_get("/hop/{n}", self.hop)
        app.router.add_get("/secret", self.secret)
        self.runner = web.AppRunner(app)

    async def start(self) -> None:
        await self.runner.setup()
        for host in ("127.0.0.1", "127.0.0.2"):
            await web.TCPSite(self.runner, host, self.port).start()

    def url(self, path: str, host: str = "127.0.0.1") -> str:
        return f"http://{host}:{self.port}{path}"

    def seen(self, request: web.Request) -> None:
        self.hits.append((request.transport.get_extra_info("sockname")[0], request.path))

    def hits_at(self, address: str) -> list[str]:
        return [path for host, path in self.hits if host == address]

    async def image(self, request: web.Request) -> web.Response:
        self.seen(request)
        return web.Response(body=PNG_BYTES, content_type="image/png")

    async def slow(self, request: web.Request) -> web.Response:
        self.seen(request)
        self.in_flight += 1
        self.most_in_flight = max(self.most_in_flight, self.in_flight)
        try:
            await asyncio.sleep(float(request.query.get("s", "0.2")))
        finally:
            self.in_flight -= 1
        return web.Response(body=PNG_BYTES, content_type="image/png")

    async def big(self, request: web.Request) -> web.Response:
        self.seen(request)
        return web.Response(body=b"x" * int(request.query["n"]), content_type="image/png")

    async def chunked(self, request: web.Request) -> web.StreamResponse:
        self.seen(request)
        response = web.StreamResponse(headers={"Content-Type": "image/png"})
        response.enable_chunked_encoding()
        await response.prepare(request)
        for _ in range(int(request.query["n"]) // 1000):
            await response.write(b"x" * 1000)
        await response.write_eof()
        return response

    async def redirect(self, request: web.Request) -> web.Response:
        self.seen(request)
        raise web.HTTPFound(request.query["to"])

    async def hop(self, request: web.Request) -> web.Response:
        self.seen(request)
        n = int(request.match_info["n"])
        raise web.HTTPFound(f"/hop/{n - 1}" if n > 1 else "/image.png")

    async def secret(self, request: web.Request) -> web.Response:
        self.seen(request)
        return web.Response(body=b"secret", content_type="image/png")


@pytest.fixture
async def images():
    server = Images()
    await server.start()
    yield server
    await server.runner.cleanup()


class ScriptedResolver(AbstractResolver):
    """Answers each host name with the next address of its script (the last one repeats)."""

    def __init__(self, script: dict[str, list[str]]) -> None:
        self.script = script
        self.calls: list[str] = []

    async def resolve(
        self, host: str, port: int = 0, family: socket.AddressFamily = socket.AF_INET
    ) -> list[ResolveResult]:
        self.calls.append(host)
        if host not in self.script:
            raise OSError(socket.EAI_NONAME, "Name or service not known")
        answers = self.script[host]
        address = answers.pop(0) if len(answers) > 1 else answers[0]
        family = socket.AF_INET6 if ":" in address else socket.AF_INET
        return [
            {
                "hostname": host,
                "host": address,
                "port": port,
                "family": family,
                "proto": 0,
                "flags": 0,
            }
        ]

    async def close(self) -> None:
        pass


def fetcher_for(
    media: MediaConfig, resolver: AbstractResolver | None = None, **limits
) -> MediaFetcher:
    cfg = make_config("http://127.0.0.1:9", image_timeout_s=2.0, **limits)
    cfg.media = media
    return MediaFetcher(cfg, resolver)


def parts(*urls: str) -> list[ir.MediaPart]:
    return [ir.MediaPart(media_type="image/*", url=url) for url in urls]


async def fetch_error(fetcher: MediaFetcher, *urls: str) -> str:
    with pytest.raises(InvalidRequestError) as info:
        await fetcher.fetch(parts(*urls))
    assert info.value.status == 400
    return info.value.message


TEST_ALLOW = MediaConfig(allow=["127.0.0.1/32"])


# ---- host names, rebinding, redirects ----------------------------------------------------------


async def test_a_host_name_resolving_to_loopback_is_not_fetched(images):
    resolver = ScriptedResolver({"images.example": ["127.0.0.1"], "v6.example": ["::1"]})
    fetcher = fetcher_for(MediaConfig(), resolver)
    try:
        for host in ("images.example", "v6.example"):
            url = f"http://{host}:{images.port}/secret"
            assert await fetch_error(fetcher, url) == f"image URL not allowed: {url}"
    finally:
        await fetcher.close()
    assert images.hits == []


async def test_an_allowed_host_name_is_fetched(images):
    resolver = ScriptedResolver({"images.example": ["127.0.0.2"]})
    fetcher = fetcher_for(MediaConfig(allow=["images.example"]), resolver)
    try:
        [(data, media_type)] = await fetcher.fetch(
            parts(f"http://images.example:{images.port}/image.png")
        )
    finally:
        await fetcher.close()
    assert data == PNG_BYTES and media_type == "image/png"
    assert images.hits == [("127.0.0.2", "/image.png")]


async def test_dns_rebinding_cannot_switch_the_checked_address(images):
    """The name answers 127.0.0.1 (allowed) once, then 127.0.0.2 (not): a fetcher that
    resolved again to connect would reach 127.0.0.2; this one connects to what it checked."""
    resolver = ScriptedResolver({"rebind.example": ["127.0.0.1", "127.0.0.2"]})
    fetcher = fetcher_for(TEST_ALLOW, resolver)
    url = f"http://rebind.example:{images.port}/image.png"
    try:
        [(data, _)] = await fetcher.fetch(parts(url))
        assert data == PNG_BYTES and resolver.calls == ["rebind.example"]
        # The next connection resolves again, to the forbidden address: refused.
        assert await fetch_error(fetcher, url) == f"image URL not allowed: {url}"
    finally:
        await fetcher.close()
    assert images.hits == [("127.0.0.1", "/image.png")]


@pytest.mark.parametrize(
    "target",
    [
        "http://127.0.0.2:{port}/secret",
        "http://[::1]:{port}/secret",
        "http://[::ffff:127.0.0.2]:{port}/secret",
        "http://internal.example:{port}/secret",
        "file:///etc/passwd",
    ],
)
async def test_a_redirect_to_an_internal_host_is_refused(images, target):
    resolver = ScriptedResolver({"internal.example": ["127.0.0.2"]})
    fetcher = fetcher_for(TEST_ALLOW, resolver)
    url = images.url("/redirect") + "?to=" + target.format(port=images.port)
    try:
        message = await fetch_error(fetcher, url)
    finally:
        await fetcher.close()
    assert message.startswith("image URL not allowed: ")
    assert images.hits_at("127.0.0.2") == [] and "/secret" not in [p for _, p in images.hits]


async def test_redirects_are_followed_up_to_the_limit(images):
    fetcher = fetcher_for(MediaConfig(allow=["127.0.0.1/32"], max_redirects=3))
    try:
        [(data, _)] = await fetcher.fetch(parts(images.url("/hop/3")))
        assert data == PNG_BYTES
        url = images.url("/hop/4")
        assert await fetch_error(fetcher, url) == (
            f"image URL could not be fetched: {url} (too many redirects)"
        )
    finally:
        await fetcher.close()


async def test_refused_and_unresolvable_hosts_read_the_same(images):
    """No connect details reach the client: a closed port, a name that does not resolve and
    a host that does not answer HTTP all give one message shape, quickly."""
    closed = f"http://127.0.0.1:{free_port()}/x.png"
    unknown = f"http://nowhere.example:{images.port}/x.png"
    media = MediaConfig(allow=["127.0.0.1/32", "nowhere.example"])
    fetcher = fetcher_for(media, ScriptedResolver({}))
    try:
        started = time.monotonic()
        messages = {url: await fetch_error(fetcher, url) for url in (closed, unknown)}
        elapsed = time.monotonic() - started
    finally:
        await fetcher.close()
    for url, message in messages.items():
        assert message == f"image URL could not be fetched: {url}"
    assert elapsed < 1.5, elapsed


# ---- per-request limits ------------------------------------------------------------------------


async def test_too_many_urls_are_refused_before_any_fetch(images):
    fetcher = fetcher_for(MediaConfig(allow=["127.0.0.1/32"], max_urls=3))
    try:
        message = await fetch_error(fetcher, *[images.url("/image.png")] * 4)
    finally:
        await fetcher.close()
    assert "4 image URLs" in message and "at most 3" in message
    assert images.hits == []


@pytest.mark.parametrize("path", ["/big", "/chunked"])
async def test_total_bytes_are_bounded_per_request(images, path):
    media = MediaConfig(allow=["127.0.0.1/32"], max_total_bytes=100_000)
    fetcher = fetcher_for(media, image_max_bytes=80_000)
    try:
        [(one, _)] = await fetcher.fetch(parts(images.url(f"{path}?n=60000")))
        assert len(one) == 60_000
        message = await fetch_error(fetcher, *[images.url(f"{path}?n=60000")] * 2)
        assert "total more than 100000 bytes" in message
        message = await fetch_error(fetcher, images.url(f"{path}?n=90000"))
        assert "larger than the 80000 byte limit" in message
    finally:
        await fetcher.close()


async def test_fetches_run_with_bounded_concurrency(images):
    fetcher = fetcher_for(MediaConfig(allow=["127.0.0.1/32"], max_concurrency=2))
    try:
        got = await fetcher.fetch(parts(*[images.url(f"/slow.png?s=0.1&i={i}") for i in range(6)]))
    finally:
        await fetcher.close()
    assert [data for data, _ in got] == [PNG_BYTES] * 6
    assert images.most_in_flight == 2


# ---- through the router, in every client format ------------------------------------------------


def requests_for(url: str) -> dict[str, tuple[str, dict]]:
    return {
        "openai": (
            "/v1/chat/completions",
            {
                "model": "gemini",
                "messages": [
                    {
                        "role": "user",
                        "content": [
                            {"type": "text", "text": "what is this"},
                            {"type": "image_url", "image_url": {"url": url}},
                        ],
                    }
                ],
            },
        ),
        "responses": (
            "/v1/responses",
            {
                "model": "gemini",
                "input": [
                    {
                        "role": "user",
                        "content": [
                            {"type": "input_text", "text": "what is this"},
                            {"type": "input_image", "image_url": url},
                        ],
                    }
                ],
            },
        ),
        "anthropic": (
            "/v1/messages",
            {
                "model": "gemini",
                "max_tokens": 10,
                "messages": [
                    {
                        "role": "user",
                        "content": [
                            {"type": "text", "text": "what is this"},
                            {"type": "image", "source": {"type": "url", "url": url}},
                        ],
                    }
                ],
            },
        ),
        "gemini": (
            "/v1beta/models/gemini:generateContent",
            {
                "contents": [
                    {
                        "role": "user",
                        "parts": [
                            {"text": "what is this"},
                            {"fileData": {"fileUri": url, "mimeType": "image/png"}},
                        ],
                    }
                ]
            },
        ),
    }


def error_message(form: str, body: dict) -> str:
    """The message of a 400 in the client format's own shape."""
    if form == "anthropic":
        assert body["type"] == "error" and body["error"]["type"] == "invalid_request_error", body
    elif form == "gemini":
        assert body["error"]["status"] == "INVALID_ARGUMENT", body
    else:
        assert body["error"]["type"] == "invalid_request_error", body
    return body["error"]["message"]


@pytest.fixture
def default_policy(fake) -> Config:
    """The router at the fake, with the default media policy (public addresses only)."""
    cfg = make_config(fake.base_url)
    cfg.media = MediaConfig()
    return cfg


@pytest.mark.parametrize("form", ["openai", "responses", "anthropic", "gemini"])
@pytest.mark.parametrize(
    "url",
    [
        "http://127.0.0.1:{port}/secret",
        "http://localhost:{port}/secret",
        "http://[::ffff:127.0.0.1]:{port}/secret",
        "http://2130706433:{port}/secret",
        "http://0x7f.0.0.1:{port}/secret",
    ],
)
async def test_the_router_refuses_internal_urls_in_the_client_format(
    router_client, default_policy, fake, images, form, url
):
    url = url.format(port=images.port)
    client = await router_client(default_policy)
    path, body = requests_for(url)[form]
    resp = await client.post(path, json=body)
    assert resp.status == 400
    message = error_message(form, await resp.json())
    assert message == f"image URL not allowed: {url}"
    assert images.hits == [] and not fake.seen


async def test_the_router_does_not_fetch_its_own_metrics(router_client, default_policy, fake):
    client = await router_client(default_policy)
    url = str(client.make_url("/metrics"))
    path, body = requests_for(url)["openai"]
    resp = await client.post(path, json=body)
    assert resp.status == 400
    assert error_message("openai", await resp.json()) == f"image URL not allowed: {url}"
    assert not fake.seen


async def test_connect_details_never_reach_the_client(client, fake):
    url = f"http://127.0.0.1:{free_port()}/x.png"
    path, body = requests_for(url)["openai"]
    resp = await client.post(path, json=body)
    assert resp.status == 400
    text = await resp.text()
    assert error_message("openai", await resp.json()) == f"image URL could not be fetched: {url}"
    for detail in ("Connect call failed", "Cannot connect", "refused", "Errno"):
        assert detail not in text


async def test_slow_image_urls_do_not_delay_unrelated_requests(router_client, fake, images):
    """Media fetches have their own pool: a request waiting on slow image URLs leaves the
    providers' pools free."""
    cfg = make_config(fake.base_url, image_timeout_s=5.0)
    cfg.media = MediaConfig(allow=["127.0.0.1/32"], max_connections=4, max_urls=8)
    client = await router_client(cfg)
    urls = [images.url(f"/slow.png?s=1.0&i={i}") for i in range(8)]
    body = requests_for(urls[0])["openai"][1]
    body["messages"][0]["content"] += [
        {"type": "image_url", "image_url": {"url": u}} for u in urls[1:]
    ]
    slow = asyncio.ensure_future(client.post("/v1/chat/completions", json=body))
    await asyncio.sleep(0.2)  # the slow fetches have started
    started = time.monotonic()
    resp = await client.post("/v1/chat/completions", json=OPENAI_BODY)
    unrelated_s = time.monotonic() - started
    assert resp.status == 200
    assert not slow.done(), "the slow request should still be fetching"
    assert (await slow).status == 200
    assert unrelated_s < 0.5, unrelated_s


async def test_pools_are_separate_and_sized_by_the_config(router_client, fake):
    cfg = make_config(fake.base_url)
    cfg.providers["oai"].max_connections = 1500
    client = await router_client(cfg)
    app = client.server.app
    providers = app[PROVIDERS]
    assert providers["oai"].pool.max_connections == 1500
    assert providers["claude"].pool.max_connections == 1000  # the default
    assert len({id(p.pool) for p in providers.values()}) == len(providers)
    assert app[MEDIA].session.connector.limit == MediaConfig().max_connections
