"""What an upstream's answer means for the key that served it: a `Verdict` from an error
(`classify_failure`), and when a rate-limited key can be used again, from the reset headers
of OpenAI, Anthropic and Gemini."""

from __future__ import annotations

import datetime as dt
import re
import time
from collections.abc import Mapping
from dataclasses import dataclass
from zoneinfo import ZoneInfo, ZoneInfoNotFoundError

from ..errors import (
    AuthenticationError,
    GatewayError,
    PermissionDeniedError,
    RateLimitError,
    parse_retry_after,
)
from .state import ACTIVE, COOLING, DISABLED, PARKED

# Gemini's daily quotas reset at midnight Pacific time.
_GEMINI_QUOTA_ZONE = "America/Los_Angeles"


@dataclass(frozen=True)
class Verdict:
    """What a failure means for the key that served it.

    Args:
        state: The key's new state; ``active`` means the key is not to blame.
        seconds: How long the key stays out (None: backoff for cooling, ``park_s`` for parked).
        reason: Why, for logs and the admin API.
    """

    state: str
    seconds: float | None
    reason: str


_DURATION_PART = re.compile(r"(\d+(?:\.\d+)?)(ms|h|m|s)")
_DURATION_UNITS = {"h": 3600.0, "m": 60.0, "s": 1.0, "ms": 0.001}
# (remaining header, reset header) pairs; OpenAI's resets are durations, Anthropic's RFC 3339.
_OPENAI_LIMITS = [
    (f"x-ratelimit-remaining-{d}", f"x-ratelimit-reset-{d}") for d in ("requests", "tokens")
]
_ANTHROPIC_LIMITS = [
    (f"anthropic-ratelimit-{d}-remaining", f"anthropic-ratelimit-{d}-reset")
    for d in ("requests", "tokens", "input-tokens", "output-tokens")
]
# Text of quota or billing exhaustion: OpenAI's insufficient_quota, Anthropic's credit balance.
_QUOTA_MARKERS = ("insufficient_quota", "credit balance is too low", "billing_error")
# OpenAI's insufficient_quota message; Gemini says the same for per-minute limits, which come
# with a retry delay, so it only parks a key when no reset time is given.
_GENERIC_QUOTA_MARKER = "exceeded your current quota"
_INVALID_KEY_MARKERS = ("api key not valid", "api_key_invalid", "invalid api key")


def parse_duration(text: str) -> float | None:
    """Parse a Go-style duration as OpenAI sends it in ``x-ratelimit-reset-*`` (``6m0s``).

    Args:
        text: The header value, e.g. ``1s``, ``6m0s``, ``20ms``, ``1h2m3.5s``.

    Returns:
        Seconds, or None if it is not such a duration.
    """
    text = text.strip()
    parts = _DURATION_PART.findall(text)
    if not parts or "".join(n + u for n, u in parts) != text:
        return None
    return sum(float(n) * _DURATION_UNITS[u] for n, u in parts)


def parse_reset_time(text: str, now: float) -> float | None:
    """Seconds until an RFC 3339 time (Anthropic's ``anthropic-ratelimit-*-reset``).

    Args:
        text: The header value, e.g. ``2026-01-01T00:00:30Z``.
        now: The current epoch time.

    Returns:
        Seconds from ``now`` (never negative), or None if unparseable.
    """
    try:
        when = dt.datetime.fromisoformat(text.strip().replace("Z", "+00:00"))
    except ValueError:
        return None
    if when.tzinfo is None:
        return None
    return max(0.0, when.timestamp() - now)


def reset_hint(headers: Mapping[str, str], now: float) -> float | None:
    """When a rate-limited key can be used again, from the upstream's response headers.

    ``Retry-After`` (seconds or HTTP date) and ``retry-after-ms`` come first. Otherwise the
    reset of the exhausted limit (remaining ``0``) among OpenAI's ``x-ratelimit-reset-*`` and
    Anthropic's ``anthropic-ratelimit-*-reset``, the latest if several are exhausted; when none
    says ``0``, the soonest reset.

    Args:
        headers: The response headers (case-insensitive mapping, or lower-case keys).
        now: The current epoch time.

    Returns:
        Seconds to wait, or None when the headers give no hint.
    """
    lower = {k.lower(): v for k, v in headers.items()}
    retry_after = parse_retry_after(lower.get("retry-after"), now=now)
    if retry_after is not None:
        return retry_after
    if "retry-after-ms" in lower:
        try:
            return max(0.0, float(lower["retry-after-ms"]) / 1000)
        except ValueError:
            pass
    exhausted, others = _limit_resets(lower, now)
    if exhausted:
        return max(exhausted)
    return min(others) if others else None


def exhausted_limit_reset(headers: Mapping[str, str], now: float) -> float | None:
    """Seconds until a limit that a successful response reports used up (remaining ``0``)
    resets, so the key rests before it earns a 429.

    Args:
        headers: The response headers (lower-case keys).
        now: The current epoch time.

    Returns:
        The latest reset among the exhausted limits, or None when none is exhausted.
    """
    exhausted, _ = _limit_resets(headers, now)
    return max(exhausted) if exhausted else None


def _limit_resets(lower: Mapping[str, str], now: float) -> tuple[list[float], list[float]]:
    """Seconds to each reset in OpenAI's and Anthropic's rate-limit headers, split into the
    limits whose remaining count is ``0`` and the others."""
    exhausted, others = [], []
    limits = [(r, s, parse_duration) for r, s in _OPENAI_LIMITS]
    limits += [(r, s, lambda v: parse_reset_time(v, now)) for r, s in _ANTHROPIC_LIMITS]
    for remaining, reset, parse in limits:
        seconds = parse(lower[reset]) if reset in lower else None
        if seconds is not None:
            (exhausted if lower.get(remaining, "").strip() == "0" else others).append(seconds)
    return exhausted, others


def _google_details(body: object) -> list[dict]:
    error = body.get("error") if isinstance(body, dict) else None
    details = error.get("details") if isinstance(error, dict) else None
    return [d for d in details if isinstance(d, dict)] if isinstance(details, list) else []


def _daily_quota_exhausted(body: object) -> bool:
    """Gemini's ``QuotaFailure`` detail names a per-day quota (``...PerDay...``)."""
    for detail in _google_details(body):
        for violation in detail.get("violations") or []:
            if isinstance(violation, dict) and "PerDay" in str(violation.get("quotaId", "")):
                return True
    return False


def seconds_to_gemini_reset(now: float) -> float | None:
    """Seconds until Gemini's daily quotas reset (midnight Pacific time).

    Args:
        now: The current epoch time.

    Returns:
        Seconds, or None when the system has no time zone database.
    """
    try:
        zone = ZoneInfo(_GEMINI_QUOTA_ZONE)
    except ZoneInfoNotFoundError:
        return None
    local = dt.datetime.fromtimestamp(now, zone)
    midnight = dt.datetime.combine(local.date() + dt.timedelta(days=1), dt.time(), zone)
    return midnight.timestamp() - now


def classify_failure(
    err: GatewayError,
    headers: Mapping[str, str] | None = None,
    body: object = None,
    now: float | None = None,
) -> Verdict:
    """Decide what an upstream failure means for the key that served the request.

    Args:
        err: The router error the upstream's answer became.
        headers: The upstream response's headers, when known.
        body: The upstream's decoded error body, when known (Gemini's quota details).
        now: The current epoch time (for tests); defaults to ``time.time()``.

    Returns:
        ``disabled`` for 401/403 and invalid keys; ``parked`` for exhausted quota or credit;
        ``cooling`` for other 429s (with the upstream's hint, if any); else ``active``.
    """
    now = time.time() if now is None else now
    text = err.message.lower()
    hint = err.retry_after
    if hint is None and headers:
        hint = reset_hint(headers, now)
    if _daily_quota_exhausted(body):
        return Verdict(PARKED, seconds_to_gemini_reset(now), "daily quota exhausted")
    if any(marker in text for marker in _QUOTA_MARKERS) or (
        _GENERIC_QUOTA_MARKER in text and hint is None
    ):
        return Verdict(PARKED, None, f"quota or credit exhausted (HTTP {err.status})")
    if isinstance(err, AuthenticationError | PermissionDeniedError) or any(
        marker in text for marker in _INVALID_KEY_MARKERS
    ):
        return Verdict(DISABLED, None, f"rejected by the provider (HTTP {err.status})")
    if isinstance(err, RateLimitError):
        return Verdict(COOLING, hint, f"rate limited (HTTP {err.status})")
    return Verdict(ACTIVE, None, f"{err.kind} (HTTP {err.status})")
