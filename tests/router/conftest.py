"""Shared fixtures for the router tests: the fake providers on loopback, once per module."""

from __future__ import annotations

from collections.abc import AsyncIterator, Iterator
from dataclasses import dataclass

import pytest
import pytest_asyncio
from aiohttp.test_utils import TestServer

from tests.router.fakes import (
    ANTHROPIC_KEYS,
    GEMINI_KEYS,
    OPENAI_KEYS,
    FakeAnthropic,
    FakeGemini,
    FakeOpenAI,
    FakeProvider,
)


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
