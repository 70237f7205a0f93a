"""Per-provider API key pools: key choice, per-key limits and key states chosen by error kind.

A key is in one of four states; only ``active`` keys get traffic:

- ``active``: usable (it may still be at its ``max_concurrent``, ``rpm`` or ``tpm`` for a while).
- ``cooling``: rate limited (429); back by itself at ``until``, taken from the upstream's
  ``Retry-After`` or reset headers, else exponential backoff with jitter.
- ``parked``: quota or credit exhausted; back at the quota's reset, else after ``park_s``.
- ``disabled``: rejected by the provider (401/403, an invalid key); back only by `KeyPool.enable`.

Overloads, 5xx and timeouts are not the key's fault and leave it active.
"""

from __future__ import annotations

import asyncio
import datetime as dt
import hashlib
import logging
import math
import random
import re
import time
from collections import OrderedDict, deque
from collections.abc import Callable, Collection, Mapping
from dataclasses import dataclass, field
from typing import TYPE_CHECKING
from zoneinfo import ZoneInfo, ZoneInfoNotFoundError

from .config import KeyConfig, ProviderConfig
from .errors import (
    AuthenticationError,
    GatewayError,
    NotFoundError,
    PermissionDeniedError,
    RateLimitError,
    UpstreamError,
    parse_retry_after,
)

if TYPE_CHECKING:
    from .shared_keys import SharedKeyState

logger = logging.getLogger(__name__)

ACTIVE, COOLING, PARKED, DISABLED = "active", "cooling", "parked", "disabled"
# A later, milder verdict never overrides a harsher state (a late 429 cannot un-park a key).
_SEVERITY = {ACTIVE: 0, COOLING: 1, PARKED: 2, DISABLED: 3}

# Backoff for 429s without any hint: 1 s doubling per consecutive 429, at most 60 s, times a
# random factor in [0.5, 1] so keys cooled together do not come back together.
BACKOFF_BASE_S = 1.0
BACKOFF_MAX_S = 60.0
# Rate-limit windows of the rpm/tpm budgets.
WINDOW_S = 60.0
# Conversations remembered for affinity (least recently used are forgotten first).
AFFINITY_ENTRIES = 10_000
# Retry-After sent with a 429 for a full queue or a queue wait that ran out.
QUEUE_RETRY_AFTER_S = 1.0
# Gemini's daily quotas reset at midnight Pacific time.
_GEMINI_QUOTA_ZONE = "America/Los_Angeles"

ChangeHook = Callable[[str, str, str, str, str], None]


# ---- what an upstream failure means for the key ------------------------------------------------


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


# ---- the pool -----------------------------------------------------------------------------------


def mask_key(key: str) -> str:
    """A key as logs and the admin API may show it (``sk-...a1b2``).

    Args:
        key: The API key.
    """
    return f"{key[:3]}...{key[-4:]}" if len(key) >= 12 else f"...{key[-2:]}"


@dataclass
class _Key:
    index: int
    id: str
    config: KeyConfig
    masked: str
    state: str = ACTIVE
    until: float | None = None  # monotonic clock
    reason: str = ""
    in_flight: int = 0
    requests: int = 0
    failures: int = 0
    # Consecutive 429s without a hint (backoff exponent); reset by a success.
    strikes: int = 0
    # Smooth weighted round robin's running weight.
    current: float = 0.0
    # Request start times and (time, tokens) spent, within the last WINDOW_S.
    starts: deque[float] = field(default_factory=deque)
    spent: deque[tuple[float, int]] = field(default_factory=deque)
    spent_total: int = 0
    # The key's id in the shared state (set when the pool shares its keys).
    shared_id: str = ""


class Lease:
    """One request's use of a key; release it exactly once (further calls do nothing).

    Args:
        pool: The pool it came from.
        key: The key (None for a keyless provider).
    """

    def __init__(self, pool: KeyPool, key: _Key | None) -> None:
        self._pool = pool
        self._key = key
        self._done = key is None

    @property
    def key(self) -> str | None:
        """The API key string to send upstream (None for keyless providers)."""
        return self._key.config.key if self._key else None

    @property
    def key_id(self) -> str | None:
        """The key's stable id, ``{provider}/{index}``."""
        return self._key.id if self._key else None

    def release(self, tokens: int = 0) -> None:
        """The request is over and did not fail.

        Args:
            tokens: Tokens it used (from the response's usage), for the key's tpm budget.
        """
        if not self._done:
            self._done = True
            self._pool._finish(self._key, tokens, None)

    def fail(self, verdict: Verdict) -> None:
        """The request failed; ``verdict`` says what that means for the key.

        Args:
            verdict: From `classify_failure`.
        """
        if not self._done:
            self._done = True
            self._pool._finish(self._key, 0, verdict)

    def rest(self, seconds: float, reason: str) -> None:
        """Cool the key for ``seconds`` although this request succeeded (its response said a
        limit is used up); the request itself keeps the key until it is released.

        Args:
            seconds: How long the key rests.
            reason: Why, for logs and the admin API.
        """
        if self._key is not None:
            self._pool._set_state(self._key, COOLING, self._pool._clock() + seconds, reason)
            if self._pool.shared is not None:
                self._pool.shared.finish(
                    self._key, release=False, state=COOLING, seconds=seconds, reason=reason
                )

    def scrub(self, text: str) -> str:
        """``text`` with this lease's key string replaced by its masked form.

        Args:
            text: Any text that may quote the key (an upstream error message).
        """
        return text.replace(self._key.config.key, self._key.masked) if self._key else text


class KeyPool:
    """A provider's API keys: picks one per request and tracks each key's state.

    Args:
        config: The provider's config (keys, strategy, queue bounds, ``park_s``).
        on_change: Called as ``on_change(provider, key_id, old_state, new_state, reason)`` on
            every state change (metrics and logs hook).
        clock: Monotonic time source (injectable for tests).
        wall: Epoch time source, for ``until`` in snapshots and reset times.
        rng: Random source of the backoff jitter.
        shared: The key state shared with other router instances (None: this pool's own);
            the pool then stays the first gate and mirrors the shared states.
    """

    def __init__(
        self,
        config: ProviderConfig,
        on_change: ChangeHook | None = None,
        clock: Callable[[], float] = time.monotonic,
        wall: Callable[[], float] = time.time,
        rng: random.Random | None = None,
        shared: SharedKeyState | None = None,
    ) -> None:
        self.provider = config.name
        self.config = config
        self.on_change = on_change
        self._clock = clock
        self._wall = wall
        self._rng = rng or random.Random()
        self._keys = [
            _Key(i, f"{config.name}/{i}", k, mask_key(k.key))
            for i, k in enumerate(config.key_configs)
        ]
        self._cursor = 0
        self._affinity: OrderedDict[str, _Key] = OrderedDict()
        self._waiters: set[asyncio.Future] = set()
        self._queued = 0
        self.shared = shared
        if shared is not None:
            shared.attach(self)

    def __len__(self) -> int:
        return len(self._keys)

    # ---- choosing a key ----------------------------------------------------------------------

    async def acquire(
        self,
        affinity: str | None = None,
        exclude: Collection[str] = (),
        deadline: float | None = None,
    ) -> Lease:
        """Take a key for one request, waiting in the pool's queue while all are busy.

        Args:
            affinity: A conversation id: its requests stay on one key while that key is usable.
            exclude: Key ids this request already tried.
            deadline: Monotonic time after which not to wait (also bounded by
                ``queue_timeout_s``).

        Raises:
            RateLimitError: No key is active (``retry_after``: until the first comes back), the
                queue is full, or the wait ran out.
            UpstreamError: Every key is disabled or excluded and none will come back by itself.
        """
        if not self._keys:
            return Lease(self, None)
        start = self._clock()
        end = start + self.config.queue_timeout_s
        end = end if deadline is None else min(end, deadline)
        queued = False
        try:
            while True:
                now = self._clock()
                self._refresh(now)
                healthy = [k for k in self._keys if k.state == ACTIVE and k.id not in exclude]
                if not healthy:
                    raise self._unavailable(exclude, now)
                ready = [k for k in healthy if self._has_room(k, now)]
                pause = math.inf
                if ready:
                    if self.shared is None or not self.shared.available:
                        return self._lease(self._choose(ready, affinity), now)
                    first = self._choose(ready, affinity)
                    others = [k for k in ready if k is not first]
                    key, pause = await self.shared.acquire([first, *others])
                    if key is not None:
                        return self._lease(key, self._clock())
                    now = self._clock()
                    healthy = [k for k in healthy if k.state == ACTIVE]
                if not queued:
                    if self._queued >= self.config.max_queue:
                        raise RateLimitError(
                            f"provider {self.provider!r}: all keys busy and "
                            f"{self._queued} requests already waiting",
                            retry_after=QUEUE_RETRY_AFTER_S,
                        )
                    queued = True
                    self._queued += 1
                wait = end - now
                if wait <= 0:
                    raise RateLimitError(
                        f"provider {self.provider!r}: no key became free within "
                        f"{now - start:.1f} s",
                        retry_after=QUEUE_RETRY_AFTER_S,
                    )
                await self._wait(min(wait, pause, self._next_change(healthy, now) - now))
        finally:
            if queued:
                self._queued -= 1

    def _choose(self, ready: list[_Key], affinity: str | None) -> _Key:
        eligible = ready
        if self.config.strategy == "priority":
            top = max(k.config.priority for k in ready)
            eligible = [k for k in ready if k.config.priority == top]
        if affinity is None:
            return self._by_strategy(eligible)
        mapped = self._affinity.get(affinity)
        if mapped is not None and mapped.state == ACTIVE:
            self._affinity.move_to_end(affinity)
            if mapped in eligible:
                return mapped
            if mapped not in ready:
                # The conversation's key is healthy but busy: serve this request elsewhere
                # and keep the conversation where its prompt cache is.
                return self._by_strategy(eligible)
        # Rendezvous hashing: a conversation lands on the same key whenever the same keys are
        # available, and only conversations of a key that went away move.
        chosen = max(eligible, key=lambda k: _rendezvous(affinity, k.id))
        self._affinity[affinity] = chosen
        self._affinity.move_to_end(affinity)
        if len(self._affinity) > AFFINITY_ENTRIES:
            self._affinity.popitem(last=False)
        return chosen

    def _by_strategy(self, ready: list[_Key]) -> _Key:
        n = len(self._keys)

        def rotation(k: _Key) -> int:
            return (k.index - self._cursor) % n

        if self.config.strategy == "weighted":
            # Smooth weighted round robin (nginx): exact proportions, evenly interleaved.
            total = sum(k.config.weight for k in ready)
            for k in ready:
                k.current += k.config.weight
            chosen = max(ready, key=lambda k: (k.current, -rotation(k)))
            chosen.current -= total
        elif self.config.strategy == "least_busy":
            chosen = min(ready, key=lambda k: (k.in_flight, rotation(k)))
        else:
            chosen = min(ready, key=rotation)
        self._cursor = chosen.index + 1
        return chosen

    def _lease(self, key: _Key, now: float) -> Lease:
        key.in_flight += 1
        key.requests += 1
        key.starts.append(now)
        return Lease(self, key)

    def _has_room(self, key: _Key, now: float) -> bool:
        cfg = key.config
        while key.starts and key.starts[0] <= now - WINDOW_S:
            key.starts.popleft()
        while key.spent and key.spent[0][0] <= now - WINDOW_S:
            key.spent_total -= key.spent.popleft()[1]
        if cfg.max_concurrent is not None and key.in_flight >= cfg.max_concurrent:
            return False
        if cfg.rpm is not None and len(key.starts) >= cfg.rpm:
            return False
        return cfg.tpm is None or key.spent_total < cfg.tpm

    def _next_change(self, healthy: list[_Key], now: float) -> float:
        """The earliest time a budget window frees or a cooling/parked key returns."""
        times = [k.until for k in self._keys if k.until is not None]
        for k in healthy:
            if k.config.rpm is not None and len(k.starts) >= k.config.rpm:
                times.append(k.starts[0] + WINDOW_S)
            if k.config.tpm is not None and k.spent:
                times.append(k.spent[0][0] + WINDOW_S)
        return max(now, min(times)) if times else float("inf")

    async def _wait(self, timeout: float) -> None:
        waiter = asyncio.get_running_loop().create_future()
        self._waiters.add(waiter)
        try:
            await asyncio.wait_for(waiter, timeout)
        except TimeoutError:
            pass
        finally:
            self._waiters.discard(waiter)

    def _wake(self) -> None:
        for waiter in self._waiters:
            if not waiter.done():
                waiter.set_result(None)
        self._waiters.clear()

    def _unavailable(self, exclude: Collection[str], now: float) -> GatewayError:
        returning = [k.until for k in self._keys if k.until is not None and k.id not in exclude]
        if returning:
            return RateLimitError(
                f"all API keys of provider {self.provider!r} are rate limited or out of quota",
                retry_after=max(0.0, min(returning) - now),
            )
        disabled = sum(k.state == DISABLED for k in self._keys)
        return UpstreamError(
            f"provider {self.provider!r} has no usable API key ({disabled} of "
            f"{len(self._keys)} disabled, the others already tried)"
        )

    # ---- outcomes and states -----------------------------------------------------------------

    def _finish(self, key: _Key, tokens: int, verdict: Verdict | None) -> None:
        key.in_flight -= 1
        now = self._clock()
        if tokens > 0:
            key.spent.append((now, tokens))
            key.spent_total += tokens
        state, seconds, reason = "", None, ""
        if verdict is None:
            key.strikes = 0
        else:
            key.failures += 1
            if verdict.state == COOLING:
                seconds = verdict.seconds
                if seconds is None:
                    seconds = min(BACKOFF_MAX_S, BACKOFF_BASE_S * 2**key.strikes)
                    seconds *= self._rng.uniform(0.5, 1.0)
                    key.strikes += 1
            elif verdict.state == PARKED:
                seconds = self.config.park_s if verdict.seconds is None else verdict.seconds
            if verdict.state != ACTIVE:
                state, reason = verdict.state, verdict.reason
                self._set_state(key, state, None if seconds is None else now + seconds, reason)
        if self.shared is not None:
            self.shared.finish(
                key, release=True, tokens=tokens, state=state, seconds=seconds, reason=reason
            )
        self._wake()

    def _set_state(self, key: _Key, state: str, until: float | None, reason: str) -> None:
        old = key.state
        if _SEVERITY[state] < _SEVERITY[old] and state != ACTIVE:
            return
        if state == old and key.until is not None and until is not None:
            until = max(until, key.until)
        self._change(key, state, until, reason)

    def _apply_shared(self, key: _Key, state: str, until: float | None, reason: str) -> None:
        """Mirror a key's state as the shared state has it (already ruled on there)."""
        if state == key.state == ACTIVE:
            return
        if (state, until, reason) != (key.state, key.until, key.reason):
            self._change(key, state, until, reason)
            if state == ACTIVE:
                self._wake()

    def _change(self, key: _Key, state: str, until: float | None, reason: str) -> None:
        old = key.state
        key.state, key.until, key.reason = state, until, reason
        if state == old:
            return
        level = logging.WARNING if state in (PARKED, DISABLED) else logging.INFO
        wait = f" for {until - self._clock():.1f} s" if until is not None else ""
        logger.log(
            level, "key %s (%s): %s -> %s%s: %s", key.id, key.masked, old, state, wait, reason
        )
        if self.on_change is not None:
            self.on_change(self.provider, key.id, old, state, reason)

    def _refresh(self, now: float) -> None:
        """Bring back the keys whose cool-down or parking is over."""
        for key in self._keys:
            if key.until is not None and key.until <= now:
                self._set_state(key, ACTIVE, None, f"{key.state} time over")

    def _key(self, key_id: str) -> _Key:
        for key in self._keys:
            if key.id == key_id:
                return key
        raise NotFoundError(f"no key {key_id!r} in provider {self.provider!r}")

    # ---- admin interface ---------------------------------------------------------------------

    def snapshot(self) -> list[dict]:
        """Each key's state, for the admin API and metrics (never the key itself).

        Returns:
            One dict per key: ``id``, ``masked``, ``state``, ``until`` (epoch seconds or None),
            ``reason``, ``in_flight``, ``requests``, ``failures``.
        """
        now = self._clock()
        self._refresh(now)
        offset = self._wall() - now
        return [
            {
                "id": k.id,
                "masked": k.masked,
                "state": k.state,
                "until": None if k.until is None else k.until + offset,
                "reason": k.reason,
                "in_flight": k.in_flight,
                "requests": k.requests,
                "failures": k.failures,
            }
            for k in self._keys
        ]

    def disable(self, key_id: str, reason: str) -> None:
        """Take a key out of service until `enable`.

        Args:
            key_id: ``{provider}/{index}``.
            reason: Why (shown in the snapshot).

        Raises:
            NotFoundError: No such key in this pool.
        """
        key = self._key(key_id)
        self._set_state(key, DISABLED, None, reason)
        if self.shared is not None:
            self.shared.finish(key, release=False, state=DISABLED, reason=reason)

    def enable(self, key_id: str) -> None:
        """Put a key back into service, whatever its state.

        Args:
            key_id: ``{provider}/{index}``.

        Raises:
            NotFoundError: No such key in this pool.
        """
        key = self._key(key_id)
        key.strikes = 0
        self._set_state(key, ACTIVE, None, "enabled")
        if self.shared is not None:
            self.shared.finish(key, release=False, state=ACTIVE, reason="enabled", force=True)
        self._wake()


def _rendezvous(affinity: str, key_id: str) -> bytes:
    return hashlib.blake2b(f"{affinity}\0{key_id}".encode(), digest_size=8).digest()
