"""The ``smolvlm-router`` command: its help, the example config, client keys from the
environment and flags, ``GET /``, the start-up log, ``--offline`` and a cloud-only router that
never imports MLX."""

from __future__ import annotations

import hashlib
import os
import re
import subprocess
import sys
import time
import urllib.error
import urllib.request
from pathlib import Path

import pytest
import yaml

from benchmarks.gateways import free_port
from mlx_smolvlm.engine import EngineConfig
from router.__main__ import build_parser, main
from router.app import create_app
from router.config import CLIENT_KEYS_VAR, AuthConfig, Config, ConfigError, load_config

ROOT = Path(__file__).parents[2]
EXAMPLE_ENV = {
    "OPENAI_KEY_1": "sk-example-1",
    "OPENAI_KEY_2": "sk-example-2",
    "ANTHROPIC_KEY": "sk-ant-example",
    "GEMINI_KEY": "gemini-example",
    "ROUTER_KEY": "router-example",
    "ROUTER_ADMIN_KEY": "admin-example",
    "REDIS_URL": "redis://127.0.0.1:6379/0",
}


def cloud_config(**extra: object) -> dict:
    return {
        "providers": {
            "oai": {"type": "openai", "base_url": "http://127.0.0.1:9/v1", "keys": ["k"]}
        },
        "models": {"gpt": [{"provider": "oai", "model": "gpt-up"}]},
        **extra,
    }


def test_example_config_loads_with_every_section(monkeypatch):
    for name, value in EXAMPLE_ENV.items():
        monkeypatch.setenv(name, value)
    cfg = load_config(ROOT / "router.example.yaml")
    types = {name: p.type for name, p in cfg.providers.items()}
    assert types == {
        "oai": "openai",
        "claude": "anthropic",
        "gem": "gemini",
        "vllm": "openai",
        "ollama": "ollama",
        "local": "mlx",
    }
    assert cfg.providers["oai"].key_configs[1].max_concurrent == 4
    assert cfg.providers["local"].mlx.model == "HuggingFaceTB/SmolVLM2-256M-Video-Instruct"
    assert cfg.providers["local"].mlx.engine.max_sequences == 8
    assert set(cfg.models) == {"fast", "smart", "smolvlm2-256m"}
    assert [c.name for c in cfg.auth.clients] == ["ci", "client1"]
    assert cfg.auth.admin_digest == hashlib.sha256(b"admin-example").digest()
    assert cfg.shared_state.redis_url == EXAMPLE_ENV["REDIS_URL"]
    assert cfg.limits.max_body_bytes == 20 * 1024 * 1024
    monkeypatch.delenv("GEMINI_KEY")
    with pytest.raises(ConfigError, match="GEMINI_KEY is not set"):
        load_config(ROOT / "router.example.yaml")


def test_help_is_plain_text_with_defaults_and_both_usages(capsys):
    text = build_parser().format_help()
    usage = text.split("\n\n")[0]
    assert usage.startswith("usage: smolvlm-router ")
    assert "smolvlm-router hash-key [KEY]" in usage
    for option in ("--config", "--model", "--client-key", "--offline", "--host", "--port"):
        assert option in usage
    assert "``" not in text and "Args:" not in text
    assert "default: listen.port, else 8080" in text and "ROUTER_CLIENT_KEYS" in text
    flat = " ".join(text.split())  # the help's line breaks follow the terminal's width
    engine = EngineConfig()
    assert f"requests decoded together (default: the engine's, {engine.max_sequences})" in flat
    assert f"waiting beyond them (default: the engine's, {engine.max_queue})" in flat
    with pytest.raises(SystemExit):
        main(["hash-key", "--help"])
    hash_help = capsys.readouterr().out
    assert hash_help.startswith("usage: smolvlm-router hash-key [-h] [KEY]")
    assert "``" not in hash_help and "Args:" not in hash_help and "Returns:" not in hash_help


def test_client_keys_are_added_plain_or_hashed_and_named_without_quoting_them():
    auth = AuthConfig(client_keys=[{"key": "from-yaml", "name": "ci"}])
    hashed = "sha256:" + hashlib.sha256(b"from-env").hexdigest()
    auth.add_client_keys(["plain-env", hashed], CLIENT_KEYS_VAR)
    auth.add_client_keys(["from-flag"], "--client-key")
    assert [c.name for c in auth.clients] == ["ci", "client1", "client2", "client3"]
    assert auth.clients[2].digest == hashlib.sha256(b"from-env").digest()
    assert all(c.models == ["*"] for c in auth.clients)
    with pytest.raises(ConfigError, match=r"ROUTER_CLIENT_KEYS\[1\]: .*64 hex digits") as err:
        AuthConfig().add_client_keys(["fine", "sha256:secret-ish"], CLIENT_KEYS_VAR)
    assert "secret-ish" not in str(err.value)


def test_env_client_keys_let_the_router_listen_beyond_loopback(tmp_path):
    """``--host 0.0.0.0`` with keys from ROUTER_CLIENT_KEYS and --client-key only: it starts,
    logs its endpoints, and ``GET /`` needs a key."""
    config = tmp_path / "router.yaml"
    config.write_text(yaml.safe_dump(cloud_config(log={"format": "text"})))
    port = free_port()
    env = {**os.environ, CLIENT_KEYS_VAR: "env-key-1, env-key-2", "PYTHONUNBUFFERED": "1"}
    log = tmp_path / "router.log"
    args = ["--config", str(config), "--host", "0.0.0.0", "--port", str(port)]
    with log.open("w") as out:
        proc = subprocess.Popen(
            [sys.executable, "-m", "router", *args, "--client-key", "flag-key"],
            stderr=out,
            cwd=ROOT,
            env=env,
        )
    try:
        deadline = time.monotonic() + 30
        # Every worker (the supervisor starts one per CPU for a cloud config) is listening.
        while log.read_text().count("endpoints: ") < _workers_started(log.read_text()):
            assert proc.poll() is None, log.read_text()
            assert time.monotonic() < deadline, log.read_text()
            time.sleep(0.1)
        text = log.read_text()
        assert "POST /v1/chat/completions" in text and "GET /health" in text
        assert "env-key-1" not in text and "flag-key" not in text
        url = f"http://127.0.0.1:{port}/"
        assert _get_status(url, {}) == 401, log.read_text()
        for key in ("env-key-2", "flag-key"):
            assert _get_status(url, {"Authorization": f"Bearer {key}"}) == 200, log.read_text()
    finally:
        proc.kill()
        proc.wait()


def _workers_started(text: str) -> int:
    """How many workers the router's log says it runs (1 without a supervisor)."""
    found = re.search(r"supervisor \d+: (\d+) ", text)
    return int(found.group(1)) if found else 1


def _get_status(url: str, headers: dict) -> int:
    """The status of a GET, or 0 if no connection could be made."""
    try:
        with urllib.request.urlopen(urllib.request.Request(url, headers=headers), timeout=10) as r:
            return r.status
    except urllib.error.HTTPError as err:
        return err.code
    except urllib.error.URLError:
        return 0


def test_a_bad_env_client_key_is_a_clear_start_error(tmp_path):
    config = tmp_path / "router.yaml"
    config.write_text(yaml.safe_dump(cloud_config()))
    run = subprocess.run(
        [sys.executable, "-m", "router", "--config", str(config)],
        env={**os.environ, CLIENT_KEYS_VAR: "sha256:not-hex-at-all"},
        capture_output=True,
        text=True,
        cwd=ROOT,
        timeout=60,
    )
    assert run.returncode == 2
    assert "ROUTER_CLIENT_KEYS[0]" in run.stderr and "Traceback" not in run.stderr
    assert "not-hex-at-all" not in run.stderr


async def test_index_lists_models_and_endpoints_as_json_or_html(aiohttp_client):
    client = await aiohttp_client(create_app(Config.from_dict(cloud_config())))
    resp = await client.get("/")
    assert resp.status == 200
    body = await resp.json()
    assert body["service"] == "smolvlm-router" and body["models"] == ["gpt"]
    for endpoint in (
        "POST /v1/chat/completions",
        "POST /v1/responses",
        "POST /v1/messages",
        "GET /v1/models",
        "GET /health",
        "GET /metrics",
    ):
        assert endpoint in body["endpoints"]
    assert not any(e.startswith("HEAD ") for e in body["endpoints"])
    page = await client.get("/", headers={"Accept": "text/html,application/xhtml+xml,*/*"})
    assert page.content_type == "text/html"
    text = await page.text()
    assert "<code>gpt</code>" in text and "<code>POST /v1/messages</code>" in text


def test_a_cloud_only_router_never_imports_mlx():
    """Building and starting the app from a cloud-only config (the ``router`` command's own
    modules included) leaves MLX and the local model's stack unimported."""
    script = f"""
import asyncio, sys
from aiohttp import web
import router.__main__
from router.app import create_app
from router.config import Config

async def start():
    runner = web.AppRunner(create_app(Config.from_dict({cloud_config()!r})))
    await runner.setup()
    await runner.cleanup()

asyncio.run(start())
heavy = sorted(m for m in sys.modules if m.split(".")[0] in ("mlx", "mlx_smolvlm", "av", "tokenizers"))
print("HEAVY", heavy)
"""
    run = subprocess.run(
        [sys.executable, "-c", script], capture_output=True, text=True, cwd=ROOT, timeout=120
    )
    assert run.returncode == 0, run.stderr
    assert "HEAVY []" in run.stdout, run.stdout


def test_offline_flag_reports_an_uncached_model_within_seconds(tmp_path):
    env = {**os.environ, "HF_HOME": str(tmp_path / "hf"), "XDG_CACHE_HOME": str(tmp_path / "c")}
    env.pop("HF_HUB_OFFLINE", None)
    start = time.monotonic()
    run = subprocess.run(
        [sys.executable, "-m", "router", "--offline", "--model", "not-a-real-org/no-model"],
        env=env,
        capture_output=True,
        text=True,
        cwd=ROOT,
        timeout=120,
    )
    assert run.returncode == 1, run.stderr
    assert "not in the Hugging Face cache while offline" in run.stderr
    assert "Traceback" not in run.stderr
    assert time.monotonic() - start < 60  # the imports and MLX; the Hub is never asked
