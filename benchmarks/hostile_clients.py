"""The router in front of hostile clients: concurrency, slow media and big media, measured
against one router process (``python -m router``) on loopback.

Three parts, each against the same router:

- ``streams``: ``--streams`` (500) concurrent Anthropic-format streams through the router to
  `benchmarks.fake_provider`, each stream lasting ``--stream-s`` (2) seconds at the fake
  (20 pieces). Reports the wall time until every stream has ended (and the same streams
  straight to the fake, the machine's baseline), the outcomes, the most connections the fake
  saw at once and the router's CPU time. Each
  upstream provider has its own pool (``max_connections``, default 1000), so no hidden cap of
  100 connections queues the streams.
- ``slow_media``: ``--slow-requests`` (40) requests, each with ``media.max_urls`` (8) image
  URLs that take ``--slow-s`` (2) seconds each, to a Gemini provider (the router inlines the
  images), while plain requests are timed alone and then during the slow ones. Reports the
  delay added to the plain requests (media fetches have their own pool), and the answer to
  one request with 100 image URLs.
- ``big_media``: requests with ``--big-mib`` (15) MiB images: ``--big-urls`` (12) of them in
  one request (over ``media.max_urls``: refused), 2 in one request (within
  ``media.max_total_bytes``: served), and ``--big-parallel`` (10) such requests at once.
  Reports the router's peak RSS (its process tree, sampled every 50 ms) for each.

The image server and the Gemini fake run in this process (aiohttp, on 127.0.0.1); the router
config allows that one loopback address for media (``media.allow``), which is for benchmarks
and tests only.

Usage::

    python -m benchmarks.hostile_clients [--streams 500] [--stream-s 2] [--json out.json]
"""

from __future__ import annotations

import argparse
import asyncio
import json
import logging
import statistics
import subprocess
import sys
import time
from collections.abc import Awaitable
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import TypeVar

import aiohttp
import yaml
from aiohttp import web

from benchmarks.fake_provider import FakeConfig
from benchmarks.gateways import (
    REPO_ROOT,
    STREAM_MODEL,
    Server,
    free_port,
    router_config,
    sample_rss,
    start_fake,
    temporary_workdir,
    wait_ready,
)
from benchmarks.loadgen import CLIENT_KEY, send
from benchmarks.procfs import tree_cpu_s

logger = logging.getLogger(__name__)

T = TypeVar("T")

GEMINI_MODEL = "bench-gemini"
PIECES = 20
MIB = 1024 * 1024
# A 1x1 PNG, the slow images' body.
PNG = bytes.fromhex(
    "89504e470d0a1a0a0000000d4948445200000001000000010806000000"
    "1f15c4890000000d49444154789c6360000002000154a24f5d0000000049454e44ae426082"
)


@dataclass
class HostileOptions:
    """What to run.

    Args:
        streams: Concurrent streams in the ``streams`` part.
        stream_s: How long each stream lasts at the fake.
        slow_requests: Requests with slow image URLs at once.
        slow_s: How long each slow image takes.
        plain_requests: Plain requests timed alone, and again during the slow ones.
        big_mib: Size of each big image.
        big_urls: Big image URLs in the over-the-limit request.
        big_parallel: Requests with two big images at once.
        provider_connections: Each provider's ``max_connections`` (None: the default, 1000;
            100 shows aiohttp's default pool, which the router used to share).
    """

    streams: int = 500
    stream_s: float = 2.0
    slow_requests: int = 40
    slow_s: float = 2.0
    plain_requests: int = 20
    big_mib: int = 15
    big_urls: int = 12
    big_parallel: int = 10
    provider_connections: int | None = None


class Sidecar:
    """The image server and the Gemini fake, in this process on 127.0.0.1."""

    def __init__(self, big_bytes: int) -> None:
        self.big = b"\x89PNG" + b"x" * (big_bytes - 4)
        # The Gemini fake takes the inlined images (aiohttp's default body limit is 1 MiB).
        app = web.Application(client_max_size=1024 * MIB)
        app.router.add_get("/slow.png", self.slow)
        app.router.add_get("/big.png", self.big_image)
        app.router.add_post("/v1beta/models/{target}", self.gemini)
        self.runner = web.AppRunner(app, access_log=None)
        self.url = ""

    async def start(self) -> None:
        await self.runner.setup()
        port = free_port()
        await web.TCPSite(self.runner, "127.0.0.1", port, backlog=4096).start()
        self.url = f"http://127.0.0.1:{port}"

    async def slow(self, request: web.Request) -> web.Response:
        await asyncio.sleep(float(request.query["s"]))
        return web.Response(body=PNG, content_type="image/png")

    async def big_image(self, request: web.Request) -> web.Response:
        return web.Response(body=self.big, content_type="image/png")

    async def gemini(self, request: web.Request) -> web.Response:
        await request.read()
        answer = {
            "candidates": [
                {
                    "content": {"role": "model", "parts": [{"text": "seen"}]},
                    "finishReason": "STOP",
                    "index": 0,
                }
            ],
            "usageMetadata": {"promptTokenCount": 1, "candidatesTokenCount": 1},
        }
        return web.json_response(answer)


def hostile_config(
    fake_url: str, sidecar_url: str, port: int, provider_connections: int | None
) -> dict:
    """The benchmark router's config (`benchmarks.gateways.router_config`) plus a Gemini
    provider at the sidecar, and the sidecar's address allowed for media."""
    config = router_config(fake_url, port)
    if provider_connections is not None:
        for provider in config["providers"].values():
            provider["max_connections"] = provider_connections
    config["providers"]["fake-gemini"] = {
        "type": "gemini",
        "base_url": sidecar_url,
        "keys": ["bench-key-g"],
    }
    config["models"][GEMINI_MODEL] = [{"provider": "fake-gemini", "model": "gemini-fake"}]
    config["media"] = {"allow": ["127.0.0.1/32"]}
    config["limits"] = {"image_timeout_s": 30.0}
    config["log"] = {"level": "WARNING"}
    return config


def start_router(config: dict, workdir: Path) -> Server:
    """``python -m router --config`` with ``config`` (its log in ``workdir``)."""
    path = workdir / "router-hostile.yaml"
    path.write_text(yaml.safe_dump(config))
    log = workdir / "router-hostile.log"
    with log.open("w") as out:
        proc = subprocess.Popen(
            [sys.executable, "-m", "router", "--config", str(path)],
            stdout=out,
            stderr=subprocess.STDOUT,
            cwd=REPO_ROOT,
        )
    url = f"http://127.0.0.1:{config['listen']['port']}"
    return Server("router", proc, url, time.monotonic(), log)


def image_request(urls: list[str]) -> dict:
    """An OpenAI chat request for the Gemini model with these image URLs."""
    content = [{"type": "text", "text": "what are these"}]
    content += [{"type": "image_url", "image_url": {"url": url}} for url in urls]
    return {"model": GEMINI_MODEL, "messages": [{"role": "user", "content": content}]}


async def post(session: aiohttp.ClientSession, url: str, body: dict) -> tuple[int, str, float]:
    """POST a chat request; the status, the error message (if any) and the seconds taken."""
    started = time.monotonic()
    headers = {"Authorization": f"Bearer {CLIENT_KEY}"}
    async with session.post(f"{url}/v1/chat/completions", json=body, headers=headers) as resp:
        answer = await resp.json()
    message = answer.get("error", {}).get("message", "") if resp.status >= 400 else ""
    return resp.status, message, time.monotonic() - started


async def peak_connections(session: aiohttp.ClientSession, fake: Server, peak: list[int]) -> None:
    """Record the fake's most open connections (its ``/stats``) until cancelled."""
    while True:
        async with session.get(f"{fake.url}/stats") as resp:
            peak[0] = max(peak[0], (await resp.json())["connections"])
        await asyncio.sleep(0.05)


async def measure_streams(
    session: aiohttp.ClientSession, router: Server, fake: Server, options: HostileOptions
) -> dict:
    """``options.streams`` concurrent streams, all started at once: first straight to the
    fake (the baseline on this machine), then through the router."""
    # Its own session, closed after: its connections must not count as the router's.
    async with aiohttp.ClientSession(connector=aiohttp.TCPConnector(limit=0)) as direct:
        started = time.monotonic()
        await asyncio.gather(
            *(
                send(direct, fake.url, "anthropic", STREAM_MODEL, True, f"d{i}", PIECES, 60.0)
                for i in range(options.streams)
            )
        )
        direct_wall = time.monotonic() - started
    await asyncio.sleep(0.5)
    peak = [0]
    sampler = asyncio.ensure_future(peak_connections(session, fake, peak))
    cpu = tree_cpu_s(router.proc.pid)
    started = time.monotonic()
    samples = await asyncio.gather(
        *(
            send(session, router.url, "anthropic", STREAM_MODEL, True, f"s{i}", PIECES, 60.0)
            for i in range(options.streams)
        )
    )
    wall = time.monotonic() - started
    sampler.cancel()
    outcomes: dict[str, int] = {}
    for sample in samples:
        outcomes[sample.outcome] = outcomes.get(sample.outcome, 0) + 1
    latencies = sorted(s.latency_s for s in samples)
    return {
        "streams": options.streams,
        "stream_s": options.stream_s,
        "wall_s": round(wall, 2),
        "direct_wall_s": round(direct_wall, 2),
        "outcomes": outcomes,
        "latency_p50_s": round(statistics.median(latencies), 2),
        "latency_max_s": round(latencies[-1], 2),
        "upstream_peak_connections": peak[0],
        # On a busy machine the wall time is this CPU time's share of a core, not a pool's cap.
        "router_cpu_s": round(tree_cpu_s(router.proc.pid) - cpu, 2),
    }


async def plain_latencies(session: aiohttp.ClientSession, url: str, count: int) -> list[float]:
    """``count`` plain (OpenAI, non-streaming) requests one after another."""
    body = {"model": "bench-openai", "messages": [{"role": "user", "content": "plain"}]}
    result = []
    for _ in range(count):
        status, message, seconds = await post(session, url, body)
        if status != 200:
            raise RuntimeError(f"a plain request failed: {status} {message}")
        result.append(seconds)
    return result


async def measure_slow_media(
    session: aiohttp.ClientSession, router: Server, sidecar: Sidecar, options: HostileOptions
) -> dict:
    """Plain requests alone, then while ``options.slow_requests`` requests wait on slow
    image URLs."""
    alone = await plain_latencies(session, router.url, options.plain_requests)
    urls = [f"{sidecar.url}/slow.png?s={options.slow_s}&i={i}" for i in range(8)]
    slow = [
        asyncio.ensure_future(post(session, router.url, image_request(urls)))
        for _ in range(options.slow_requests)
    ]
    await asyncio.sleep(0.3)  # the fetches are under way
    during = await plain_latencies(session, router.url, options.plain_requests)
    still_fetching = sum(not task.done() for task in slow)
    slow_results = await asyncio.gather(*slow)
    hundred = [f"{sidecar.url}/slow.png?s={options.slow_s}&j={i}" for i in range(100)]
    status, message, seconds = await post(session, router.url, image_request(hundred))
    return {
        "slow_requests": options.slow_requests,
        "urls_each": len(urls),
        "slow_s": options.slow_s,
        "slow_statuses": sorted({s for s, _, _ in slow_results}),
        "slow_p50_s": round(statistics.median(s for _, _, s in slow_results), 2),
        "slow_still_fetching_after_plain": still_fetching,
        "plain_alone_p50_ms": round(statistics.median(alone) * 1000, 1),
        "plain_during_p50_ms": round(statistics.median(during) * 1000, 1),
        "plain_during_max_ms": round(max(during) * 1000, 1),
        "added_delay_p50_ms": round(
            (statistics.median(during) - statistics.median(alone)) * 1000, 1
        ),
        "hundred_urls": {"status": status, "message": message, "seconds": round(seconds, 3)},
    }


async def peak_rss_during(router: Server, work: Awaitable[T]) -> tuple[T, float]:
    """Run ``work`` while sampling the router's RSS; its result and the peak in MiB."""
    router.rss_peak_bytes = 0
    sampler = asyncio.ensure_future(sample_rss(router, 0.05))
    try:
        result = await work
        await asyncio.sleep(0.2)
    finally:
        sampler.cancel()
    return result, round(router.rss_peak_bytes / MIB, 1)


async def measure_big_media(
    session: aiohttp.ClientSession, router: Server, sidecar: Sidecar, options: HostileOptions
) -> dict:
    """The router's RSS with requests of big images, under the default per-request limits."""
    _, idle = await peak_rss_during(router, asyncio.sleep(0.3))
    many = [f"{sidecar.url}/big.png?i={i}" for i in range(options.big_urls)]
    (status, message, seconds), many_peak = await peak_rss_during(
        router, post(session, router.url, image_request(many))
    )
    two = many[:2]
    (two_status, _, two_s), two_peak = await peak_rss_during(
        router, post(session, router.url, image_request(two))
    )
    parallel = asyncio.gather(
        *(post(session, router.url, image_request(two)) for _ in range(options.big_parallel))
    )
    results, parallel_peak = await peak_rss_during(router, parallel)
    _, after = await peak_rss_during(router, asyncio.sleep(0.5))
    return {
        "image_mib": options.big_mib,
        "idle_rss_mib": idle,
        "many_urls": {
            "urls": len(many),
            "status": status,
            "message": message,
            "seconds": round(seconds, 3),
            "peak_rss_mib": many_peak,
        },
        "two_urls": {"status": two_status, "seconds": round(two_s, 2), "peak_rss_mib": two_peak},
        "two_urls_parallel": {
            "requests": options.big_parallel,
            "statuses": sorted({s for s, _, _ in results}),
            "peak_rss_mib": parallel_peak,
        },
        "rss_after_mib": after,
    }


async def run_hostile(options: HostileOptions) -> dict:
    """Start the fake, the sidecar and the router; run the three parts; stop everything.

    Args:
        options: What to run.

    Returns:
        The report: one section per part, and the options.
    """
    interval = options.stream_s / PIECES
    with temporary_workdir() as workdir:
        fake = start_fake(FakeConfig(chunks=PIECES, chunk_interval_s=interval), None, workdir)
        sidecar = Sidecar(options.big_mib * MIB)
        await sidecar.start()
        config = hostile_config(fake.url, sidecar.url, free_port(), options.provider_connections)
        router = start_router(config, workdir)
        connector = aiohttp.TCPConnector(limit=0)
        timeout = aiohttp.ClientTimeout(total=120)
        try:
            async with aiohttp.ClientSession(connector=connector, timeout=timeout) as session:
                await wait_ready(router, session, PIECES)
                report = {
                    "options": asdict(options),
                    "streams": await measure_streams(session, router, fake, options),
                    "slow_media": await measure_slow_media(session, router, sidecar, options),
                    "big_media": await measure_big_media(session, router, sidecar, options),
                }
        finally:
            router.stop()
            fake.stop()
            await sidecar.runner.cleanup()
    return report


def main(argv: list[str] | None = None) -> int:
    """Run the benchmark and print its report as JSON."""
    parser = argparse.ArgumentParser(
        prog="python -m benchmarks.hostile_clients", description=__doc__
    )
    defaults = HostileOptions()
    parser.add_argument("--streams", type=int, default=defaults.streams)
    parser.add_argument("--stream-s", type=float, default=defaults.stream_s)
    parser.add_argument("--slow-requests", type=int, default=defaults.slow_requests)
    parser.add_argument("--slow-s", type=float, default=defaults.slow_s)
    parser.add_argument("--plain-requests", type=int, default=defaults.plain_requests)
    parser.add_argument("--big-mib", type=int, default=defaults.big_mib)
    parser.add_argument("--big-urls", type=int, default=defaults.big_urls)
    parser.add_argument("--big-parallel", type=int, default=defaults.big_parallel)
    parser.add_argument("--provider-connections", type=int, default=None)
    parser.add_argument("--json", type=Path, help="also write the report here")
    args = parser.parse_args(argv)
    options = HostileOptions(
        streams=args.streams,
        stream_s=args.stream_s,
        slow_requests=args.slow_requests,
        slow_s=args.slow_s,
        plain_requests=args.plain_requests,
        big_mib=args.big_mib,
        big_urls=args.big_urls,
        big_parallel=args.big_parallel,
        provider_connections=args.provider_connections,
    )
    logging.basicConfig(level=logging.WARNING, format="%(levelname)s %(name)s: %(message)s")
    report = asyncio.run(run_hostile(options))
    text = json.dumps(report, indent=2)
    print(text)
    if args.json:
        args.json.write_text(text + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
