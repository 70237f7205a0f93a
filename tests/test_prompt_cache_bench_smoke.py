"""Smoke test of the prompt-cache benchmark on a tiny checkpoint: every warm request hits."""

import argparse

from benchmarks import prompt_cache as bench
from tests.mlx_smolvlm.conftest import build_hf_checkpoint


async def test_prompt_cache_benchmark_reports_cold_and_warm_ttft(tmp_path):
    checkpoint = build_hf_checkpoint(tmp_path / "tiny")
    args = argparse.Namespace(checkpoint=str(checkpoint), prefix_tokens=300, repeats=2)
    report = await bench.run(args)
    assert report["prompt_tokens"] >= 300 and len(report["rounds"]) == 2
    # Each round's second request reuses the shared system prompt (the first ones reuse
    # only the chat template's first tokens).
    assert report["cache"]["hits"] >= 2 and report["cache"]["reused_tokens"] >= 2 * 300
    assert all(r["ratio"] == r["warm_s"] / r["cold_s"] for r in report["rounds"])
