"""A scripted mix of cloud and local traffic through the router's routing rules, budgets,
spillover and circuit breakers.

Three fake providers on loopback (`benchmarks.fake_provider`): ``oai`` (OpenAI, two keys) with
a burst of 429s and then an outage (connections reset), ``claude`` (Anthropic, one key) with
a later 429 burst, and ``local``, an OpenAI-compatible stand-in for the local SmolVLM2: each
answer takes ``--local-latency`` seconds and at most ``--local-capacity`` are served at once
(the others queue, as in the engine). The router runs in this process with the rules of the
README's example: local-only requests to the local model, images local first with cloud
spillover, long prompts and tool calls to the cloud, the rest local first. Three client keys:
``alice`` without a budget, ``bob`` with a small USD budget per day and ``carol`` with a token
budget.

Requests arrive at ``--rate`` per second for ``--duration`` seconds (an open loop, classes and
clients drawn from a seeded generator): plain text, images, long prompts, tool calls (from an
Anthropic client) and local-only text. Reported per class: where the requests went, latency,
budget stops (429s naming a budget) and lost requests (anything else that is not an answer:
must be 0); spend per client from ``/admin/spend``. Writes
``benchmarks/results/mixed_traffic.{json,png}``.

    python -m benchmarks.mixed_traffic                # 20 s at 40 req/s
    python -m benchmarks.mixed_traffic --quick        # 3 s at 30 req/s
"""

from __future__ import annotations

import argparse
import asyncio
import base64
import json
import logging
import random
import statistics
import tempfile
import time
from collections import Counter, defaultdict
from dataclasses import dataclass
from pathlib import Path

import aiohttp
from aiohttp import web

from benchmarks import fake_provider
from benchmarks.charts import pyplot
from benchmarks.fake_provider import FakeConfig
from router.app import create_app
from router.config import Config

logger = logging.getLogger(__name__)

RESULTS = Path(__file__).parent / "results"
ADMIN_KEY = "mixed-admin"
CLIENTS = {"alice": "sk-alice", "bob": "sk-bob", "carol": "sk-carol"}
CLASSES = {"text": 35, "image": 20, "long": 15, "tools": 15, "local_only": 15}
# Where each class may go: anything else is a routing error.
ALLOWED = {
    "text": {"local", "oai", "claude"},
    "image": {"local", "oai", "claude"},
    "long": {"claude", "oai"},
    "tools": {"oai", "claude"},
    "local_only": {"local"},
}
# A 1x1 PNG, inline.
PNG = base64.b64encode(
    bytes.fromhex(
        "89504e470d0a1a0a0000000d4948445200000001000000010806000000"
        "1f15c4890000000d49444154789c6360000002000154a24f5d0000000049454e44ae426082"
    )
).decode()


@dataclass
class MixOptions:
    duration_s: float = 20.0
    rate: float = 40.0
    local_latency_s: float = 0.3
    local_capacity: int = 4
    seed: int = 0


@dataclass
class Outcome:
    kind: str
    client: str
    sent_s: float
    status: int
    provider: str
    rule: str
    latency_ms: float
    budget_stop: bool


def router_config(ports: dict[str, int], spend_path: str) -> dict:
    """The router's config: the fakes, three clients with budgets, and the rules."""
    spill = {"provider": "local", "max_in_flight": 4}
    return {
        "providers": {
            "oai": {
                "type": "openai",
                "base_url": f"http://127.0.0.1:{ports['oai']}/v1",
                "keys": ["sk-oai-1", "sk-oai-2"],
                "local": False,
            },
            "claude": {
                "type": "anthropic",
                "base_url": f"http://127.0.0.1:{ports['claude']}",
                "keys": ["sk-ant-1"],
                "local": False,
            },
            "local": {"type": "openai", "base_url": f"http://127.0.0.1:{ports['local']}/v1"},
        },
        "models": {
            "smolvlm2-256m": [{"provider": "local", "model": "smolvlm2-256m"}],
            "fast": [
                {"provider": "oai", "model": "gpt-4o-mini"},
                {"provider": "claude", "model": "claude-haiku-4-5"},
            ],
            "smart": [
                {"provider": "claude", "model": "claude-sonnet-4-5"},
                {"provider": "oai", "model": "gpt-4o"},
            ],
        },
        "auth": {
            "client_keys": [
                {"key": CLIENTS["alice"], "name": "alice", "group": "research"},
                {"key": CLIENTS["bob"], "name": "bob", "group": "research"},
                {"key": CLIENTS["carol"], "name": "carol", "group": "ops"},
            ],
            "admin_key": ADMIN_KEY,
        },
        "retry": {"max_attempts": 4, "max_time_s": 30},
        "routing": {
            "breaker": {"failures": 3, "cooldown_s": 1.0},
            "rules": [
                {"name": "local-only", "when": {"local_only": True}, "targets": ["smolvlm2-256m"]},
                {
                    "name": "vision",
                    "when": {"media": ["image", "video"]},
                    "targets": ["smolvlm2-256m"],
                    "fallback": ["fast"],
                    "spillover": spill,
                },
                {
                    "name": "long-context",
                    "when": {"prompt_tokens_above": 2048},
                    "targets": ["smart"],
                    "fallback": ["fast"],
                },
                {
                    "name": "agents",
                    "when": {"tools": True},
                    "targets": ["fast"],
                    "fallback": ["smart"],
                },
                {
                    "name": "default",
                    "when": {"models": ["auto"]},
                    "targets": ["smolvlm2-256m"],
                    "fallback": ["fast"],
                    "spillover": spill,
                },
            ],
        },
        "budgets": [
            {"client": "bob", "usd_per_day": 0.002},
            {"client": "carol", "tokens_per_day": 3000},
        ],
        "spend": {"sqlite_path": spend_path},
        "log": {"level": "WARNING"},
    }


def request_of(kind: str, i: int) -> tuple[str, dict, dict]:
    """The path, body and extra headers of request ``i`` of a class."""
    text = f"request {i}: describe the weather"
    headers: dict[str, str] = {}
    if kind == "tools":
        tool = {"name": "get_weather", "input_schema": {"type": "object", "properties": {}}}
        body = {
            "model": "auto",
            "max_tokens": 64,
            "tools": [tool],
            "messages": [{"role": "user", "content": text}],
        }
        return "/v1/messages", body, headers
    content: object = text
    if kind == "image":
        image = {"type": "image_url", "image_url": {"url": f"data:image/png;base64,{PNG}"}}
        content = [{"type": "text", "text": text}, image]
    elif kind == "long":
        content = text + " lorem ipsum" * 1000  # about 3,000 tokens
    elif kind == "local_only":
        headers["x-local-only"] = "1"
    body = {"model": "auto", "max_tokens": 64, "messages": [{"role": "user", "content": content}]}
    return "/v1/chat/completions", body, headers


async def send_one(
    session: aiohttp.ClientSession, url: str, kind: str, client: str, i: int, t0: float
) -> Outcome:
    path, body, headers = request_of(kind, i)
    headers["Authorization"] = f"Bearer {CLIENTS[client]}"
    sent = time.monotonic()
    try:
        async with session.post(url + path, json=body, headers=headers) as response:
            data = await response.read()
            status = response.status
            provider = response.headers.get("x-router-provider", "none")
            rule = response.headers.get("x-router-rule", "none")
    except aiohttp.ClientError as err:
        logger.warning("request %d (%s) failed: %s", i, kind, err)
        status, data, provider, rule = 0, b"", "none", "none"
    budget = status == 429 and b"budget exceeded" in data
    if status not in (200, 429) or (status == 429 and not budget):
        logger.warning("request %d (%s) lost: %d %s", i, kind, status, data[:200])
    ms = (time.monotonic() - sent) * 1000
    return Outcome(kind, client, sent - t0, status, provider, rule, ms, budget)


async def run_mix(options: MixOptions) -> dict:
    """Start the fakes and the router, send the mix, and summarize.

    Args:
        options: Duration, rate, the local stand-in's latency and capacity, the seed.
    """
    d = options.duration_s
    fakes = {
        "oai": FakeConfig(
            chunks=20, windows=(("429", 0.15 * d, 0.25 * d), ("reset", 0.4 * d, 0.6 * d))
        ),
        "claude": FakeConfig(chunks=20, windows=(("429", 0.7 * d, 0.75 * d),)),
        "local": FakeConfig(
            chunks=20, latency_s=options.local_latency_s, max_concurrency=options.local_capacity
        ),
    }
    servers = {name: await fake_provider.serve(cfg) for name, cfg in fakes.items()}
    ports = {name: s.sockets[0].getsockname()[1] for name, s in servers.items()}
    with tempfile.TemporaryDirectory() as folder:
        cfg = Config.from_dict(router_config(ports, str(Path(folder) / "spend.sqlite3")))
        runner = web.AppRunner(create_app(cfg), access_log=None)
        await runner.setup()
        site = web.TCPSite(runner, "127.0.0.1", 0)
        await site.start()
        url = f"http://127.0.0.1:{site._server.sockets[0].getsockname()[1]}"
        try:
            outcomes = await _send_mix(url, options)
            async with aiohttp.ClientSession() as session:
                admin = {"Authorization": f"Bearer {ADMIN_KEY}"}
                async with session.get(f"{url}/admin/spend", headers=admin) as response:
                    spend = await response.json()
        finally:
            await runner.cleanup()
            for server in servers.values():
                server.close()
    return summarize(outcomes, spend, options)


async def _send_mix(url: str, options: MixOptions) -> list[Outcome]:
    rng = random.Random(options.seed)
    kinds, weights = list(CLASSES), list(CLASSES.values())
    n = int(options.duration_s * options.rate)
    plan = [(rng.choices(kinds, weights)[0], rng.choice(list(CLIENTS))) for _ in range(n)]
    connector = aiohttp.TCPConnector(limit=0)
    async with aiohttp.ClientSession(connector=connector) as session:
        t0 = time.monotonic()
        tasks = []
        for i, (kind, client) in enumerate(plan):
            delay = t0 + i / options.rate - time.monotonic()
            if delay > 0:
                await asyncio.sleep(delay)
            tasks.append(asyncio.create_task(send_one(session, url, kind, client, i, t0)))
        return list(await asyncio.gather(*tasks))


def summarize(outcomes: list[Outcome], spend: dict, options: MixOptions) -> dict:
    """Per class: providers, rules, latency, budget stops and lost requests; spend per client."""
    rows = {}
    for kind in CLASSES:
        mine = [o for o in outcomes if o.kind == kind]
        served = [o for o in mine if o.status == 200]
        latencies = sorted(o.latency_ms for o in served)
        rows[kind] = {
            "requests": len(mine),
            "providers": dict(Counter(o.provider for o in served)),
            "rules": dict(Counter(o.rule for o in served)),
            "budget_stops": sum(o.budget_stop for o in mine),
            "lost": sum(o.status != 200 and not o.budget_stop for o in mine),
            "misrouted": sum(o.provider not in ALLOWED[kind] for o in served),
            "latency_p50_ms": statistics.median(latencies) if latencies else None,
            "latency_p95_ms": latencies[int(0.95 * (len(latencies) - 1))] if latencies else None,
        }
    timeline: dict[int, Counter] = defaultdict(Counter)
    for o in outcomes:
        timeline[int(o.sent_s)][o.provider if o.status == 200 else "stopped"] += 1
    return {
        "options": vars(options),
        "classes": rows,
        "lost": sum(r["lost"] for r in rows.values()),
        "misrouted": sum(r["misrouted"] for r in rows.values()),
        "budget_stops": {c: sum(o.budget_stop for o in outcomes if o.client == c) for c in CLIENTS},
        "spend": {
            name: {
                "tokens": spend["clients"][name]["today"]["tokens"],
                "usd": spend["clients"][name]["today"]["usd"],
                "budget": spend["clients"][name]["today"].get("budget"),
            }
            for name in CLIENTS
        },
        "timeline": {str(s): dict(c) for s, c in sorted(timeline.items())},
    }


def print_report(report: dict) -> None:
    providers = ("local", "oai", "claude")
    print(f"{'class':<11}{'sent':>6}" + "".join(f"{p:>8}" for p in providers), end="")
    print(f"{'budget':>8}{'lost':>6}{'p50 ms':>9}{'p95 ms':>9}")
    for kind, row in report["classes"].items():
        counts = "".join(f"{row['providers'].get(p, 0):>8}" for p in providers)
        p50 = row["latency_p50_ms"] or 0.0
        p95 = row["latency_p95_ms"] or 0.0
        print(
            f"{kind:<11}{row['requests']:>6}{counts}{row['budget_stops']:>8}{row['lost']:>6}",
            end="",
        )
        print(f"{p50:>9.1f}{p95:>9.1f}")
    print(f"lost requests: {report['lost']}, misrouted: {report['misrouted']}")
    for name, spent in report["spend"].items():
        stops = report["budget_stops"][name]
        print(
            f"client {name}: {spent['tokens']} tokens, ${spent['usd']:.6f}, "
            f"budget {spent['budget'] or 'none'}, {stops} budget stops"
        )


def draw(report: dict, path: Path) -> bool:
    """Requests per class by provider, and per second over the run (the 429 burst and outage
    of ``oai`` and the spillover show there).

    Returns:
        Whether the chart was written (not without matplotlib).
    """
    plt = pyplot()
    if plt is None:
        return False
    colors = {"local": "tab:green", "oai": "tab:blue", "claude": "tab:orange", "stopped": "tab:red"}
    fig, (left, right) = plt.subplots(1, 2, figsize=(12, 4.5))
    kinds = list(report["classes"])
    bottom = [0] * len(kinds)
    for provider in ("local", "oai", "claude", "stopped"):
        values = [
            report["classes"][k]["budget_stops"]
            if provider == "stopped"
            else report["classes"][k]["providers"].get(provider, 0)
            for k in kinds
        ]
        left.bar(kinds, values, bottom=bottom, label=provider, color=colors[provider])
        bottom = [b + v for b, v in zip(bottom, values, strict=True)]
    left.set_ylabel("requests")
    left.set_title("Where each class went (stopped: budget 429)")
    left.legend()
    seconds = sorted(int(s) for s in report["timeline"])
    for provider in ("local", "oai", "claude", "stopped"):
        values = [report["timeline"][str(s)].get(provider, 0) for s in seconds]
        right.plot(seconds, values, label=provider, color=colors[provider], marker=".")
    right.set_xlabel("second of the run (request sent)")
    right.set_ylabel("requests")
    right.set_title("Served by, over time")
    right.legend()
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return True


def main(argv: list[str] | None = None) -> int:
    """Run the mix, print the table, write the JSON and the chart.

    Returns:
        0, or 1 when a request was lost or misrouted.
    """
    parser = argparse.ArgumentParser(prog="python -m benchmarks.mixed_traffic", description=__doc__)
    parser.add_argument("--duration", type=float, default=20.0, help="seconds")
    parser.add_argument("--rate", type=float, default=40.0, help="requests per second")
    parser.add_argument("--local-latency", type=float, default=0.3, help="seconds per answer")
    parser.add_argument("--local-capacity", type=int, default=4, help="answers at once")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--quick", action="store_true", help="3 s at 30 req/s")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.WARNING, format="%(levelname)s %(name)s: %(message)s")
    options = MixOptions(
        duration_s=3.0 if args.quick else args.duration,
        rate=30.0 if args.quick else args.rate,
        local_latency_s=args.local_latency,
        local_capacity=args.local_capacity,
        seed=args.seed,
    )
    report = asyncio.run(run_mix(options))
    print_report(report)
    RESULTS.mkdir(parents=True, exist_ok=True)
    path = RESULTS / "mixed_traffic.json"
    path.write_text(json.dumps(report, indent=2) + "\n")
    print(f"wrote {path}")
    if draw(report, RESULTS / "mixed_traffic.png"):
        print(f"wrote {RESULTS / 'mixed_traffic.png'}")
    return 1 if report["lost"] or report["misrouted"] else 0


if __name__ == "__main__":
    raise SystemExit(main())
