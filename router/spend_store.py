"""Where spend is kept: counters of tokens and USD (spent, and reserved by requests in flight)
per budget scope and period, behind one protocol.

`SQLiteSpendStore` (the default) keeps them in a SQLite file (WAL, each check-and-reserve one
``BEGIN IMMEDIATE`` transaction), so they survive restarts; `RedisSpendStore` (with
``shared_state``) keeps them in Redis hashes, each check-and-reserve one Lua script, so that
every router instance sees and enforces the same spend.
"""

from __future__ import annotations

import asyncio
import logging
import sqlite3
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from typing import Protocol, TypeVar

from .config import SharedStateConfig

logger = logging.getLogger(__name__)

T = TypeVar("T")

# Redis counters outlive their period by enough for the admin API's month view.
_REDIS_TTL_S = 100 * 24 * 3600


@dataclass
class Counter:
    """One counter of a request: its key (``client:ci|day:2026-12-05``) and its limits."""

    key: str
    max_tokens: float | None = None
    max_usd: float | None = None


@dataclass
class Totals:
    tokens: int = 0
    usd: float = 0.0
    reserved_tokens: int = 0
    reserved_usd: float = 0.0


class SpendStore(Protocol):
    async def reserve(
        self, ident: str, counters: list[Counter], tokens: int, usd: float
    ) -> int | None:
        """Reserve on every counter, for the request ``ident``, unless one with a limit has
        spent plus reserved at or past it; atomic across all callers.

        Returns:
            None when reserved, else the index of the first counter at its limit (nothing is
            reserved then).
        """

    async def settle(
        self,
        ident: str,
        keys: list[str],
        reserved_tokens: int,
        reserved_usd: float,
        tokens: int,
        usd: float,
    ) -> None:
        """Turn the request ``ident``'s reservation into spend: take it off ``reserved`` and
        add what was used."""

    async def read(self, keys: list[str]) -> dict[str, Totals]:
        """The counters of these keys (missing ones are zero)."""

    async def close(self) -> None:
        """Release the connection."""


class SQLiteSpendStore:
    """Spend in a SQLite file, on one thread of its own (the connection stays there).

    Reservations belong to the running router: a router clears them as it starts, since the
    requests that made them died with the previous one. Its workers open the file the
    supervisor prepared (`prepare`) and clear nothing, so a restarted worker leaves the other
    workers' reservations alone.

    Args:
        path: The database file (created when missing).
        clear_reservations: Clear the reservations left in the file (false in a worker).
    """

    def __init__(self, path: str, clear_reservations: bool = True) -> None:
        self._executor = ThreadPoolExecutor(1, thread_name_prefix="spend-sqlite")
        self._db: sqlite3.Connection | None = None
        self._executor.submit(self._open, path, clear_reservations).result()

    @classmethod
    async def prepare(cls, path: str) -> None:
        """Make the file ready for the workers before they start: WAL mode (which takes a lock
        that workers opening the file at once would fight over), the table, no reservations.

        Args:
            path: The database file.
        """
        await cls(path).close()

    def _open(self, path: str, clear_reservations: bool) -> None:
        self._db = sqlite3.connect(path, isolation_level=None)
        self._db.execute("PRAGMA journal_mode=WAL")
        self._db.execute("PRAGMA synchronous=NORMAL")
        self._db.execute(
            "CREATE TABLE IF NOT EXISTS spend (key TEXT PRIMARY KEY, tokens INTEGER NOT NULL, "
            "usd REAL NOT NULL, reserved_tokens INTEGER NOT NULL, reserved_usd REAL NOT NULL)"
        )
        if clear_reservations:
            self._db.execute("UPDATE spend SET reserved_tokens = 0, reserved_usd = 0")

    async def _run(self, fn: Callable[..., T], *args: object) -> T:
        return await asyncio.get_running_loop().run_in_executor(self._executor, fn, *args)

    async def reserve(
        self, ident: str, counters: list[Counter], tokens: int, usd: float
    ) -> int | None:
        """See `SpendStore.reserve` (``ident`` is not needed: a transaction has no doubt)."""
        return await self._run(self._reserve, counters, tokens, usd)

    def _reserve(self, counters: list[Counter], tokens: int, usd: float) -> int | None:
        db = self._db
        db.execute("BEGIN IMMEDIATE")
        try:
            for i, counter in enumerate(counters):
                row = db.execute(
                    "SELECT tokens + reserved_tokens, usd + reserved_usd FROM spend WHERE key = ?",
                    (counter.key,),
                ).fetchone() or (0, 0.0)
                if _at_limit(counter, row[0], row[1]):
                    db.execute("ROLLBACK")
                    return i
            for counter in counters:
                db.execute(
                    "INSERT INTO spend VALUES (?, 0, 0, ?, ?) ON CONFLICT(key) DO UPDATE SET "
                    "reserved_tokens = reserved_tokens + excluded.reserved_tokens, "
                    "reserved_usd = reserved_usd + excluded.reserved_usd",
                    (counter.key, tokens, usd),
                )
            db.execute("COMMIT")
        except BaseException:
            db.execute("ROLLBACK")
            raise
        return None

    async def settle(
        self,
        ident: str,
        keys: list[str],
        reserved_tokens: int,
        reserved_usd: float,
        tokens: int,
        usd: float,
    ) -> None:
        """See `SpendStore.settle`."""
        await self._run(self._settle, keys, reserved_tokens, reserved_usd, tokens, usd)

    def _settle(
        self, keys: list[str], reserved_tokens: int, reserved_usd: float, tokens: int, usd: float
    ) -> None:
        rows = [(key, tokens, usd, -reserved_tokens, -reserved_usd) for key in keys]
        self._db.execute("BEGIN IMMEDIATE")
        self._db.executemany(
            "INSERT INTO spend VALUES (?, ?, ?, ?, ?) ON CONFLICT(key) DO UPDATE SET "
            "tokens = tokens + excluded.tokens, usd = usd + excluded.usd, "
            "reserved_tokens = MAX(0, reserved_tokens + excluded.reserved_tokens), "
            "reserved_usd = MAX(0, reserved_usd + excluded.reserved_usd)",
            rows,
        )
        self._db.execute("COMMIT")

    async def read(self, keys: list[str]) -> dict[str, Totals]:
        """See `SpendStore.read`."""
        return await self._run(self._read, keys)

    def _read(self, keys: list[str]) -> dict[str, Totals]:
        found = {key: Totals() for key in keys}
        for key in keys:
            row = self._db.execute(
                "SELECT tokens, usd, reserved_tokens, reserved_usd FROM spend WHERE key = ?",
                (key,),
            ).fetchone()
            if row is not None:
                found[key] = Totals(*row)
        return found

    async def close(self) -> None:
        """See `SpendStore.close`."""
        await self._run(self._db.close)
        self._executor.shutdown()


# Each request's reservation has a marker key (``r`` reserved, ``s`` settled), so that a call
# whose answer timed out (and which Redis may still have run) can be sent again safely.
# KEYS: the counters, then the marker. ARGV: tokens, USD, the counters' TTL, the marker's TTL,
# then each counter's token and USD limits ("" for none).
_RESERVE = """
local n = #KEYS - 1
local marker = KEYS[#KEYS]
if redis.call('EXISTS', marker) == 1 then
  return 0
end
for i = 1, n do
  local key = KEYS[i]
  local t = tonumber(redis.call('HGET', key, 't') or '0')
      + tonumber(redis.call('HGET', key, 'rt') or '0')
  local u = tonumber(redis.call('HGET', key, 'u') or '0')
      + tonumber(redis.call('HGET', key, 'ru') or '0')
  local max_t, max_u = ARGV[3 + 2 * i], ARGV[4 + 2 * i]
  if (max_t ~= '' and t >= tonumber(max_t)) or (max_u ~= '' and u >= tonumber(max_u)) then
    return i
  end
end
for i = 1, n do
  redis.call('HINCRBY', KEYS[i], 'rt', ARGV[1])
  redis.call('HINCRBYFLOAT', KEYS[i], 'ru', ARGV[2])
  redis.call('EXPIRE', KEYS[i], ARGV[3])
end
redis.call('SET', marker, 'r', 'EX', ARGV[4])
return 0
"""

# KEYS: the counters, then the marker. ARGV: the reservation's tokens and USD, negated (Lua
# would write -0 as "-0", which HINCRBY refuses), the tokens and USD used, the counters' TTL
# and the marker's. A reservation is released only if it was made, and each settles once.
_SETTLE = """
local marker = KEYS[#KEYS]
local state = redis.call('GET', marker)
if state == 's' then
  return 0
end
for i = 1, #KEYS - 1 do
  if state == 'r' then
    redis.call('HINCRBY', KEYS[i], 'rt', ARGV[1])
    redis.call('HINCRBYFLOAT', KEYS[i], 'ru', ARGV[2])
  end
  redis.call('HINCRBY', KEYS[i], 't', ARGV[3])
  redis.call('HINCRBYFLOAT', KEYS[i], 'u', ARGV[4])
  redis.call('EXPIRE', KEYS[i], ARGV[5])
end
redis.call('SET', marker, 's', 'EX', ARGV[6])
return 0
"""

# Check-and-reserve calls that time out are asked again this many times before Redis counts
# as unreachable.
_TIMEOUT_RETRIES = 2
# A marker outlives any request by far.
_MARKER_TTL_S = 24 * 3600


class SpendStoreUnavailable(ConnectionError):
    """The spend store cannot be reached: budgets cannot be checked."""


class RedisSpendStore:
    """Spend in Redis hashes (``{prefix}:spend:{key}``: ``t``, ``u``, ``rt``, ``ru``), shared by
    every instance of the fleet.

    While Redis cannot be reached, checks raise `SpendStoreUnavailable` (a budget is not
    enforced blind) and settlements wait in memory, sent in order once Redis answers again. A
    call that timed out may still have run: each request's marker makes sending it again
    harmless, and a check that timed out is followed by its release, so no spend is lost or
    counted twice and no reservation is left behind.

    Args:
        config: The shared state's Redis URL, prefix and timeout.
    """

    def __init__(self, config: SharedStateConfig) -> None:
        # Imported here: a router without shared state never loads redis.
        import redis.asyncio as aioredis
        from redis.exceptions import ConnectionError as RedisConnectionError
        from redis.exceptions import TimeoutError as RedisTimeoutError

        # Redis out of reach (a script error is a bug, and is raised).
        self._errors = (RedisConnectionError, RedisTimeoutError, OSError)
        self._timeout = RedisTimeoutError
        # Settlements Redis did not take yet: (keys, args), in order.
        self._pending: list[tuple[list[str], list]] = []
        self._flushing = asyncio.Lock()
        self._prefix = f"{config.prefix}:spend:"
        self._redis = aioredis.Redis.from_url(
            config.redis_url,
            socket_timeout=config.timeout_s,
            socket_connect_timeout=config.timeout_s,
            decode_responses=True,
        )
        self._reserve = self._redis.register_script(_RESERVE)
        self._settle = self._redis.register_script(_SETTLE)

    def _keys(self, keys: list[str], ident: str) -> list[str]:
        return [self._prefix + k for k in keys] + [f"{self._prefix}request:{ident}"]

    async def reserve(
        self, ident: str, counters: list[Counter], tokens: int, usd: float
    ) -> int | None:
        """See `SpendStore.reserve`."""
        args: list = [tokens, repr(usd), _REDIS_TTL_S, _MARKER_TTL_S]
        for counter in counters:
            args += [_limit(counter.max_tokens), _limit(counter.max_usd)]
        keys = self._keys([c.key for c in counters], ident)
        try:
            if self._pending:
                await self._flush()
            index = await self._reserve_once(keys, args)
        except self._errors as err:
            # It may have run: release it (a no-op if it did not) once Redis is back.
            self._pending.append((keys, self._settle_args(tokens, usd, 0, 0.0)))
            raise SpendStoreUnavailable(f"Redis: {type(err).__name__}: {err}") from err
        return index - 1 if index else None

    async def _reserve_once(self, keys: list[str], args: list) -> int:
        """Run the check-and-reserve; a timeout is asked again (the marker makes a repeat of
        a call that ran harmless): redis-py times its reads on the event loop, so a busy loop
        looks like a slow Redis."""
        for _ in range(_TIMEOUT_RETRIES):
            try:
                return int(await self._reserve(keys=keys, args=args))
            except self._timeout:
                continue
        return int(await self._reserve(keys=keys, args=args))

    @staticmethod
    def _settle_args(reserved_tokens: int, reserved_usd: float, tokens: int, usd: float) -> list:
        return [
            -reserved_tokens,
            repr(-reserved_usd or 0.0),
            tokens,
            repr(usd),
            _REDIS_TTL_S,
            _MARKER_TTL_S,
        ]

    async def settle(
        self,
        ident: str,
        keys: list[str],
        reserved_tokens: int,
        reserved_usd: float,
        tokens: int,
        usd: float,
    ) -> None:
        """See `SpendStore.settle`."""
        entry = (
            self._keys(keys, ident),
            self._settle_args(reserved_tokens, reserved_usd, tokens, usd),
        )
        queued = bool(self._pending)
        try:
            if not queued:
                await self._settle(keys=entry[0], args=entry[1])
                return
            self._pending.append(entry)
            await self._flush()
        except self._errors as err:
            if not queued:
                self._pending.append(entry)
            logger.warning(
                "spend not recorded in Redis yet (%d settlement(s) waiting): %s: %s",
                len(self._pending),
                type(err).__name__,
                err,
            )

    async def _flush(self) -> None:
        """Send the waiting settlements, oldest first, one sender at a time."""
        async with self._flushing:
            while self._pending:
                keys, args = self._pending[0]
                await self._settle(keys=keys, args=args)
                self._pending.pop(0)

    async def read(self, keys: list[str]) -> dict[str, Totals]:
        """See `SpendStore.read`."""
        found = {}
        for key in keys:
            try:
                raw = await self._redis.hgetall(self._prefix + key)
            except self._errors as err:
                raise SpendStoreUnavailable(f"Redis: {type(err).__name__}: {err}") from err
            found[key] = Totals(
                int(raw.get("t", 0)),
                float(raw.get("u", 0)),
                int(raw.get("rt", 0)),
                float(raw.get("ru", 0)),
            )
        return found

    async def close(self) -> None:
        """See `SpendStore.close`."""
        await self._redis.aclose()


def _at_limit(counter: Counter, tokens: float, usd: float) -> bool:
    over_tokens = counter.max_tokens is not None and tokens >= counter.max_tokens
    return over_tokens or (counter.max_usd is not None and usd >= counter.max_usd)


def _limit(value: float | None) -> str:
    return "" if value is None else repr(float(value))
