"""Shared fixtures for the router tests: the SDK-validating fake providers on loopback (once
per module), and the router app in front of the small scriptable fake upstream (per test)."""

from __future__ import annotations

from collections.abc import AsyncIterator, Awaitable, Callable, Iterator
from dataclasses import dataclass

import pytest
import pytest_asyncio
from aiohttp.test_utils import TestClient, TestServer

from router.app import create_app
from router.config import Config
from tests.router.fakes import (
    ANTHROPIC_KEYS,
    GEMINI_KEYS,
    OPENAI_KEYS,
    FakeAnthropic,
    FakeGemini,
    FakeOpenAI,
    FakeProvider,
)
from tests.router.helpers import FakeUpstream, make_config


@dataclass
class Upstreams:
    """The three fake providers and their base URLs (each in its SDK's ``base_url`` sense)."""

    openai: FakeOpenAI
    anthropic: FakeAnthropic
    gemini: FakeGemini
    roots: dict[str, str]

    def by_name(self, name: str) -> FakeProvider:
        return {"openai": self.openai, "anthropic": self.anthropic, "gemini": self.gemini}[name]

    def all(self) -> list[FakeProvider]:
        return [self.openai, self.anthropic, self.gemini]


@pytest_asyncio.fixture(scope="module", loop_scope="module")
async def upstreams() -> AsyncIterator[Upstreams]:
    """Starts the three fakes once per test module."""
    fakes = [FakeOpenAI(OPENAI_KEYS), FakeAnthropic(ANTHROPIC_KEYS), FakeGemini(GEMINI_KEYS)]
    servers = [TestServer(f.app(), host="127.0.0.1") for f in fakes]
    for server in servers:
        await server.start_server()
    roots = {f.name: str(s.make_url("")).rstrip("/") for f, s in zip(fakes, servers, strict=True)}
    yield Upstreams(fakes[0], fakes[1], fakes[2], roots)
    for server in servers:
        await server.close()


@pytest.fixture
def fakes(upstreams: Upstreams) -> Iterator[Upstreams]:
    """The module's fakes, emptied before the test; fails the test if a fake saw a bad request."""
    for fake in upstreams.all():
        fake.reset()
    yield upstreams
    problems = [p for fake in upstreams.all() for p in fake.problems]
    assert not problems, "fake upstreams rejected requests:\n" + "\n".join(problems)


@pytest.fixture
async def fake(aiohttp_server) -> FakeUpstream:
    """The scriptable fake upstream on loopback, its ``base_url`` set."""
    upstream = FakeUpstream()
    server = await aiohttp_server(upstream.app)
    upstream.base_url = str(server.make_url("")).rstrip("/")
    return upstream


@pytest.fixture
def router_client(aiohttp_client) -> Callable[[Config], Awaitable[TestClient]]:
    """Serves ``create_app(cfg)`` for the test and returns a client of it."""

    async def serve(cfg: Config) -> TestClient:
        return await aiohttp_client(create_app(cfg))

    return serve


@pytest.fixture
def router_config(fake: FakeUpstream) -> Config:
    """The config `client` serves: `make_config` at the fake; a test module overrides it."""
    return make_config(fake.base_url)


@pytest.fixture
async def client(router_client, router_config: Config) -> TestClient:
    """A client of the router app serving `router_config`."""
    return await router_client(router_config)
