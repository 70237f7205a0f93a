"""The request log: what a request leaves in it (and what it never does: a secret), bodies only
when enabled, retention by age and size, the admin API's filters, paging and statistics."""

from __future__ import annotations

import asyncio
import sqlite3
import time
from pathlib import Path

import pytest
from aiohttp.test_utils import TestClient

from router.app import create_app
from router.config import ConfigError, RequestLogConfig
from router.request_log import LoggedRequest, Query, RequestLog
from tests.router.console_fixtures import (
    ADMIN_KEY,
    CLIENT_KEY,
    OTHER_CLIENT_KEY,
    console_config,
)
from tests.router.helpers import Answer, FakeUpstream

ADMIN = {"Authorization": f"Bearer {ADMIN_KEY}"}
SECRETS = (ADMIN_KEY, CLIENT_KEY, "sk-one-123456789", "ak-one-123456789", "gk-one-123456789")


def entry(**fields: object) -> LoggedRequest:
    values = {
        "ts": time.time(),
        "request_id": "r",
        "method": "POST",
        "path": "/v1/chat/completions",
        "client": "team-a",
        "model": "gpt",
        "provider": "oai",
        "attempts": "oai",
        "rule": None,
        "status": 200,
        "latency_ms": 10.0,
        "input_tokens": 5,
        "output_tokens": 2,
        "cost": None,
        "error": None,
        "request_body": None,
        "response_body": None,
    }
    return LoggedRequest(**{**values, **fields})


async def chat(client: TestClient, model: str, key: str = CLIENT_KEY, text: str = "hi") -> int:
    body = {"model": model, "messages": [{"role": "user", "content": text}]}
    resp = await client.post(
        "/v1/chat/completions", json=body, headers={"Authorization": f"Bearer {key}"}
    )
    await resp.read()
    return resp.status


async def flushed(client: TestClient, count: int) -> dict:
    """The first page of the log once it holds ``count`` rows."""
    for _ in range(100):
        page = await (await client.get("/admin/requests", headers=ADMIN)).json()
        if page["total"] >= count:
            return page
        await asyncio.sleep(0.02)
    raise AssertionError(f"the log never reached {count} rows: {page}")


async def test_a_request_leaves_its_metadata_and_no_body_by_default(
    aiohttp_client, fake: FakeUpstream, tmp_path: Path
):
    client = await aiohttp_client(create_app(console_config(fake.base_url, tmp_path / "l.db")))
    assert await chat(client, "claude") == 200
    assert (await client.get("/health")).status == 200  # probes are not client requests
    assert (await client.get("/admin/keys", headers=ADMIN)).status == 200
    (row,) = (await flushed(client, 1))["requests"]
    assert row["client"] == "team-a"
    assert (row["method"], row["path"], row["model"], row["provider"]) == (
        "POST",
        "/v1/chat/completions",
        "claude",
        "claude",
    )
    assert (row["status"], row["input_tokens"], row["output_tokens"]) == (200, 5, 2)
    assert row["latency_ms"] > 0 and abs(row["ts"] - time.time()) < 10
    full = await (await client.get(f"/admin/requests/{row['id']}", headers=ADMIN)).json()
    assert full["request_body"] is None and full["response_body"] is None
    resp = await client.get("/admin/requests/999", headers=ADMIN)
    assert resp.status == 404


async def test_no_secret_is_ever_stored(aiohttp_client, fake: FakeUpstream, tmp_path: Path):
    """Secrets in a prompt, in an upstream's error and in a bad client key never reach the
    SQLite file or its write-ahead log, with bodies on."""
    path = tmp_path / "log.db"
    client = await aiohttp_client(create_app(console_config(fake.base_url, path, bodies=True)))
    leak = f"my keys are {ADMIN_KEY} and {OTHER_CLIENT_KEY} and sk-one-123456789"
    assert await chat(client, "gpt", text=leak) == 200
    fake.queue("openai", Answer(status=400, body={"error": {"message": "bad sk-one-123456789"}}))
    assert await chat(client, "gpt") == 400
    assert await chat(client, "gpt", key="sk-one-123456789") == 401
    # A client may send anything that looks like an id as its request id, a key too.
    body = {"model": "gpt", "messages": [{"role": "user", "content": "hi"}]}
    headers = {"Authorization": f"Bearer {CLIENT_KEY}", "x-request-id": ADMIN_KEY}
    assert (await client.post("/v1/chat/completions", json=body, headers=headers)).status == 200
    page = await flushed(client, 4)
    page["requests"] = page["requests"][1:]
    rows = [
        await (await client.get(f"/admin/requests/{r['id']}", headers=ADMIN)).json()
        for r in page["requests"]
    ]
    assert "[redacted]" in rows[-1]["request_body"]
    assert rows[-1]["response_body"].startswith('{"id"')
    # The router masks the key of the lease in upstream errors itself.
    assert rows[1]["error"] == "oai (openai) returned HTTP 400: bad sk-...6789"
    stored = b"".join(p.read_bytes() for p in tmp_path.iterdir())
    for secret in SECRETS:
        assert secret.encode() not in stored, secret


async def test_a_body_over_the_limit_is_logged_in_the_clients_format(
    aiohttp_client, fake: FakeUpstream, tmp_path: Path
):
    cfg = console_config(fake.base_url, tmp_path / "l.db", bodies=True)
    cfg.limits.max_body_bytes = 1000
    client = await aiohttp_client(create_app(cfg))
    resp = await client.post(
        "/v1/messages",
        json={"model": "claude", "max_tokens": 5, "messages": [], "pad": "x" * 2000},
        headers={"x-api-key": CLIENT_KEY},
    )
    assert resp.status == 413
    assert (await resp.json())["type"] == "error"  # Anthropic's shape
    (row,) = (await flushed(client, 1))["requests"]
    assert row["status"] == 413
    assert row["error"] == "request body exceeds the 1000 byte limit"


async def test_retention_by_age(tmp_path: Path):
    log = RequestLog(RequestLogConfig(path=str(tmp_path / "l.db"), max_age_s=3600), [])
    now = time.time()
    for i, age in enumerate([7200, 3700, 60, 0]):
        log.record(entry(request_id=f"r{i}", ts=now - age))
    assert await log.flush()  # retention runs with the first flush, then every minute
    page = await log.search(Query())
    assert [r["request_id"] for r in page["requests"]] == ["r3", "r2"]
    assert await log._call(log.apply_retention, now + 3600 - 30) == 1
    page = await log.search(Query())
    assert [r["request_id"] for r in page["requests"]] == ["r3"]
    await log.close()


async def test_retention_by_size_keeps_the_newest(tmp_path: Path):
    cfg = RequestLogConfig(path=str(tmp_path / "l.db"), max_bytes=200_000)
    log = RequestLog(cfg, [])
    for i in range(1000):
        log.record(entry(request_id=f"r{i}", request_body="x" * 1000))
    assert await log.flush()  # retention runs with the first flush
    await log.close()
    db = sqlite3.connect(tmp_path / "l.db")
    assert db.execute("PRAGMA wal_checkpoint(TRUNCATE)").fetchone()[0] == 0
    assert (tmp_path / "l.db").stat().st_size <= cfg.max_bytes
    ids = {row[0] for row in db.execute("SELECT request_id FROM requests")}
    db.close()
    # About 1 KB a row: the newest ~200 stay, the oldest went.
    assert 100 < len(ids) < 200
    assert {"r999", f"r{1000 - len(ids)}"} <= ids and "r0" not in ids


async def test_filters_and_paging(tmp_path: Path):
    log = RequestLog(RequestLogConfig(path=str(tmp_path / "l.db")), [])
    rows = [
        entry(request_id="a", model="gpt", provider="oai", client="team-a"),
        entry(request_id="b", model="claude", provider="claude", client="team-b"),
        entry(request_id="c", model="claude", provider="claude", status=429, error="slow down"),
        entry(request_id="d", model="gpt", provider="oai", status=502, error="upstream 50%_off"),
        entry(request_id="e", model="nope", provider=None, status=404, error="no model"),
    ]
    for row in rows:
        log.record(row)
    assert await log.flush()

    async def ids(**filters: object) -> list[str]:
        page = await log.search(Query(**filters))
        return [r["request_id"] for r in page["requests"]]

    assert await ids() == ["e", "d", "c", "b", "a"]
    assert await ids(model="claude") == ["c", "b"]
    assert await ids(provider="oai") == ["d", "a"]
    assert await ids(client="team-b") == ["b"]
    assert await ids(status="4xx") == ["e", "c"]
    assert await ids(status="error") == ["e", "d", "c"]
    assert await ids(status="502") == ["d"]
    assert await ids(text="slow") == ["c"]
    # LIKE's wildcards are literal in a search.
    assert await ids(text="50%_") == ["d"]
    assert await ids(text="%") == ["d"]
    page = await log.search(Query(limit=2, offset=2))
    assert [r["request_id"] for r in page["requests"]] == ["c", "b"]
    assert page["total"] == 5
    await log.close()


async def test_the_admin_api_filters_and_rejects_bad_parameters(
    aiohttp_client, fake: FakeUpstream, tmp_path: Path
):
    client = await aiohttp_client(create_app(console_config(fake.base_url, tmp_path / "l.db")))
    for model, key in [
        ("gpt", CLIENT_KEY),
        ("claude", OTHER_CLIENT_KEY),
        ("gpt", OTHER_CLIENT_KEY),
    ]:
        await chat(client, model, key)
    await flushed(client, 3)
    resp = await client.get(
        "/admin/requests", params={"client": "team-b", "status": "error"}, headers=ADMIN
    )
    page = await resp.json()
    assert page["total"] == 1
    assert page["requests"][0]["error"] == "this key may not use model 'gpt'"
    resp = await client.get("/admin/requests", params={"q": "claude"}, headers=ADMIN)
    assert [r["model"] for r in (await resp.json())["requests"]] == ["claude"]
    for params, message in [
        ({"status": "teapot"}, "status: 'teapot' is not a status (200), a class (4xx) or 'error'"),
        ({"limit": "0"}, "limit: expected an integer from 1 to 500"),
        ({"offset": "-1"}, "offset: expected an integer from 0 to 1000000000"),
    ]:
        resp = await client.get("/admin/requests", params=params, headers=ADMIN)
        assert resp.status == 400
        assert (await resp.json())["error"]["message"] == message
    assert (await client.get("/admin/requests")).status == 401


async def test_stats_of_a_window(tmp_path: Path):
    log = RequestLog(RequestLogConfig(path=str(tmp_path / "l.db")), [])
    now = time.time()
    for i in range(1, 101):  # latencies 1..100 ms
        status = 500 if i % 10 == 0 else 200
        log.record(entry(ts=now - 1, latency_ms=float(i), status=status, client=f"c{i % 2}"))
    log.record(entry(ts=now - 1000, latency_ms=5000.0))  # outside the window
    assert await log.flush()
    stats = await log.stats(300.0)
    assert stats["requests"] == 100
    assert stats["errors"] == 10
    assert stats["rps"] == pytest.approx(100 / 300)
    assert stats["latency_ms"] == {"p50": 50.0, "p95": 95.0}
    assert stats["tokens"] == {"input": 500, "output": 200}
    assert stats["cost"] is None
    assert sum(b["requests"] for b in stats["series"]) == 100
    assert stats["series"][-1]["requests"] == 100
    assert {c["client"]: c["requests"] for c in stats["clients"]} == {"c0": 50, "c1": 50}
    await log.close()


def test_config_rejects_bad_bounds():
    with pytest.raises(ConfigError, match=r"request_log.max_bytes: must be > 0, got 0"):
        RequestLogConfig(max_bytes=0)


async def test_a_full_buffer_drops_the_oldest_and_counts_them(tmp_path: Path, monkeypatch):
    monkeypatch.setattr("router.request_log.MAX_PENDING", 3)
    log = RequestLog(RequestLogConfig(path=str(tmp_path / "missing" / "l.db")), [])
    for i in range(5):
        log.record(entry(request_id=f"r{i}"))
    assert not await log.flush()
    assert log.status()["pending"] == 3 and log.status()["dropped"] == 2
    (tmp_path / "missing").mkdir()
    assert await log.flush()
    page = await log.search(Query())
    assert [r["request_id"] for r in page["requests"]] == ["r4", "r3", "r2"]
    await log.close()
