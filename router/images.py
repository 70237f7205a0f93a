"""The router's one fetcher of remote images (and other media), safe in front of hostile
clients.

Gemini's API takes only inline data or Google file URIs, and the local model takes raw bytes,
so for them the router downloads the http(s) URLs a client sent. A `MediaFetcher` does it:

- only addresses the ``media`` config permits: by default public ones. Loopback, private,
  link-local, multicast, reserved, unspecified and shared (CGNAT) addresses are refused, also
  in their IPv4-mapped, IPv4-compatible, 6to4 and NAT64 IPv6 forms;
- checked on the resolved address of every hop: a URL's literal address before connecting,
  a host name's every DNS answer in the connector's resolver, which hands the connector only
  the checked answers (the connection uses the very addresses that were checked, so a second
  DNS answer cannot rebind it); redirects are followed by hand, ``max_redirects`` at most,
  each one checked again;
- on its own connection pool, apart from the providers' pools, with ``max_concurrency``
  downloads at once per request, ``max_urls`` URLs and ``max_total_bytes`` per request;
- with errors that never say how a connection failed: a refused, unreachable or unresolvable
  host reads the same ("image URL could not be fetched"), and a host the policy refuses is
  "image URL not allowed" before any connection is tried.
"""

from __future__ import annotations

import asyncio
import base64
import ipaddress
import logging
import mimetypes
import socket
from collections.abc import Callable

import aiohttp
from aiohttp.abc import AbstractResolver, ResolveResult
from aiohttp.resolver import DefaultResolver
from yarl import URL

from . import ir
from .config import Config, MediaConfig
from .errors import InvalidRequestError

logger = logging.getLogger(__name__)

IPAddress = ipaddress.IPv4Address | ipaddress.IPv6Address

_CHUNK = 64 * 1024
_REDIRECTS = (301, 302, 303, 307, 308)
# URLs are quoted in errors up to this length.
_SHOWN_URL_CHARS = 200
# IPv6 forms that embed an IPv4 address in their last 32 bits (mapped ``::ffff:0:0/96`` is
# read by ``ipv4_mapped``, 6to4 by ``sixtofour``).
_IPV4_COMPATIBLE = ipaddress.ip_network("::/96")
_NAT64 = ipaddress.ip_network("64:ff9b::/96")
# NAT64 for a local network (RFC 8215): what it reaches depends on the site, so never public.
_NAT64_LOCAL = ipaddress.ip_network("64:ff9b:1::/48")
_SHARED_ADDRESS_SPACE = ipaddress.ip_network("100.64.0.0/10")  # CGNAT, RFC 6598


class MediaNotAllowed(Exception):
    """A media URL's host or address is outside what the ``media`` config permits; the message
    (for the router's log only) says which address."""


def embedded_ipv4(address: IPAddress) -> ipaddress.IPv4Address | None:
    """The IPv4 address an IPv6 address stands for (IPv4-mapped, IPv4-compatible, 6to4 or
    well-known NAT64), else None.

    Args:
        address: Any address.
    """
    if address.version == 4:
        return None
    if address.ipv4_mapped is not None:
        return address.ipv4_mapped
    if address.sixtofour is not None:
        return address.sixtofour
    if address in _IPV4_COMPATIBLE or address in _NAT64:
        return ipaddress.IPv4Address(int(address) & 0xFFFFFFFF)
    return None


def is_public_address(address: IPAddress) -> bool:
    """Whether ``address`` is a public, globally routable unicast address (for IPv6 forms of
    an IPv4 address: whether that IPv4 address is).

    Args:
        address: Any address.
    """
    if address.version == 6 and address in _NAT64_LOCAL:
        return False
    address = embedded_ipv4(address) or address
    if address.version == 4 and address in _SHARED_ADDRESS_SPACE:
        return False
    special = (
        address.is_private
        or address.is_loopback
        or address.is_link_local
        or address.is_multicast
        or address.is_reserved
        or address.is_unspecified
        or (address.version == 6 and address.is_site_local)
    )
    return address.is_global and not special


def address_allowed(address: IPAddress, media: MediaConfig, allowed_host: bool = False) -> bool:
    """Whether the media config permits connecting to ``address``.

    Args:
        address: A resolved or literal address.
        media: The policy: ``deny`` wins, then ``allow``, then ``allow_public``.
        allowed_host: The URL's host name is in ``media.allow``.
    """
    forms = [address, embedded_ipv4(address) or address]
    if any(form in network for form in forms for network in media.deny_networks):
        return False
    if allowed_host or any(form in network for form in forms for network in media.allow_networks):
        return True
    return media.allow_public and is_public_address(address)


def host_matches(host: str, patterns: list[str]) -> bool:
    """Whether a host name matches a pattern list (``name``, or ``*.name`` for subdomains).

    Args:
        host: The URL's host name.
        patterns: Lower-case patterns without trailing dots.
    """
    host = host.lower().rstrip(".")
    for pattern in patterns:
        if pattern.startswith("*."):
            if host.endswith(pattern[1:]):
                return True
        elif host == pattern:
            return True
    return False


class CheckedResolver(AbstractResolver):
    """A resolver that answers only with addresses the media config permits: any other
    answer fails the whole lookup, so the connector connects only to checked addresses.

    Args:
        inner: The resolver that does the lookups.
        media: Returns the current media config.
    """

    def __init__(self, inner: AbstractResolver, media: Callable[[], MediaConfig]) -> None:
        self._inner = inner
        self._media = media

    async def resolve(
        self, host: str, port: int = 0, family: socket.AddressFamily = socket.AF_INET
    ) -> list[ResolveResult]:
        """Resolve ``host`` and check every answer.

        Raises:
            MediaNotAllowed: If any answer is not permitted.
            OSError: If the lookup fails.
        """
        answers = await self._inner.resolve(host, port, family)
        media = self._media()
        allowed_host = host_matches(host, media.allow_hosts)
        for answer in answers:
            if not address_allowed(ipaddress.ip_address(answer["host"]), media, allowed_host):
                raise MediaNotAllowed(f"{host} resolves to {answer['host']}")
        return answers

    async def close(self) -> None:
        """Close the inner resolver."""
        await self._inner.close()


class _Budget:
    """The bytes a request's media URLs may still take together."""

    def __init__(self, total: int) -> None:
        self.total = total
        self.left = total

    def check(self, count: int) -> None:
        """Fail if ``count`` more bytes do not fit."""
        if count > self.left:
            raise InvalidRequestError(
                f"the request's image URLs total more than {self.total} bytes "
                "(the router's media.max_total_bytes)",
                param="messages",
            )

    def take(self, count: int) -> None:
        """Count ``count`` bytes that arrived."""
        self.check(count)
        self.left -= count


class MediaFetcher:
    """Downloads the media URLs of client requests under the ``media`` config, on a
    connection pool of its own.

    Args:
        config: The app's config; ``media`` and ``limits`` are read at each fetch (a reload
            updates them in place), ``media.max_connections`` once.
        resolver: The DNS resolver whose answers are checked (default: aiohttp's).
    """

    def __init__(self, config: Config, resolver: AbstractResolver | None = None) -> None:
        self.config = config
        self.resolver = CheckedResolver(resolver or DefaultResolver(), lambda: config.media)
        # No DNS cache and no keep-alive: every connection resolves and checks anew under the
        # current policy, and no idle connection to a client-chosen host outlives its fetch.
        connector = aiohttp.TCPConnector(
            limit=config.media.max_connections,
            resolver=self.resolver,
            use_dns_cache=False,
            force_close=True,
        )
        # No cookies either: a server one client names must not set what another's fetch sends.
        self.session = aiohttp.ClientSession(
            connector=connector, cookie_jar=aiohttp.DummyCookieJar(), trust_env=False
        )

    async def close(self) -> None:
        """Close the pool and the resolver."""
        await self.session.close()
        await self.resolver.close()

    async def fetch(self, parts: list[ir.MediaPart]) -> list[tuple[bytes, str]]:
        """Download the http(s) URLs of one request's media parts.

        Args:
            parts: The parts, left as they are.

        Returns:
            Per part, its bytes and media type: the response's content type when it names
            one, else the part's, with a wildcard (``image/*``) resolved from the URL.

        Raises:
            InvalidRequestError: If there are more URLs than ``media.max_urls``, their bytes
                exceed a limit, or a URL is not allowed or cannot be fetched; the message
                names the URL.
        """
        media = self.config.media
        if len(parts) > media.max_urls:
            raise InvalidRequestError(
                f"the request has {len(parts)} image URLs; the router fetches at most "
                f"{media.max_urls} per request (send the others inline as base64)",
                param="messages",
            )
        budget = _Budget(media.max_total_bytes)
        gate = asyncio.Semaphore(media.max_concurrency)
        tasks = [asyncio.ensure_future(self._fetch_one(p, gate, budget)) for p in parts]
        try:
            return await asyncio.gather(*tasks)
        finally:
            # After the first failure (the client's answer) the other downloads stop.
            for task in tasks:
                task.cancel()

    async def _fetch_one(
        self, part: ir.MediaPart, gate: asyncio.Semaphore, budget: _Budget
    ) -> tuple[bytes, str]:
        url = part.url
        timeout_s = self.config.limits.image_timeout_s
        async with gate:
            try:
                data, content_type = await asyncio.wait_for(self._follow(url, budget), timeout_s)
            except asyncio.TimeoutError as err:
                raise _not_fetched(url, f"timed out after {timeout_s:g} s") from err
            except MediaNotAllowed as err:
                logger.info("image URL %s refused: %s", _shown(url), err)
                raise InvalidRequestError(
                    f"image URL not allowed: {_shown(url)}", param="url"
                ) from None
            except aiohttp.ClientError as err:
                # Connect details (refused, unreachable, unresolvable) go to the log only.
                logger.info("image URL %s could not be fetched: %r", _shown(url), err)
                raise _not_fetched(url) from None
            except ValueError as err:  # a malformed URL or redirect target
                raise _not_fetched(url, "invalid URL") from err
        media_type = part.media_type
        if "/" in content_type and not content_type.startswith(
            ("application/octet-stream", "text/")
        ):
            media_type = content_type
        elif media_type.endswith("/*"):
            media_type = mimetypes.guess_type(url)[0] or "image/jpeg"
        logger.debug("fetched %s (%d bytes, %s)", _shown(url), len(data), media_type)
        return data, media_type

    async def _follow(self, original: str, budget: _Budget) -> tuple[bytes, str]:
        """GET the client's URL, following redirects by hand, each hop checked; errors name
        the client's URL."""
        url = URL(original)
        for _ in range(self.config.media.max_redirects + 1):
            check_url(url, self.config.media)
            async with self.session.get(url, allow_redirects=False) as resp:
                if resp.status in _REDIRECTS and "Location" in resp.headers:
                    url = url.join(URL(resp.headers["Location"]))
                    continue
                if resp.status != 200:
                    raise _not_fetched(original, f"HTTP {resp.status}")
                return await self._read(original, resp, budget), resp.content_type
        raise _not_fetched(original, "too many redirects")

    async def _read(self, url: str, resp: aiohttp.ClientResponse, budget: _Budget) -> bytes:
        """The body, within the per-URL and the request's byte limits (of the decoded bytes:
        a compressed body is counted as it inflates)."""
        limit = self.config.limits.image_max_bytes
        if (resp.content_length or 0) > limit:
            raise _too_large(url, limit)
        budget.check(resp.content_length or 0)
        data = bytearray()
        async for chunk in resp.content.iter_chunked(_CHUNK):
            data += chunk
            budget.take(len(chunk))
            if len(data) > limit:
                raise _too_large(url, limit)
        return bytes(data)


def check_url(url: URL, media: MediaConfig) -> None:
    """Check a URL before connecting: its scheme, a denied host name, and a literal address
    (which the connector does not resolve, so the resolver's check does not see it).

    Args:
        url: The URL of one hop.
        media: The policy.

    Raises:
        MediaNotAllowed: If the URL may not be fetched.
    """
    if url.scheme not in ("http", "https") or not url.raw_host:
        raise MediaNotAllowed(f"scheme {url.scheme!r} or no host")
    host = url.raw_host
    if host_matches(host, media.deny_hosts):
        raise MediaNotAllowed(f"{host} is denied by name")
    try:
        address = ipaddress.ip_address(host)
    except ValueError:
        if ":" in host or host.replace(".", "").isdigit():
            # What aiohttp takes for an address (2130706433, 127.1): never fetched.
            raise MediaNotAllowed(f"{host} is not a canonical address") from None
        return
    if not address_allowed(address, media):
        raise MediaNotAllowed(f"{host} is not permitted")


def is_http(url: str | None) -> bool:
    """Whether ``url`` is an http(s) URL (which a `MediaFetcher` can download).

    Args:
        url: A media part's URL, or None.
    """
    return url is not None and url.startswith(("https://", "http://"))


async def inline_remote_media(request: ir.Request, fetcher: MediaFetcher) -> None:
    """Replace every http(s) `MediaPart` URL in ``request`` by its downloaded bytes, in base64,
    in place.

    Args:
        request: The IR request (inlined data is valid for every provider, so the request can
            still be reused for fallback targets).
        fetcher: The app's media fetcher.

    Raises:
        InvalidRequestError: As `MediaFetcher.fetch`.
    """
    remote = []
    for message in request.messages:
        for part in message.parts:
            inner = part.content if isinstance(part, ir.ToolResultPart) else [part]
            remote += [p for p in inner if isinstance(p, ir.MediaPart) and is_http(p.url)]
    if not remote:
        return
    for part, (data, media_type) in zip(remote, await fetcher.fetch(remote), strict=True):
        part.data = base64.b64encode(data).decode()
        part.media_type = media_type
        part.url = None


def _shown(url: str) -> str:
    return url if len(url) <= _SHOWN_URL_CHARS else url[:_SHOWN_URL_CHARS] + "..."


def _not_fetched(url: str, why: str = "") -> InvalidRequestError:
    detail = f" ({why})" if why else ""
    return InvalidRequestError(
        f"image URL could not be fetched: {_shown(url)}{detail}", param="url"
    )


def _too_large(url: str, limit: int) -> InvalidRequestError:
    return InvalidRequestError(
        f"image URL {_shown(url)} is larger than the {limit} byte limit", param="url"
    )
