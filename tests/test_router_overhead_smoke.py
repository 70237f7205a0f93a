"""Smoke test of ``python -m benchmarks.router_overhead``: the fake provider, our router and the
floor proxy as real processes on loopback, a few dozen requests per level, one and two workers under
wrk, and a tiny soak with faults (no LiteLLM)."""

from __future__ import annotations

import asyncio

import aiohttp
import pytest

from benchmarks import fake_provider
from benchmarks.loadgen import ANSWER, ERROR, pieces_in_order, send
from benchmarks.router_overhead import BenchOptions, add_overheads, percentile, run_benchmark
from benchmarks.soak import SoakOptions, run_soak


async def test_benchmark_reports_every_level_of_fake_router_and_floor() -> None:
    options = BenchOptions(
        systems=("router", "floor"),
        concurrency=(1, 10),
        duration_s=None,
        requests=30,
        warmup_s=0.1,
        chunks=8,
        chunk_interval_s=0.0,
    )
    report = await run_benchmark(options)
    assert report["unavailable"] == {}
    cells = {(r["system"], r["workload"], r["concurrency"]) for r in report["rows"]}
    assert cells == {
        (system, workload, c)
        for system in ("direct", "router", "floor")
        for workload in ("plain", "stream")
        for c in (1, 10)
    }
    for row in report["rows"]:
        assert row["requests"] >= 30
        assert row["outcomes"] == {ANSWER: row["requests"]}, row["first_failure"]
        assert row["rps"] > 0 and row["latency_p50_ms"] <= row["latency_p99_ms"]
        if row["workload"] == "stream":
            assert row["ttfb_p50_ms"] is not None and row["piece_delay_p50_ms"] is not None
        if row["system"] != "direct":
            assert row["added_latency_p50_ms"] is not None
            if row["workload"] == "stream":
                assert row["added_ttfb_p50_ms"] is not None
                assert row["added_piece_delay_p99_ms"] is not None
    router = report["servers"]["router"]
    assert 0 < router["cold_start_s"] < 30 and router["rss_peak_mib"] > 10
    assert {"added_p50_ms_plain_c1", "added_ttfb_p50_ms_stream_c1"} <= report["targets"].keys()


async def test_wrk_workload_gives_the_worker_ratio() -> None:
    # wrk drives one and two workers at concurrency 100; the 2-worker ratio comes from its rows.
    options = BenchOptions(
        systems=("router",),
        concurrency=(100,),
        duration_s=1.0,
        warmup_s=0.2,
        chunks=8,
        chunk_interval_s=0.0,
        workers=(1, 2),
        wrk=True,
    )
    report = await run_benchmark(options)
    assert report["unavailable"] == {}
    wrk = {(r["system"], r["workers"]): r for r in report["rows"] if r["workload"] == "wrk"}
    assert wrk.keys() == {("direct", 1), ("router", 1), ("router", 2)}
    for row in wrk.values():
        assert row["outcomes"] == {ANSWER: row["requests"]}, row["first_failure"]
        assert row["rps"] > 0 and 0 < row["latency_p50_ms"] <= row["latency_p99_ms"]
        assert 0 < row["loadgen_cpu_share"] < 1
    ratio = report["targets"]["rps_ratio_2w_vs_1w_c100"]["value"]
    assert ratio == pytest.approx(wrk["router", 2]["rps"] / wrk["router", 1]["rps"])
    assert wrk["router", 1]["added_latency_p50_ms"] is not None


async def test_tiny_soak_with_faults_keeps_the_invariants() -> None:
    options = SoakOptions(
        requests=200, concurrency=10, fault_rate=0.2, seed=3, warmup_share=0.5, settle_s=0.0
    )
    report = await run_soak(options, chunks=8)
    assert report["invariants"], report
    assert report["passed"], (report["invariants"], report["torn_or_hung_details"])
    assert report["requests"] == 200
    assert sum(report["outcomes"].values()) == 200
    assert set(report["outcomes"]) <= {ANSWER, ERROR}
    injected = report["fake"]["faults"]
    assert sum(injected.values()) >= 20, injected
    first = report["by_first_fault"]
    assert sum(sum(c.values()) for c in first.values()) == 200
    # A request whose first attempt is fine gets its answer; most faulty first attempts are
    # retried unseen (a retry can draw a fault again at this rate, and a stream cut after its
    # first piece can only end with an error event).
    assert set(first["none"]) == {ANSWER}
    faulty = [c for kind, c in first.items() if kind != "none"]
    assert sum(c.get(ANSWER, 0) for c in faulty) > sum(sum(c.values()) for c in faulty) / 2
    assert report["fds"]["settled"]["non_socket_fds"] == report["fds"]["before"]["non_socket_fds"]


async def test_fake_faults_are_deterministic_and_well_formed() -> None:
    config = fake_provider.FakeConfig(chunks=4, fault_rate=0.5, seed=1, slow_s=0.01)
    draws = [fake_provider.FakeState(config).draw(f"x{i}") for i in range(40)]
    again = [fake_provider.FakeState(config).draw(f"x{i}") for i in range(40)]
    assert [d and d.kind for d in draws] == [d and d.kind for d in again]
    assert {d.kind for d in draws if d} == set(fake_provider.FAULT_KINDS)
    server = await fake_provider.serve(config)
    url = f"http://127.0.0.1:{server.sockets[0].getsockname()[1]}"
    try:
        async with aiohttp.ClientSession() as session:
            samples = await asyncio.gather(
                *(
                    send(session, url, client, "m", stream, f"x{i}", 4, 5.0)
                    for i in range(40)
                    for client in ("openai", "anthropic")
                    for stream in (False, True)
                )
            )
            async with session.get(f"{url}/stats") as resp:
                stats = await resp.json()
    finally:
        server.close()
        await server.wait_closed()
    outcomes = {s.outcome for s in samples}
    # A direct client sees the raw faults: cut streams and resets are torn, 429/500 errors.
    assert {ANSWER, ERROR, "torn"} <= outcomes
    assert "hang" not in outcomes
    assert stats["requests"] == 160 and sum(stats["faults"].values()) > 0


def test_helpers() -> None:
    assert pieces_in_order("0@1 1@5 2@0 ", 3)
    assert not pieces_in_order("0@1 2@5 1@0 ", 3) and not pieces_in_order("0@1 ", 2)
    assert percentile([], 50) is None
    assert percentile([3.0, 1.0, 2.0, 4.0], 50) == 2.0
    assert percentile([float(i) for i in range(100)], 99) == 98.0
    rows = [
        {"system": "direct", "workload": "plain", "concurrency": 1, "latency_p50_ms": 1.0},
        {"system": "router", "workload": "plain", "concurrency": 1, "latency_p50_ms": 1.5},
    ]
    add_overheads(rows)
    assert rows[1]["added_latency_p50_ms"] == pytest.approx(0.5)
    assert rows[1]["added_ttfb_p50_ms"] is None
    with pytest.raises(ValueError, match="wrk: needs duration_s"):
        BenchOptions(duration_s=None, requests=30, wrk=True)
