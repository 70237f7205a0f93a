"""Where spend is kept: counters of tokens and USD (spent, and reserved by requests in flight)
per budget scope and period, behind one protocol.

`SQLiteSpendStore` (the default) keeps them in a SQLite file (WAL, each check-and-reserve one
``BEGIN IMMEDIATE`` transaction), so they survive restarts; `RedisSpendStore` (with
``shared_state``) keeps them in Redis hashes, each check-and-reserve one Lua script, so that
every router instance sees and enforces the same spend.
"""

from __future__ import annotations

import asyncio
import sqlite3
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from typing import Protocol, TypeVar

from .config import SharedStateConfig

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
    async def reserve(self, counters: list[Counter], tokens: int, usd: float) -> int | None:
        """Reserve on every counter unless one with a limit has spent plus reserved at or past
        it; atomic across all callers.

        Returns:
            None when reserved, else the index of the first counter at its limit (nothing is
            reserved then).
        """

    async def settle(
        self, keys: list[str], reserved_tokens: int, reserved_usd: float, tokens: int, usd: float
    ) -> None:
        """Turn a reservation into spend: take it off ``reserved`` and add what was used."""

    async def read(self, keys: list[str]) -> dict[str, Totals]:
        """The counters of these keys (missing ones are zero)."""

    async def close(self) -> None:
        """Release the connection."""


class SQLiteSpendStore:
    """Spend in a SQLite file, on one thread of its own (the connection stays there).

    Reservations are this process's: they are cleared at start, since the requests that made
    them died with the previous process.

    Args:
        path: The database file (created when missing).
    """

    def __init__(self, path: str) -> None:
        self._executor = ThreadPoolExecutor(1, thread_name_prefix="spend-sqlite")
        self._db: sqlite3.Connection | None = None
        self._executor.submit(self._open, path).result()

    def _open(self, path: str) -> None:
        self._db = sqlite3.connect(path, isolation_level=None)
        self._db.execute("PRAGMA journal_mode=WAL")
        self._db.execute("PRAGMA synchronous=NORMAL")
        self._db.execute(
            "CREATE TABLE IF NOT EXISTS spend (key TEXT PRIMARY KEY, tokens INTEGER NOT NULL, "
            "usd REAL NOT NULL, reserved_tokens INTEGER NOT NULL, reserved_usd REAL NOT NULL)"
        )
        self._db.execute("UPDATE spend SET reserved_tokens = 0, reserved_usd = 0")

    async def _run(self, fn: Callable[..., T], *args: object) -> T:
        return await asyncio.get_running_loop().run_in_executor(self._executor, fn, *args)

    async def reserve(self, counters: list[Counter], tokens: int, usd: float) -> int | None:
        """See `SpendStore.reserve`."""
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
        self, keys: list[str], reserved_tokens: int, reserved_usd: float, tokens: int, usd: float
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


# KEYS: the counters. ARGV: tokens, usd, then each counter's token and USD limits ("" for none).
_RESERVE = """
local tokens, usd, ttl = tonumber(ARGV[1]), tonumber(ARGV[2]), tonumber(ARGV[3])
for i, key in ipairs(KEYS) do
  local t = tonumber(redis.call('HGET', key, 't') or '0')
      + tonumber(redis.call('HGET', key, 'rt') or '0')
  local u = tonumber(redis.call('HGET', key, 'u') or '0')
      + tonumber(redis.call('HGET', key, 'ru') or '0')
  local max_t, max_u = ARGV[2 + 2 * i], ARGV[3 + 2 * i]
  if (max_t ~= '' and t >= tonumber(max_t)) or (max_u ~= '' and u >= tonumber(max_u)) then
    return i
  end
end
for _, key in ipairs(KEYS) do
  redis.call('HINCRBY', key, 'rt', tokens)
  redis.call('HINCRBYFLOAT', key, 'ru', usd)
  redis.call('EXPIRE', key, ttl)
end
return 0
"""

# KEYS: the counters. ARGV: reserved tokens and USD, then the tokens and USD used.
_SETTLE = """
for _, key in ipairs(KEYS) do
  redis.call('HINCRBY', key, 'rt', -tonumber(ARGV[1]))
  redis.call('HINCRBYFLOAT', key, 'ru', -tonumber(ARGV[2]))
  redis.call('HINCRBY', key, 't', ARGV[3])
  redis.call('HINCRBYFLOAT', key, 'u', ARGV[4])
end
return 0
"""


class RedisSpendStore:
    """Spend in Redis hashes (``{prefix}:spend:{key}``: ``t``, ``u``, ``rt``, ``ru``), shared by
    every instance of the fleet.

    Args:
        config: The shared state's Redis URL, prefix and timeout.
    """

    def __init__(self, config: SharedStateConfig) -> None:
        # Imported here: a router without shared state never loads redis.
        import redis.asyncio as aioredis

        self._prefix = f"{config.prefix}:spend:"
        self._redis = aioredis.Redis.from_url(
            config.redis_url,
            socket_timeout=config.timeout_s,
            socket_connect_timeout=config.timeout_s,
            decode_responses=True,
        )
        self._reserve = self._redis.register_script(_RESERVE)
        self._settle = self._redis.register_script(_SETTLE)

    async def reserve(self, counters: list[Counter], tokens: int, usd: float) -> int | None:
        """See `SpendStore.reserve`."""
        args: list = [tokens, repr(usd), _REDIS_TTL_S]
        for counter in counters:
            args += [_limit(counter.max_tokens), _limit(counter.max_usd)]
        keys = [self._prefix + c.key for c in counters]
        index = int(await self._reserve(keys=keys, args=args))
        return index - 1 if index else None

    async def settle(
        self, keys: list[str], reserved_tokens: int, reserved_usd: float, tokens: int, usd: float
    ) -> None:
        """See `SpendStore.settle`."""
        args = [reserved_tokens, repr(reserved_usd), tokens, repr(usd)]
        await self._settle(keys=[self._prefix + k for k in keys], args=args)

    async def read(self, keys: list[str]) -> dict[str, Totals]:
        """See `SpendStore.read`."""
        found = {}
        for key in keys:
            raw = await self._redis.hgetall(self._prefix + key)
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
