"""Key state shared exactly by the worker processes of one machine, with no server to run.

The supervisor (`router.workers`) runs a `KeyCoordinator` on a Unix socket; each worker's
pools reach it through `LocalKeyState`, the same `SharedStore` protocol as the Redis one. The
coordinator is one event loop that handles one message at a time, so an admission (check every
candidate's state, ``max_concurrent``, ``rpm`` and ``tpm``, then record the lease) is atomic
across workers, as a Lua script is on Redis.

Messages are JSON lines (orjson). A worker sends:

- ``acquire``: ``{op, id, lease, candidates: [[rid, max_concurrent, rpm, tpm], ...]}`` (limits
  -1: none), answered by ``{op: "admitted", id, index (0: none), wait (s), states}`` where
  ``states`` lists ``[rid, state, seconds left (None: no end), reason]`` of the candidates
  found not active;
- ``finish``: ``{op, rid, lease, tokens, state, seconds, reason, force, notify}``, unanswered;
- ``states``: ``{op, rids}``, answered by ``{op: "states", states}`` (of keys not active).

A key with no ``max_concurrent``, ``rpm`` or ``tpm`` is admitted by each worker on its mirror
of the shared states, without an ``acquire``, and the plain end of its requests is not reported:
only its state changes travel.

State changes, and releases of keys with limits, go to every worker as ``{op: "event", rid,
state, seconds, reason}``: they mirror the state and wake their waiting requests.

Each lease belongs to the connection that was admitted it: when a worker dies its connection
closes and the coordinator drops its leases at once, so a killed worker's requests stop
counting. A worker whose coordinator is gone (the supervisor died) serves on its own state
until it notices and stops.
"""

from __future__ import annotations

import asyncio
import itertools
import logging
import os
import time
from collections import deque
from dataclasses import dataclass, field
from typing import Any

import orjson
from aiohttp import web

from .state import ACTIVE, SEVERITY, WINDOW_S, PooledKey
from .store import KeyMirror, shared_id

logger = logging.getLogger(__name__)

# A request that found every candidate at its max_concurrent asks again after this long at
# the latest (a release in any worker normally wakes it sooner, through an event).
POLL_S = 0.25
# Longest message line (an acquire lists each candidate key once).
LINE_LIMIT = 1 << 20

# The coordinator's socket path, set on a worker's app by `router.workers`.
KEY_COORDINATOR = web.AppKey("key_coordinator", str)


@dataclass
class _Key:
    """One key's shared state in the coordinator (times on the monotonic clock)."""

    state: str = ACTIVE
    until: float | None = None
    reason: str = ""
    leases: dict[str, _Worker] = field(default_factory=dict)
    starts: deque[float] = field(default_factory=deque)
    spent: deque[tuple[float, int]] = field(default_factory=deque)
    spent_total: int = 0

    def current(self, now: float) -> str:
        """The state at ``now`` (a cool-down or parking that is over is active again)."""
        if self.until is not None and self.until <= now:
            self.state, self.until, self.reason = ACTIVE, None, ""
        return self.state

    def left(self, now: float) -> float | None:
        return None if self.until is None else self.until - now

    def room(self, now: float, mc: int, rpm: int, tpm: int) -> tuple[bool, float]:
        """Whether the key has room for a request now; if not, when its rpm/tpm window frees
        (-1: unknown, or it is at max_concurrent and a release frees it)."""
        while self.starts and self.starts[0] <= now - WINDOW_S:
            self.starts.popleft()
        while self.spent and self.spent[0][0] <= now - WINDOW_S:
            self.spent_total -= self.spent.popleft()[1]
        if 0 <= mc <= len(self.leases):
            return False, -1.0
        if 0 <= rpm <= len(self.starts):
            return False, self.starts[0] + WINDOW_S - now
        if 0 <= tpm <= self.spent_total:
            return False, self.spent[0][0] + WINDOW_S - now if self.spent else -1.0
        return True, 0.0


@dataclass(eq=False)
class _Worker:
    """One worker's connection to the coordinator and the leases it holds."""

    writer: asyncio.StreamWriter
    leases: set[tuple[str, str]] = field(default_factory=set)

    def send(self, message: dict) -> None:
        if not self.writer.is_closing():
            self.writer.write(orjson.dumps(message) + b"\n")


class KeyCoordinator:
    """The key state of all workers of one router (runs in the supervisor).

    Args:
        path: The Unix socket to listen on.
    """

    def __init__(self, path: str) -> None:
        self.path = path
        self._keys: dict[str, _Key] = {}
        self._workers: set[_Worker] = set()
        self._server: asyncio.Server | None = None
        self._clock = time.monotonic

    async def start(self) -> None:
        """Listen on the socket."""
        self._server = await asyncio.start_unix_server(self._serve, self.path, limit=LINE_LIMIT)

    async def close(self) -> None:
        """Stop listening and drop every connection."""
        if self._server is not None:
            self._server.close()
            for worker in list(self._workers):
                worker.writer.close()
            await self._server.wait_closed()

    def in_flight(self, rid: str) -> int:
        """Requests holding the key now, across all workers."""
        return len(self._keys[rid].leases) if rid in self._keys else 0

    async def _serve(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        worker = _Worker(writer)
        self._workers.add(worker)
        try:
            while line := await reader.readline():
                self._handle(worker, orjson.loads(line))
        except (ConnectionError, asyncio.IncompleteReadError, ValueError) as err:
            logger.warning("key coordinator: dropping a worker's connection: %s", err)
        finally:
            self._workers.discard(worker)
            self._release_all(worker)
            writer.close()

    def _handle(self, worker: _Worker, message: dict) -> None:
        op = message["op"]
        if op == "acquire":
            worker.send(self._acquire(worker, message))
        elif op == "finish":
            self._finish(worker, message)
        elif op == "states":
            now = self._clock()
            states = [self._describe(rid, now) for rid in message["rids"]]
            worker.send({"op": "states", "states": [s for s in states if s[1] != ACTIVE]})
        else:
            raise ValueError(f"unknown message {op!r}")

    def _key(self, rid: str) -> _Key:
        key = self._keys.get(rid)
        if key is None:
            key = self._keys[rid] = _Key()
        return key

    def _describe(self, rid: str, now: float) -> list:
        key = self._key(rid)
        return [rid, key.current(now), key.left(now), key.reason]

    def _acquire(self, worker: _Worker, message: dict) -> dict:
        now = self._clock()
        lease, states, wait, full = message["lease"], [], -1.0, False
        for index, (rid, mc, rpm, tpm) in enumerate(message["candidates"], 1):
            key = self._key(rid)
            if key.current(now) != ACTIVE:
                states.append(self._describe(rid, now))
                continue
            room, frees = key.room(now, mc, rpm, tpm)
            if room:
                key.leases[lease] = worker
                worker.leases.add((rid, lease))
                if rpm >= 0:
                    key.starts.append(now)
                return {"op": "admitted", "id": message["id"], "index": index, "states": states}
            full = full or frees < 0
            if frees >= 0 and (wait < 0 or frees < wait):
                wait = frees
        return {
            "op": "admitted",
            "id": message["id"],
            "index": 0,
            "states": states,
            "wait": POLL_S if full or wait < 0 else wait,
        }

    def _finish(self, worker: _Worker, message: dict) -> None:
        now = self._clock()
        rid, lease = message["rid"], message["lease"]
        key = self._key(rid)
        if lease and key.leases.pop(lease, None) is not None:
            worker.leases.discard((rid, lease))
        if message["tokens"] > 0:
            key.spent.append((now, message["tokens"]))
            key.spent_total += message["tokens"]
        old = (key.current(now), key.until, key.reason)
        state = message["state"]
        if state and (message["force"] or SEVERITY[state] >= SEVERITY[key.state]):
            seconds = message["seconds"]
            until = None if seconds is None else now + seconds
            if state == key.state and key.until is not None and until is not None:
                until = max(until, key.until)
            key.state, key.until, key.reason = state, until, message["reason"]
        if (key.state, key.until, key.reason) != old or message["notify"]:
            self._broadcast(rid, key, now)

    def _release_all(self, worker: _Worker) -> None:
        """A worker's connection closed: its requests no longer hold their keys."""
        now = self._clock()
        for rid, lease in worker.leases:
            self._keys[rid].leases.pop(lease, None)
        for rid in {rid for rid, _ in worker.leases}:
            self._broadcast(rid, self._keys[rid], now)
        if worker.leases:
            logger.warning(
                "key coordinator: a worker left with %d request(s) in flight; released",
                len(worker.leases),
            )
        worker.leases.clear()

    def _broadcast(self, rid: str, key: _Key, now: float) -> None:
        event = {"op": "event", "rid": rid, "state": key.state, "seconds": key.left(now)}
        event["reason"] = key.reason
        line = orjson.dumps(event) + b"\n"
        for worker in self._workers:
            if not worker.writer.is_closing():
                worker.writer.write(line)


class LocalKeyState:
    """A worker's link to the `KeyCoordinator` of its supervisor (a `SharedStore`).

    Args:
        path: The coordinator's Unix socket.
    """

    def __init__(self, path: str) -> None:
        self.path = path
        self.available = False
        self.instance = f"worker {os.getpid()}"
        self._reader: asyncio.StreamReader | None = None
        self._writer: asyncio.StreamWriter | None = None
        self._keys: dict[str, tuple[KeyMirror, PooledKey]] = {}
        self._serial = itertools.count(1)
        # Admissions waiting for their answer: id -> (future, lease, candidates).
        self._asked: dict[int, tuple[asyncio.Future, str, list[PooledKey]]] = {}
        self._listener: asyncio.Task | None = None
        self._closing = False

    async def start(self) -> None:
        """Connect to the coordinator and read the keys' current states.

        Raises:
            OSError: The coordinator cannot be reached.
        """
        self._reader, self._writer = await asyncio.open_unix_connection(self.path, limit=LINE_LIMIT)
        self.available = True
        self._listener = asyncio.get_running_loop().create_task(self._listen())
        self._ask_states()
        logger.info("key state shared with the other workers through %s", self.path)

    async def close(self) -> None:
        """Disconnect (the coordinator then drops the leases still held)."""
        self._closing = True
        self.available = False
        if self._writer is not None:
            self._writer.close()
        if self._listener is not None:
            self._listener.cancel()
            await asyncio.gather(self._listener, return_exceptions=True)

    def status(self) -> dict[str, Any]:
        """For ``/health`` and the admin API."""
        return {"backend": "workers", "connected": self.available, "instance": self.instance}

    def attach(self, pool: KeyMirror) -> None:
        """Share a pool's keys (replacing those of an older pool of the same provider)."""
        self._keys = {rid: e for rid, e in self._keys.items() if e[0].provider != pool.provider}
        for key in pool.keys:
            key.shared_id = shared_id(key.id, key.config.key)
            self._keys[key.shared_id] = (pool, key)
        if self.available:
            self._ask_states()

    async def acquire(self, candidates: list[PooledKey]) -> tuple[PooledKey | None, str, float]:
        """Admit the first candidate that is active and has room across all workers.

        A first candidate without ``max_concurrent``, ``rpm`` and ``tpm`` is admitted on this
        worker's mirror of the states (the coordinator's events keep it current): nothing
        across workers limits it, and a round trip per request costs more than the request.

        Returns:
            The admitted key, its lease id ('' : none) and 0; or None, '' and how long to wait.
        """
        if _unlimited(candidates[0]):
            return candidates[0], "", 0.0
        ident = next(self._serial)
        lease = f"{os.getpid()}:{ident}"
        limits = [[k.shared_id, *(-1 if v is None else v for v in _limits(k))] for k in candidates]
        answer = asyncio.get_running_loop().create_future()
        self._asked[ident] = (answer, lease, candidates)
        self._send({"op": "acquire", "id": ident, "lease": lease, "candidates": limits})
        # A cancelled request's admission is released when its answer comes (`_admitted`).
        index, wait = await answer
        if not index:
            return None, "", wait
        return candidates[index - 1], lease, 0.0

    def admit_locally(self, key: PooledKey) -> str:
        """No lease: a worker serves on its own state only while it is stopping."""
        return ""

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
        """Report a request's end and/or a key's new state to the coordinator (the plain end
        of a request on a key without limits has nothing to report)."""
        if not (lease or state or force) and _unlimited(key):
            return
        limited = key.config.max_concurrent is not None or key.config.rpm is not None
        self._send(
            {
                "op": "finish",
                "rid": key.shared_id,
                "lease": lease,
                "tokens": tokens,
                "state": state,
                "seconds": seconds,
                "reason": reason,
                "force": force,
                "notify": bool(lease) and limited,
            }
        )

    # ---- internals ---------------------------------------------------------------------------

    def _send(self, message: dict) -> None:
        if self.available and self._writer is not None:
            self._writer.write(orjson.dumps(message) + b"\n")

    def _ask_states(self) -> None:
        self._send({"op": "states", "rids": list(self._keys)})

    async def _listen(self) -> None:
        try:
            while line := await self._reader.readline():
                self._on_message(orjson.loads(line))
        except (ConnectionError, ValueError) as err:
            logger.error("key coordinator: connection failed: %s", err)
        self.available = False
        for answer, _, _ in self._asked.values():
            if not answer.done():
                answer.set_result((0, 0.0))  # the pools decide on their local state
        self._asked.clear()
        if not self._closing:
            # The supervisor is gone; the worker stops by itself (`workers.watch_supervisor`).
            logger.error("key coordinator gone: serving on this worker's own key state")

    def _on_message(self, message: dict) -> None:
        op = message["op"]
        if op == "admitted":
            self._admitted(message)
        elif op == "event":
            self._mirror(message["rid"], message["state"], message["seconds"], message["reason"])
            entry = self._keys.get(message["rid"])
            if entry is not None:
                entry[0].wake()
        elif op == "states":
            for rid, state, seconds, reason in message["states"]:
                self._mirror(rid, state, seconds, reason)

    def _admitted(self, message: dict) -> None:
        answer, lease, candidates = self._asked.pop(message["id"])
        for rid, state, seconds, reason in message["states"]:
            self._mirror(rid, state, seconds, reason)
        index = message["index"]
        if not answer.cancelled():
            answer.set_result((index, message.get("wait", 0.0)))
        elif index:
            self.finish(candidates[index - 1], lease=lease)

    def _mirror(self, rid: str, state: str, seconds: float | None, reason: str) -> None:
        entry = self._keys.get(rid)
        if entry is not None:
            pool, key = entry
            until = None if seconds is None else time.monotonic() + seconds
            pool.apply_shared(key, state, until, reason)


def _limits(key: PooledKey) -> tuple[int | None, int | None, int | None]:
    cfg = key.config
    return cfg.max_concurrent, cfg.rpm, cfg.tpm


def _unlimited(key: PooledKey) -> bool:
    return _limits(key) == (None, None, None)
