"""Smoke test of the concurrent-streams benchmark on a tiny checkpoint: it counts the tokens
each stream actually produced."""

import argparse

from benchmarks import local_concurrency as bench
from tests.mlx_smolvlm.conftest import build_hf_checkpoint


async def test_local_concurrency_counts_the_tokens_produced(tmp_path, monkeypatch):
    checkpoint = build_hf_checkpoint(tmp_path / "tiny")
    produced = []
    one_stream = bench.one_stream

    async def counted(*args):
        result = await one_stream(*args)
        produced.append(result["tokens"])
        return result

    monkeypatch.setattr(bench, "one_stream", counted)
    args = argparse.Namespace(checkpoint=str(checkpoint), max_tokens=5, repeats=1, image=False)
    report = await bench.run(args)
    assert [row["streams"] for row in report["rows"]] == list(bench.CONCURRENCY)
    # The warm-up's 2 streams of 8 tokens, then every round's streams of 5 (EOS ignored).
    assert produced == [8, 8] + [5] * sum(bench.CONCURRENCY)
    assert all(row["total_tps"] > 0 and row["speedup"] > 0 for row in report["rows"])
