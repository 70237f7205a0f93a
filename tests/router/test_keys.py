"""KeyPool unit tests: strategies, budgets, the wait queue, key states and the provider hints
that schedule a key's return (on a fake clock, no network)."""

from __future__ import annotations

import asyncio
import datetime as dt
import email.utils
import random
import time
from collections import Counter
from collections.abc import Callable

import pytest

from router.config import Config, ConfigError, ProviderConfig
from router.errors import (
    AuthenticationError,
    GatewayTimeoutError,
    InvalidRequestError,
    NotFoundError,
    OverloadedError,
    PermissionDeniedError,
    RateLimitError,
    UpstreamError,
)
from router.keys import (
    ACTIVE,
    COOLING,
    DISABLED,
    PARKED,
    KeyPool,
    Verdict,
    classify_failure,
    exhausted_limit_reset,
    mask_key,
    parse_duration,
    parse_reset_time,
    reset_hint,
    seconds_to_gemini_reset,
)

NOW = 1_800_000_000.0  # a fixed epoch time for header parsing


class Clock:
    """A monotonic clock that tests move by hand."""

    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now


def make_pool(keys: list, clock: Callable[[], float] | None = None, **options: object) -> KeyPool:
    cfg = ProviderConfig(name="p", type="openai", keys=keys, **options)
    changes: list[tuple] = []
    pool = KeyPool(
        cfg,
        on_change=lambda *change: changes.append(change),
        clock=clock or Clock(),
        wall=lambda: NOW,
        rng=random.Random(0),
    )
    pool.changes = changes
    return pool


async def pick(pool: KeyPool, n: int, **kwargs: object) -> list[str]:
    """Key ids of ``n`` requests made one after another (each released at once)."""
    used = []
    for _ in range(n):
        lease = await pool.acquire(**kwargs)
        used.append(lease.key_id)
        lease.release()
    return used


def states(pool: KeyPool) -> list[str]:
    return [k["state"] for k in pool.snapshot()]


def iso(epoch: float) -> str:
    """RFC 3339 with a Z, as Anthropic sends it."""
    return dt.datetime.fromtimestamp(epoch, dt.UTC).strftime("%Y-%m-%dT%H:%M:%SZ")


# ---- provider hints ---------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("text", "seconds"),
    [("1s", 1.0), ("6m0s", 360.0), ("20ms", 0.02), ("1h2m3.5s", 3723.5), ("0.5s", 0.5)],
)
def test_openai_reset_durations(text, seconds):
    assert parse_duration(text) == pytest.approx(seconds)


@pytest.mark.parametrize("text", ["", "soon", "5", "1x", "1s later"])
def test_bad_durations_are_none(text):
    assert parse_duration(text) is None


def test_anthropic_reset_times():
    assert parse_reset_time(iso(NOW + 30), NOW) == pytest.approx(30)
    assert parse_reset_time(iso(NOW - 30), NOW) == 0.0
    assert parse_reset_time("not a time", NOW) is None
    assert parse_reset_time("2026-01-01T00:00:00", NOW) is None  # no zone: ambiguous


@pytest.mark.parametrize(
    ("headers", "seconds"),
    [
        ({"Retry-After": "2"}, 2.0),
        ({"retry-after": email.utils.formatdate(NOW + 20, usegmt=True)}, 20.0),
        ({"retry-after-ms": "1500"}, 1.5),
        # OpenAI: the exhausted limit's reset.
        (
            {
                "x-ratelimit-remaining-requests": "0",
                "x-ratelimit-reset-requests": "6m0s",
                "x-ratelimit-remaining-tokens": "149000",
                "x-ratelimit-reset-tokens": "20ms",
            },
            360.0,
        ),
        (
            {
                "x-ratelimit-remaining-requests": "59",
                "x-ratelimit-reset-requests": "1s",
                "x-ratelimit-remaining-tokens": "0",
                "x-ratelimit-reset-tokens": "7.5s",
            },
            7.5,
        ),
        # Anthropic: RFC 3339 resets; the latest of the exhausted ones.
        (
            {
                "anthropic-ratelimit-requests-remaining": "0",
                "anthropic-ratelimit-requests-reset": iso(NOW + 12),
                "anthropic-ratelimit-input-tokens-remaining": "0",
                "anthropic-ratelimit-input-tokens-reset": iso(NOW + 40),
                "anthropic-ratelimit-output-tokens-remaining": "8000",
                "anthropic-ratelimit-output-tokens-reset": iso(NOW + 90),
            },
            40.0,
        ),
        # None says 0: the soonest reset.
        (
            {
                "anthropic-ratelimit-tokens-remaining": "10",
                "anthropic-ratelimit-tokens-reset": iso(NOW + 5),
                "anthropic-ratelimit-requests-remaining": "3",
                "anthropic-ratelimit-requests-reset": iso(NOW + 9),
            },
            5.0,
        ),
        ({"content-type": "application/json"}, None),
    ],
)
def test_reset_hint_from_each_provider(headers, seconds):
    got = reset_hint(headers, NOW)
    assert got == (None if seconds is None else pytest.approx(seconds))


def test_exhausted_limit_reset_only_for_a_used_up_limit():
    used_up = {"x-ratelimit-remaining-tokens": "0", "x-ratelimit-reset-tokens": "1m30s"}
    assert exhausted_limit_reset(used_up, NOW) == pytest.approx(90)
    left = {"x-ratelimit-remaining-requests": "5", "x-ratelimit-reset-requests": "2s"}
    assert exhausted_limit_reset(left, NOW) is None
    assert exhausted_limit_reset({}, NOW) is None


# ---- verdicts ---------------------------------------------------------------------------------

GEMINI_DAILY = {
    "error": {
        "code": 429,
        "message": "You exceeded your current quota, please check your plan and billing details.",
        "status": "RESOURCE_EXHAUSTED",
        "details": [
            {
                "@type": "type.googleapis.com/google.rpc.QuotaFailure",
                "violations": [
                    {
                        "quotaMetric": "generativelanguage.googleapis.com/generate_requests",
                        "quotaId": "GenerateRequestsPerDayPerProjectPerModel-FreeTier",
                    }
                ],
            },
            {"@type": "type.googleapis.com/google.rpc.RetryInfo", "retryDelay": "28s"},
        ],
    }
}


@pytest.mark.parametrize(
    ("err", "headers", "state", "seconds"),
    [
        (
            RateLimitError("openai returned HTTP 429: Rate limit reached", retry_after=2),
            {},
            COOLING,
            2,
        ),
        (
            RateLimitError("anthropic returned HTTP 429: rate_limit_error"),
            {
                "anthropic-ratelimit-requests-remaining": "0",
                "anthropic-ratelimit-requests-reset": iso(NOW + 15),
            },
            COOLING,
            15,
        ),
        (RateLimitError("429 without any hint"), {}, COOLING, None),
        # OpenAI insufficient_quota: the message, and no reset time.
        (
            RateLimitError(
                "openai returned HTTP 429: You exceeded your current quota, please check"
            ),
            {},
            PARKED,
            None,
        ),
        (RateLimitError("code insufficient_quota"), {}, PARKED, None),
        # Anthropic's billing error is a 400.
        (
            InvalidRequestError("Your credit balance is too low to access the Anthropic API."),
            {},
            PARKED,
            None,
        ),
        # Gemini per-minute: same words as a quota, but with a retry delay: only a cool-down.
        (
            RateLimitError("You exceeded your current quota. Please retry in 31s.", retry_after=31),
            {},
            COOLING,
            31,
        ),
        (AuthenticationError("invalid x-api-key"), {}, DISABLED, None),
        (PermissionDeniedError("key lacks access"), {}, DISABLED, None),
        # Gemini answers an invalid key with a 400.
        (
            InvalidRequestError("API key not valid. Please pass a valid API key."),
            {},
            DISABLED,
            None,
        ),
        (OverloadedError("anthropic: Overloaded"), {}, ACTIVE, None),
        (UpstreamError("HTTP 500"), {}, ACTIVE, None),
        (GatewayTimeoutError("timed out"), {}, ACTIVE, None),
        (InvalidRequestError("messages: field required"), {}, ACTIVE, None),
    ],
)
def test_verdict_by_error_kind(err, headers, state, seconds):
    verdict = classify_failure(err, headers, now=NOW)
    assert verdict.state == state, verdict
    assert verdict.seconds == (None if seconds is None else pytest.approx(seconds))


def test_gemini_daily_quota_parks_until_pacific_midnight():
    err = RateLimitError("You exceeded your current quota", retry_after=28)
    verdict = classify_failure(err, {}, GEMINI_DAILY, now=NOW)
    assert verdict.state == PARKED
    assert verdict.seconds == pytest.approx(seconds_to_gemini_reset(NOW))
    assert 0 < verdict.seconds <= 25 * 3600


# ---- strategies -------------------------------------------------------------------------------


async def test_round_robin_is_even():
    pool = make_pool(["k0-aaaaaaaaaa", "k1-aaaaaaaaaa", "k2-aaaaaaaaaa"])
    used = await pick(pool, 30)
    assert used[:4] == ["p/0", "p/1", "p/2", "p/0"]
    assert Counter(used) == {"p/0": 10, "p/1": 10, "p/2": 10}


async def test_least_busy_goes_to_the_idle_key():
    pool = make_pool(["a" * 12, "b" * 12, "c" * 12], strategy="least_busy")
    held = [await pool.acquire() for _ in range(3)]  # one in flight on each
    held[0].release()
    held[2].release()
    held.append(await pool.acquire())  # p/0 and p/2 idle, p/1 busy
    assert held[-1].key_id in ("p/0", "p/2")
    busy = {"p/1", held[-1].key_id}
    nxt = await pool.acquire()
    assert nxt.key_id not in busy, "least_busy chose a busy key over an idle one"


async def test_weighted_is_proportional():
    keys = [{"key": "a" * 12, "weight": 1}, {"key": "b" * 12, "weight": 3}]
    pool = make_pool(keys, strategy="weighted")
    counts = Counter(await pick(pool, 400))
    assert counts["p/1"] / 400 == pytest.approx(0.75, abs=0.02)


async def test_priority_uses_lower_keys_only_when_the_top_is_unavailable():
    clock = Clock()
    keys = [{"key": "low" * 4, "priority": 0}, {"key": "top" * 4, "priority": 10}]
    pool = make_pool(keys, clock, strategy="priority")
    assert set(await pick(pool, 10)) == {"p/1"}
    lease = await pool.acquire()
    lease.fail(Verdict(COOLING, 5, "rate limited"))
    assert set(await pick(pool, 5)) == {"p/0"}
    clock.now += 5
    assert set(await pick(pool, 5)) == {"p/1"}


# ---- states -----------------------------------------------------------------------------------


async def test_cooling_key_gets_no_traffic_and_comes_back_by_itself():
    clock = Clock()
    pool = make_pool(["a" * 12, "b" * 12], clock)
    lease = await pool.acquire()
    lease.fail(Verdict(COOLING, 2, "rate limited (HTTP 429)"))
    snap = pool.snapshot()[0]
    assert snap["state"] == COOLING and snap["until"] == pytest.approx(NOW + 2)
    assert set(await pick(pool, 6)) == {"p/1"}
    clock.now += 2
    assert states(pool) == [ACTIVE, ACTIVE]
    assert pool.changes == [
        ("p", "p/0", ACTIVE, COOLING, "rate limited (HTTP 429)"),
        ("p", "p/0", COOLING, ACTIVE, "cooling time over"),
    ]


async def test_repeated_429s_without_hints_back_off_exponentially():
    clock = Clock()
    pool = make_pool(["a" * 12], clock)
    waits = []
    for _ in range(8):
        lease = await pool.acquire()
        lease.fail(Verdict(COOLING, None, "429"))
        waits.append(pool.snapshot()[0]["until"] - NOW)
        clock.now += waits[-1] + 1e-6
    for i, wait in enumerate(waits):
        cap = min(60.0, 2.0**i)
        assert cap / 2 <= wait <= cap, (i, waits)
    lease = await pool.acquire()
    lease.release()  # a success resets the backoff
    lease = await pool.acquire()
    lease.fail(Verdict(COOLING, None, "429"))
    assert pool.snapshot()[0]["until"] - NOW <= 1.0


async def test_parked_and_disabled_keys():
    clock = Clock()
    pool = make_pool(["a" * 12, "b" * 12, "c" * 12], clock, park_s=600)
    first, second = await pool.acquire(), await pool.acquire()
    first.fail(Verdict(PARKED, None, "quota"))
    second.fail(Verdict(DISABLED, None, "rejected (HTTP 401)"))
    snap = pool.snapshot()
    assert [s["state"] for s in snap] == [PARKED, DISABLED, ACTIVE]
    assert snap[0]["until"] == pytest.approx(NOW + 600) and snap[1]["until"] is None
    assert snap[1]["reason"] == "rejected (HTTP 401)" and snap[1]["failures"] == 1
    # A late 429 of a request still in flight does not shorten the parking.
    late = await pool.acquire()
    pool.disable("p/2", "maintenance")
    late.fail(Verdict(COOLING, 1, "429"))
    assert states(pool) == [PARKED, DISABLED, DISABLED]
    clock.now += 600
    assert states(pool) == [ACTIVE, DISABLED, DISABLED]
    clock.now += 10**6
    assert states(pool)[1] == DISABLED, "a disabled key came back by itself"
    pool.enable("p/1")
    assert states(pool) == [ACTIVE, ACTIVE, DISABLED]
    with pytest.raises(NotFoundError, match="p/9"):
        pool.disable("p/9", "x")
    with pytest.raises(NotFoundError, match="p/9"):
        pool.enable("p/9")


# What a key's snapshot shows (the admin API adds its provider).
SNAPSHOT_FIELDS = {
    "id",
    "masked",
    "state",
    "until",
    "reason",
    "in_flight",
    "requests",
    "failures",
}


async def test_snapshot_never_shows_a_key():
    keys = ["sk-proj-SECRETSECRET-a1b2", {"key": "short", "rpm": 3}]
    pool = make_pool(keys)
    lease = await pool.acquire()
    lease.fail(Verdict(DISABLED, None, "rejected"))
    snap = pool.snapshot()
    assert snap[0]["masked"] == "sk-...a1b2" and snap[1]["masked"] == "...rt"
    assert "SECRET" not in repr(snap) and "short" not in repr(snap)
    assert set(snap[0]) == SNAPSHOT_FIELDS
    assert "SECRET" not in repr(pool.config)
    assert mask_key("sk-ant-api03-xyz9") == "sk-...xyz9"
    lease = await pool.acquire()
    assert lease.scrub(f"Incorrect API key provided: {lease.key}") == (
        "Incorrect API key provided: ...rt"
    )


async def test_no_usable_key_errors():
    clock = Clock()
    pool = make_pool(["a" * 12, "b" * 12], clock)
    (await pool.acquire()).fail(Verdict(COOLING, 3, "429"))
    (await pool.acquire()).fail(Verdict(COOLING, 8, "429"))
    with pytest.raises(RateLimitError) as info:
        await pool.acquire()
    assert info.value.retry_after == pytest.approx(3)
    pool.disable("p/0", "x")
    pool.disable("p/1", "x")
    with pytest.raises(UpstreamError, match="2 of 2 disabled"):
        await pool.acquire()
    pool.enable("p/0")
    with pytest.raises(UpstreamError, match="already tried"):
        await pool.acquire(exclude=["p/0"])


async def test_keyless_provider_leases_no_key():
    lease = await make_pool([]).acquire()
    assert lease.key is None and lease.key_id is None
    lease.release()


# ---- limits and the queue ---------------------------------------------------------------------


async def test_concurrency_limit_queues_then_rejects():
    pool = make_pool([{"key": "a" * 12, "max_concurrent": 1}], max_queue=1, queue_timeout_s=5)
    first = await pool.acquire()
    second = asyncio.ensure_future(pool.acquire())
    await asyncio.sleep(0.01)
    assert not second.done(), "a second request got a key past max_concurrent"
    with pytest.raises(RateLimitError, match="already waiting") as info:
        await pool.acquire()
    assert info.value.retry_after == 1.0
    first.release()
    lease = await asyncio.wait_for(second, 1)
    assert lease.key_id == "p/0" and pool.snapshot()[0]["in_flight"] == 1
    lease.release()
    assert pool.snapshot()[0]["in_flight"] == 0


async def test_queue_wait_is_bounded():
    keys = [{"key": "a" * 12, "max_concurrent": 1}]
    pool = make_pool(keys, time.monotonic, queue_timeout_s=0.05)
    held = await pool.acquire()
    with pytest.raises(RateLimitError, match="no key became free"):
        await asyncio.wait_for(pool.acquire(), 1)
    held.release()


async def test_waiters_leave_when_every_key_goes_down():
    pool = make_pool([{"key": "a" * 12, "max_concurrent": 1}], queue_timeout_s=5)
    held = await pool.acquire()
    waiting = asyncio.ensure_future(pool.acquire())
    await asyncio.sleep(0.01)
    held.fail(Verdict(COOLING, 30, "429"))
    with pytest.raises(RateLimitError, match="rate limited"):
        await asyncio.wait_for(waiting, 1)


async def test_rpm_budget_holds():
    clock = Clock()
    pool = make_pool(
        [{"key": "a" * 12, "rpm": 2}, {"key": "b" * 12, "rpm": 1}], clock, queue_timeout_s=0
    )
    assert sorted(await pick(pool, 3)) == ["p/0", "p/0", "p/1"]
    with pytest.raises(RateLimitError, match="no key became free"):
        await asyncio.wait_for(pool.acquire(), 1)
    clock.now += 60
    assert sorted(await pick(pool, 3)) == ["p/0", "p/0", "p/1"]


async def test_tpm_budget_skips_a_spent_key():
    clock = Clock()
    pool = make_pool([{"key": "a" * 12, "tpm": 100}, "b" * 12], clock)
    lease = await pool.acquire()
    assert lease.key_id == "p/0"
    lease.release(tokens=150)
    assert set(await pick(pool, 4)) == {"p/1"}
    clock.now += 60
    assert "p/0" in await pick(pool, 2)


# ---- affinity ---------------------------------------------------------------------------------


async def test_affinity_sticks_and_moves_when_its_key_cools():
    clock = Clock()
    pool = make_pool(["a" * 12, "b" * 12, "c" * 12], clock)
    home = (await pick(pool, 1, affinity="conv-1"))[0]
    for _ in range(5):
        await pick(pool, 1)  # other traffic moves the round robin along
        assert await pick(pool, 1, affinity="conv-1") == [home]
    homes = {(await pick(pool, 1, affinity=f"conv-{i}"))[0] for i in range(30)}
    assert len(homes) == 3, "conversations were not spread over the keys"
    lease = await pool.acquire(affinity="conv-1")
    lease.fail(Verdict(COOLING, 10, "429"))
    moved = (await pick(pool, 1, affinity="conv-1"))[0]
    assert moved != home
    clock.now += 10
    assert await pick(pool, 3, affinity="conv-1") == [moved] * 3, "it did not stay moved"


async def test_affinity_returns_to_the_top_priority_tier():
    clock = Clock()
    keys = [{"key": "low" * 4, "priority": 0}, {"key": "top" * 4, "priority": 1}]
    pool = make_pool(keys, clock, strategy="priority")
    (await pool.acquire()).fail(Verdict(COOLING, 5, "429"))
    assert await pick(pool, 2, affinity="conv") == ["p/0", "p/0"]
    clock.now += 5
    assert await pick(pool, 2, affinity="conv") == ["p/1", "p/1"]


async def test_affinity_does_not_move_for_a_busy_key():
    pool = make_pool([{"key": "a" * 12, "max_concurrent": 1}, "b" * 12])
    home = await pool.acquire(affinity="conv")
    assert home.key_id == "p/0"
    assert (await pool.acquire(affinity="conv")).key_id == "p/1"  # p/0 is busy: served elsewhere
    home.release()
    assert await pick(pool, 2, affinity="conv") == ["p/0", "p/0"]


# ---- config -----------------------------------------------------------------------------------


def test_key_objects_in_config():
    cfg = Config.from_dict(
        {
            "providers": {
                "o": {
                    "type": "openai",
                    "strategy": "weighted",
                    "max_queue": 5,
                    "queue_timeout_s": 2,
                    "keys": [
                        "plain-key-123",
                        {"key": "k2", "weight": 3, "priority": 1, "max_concurrent": 4},
                        {"key": "k3", "rpm": 60, "tpm": 10000},
                    ],
                }
            },
            "models": {},
            "retry": {"max_attempts": 3, "max_time_s": 20},
        }
    )
    p = cfg.providers["o"]
    assert [k.key for k in p.key_configs] == ["plain-key-123", "k2", "k3"]
    assert p.key_configs[1].weight == 3 and p.key_configs[1].max_concurrent == 4
    assert p.key_configs[2].tpm == 10000 and p.keys[0] == "plain-key-123"
    assert (cfg.retry.max_attempts, cfg.retry.max_time_s) == (3, 20)


@pytest.mark.parametrize(
    ("provider", "culprit"),
    [
        ({"keys": [{"key": "k", "weight": 0}]}, r"providers\.o\.keys\[0\]\.weight"),
        (
            {"keys": [{"key": "k", "colour": 1}]},
            r"providers\.o\.keys\[0\]: unknown key\(s\) colour",
        ),
        ({"keys": [{"weight": 2}]}, r"providers\.o\.keys\[0\]: missing required key 'key'"),
        ({"keys": ["ok", ""]}, r"providers\.o\.keys\[1\]\.key"),
        ({"keys": [{"key": "k", "max_concurrent": 0}]}, r"keys\[0\]\.max_concurrent"),
        ({"keys": [{"key": "k", "rpm": "10"}]}, r"keys\[0\]\.rpm: expected int"),
        ({"strategy": "random"}, r"providers\.o\.strategy"),
        ({"max_queue": -1}, r"providers\.o: max_queue"),
    ],
)
def test_bad_key_config_names_the_culprit(provider, culprit):
    with pytest.raises(ConfigError, match=culprit) as info:
        Config.from_dict({"providers": {"o": {"type": "openai", **provider}}, "models": {}})
    assert "SECRET" not in str(info.value)


@pytest.mark.parametrize(
    ("retry", "culprit"),
    [
        ({"max_attempts": 0}, "retry.max_attempts"),
        ({"max_time_s": 0}, "retry.max_time_s"),
        ({"tries": 2}, r"retry: unknown key\(s\) tries"),
    ],
)
def test_bad_retry_config(retry, culprit):
    with pytest.raises(ConfigError, match=culprit):
        Config.from_dict({"providers": {}, "models": {}, "retry": retry})
