"""Several workers behind one port (router/workers.py) and the key state they share through
their supervisor's coordinator (router/keys/local_store.py) or through Redis: the limits hold
exactly across workers, a killed worker's requests stop counting, signals and metrics reach
every worker."""

from __future__ import annotations

import asyncio
import os
import re
import signal
import subprocess
import sys
import time
from collections.abc import AsyncIterator
from pathlib import Path

import aiohttp
import psutil
import pytest
import pytest_asyncio
import yaml
from aiohttp.test_utils import TestServer

from router.config import Config, ConfigError, ProviderConfig
from router.keys import KeyPool
from router.keys.local_store import KeyCoordinator, LocalKeyState
from router.workers import usable_cpus, worker_count
from tests.router.helpers import RouterProcess
from tests.router.test_resilience import CountingOpenAI
from tests.router.test_shared_state import redis_server  # noqa: F401 (a fixture)

module_loop = pytest.mark.asyncio(loop_scope="module")

ADMIN_KEY = "workers-admin-key-0001"
ADMIN = {"Authorization": f"Bearer {ADMIN_KEY}"}
KEYS = [f"sk-workers-key-{i}{i}{i}{i}" for i in range(6)]
BODY = {"messages": [{"role": "user", "content": "scenario:text"}]}


class PeerOpenAI(CountingOpenAI):
    """Also notes the client port of each request in flight (to find the worker sending it)."""

    def __init__(self, keys: list[str]) -> None:
        super().__init__(keys)
        self.ports_in_flight: set[int] = set()

    async def chat_completions(self, request):
        port = request.transport.get_extra_info("peername")[1]
        self.ports_in_flight.add(port)
        try:
            return await super().chat_completions(request)
        finally:
            self.ports_in_flight.discard(port)


def workers_config(root: str, redis_url: str | None = None) -> dict:
    base = {"type": "openai", "base_url": f"{root}/v1", "max_queue": 1000}
    config = {
        "listen": {"host": "127.0.0.1", "port": 0},
        "providers": {
            "rpm": {**base, "keys": [{"key": k, "rpm": 60} for k in KEYS[0:2]]},
            "conc": {
                **base,
                "keys": [{"key": k, "max_concurrent": 2} for k in KEYS[2:4]],
                "queue_timeout_s": 20,
            },
            "plain": {**base, "keys": KEYS[4:6]},
        },
        "models": {n: [{"provider": n, "model": "gpt-fake"}] for n in ("rpm", "conc", "plain")},
        "auth": {"admin_key": ADMIN_KEY},
        "shutdown_grace_s": 2,
        "log": {"format": "text", "level": "INFO"},
    }
    config["providers"]["rpm"]["queue_timeout_s"] = 0.5
    if redis_url is not None:
        prefix = f"workers-{os.getpid()}-{time.monotonic_ns()}"
        config["shared_state"] = {"redis_url": redis_url, "prefix": prefix, "heartbeat_s": 0.2}
        config["shared_state"]["instance_ttl_s"] = 1.0
    return config


class Served:
    def __init__(self, fake: PeerOpenAI, router: RouterProcess, config: dict) -> None:
        self.fake, self.router, self.config = fake, router, config


async def serve(tmp: Path, redis_url: str | None = None) -> AsyncIterator[Served]:
    fake = PeerOpenAI(list(KEYS))
    server = TestServer(fake.app(), host="127.0.0.1")
    await server.start_server()
    data = workers_config(str(server.make_url("")).rstrip("/"), redis_url)
    path = tmp / "router.yaml"
    path.write_text(yaml.safe_dump(data))
    router = RouterProcess(path, tmp / "router.log", workers=2)
    try:
        await router.start()
        yield Served(fake, router, data)
    finally:
        await router.stop()
        await server.close()
    assert not fake.problems, fake.problems


@pytest_asyncio.fixture(scope="module", loop_scope="module")
async def served(tmp_path_factory) -> AsyncIterator[Served]:
    async for made in serve(tmp_path_factory.mktemp("workers")):
        yield made


@pytest_asyncio.fixture(scope="module", loop_scope="module")
async def served_redis(tmp_path_factory, redis_server) -> AsyncIterator[Served]:  # noqa: F811
    async for made in serve(tmp_path_factory.mktemp("workers-redis"), redis_server.url):
        yield made


def worker_pids(router: RouterProcess) -> list[int]:
    return sorted(child.pid for child in psutil.Process(router.proc.pid).children())


def cpu_seconds(pids: list[int]) -> list[float]:
    return [sum(psutil.Process(pid).cpu_times()[:2]) for pid in pids]


async def ask(http: aiohttp.ClientSession, router: RouterProcess, model: str) -> int:
    async with http.post(f"{router.url}/v1/chat/completions", json={**BODY, "model": model}) as r:
        await r.read()
        return r.status


def fresh_connections() -> aiohttp.ClientSession:
    # One connection per request: the kernel spreads connections, not requests, over workers.
    return aiohttp.ClientSession(connector=aiohttp.TCPConnector(limit=0, force_close=True))


async def check_limits(served: Served, backend: str) -> None:
    """The key state is shared through ``backend`` (``/health``); 300 concurrent requests
    against 2 keys of rpm 60, then 300 against 2 keys of max_concurrent 2: exactly 120 reach
    the fake, and never more than 2 at once per key; both workers did part of the work."""
    fake, router = served.fake, served.router
    async with aiohttp.ClientSession() as http:
        async with http.get(f"{router.url}/health") as resp:
            health = await resp.json()
    assert health["shared_state"]["backend"] == backend and health["shared_state"]["connected"]
    pids = worker_pids(router)
    assert len(pids) == 2
    fake.reset()
    before = cpu_seconds(pids)
    async with fresh_connections() as http:
        statuses = await asyncio.gather(*(ask(http, router, "rpm") for _ in range(300)))
    reached = sum(e.key in KEYS[0:2] for e in fake.exchanges)
    assert reached == 120 and statuses.count(200) == 120, (reached, statuses.count(200))
    assert set(statuses) == {200, 429}
    fake.reset()
    fake.peak.clear()
    fake.delay_s = 0.01
    try:
        async with fresh_connections() as http:
            statuses = await asyncio.gather(*(ask(http, router, "conc") for _ in range(300)))
    finally:
        fake.delay_s = 0.0
    assert statuses == [200] * 300
    assert {key: fake.peak[key] for key in KEYS[2:4]} == {KEYS[2]: 2, KEYS[3]: 2}
    used = [after - start for start, after in zip(before, cpu_seconds(pids), strict=True)]
    assert min(used) > 0.1 * max(used), f"one worker did nearly all the work: {used}"


@module_loop
async def test_limits_hold_exactly_across_two_workers(served):
    await check_limits(served, "workers")


@module_loop
async def test_limits_hold_exactly_across_two_workers_on_redis(served_redis):
    await check_limits(served_redis, "redis")


@module_loop
async def test_metrics_sum_over_the_workers(served):
    router = served.router

    async def requests_total(http: aiohttp.ClientSession) -> float:
        async with http.get(f"{router.url}/metrics") as resp:
            text = await resp.text()
        counts = re.findall(r'^router_requests_total\{[^}]*model="plain"[^}]*\} (\S+)$', text, re.M)
        return sum(float(c) for c in counts)

    async with fresh_connections() as http:
        start = await requests_total(http)
        statuses = await asyncio.gather(*(ask(http, router, "plain") for _ in range(40)))
        assert statuses == [200] * 40
        # Each scrape may be answered by either worker: all see the same total.
        totals = {await requests_total(http) for _ in range(10)}
    assert totals == {start + 40}


@module_loop
async def test_a_console_login_holds_on_every_worker(served):
    router = served.router
    async with fresh_connections() as http:
        async with http.post(f"{router.url}/ui/login", json={"admin_key": ADMIN_KEY}) as resp:
            assert resp.status == 200
            cookie = resp.cookies["router_console"].value
        # Each request may reach either worker: every one accepts the session the other signed.
        for _ in range(20):
            async with http.get(
                f"{router.url}/ui/api/session", cookies={"router_console": cookie}
            ) as resp:
                assert resp.status == 200, await resp.text()


@module_loop
async def test_sighup_reloads_every_worker(served, tmp_path):
    router, config = served.router, served.config
    added = {**config, "models": {**config["models"], "added": config["models"]["plain"]}}
    router.config.write_text(yaml.safe_dump(added))
    try:
        router.proc.send_signal(signal.SIGHUP)
        deadline = time.monotonic() + 10
        while router.log.read_text().count("config reloaded") < 2:
            assert time.monotonic() < deadline, router.log.read_text()
            await asyncio.sleep(0.05)
        async with fresh_connections() as http:
            statuses = await asyncio.gather(*(ask(http, router, "added") for _ in range(20)))
        assert statuses == [200] * 20
    finally:
        router.config.write_text(yaml.safe_dump(config))
        router.proc.send_signal(signal.SIGHUP)
        await asyncio.sleep(0.5)


@module_loop
async def test_admin_reload_reaches_every_worker(served):
    router = served.router
    before = router.log.read_text().count("config reloaded")
    async with aiohttp.ClientSession() as http:
        async with http.post(f"{router.url}/admin/reload", headers=ADMIN) as resp:
            assert resp.status == 200, await resp.text()
    # The worker that answered, then both through the supervisor's SIGHUP.
    deadline = time.monotonic() + 10
    while router.log.read_text().count("config reloaded") < before + 3:
        assert time.monotonic() < deadline, router.log.read_text()
        await asyncio.sleep(0.05)


@module_loop
async def test_a_killed_workers_requests_stop_counting_and_it_is_restarted(served):
    """Both keys' 4 slots are held at the fake; one worker holding some is killed: the
    coordinator frees its slots at once, the supervisor starts a new worker, and all 4 slots
    serve again."""
    fake, router = served.fake, served.router
    fake.reset()
    fake.peak.clear()
    fake.delay_s = 1.5
    pids = worker_pids(router)
    try:
        async with fresh_connections() as http:
            tasks = [asyncio.ensure_future(ask(http, router, "conc")) for _ in range(16)]
            deadline = time.monotonic() + 5
            while len(fake.ports_in_flight) < 4:
                assert time.monotonic() < deadline, "the 4 slots were not taken"
                await asyncio.sleep(0.01)
            holders = {
                pid
                for pid in pids
                for conn in psutil.Process(pid).net_connections("tcp")
                if conn.laddr.port in fake.ports_in_flight
            }
            victim = min(holders)
            os.kill(victim, signal.SIGKILL)
            statuses = await asyncio.gather(*tasks, return_exceptions=True)
        log = router.log.read_text()
        assert re.search(r"a worker left with [1-4] request\(s\) in flight; released", log), log
        assert f"(pid {victim}) exited with status -9: starting it again" in log
        # The other worker's requests were all served; only the dead one's were cut.
        assert all(s == 200 or isinstance(s, aiohttp.ClientError) for s in statuses), statuses
        assert 200 in statuses
        deadline = time.monotonic() + 30
        while len(worker_pids(router)) < 2:
            assert time.monotonic() < deadline, router.log.read_text()
            await asyncio.sleep(0.1)
        assert victim not in worker_pids(router)
        fake.reset()
        fake.peak.clear()
        fake.delay_s = 0.3
        async with fresh_connections() as http:
            statuses = await asyncio.gather(*(ask(http, router, "conc") for _ in range(8)))
        assert statuses == [200] * 8
        # All four slots usable again: nothing of the dead worker still counts.
        assert sum(fake.peak[key] for key in KEYS[2:4]) == 4
    finally:
        fake.delay_s = 0.0


async def test_the_coordinator_frees_a_lost_connections_leases(tmp_path):
    """In one process: a worker link holding both slots of a key drops its connection; the
    other link, waiting, gets a slot at once."""
    coordinator = KeyCoordinator(str(tmp_path / "keys.sock"))
    await coordinator.start()
    links = [LocalKeyState(coordinator.path) for _ in range(2)]
    config = ProviderConfig(name="p", type="openai", keys=[{"key": KEYS[0], "max_concurrent": 2}])
    pools = [KeyPool(config, shared=link) for link in links]
    for link in links:
        await link.start()
    try:
        held = [await pools[0].acquire(), await pools[0].acquire()]
        rid = pools[0].keys[0].shared_id
        assert coordinator.in_flight(rid) == 2
        waiting = asyncio.ensure_future(pools[1].acquire())
        await asyncio.sleep(0.1)
        assert not waiting.done()
        links[0]._writer.transport.abort()  # as when a worker is killed
        lease = await asyncio.wait_for(waiting, 1.0)
        assert lease.key == KEYS[0] and coordinator.in_flight(rid) == 1
        lease.release()
        del held
    finally:
        for link in links:
            await link.close()
        await coordinator.close()


async def test_states_are_shared_through_the_coordinator(tmp_path):
    """A disable in one worker, and a 429's cool-down, show in the other; enable undoes it."""
    coordinator = KeyCoordinator(str(tmp_path / "keys.sock"))
    await coordinator.start()
    links = [LocalKeyState(coordinator.path) for _ in range(2)]
    config = ProviderConfig(name="p", type="openai", keys=[KEYS[0], KEYS[1]])
    pools = [KeyPool(config, shared=link) for link in links]
    for link in links:
        await link.start()
    try:
        pools[0].disable("p/0", "test")
        await _until(lambda: pools[1].snapshot()[0]["state"] == "disabled")
        lease = await pools[1].acquire()
        assert lease.key_id == "p/1"
        lease.rest(30, "limit used up")
        lease.release()
        await _until(lambda: pools[0].snapshot()[1]["state"] == "cooling")
        pools[1].enable("p/0")
        await _until(lambda: pools[0].snapshot()[0]["state"] == "active")
    finally:
        for link in links:
            await link.close()
        await coordinator.close()


async def _until(check, timeout: float = 1.0) -> None:
    deadline = time.monotonic() + timeout
    while not check():
        assert time.monotonic() < deadline, "not shared in time"
        await asyncio.sleep(0.005)


def test_worker_count_defaults_and_limits():
    cloud = Config.from_dict(
        {"providers": {"o": {"type": "openai", "keys": ["k"]}}, "models": {"m": []}}
        | {"models": {"m": [{"provider": "o", "model": "x"}]}}
    )
    assert worker_count(cloud, None) == usable_cpus() == len(os.sched_getaffinity(0))
    assert worker_count(cloud, 3) == 3
    cloud.workers = 2
    assert worker_count(cloud, None) == 2
    local = Config.from_dict(
        {
            "providers": {"l": {"type": "mlx", "mlx": {"model": "some/model"}}},
            "models": {"m": [{"provider": "l", "model": "m"}]},
        }
    )
    assert worker_count(local, None) == 1
    with pytest.raises(ConfigError, match="local model"):
        worker_count(local, 2)
    with pytest.raises(ConfigError, match="workers: must be an integer >= 1"):
        Config.from_dict({"providers": {}, "models": {}, "workers": 0})


def test_several_workers_need_a_fixed_port(tmp_path):
    config = tmp_path / "router.yaml"
    providers = {"o": {"type": "openai", "keys": ["k"]}}
    config.write_text(
        yaml.safe_dump(
            {
                "listen": {"host": "127.0.0.1", "port": 0},
                "providers": providers,
                "models": {"m": [{"provider": "o", "model": "x"}]},
            }
        )
    )
    run = subprocess.run(
        [sys.executable, "-m", "router", "--config", str(config), "--workers", "2"],
        capture_output=True,
        text=True,
        timeout=60,
        cwd=Path(__file__).parents[2],
    )
    assert run.returncode == 2
    assert "cannot be 0" in run.stderr and "Traceback" not in run.stderr
