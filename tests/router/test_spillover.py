"""Spillover (router/spillover.py): local first, the cloud while the local provider is loaded,
and back once it has drained; the load figures and their hysteresis."""

from __future__ import annotations

import asyncio

import aiohttp
import pytest

from router.config import SpilloverConfig, Target
from router.spillover import Load, Spillover
from tests.router.helpers import Answer, FakeUpstream, openai_text, running_router
from tests.router.routing_helpers import auth, chat, providers, routing_config

LOCAL, CLOUD = Target("edge", "small-up"), Target("cloud", "gpt-4o-mini")


@pytest.fixture
async def local_fake(aiohttp_server) -> FakeUpstream:
    """A second fake upstream, slow, as the local server."""
    upstream = FakeUpstream()
    server = await aiohttp_server(upstream.app)
    upstream.base_url = str(server.make_url("")).rstrip("/")
    return upstream


async def test_spills_to_the_cloud_under_load_and_comes_back(fake, local_fake):
    local_fake.queue("openai", *[Answer(body=openai_text("local"), delay_s=0.4)] * 8)
    servers = providers(fake.base_url)
    servers["edge"]["base_url"] = f"{local_fake.base_url}/v1"
    rules = [
        {
            "name": "local-first",
            "when": {"models": ["auto"]},
            "targets": ["small"],
            "fallback": ["gpt"],
            "spillover": {"provider": "edge", "max_in_flight": 2},
        }
    ]
    cfg = routing_config(fake.base_url, rules, providers=servers)
    async with running_router(cfg) as server, aiohttp.ClientSession() as session:
        url = f"{str(server.make_url('')).rstrip('/')}/v1/chat/completions"

        async def ask() -> str:
            async with session.post(url, json=chat(), headers=auth()) as r:
                assert r.status == 200
                return r.headers["x-router-provider"]

        # Two local requests in flight reach the limit: the next four go to the cloud.
        first = [asyncio.create_task(ask()) for _ in range(2)]
        await asyncio.sleep(0.15)
        during = await asyncio.gather(*(ask() for _ in range(4)))
        assert await asyncio.gather(*first) == ["edge", "edge"]
        assert during == ["cloud"] * 4
        # Drained: local again.
        assert await ask() == "edge"
    assert len(local_fake.seen) == 3 and len(fake.seen) == 4


def test_limits_and_hysteresis():
    spill = Spillover("r", SpilloverConfig("edge", max_queue=4, max_wait_s=2.0, resume_below=0.5))
    targets = [LOCAL, CLOUD]
    assert spill.order(targets, Load(queued=3, service_s=0.5)) == [LOCAL, CLOUD]
    assert spill.order(targets, Load(queued=4, service_s=0.1)) == [CLOUD, LOCAL]  # queue
    # Still loaded above half of each limit: it keeps spilling rather than flapping.
    assert spill.order(targets, Load(queued=2, service_s=0.1)) == [CLOUD, LOCAL]
    assert spill.order(targets, Load(queued=1, service_s=0.1)) == [LOCAL, CLOUD]
    # The expected wait: 3 queued at 1 s each is past 2 s.
    assert spill.order(targets, Load(queued=3, service_s=1.0)) == [CLOUD, LOCAL]
    assert spill.order(targets, Load(queued=1, service_s=0.9)) == [LOCAL, CLOUD]


def test_service_time_is_a_moving_average():
    load = Load()
    load.served(1.0)
    assert load.service_s == 1.0
    load.served(2.0)
    assert load.service_s == pytest.approx(1.2)
    load.queued = 5
    assert load.expected_wait_s == pytest.approx(6.0)
