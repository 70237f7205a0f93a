"""Smoke test of ``python -m benchmarks.hostile_clients``: the three parts at a small size
(the router as a real process on loopback)."""

from __future__ import annotations

from benchmarks.hostile_clients import HostileOptions, run_hostile
from benchmarks.loadgen import ANSWER


async def test_hostile_clients_benchmark_at_a_small_size() -> None:
    options = HostileOptions(
        streams=50,
        stream_s=0.5,
        slow_requests=3,
        slow_s=0.5,
        plain_requests=3,
        big_mib=2,
        big_urls=12,
        big_parallel=2,
    )
    report = await run_hostile(options)
    streams = report["streams"]
    assert streams["outcomes"] == {ANSWER: 50}, streams
    assert streams["wall_s"] < 10, streams
    slow = report["slow_media"]
    assert slow["slow_statuses"] == [200], slow
    assert slow["hundred_urls"]["status"] == 400
    assert "at most 8" in slow["hundred_urls"]["message"]
    big = report["big_media"]
    assert big["many_urls"]["status"] == 400 and "12 image URLs" in big["many_urls"]["message"]
    assert big["two_urls"]["status"] == 200 and big["two_urls_parallel"]["statuses"] == [200]
    assert big["two_urls_parallel"]["peak_rss_mib"] > 10
