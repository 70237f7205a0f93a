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
import os
import secrets
import time
from collections.abc import Callable

from aiohttp import web

from ..backends import CONFIG
from ..errors import AuthenticationError, PermissionDeniedError

COOKIE = "router_console"
CSRF_HEADER = "X-CSRF-Token"
SECRET_VAR = "ROUTER_CONSOLE_SECRET"
SESSION_TTL_S = 8 * 3600.0
SAFE_METHODS = ("GET", "HEAD", "OPTIONS")


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


def session_secret() -> bytes:
    """The signing secret: ``ROUTER_CONSOLE_SECRET`` when set, else random for this process."""
    configured = os.environ.get(SECRET_VAR)
    return configured.encode() if configured else secrets.token_bytes(32)
