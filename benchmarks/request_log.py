"""What the request log costs a request on the event loop: buffering its row (with redaction
of 8 secrets) against the peer design, one SQLite transaction per request on the loop (WAL,
synchronous=NORMAL). Also the rows per second the writer thread stores, and the loop's longest
stall while it does (the machine's own scheduling noise included).

    python -m benchmarks.request_log            # 20,000 rows
    python -m benchmarks.request_log --rows 2000
"""

from __future__ import annotations

import argparse
import asyncio
import json
import sqlite3
import tempfile
import time
from pathlib import Path

from router.config import RequestLogConfig
from router.request_log import COLUMNS, LoggedRequest, RequestLog

RESULTS = Path(__file__).parent / "results" / "request_log.json"
# Secrets to redact in every row, as a config with a few providers has.
SECRETS = [f"sk-secret-key-number-{i:04d}" for i in range(8)]
INSERT = f"INSERT INTO requests ({', '.join(COLUMNS)}) VALUES ({', '.join('?' * len(COLUMNS))})"


def _row(i: int) -> LoggedRequest:
    return LoggedRequest(
        ts=time.time(),
        request_id=f"req-{i:08d}",
        method="POST",
        path="/v1/chat/completions",
        client="team-a",
        model="gpt",
        provider="oai",
        attempts="oai",
        rule=None,
        status=200 if i % 20 else 429,
        latency_ms=12.5,
        input_tokens=120,
        output_tokens=40,
        cost=None,
        error=None if i % 20 else "rate limited: slow down",
        request_body=None,
        response_body=None,
    )


async def _max_stall(work) -> tuple[float, float]:
    """Runs ``work()`` while a ticker measures the loop's longest stall; (stall s, wall s)."""
    stall = 0.0
    done = False

    async def ticker() -> None:
        nonlocal stall
        last = time.perf_counter()
        while not done:
            await asyncio.sleep(0.001)
            now = time.perf_counter()
            stall = max(stall, now - last - 0.001)
            last = now

    task = asyncio.create_task(ticker())
    start = time.perf_counter()
    await work()
    wall = time.perf_counter() - start
    done = True
    await task
    return stall, wall


async def run(rows: int, folder: Path) -> dict:
    """Measure the buffered log and the inline writes on ``rows`` rows.

    Args:
        rows: Rows written by each.
        folder: Where the SQLite files go.
    """
    log = RequestLog(RequestLogConfig(path=str(folder / "buffered.db")), SECRETS)
    entries = [_row(i) for i in range(rows)]
    start = time.perf_counter()
    for entry in entries:
        log.record(entry)
    record_us = (time.perf_counter() - start) / rows * 1e6

    async def buffered() -> None:
        while log.pending:
            assert await log.flush()

    buffered_stall, buffered_wall = await _max_stall(buffered)
    await log.close()

    db = sqlite3.connect(folder / "inline.db")
    db.execute("PRAGMA journal_mode = WAL")
    db.execute("PRAGMA synchronous = NORMAL")
    db.execute(f"CREATE TABLE requests (id INTEGER PRIMARY KEY, {', '.join(COLUMNS)})")

    # The peer: each request writes its own row, on the loop, as it ends.
    start = time.perf_counter()
    for entry in entries:
        with db:
            db.execute(INSERT, tuple(vars(entry).values()))
    inline_us = (time.perf_counter() - start) / rows * 1e6
    db.close()
    return {
        "rows": rows,
        "loop_us_per_request": {"buffered": round(record_us, 2), "inline": round(inline_us, 2)},
        "inline_over_buffered": round(inline_us / record_us, 1),
        "writer_rows_per_s": round(rows / buffered_wall),
        "max_loop_stall_ms_while_writing": round(buffered_stall * 1e3, 2),
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rows", type=int, default=20_000)
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as folder:
        report = asyncio.run(run(args.rows, Path(folder)))
    print(json.dumps(report, indent=2))
    RESULTS.parent.mkdir(exist_ok=True)
    RESULTS.write_text(json.dumps(report, indent=2) + "\n")


if __name__ == "__main__":
    main()
