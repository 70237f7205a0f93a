"""Key state shared by several router instances through Redis.

Each `KeyPool` stays the first gate and the local mirror: it picks keys by strategy and
affinity, and keeps the states that the admin API, metrics and logs show. With
``shared_state`` configured, the pool also asks Redis before it hands out a key, and tells
Redis how each request ended. Everything that must agree across instances lives in Redis
and changes only inside Lua scripts (atomic, one round trip, times from Redis's own ``TIME``
so instances with different clocks agree):

- ``{prefix}:key:{rid}:state``: a hash ``state``/``until`` (epoch ms)/``reason`` for a key
  that is cooling, parked or disabled (absent: active); it expires at ``until``.
- ``{prefix}:key:{rid}:inflight``: a hash instance id -> requests in flight.
- ``{prefix}:key:{rid}:rpm`` / ``:tpm``: sorted sets of request starts and spent tokens over
  the last `WINDOW_S`.
- ``{prefix}:instance:{id}``: an instance's liveness, refreshed every ``heartbeat_s`` with a
  ``instance_ttl_s`` expiry; in-flight counts of instances without it are dropped, so a
  killed instance's requests stop counting.

A key's ``rid`` is ``{provider}/{index}:{hash}``, the hash being a short digest of the key
string, so editing a provider's key list never mixes two keys' states (and the key itself
never reaches Redis). State changes and releases are published on ``{prefix}:events``; every
instance applies them to its mirror (firing ``on_change``) and wakes its waiting requests.

When Redis cannot be reached or errors, the router serves on its local state (a warning at
most every `WARN_EVERY_S`, ``connected: false`` in ``/health``) and shares again once the
heartbeat reaches Redis: it then re-sends its in-flight counts and reads the shared states.
"""

from __future__ import annotations

import asyncio
import hashlib
import json
import logging
import os
import socket
import time
from collections.abc import Callable, Coroutine
from typing import Any

import redis.asyncio as aioredis
from redis.asyncio.retry import Retry
from redis.backoff import NoBackoff
from redis.exceptions import RedisError

from ..config import SharedStateConfig
from .state import ACTIVE, WINDOW_S, PooledKey
from .store import KeyMirror

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

# ARGV: prefix, instance, window ms, then per candidate (in preference order): rid,
# max_concurrent, rpm, tpm (-1: unlimited). Admits the first candidate that is active and has
# room; returns {index (0: none), now ms, ms until an rpm/tpm window frees (-1: unknown, or a
# candidate is at its max_concurrent: a release or an expired instance frees it), {rid, state,
# until, reason} of each candidate found not active}.
_ACQUIRE = """
local t = redis.call('TIME')
local now = tonumber(t[1]) * 1000 + math.floor(tonumber(t[2]) / 1000)
local prefix, inst, window = ARGV[1], ARGV[2], tonumber(ARGV[3])
local wait, states, full = -1, {}, false
local function sooner(ms)
  if wait < 0 or ms < wait then wait = ms end
end
for i = 1, (#ARGV - 3) / 4 do
  local at = 4 + (i - 1) * 4
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
      local flight, total = redis.call('HGETALL', k .. ':inflight'), 0
      for j = 1, #flight, 2 do
        if flight[j] == inst or redis.call('EXISTS', prefix .. ':instance:' .. flight[j]) == 1 then
          total = total + tonumber(flight[j + 1])
        else
          redis.call('HDEL', k .. ':inflight', flight[j])
        end
      end
      room = total < mc
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
      redis.call('HINCRBY', k .. ':inflight', inst, 1)
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

# ARGV: prefix, instance, rid, release (1: one request fewer in flight), tokens, window ms,
# state ('' : none), ms it lasts (-1: no end), reason, force (1: set the state whatever the
# current one, as `KeyPool.enable` does), notify (1: publish the release).
# A milder state never replaces a harsher one (the rule of `state.SEVERITY`). Publishes
# changes (and notified releases) on {prefix}:events; returns {state, until ('' : none),
# reason, now ms}.
_FINISH = """
local t = redis.call('TIME')
local now = tonumber(t[1]) * 1000 + math.floor(tonumber(t[2]) / 1000)
local prefix, inst, rid = ARGV[1], ARGV[2], ARGV[3]
local tokens, window, state, ms = tonumber(ARGV[5]), tonumber(ARGV[6]), ARGV[7], tonumber(ARGV[8])
local k = prefix .. ':key:' .. rid
if ARGV[4] == '1' then
  if redis.call('HINCRBY', k .. ':inflight', inst, -1) <= 0 then
    redis.call('HDEL', k .. ':inflight', inst)
  end
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
if state ~= '' and (ARGV[10] == '1' or severity[state] >= severity[old]) then
  local until_new = nil
  if ms >= 0 then until_new = now + ms end
  if state == old and untl and until_new then until_new = math.max(untl, until_new) end
  changed = state ~= old or until_new ~= untl or reason ~= ARGV[9]
  new, untl, reason = state, until_new, ARGV[9]
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
if changed or ARGV[11] == '1' then
  redis.call('PUBLISH', prefix .. ':events', cjson.encode({
    rid = rid, state = new, ['until'] = untl or '', reason = reason, now = now}))
end
return {new, untl or '', reason, now}
"""

# ARGV: prefix, instance, then (rid, in flight here or -1) pairs: sets this instance's in-flight
# counts (those not -1), and returns {now ms, {rid, state, until, reason} of each key not active}.
_SYNC = """
local t = redis.call('TIME')
local now = tonumber(t[1]) * 1000 + math.floor(tonumber(t[2]) / 1000)
local prefix, inst = ARGV[1], ARGV[2]
local states = {}
for i = 3, #ARGV, 2 do
  local k = prefix .. ':key:' .. ARGV[i]
  local count = tonumber(ARGV[i + 1])
  if count > 0 then
    redis.call('HSET', k .. ':inflight', inst, count)
  elseif count == 0 then
    redis.call('HDEL', k .. ':inflight', inst)
  end
  local st = redis.call('HMGET', k .. ':state', 'state', 'until', 'reason')
  local untl = tonumber(st[2])
  if st[1] and not (untl and untl <= now) then
    states[#states + 1] = {ARGV[i], st[1], st[2] or '', st[3] or ''}
  end
end
return {now, states}
"""

# Lease outcomes still on their way to Redis; awaited at shutdown.
Task = asyncio.Task[None]


def shared_id(key_id: str, key: str) -> str:
    """A key's id in Redis: ``{provider}/{index}:{hash}``, where the hash is 8 hex digits of a
    digest of the key string (so a replaced key at the same index starts afresh).

    Args:
        key_id: The pool's id, ``{provider}/{index}``.
        key: The API key string.
    """
    return f"{key_id}:{hashlib.blake2b(key.encode(), digest_size=4).hexdigest()}"


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
        # Past MAX_CONNECTIONS, calls wait for a connection (a burst is no Redis failure).
        pool = aioredis.BlockingConnectionPool.from_url(
            config.redis_url,
            max_connections=MAX_CONNECTIONS,
            timeout=CONNECTION_WAIT_S,
            decode_responses=True,
            socket_timeout=config.timeout_s,
            socket_connect_timeout=config.timeout_s,
            retry=Retry(NoBackoff(), 0),
        )
        self._redis = aioredis.Redis(connection_pool=pool)
        self._acquire = self._redis.register_script(_ACQUIRE)
        self._finish = self._redis.register_script(_FINISH)
        self._sync = self._redis.register_script(_SYNC)
        self._keys: dict[str, tuple[KeyMirror, PooledKey]] = {}
        self._pending: set[Task] = set()
        self._loops: list[Task] = []
        self._resync = True
        self._warned = -WARN_EVERY_S
        self._closing = False

    # ---- lifetime ----------------------------------------------------------------------------

    async def start(self) -> None:
        """Reach Redis once (a failure only logs: the heartbeat keeps trying) and start the
        heartbeat and the event listener."""
        await self._beat()
        loop = asyncio.get_running_loop()
        self._loops = [loop.create_task(self._heartbeat()), loop.create_task(self._listen())]
        logger.info(
            "shared key state on Redis (prefix %s, instance %s): %s",
            self._prefix,
            self.instance,
            "connected" if self.available else "not reachable yet, serving on local state",
        )

    async def close(self) -> None:
        """Send the outcomes still pending (bounded by `FLUSH_TIMEOUT_S`), stop the loops and
        drop this instance's liveness so that others stop counting its requests at once."""
        if self._pending:
            await asyncio.wait(set(self._pending), timeout=FLUSH_TIMEOUT_S)
        # The loops also stop by this flag: redis-py may swallow a cancellation.
        self._closing = True
        for task in self._loops + list(self._pending):
            task.cancel()
        await asyncio.gather(*self._loops, *self._pending, return_exceptions=True)
        if self.available:
            try:
                await self._redis.delete(self._instance_key(self.instance))
            except (RedisError, OSError) as err:
                logger.debug("shared state: could not drop the liveness key: %s", err)
        await self._redis.aclose()

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

    async def acquire(self, candidates: list[PooledKey]) -> tuple[PooledKey | None, float]:
        """Admit the first candidate that is active and has room across all instances (the
        states found on the way go to the mirror).

        Args:
            candidates: Keys the pool would use, in its order of preference.

        Returns:
            The admitted key and 0, or None and how long to wait before asking again. When
            Redis is unavailable: the first candidate, admitted locally.
        """
        args: list[str | int] = [self._prefix, self.instance, self._window_ms]
        for key in candidates:
            cfg = key.config
            args += [
                key.shared_id,
                *(-1 if v is None else v for v in (cfg.max_concurrent, cfg.rpm, cfg.tpm)),
            ]
        # redis-py can finish a command whose caller was cancelled as if nothing happened: the
        # script runs in its own task, and one admitted for a cancelled request is released.
        call = asyncio.ensure_future(self._acquire(args=args))
        try:
            index, now_ms, wait_ms, states = await asyncio.shield(call)
        except (RedisError, OSError) as err:
            self._down(err)
            return candidates[0], 0.0
        except asyncio.CancelledError:
            call.add_done_callback(lambda done: self._undo(done, candidates))
            raise
        for rid, state, until, reason in states:
            self._mirror(rid, state, until, reason, now_ms)
        if index:
            return candidates[index - 1], 0.0
        return None, POLL_S if wait_ms < 0 else wait_ms / 1000

    def _undo(self, call: asyncio.Future, candidates: list[PooledKey]) -> None:
        """Release a shared admission whose request was cancelled while it was on its way."""
        if call.cancelled() or call.exception() is not None:
            return
        index = call.result()[0]
        if index:
            self.finish(candidates[index - 1], release=True)

    def finish(
        self,
        key: PooledKey,
        *,
        release: bool,
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
            release: A request on the key ended (its in-flight count goes down).
            tokens: Tokens it spent, for the tpm budget.
            state: The key's new state ('' : none).
            seconds: How long the state lasts (None: until changed).
            reason: Why.
            force: Set ``state`` whatever the current one (`KeyPool.enable`).
        """
        if not self.available:
            return
        ms = -1 if seconds is None else max(0, int(seconds * 1000))
        limited = key.config.max_concurrent is not None or key.config.rpm is not None
        args = [
            self._prefix,
            self.instance,
            key.shared_id,
            int(release),
            tokens,
            self._window_ms,
            state,
            ms,
            reason,
            int(force),
            int(release and limited),
        ]
        self._spawn(self._report(args))

    # ---- internals ---------------------------------------------------------------------------

    def _spawn(self, coro: Coroutine[Any, Any, None]) -> None:
        task = asyncio.get_running_loop().create_task(coro)
        self._pending.add(task)
        task.add_done_callback(self._pending.discard)

    async def _report(self, args: list) -> None:
        try:
            state, until, reason, now_ms = await self._finish(args=args)
        except (RedisError, OSError) as err:
            self._down(err)
            return
        if args[6]:
            # Only a state change is mirrored here (its event may come later): a plain
            # release's answer could predate a change this instance has just made.
            self._mirror(args[2], state, until, reason, now_ms)

    def _mirror(self, rid: str, state: str, until: str, reason: str, now_ms: int) -> None:
        """Apply a state read from Redis to the local mirror."""
        entry = self._keys.get(rid)
        if entry is None:
            return
        pool, key = entry
        until_mono = None if until == "" else self._clock() + (float(until) - now_ms) / 1000
        pool.apply_shared(key, state, until_mono, reason)

    def _down(self, err: BaseException) -> None:
        """Redis failed: serve locally, warn (rate-limited), resync when it is back."""
        self.last_error = f"{type(err).__name__}: {err}"
        self._resync = True
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

    def _instance_key(self, instance: str) -> str:
        return f"{self._prefix}:instance:{instance}"

    async def _beat(self) -> None:
        """Refresh this instance's liveness. After a failure or a lapse of the liveness,
        send this instance's in-flight counts again; then, and after a (re)subscription or
        an attached pool, read the shared states into the mirror.

        Counts are only re-sent while nothing else of this instance talks to Redis (after a
        failure) or when Redis already dropped them (a lapse): a snapshot taken while
        acquires are on their way would undercount."""
        ttl_ms = int(self.config.instance_ttl_s * 1000)
        try:
            alive = await self._redis.set(
                self._instance_key(self.instance), "1", px=ttl_ms, get=True
            )
            write = alive is None or not self.available
            if write or self._resync:
                args: list[str | int] = [self._prefix, self.instance]
                for rid, (_, key) in self._keys.items():
                    args += [rid, key.in_flight if write else -1]
                now_ms, states = await self._sync(args=args)
                self._resync = False
                found = {rid: (state, until, reason) for rid, state, until, reason in states}
                for rid in self._keys:
                    state, until, reason = found.get(
                        rid, (ACTIVE, "", "active in the shared state")
                    )
                    self._mirror(rid, state, until, reason, now_ms)
        except (RedisError, OSError) as err:
            self._down(err)
            return
        if not self.available:
            self.available = True
            self.last_error = ""
            logger.info("shared key state: Redis reachable, sharing key state")
            for pool in {pool for pool, _ in self._keys.values()}:
                pool.wake()

    async def _heartbeat(self) -> None:
        while not self._closing:
            await asyncio.sleep(self.config.heartbeat_s)
            await self._beat()

    async def _listen(self) -> None:
        """Apply the other instances' state changes and wake requests on their releases."""
        channel = f"{self._prefix}:events"
        while not self._closing:
            pubsub = self._redis.pubsub()
            try:
                await pubsub.subscribe(channel)
                # Changes published while unsubscribed are read by the next heartbeat.
                self._resync = True
                while not self._closing:
                    message = await pubsub.get_message(ignore_subscribe_messages=True, timeout=1.0)
                    if message is not None:
                        self._on_event(message["data"])
            except (RedisError, OSError) as err:
                self._down(err)
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
