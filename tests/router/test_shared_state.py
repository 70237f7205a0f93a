"""Key state shared through Redis (router/keys/redis_store.py): the Lua scripts against a real
redis-server, and three real router processes sharing one Redis and one fake provider."""

from __future__ import annotations

import asyncio
import logging
import signal
import socket
import subprocess
import time
import uuid
from collections.abc import AsyncIterator, Iterator
from pathlib import Path

import aiohttp
import pytest
import pytest_asyncio
import redis
import redis.asyncio as aioredis
import yaml
from aiohttp.test_utils import TestServer
from redis.exceptions import ConnectionError as RedisConnectionError
from redis.exceptions import TimeoutError as RedisTimeoutError

from benchmarks.gateways import free_port
from router.config import Config, ConfigError, ProviderConfig, SharedStateConfig
from router.errors import RateLimitError, UpstreamError
from router.keys import ACTIVE, COOLING, DISABLED, PARKED, KeyPool, Verdict
from router.keys.redis_store import SharedKeyState, shared_id
from router.logs import Redactor, secrets_of
from tests.redis_server import redis_server_or_skip
from tests.router.fakes import TEXT_ANSWER
from tests.router.helpers import RouterProcess, make_config
from tests.router.test_resilience import CountingOpenAI

module_loop = pytest.mark.asyncio(loop_scope="module")
logger = logging.getLogger(__name__)

ADMIN_KEY = "shared-admin-key-0001"
ADMIN = {"Authorization": f"Bearer {ADMIN_KEY}"}
KEYS = [f"sk-shared-key-{i}{i}{i}{i}" for i in range(6)]


# ---- a redis-server per module ---------------------------------------------------------------


class RedisServer:
    """``redis-server`` on a free loopback port, without persistence, in a temporary folder."""

    def __init__(self, folder: Path) -> None:
        self.folder, self.port = folder, free_port()
        self.url = f"redis://127.0.0.1:{self.port}/0"
        self.proc: subprocess.Popen | None = None

    def start(self) -> None:
        args = [redis_server_or_skip(), "--port", str(self.port), "--bind", "127.0.0.1"]
        args += ["--save", "", "--appendonly", "no", "--dir", str(self.folder)]
        self.proc = subprocess.Popen(args, stdout=subprocess.DEVNULL, stderr=subprocess.STDOUT)
        deadline = time.monotonic() + 10
        while not self._listening():
            assert self.proc.poll() is None, "redis-server exited at start"
            assert time.monotonic() < deadline, "redis-server did not start within 10 s"
            time.sleep(0.05)

    def _listening(self) -> bool:
        with socket.socket() as s:
            return s.connect_ex(("127.0.0.1", self.port)) == 0

    def stop(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            self.proc.terminate()
            self.proc.wait(10)


@pytest.fixture(scope="module")
def redis_server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[RedisServer]:
    server = RedisServer(tmp_path_factory.mktemp("redis"))
    server.start()
    yield server
    server.stop()


# ---- the scripts, in one process with several SharedKeyState instances ---------------------


def shared_config(url: str, prefix: str, **extra: object) -> SharedStateConfig:
    return SharedStateConfig(
        redis_url=url, prefix=prefix, heartbeat_s=0.1, instance_ttl_s=0.3, **extra
    )


async def instances(
    url: str, keys: list[dict], n: int, **provider: object
) -> list[tuple[SharedKeyState, KeyPool]]:
    """``n`` router instances' pools of one provider, sharing a fresh prefix."""
    prefix = f"test-{uuid.uuid4().hex[:8]}"
    made = []
    for _ in range(n):
        shared = SharedKeyState(shared_config(url, prefix))
        pool = KeyPool(
            ProviderConfig(name="p", type="openai", keys=keys, **provider), shared=shared
        )
        await shared.start()
        assert shared.available
        made.append((shared, pool))
    return made


async def close_all(made: list[tuple[SharedKeyState, KeyPool]]) -> None:
    for shared, _ in made:
        await shared.close()


async def live_leases(
    client: aioredis.Redis, prefix: str, rid: str, instance: str | None = None
) -> int:
    """Leases Redis counts in flight on the key ``rid`` (those not expired), of ``instance``
    only if given."""
    seconds, micros = await client.time()
    now_ms = seconds * 1000 + micros // 1000
    leases = await client.zrangebyscore(f"{prefix}:key:{rid}:leases", f"({now_ms}", "+inf")
    return sum(instance is None or lease.startswith(f"{instance}:") for lease in leases)


async def wait_for(check: object, timeout: float = 1.0) -> float:
    """Seconds until ``check()`` is true (fails after ``timeout``)."""
    start = time.monotonic()
    while not check():
        assert time.monotonic() - start < timeout, "condition not met in time"
        await asyncio.sleep(0.002)
    return time.monotonic() - start


async def test_concurrent_acquires_never_exceed_max_concurrent_across_instances(redis_server):
    made = await instances(redis_server.url, [{"key": KEYS[0], "max_concurrent": 3}], 3)
    try:
        # Each instance's local gate alone would let 3 through: 9 at once.
        assert await use_and_watch(made, 15) == 3
    finally:
        await close_all(made)


async def test_rpm_budget_is_global_and_atomic(redis_server):
    made = await instances(redis_server.url, [{"key": KEYS[0], "rpm": 5}], 3, queue_timeout_s=0.2)

    async def try_once(pool: KeyPool) -> bool:
        try:
            (await pool.acquire()).release()
        except RateLimitError:
            return False
        return True

    try:
        results = await asyncio.gather(*(try_once(pool) for _, pool in made for _ in range(8)))
        assert sum(results) == 5
    finally:
        await close_all(made)
    # The same three pools without Redis: each instance's budget alone.
    local = [KeyPool(pool.config) for _, pool in made]
    results = await asyncio.gather(*(try_once(pool) for pool in local for _ in range(8)))
    assert sum(results) == 15


async def test_tpm_budget_counts_tokens_spent_on_other_instances(redis_server):
    made = await instances(redis_server.url, [{"key": KEYS[0], "tpm": 100}], 2, queue_timeout_s=0.2)
    (_, a), (b_shared, b) = made
    try:
        (await a.acquire()).release(60)
        (await b.acquire()).release(60)
        await wait_for(lambda: not b_shared._pending)
        # 120 of 100 tokens spent in the window, 60 by each: neither instance gets the key.
        for pool in (a, b):
            with pytest.raises(RateLimitError):
                await pool.acquire()
    finally:
        await close_all(made)


async def test_a_cancelled_acquire_leaves_no_in_flight_count(redis_server):
    made = await instances(redis_server.url, [{"key": KEYS[0], "max_concurrent": 1}], 1)
    shared, pool = made[0]
    client = aioredis.Redis.from_url(redis_server.url, decode_responses=True)
    # Connected beforehand, the check below reads Redis as soon as nothing is pending.
    await client.ping()
    try:
        for i in range(30):
            task = asyncio.ensure_future(pool.acquire())
            for _ in range(i % 4):
                await asyncio.sleep(0)
            task.cancel()
            try:
                (await task).release()
            except asyncio.CancelledError:
                pass
        await wait_for(lambda: not shared._pending)
        rid = shared_id("p/0", KEYS[0])
        assert await client.zcard(f"{shared.config.prefix}:key:{rid}:leases") == 0
        assert not shared._held
        assert pool.snapshot()[0]["in_flight"] == 0
        lease = await asyncio.wait_for(pool.acquire(), 1)
        lease.release()
    finally:
        await client.aclose()
        await close_all(made)


# ---- races under event-loop lag: the limit holds and no lease is left behind ----------------


async def use_and_watch(made: list[tuple[SharedKeyState, KeyPool]], users: int) -> int:
    """``users`` requests per instance, each holding its key 20 ms; the peak in flight."""
    in_flight, peak = 0, 0

    async def use(pool: KeyPool) -> None:
        nonlocal in_flight, peak
        lease = await pool.acquire()
        in_flight += 1
        peak = max(peak, in_flight)
        await asyncio.sleep(0.02)
        in_flight -= 1
        lease.release()

    await asyncio.gather(*(use(pool) for _, pool in made for _ in range(users)))
    return peak


async def assert_no_lease_left(made: list[tuple[SharedKeyState, KeyPool]], url: str) -> None:
    """Once nothing is on its way to Redis, no lease of the first key counts there."""
    await wait_for(lambda: not any(shared._pending for shared, _ in made))
    client = aioredis.Redis.from_url(url, decode_responses=True)
    try:
        rid = shared_id("p/0", KEYS[0])
        assert await live_leases(client, made[0][0].config.prefix, rid) == 0
    finally:
        await client.aclose()
    assert not any(shared._held for shared, _ in made)


async def test_a_late_reply_is_undone_and_asked_again_not_served_locally(redis_server, caplog):
    # redis-py times reads on the event loop: a busy loop reads Redis's prompt answer too late
    # and raises TimeoutError although the script ran. That must not open the local fallback.
    made = await instances(redis_server.url, [{"key": KEYS[0], "max_concurrent": 3}], 3)
    late = 0

    def read_late(shared: SharedKeyState) -> None:
        run = shared._acquire

        async def acquire(args: list) -> list:
            nonlocal late
            result = await run(args=args)
            if int(args[1].rsplit(":", 1)[1]) % 3 == 0:  # every third admission of each
                late += 1
                raise RedisTimeoutError("Timeout reading from 127.0.0.1")
            return result

        shared._acquire = acquire

    for shared, _ in made:
        read_late(shared)
    try:
        with caplog.at_level(logging.WARNING, logger="router.keys.redis_store"):
            assert await use_and_watch(made, 15) <= 3
        assert late >= 15
        assert all(shared.available for shared, _ in made)
        assert not [r for r in caplog.records if "Redis unavailable" in r.getMessage()]
        await assert_no_lease_left(made, redis_server.url)
    finally:
        await close_all(made)


async def test_redis_failing_during_an_admission_rechecks_the_local_gate(redis_server):
    made = await instances(redis_server.url, [{"key": KEYS[0], "max_concurrent": 3}], 1)
    shared, _ = made[0]

    async def refused(args: list) -> list:
        await asyncio.sleep(0.01)  # every waiter passes the local gate meanwhile
        raise RedisConnectionError("Error 111 connecting to 127.0.0.1. Connection refused.")

    shared._acquire = refused
    try:
        # Served on local state (fail-open), but never past this instance's own limit.
        assert await use_and_watch(made, 5) == 3
    finally:
        await close_all(made)


@pytest.mark.parametrize("stall_s", [0.35, 0.6], ids=["past-instance-ttl", "past-timeout"])
async def test_event_loop_stalls_never_exceed_max_concurrent(redis_server, stall_s):
    # A CPU-starved process: its event loop does not run for longer than instance_ttl_s
    # (0.3 s), or than each Redis call's timeout_s (0.5 s), while requests are in flight.
    made = await instances(redis_server.url, [{"key": KEYS[0], "max_concurrent": 3}], 3)

    async def stall() -> None:
        await asyncio.sleep(0.05)
        time.sleep(stall_s)

    try:
        _, peak = await asyncio.gather(stall(), use_and_watch(made, 5))
        assert peak <= 3
        assert all(shared.available for shared, _ in made)
        await assert_no_lease_left(made, redis_server.url)
    finally:
        await close_all(made)


async def test_a_stalled_event_loop_keeps_its_leases(redis_server):
    made = await instances(
        redis_server.url, [{"key": KEYS[0], "max_concurrent": 1}], 2, queue_timeout_s=0.3
    )
    (a_shared, a), (_, b) = made
    client = aioredis.Redis.from_url(redis_server.url, decode_responses=True)
    rid, prefix = shared_id("p/0", KEYS[0]), a_shared.config.prefix
    try:
        lease = await a.acquire()
        time.sleep(0.9)  # three times instance_ttl_s without the event loop running
        assert await live_leases(client, prefix, rid, a_shared.instance) == 1
        with pytest.raises(RateLimitError):
            await b.acquire()
        lease.release()
        (await asyncio.wait_for(b.acquire(), 1)).release()
        await assert_no_lease_left(made, redis_server.url)
    finally:
        await client.aclose()
        await close_all(made)


async def test_leases_a_frozen_process_lost_come_back_and_never_stay_after_release(redis_server):
    made = await instances(
        redis_server.url, [{"key": KEYS[0], "max_concurrent": 1}], 2, queue_timeout_s=1.0
    )
    (a_shared, a), (_, b) = made
    client = aioredis.Redis.from_url(redis_server.url, decode_responses=True)
    rid, prefix = shared_id("p/0", KEYS[0]), a_shared.config.prefix
    frozen_view = redis.Redis.from_url(redis_server.url, decode_responses=True)

    def freeze() -> int:
        """Neither the event loop nor the keeper thread runs for 0.5 s; then, still frozen,
        the number of leases Redis counts."""
        with a_shared._held_lock:
            time.sleep(0.5)
            seconds, micros = frozen_view.time()
            now_ms = seconds * 1000 + micros // 1000
            return frozen_view.zcount(f"{prefix}:key:{rid}:leases", f"({now_ms}", "+inf")

    try:
        lease = await a.acquire()
        assert freeze() == 0  # expired: instance_ttl_s is 0.3 s
        # Still held: the keeper adds it back at its next renewal.
        deadline = time.monotonic() + 1
        while await live_leases(client, prefix, rid, a_shared.instance) == 0:
            assert time.monotonic() < deadline, "the lost lease was not added back"
            await asyncio.sleep(0.01)
        with pytest.raises(RateLimitError):
            await b.acquire(deadline=time.monotonic() + 0.3)
        # Released right after a freeze, while the keeper may be adding it back: then it counts
        # until it expires, never longer.
        freeze()
        lease.release()
        (await asyncio.wait_for(b.acquire(), 1)).release()
        await asyncio.sleep(0.4)
        await assert_no_lease_left(made, redis_server.url)
    finally:
        frozen_view.close()
        await client.aclose()
        await close_all(made)


async def test_close_waits_for_the_admission_of_a_cancelled_request(redis_server):
    made = await instances(redis_server.url, [{"key": KEYS[0], "max_concurrent": 1}], 1)
    shared, pool = made[0]
    run, sent, answer = shared._acquire, asyncio.Event(), asyncio.Event()

    async def on_its_way(args: list) -> list:
        sent.set()
        await answer.wait()
        return await run(args=args)

    shared._acquire = on_its_way
    request = asyncio.ensure_future(pool.acquire())
    await sent.wait()
    request.cancel()
    with pytest.raises(asyncio.CancelledError):
        await request
    # The admission still travels, and is tracked until the release it needs is sent.
    assert shared._pending
    answer.set()
    await shared.close()
    client = aioredis.Redis.from_url(redis_server.url, decode_responses=True)
    try:
        rid = shared_id("p/0", KEYS[0])
        assert await client.zcard(f"{shared.config.prefix}:key:{rid}:leases") == 0
    finally:
        await client.aclose()


async def test_severity_rule_and_enable_disable_across_instances(redis_server):
    made = await instances(redis_server.url, [{"key": KEYS[0]}, {"key": KEYS[1]}], 2)
    (a_shared, a), (b_shared, b) = made
    changes: list[tuple[str, str, str]] = []
    b.on_change = lambda provider, key_id, old, new, reason: changes.append((key_id, old, new))
    try:
        lease = await a.acquire(exclude=["p/1"])
        lease.fail(Verdict(PARKED, 60.0, "quota exhausted"))
        await wait_for(lambda: b.snapshot()[0]["state"] == PARKED)
        assert changes == [("p/0", ACTIVE, PARKED)]
        # A milder verdict from the other instance does not un-park the key anywhere.
        b.apply_shared(b.keys[0], ACTIVE, None, "stale mirror")
        key = b.keys[0]
        b_shared.finish(key, state=COOLING, seconds=5.0, reason="429")
        await asyncio.sleep(0.05)
        assert b.snapshot()[0]["state"] == PARKED and a.snapshot()[0]["state"] == PARKED
        # The parked key's end time is Redis's, the same in both mirrors (within a few ms).
        until_a, until_b = a.snapshot()[0]["until"], b.snapshot()[0]["until"]
        assert abs(until_a - until_b) < 0.05 and 59 < until_a - time.time() <= 60
        # Enable on one instance: active everywhere.
        b.enable("p/0")
        await wait_for(lambda: a.snapshot()[0]["state"] == ACTIVE)
        # Disable on one: the other sends no traffic to it, and says why.
        a.disable("p/1", "admin says no")
        await wait_for(lambda: b.snapshot()[1]["state"] == DISABLED)
        assert b.snapshot()[1]["reason"] == "admin says no"
        for _ in range(5):
            lease = await b.acquire()
            assert lease.key_id == "p/0"
            lease.release()
        b.disable("p/0", "both off")
        await wait_for(lambda: a.snapshot()[0]["state"] == DISABLED)
        with pytest.raises(UpstreamError):
            await a.acquire()
    finally:
        await close_all(made)


async def test_killed_instance_in_flight_stops_counting(redis_server):
    made = await instances(
        redis_server.url, [{"key": KEYS[0], "max_concurrent": 1}], 2, queue_timeout_s=3
    )
    (dead_shared, dead), (_, alive) = made
    try:
        await dead.acquire()  # never released: the process "dies" holding it
        dead_shared._closed.set()  # its lease keeper stops
        for task in dead_shared._loops:
            task.cancel()
        started = time.monotonic()
        lease = await alive.acquire()
        # The lease expires 0.3 s after its last renewal.
        assert time.monotonic() - started < 1.0
        lease.release()
    finally:
        await close_all(made)


async def test_redis_down_serves_locally_and_shares_again_when_back(tmp_path, caplog):
    server = RedisServer(tmp_path)
    prefix = f"test-{uuid.uuid4().hex[:8]}"
    shared = SharedKeyState(shared_config(server.url, prefix, timeout_s=0.2))
    keys = [{"key": KEYS[0], "max_concurrent": 5}]
    pool = KeyPool(ProviderConfig(name="p", type="openai", keys=keys), shared=shared)
    # Not there at start: the router starts and serves on local state.
    await shared.start()
    try:
        assert not shared.available
        (await pool.acquire()).release()
        server.start()
        await wait_for(lambda: shared.available, timeout=3)
        caplog.clear()
        server.stop()
        with caplog.at_level(logging.WARNING, logger="router.keys.redis_store"):
            for _ in range(20):
                lease = await pool.acquire()
                lease.release()
                await asyncio.sleep(0.02)
            assert not shared.available and shared.status()["connected"] is False
        warnings = [r for r in caplog.records if "Redis unavailable" in r.getMessage()]
        assert len(warnings) == 1, "the warning is rate-limited"
        held = await pool.acquire()  # in flight across the recovery
        server.start()
        await wait_for(lambda: shared.available, timeout=3)
        client = aioredis.Redis.from_url(server.url, decode_responses=True)
        rid = shared_id("p/0", KEYS[0])
        # Back: the lease admitted locally is counted, and this instance's changes are shared.
        assert await live_leases(client, prefix, rid, shared.instance) == 1
        held.release()
        pool.disable("p/0", "after recovery")
        await wait_for(lambda: not shared._pending)
        assert await client.hget(f"{prefix}:key:{rid}:state", "state") == DISABLED
        assert await live_leases(client, prefix, rid, shared.instance) == 0
        await client.aclose()
    finally:
        await shared.close()
        server.stop()


async def test_app_without_redis_serves_and_says_so(router_client, fake):
    cfg = make_config(fake.base_url)
    cfg.shared_state = SharedStateConfig(redis_url=f"redis://127.0.0.1:{free_port()}/0")
    client = await router_client(cfg)
    body = {"model": "gpt", "messages": [{"role": "user", "content": "hi"}]}
    for _ in range(3):
        assert (await client.post("/v1/chat/completions", json=body)).status == 200
    health = await (await client.get("/health")).json()
    assert health["status"] == "degraded"
    assert health["shared_state"]["connected"] is False
    assert "ConnectionError" in health["shared_state"]["last_error"]


def test_redis_ids_never_contain_the_key_and_change_with_it():
    rid = shared_id("p/0", KEYS[0])
    assert rid.startswith("p/0:") and KEYS[0] not in rid
    assert shared_id("p/0", KEYS[1]) != rid


def test_the_redis_password_is_a_secret_the_logs_redact():
    cfg = Config.from_dict(
        {
            "providers": {},
            "models": {},
            "shared_state": {"redis_url": "redis://:s3cret-redis-pw@127.0.0.1:6379/0"},
        }
    )
    assert "s3cret-redis-pw" in secrets_of(cfg)
    assert "s3cret-redis-pw" not in Redactor(secrets_of(cfg)).scrub("AUTH s3cret-redis-pw failed")


@pytest.mark.parametrize(
    ("section", "culprit"),
    [
        ({"redis_url": "http://127.0.0.1:6379"}, "shared_state.redis_url"),
        ({"redis_url": "redis://127.0.0.1:6379/x"}, "shared_state.redis_url"),
        ({"redis_url": "redis://127.0.0.1:port/0"}, "shared_state.redis_url"),
        ({"redis_url": "redis://"}, "shared_state.redis_url"),
        ({}, "missing required key 'redis_url'"),
        ({"redis_url": "redis://h", "host": "h"}, "unknown key(s) host"),
        ({"redis_url": "redis://h", "prefix": "a b"}, "shared_state.prefix"),
        ({"redis_url": "redis://h", "timeout_s": 0}, "shared_state.timeout_s"),
        ({"redis_url": "redis://h", "instance_ttl_s": 1}, "shared_state.instance_ttl_s"),
        ("redis://h", "shared_state: expected a mapping"),
    ],
)
def test_bad_shared_state_config_names_the_culprit(section, culprit):
    with pytest.raises(ConfigError, match=culprit.replace("(", r"\(").replace(")", r"\)")):
        Config.from_dict({"providers": {}, "models": {}, "shared_state": section})


# ---- three router processes ------------------------------------------------------------------


class TimedOpenAI(CountingOpenAI):
    """Also notes when each 429 was sent."""

    def __init__(self, keys: list[str]) -> None:
        super().__init__(keys)
        self.sent_429: list[float] = []

    def error_response(self, status: int, message: str) -> aiohttp.web.Response:
        if status == 429:
            self.sent_429.append(time.monotonic())
        return super().error_response(status, message)


def fleet_config(root: str, url: str, prefix: str) -> dict:
    base = {"type": "openai", "base_url": f"{root}/v1"}
    return {
        "listen": {"host": "127.0.0.1", "port": 0},
        "providers": {
            "cool": {**base, "keys": KEYS[0:2]},
            "rpm": {
                **base,
                "keys": [{"key": k, "rpm": 60} for k in KEYS[2:4]],
                "queue_timeout_s": 0.5,
                "max_queue": 1000,
            },
            "conc": {
                **base,
                "keys": [{"key": k, "max_concurrent": 2} for k in KEYS[4:6]],
                "queue_timeout_s": 3,
                "max_queue": 1000,
            },
        },
        "models": {
            name: [{"provider": name, "model": "gpt-fake"}] for name in ("cool", "rpm", "conc")
        },
        "auth": {"admin_key": ADMIN_KEY},
        "shared_state": {
            "redis_url": url,
            "prefix": prefix,
            "heartbeat_s": 0.2,
            "instance_ttl_s": 1.0,
        },
        "shutdown_grace_s": 2,
        "log": {"format": "text", "level": "INFO"},
    }


class Fleet:
    def __init__(
        self, fake: TimedOpenAI, routers: list[RouterProcess], config: dict, redis_url: str
    ) -> None:
        self.fake, self.routers, self.config, self.redis_url = fake, routers, config, redis_url


@pytest_asyncio.fixture(scope="module", loop_scope="module")
async def fleet(redis_server, tmp_path_factory) -> AsyncIterator[Fleet]:
    fake = TimedOpenAI(list(KEYS))
    server = TestServer(fake.app(), host="127.0.0.1")
    await server.start_server()
    folder = tmp_path_factory.mktemp("fleet")
    config = folder / "router.yaml"
    root = str(server.make_url("")).rstrip("/")
    data = fleet_config(root, redis_server.url, "fleet")
    config.write_text(yaml.safe_dump(data))
    routers = [RouterProcess(config, folder / f"router{i}.log") for i in range(3)]
    try:
        await asyncio.gather(*(r.start() for r in routers))
        yield Fleet(fake, routers, data, redis_server.url)
    finally:
        for router in routers:
            await router.stop()
        await server.close()
    assert not fake.problems, fake.problems


async def ask(http: aiohttp.ClientSession, router: RouterProcess, model: str) -> tuple[int, str]:
    body = {"model": model, "messages": [{"role": "user", "content": "scenario:text"}]}
    async with http.post(f"{router.url}/v1/chat/completions", json=body) as resp:
        data = await resp.json()
        text = data["choices"][0]["message"]["content"] if resp.status == 200 else ""
        return resp.status, text


async def cooling_keys(http: aiohttp.ClientSession, router: RouterProcess) -> set[str]:
    """The ids of the keys the router's admin API shows cooling."""
    async with http.get(f"{router.url}/admin/keys", headers=ADMIN) as resp:
        keys = (await resp.json())["keys"]
    return {k["id"] for k in keys if k["state"] == COOLING}


async def key_state(http: aiohttp.ClientSession, router: RouterProcess, key_id: str) -> str:
    async with http.get(f"{router.url}/admin/keys", headers=ADMIN) as resp:
        keys = (await resp.json())["keys"]
    return next(k["state"] for k in keys if k["id"] == key_id)


@module_loop
async def test_a_429_on_one_instance_cools_the_key_on_all_within_100ms(fleet):
    fake, (first, *others) = fleet.fake, fleet.routers
    fake.reset()
    async with aiohttp.ClientSession() as http:
        for router in fleet.routers:
            async with http.get(f"{router.url}/health") as resp:
                health = await resp.json()
            assert health["status"] == "ok" and health["shared_state"]["connected"] is True
        fake.fail_next(429)
        seen: dict[int, tuple[float, set[str]]] = {}

        async def watch(i: int, router: RouterProcess) -> None:
            while not (cooling := await cooling_keys(http, router)):
                pass
            seen[i] = (time.monotonic(), cooling)

        # Polled while the request runs, so that the delay is the change's way to the other
        # instances, not also the first instance's retry and answer (slow under CPU load).
        watching = asyncio.gather(*(watch(i, r) for i, r in enumerate(others)))
        assert await ask(http, first, "cool") == (200, TEXT_ANSWER)
        await asyncio.wait_for(watching, 2)
        failed = KEYS.index(fake.exchanges[0].key)
        assert [cooling for _, cooling in seen.values()] == [{f"cool/{failed}"}] * 2
        delays = [seen[i][0] - fake.sent_429[0] for i in range(2)]
        logger.info("429 -> cooling in the other instances' admin API: %s s", delays)
        assert max(delays) < 0.1, delays
        fake.reset()
        for router in others * 5:
            assert await ask(http, router, "cool") == (200, TEXT_ANSWER)
        assert {e.key for e in fake.exchanges} == {KEYS[1 - failed]}


@module_loop
async def test_rpm_budget_holds_across_three_instances(fleet):
    fake, routers = fleet.fake, fleet.routers
    fake.reset()
    async with aiohttp.ClientSession(connector=aiohttp.TCPConnector(limit=0)) as http:
        results = await asyncio.gather(*(ask(http, routers[i % 3], "rpm") for i in range(300)))
    ok = sum(status == 200 for status, _ in results)
    reached = sum(e.key in KEYS[2:4] for e in fake.exchanges)
    logger.info("rpm 2 x 60 across 3 instances: %d of 300 reached the fake", reached)
    # 2 keys x 60 rpm; each instance alone would let 120 through (360 in all).
    assert 120 <= reached <= 126 and ok == reached
    assert {status for status, _ in results} <= {200, 429}


@module_loop
async def test_sighup_reload_keeps_sharing_the_key_state(fleet):
    first, second = fleet.routers[0], fleet.routers[1]
    extra = "sk-shared-key-extra"
    fleet.fake.keys.append(extra)
    reloaded = {**fleet.config, "providers": dict(fleet.config["providers"])}
    reloaded["providers"]["cool"] = {
        **fleet.config["providers"]["cool"],
        "keys": [*KEYS[0:2], extra],
    }
    first.config.write_text(yaml.safe_dump(reloaded))
    first.proc.send_signal(signal.SIGHUP)
    await first.wait_log("config reloaded")
    first.config.write_text(yaml.safe_dump(fleet.config))
    async with aiohttp.ClientSession() as http:
        # The rebuilt pool of the reloaded instance shares its unchanged keys' state both ways.
        async with http.post(f"{second.url}/admin/keys/cool/1/disable", headers=ADMIN) as resp:
            assert resp.status == 200
        await asyncio.wait_for(_until_state(http, first, "cool/1", DISABLED), 1)
        async with http.post(f"{first.url}/admin/keys/cool/1/enable", headers=ADMIN) as resp:
            assert resp.status == 200
        await asyncio.wait_for(_until_state(http, second, "cool/1", ACTIVE), 1)
        assert await key_state(http, first, "cool/2") == ACTIVE


async def _until_state(
    http: aiohttp.ClientSession, router: RouterProcess, key_id: str, state: str
) -> None:
    while await key_state(http, router, key_id) != state:
        await asyncio.sleep(0.005)


async def dead_in_flight(client: aioredis.Redis, pid: int) -> int:
    """Requests Redis counts in flight on the ``conc`` keys for the instance with this pid."""
    total = 0
    for key in KEYS[4:6]:
        rid = shared_id(f"conc/{KEYS.index(key) - 4}", key)
        seconds, micros = await client.time()
        leases = await client.zrangebyscore(
            f"fleet:key:{rid}:leases", f"({seconds * 1000 + micros // 1000}", "+inf"
        )
        total += sum(f":{pid}:" in lease for lease in leases)
    return total


@module_loop
async def test_killing_an_instance_mid_load_loses_no_request_of_the_others(fleet):
    fake, routers = fleet.fake, fleet.routers
    fake.reset()
    fake.peak.clear()
    fake.delay_s = 0.2
    stop_at = time.monotonic() + 4.5
    outcomes: list[tuple[int, str]] = []
    victim_pid = routers[2].proc.pid
    client = aioredis.Redis.from_url(fleet.redis_url, decode_responses=True)

    async def keep_asking(http: aiohttp.ClientSession, router: RouterProcess) -> None:
        while time.monotonic() < stop_at:
            outcomes.append(await ask(http, router, "conc"))

    async def victim(http: aiohttp.ClientSession) -> None:
        with pytest.raises(aiohttp.ClientError):
            while True:
                await ask(http, routers[2], "conc")

    try:
        async with aiohttp.ClientSession(connector=aiohttp.TCPConnector(limit=0)) as http:
            work = asyncio.gather(
                *(keep_asking(http, r) for r in routers[:2] for _ in range(3)),
                *(victim(http) for _ in range(4)),
            )
            # Kill it while Redis counts requests in flight on it: they are never released.
            while await dead_in_flight(client, victim_pid) == 0:
                await asyncio.sleep(0.005)
            routers[2].proc.kill()
            killed_at = time.monotonic()
            await work
        # Its leases stopped counting once they were not renewed for 1 s.
        assert await dead_in_flight(client, victim_pid) == 0
    finally:
        fake.delay_s = 0.0
        await client.aclose()
    assert stop_at - killed_at > 2.5, "the load ended too soon after the kill"
    assert outcomes and all(o == (200, TEXT_ANSWER) for o in outcomes), outcomes
    assert len(outcomes) > 20
    logger.info("kill mid-load: %d survivor requests, all complete", len(outcomes))
    # max_concurrent 2 per key held across the instances.
    assert max(fake.peak[k] for k in KEYS[4:6]) == 2


@module_loop
async def test_sigterm_stops_an_instance_cleanly_and_drops_its_leases(fleet):
    client = aioredis.Redis.from_url(fleet.redis_url, decode_responses=True)
    try:
        for router in fleet.routers[:2]:
            router.proc.send_signal(signal.SIGTERM)
            assert await asyncio.wait_for(router.proc.wait(), 10) == 0
        assert await client.keys("fleet:key:*:leases") == []
    finally:
        await client.aclose()
