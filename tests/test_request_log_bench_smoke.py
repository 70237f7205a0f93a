"""Smoke test of ``python -m benchmarks.request_log`` at a small size."""

from __future__ import annotations

import sqlite3
from pathlib import Path

from benchmarks.request_log import run


async def test_request_log_benchmark_at_a_small_size(tmp_path: Path) -> None:
    report = await run(300, tmp_path)
    assert report["rows"] == 300
    assert set(report["loop_us_per_request"]) == {"buffered", "inline"}
    assert report["writer_rows_per_s"] > 0
    for name in ("buffered.db", "inline.db"):
        db = sqlite3.connect(tmp_path / name)
        assert db.execute("SELECT COUNT(*) FROM requests").fetchone() == (300,)
        db.close()
