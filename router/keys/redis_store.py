"""Key state shared by several router instances through Redis.

Each `KeyPool` stays the first gate and the local mirror: it picks keys by strategy and
affinity, and keeps the states that the admin API, metrics and logs show. With
``shared_state`` configured, the pool also asks Redis before it hands out a key, and tells
Redis how each request ended. Everything that must agree across instances lives in Redis
and changes only inside Lua scripts (atomic, one round trip, times from Redis's own ``TIME``
so instances with different clocks agree):

- ``{prefix}:key:{rid}:state``: a hash ``state``/``until`` (epoch ms)/``reason`` for a key
  that is cooling, parked or disabled (absent: active); it expires at ``until``.
- ``{prefix}:key:{rid}:leases``: the requests in flight on the key, a sorted set of lease ids
  (``{instance}:{n}``, one per admission) scored by when each expires (epoch ms).
- ``{prefix}:key:{rid}:rpm`` / ``:tpm``: sorted sets of request starts and spent tokens over
  the last `WINDOW_S`.

A key's ``rid`` is ``{provider}/{index}:{hash}``, the hash being a short digest of the key
string, so editing a provider's key list never mixes two keys' states (and the key itself
never reaches Redis). State changes and releases are published on ``{prefix}:events``; every
instance applies them to its mirror (firing ``on_change``) and wakes its waiting requests.

Why the in-flight count is never too low (``max_concurrent`` is never exceeded):

- A lease is only ever added, renewed or removed by its id, never overwritten by a count, so
  no snapshot of this instance's view can rewrite what Redis knows. An admission (`_ACQUIRE`)
  drops expired leases, counts the others and adds its own, expiring ``instance_ttl_s`` later;
  a release removes it (`_FINISH`, idempotent).
- Leases are renewed by a keeper thread with its own synchronous client, every
  ``heartbeat_s``, not by the event loop: a loop busy for longer than ``instance_ttl_s`` does
  not lose them. The keeper also renews leases whose admission is still on its way (the
  reply may wait for the loop) but only where Redis has them: renewing never creates one, so
  a release that overtook the renewal stays done. It adds back only leases this instance
  still holds that Redis lost (the process froze past ``instance_ttl_s``, Redis restarted, or
  the request was admitted on local state while Redis was down).
- So a lease stops counting when its request ends, or when the whole process (keeper
  included) has been silent for ``instance_ttl_s``: a killed instance's requests stop
  counting then. The remaining errors are all on the safe side: a lease whose admission
  failed or was cancelled, or one added back just as it was released, counts until it is
  removed or expires (capacity briefly lower), never fewer than are running.

When Redis cannot be reached, the router serves on its local state (a warning at most every
`WARN_EVERY_S`, ``connected: false`` in ``/health``): the keeper (whose timeouts are real)
decides that, or a connection error on the event loop. A timeout on the event loop is no
verdict: redis-py times reads on the loop, so a busy loop times out calls that Redis answered
at once; a timed-out admission is undone (its lease removed) and asked again. Once the keeper
reaches Redis again, the leases admitted locally meanwhile are added and the states re-read.
"""

from __future__ import annotations

import asyncio
import itertools
import json
import logging
import os
import socket
import threading
import time
from collections.abc import Callable, Coroutine
from dataclasses import dataclass
from typing import Any

import redis
import redis.asyncio as aioredis
from redis.asyncio.retry import Retry as AsyncRetry
from redis.backoff import NoBackoff
from redis.exceptions import RedisError
from redis.exceptions import TimeoutError as RedisTimeoutError
from redis.retry import Retry

from ..config import SharedStateConfig
from .state import ACTIVE, WINDOW_S, PooledKey
from .store import KeyMirror, shared_id

logger = logging.getLogger(__name__)

# At most one "Redis unavailable" warning per this many seconds (the others go to DEBUG).
WARN_EVERY_S = 30.0
# A request that found every candidate full on max_concurrent waits at most this long before
# asking Redis again (a release elsewhere normally wakes it sooner, through pub/sub).
POLL_S = 0.25
# Connections to Redis per instance (one of them for pub/sub), and how long a call waits
# for one when all are busy.
MAX_CONNECTIONS = 32
CONNECTION_WAIT_S = 5.0
# Requests still reporting to Redis get this long at shutdown.
FLUSH_TIMEOUT_S = 2.0

# Adds (or renews) a lease, and keeps the set's own expiry at its last lease's: a set whose
# leases all expired disappears by itself.
_HOLD = """
local function hold(k, lease, expiry)
  redis.call('ZADD', k, expiry, lease)
  redis.call('PEXPIREAT', k, redis.call('ZRANGE', k, -1, -1, 'WITHSCORES')[2])
end
"""

# ARGV: prefix, lease id, window ms, lease ttl ms, then per candidate (in preference order):
# rid, max_concurrent, rpm, tpm (-1: unlimited). Admits the first candidate that is active
# and has room, adding the lease to it; returns {index (0: none), now ms, ms until an rpm/tpm
# window frees (-1: unknown, or a candidate is at its max_concurrent: a release or an
# expired lease frees it), {rid, state, until, reason} of each candidate found not active}.
_ACQUIRE = (
    _HOLD
    + """
local t = redis.call('TIME')
local now = tonumber(t[1]) * 1000 + math.floor(tonumber(t[2]) / 1000)
local prefix, lease, window, ttl = ARGV[1], ARGV[2], tonumber(ARGV[3]), tonumber(ARGV[4])
local wait, states, full = -1, {}, false
local function sooner(ms)
  if wait < 0 or ms < wait then wait = ms end
end
for i = 1, (#ARGV - 4) / 4 do
  local at = 5 + (i - 1) * 4
  local rid = ARGV[at]
  local mc, rpm, tpm = tonumber(ARGV[at + 1]), tonumber(ARGV[at + 2]), tonumber(ARGV[at + 3])
  local k = prefix .. ':key:' .. rid
  local st = redis.call('HMGET', k .. ':state', 'state', 'until', 'reason')
  local untl = tonumber(st[2])
  if st[1] and not (untl and untl <= now) then
    states[#states + 1] = {rid, st[1], st[2] or '', st[3] or ''}
  else
    local room = true
    if mc >= 0 then
      redis.call('ZREMRANGEBYSCORE', k .. ':leases', '-inf', now)
      room = redis.call('ZCARD', k .. ':leases') < mc
      full = full or not room
    end
    if room and rpm >= 0 then
      redis.call('ZREMRANGEBYSCORE', k .. ':rpm', '-inf', now - window)
      if redis.call('ZCARD', k .. ':rpm') >= rpm then
        room = false
        sooner(tonumber(redis.call('ZRANGE', k .. ':rpm', 0, 0, 'WITHSCORES')[2]) + window - now)
      end
    end
    if room and tpm >= 0 then
      redis.call('ZREMRANGEBYSCORE', k .. ':tpm', '-inf', now - window)
      local spent = redis.call('ZRANGE', k .. ':tpm', 0, -1, 'WITHSCORES')
      local total = 0
      for j = 1, #spent, 2 do
        total = total + tonumber(string.match(spent[j], '^(%d+):'))
      end
      if total >= tpm then
        room = false
        sooner(tonumber(spent[2]) + window - now)
      end
    end
    if room then
      hold(k .. ':leases', lease, now + ttl)
      if rpm >= 0 then
        local seq = redis.call('INCR', prefix .. ':seq')
        redis.call('ZADD', k .. ':rpm', now, now .. ':' .. seq)
        redis.call('PEXPIRE', k .. ':rpm', window)
      end
      return {i, now, wait, states}
    end
  end
end
if full then wait = -1 end
return {0, now, wait, states}
"""
)

# ARGV: prefix, rid, lease id ('' : no request ended), tokens, window ms, state ('' : none),
# ms it lasts (-1: no end), reason, force (1: set the state whatever the current one, as
# `KeyPool.enable` does), notify (1: publish the release).
# A milder state never replaces a harsher one (the rule of `state.SEVERITY`). Publishes
# changes (and notified releases) on {prefix}:events; returns {state, until ('' : none),
# reason, now ms}.
_FINISH = """
local t = redis.call('TIME')
local now = tonumber(t[1]) * 1000 + math.floor(tonumber(t[2]) / 1000)
local prefix, rid, lease = ARGV[1], ARGV[2], ARGV[3]
local tokens, window, state, ms = tonumber(ARGV[4]), tonumber(ARGV[5]), ARGV[6], tonumber(ARGV[7])
local k = prefix .. ':key:' .. rid
if lease ~= '' then
  redis.call('ZREM', k .. ':leases', lease)
  redis.call('ZREMRANGEBYSCORE', k .. ':leases', '-inf', now)
end
if tokens > 0 then
  local seq = redis.call('INCR', prefix .. ':seq')
  redis.call('ZADD', k .. ':tpm', now, tokens .. ':' .. seq)
  redis.call('PEXPIRE', k .. ':tpm', window)
end
local severity = {active = 0, cooling = 1, parked = 2, disabled = 3}
local st = redis.call('HMGET', k .. ':state', 'state', 'until', 'reason')
local old, untl, reason = st[1] or 'active', tonumber(st[2]), st[3] or ''
if old ~= 'active' and untl and untl <= now then
  old, untl, reason = 'active', nil, ''
end
local new = old
local changed = false
if state ~= '' and (ARGV[9] == '1' or severity[state] >= severity[old]) then
  local until_new = nil
  if ms >= 0 then until_new = now + ms end
  if state == old and untl and until_new then until_new = math.max(untl, until_new) end
  changed = state ~= old or until_new ~= untl or reason ~= ARGV[8]
  new, untl, reason = state, until_new, ARGV[8]
  if new == 'active' then
    redis.call('DEL', k .. ':state')
  else
    redis.call('HSET', k .. ':state', 'state', new, 'reason', reason)
    if untl then
      redis.call('HSET', k .. ':state', 'until', untl)
      redis.call('PEXPIREAT', k .. ':state', untl)
    else
      redis.call('HDEL', k .. ':state', 'until')
      redis.call('PERSIST', k .. ':state')
    end
  end
end
if changed or ARGV[10] == '1' then
  redis.call('PUBLISH', prefix .. ':events', cjson.encode({
    rid = rid, state = new, ['until'] = untl or '', reason = reason, now = now}))
end
return {new, untl or '', reason, now}
"""

# ARGV: prefix, lease ttl ms, then (op, rid, lease id) triples, op being RENEW (extend the
# lease if Redis has it), KEEP (extend it, or report it lost), ADD (add it) or DROP (remove
# it). Returns {rid, lease id, ...} of the leases reported lost.
RENEW, KEEP, ADD, DROP = "renew", "keep", "add", "drop"
_LEASES = (
    _HOLD
    + """
local t = redis.call('TIME')
local now = tonumber(t[1]) * 1000 + math.floor(tonumber(t[2]) / 1000)
local prefix, expiry = ARGV[1], now + tonumber(ARGV[2])
local lost = {}
for i = 3, #ARGV, 3 do
  local op, rid, lease = ARGV[i], ARGV[i + 1], ARGV[i + 2]
  local k = prefix .. ':key:' .. rid .. ':leases'
  redis.call('ZREMRANGEBYSCORE', k, '-inf', now)
  if op == 'drop' then
    redis.call('ZREM', k, lease)
  elseif op == 'add' or redis.call('ZSCORE', k, lease) then
    hold(k, lease, expiry)
  elseif op == 'keep' then
    lost[#lost + 1] = rid
    lost[#lost + 1] = lease
  end
end
return lost
"""
)

# ARGV: prefix, then rids. Returns {now ms, {rid, state, until, reason} of each key not active}.
_STATES = """
local t = redis.call('TIME')
local now = tonumber(t[1]) * 1000 + math.floor(tonumber(t[2]) / 1000)
local states = {}
for i = 2, #ARGV do
  local st = redis.call('HMGET', ARGV[1] .. ':key:' .. ARGV[i] .. ':state', 'state', 'until', 'reason')
  local untl = tonumber(st[2])
  if st[1] and not (untl and untl <= now) then
    states[#states + 1] = {ARGV[i], st[1], st[2] or '', st[3] or ''}
  end
end
return {now, states}
"""


@dataclass(frozen=True)
class Held:
    """A lease this instance holds, as the keeper renews it.

    Args:
        rids: The key it holds; while its admission is on its way, every candidate.
        admitted: Known to be admitted (its reply came, or the pool admitted it locally); only
            such a lease is added back when Redis lost it.
    """

    rids: tuple[str, ...]
    admitted: bool

    def ops(self, lease: str, op: str) -> list[str]:
        """`_LEASES` arguments applying ``op`` to this lease on each of its keys."""
        return [arg for rid in self.rids for arg in (op, rid, lease)]


class SharedKeyState:
    """One router instance's link to the shared key state in Redis (a `SharedStore`).

    Args:
        config: The ``shared_state`` section.
        clock: Monotonic time source of the pools (for the mirror's ``until``).
    """

    def __init__(self, config: SharedStateConfig, clock: Callable[[], float] = time.monotonic):
        self.config = config
        self.instance = f"{socket.gethostname()}:{os.getpid()}:{os.urandom(3).hex()}"
        self.available = False
        self.last_error = ""
        self._clock = clock
        self._prefix = config.prefix
        self._window_ms = str(int(WINDOW_S * 1000))
        self._ttl_ms = str(int(config.instance_ttl_s * 1000))
        timeouts = {"socket_timeout": config.timeout_s, "socket_connect_timeout": config.timeout_s}
        # Past MAX_CONNECTIONS, calls wait for a connection (a burst is no Redis failure).
        pool = aioredis.BlockingConnectionPool.from_url(
            config.redis_url,
            max_connections=MAX_CONNECTIONS,
            timeout=CONNECTION_WAIT_S,
            decode_responses=True,
            retry=AsyncRetry(NoBackoff(), 0),
            **timeouts,
        )
        self._redis = aioredis.Redis(connection_pool=pool)
        self._acquire = self._redis.register_script(_ACQUIRE)
        self._finish = self._redis.register_script(_FINISH)
        self._leases = self._redis.register_script(_LEASES)
        self._states = self._redis.register_script(_STATES)
        # The keeper thread's own client: its timeouts are Redis's, not the event loop's lag.
        self._keeper_redis = redis.Redis.from_url(
            config.redis_url, decode_responses=True, retry=Retry(NoBackoff(), 0), **timeouts
        )
        self._keeper_leases = self._keeper_redis.register_script(_LEASES)
        self._keeper: threading.Thread | None = None
        # This instance's leases by id; the keeper reads them, hence the lock.
        self._held: dict[str, Held] = {}
        self._held_lock = threading.Lock()
        self._serial = itertools.count(1)
        self._keys: dict[str, tuple[KeyMirror, PooledKey]] = {}
        # Reports, and admissions of cancelled requests, still on their way; awaited at close.
        self._pending: set[asyncio.Future] = set()
        self._loops: list[asyncio.Task] = []
        self._resync = True
        self._warned = -WARN_EVERY_S
        # When Redis was last found down, and up: a call's failure or success that began
        # before the other verdict is stale (a loop or the keeper may report it late).
        self._down_at = self._up_at = -WARN_EVERY_S
        self._closed = threading.Event()

    # ---- lifetime ----------------------------------------------------------------------------

    async def start(self) -> None:
        """Reach Redis once (a failure only logs: the keeper keeps trying), and start the
        keeper thread, the state re-reads and the event listener."""
        loop = asyncio.get_running_loop()
        # The first contact from a thread too: its timeout is Redis's, not a busy loop's lag.
        started = time.monotonic()
        try:
            await asyncio.to_thread(self._renew)
        except (RedisError, OSError) as err:
            self._down(err, started)
        else:
            self.available = True
            self._up_at = started
            await self._read_states()  # if it times out, the heartbeat reads them again
        self._keeper = threading.Thread(
            target=self._keep, args=(loop,), name="redis-lease-keeper", daemon=True
        )
        self._keeper.start()
        self._loops = [loop.create_task(self._heartbeat()), loop.create_task(self._listen())]
        logger.info(
            "shared key state on Redis (prefix %s, instance %s): %s",
            self._prefix,
            self.instance,
            "connected" if self.available else "not reachable yet, serving on local state",
        )

    async def close(self) -> None:
        """Send the outcomes still pending (bounded by `FLUSH_TIMEOUT_S`, including those that
        arrive meanwhile), stop the keeper and the loops, and drop this instance's remaining
        leases so that others stop counting them at once."""
        loop = asyncio.get_running_loop()
        deadline = loop.time() + FLUSH_TIMEOUT_S
        while self._pending and (left := deadline - loop.time()) > 0:
            await asyncio.wait(set(self._pending), timeout=left)
        remaining = self._ops_all(DROP)
        # The loops and the keeper also stop by this flag: redis-py may swallow a cancellation.
        self._closed.set()
        for task in self._loops + list(self._pending):
            task.cancel()
        await asyncio.gather(*self._loops, *self._pending, return_exceptions=True)
        if self._keeper is not None:
            await asyncio.to_thread(self._keeper.join)
        if self.available and remaining:
            try:
                await self._leases(args=[self._prefix, self._ttl_ms, *remaining])
            except (RedisError, OSError) as err:
                logger.debug("shared state: could not drop this instance's leases: %s", err)
        await self._redis.aclose()
        self._keeper_redis.close()

    def status(self) -> dict[str, Any]:
        """For ``/health`` and the admin API: ``backend``, ``connected``, ``instance``,
        ``last_error``."""
        return {
            "backend": "redis",
            "connected": self.available,
            "instance": self.instance,
            "last_error": self.last_error,
        }

    def attach(self, pool: KeyMirror) -> None:
        """Share a pool's keys (replacing the keys of an older pool of the same provider).

        Args:
            pool: A pool built with this shared state.
        """
        self._keys = {
            rid: entry for rid, entry in self._keys.items() if entry[0].provider != pool.provider
        }
        for key in pool.keys:
            key.shared_id = shared_id(key.id, key.config.key)
            self._keys[key.shared_id] = (pool, key)
        self._resync = True

    # ---- the pool's calls --------------------------------------------------------------------

    async def acquire(self, candidates: list[PooledKey]) -> tuple[PooledKey | None, str, float]:
        """Admit the first candidate that is active and has room across all instances (the
        states found on the way go to the mirror).

        Args:
            candidates: Keys the pool would use, in its order of preference.

        Returns:
            The admitted key, its lease id (for `finish`) and 0; or None, '' and how long to
            wait before asking again (0 when Redis just became unavailable: the pool then
            decides on its local state).
        """
        lease = f"{self.instance}:{next(self._serial)}"
        # Renewed (where Redis has it) while the reply is on its way: it may wait for the loop.
        self._hold(lease, Held(tuple(key.shared_id for key in candidates), admitted=False))
        args: list[str | int] = [self._prefix, lease, self._window_ms, self._ttl_ms]
        for key in candidates:
            cfg = key.config
            args += [
                key.shared_id,
                *(-1 if v is None else v for v in (cfg.max_concurrent, cfg.rpm, cfg.tpm)),
            ]
        # redis-py can finish a command whose caller was cancelled as if nothing happened: the
        # script runs in its own task, and one admitted for a cancelled request is released.
        started = time.monotonic()
        call = asyncio.ensure_future(self._acquire(args=args))
        try:
            index, now_ms, wait_ms, states = await asyncio.shield(call)
        except asyncio.CancelledError:
            # Tracked until its admission is released, so that close() and `_pending` see it.
            self._pending.add(call)
            call.add_done_callback(lambda done: self._settle(done, lease, candidates))
            raise
        except (RedisError, OSError) as err:
            self._failed(err, started)
            self._abandon(lease)
            return None, "", POLL_S if self.available else 0.0
        for rid, state, until, reason in states:
            self._mirror(rid, state, until, reason, now_ms)
        if not index:
            self._forget(lease)
            return None, "", POLL_S if wait_ms < 0 else wait_ms / 1000
        key = candidates[index - 1]
        self._hold(lease, Held((key.shared_id,), admitted=True))
        return key, lease, 0.0

    def admit_locally(self, key: PooledKey) -> str:
        """A lease id for a request the pool admitted on its local state while Redis is
        unavailable: the keeper adds it to Redis once Redis is back.

        Args:
            key: The key the pool leased.
        """
        lease = f"{self.instance}:{next(self._serial)}"
        self._hold(lease, Held((key.shared_id,), admitted=True))
        return lease

    def finish(
        self,
        key: PooledKey,
        *,
        lease: str = "",
        tokens: int = 0,
        state: str = "",
        seconds: float | None = None,
        reason: str = "",
        force: bool = False,
    ) -> None:
        """Report a request's end and/or a key's new state to Redis (in a tracked task: the
        lease's calls are synchronous).

        Args:
            key: The key.
            lease: The id of the lease whose request ended ('' : none ended).
            tokens: Tokens it spent, for the tpm budget.
            state: The key's new state ('' : none).
            seconds: How long the state lasts (None: until changed).
            reason: Why.
            force: Set ``state`` whatever the current one (`KeyPool.enable`).
        """
        if lease:
            self._forget(lease)  # no longer renewed: if the report fails, it expires
        if not self.available:
            return
        ms = -1 if seconds is None else max(0, int(seconds * 1000))
        limited = key.config.max_concurrent is not None or key.config.rpm is not None
        args = [
            self._prefix,
            key.shared_id,
            lease,
            tokens,
            self._window_ms,
            state,
            ms,
            reason,
            int(force),
            int(bool(lease) and limited),
        ]
        self._spawn(self._report(args, mirror=bool(state)))

    # ---- leases ------------------------------------------------------------------------------

    def _hold(self, lease: str, held: Held) -> None:
        with self._held_lock:
            self._held[lease] = held

    def _forget(self, lease: str) -> Held | None:
        with self._held_lock:
            return self._held.pop(lease, None)

    def _ops_all(self, op: str) -> list[str]:
        """`_LEASES` arguments applying ``op`` to every lease this instance holds."""
        with self._held_lock:
            return [arg for lease, held in self._held.items() for arg in held.ops(lease, op)]

    def _settle(self, call: asyncio.Future, lease: str, candidates: list[PooledKey]) -> None:
        """The admission of a cancelled request came back: release what it admitted."""
        try:
            if call.cancelled() or call.exception() is not None:
                self._abandon(lease)
            elif index := call.result()[0]:
                self.finish(candidates[index - 1], lease=lease)
            else:
                self._forget(lease)
        finally:
            self._pending.discard(call)  # after finish() tracked the release's report

    def _abandon(self, lease: str) -> None:
        """Undo an admission whose outcome is unknown (its call failed): remove its lease from
        every candidate (idempotent; where it is not removed, it expires unrenewed)."""
        held = self._forget(lease)
        if held is not None and self.available:
            self._spawn(self._apply(held.ops(lease, DROP)))

    async def _apply(self, ops: list[str]) -> None:
        started = time.monotonic()
        try:
            await self._leases(args=[self._prefix, self._ttl_ms, *ops])
        except (RedisError, OSError) as err:
            self._failed(err, started)

    def _keep(self, loop: asyncio.AbstractEventLoop) -> None:
        """The keeper thread: renew this instance's leases every ``heartbeat_s`` until close,
        and tell the event loop whether Redis answered."""
        while not self._closed.wait(self.config.heartbeat_s):
            started = time.monotonic()
            try:
                self._renew()
            except (RedisError, OSError) as err:
                outcome: tuple[Callable[..., None], ...] = (self._down, err, started)
            else:
                outcome = (self._back, started)
            try:
                loop.call_soon_threadsafe(*outcome)
            except RuntimeError:
                return  # the event loop is closed: nothing is served, let the leases expire

    def _renew(self) -> None:
        """Extend the leases Redis has; add back the admitted ones it lost that this instance
        still holds (checked after the call: a lease released since is not added back)."""
        with self._held_lock:
            ops = [
                arg
                for lease, held in self._held.items()
                for arg in held.ops(lease, KEEP if held.admitted else RENEW)
            ]
        lost = self._keeper_leases(args=[self._prefix, self._ttl_ms, *ops])
        with self._held_lock:
            again = [
                arg
                for rid, lease in zip(lost[::2], lost[1::2], strict=True)
                if lease in self._held
                for arg in (ADD, rid, lease)
            ]
        if again:
            self._keeper_leases(args=[self._prefix, self._ttl_ms, *again])
            logger.info(
                "shared key state: added %d lease(s) of this instance that Redis did not have "
                "(admitted while it was unavailable, or lost by Redis)",
                len(again) // 3,
            )

    # ---- internals ---------------------------------------------------------------------------

    def _spawn(self, coro: Coroutine[Any, Any, None]) -> None:
        if self._closed.is_set():
            coro.close()  # closing: what is left is dropped with this instance's leases
            return
        task = asyncio.get_running_loop().create_task(coro)
        self._pending.add(task)
        task.add_done_callback(self._pending.discard)

    async def _report(self, args: list, mirror: bool) -> None:
        started = time.monotonic()
        try:
            state, until, reason, now_ms = await self._finish(args=args)
        except (RedisError, OSError) as err:
            self._failed(err, started)
            return
        if mirror:
            # Only a state change is mirrored here (its event may come later): a plain
            # release's answer could predate a change this instance has just made.
            self._mirror(args[1], state, until, reason, now_ms)

    def _mirror(self, rid: str, state: str, until: str, reason: str, now_ms: int) -> None:
        """Apply a state read from Redis to the local mirror."""
        entry = self._keys.get(rid)
        if entry is None:
            return
        pool, key = entry
        until_mono = None if until == "" else self._clock() + (float(until) - now_ms) / 1000
        pool.apply_shared(key, state, until_mono, reason)

    def _failed(self, err: BaseException, since: float) -> None:
        """A call from the event loop failed. A timeout there is no verdict on Redis: redis-py
        times reads on the loop, so a busy loop times out calls that Redis answered at once
        (the keeper, whose timeouts are real, tells a slow Redis). Other failures: it is down."""
        if isinstance(err, (RedisTimeoutError, TimeoutError)):
            logger.debug("shared key state: a Redis call timed out on the event loop: %s", err)
            return
        self._down(err, since)

    def _down(self, err: BaseException, since: float) -> None:
        """Redis failed (a call that began at ``since``): serve locally, warn (rate-limited),
        resync when it is back; unless Redis was found reachable after that call began."""
        if since < self._up_at:
            logger.debug("shared key state: a Redis call from before it was back failed: %s", err)
            return
        self.last_error = f"{type(err).__name__}: {err}"
        self._resync = True
        self._down_at = time.monotonic()
        was = self.available
        self.available = False
        now = time.monotonic()
        if was or now - self._warned >= WARN_EVERY_S:
            self._warned = now
            logger.warning(
                "shared key state: Redis unavailable (%s); serving on this instance's "
                "local key state until it is back",
                self.last_error,
            )
        else:
            logger.debug("shared key state: Redis still unavailable: %s", self.last_error)

    def _back(self, since: float) -> None:
        """The keeper reached Redis (and added the leases admitted locally): share again,
        unless a failure was seen after that call began."""
        if self.available or self._closed.is_set() or since < self._down_at:
            return
        self.available = True
        self._up_at = since
        self.last_error = ""
        self._resync = True
        logger.info("shared key state: Redis reachable, sharing key state")
        for pool in {pool for pool, _ in self._keys.values()}:
            pool.wake()

    async def _read_states(self) -> bool:
        """Read every key's shared state into the mirror; whether Redis answered."""
        self._resync = False
        started = time.monotonic()
        try:
            now_ms, states = await self._states(args=[self._prefix, *self._keys])
        except (RedisError, OSError) as err:
            self._resync = True
            self._failed(err, started)
            return False
        found = {rid: (state, until, reason) for rid, state, until, reason in states}
        for rid in self._keys:
            state, until, reason = found.get(rid, (ACTIVE, "", "active in the shared state"))
            self._mirror(rid, state, until, reason, now_ms)
        return True

    async def _heartbeat(self) -> None:
        """Re-read the shared states when they may have changed unseen: after a failure, a
        (re)subscription or an attached pool."""
        while not self._closed.is_set():
            await asyncio.sleep(self.config.heartbeat_s)
            if self._resync and self.available:
                await self._read_states()

    async def _listen(self) -> None:
        """Apply the other instances' state changes and wake requests on their releases."""
        channel = f"{self._prefix}:events"
        while not self._closed.is_set():
            pubsub = self._redis.pubsub()
            started = time.monotonic()
            try:
                await pubsub.subscribe(channel)
                # Changes published while unsubscribed are read by the next heartbeat.
                self._resync = True
                while not self._closed.is_set():
                    started = time.monotonic()
                    message = await pubsub.get_message(ignore_subscribe_messages=True, timeout=1.0)
                    if message is not None:
                        self._on_event(message["data"])
            except (RedisError, OSError) as err:
                self._failed(err, started)
            finally:
                await pubsub.aclose()
            await asyncio.sleep(self.config.heartbeat_s)

    def _on_event(self, data: str) -> None:
        try:
            event = json.loads(data)
            rid, state, until, reason, now_ms = (
                event[f] for f in ("rid", "state", "until", "reason", "now")
            )
        except (json.JSONDecodeError, KeyError, TypeError) as err:
            logger.warning("shared key state: ignoring a malformed event: %s", err)
            return
        self._mirror(rid, state, str(until), reason, now_ms)
        entry = self._keys.get(rid)
        if entry is not None:
            entry[0].wake()
