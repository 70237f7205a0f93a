"""Smoke test of ``python -m benchmarks.mixed_traffic``: a short mix through the router's rules,
budgets, spillover and breakers against the fake providers; nothing lost or misrouted."""

from __future__ import annotations

from benchmarks.mixed_traffic import CLASSES, MixOptions, print_report, run_mix


async def test_a_short_mix_loses_nothing_and_routes_every_class(capsys) -> None:
    report = await run_mix(MixOptions(duration_s=2.0, rate=30.0, local_latency_s=0.2))
    print_report(report)
    assert "lost requests: 0, misrouted: 0" in capsys.readouterr().out
    assert report["lost"] == 0 and report["misrouted"] == 0
    rows = report["classes"]
    assert sum(row["requests"] for row in rows.values()) == 60
    assert set(rows) == set(CLASSES)
    assert set(rows["local_only"]["providers"]) == {"local"}
    assert set(rows["long"]["rules"]) == {"long-context"}
    assert set(rows["tools"]["rules"]) == {"agents"}
    # Four local answers at once, 0.2 s each, for 30 requests a second: the rest spill over.
    assert rows["text"]["providers"].get("local", 0) > 0
    assert rows["text"]["providers"].get("oai", 0) + rows["text"]["providers"].get("claude", 0) > 0
    spent = report["spend"]
    assert all(spent[name]["tokens"] > 0 for name in ("alice", "bob", "carol"))
