"""Smoke test of the structured-output benchmark on a tiny checkpoint: all answers validate and
the overhead figures are measured."""

import argparse

from benchmarks import structured_output as bench
from tests.mlx_smolvlm.conftest import build_hf_checkpoint


async def test_structured_output_benchmark_validates_and_times(tmp_path):
    checkpoint = build_hf_checkpoint(tmp_path / "tiny")
    args = argparse.Namespace(checkpoint=str(checkpoint), generations=8, rows=4, max_tokens=400)
    report = await bench.run(args)
    assert report["valid"] == report["generations"] == 8
    assert report["tokens"] > 8 and report["matcher_ms_per_token"] > 0
    assert report["constrained_row_ms_per_token"] > 0 and report["free_row_ms_per_token"] > 0
