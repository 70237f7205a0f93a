"""A provider's key pool: picks a key per request (strategy, affinity, per-key limits), waits
in a bounded queue while all are busy, and moves keys between states by the verdicts on
their requests (see `state` for the states, `failures` for the verdicts)."""

from __future__ import annotations

import asyncio
import hashlib
import logging
import math
import random
import time
from collections import OrderedDict
from collections.abc import Callable, Collection

from aiohttp import web

from ..config import ProviderConfig
from ..errors import GatewayError, NotFoundError, RateLimitError, UpstreamError
from .failures import Verdict
from .state import ACTIVE, COOLING, DISABLED, PARKED, SEVERITY, PooledKey, mask_key
from .store import SharedStore

logger = logging.getLogger(__name__)

# Backoff for 429s without any hint: 1 s doubling per consecutive 429, at most 60 s, times a
# random factor in [0.5, 1] so keys cooled together do not come back together.
BACKOFF_BASE_S = 1.0
BACKOFF_MAX_S = 60.0
# Conversations remembered for affinity (least recently used are forgotten first).
AFFINITY_ENTRIES = 10_000
# Retry-After sent with a 429 for a full queue or a queue wait that ran out.
QUEUE_RETRY_AFTER_S = 1.0

ChangeHook = Callable[[str, str, str, str, str], None]


class Lease:
    """One request's use of a key; release it exactly once (further calls do nothing).

    Args:
        pool: The pool it came from.
        key: The key (None for a keyless provider).
        shared_lease: Its lease id in the pool's shared store ('' : none).
    """

    def __init__(self, pool: KeyPool, key: PooledKey | None, shared_lease: str = "") -> None:
        self._pool = pool
        self._key = key
        self._shared_lease = shared_lease
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
            self._pool._finish(self._key, tokens, None, self._shared_lease)

    def fail(self, verdict: Verdict) -> None:
        """The request failed; ``verdict`` says what that means for the key.

        Args:
            verdict: From `classify_failure`.
        """
        if not self._done:
            self._done = True
            self._pool._finish(self._key, 0, verdict, self._shared_lease)

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
                self._pool.shared.finish(self._key, state=COOLING, seconds=seconds, reason=reason)

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
        shared: SharedStore | None = None,
    ) -> None:
        self.provider = config.name
        self.config = config
        self.on_change = on_change
        self._clock = clock
        self._wall = wall
        self._rng = rng or random.Random()
        self._keys = [
            PooledKey(i, f"{config.name}/{i}", k, mask_key(k.key))
            for i, k in enumerate(config.key_configs)
        ]
        self._cursor = 0
        self._affinity: OrderedDict[str, PooledKey] = OrderedDict()
        self._waiters: set[asyncio.Future] = set()
        self._queued = 0
        self.shared = shared
        if shared is not None:
            shared.attach(self)

    def __len__(self) -> int:
        return len(self._keys)

    @property
    def keys(self) -> list[PooledKey]:
        """The pool's keys, in the provider's order (a shared store mirrors their states)."""
        return self._keys

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
                ready = [k for k in healthy if k.has_room(now)]
                pause = math.inf
                if ready:
                    if self.shared is None:
                        return self._lease(self._choose(ready, affinity), now)
                    if not self.shared.available:
                        key = self._choose(ready, affinity)
                        return self._lease(key, now, self.shared.admit_locally(key))
                    first = self._choose(ready, affinity)
                    others = [k for k in ready if k is not first]
                    key, lease, pause = await self.shared.acquire([first, *others])
                    if key is not None:
                        return self._lease(key, self._clock(), lease)
                    if not self.shared.available:
                        # The store failed on the way: decide again on the local state, whose
                        # room other requests may have taken meanwhile.
                        continue
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

    def _choose(self, ready: list[PooledKey], affinity: str | None) -> PooledKey:
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

    def _by_strategy(self, ready: list[PooledKey]) -> PooledKey:
        n = len(self._keys)

        def rotation(k: PooledKey) -> int:
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

    def _lease(self, key: PooledKey, now: float, shared_lease: str = "") -> Lease:
        key.start_request(now)
        return Lease(self, key, shared_lease)

    def _next_change(self, healthy: list[PooledKey], now: float) -> float:
        """The earliest time a budget window frees or a cooling/parked key returns."""
        times = [k.until for k in self._keys if k.until is not None]
        for k in healthy:
            times += k.window_frees()
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

    def wake(self) -> None:
        """Let the queued requests look for a key again (one was released or came back)."""
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

    def _finish(
        self, key: PooledKey, tokens: int, verdict: Verdict | None, shared_lease: str
    ) -> None:
        now = self._clock()
        key.end_request(now, tokens)
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
                key, lease=shared_lease, tokens=tokens, state=state, seconds=seconds, reason=reason
            )
        self.wake()

    def _set_state(self, key: PooledKey, state: str, until: float | None, reason: str) -> None:
        old = key.state
        if SEVERITY[state] < SEVERITY[old] and state != ACTIVE:
            return
        if state == old and key.until is not None and until is not None:
            until = max(until, key.until)
        self._change(key, state, until, reason)

    def apply_shared(self, key: PooledKey, state: str, until: float | None, reason: str) -> None:
        """Mirror a key's state as the shared state has it (already ruled on there).

        Args:
            key: One of this pool's keys.
            state: Its state in the shared store.
            until: When that state ends (monotonic clock; None: not by itself).
            reason: Why, as the shared store has it.
        """
        if state == key.state == ACTIVE:
            return
        if (state, until, reason) != (key.state, key.until, key.reason):
            self._change(key, state, until, reason)
            if state == ACTIVE:
                self.wake()

    def _change(self, key: PooledKey, state: str, until: float | None, reason: str) -> None:
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

    def _key(self, key_id: str) -> PooledKey:
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
            self.shared.finish(key, state=DISABLED, reason=reason)

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
            self.shared.finish(key, state=ACTIVE, reason="enabled", force=True)
        self.wake()


def _rendezvous(affinity: str, key_id: str) -> bytes:
    return hashlib.blake2b(f"{affinity}\0{key_id}".encode(), digest_size=8).digest()


# The app's key pools by provider name (filled by the app's backends cleanup context).
KEY_POOLS = web.AppKey("key_pools", dict[str, KeyPool])
