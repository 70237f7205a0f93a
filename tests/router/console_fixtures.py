"""The config of the web console and request log tests: the fake upstream's three providers,
an admin key, client keys and a request log in a file."""

from __future__ import annotations

from pathlib import Path

from router.config import Config
from tests.router.helpers import fake_models

ADMIN_KEY = "admin-secret-0123456789"
CLIENT_KEY = "client-secret-abcdef0123"
OTHER_CLIENT_KEY = "client-secret-zyxwvu9876"


def console_config(base_url: str, log_path: Path | str, **request_log: object) -> Config:
    """Providers of all three types on the fake upstream, an admin key, two client keys (one
    with a daily token budget) and the request log at ``log_path`` (flushed every 50 ms).

    Args:
        base_url: The fake upstream's root.
        log_path: The SQLite file.
        request_log: More ``request_log`` settings (``bodies``, ``max_bytes``...).
    """
    return Config.from_dict(
        {
            "providers": {
                "oai": {
                    "type": "openai",
                    "base_url": f"{base_url}/v1",
                    "keys": ["sk-one-123456789"],
                },
                "claude": {
                    "type": "anthropic",
                    "base_url": base_url,
                    "keys": ["ak-one-123456789", "ak-two-123456789"],
                },
                "gem": {"type": "gemini", "base_url": base_url, "keys": ["gk-one-123456789"]},
            },
            "models": fake_models(),
            "auth": {
                "admin_key": ADMIN_KEY,
                "client_keys": [
                    {"key": CLIENT_KEY, "name": "team-a"},
                    {"key": OTHER_CLIENT_KEY, "name": "team-b", "models": ["claude"]},
                ],
            },
            # The clients page shows team-a's spend against this budget.
            "budgets": [{"client": "team-a", "tokens_per_day": 1_000_000}],
            "request_log": {"path": str(log_path), "flush_s": 0.05, **request_log},
        }
    )
