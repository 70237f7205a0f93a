"""The web console's login sessions: a signed cookie (HTTP-only, SameSite=Strict, with an
expiry) and a CSRF token that every state-changing call must send back in a header.

The cookie holds ``{"exp", "csrf"}`` and an HMAC-SHA256 of it. The HMAC key is the process's
session secret (``ROUTER_CONSOLE_SECRET``, else random at start: restarts log everyone out)
followed by the admin key's digest, so changing the admin key ends every session.
"""

from __future__ import annotations

import base64
import hashlib
import hmac
import json
import math
import os
import secrets
import time
from collections import deque
from collections.abc import Callable

from aiohttp import web

from ..backends import CONFIG
from ..errors import AuthenticationError, PermissionDeniedError, RateLimitError

COOKIE = "router_console"
CSRF_HEADER = "X-CSRF-Token"
SECRET_VAR = "ROUTER_CONSOLE_SECRET"
SESSION_TTL_S = 8 * 3600.0
SAFE_METHODS = ("GET", "HEAD", "OPTIONS")
# Wrong admin keys one client address may send per window before its logins get 429.
LOGIN_FAILURES = 10
LOGIN_WINDOW_S = 60.0
# Addresses remembered at most; past it, those without a recent failure are forgotten.
LOGIN_ADDRESSES = 10_000


class Sessions:
    """Issues and checks console sessions.

    Args:
        secret: The signing secret (several router processes behind one address need the
            same one: set ``ROUTER_CONSOLE_SECRET``).
        ttl_s: How long a session lasts.
        clock: Epoch time source (injectable for tests).
    """

    def __init__(
        self, secret: bytes, ttl_s: float = SESSION_TTL_S, clock: Callable[[], float] = time.time
    ) -> None:
        self._secret = secret
        self.ttl_s = ttl_s
        self._clock = clock

    def issue(self, admin_digest: bytes) -> tuple[str, dict]:
        """A new session.

        Args:
            admin_digest: The admin key's digest (part of the signing key).

        Returns:
            The cookie value, and ``{"csrf", "expires"}`` for the page.
        """
        session = {"exp": self._clock() + self.ttl_s, "csrf": secrets.token_urlsafe(24)}
        data = base64.urlsafe_b64encode(json.dumps(session).encode()).decode()
        return f"{data}.{self._sign(data, admin_digest)}", {
            "csrf": session["csrf"],
            "expires": session["exp"],
        }

    def read(self, value: str, admin_digest: bytes) -> dict:
        """The session a cookie holds.

        Args:
            value: The cookie's value.
            admin_digest: The admin key's digest.

        Raises:
            AuthenticationError: The cookie is forged, damaged or expired.
        """
        data, _, signature = value.rpartition(".")
        if not data or not hmac.compare_digest(signature, self._sign(data, admin_digest)):
            raise AuthenticationError("invalid console session: log in again")
        session = json.loads(base64.urlsafe_b64decode(data))
        if session["exp"] <= self._clock():
            raise AuthenticationError("the console session has expired: log in again")
        return session

    def check(self, request: web.Request) -> bool:
        """`router.auth.ADMIN_SESSION`: whether the request carries a valid session (and, for
        a state-changing method, its CSRF token).

        Args:
            request: An admin or console request.

        Raises:
            AuthenticationError: The session cookie is invalid or expired.
            PermissionDeniedError: A state-changing call without the session's CSRF token.
        """
        value = request.cookies.get(COOKIE)
        digest = request.app[CONFIG].auth.admin_digest
        if value is None or digest is None:
            return False
        session = self.read(value, digest)
        if request.method not in SAFE_METHODS:
            token = request.headers.get(CSRF_HEADER, "")
            if not hmac.compare_digest(token.encode(), session["csrf"].encode()):
                raise PermissionDeniedError(
                    f"missing or wrong {CSRF_HEADER}: state-changing console calls need the "
                    "session's CSRF token (reload the console)"
                )
        return True

    def _sign(self, data: str, admin_digest: bytes) -> str:
        mac = hmac.new(self._secret + admin_digest, data.encode(), hashlib.sha256)
        return base64.urlsafe_b64encode(mac.digest()).decode().rstrip("=")


class LoginThrottle:
    """Slows the guessing of the admin key: `LOGIN_FAILURES` wrong keys from one address within
    `LOGIN_WINDOW_S` and its further logins are refused (429) until the oldest failure ages out.

    Args:
        clock: Monotonic time source (injectable for tests).
    """

    def __init__(self, clock: Callable[[], float] = time.monotonic) -> None:
        self._clock = clock
        self._failures: dict[str, deque[float]] = {}

    def check(self, address: str) -> None:
        """Refuse a login from an address with too many recent failures.

        Args:
            address: The client's address.

        Raises:
            RateLimitError: With ``retry_after``, when the address is over the limit.
        """
        times = self._recent(address)
        if len(times) >= LOGIN_FAILURES:
            wait = times[0] + LOGIN_WINDOW_S - self._clock()
            raise RateLimitError(
                f"too many wrong admin keys from this address: try again in {math.ceil(wait)} s",
                retry_after=wait,
            )

    def failed(self, address: str) -> None:
        """Count a wrong key from an address.

        Args:
            address: The client's address.
        """
        if len(self._failures) >= LOGIN_ADDRESSES:
            for stale in [a for a in self._failures if not self._recent(a)]:
                del self._failures[stale]
        self._failures.setdefault(address, deque()).append(self._clock())

    def _recent(self, address: str) -> deque[float]:
        times = self._failures.get(address, deque())
        while times and times[0] <= self._clock() - LOGIN_WINDOW_S:
            times.popleft()
        return times


def session_secret() -> bytes:
    """The signing secret: ``ROUTER_CONSOLE_SECRET`` when set, else random for this process."""
    configured = os.environ.get(SECRET_VAR)
    return configured.encode() if configured else secrets.token_bytes(32)
