"""Budgets and spend (router/budgets.py, router/spend_store.py, router/pricing.py): per client
key, group and provider, in tokens and USD; 429s in the client's own format naming the budget;
a rule's local fallback past a USD budget; exactness under 200 concurrent requests on one
instance (SQLite) and over three instances sharing Redis; spend that survives a restart."""

from __future__ import annotations

import asyncio
import signal
import sqlite3
from collections.abc import Iterator
from pathlib import Path

import aiohttp
import anthropic
import openai
import pytest
from aiohttp.test_utils import TestServer

from router.pricing import price_of, shipped_prices
from router.spend_store import Counter, SQLiteSpendStore
from tests.router.helpers import running_router
from tests.router.routing_helpers import ADMIN_KEY, CLIENT_KEYS, auth, chat, routing_config
from tests.router.test_shared_state import RedisServer

ADMIN = {"Authorization": f"Bearer {ADMIN_KEY}"}
AUTO_CLOUD = [{"name": "auto", "when": {"models": ["auto"]}, "targets": ["gpt"]}]
# 20 characters (5 estimated tokens) and max_tokens 2: the reservation, 7 tokens, equals what
# the fake upstream reports (5 in, 2 out), so admission is exact.
EXACT = chat("x" * 20, max_tokens=2)
COST = 7


async def post(session: aiohttp.ClientSession, url: str, key: str = "ci") -> int:
    async with session.post(f"{url}/v1/chat/completions", json=EXACT, headers=auth(key)) as r:
        await r.read()
        return r.status


async def spend(url: str) -> dict:
    async with aiohttp.ClientSession() as session:
        async with session.get(f"{url}/admin/spend", headers=ADMIN) as r:
            assert r.status == 200
            return await r.json()


def root(server: TestServer) -> str:
    return str(server.make_url("")).rstrip("/")


async def test_token_budget_gives_429s_in_each_clients_format(fake):
    budgets = [{"client": "ci", "tokens_per_day": 20}]
    cfg = routing_config(fake.base_url, AUTO_CLOUD, budgets=budgets)
    async with running_router(cfg) as server:
        url = root(server)
        oai = openai.AsyncOpenAI(base_url=f"{url}/v1", api_key=CLIENT_KEYS["ci"], max_retries=0)
        for _ in range(3):  # 0, 7, 14 spent: each under 20
            await oai.chat.completions.create(
                model="auto", messages=[{"role": "user", "content": "hi"}]
            )
        with pytest.raises(openai.RateLimitError) as caught:
            await oai.chat.completions.create(
                model="auto", messages=[{"role": "user", "content": "hi"}]
            )
        assert "budget exceeded: client:ci" in caught.value.message
        assert "tokens_per_day 20" in caught.value.message
        assert 0 < int(caught.value.response.headers["retry-after"]) <= 86400
        claude = anthropic.AsyncAnthropic(base_url=url, api_key=CLIENT_KEYS["ci"], max_retries=0)
        with pytest.raises(anthropic.RateLimitError) as caught:
            await claude.messages.create(
                model="auto", max_tokens=8, messages=[{"role": "user", "content": "hi"}]
            )
        assert caught.value.body["error"]["type"] == "rate_limit_error"
        assert "client:ci" in caught.value.body["error"]["message"]
        # Another key is not stopped by ci's budget.
        other = openai.AsyncOpenAI(base_url=f"{url}/v1", api_key=CLIENT_KEYS["ops"], max_retries=0)
        await other.chat.completions.create(
            model="auto", messages=[{"role": "user", "content": "hi"}]
        )
        report = await spend(url)
        assert report["clients"]["ci"]["today"]["tokens"] == 21
        assert report["clients"]["ci"]["today"]["budget"] == {"tokens": 20}
        assert report["clients"]["ci"]["today"]["remaining"] == {"tokens": 0}
        assert report["clients"]["ops"]["today"]["tokens"] == 7
        async with aiohttp.ClientSession() as session:
            metrics = await (await session.get(f"{url}/metrics")).text()
        assert 'router_spend_tokens_total{client="ci"} 21.0' in metrics
        assert 'outcome="budget_exceeded",provider="none",rule="auto"} 2.0' in metrics
        for client in (oai, claude, other):
            await client.close()
    assert len(fake.seen) == 4


async def test_over_a_usd_budget_the_rules_local_fallback_serves(fake):
    rules = [
        {"name": "auto", "when": {"models": ["auto"]}, "targets": ["gpt"], "fallback": ["small"]}
    ]
    budgets = [{"client": "ci", "usd_per_day": 0.000001}]
    cfg = routing_config(fake.base_url, rules, budgets=budgets)
    async with running_router(cfg) as server, aiohttp.ClientSession() as session:
        providers = []
        for _ in range(3):
            async with session.post(
                f"{root(server)}/v1/chat/completions", json=chat(), headers=auth()
            ) as r:
                assert r.status == 200
                providers.append(r.headers["x-router-provider"])
        assert providers == ["cloud", "edge", "edge"]
        today = (await spend(root(server)))["clients"]["ci"]["today"]
    price = shipped_prices()["gpt-4o-mini"]
    assert today["usd"] == pytest.approx((5 * price.input + 2 * price.output) / 1e6)
    assert today["tokens"] == 3 * COST and today["remaining"] == {"usd": 0}


async def test_group_and_provider_budgets(fake):
    budgets = [
        {"group": "team", "tokens_per_month": 10},
        {"provider": "cloud", "tokens_per_day": 20},
    ]
    cfg = routing_config(fake.base_url, AUTO_CLOUD, budgets=budgets)
    async with running_router(cfg) as server, aiohttp.ClientSession() as session:
        url = root(server)
        assert [await post(session, url, "ci"), await post(session, url, "dev")] == [200, 200]
        # ci and dev share the group "team": 14 of its 10 tokens are spent.
        async with session.post(f"{url}/v1/chat/completions", json=EXACT, headers=auth("ci")) as r:
            assert r.status == 429
            assert "group:team" in (await r.json())["error"]["message"]
        assert await post(session, url, "ops") == 200  # 21 of the provider's 20
        async with session.post(f"{url}/v1/chat/completions", json=EXACT, headers=auth("ops")) as r:
            assert r.status == 429
            assert (
                "provider:cloud has used up its tokens_per_day 20"
                in (await r.json())["error"]["message"]
            )
        report = await spend(url)
    assert report["groups"]["team"]["this_month"]["tokens"] == 2 * COST
    assert report["providers"]["cloud"]["today"]["tokens"] == 3 * COST


async def burst(urls: list[str], n: int) -> list[int]:
    """``n`` concurrent requests of client ci, spread over the instances in turn."""
    async with aiohttp.ClientSession(connector=aiohttp.TCPConnector(limit=0)) as session:
        return await asyncio.gather(*(post(session, urls[i % len(urls)]) for i in range(n)))


def exact_limit_case() -> tuple[int, int]:
    """A budget of 100 tokens for requests of 7: admitted while spent plus reserved is under
    100, so exactly 15 (the 15th starts at 98)."""
    return 100, 15


async def test_budget_exactness_with_200_concurrent_requests_and_across_a_restart(
    fake, tmp_path: Path
):
    limit, admitted = exact_limit_case()
    sections = {
        "budgets": [{"client": "ci", "tokens_per_day": limit}],
        "spend": {"sqlite_path": str(tmp_path / "spend.sqlite3")},
    }
    async with running_router(routing_config(fake.base_url, AUTO_CLOUD, **sections)) as server:
        statuses = await burst([root(server)], 200)
        today = (await spend(root(server)))["clients"]["ci"]["today"]
    assert statuses.count(200) == admitted and statuses.count(429) == 200 - admitted
    assert today["tokens"] == admitted * COST and today["in_flight"]["tokens"] == 0
    # A new router on the same file: the spend is still there, and still enforced.
    async with running_router(routing_config(fake.base_url, AUTO_CLOUD, **sections)) as server:
        assert await burst([root(server)], 5) == [429] * 5
        assert (await spend(root(server)))["clients"]["ci"]["today"]["tokens"] == admitted * COST
    assert len(fake.seen) == admitted


@pytest.fixture(scope="module")
def redis_url(tmp_path_factory: pytest.TempPathFactory) -> Iterator[str]:
    server = RedisServer(tmp_path_factory.mktemp("redis"))
    server.start()
    yield server.url
    server.stop()


async def test_budget_exactness_over_three_instances_sharing_redis(fake, redis_url):
    limit, admitted = exact_limit_case()
    sections = {
        "budgets": [{"client": "ci", "tokens_per_day": limit}],
        "shared_state": {"redis_url": redis_url, "prefix": f"budgets-{id(fake)}"},
    }
    cfg = lambda: routing_config(fake.base_url, AUTO_CLOUD, **sections)  # noqa: E731
    async with running_router(cfg()) as a, running_router(cfg()) as b, running_router(cfg()) as c:
        urls = [root(a), root(b), root(c)]
        statuses = await burst(urls, 200)
        reports = [await spend(url) for url in urls]
    assert statuses.count(200) == admitted and statuses.count(429) == 200 - admitted
    for report in reports:
        assert report["clients"]["ci"]["today"]["tokens"] == admitted * COST
    async with running_router(cfg()) as restarted:
        assert await burst([root(restarted)], 3) == [429] * 3
    assert len(fake.seen) == admitted


def test_prices_come_from_the_table_and_the_config(fake):
    cfg = routing_config(
        fake.base_url, [], pricing={"cloud/gpt-4o-mini": {"input": 1.0, "output": 2.0}}
    )
    assert price_of(cfg, "cloud", "gpt-4o-mini").input == 1.0
    assert (
        price_of(cfg, "claude", "claude-sonnet-4-5-20250929")
        == shipped_prices()["claude-sonnet-4-5"]
    )
    assert price_of(cfg, "edge", "anything").input == 0.0  # local: free
    assert price_of(cfg, "cloud", "unheard-of") is None


async def test_redis_outage_refuses_budgeted_requests_and_keeps_the_spend(fake, tmp_path: Path):
    redis = RedisServer(tmp_path)
    redis.start()
    sections = {
        "budgets": [{"client": "ci", "tokens_per_day": 1000}],
        "shared_state": {"redis_url": redis.url, "timeout_s": 0.2},
    }
    try:
        cfg = routing_config(fake.base_url, AUTO_CLOUD, **sections)
        async with running_router(cfg) as server, aiohttp.ClientSession() as session:
            url = root(server)
            assert await post(session, url, "ops") == 200
            redis.proc.send_signal(signal.SIGSTOP)  # unreachable: every call times out
            # ops has no budget: served, its spend waits; ci's budget cannot be checked: 503.
            assert await post(session, url, "ops") == 200
            async with session.post(
                f"{url}/v1/chat/completions", json=EXACT, headers=auth("ci")
            ) as r:
                assert r.status == 503
                assert "spend store is unreachable" in (await r.json())["error"]["message"]
            redis.proc.send_signal(signal.SIGCONT)
            assert await post(session, url, "ops") == 200
            assert await post(session, url, "ci") == 200
            report = await spend(url)
        assert report["clients"]["ops"]["today"]["tokens"] == 3 * COST
        assert report["clients"]["ci"]["today"]["tokens"] == COST
    finally:
        redis.proc.send_signal(signal.SIGCONT)
        redis.stop()


async def test_the_request_log_keeps_each_requests_rule_and_cost(fake, tmp_path: Path):
    cfg = routing_config(
        fake.base_url, AUTO_CLOUD, request_log={"path": str(tmp_path / "log.db"), "flush_s": 0.05}
    )
    async with running_router(cfg) as server, aiohttp.ClientSession() as session:
        assert await post(session, root(server)) == 200
        for _ in range(100):
            async with session.get(f"{root(server)}/admin/requests", headers=ADMIN) as r:
                page = await r.json()
            if page["total"]:
                break
            await asyncio.sleep(0.02)
    (row,) = page["requests"]
    price = shipped_prices()["gpt-4o-mini"]
    assert row["rule"] == "auto" and row["provider"] == "cloud"
    assert row["cost"] == pytest.approx((5 * price.input + 2 * price.output) / 1e6)


async def test_workers_share_the_spend_file_and_only_a_start_clears_reservations(tmp_path):
    """The supervisor prepares the file before its workers open it at once; a restarted worker
    leaves the other workers' reservations alone."""
    path = str(tmp_path / "spend.sqlite")
    await SQLiteSpendStore.prepare(path)
    with sqlite3.connect(path) as db:
        assert db.execute("PRAGMA journal_mode").fetchone() == ("wal",)
    worker = SQLiteSpendStore(path, clear_reservations=False)
    assert await worker.reserve("r1", [Counter("client:ci|day:x", 100, None)], 7, 0.0) is None
    restarted = SQLiteSpendStore(path, clear_reservations=False)
    assert (await restarted.read(["client:ci|day:x"]))["client:ci|day:x"].reserved_tokens == 7
    await SQLiteSpendStore.prepare(path)  # the next router start
    assert (await restarted.read(["client:ci|day:x"]))["client:ci|day:x"].reserved_tokens == 0
    for store in (worker, restarted):
        await store.close()
