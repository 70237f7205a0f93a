"""Routing rules (router/rules.py, router/routing.py): each condition kind, rule order, the
``auto`` model, per-rule fallback, local-only requests, the circuit breaker, and configs that
are refused at load (and on reload, where the running config stays)."""

from __future__ import annotations

import asyncio
import base64
import re
from pathlib import Path

import anthropic
import openai
import pytest
import yaml

from router import ir
from router.app import create_app
from router.config import Config, ConfigError, load_config
from router.reload import CONFIG_LOADER
from router.rules import RouteInput, choose_route
from tests.router.helpers import PNG_BYTES, Answer, openai_text
from tests.router.routing_helpers import (
    ADMIN_KEY,
    CLIENT_KEYS,
    auth,
    chat,
    providers,
    routing_config,
    upstream_model,
)
from tests.router.test_command_line import EXAMPLE_ENV

PNG_B64 = base64.b64encode(PNG_BYTES).decode()


def target(provider: str, model: str) -> dict:
    return {"provider": provider, "model": model}


RULES = [
    {"name": "private", "when": {"local_only": True}, "targets": [target("edge", "private-local")]},
    {
        "name": "header",
        "when": {"headers": {"x-route": "local"}},
        "targets": [target("edge", "route-local")],
    },
    {
        "name": "vision",
        "when": {"media": ["image", "video"]},
        "targets": [target("gemlocal", "vision-local")],
        "fallback": [target("cloud", "vision-cloud")],
    },
    {"name": "audio", "when": {"media": ["audio"]}, "targets": [target("cloud", "audio-cloud")]},
    {
        "name": "long",
        "when": {"prompt_tokens_above": 100},
        "targets": [target("claude", "long-cloud")],
    },
    {"name": "tools", "when": {"tools": True}, "targets": [target("claude", "tools-cloud")]},
    {"name": "json", "when": {"json_output": True}, "targets": [target("cloud", "json-cloud")]},
    {"name": "ops", "when": {"groups": ["infra"]}, "targets": [target("cloud", "ops-cloud")]},
    {
        "name": "ci-stream",
        "when": {"clients": ["ci"], "stream": True},
        "targets": [target("cloud", "ci-stream")],
    },
    {"name": "auto", "when": {"models": ["auto"]}, "targets": [target("edge", "auto-local")]},
]

TOOL = {
    "type": "function",
    "function": {"name": "get_weather", "parameters": {"type": "object", "properties": {}}},
}
IMAGE_CHAT = {
    "model": "auto",
    "messages": [
        {
            "role": "user",
            "content": [
                {"type": "text", "text": "what is this?"},
                {"type": "image_url", "image_url": {"url": f"data:image/png;base64,{PNG_B64}"}},
            ],
        }
    ],
}
AUDIO_CHAT = {
    "model": "auto",
    "messages": [
        {
            "role": "user",
            "content": [{"type": "input_audio", "input_audio": {"data": "AAAA", "format": "wav"}}],
        }
    ],
}

# (case, body, headers beyond the key, client key) -> (rule, upstream model)
CASES = {
    "local-only header": (chat(), {"x-local-only": "1"}, "ci", "private", "private-local"),
    "route header": (chat(), {"x-route": "LOCAL"}, "ci", "header", "route-local"),
    "image": (IMAGE_CHAT, {}, "ci", "vision", "vision-local"),
    "audio": (AUDIO_CHAT, {}, "ci", "audio", "audio-cloud"),
    "long prompt": (chat("word " * 200), {}, "ci", "long", "long-cloud"),
    "tools": (chat(tools=[TOOL]), {}, "ci", "tools", "tools-cloud"),
    "json": (chat(response_format={"type": "json_object"}), {}, "ci", "json", "json-cloud"),
    "group": (chat(), {}, "ops", "ops", "ops-cloud"),
    "client and stream": (chat(stream=True), {}, "ci", "ci-stream", "ci-stream"),
    "other client streams": (chat(stream=True), {}, "dev", "auto", "auto-local"),
    "auto": (chat(), {}, "ci", "auto", "auto-local"),
    # Earlier rules win: tools and an image, the vision rule comes first.
    "order": ({**IMAGE_CHAT, "tools": [TOOL]}, {}, "ci", "vision", "vision-local"),
}


@pytest.mark.parametrize("case", list(CASES))
async def test_each_condition_kind_picks_its_rule(router_client, fake, case):
    body, headers, key, rule, model = CASES[case]
    client = await router_client(routing_config(fake.base_url, RULES))
    response = await client.post(
        "/v1/chat/completions", json=body, headers={**auth(key), **headers}
    )
    await response.read()
    assert response.status == 200, await response.text()
    assert response.headers["x-router-rule"] == rule
    assert upstream_model(fake.seen[-1]) == model


async def test_video_from_a_gemini_client_goes_to_the_vision_rule(router_client, fake):
    client = await router_client(routing_config(fake.base_url, RULES))
    video = {"inline_data": {"mime_type": "video/mp4", "data": "AAAA"}}
    body = {"contents": [{"role": "user", "parts": [{"text": "what happens?"}, video]}]}
    response = await client.post(
        "/v1beta/models/auto:generateContent",
        json=body,
        headers={"x-goog-api-key": CLIENT_KEYS["ci"]},
    )
    assert response.status == 200, await response.text()
    assert response.headers["x-router-rule"] == "vision"
    assert response.headers["x-router-provider"] == "gemlocal"


async def test_a_named_model_no_rule_takes_keeps_its_own_targets(router_client, fake):
    client = await router_client(routing_config(fake.base_url, RULES))
    response = await client.post("/v1/chat/completions", json=chat(model="gpt"), headers=auth())
    assert response.status == 200
    assert "x-router-rule" not in response.headers
    assert response.headers["x-router-provider"] == "cloud"
    assert upstream_model(fake.seen[-1]) == "gpt-4o-mini"


async def test_auto_is_listed_and_only_rules_decide_it(router_client, fake):
    rules = [{"name": "tools", "when": {"tools": True}, "targets": [target("cloud", "t")]}]
    client = await router_client(routing_config(fake.base_url, rules))
    listed = await (await client.get("/v1/models", headers=auth())).json()
    assert [m["id"] for m in listed["data"]] == ["gpt", "small", "auto"]
    response = await client.post("/v1/chat/completions", json=chat(), headers=auth())
    assert response.status == 404
    error = (await response.json())["error"]
    assert "no routing rule matched" in error["message"] and error["param"] == "model"
    assert fake.seen == []


async def test_official_sdks_see_the_decision_headers(router_client, fake):
    client = await router_client(routing_config(fake.base_url, RULES))
    root = str(client.make_url("")).rstrip("/")
    oai = openai.AsyncOpenAI(base_url=f"{root}/v1", api_key=CLIENT_KEYS["dev"], max_retries=0)
    raw = await oai.chat.completions.with_raw_response.create(
        model="auto", messages=[{"role": "user", "content": "hi"}]
    )
    assert raw.headers["x-router-rule"] == "auto" and raw.headers["x-router-provider"] == "edge"
    assert raw.parse().choices[0].message.content == "hello"
    claude = anthropic.AsyncAnthropic(base_url=root, api_key=CLIENT_KEYS["dev"], max_retries=0)
    tool = {"name": "get_weather", "input_schema": {"type": "object", "properties": {}}}
    raw = await claude.messages.with_raw_response.create(
        model="auto", max_tokens=16, tools=[tool], messages=[{"role": "user", "content": "hi"}]
    )
    assert raw.headers["x-router-rule"] == "tools" and raw.headers["x-router-provider"] == "claude"
    assert upstream_model(fake.seen[-1]) == "tools-cloud"
    await oai.close()
    await claude.close()


async def test_a_rule_falls_back_to_its_own_fallback(router_client, fake):
    client = await router_client(routing_config(fake.base_url, RULES))
    fake.queue(
        "gemini", Answer(500, {"error": {"code": 500, "message": "down", "status": "INTERNAL"}})
    )
    response = await client.post("/v1/chat/completions", json=IMAGE_CHAT, headers=auth())
    assert response.status == 200, await response.text()
    assert response.headers["x-router-rule"] == "vision"
    assert response.headers["x-router-provider"] == "cloud"
    assert [upstream_model(s) for s in fake.seen] == ["vision-local", "vision-cloud"]


async def test_local_fallback_when_the_cloud_is_unreachable(router_client, fake, unused_tcp_port):
    dead = providers(fake.base_url)
    dead["cloud"]["base_url"] = f"http://127.0.0.1:{unused_tcp_port}/v1"
    rules = [
        {
            "name": "cloud-first",
            "when": {"models": ["auto"]},
            "targets": [target("cloud", "gpt-4o-mini")],
            "fallback": ["small"],
        }
    ]
    client = await router_client(routing_config(fake.base_url, rules, providers=dead))
    response = await client.post("/v1/chat/completions", json=chat(), headers=auth())
    assert response.status == 200, await response.text()
    assert response.headers["x-router-provider"] == "edge"
    assert upstream_model(fake.seen[-1]) == "small-up"


async def test_local_only_requests_never_reach_a_cloud_target(router_client, fake):
    rules = [
        {
            "name": "mixed",
            "when": {"models": ["auto"]},
            "targets": [target("cloud", "gpt-4o-mini"), target("edge", "small-up")],
        }
    ]
    client = await router_client(routing_config(fake.base_url, rules))
    headers = {**auth(), "x-local-only": "yes"}
    response = await client.post("/v1/chat/completions", json=chat(), headers=headers)
    assert response.status == 200
    assert response.headers["x-router-provider"] == "edge"
    # A model with only cloud targets is refused, in the client's format, naming the header.
    response = await client.post(
        "/v1/messages",
        json={"model": "gpt", "max_tokens": 8, "messages": [{"role": "user", "content": "hi"}]},
        headers=headers,
    )
    assert response.status == 400
    body = await response.json()
    assert body["type"] == "error" and "x-local-only" in body["error"]["message"]
    assert [upstream_model(s) for s in fake.seen] == ["small-up"]


async def test_circuit_breaker_skips_a_dead_provider_then_probes_it(router_client, fake):
    rules = [
        {
            "name": "cloud-first",
            "when": {"models": ["auto"]},
            "targets": [target("claude", "c")],
            "fallback": [target("edge", "e")],
        }
    ]
    cfg = routing_config(
        fake.base_url, rules, routing_extra={"breaker": {"failures": 2, "cooldown_s": 0.3}}
    )
    client = await router_client(cfg)
    error = {"type": "error", "error": {"type": "api_error", "message": "down"}}
    fake.queue("anthropic", *[Answer(500, error)] * 3)

    async def ask() -> str:
        response = await client.post("/v1/chat/completions", json=chat(), headers=auth())
        assert response.status == 200
        return response.headers["x-router-provider"]

    assert [await ask() for _ in range(4)] == ["edge"] * 4
    # Two failures opened the circuit: the next two requests never tried claude.
    assert [upstream_model(s) for s in fake.seen] == ["c", "e", "c", "e", "e", "e"]
    await asyncio.sleep(0.35)
    assert await ask() == "edge"  # the half-open probe failed (the third queued 500)
    assert [upstream_model(s) for s in fake.seen][-2:] == ["c", "e"]
    assert await ask() == "edge"  # open again: skipped
    assert upstream_model(fake.seen[-1]) == "e" and upstream_model(fake.seen[-2]) == "e"
    await asyncio.sleep(0.35)
    assert await ask() == "claude"  # the probe succeeded: closed
    assert await ask() == "claude"
    metrics = await (await client.get("/metrics")).text()
    assert (
        'router_route_decisions_total{outcome="served",provider="claude",rule="cloud-first"} 2.0'
        in metrics
    )


def test_exceeds_context_uses_the_providers_window(fake):
    cfg = routing_config(
        fake.base_url,
        [{"name": "r", "when": {"prompt_tokens_above": 3}, "targets": ["gpt"]}],
    )
    short = ir.Request("auto", [ir.Message("user", [ir.TextPart("hi")])])
    long = ir.Request("auto", [ir.Message("user", [ir.TextPart("x" * 40)])])
    no_window = lambda name: None  # noqa: E731
    assert choose_route(cfg, RouteInput(long, {}), no_window).rule == "r"
    with pytest.raises(Exception, match="no routing rule matched"):
        choose_route(cfg, RouteInput(short, {}), no_window)


BAD = {
    "unknown provider": (
        {"name": "r", "targets": [target("nope", "m")]},
        "routing.rules[0].targets[0].provider: unknown provider 'nope'",
    ),
    "unknown model alias": ({"name": "r", "targets": ["nope"]}, "unknown model alias 'nope'"),
    "unknown field": (
        {"name": "r", "when": {"colour": "red"}, "targets": ["gpt"]},
        "routing.rules[0].when: unknown key(s) colour",
    ),
    "unknown media kind": (
        {"name": "r", "when": {"media": ["smell"]}, "targets": ["gpt"]},
        "unknown kind(s) smell",
    ),
    "empty list": ({"name": "r", "when": {"media": []}, "targets": ["gpt"]}, "never matches"),
    "negative tokens": (
        {"name": "r", "when": {"prompt_tokens_above": -1}, "targets": ["gpt"]},
        "prompt_tokens_above: must be >= 0",
    ),
    "context of a cloud provider": (
        {"name": "r", "when": {"exceeds_context_of": "cloud"}, "targets": ["gpt"]},
        "'cloud' is not a provider of type mlx",
    ),
    "local only to the cloud": (
        {"name": "r", "when": {"local_only": True}, "targets": ["gpt"]},
        "local_only requests can never reach its cloud-only targets",
    ),
    "unknown client": (
        {"name": "r", "when": {"clients": ["bob"]}, "targets": ["gpt"]},
        "no client key is named 'bob'",
    ),
    "unknown requested model": (
        {"name": "r", "when": {"models": ["gpt-9"]}, "targets": ["gpt"]},
        "unknown model 'gpt-9'",
    ),
    "wrong type": ({"name": "r", "when": {"tools": "yes"}, "targets": ["gpt"]}, "expected bool"),
    "spillover elsewhere": (
        {"name": "r", "targets": ["gpt"], "spillover": {"provider": "edge", "max_in_flight": 2}},
        "spillover.provider: 'edge' is not one of the rule's targets",
    ),
}


@pytest.mark.parametrize("case", list(BAD))
def test_bad_rules_are_refused_at_load_naming_the_culprit(fake, case):
    rule, message = BAD[case]
    with pytest.raises(ConfigError, match=re.escape(message)):
        routing_config(fake.base_url, [rule])


def test_unreachable_rules_and_malformed_prices_are_refused(fake):
    catch_all = {"name": "all", "targets": ["gpt"]}
    with pytest.raises(ConfigError, match=r"routing.rules\[1\]: unreachable"):
        routing_config(fake.base_url, [catch_all, {"name": "b", "targets": ["gpt"]}])
    # A condition whose value is false or zero is still a condition: the next rule is reachable.
    for when in ({"stream": False}, {"tools": False}, {"prompt_tokens_above": 0}):
        first = {"name": "a", "when": when, "targets": ["gpt"]}
        cfg = routing_config(fake.base_url, [first, {"name": "b", "targets": ["gpt"]}])
        assert [rule.name for rule in cfg.routing.rules] == ["a", "b"]
    with pytest.raises(ConfigError, match=r"pricing.gpt-4o-mini: input and output must be >= 0"):
        routing_config(fake.base_url, [], pricing={"gpt-4o-mini": {"input": -1, "output": 1}})
    with pytest.raises(ConfigError, match=r"pricing.x.output: expected float, got str"):
        routing_config(fake.base_url, [], pricing={"x": {"input": 1, "output": "cheap"}})


BAD_SECTIONS = {
    "routing not a mapping": ({"routing": ["r"]}, "routing: expected a mapping, got list"),
    "rules not a list": ({"routing": {"rules": "r"}}, "routing.rules: expected a list"),
    "budgets not a list": ({"budgets": {"client": "ci"}}, "budgets: expected a list"),
    "budget of two owners": (
        {"budgets": [{"client": "ci", "group": "team", "tokens_per_day": 5}]},
        "budgets[0]: name exactly one of client, group or provider",
    ),
    "budget without a limit": ({"budgets": [{"client": "ci"}]}, "budgets[0]: set tokens_per_day"),
    "budget of nobody": (
        {"budgets": [{"group": "nobody", "usd_per_day": 1}]},
        "budgets[0].group: unknown group 'group:nobody'",
    ),
    "zero budget": (
        {"budgets": [{"provider": "cloud", "usd_per_month": 0}]},
        "budgets[0].usd_per_month: must be > 0",
    ),
    "price not a mapping": ({"pricing": {"gpt-4o": 3}}, "pricing.gpt-4o: expected a mapping"),
    "price without output": (
        {"pricing": {"gpt-4o": {"input": 1}}},
        "missing required key 'output'",
    ),
    "auto is an alias": ({"routing": {"auto_model": "gpt"}}, "'gpt' is also a model alias"),
    "bad breaker": ({"routing": {"breaker": {"failures": 0}}}, "routing.breaker: failures must"),
}


@pytest.mark.parametrize("case", list(BAD_SECTIONS))
def test_bad_budget_price_and_routing_sections_are_refused(fake, case):
    sections, message = BAD_SECTIONS[case]
    data = {
        "providers": providers(fake.base_url),
        "models": {"gpt": [target("cloud", "gpt-4o")]},
        "auth": {"client_keys": [{"key": "k", "name": "ci", "group": "team"}]},
        **sections,
    }
    with pytest.raises(ConfigError, match=re.escape(message)):
        Config.from_dict(data)


async def test_a_bad_reload_keeps_the_running_rules(aiohttp_client, fake, tmp_path: Path):
    path = tmp_path / "router.yaml"
    bad = {
        "providers": providers(fake.base_url),
        "models": {"gpt": [target("cloud", "gpt-4o-mini")]},
        "auth": {"admin_key": ADMIN_KEY},
        "routing": {"rules": [{"name": "r", "targets": [target("ghost", "m")]}]},
    }
    path.write_text(yaml.safe_dump(bad))
    app = create_app(routing_config(fake.base_url, RULES))
    app[CONFIG_LOADER] = lambda: load_config(path)
    client = await aiohttp_client(app)
    admin = {"Authorization": f"Bearer {ADMIN_KEY}"}
    response = await client.post("/admin/reload", headers=admin)
    assert response.status == 400
    assert "unknown provider 'ghost'" in (await response.json())["error"]["message"]
    response = await client.post("/v1/chat/completions", json=chat(), headers=auth())
    assert response.headers["x-router-rule"] == "auto"
    assert upstream_model(fake.seen[-1]) == "auto-local"


EXAMPLE_CASES = {
    "local-only": ([ir.TextPart("hi")], {"x-local-only": "1"}, False),
    "vision": ([ir.TextPart("what?"), ir.MediaPart("video/mp4", data="AAAA")], {}, False),
    "long-context": ([ir.TextPart("word " * 2000)], {}, False),
    "agents": ([ir.TextPart("hi")], {}, True),
    "default": ([ir.TextPart("hi")], {}, False),
}


@pytest.mark.parametrize("rule", list(EXAMPLE_CASES))
def test_the_example_configs_rules_route_as_they_say(monkeypatch, rule):
    for name, value in EXAMPLE_ENV.items():
        monkeypatch.setenv(name, value)
    cfg = load_config(Path(__file__).parents[2] / "router.example.yaml")
    parts, headers, tools = EXAMPLE_CASES[rule]
    request = ir.Request("auto", [ir.Message("user", parts)])
    if tools:
        request.tools = [ir.Tool("get_weather", parameters={"type": "object"})]
    route = choose_route(cfg, RouteInput(request, headers), lambda name: 2048)
    assert route.rule == rule
    if rule == "local-only":
        assert [t.provider for t in route.targets] == ["local"]


async def test_upstream_answer_body_is_unchanged_by_routing(router_client, fake):
    fake.queue("openai", Answer(body=openai_text("routed")))
    client = await router_client(routing_config(fake.base_url, RULES))
    response = await client.post("/v1/chat/completions", json=chat(model="gpt"), headers=auth())
    assert (await response.json())["choices"][0]["message"]["content"] == "routed"


async def test_an_open_circuit_is_still_tried_when_nothing_else_is_left(router_client, fake):
    rules = [
        {"name": "only-claude", "when": {"models": ["auto"]}, "targets": [target("claude", "c")]}
    ]
    cfg = routing_config(
        fake.base_url, rules, routing_extra={"breaker": {"failures": 1, "cooldown_s": 60}}
    )
    client = await router_client(cfg)
    error = {"type": "error", "error": {"type": "api_error", "message": "down"}}
    fake.queue("anthropic", Answer(500, error))
    response = await client.post("/v1/chat/completions", json=chat(), headers=auth())
    assert response.status == 500
    # The circuit is open, but claude is the only target: it is tried rather than failing.
    response = await client.post("/v1/chat/completions", json=chat(), headers=auth())
    assert response.status == 200 and response.headers["x-router-provider"] == "claude"


async def test_the_decision_is_in_the_requests_log_line(router_client, fake, caplog):
    client = await router_client(routing_config(fake.base_url, RULES))
    with caplog.at_level("INFO", logger="router.access"):
        response = await client.post(
            "/v1/chat/completions", json=chat(tools=[TOOL]), headers=auth()
        )
        assert response.status == 200
    (line,) = [r for r in caplog.records if r.name == "router.access"]
    assert line.rule == "tools" and line.provider == "claude"
    assert line.targets == ["claude/tools-cloud"] and line.client == "ci"
