"""Client auth: router keys in each SDK's form, 401/403 in each client's error format, model
scopes, the admin key, ``hash-key`` and the refusal to listen beyond loopback without keys."""

from __future__ import annotations

import io
import logging
import subprocess
import sys
from pathlib import Path

import anthropic
import openai
import pytest
from google.genai import errors as genai_errors

from router.__main__ import main
from router.auth import check_bind, find_client, is_loopback
from router.config import Config, ConfigError, hash_key
from tests.router.fakes import ANTHROPIC_KEYS, OPENAI_KEYS, TEXT_ANSWER, ask, make_clients
from tests.router.helpers import (
    ANTHROPIC_BODY,
    GEMINI_BODY,
    OPENAI_BODY,
    client_roots,
    running_router,
)

FULL_KEY = "rk-full-access-0001"
GPT_ONLY_KEY = "rk-gpt-only-0002"
ADMIN_KEY = "admin-secret-0003"
# The checkout, so a subprocess imports this tree's router.
ROOT = Path(__file__).resolve().parents[2]

RESPONSES_BODY = {"model": "claude", "input": "hi"}


def auth_config(base_url: str, **auth: object) -> Config:
    return Config.from_dict(
        {
            "providers": {
                "oai": {"type": "openai", "base_url": f"{base_url}/v1", "keys": ["sk-1"]},
                "claude": {"type": "anthropic", "base_url": base_url, "keys": ["ak-1"]},
                "gem": {"type": "gemini", "base_url": base_url, "keys": ["gk-1"]},
            },
            "models": {
                "gpt": [{"provider": "oai", "model": "gpt-up"}],
                "claude": [{"provider": "claude", "model": "claude-up"}],
                "gemini": [{"provider": "gem", "model": "gemini-up"}],
            },
            "auth": {
                "client_keys": [
                    # Stored hashed, as hash-key prints it; a plain one is hashed at load.
                    {"key": hash_key(FULL_KEY), "models": ["*"], "name": "full"},
                    {"key": GPT_ONLY_KEY, "models": ["gpt*"], "name": "gpt-only"},
                ],
                **auth,
            },
        }
    )


@pytest.fixture
def router_config(fake) -> Config:
    return auth_config(fake.base_url, admin_key=ADMIN_KEY)


# (client format, path, body, how that client sends its key)
FORMS = {
    "openai": (
        "/v1/chat/completions",
        OPENAI_BODY,
        lambda k: ({"Authorization": f"Bearer {k}"}, {}),
    ),
    "anthropic": ("/v1/messages", ANTHROPIC_BODY, lambda k: ({"x-api-key": k}, {})),
    "gemini-header": (
        "/v1beta/models/gemini:generateContent",
        GEMINI_BODY,
        lambda k: ({"x-goog-api-key": k}, {}),
    ),
    "gemini-query": (
        "/v1beta/models/gemini:generateContent",
        GEMINI_BODY,
        lambda k: ({}, {"key": k}),
    ),
    "responses": (
        "/v1/responses",
        RESPONSES_BODY,
        lambda k: ({"Authorization": f"Bearer {k}"}, {}),
    ),
}


def check_error_format(form: str, body: dict, status: int) -> str:
    """Asserts the client format's error shape; returns the message."""
    if form == "anthropic":
        kind = {401: "authentication_error", 403: "permission_error"}[status]
        assert body["type"] == "error" and body["error"]["type"] == kind, body
        return body["error"]["message"]
    if form.startswith("gemini"):
        code = {401: "UNAUTHENTICATED", 403: "PERMISSION_DENIED"}[status]
        assert body["error"]["code"] == status and body["error"]["status"] == code, body
        return body["error"]["message"]
    kind = {401: "authentication_error", 403: "permission_error"}[status]
    assert body["error"]["type"] == kind, body
    return body["error"]["message"]


@pytest.mark.parametrize("form", FORMS)
async def test_each_client_key_form_is_accepted(client, fake, form):
    path, body, send = FORMS[form]
    headers, params = send(FULL_KEY)
    resp = await client.post(path, json=body, headers=headers, params=params)
    assert resp.status == 200, await resp.text()
    # The router key never travels upstream: the provider's own key does.
    seen = fake.seen[-1]
    assert FULL_KEY not in str(seen.headers) and FULL_KEY not in str(seen.query)


@pytest.mark.parametrize("form", FORMS)
@pytest.mark.parametrize("key", [None, "rk-wrong"], ids=["missing", "wrong"])
async def test_missing_or_wrong_key_is_401_in_the_client_format(client, fake, form, key):
    path, body, send = FORMS[form]
    headers, params = send(key) if key else ({}, {})
    resp = await client.post(path, json=body, headers=headers, params=params)
    assert resp.status == 401
    message = check_error_format(form, await resp.json(), 401)
    assert ("missing API key" if key is None else "invalid API key") in message
    assert not fake.seen, "an unauthenticated request reached the upstream"


@pytest.mark.parametrize("form", FORMS)
async def test_model_outside_the_key_scope_is_403_in_the_client_format(client, fake, form):
    path, body, send = FORMS[form]
    if form == "openai":
        body = {**body, "model": "claude"}
    headers, params = send(GPT_ONLY_KEY)
    resp = await client.post(path, json=body, headers=headers, params=params)
    assert resp.status == 403
    message = check_error_format(form, await resp.json(), 403)
    assert "may not use model" in message
    assert not fake.seen


async def test_scoped_key_reaches_its_models(client, fake):
    resp = await client.post(
        "/v1/chat/completions",
        json=OPENAI_BODY,
        headers={"Authorization": f"Bearer {GPT_ONLY_KEY}"},
    )
    assert resp.status == 200
    resp = await client.get(
        "/v1/models/claude", headers={"Authorization": f"Bearer {GPT_ONLY_KEY}"}
    )
    assert resp.status == 403


async def test_health_and_metrics_need_no_key(client):
    assert (await client.get("/health")).status == 200
    assert (await client.get("/metrics")).status == 200


async def test_admin_api_needs_the_admin_key(client):
    for headers in ({}, {"Authorization": "Bearer wrong"}, {"Authorization": f"Bearer {FULL_KEY}"}):
        resp = await client.get("/admin/keys", headers=headers)
        assert resp.status == 401, headers
    resp = await client.get("/admin/keys", headers={"Authorization": f"Bearer {ADMIN_KEY}"})
    assert resp.status == 200
    keys = (await resp.json())["keys"]
    assert [k["id"] for k in keys] == ["oai/0", "claude/0", "gem/0"]


async def test_admin_api_is_off_without_an_admin_key(router_client, fake):
    client = await router_client(auth_config(fake.base_url))
    resp = await client.get("/admin/keys", headers={"Authorization": f"Bearer {ADMIN_KEY}"})
    assert resp.status == 403
    assert "auth.admin_key" in (await resp.json())["error"]["message"]


def test_find_client_compares_every_digest():
    cfg = auth_config("http://127.0.0.1:1")
    assert find_client(cfg.auth.clients, FULL_KEY).name == "full"
    assert find_client(cfg.auth.clients, GPT_ONLY_KEY).name == "gpt-only"
    assert find_client(cfg.auth.clients, FULL_KEY + "x") is None


@pytest.mark.parametrize(
    "entry, culprit",
    [
        ({"key": "sha256:abc"}, r"auth\.client_keys\[0\]\.key: a sha256: digest must be 64 hex"),
        ({"key": ""}, r"auth\.client_keys\[0\]\.key: must be a non-empty string"),
        ({"key": "k", "models": []}, r"auth\.client_keys\[0\]\.models"),
        ({"key": "k", "scopes": ["*"]}, r"auth\.client_keys\[0\]: unknown key\(s\) scopes"),
    ],
)
def test_bad_client_key_config_names_the_culprit(entry, culprit):
    with pytest.raises(ConfigError, match=culprit):
        Config.from_dict({"providers": {}, "models": {}, "auth": {"client_keys": [entry]}})


def test_loopback_rule():
    assert is_loopback("127.0.0.1") and is_loopback("::1") and is_loopback("localhost")
    assert not is_loopback("0.0.0.0") and not is_loopback("::") and not is_loopback("example.com")
    open_cfg = Config.from_dict({"providers": {}, "models": {}})
    check_bind("127.0.0.1", open_cfg.auth)
    with pytest.raises(ConfigError, match=r"auth\.client_keys is empty"):
        check_bind("0.0.0.0", open_cfg.auth)
    check_bind("0.0.0.0", auth_config("http://127.0.0.1:1").auth)


@pytest.fixture
def restore_logging():
    """main() installs the router's log handler on the root logger: put the old ones back."""
    root = logging.getLogger()
    handlers, level = list(root.handlers), root.level
    yield
    root.handlers[:] = handlers
    root.setLevel(level)


def test_router_refuses_to_listen_beyond_loopback_without_client_keys(
    tmp_path, caplog, restore_logging
):
    path = tmp_path / "router.yaml"
    path.write_text(
        "providers:\n  oai: {type: openai, base_url: 'http://127.0.0.1:1/v1'}\n"
        "models:\n  gpt: [{provider: oai, model: gpt-up}]\n"
    )
    assert main(["--config", str(path), "--host", "0.0.0.0", "--port", "1"]) == 2
    assert "auth.client_keys is empty" in caplog.text


def test_hash_key_command(monkeypatch, capsys):
    assert main(["hash-key", "my-router-key"]) == 0
    printed = capsys.readouterr().out.strip()
    assert printed == hash_key("my-router-key") and printed.startswith("sha256:")
    assert len(printed) == len("sha256:") + 64
    monkeypatch.setattr(sys, "stdin", io.StringIO("from-stdin\n"))
    assert main(["hash-key"]) == 0
    assert capsys.readouterr().out.strip() == hash_key("from-stdin")
    cfg = Config.from_dict(
        {"providers": {}, "models": {}, "auth": {"client_keys": [{"key": printed}]}}
    )
    assert find_client(cfg.auth.clients, "my-router-key") is not None


def test_importing_auth_does_not_import_redis():
    # Auth needs the config's app key only, not the shared key state's Redis client.
    code = "import router.auth, sys; assert 'redis' not in sys.modules"
    subprocess.run([sys.executable, "-c", code], cwd=ROOT, check=True)


@pytest.mark.asyncio(loop_scope="module")
@pytest.mark.parametrize("kind", ["openai", "anthropic", "gemini"])
async def test_official_sdks_authenticate_and_read_401_and_403(fakes, upstreams, kind):
    """Each SDK sends its key its own way and raises its own 401/403 classes on the router's
    answers."""
    roots = upstreams.roots
    cfg = Config.from_dict(
        {
            "providers": {
                "oai": {"type": "openai", "base_url": f"{roots['openai']}/v1", "keys": OPENAI_KEYS},
                "claude": {
                    "type": "anthropic",
                    "base_url": roots["anthropic"],
                    "keys": ANTHROPIC_KEYS,
                },
            },
            "models": {
                "gpt": [{"provider": "oai", "model": "gpt-fake"}],
                "claude": [{"provider": "claude", "model": "claude-fake"}],
            },
            "auth": {"client_keys": [{"key": FULL_KEY}, {"key": GPT_ONLY_KEY, "models": ["gpt"]}]},
        }
    )
    errors = {
        "openai": (openai.AuthenticationError, openai.PermissionDeniedError),
        "anthropic": (anthropic.AuthenticationError, anthropic.PermissionDeniedError),
        "gemini": (genai_errors.ClientError, genai_errors.ClientError),
    }[kind]
    made = []
    async with running_router(cfg) as server:
        try:
            for key, model, expected, status in [
                (FULL_KEY, "claude", None, 200),
                ("rk-wrong", "gpt", errors[0], 401),
                (GPT_ONLY_KEY, "claude", errors[1], 403),
            ]:
                clients = make_clients(client_roots(server), {kind: key})
                made.append(clients)
                if expected is None:
                    assert await ask(kind, clients, model, "scenario:text", False) == TEXT_ANSWER
                    continue
                with pytest.raises(expected) as info:
                    await ask(kind, clients, model, "scenario:text", False)
                got = info.value.code if kind == "gemini" else info.value.status_code
                assert got == status
        finally:
            for clients in made:
                await clients.close()
