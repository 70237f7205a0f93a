"""Spillover (router/spillover.py): local first, the cloud while the local provider is loaded,
and back once it has drained, with a loopback server as the local provider and with the
in-process engine (a tiny random SmolVLM checkpoint), whose queue and context window the rules
read; the load figures and their hysteresis."""

from __future__ import annotations

import asyncio
import time
from pathlib import Path

import aiohttp
import openai
import pytest

from router.backends import PROVIDERS
from router.config import Config, SpilloverConfig, Target
from router.spillover import Load, Spillover
from tests.mlx_smolvlm.conftest import build_hf_checkpoint
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


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory) -> Path:
    return build_hf_checkpoint(tmp_path_factory.mktemp("tiny_vlm"))


def engine_config(checkpoint: Path, cloud_url: str) -> Config:
    """The tiny local model (one sequence at a time) and a cloud fallback: images and plain
    requests local first, spilling at one waiting request; prompts past the local context to
    the cloud."""
    return Config.from_dict(
        {
            "providers": {
                "local": {
                    "type": "mlx",
                    "mlx": {
                        "model": str(checkpoint),
                        "max_sequences": 1,
                        "max_context_tokens": 2048,
                    },
                },
                "cloud": {"type": "openai", "base_url": f"{cloud_url}/v1", "local": False},
            },
            "models": {"tiny": [{"provider": "local", "model": "tiny"}]},
            "routing": {
                "rules": [
                    {
                        "name": "long",
                        "when": {"exceeds_context_of": "local"},
                        "targets": [{"provider": "cloud", "model": "big"}],
                    },
                    {
                        "name": "local-first",
                        "when": {"models": ["auto"]},
                        "targets": ["tiny"],
                        "fallback": [{"provider": "cloud", "model": "big"}],
                        "spillover": {"provider": "local", "max_queue": 1},
                    },
                ]
            },
        }
    )


async def test_the_local_engines_queue_and_context_drive_the_routing(checkpoint, fake):
    async with running_router(engine_config(checkpoint, fake.base_url)) as server:
        root = str(server.make_url("")).rstrip("/")
        oai = openai.AsyncOpenAI(base_url=f"{root}/v1", api_key="unused", max_retries=0)
        engine = server.app[PROVIDERS]["local"].engine

        async def ask(text: str, max_tokens: int = 4) -> str:
            raw = await oai.chat.completions.with_raw_response.create(
                model="auto", messages=[{"role": "user", "content": text}], max_tokens=max_tokens
            )
            return raw.headers["x-router-provider"]

        try:
            assert await ask("word " * 2000) == "cloud"  # ~2,500 tokens > the context of 2,048
            # One long stream runs; the next request waits in the engine's queue.
            stream = await oai.chat.completions.create(
                model="auto",
                messages=[{"role": "user", "content": "Tell me everything"}],
                max_tokens=1800,
                stream=True,
            )
            seen = 0
            async for chunk in stream:
                seen += bool(chunk.choices and chunk.choices[0].delta.content)
                if seen == 2:
                    break
            waiting = asyncio.create_task(ask("next"))
            deadline = time.monotonic() + 10
            while engine.stats().waiting < 1:
                assert time.monotonic() < deadline, "the second request never queued"
                await asyncio.sleep(0.01)
            assert await ask("and another") == "cloud"  # the queue is at its limit: spill
            await stream.close()
            assert await asyncio.wait_for(waiting, 30) == "local"
            assert await ask("back") == "local"  # drained
        finally:
            await oai.close()
