"""One error tree for the router, and the table that maps upstream HTTP statuses onto it.

Every error the router raises is a `GatewayError`. The error middleware renders it in the
inbound client's format through that client format's `render_error`; `kind` is the router's
own format-neutral name for the error class, which each format maps to its wire vocabulary.
"""

from __future__ import annotations

import email.utils
import time


class GatewayError(Exception):
    """Base of all router errors.

    Args:
        message: Human-readable text shown to the client.
        param: The request field at fault, when there is one (e.g. ``messages[2].content``).
        retry_after: Seconds the client should wait, when known.
        upstream_body: The upstream's decoded error body, when the error came from one (the key
            pool reads quota details from it); never shown to the client.
        upstream_headers: The upstream answer's HTTP headers (lower-case names), when the
            error came from one (the key pool reads rate-limit resets from them).
    """

    status = 500
    kind = "api_error"
    retryable = False

    def __init__(
        self,
        message: str,
        *,
        param: str | None = None,
        retry_after: float | None = None,
        upstream_body: object = None,
        upstream_headers: dict[str, str] | None = None,
    ) -> None:
        super().__init__(message)
        self.message = message
        self.param = param
        self.retry_after = retry_after
        self.upstream_body = upstream_body
        self.upstream_headers = upstream_headers


class InvalidRequestError(GatewayError):
    status = 400
    kind = "invalid_request"


class AuthenticationError(GatewayError):
    status = 401
    kind = "authentication"


class PermissionDeniedError(GatewayError):
    status = 403
    kind = "permission"


class NotFoundError(GatewayError):
    status = 404
    kind = "not_found"


class PayloadTooLargeError(GatewayError):
    status = 413
    kind = "request_too_large"


class RateLimitError(GatewayError):
    status = 429
    kind = "rate_limit"
    retryable = True


class UpstreamError(GatewayError):
    """The upstream failed (5xx, a broken connection or an unparseable answer)."""

    status = 502
    kind = "api_error"
    retryable = True


def credential_rejected(provider: str, status: int) -> UpstreamError:
    """The error for a provider that rejected the router's own key (HTTP 401/403, or an
    invalid-key message): the client's request and key are not at fault, so it is a 502, and
    it quotes nothing of the upstream's message (which may echo part of the key).

    Args:
        provider: The provider's name.
        status: The upstream's HTTP status.
    """
    return UpstreamError(
        f"{provider}: the upstream rejected the router's credential for this provider "
        f"(HTTP {status}); the router's operator must fix its provider key"
    )


class OverloadedError(GatewayError):
    """The upstream is overloaded (503, Anthropic's 529)."""

    status = 503
    kind = "overloaded"
    retryable = True


class GatewayTimeoutError(GatewayError):
    status = 504
    kind = "timeout"
    retryable = True


# The single table from an upstream HTTP status to the router's error class.
UPSTREAM_ERRORS: dict[int, type[GatewayError]] = {
    400: InvalidRequestError,
    401: AuthenticationError,
    403: PermissionDeniedError,
    404: NotFoundError,
    408: GatewayTimeoutError,
    409: InvalidRequestError,
    413: PayloadTooLargeError,
    422: InvalidRequestError,
    429: RateLimitError,
    500: UpstreamError,
    502: UpstreamError,
    503: OverloadedError,
    504: GatewayTimeoutError,
    529: OverloadedError,
}


def error_for_status(
    status: int,
    message: str,
    retry_after: float | None = None,
    upstream_body: object = None,
    upstream_headers: dict[str, str] | None = None,
) -> GatewayError:
    """Build the router error for an upstream HTTP status.

    Args:
        status: The upstream's HTTP status code.
        message: Text for the client (should name the provider).
        retry_after: Parsed ``Retry-After`` seconds, if the upstream sent one.
        upstream_body: The upstream's decoded error body, if it sent JSON.
        upstream_headers: The upstream answer's headers (lower-case names).
    """
    cls = UPSTREAM_ERRORS.get(status)
    if cls is None:
        cls = UpstreamError if status >= 500 else InvalidRequestError
    err = cls(
        message,
        retry_after=retry_after,
        upstream_body=upstream_body,
        upstream_headers=upstream_headers,
    )
    if status >= 500 and status != 529:
        # Keep the upstream's own server-error status (529 is Anthropic-only: 503 elsewhere).
        err.status = status
    return err


def parse_retry_after(value: str | None, now: float | None = None) -> float | None:
    """Parse a ``Retry-After`` header in either form (delta-seconds or HTTP-date).

    Args:
        value: The raw header value, or None.
        now: The current epoch time (for tests); defaults to ``time.time()``.

    Returns:
        Seconds to wait (never negative), or None if absent or unparseable.
    """
    if not value:
        return None
    value = value.strip()
    try:
        return max(0.0, float(value))
    except ValueError:
        pass
    try:
        when = email.utils.parsedate_to_datetime(value)
    except (TypeError, ValueError):
        return None
    return max(0.0, when.timestamp() - (time.time() if now is None else now))
