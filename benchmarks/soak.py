"""The soak: many requests through the router while the fake provider injects faults.

It sends ``SoakOptions.requests`` requests, streaming and not, in both client formats, to
both provider formats, with a ``fault_rate`` share of the fake's answers faulty (see
`benchmarks.fake_provider`); each model has a fallback target and each provider four keys, so
most faults are retried unseen. It checks that every request got one complete answer or one
clean error (`benchmarks.loadgen`), that the router's file descriptors and TCP connections
return to their starting level, and that its RSS after the warm-up stays within 10%.
"""

from __future__ import annotations

import asyncio
import os
import time
from collections import Counter
from dataclasses import asdict, dataclass

import aiohttp

from benchmarks.fake_provider import FakeConfig, FakeState
from benchmarks.gateways import (
    PLAIN_MODEL,
    STREAM_MODEL,
    Server,
    cpu_plan,
    sample_rss,
    start_fake,
    start_router,
    temporary_workdir,
    wait_ready,
)
from benchmarks.loadgen import CLIENT_FORMATS, ERROR, HANG, TORN, Sample, send
from benchmarks.procfs import count_fds

# The providers' keep-alive pool closes a connection idle for 15 s (KEEPALIVE_S in
# router/upstream_client.py); the check allows twice that.
POOL_KEEPALIVE_S = 30.0


@dataclass
class SoakOptions:
    """What one soak run does.

    Args:
        requests: Requests in all.
        concurrency: Requests in flight at once.
        fault_rate: Share of the fake's answers that are faulty.
        seed: Seed of the fault draws.
        warmup_share: Share of the requests before the RSS reference is taken.
        settle_s: After the run, how long to wait for the upstream keep-alive pool to close.
        rss_tolerance: Allowed RSS growth over the reference.
        timeout_s: A response not complete by then is a hang.
    """

    requests: int = 10_000
    concurrency: int = 32
    fault_rate: float = 0.05
    seed: int = 8
    warmup_share: float = 0.1
    settle_s: float = 35.0
    rss_tolerance: float = 0.10
    timeout_s: float = 30.0


def _without_pool(counts: dict) -> int:
    return counts["fds"] - counts.get("upstream", 0)


def soak_request(n: int) -> tuple[str, str, bool]:
    """Request ``n`` of the soak: (client format, model, stream), cycling through all eight.

    Args:
        n: The request's number.
    """
    client = CLIENT_FORMATS[n % 2]
    stream = (n // 2) % 2 == 0
    model = PLAIN_MODEL if (n // 4) % 2 == 0 else STREAM_MODEL
    return client, model, stream


async def run_soak(options: SoakOptions, pin: bool = False, chunks: int = 20) -> dict:
    """Soak the router under injected faults and check its invariants.

    Args:
        options: The soak's size and limits.
        pin: Put the router on its own CPU.
        chunks: Text pieces per answer.
    """
    server_cpus, client_cpus = cpu_plan(pin)
    if client_cpus:
        os.sched_setaffinity(0, client_cpus)
    fake_config = FakeConfig(chunks=chunks, fault_rate=options.fault_rate, seed=options.seed)
    oracle = FakeConfig(chunks=chunks, fault_rate=options.fault_rate, seed=options.seed)
    with temporary_workdir() as workdir:
        fake = start_fake(fake_config, client_cpus, workdir)
        router = start_router(fake.url, workdir, server_cpus, soak=True)
        sampler = asyncio.ensure_future(sample_rss(router, 0.25))
        try:
            return await _soak(options, fake, router, oracle, chunks)
        finally:
            sampler.cancel()
            router.stop()
            fake.stop()


async def _soak(
    options: SoakOptions, fake: Server, router: Server, oracle: FakeConfig, chunks: int
) -> dict:
    own_port = int(router.url.rsplit(":", 1)[1])
    fake_port = int(fake.url.rsplit(":", 1)[1])
    async with aiohttp.ClientSession() as session:
        await wait_ready(router, session, chunks)
    before = count_fds(router.proc.pid, own_port, fake_port)
    warm_count = int(options.requests * options.warmup_share)
    marks: dict[str, float] = {}
    connector = aiohttp.TCPConnector(limit=options.concurrency)
    timeout = aiohttp.ClientTimeout(total=None)
    results: dict[int, Sample] = {}
    numbers = iter(range(options.requests))
    began = time.monotonic()
    async with aiohttp.ClientSession(connector=connector, timeout=timeout) as session:

        async def worker() -> None:
            # The workers share one iterator: each request number is sent exactly once.
            for n in numbers:
                if n == warm_count:
                    marks["warm"] = time.monotonic()
                client, model, stream = soak_request(n)
                results[n] = await send(
                    session,
                    router.url,
                    client,
                    model,
                    stream,
                    f"soak-{n}",
                    chunks,
                    options.timeout_s,
                )

        await asyncio.gather(*(worker() for _ in range(options.concurrency)))
    elapsed = time.monotonic() - began
    marks.setdefault("warm", time.monotonic())
    # The client's connections are closed now; the router should drop its side promptly.
    await asyncio.sleep(0.5)
    right_after = count_fds(router.proc.pid, own_port, fake_port)
    settled = right_after
    deadline = time.monotonic() + options.settle_s
    while time.monotonic() < deadline:
        settled = count_fds(router.proc.pid, own_port, fake_port)
        if settled["fds"] <= before["fds"]:
            break
        await asyncio.sleep(0.5)
    async with aiohttp.ClientSession() as session, session.get(f"{fake.url}/stats") as resp:
        fake_stats = await resp.json()
    return soak_report(
        options,
        results,
        elapsed,
        oracle,
        router,
        marks["warm"],
        {"before": before, "right_after": right_after, "settled": settled},
        fake_stats,
    )


def soak_report(
    options: SoakOptions,
    results: dict[int, Sample],
    window_s: float,
    oracle: FakeConfig,
    router: Server,
    warm_at: float,
    fds: dict,
    fake_stats: dict,
) -> dict:
    """Outcomes by the fault each request's first attempt drew, and the invariants.

    Args:
        options: The soak's options.
        results: Each request's sample, by request number.
        window_s: How long the run took.
        oracle: The fake's config, to redraw each request's first fault.
        router: The router (its RSS samples).
        warm_at: When the warm-up ended.
        fds: Descriptor counts before, right after, and after settling.
        fake_stats: The fake's counters.
    """
    # The fake's draw is a pure function of seed, text and attempt number: redraw the first
    # attempt of every request.
    by_fault: dict[str, Counter[str]] = {}
    for n, sample in results.items():
        fault = FakeState(oracle).draw(f"soak-{n}")
        by_fault.setdefault(fault.kind if fault else "none", Counter())[sample.outcome] += 1
    samples = list(results.values())
    outcomes = Counter(s.outcome for s in samples)
    after = [rss for t, rss in router.rss_samples if t >= warm_at]
    reference = after[0] if after else None
    growth = (max(after) / reference - 1) if after else None
    before, settled = fds["before"], fds["settled"]
    invariants = {
        "every_request_answered_once": len(samples) == options.requests,
        "no_torn_or_hung": outcomes[TORN] == 0 and outcomes[HANG] == 0,
        # The upstream keep-alive pool may hold idle connections to the fake until its
        # keep-alive timeout (15 s) closes them: all other descriptors must be back at once.
        "fds_back_to_start_except_pool": _without_pool(settled) <= _without_pool(before),
        "no_client_sockets_left": settled.get("clients", 0) <= before.get("clients", 0),
        "no_half_closed_sockets": not any(k.startswith("upstream_") for k in settled),
        "rss_within_tolerance": growth is not None and growth <= options.rss_tolerance,
    }
    if options.settle_s > POOL_KEEPALIVE_S:
        invariants["fds_back_to_start_with_pool"] = settled["fds"] <= before["fds"]
    details = Counter(s.detail for s in samples if s.outcome in (TORN, HANG))
    return {
        "options": asdict(options),
        "requests": len(samples),
        "rps": len(samples) / window_s,
        "outcomes": dict(outcomes),
        "by_first_fault": {k: dict(v) for k, v in sorted(by_fault.items())},
        "error_messages": dict(
            Counter(s.detail for s in samples if s.outcome == ERROR).most_common(8)
        ),
        "torn_or_hung_details": dict(details.most_common(8)),
        "fake": fake_stats,
        "fds": fds,
        "rss_reference_mib": reference / 2**20 if reference else None,
        "rss_max_after_warmup_mib": max(after) / 2**20 if after else None,
        "rss_growth": growth,
        "invariants": invariants,
        "passed": all(invariants.values()),
    }
