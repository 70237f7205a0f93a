"""Router configuration: YAML with ``${VAR}`` expansion, loaded strictly into dataclasses."""

from __future__ import annotations

import dataclasses
import hashlib
import importlib.util
import ipaddress
import os
import re
from dataclasses import dataclass, field
from functools import lru_cache
from pathlib import Path
from typing import TYPE_CHECKING
from urllib.parse import urlsplit

import yaml

if TYPE_CHECKING:
    from mlx_smolvlm.engine import EngineConfig

DEFAULT_BASE_URLS = {
    "openai": "https://api.openai.com/v1",
    "anthropic": "https://api.anthropic.com",
    "gemini": "https://generativelanguage.googleapis.com",
    "ollama": "http://127.0.0.1:11434",
}

_VAR = re.compile(r"\$\{([A-Za-z_][A-Za-z0-9_]*)\}")

# The default configuration: the local SmolVLM2-256M, plus each cloud provider whose key is set.
LOCAL_MODEL = "HuggingFaceTB/SmolVLM2-256M-Video-Instruct"
LOCAL_MODEL_ALIAS = "smolvlm2-256m"
CLOUD_KEY_VARS = {
    "openai": "OPENAI_API_KEY",
    "anthropic": "ANTHROPIC_API_KEY",
    "gemini": "GEMINI_API_KEY",
}


class ConfigError(ValueError):
    """The configuration is invalid; the message names the offending key."""


# How a provider's key pool picks the next key (see router/keys/pool.py).
STRATEGIES = ("round_robin", "least_busy", "weighted", "priority")


@dataclass
class ListenConfig:
    host: str = "127.0.0.1"
    port: int = 8080


@dataclass
class LimitsConfig:
    # Largest accepted client request body.
    max_body_bytes: int = 20 * 1024 * 1024
    # Images fetched from https URLs to inline them for providers that need inline data.
    image_max_bytes: int = 20 * 1024 * 1024
    image_timeout_s: float = 10.0
    # While a stream waits for its first token, a ping (``: ping``; Anthropic: ``event: ping``)
    # every this many seconds keeps proxies with idle timeouts from closing it (0 disables).
    keepalive_s: float = 15.0


# Host name patterns of media.allow / media.deny: a name, or ``*.`` and a name (its subdomains).
_HOST_PATTERN = re.compile(r"(\*\.)?[a-z0-9_-]+(\.[a-z0-9_-]+)*\.?")


@dataclass
class MediaConfig:
    """Which media URLs the router itself fetches (to inline images for Gemini and the local
    model), and per-request bounds; see router/images.py.

    ``allow`` and ``deny`` hold CIDRs (``10.8.0.0/16``, ``fd00::/8``, a single address) and
    host names (``images.example.com``; ``*.example.com`` for its subdomains). A resolved
    address in ``deny``, or a denied host name, is never fetched; an address in ``allow``, or
    any address of an allowed host name, is fetched even when it is not public.
    """

    # Fetch public (globally routable) addresses; false: only what ``allow`` names.
    allow_public: bool = True
    allow: list[str] = field(default_factory=list)
    deny: list[str] = field(default_factory=list)
    # Per client request: media URLs fetched, their bytes together, and fetches at once.
    max_urls: int = 8
    max_total_bytes: int = 32 * 1024 * 1024
    max_concurrency: int = 4
    # Redirects followed per URL (each hop is checked again).
    max_redirects: int = 3
    # The media fetcher's own connection pool, for all requests together (read at start).
    max_connections: int = 100

    allow_networks: list[ipaddress.IPv4Network | ipaddress.IPv6Network] = field(
        init=False, repr=False
    )
    allow_hosts: list[str] = field(init=False, repr=False)
    deny_networks: list[ipaddress.IPv4Network | ipaddress.IPv6Network] = field(
        init=False, repr=False
    )
    deny_hosts: list[str] = field(init=False, repr=False)

    def __post_init__(self) -> None:
        for name in ("max_urls", "max_total_bytes", "max_concurrency", "max_connections"):
            if getattr(self, name) < 1:
                raise ConfigError(f"media.{name}: must be >= 1, got {getattr(self, name)}")
        if self.max_redirects < 0:
            raise ConfigError(f"media.max_redirects: must be >= 0, got {self.max_redirects}")
        self.allow_networks, self.allow_hosts = _networks_and_hosts(self.allow, "media.allow")
        self.deny_networks, self.deny_hosts = _networks_and_hosts(self.deny, "media.deny")


def _networks_and_hosts(entries: list, where: str) -> tuple[list, list[str]]:
    """Split a list of CIDRs and host name patterns (lower-cased, without a trailing dot)."""
    networks, hosts = [], []
    for i, entry in enumerate(entries):
        if not isinstance(entry, str):
            raise ConfigError(f"{where}[{i}]: expected a CIDR or a host name, got {entry!r}")
        try:
            networks.append(ipaddress.ip_network(entry, strict=False))
            continue
        except ValueError:
            pass
        host = entry.strip().lower()
        if not _HOST_PATTERN.fullmatch(host):
            raise ConfigError(f"{where}[{i}]: {entry!r} is neither a CIDR nor a host name")
        hosts.append(host.rstrip("."))
    return networks, hosts


def _default_engine_config() -> EngineConfig:
    """The engine's defaults. Imported here, not at the top: a router without a local model
    never loads MLX."""
    from mlx_smolvlm.engine import EngineConfig

    return EngineConfig()


@dataclass
class MLXConfig:
    """The ``mlx`` mapping of a provider of type ``mlx``: the local model and its limits.

    In YAML the engine's options (`mlx_smolvlm.engine.EngineConfig`: ``max_sequences``,
    ``max_queue``, ``max_context_tokens``, ``prefill_step_size``, ``image_cache_tiles``,
    ``prompt_cache_bytes``, ``retry_after_s``) sit beside these keys; past ``max_queue`` waiting
    requests the router answers 429 with Retry-After.
    """

    # A checkpoint directory or a Hugging Face Hub id.
    model: str = LOCAL_MODEL
    # When the model is neither a directory nor in the Hugging Face cache, serve a random-weight
    # checkpoint of the SmolVLM2-256M architecture instead (for demos; answers are gibberish).
    random_weights_fallback: bool = False
    # Cast the weights (e.g. float32, the fast path on CPUs); None keeps the checkpoint's.
    dtype: str | None = None
    # Used when the client sends none (0 is greedy). Without max_tokens from the client or
    # the provider's default_max_tokens, answers end at EOS or the end of the context.
    default_temperature: float = 0.0
    # The engine's limits and batching options, with the engine's own defaults.
    engine: EngineConfig = field(default_factory=_default_engine_config)


@dataclass
class KeyConfig:
    """One API key of a provider and its limits (a plain string in YAML is ``{key: ...}``)."""

    key: str = field(repr=False)
    # Share of the traffic under the ``weighted`` strategy.
    weight: float = 1.0
    # Under the ``priority`` strategy, higher-priority keys are used while any is available.
    priority: int = 0
    # Requests in flight on this key at once (None: unlimited); more wait in the pool's queue.
    max_concurrent: int | None = None
    # Requests and tokens (from the responses' usage) per rolling minute (None: unlimited).
    rpm: int | None = None
    tpm: int | None = None

    def __post_init__(self) -> None:
        # Messages name the field only: the key itself must never reach logs or errors.
        if not self.key:
            raise ConfigError("key: must be a non-empty string")
        if self.weight <= 0:
            raise ConfigError(f"weight: must be > 0, got {self.weight}")
        limits = {"max_concurrent": self.max_concurrent, "rpm": self.rpm, "tpm": self.tpm}
        for name, value in limits.items():
            if value is not None and value < 1:
                raise ConfigError(f"{name}: must be >= 1 or null, got {value}")


@dataclass
class ProviderConfig:
    name: str
    type: str
    base_url: str = ""
    # API keys as strings or {key, weight, priority, max_concurrent, rpm, tpm} mappings, as
    # written in the config; parsed into ``key_configs``.
    keys: list[str | dict] = field(default_factory=list, repr=False)
    # Key choice: round_robin, least_busy, weighted or priority.
    strategy: str = "round_robin"
    # Requests waiting for a key at its max_concurrent (or over its rpm/tpm), and how long
    # each may wait; past either the client gets 429 with Retry-After. Keep the wait below
    # limits.keepalive_s: a stream that waits longer has sent its headers, and then gets the
    # format's error event instead of the 429.
    max_queue: int = 100
    queue_timeout_s: float = 10.0
    # How long a key whose quota or credit is exhausted is parked when no reset time is known.
    park_s: float = 3600.0
    # Total time for one upstream call (streams included) and for connecting.
    timeout_s: float = 600.0
    connect_timeout_s: float = 10.0
    # Sent when the client gives no max_tokens (local servers often default very low).
    default_max_tokens: int | None = None
    # Extra headers for every upstream request (e.g. OpenAI-Organization).
    headers: dict[str, str] = field(default_factory=dict)
    # This provider's own connection pool: connections open at once (its one host included).
    # Requests beyond it wait for a free connection, so keep it above the expected concurrency.
    max_connections: int = 1000
    # The local model's options (type mlx only).
    mlx: MLXConfig | None = None
    # Whether requests to it stay on this machine, for routing's local-only requests and
    # spillover (None: type mlx, or a base_url on a loopback address).
    local: bool | None = None

    key_configs: list[KeyConfig] = field(init=False, repr=False)

    def __post_init__(self) -> None:
        if not self.base_url:
            self.base_url = DEFAULT_BASE_URLS.get(self.type, "")
        self.base_url = self.base_url.rstrip("/")
        where = f"providers.{self.name}"
        if self.strategy not in STRATEGIES:
            raise ConfigError(
                f"{where}.strategy: {self.strategy!r} is not one of {', '.join(STRATEGIES)}"
            )
        if self.max_queue < 0 or self.queue_timeout_s < 0 or self.park_s <= 0:
            raise ConfigError(f"{where}: max_queue and queue_timeout_s must be >= 0 and park_s > 0")
        if self.max_connections < 1:
            raise ConfigError(f"{where}.max_connections: must be >= 1, got {self.max_connections}")
        self.key_configs = [_key_config(k, f"{where}.keys[{i}]") for i, k in enumerate(self.keys)]
        for name, value in self.headers.items():
            if not isinstance(value, str):
                raise ConfigError(f"{where}.headers.{name}: expected a string value")


@dataclass
class Target:
    """One entry of a model's fallback list: which provider serves it under which name."""

    provider: str
    model: str


@dataclass
class RetryConfig:
    """Bounds on one client request's upstream attempts (all keys and fallback targets)."""

    max_attempts: int = 4
    # No new attempt (nor a wait for a key) starts after this many seconds.
    max_time_s: float = 60.0

    def __post_init__(self) -> None:
        if self.max_attempts < 1:
            raise ConfigError(f"retry.max_attempts: must be >= 1, got {self.max_attempts}")
        if self.max_time_s <= 0:
            raise ConfigError(f"retry.max_time_s: must be > 0, got {self.max_time_s}")


@dataclass
class TimeoutsConfig:
    """Bounds on each upstream call; each expiry is a retryable 504 for the fallback loop."""

    # Default for providers that set no connect_timeout_s of their own.
    connect_s: float = 10.0
    # Until the first stream event, or until the whole answer of a non-streaming call.
    first_byte_s: float = 300.0
    # Longest silence between two events of a stream once it has started.
    idle_s: float = 120.0

    def __post_init__(self) -> None:
        for name in ("connect_s", "first_byte_s", "idle_s"):
            if getattr(self, name) <= 0:
                raise ConfigError(f"timeouts.{name}: must be > 0, got {getattr(self, name)}")


@dataclass
class ClientKeyConfig:
    """A router key for clients: ``sha256:<hex>`` (see ``smolvlm-router hash-key``) or a plain
    key (e.g. ``${ROUTER_KEY}``), hashed at load; ``models`` are patterns (``*``, ``gpt-*``)."""

    key: str = field(repr=False)
    models: list[str] = field(default_factory=lambda: ["*"])
    # Names the client in logs and metrics (default ``client{index}``).
    name: str = ""
    # A group of keys that shares budgets and routing rules (router/budgets.py, rules.py).
    group: str = ""

    digest: bytes = field(init=False, repr=False)

    def __post_init__(self) -> None:
        # Messages name the field only: the key itself must never reach logs or errors.
        self.digest = key_digest(self.key, "key")
        if not self.models or not all(isinstance(m, str) and m for m in self.models):
            raise ConfigError("models: expected a non-empty list of model names or patterns")


@dataclass
class AuthConfig:
    """Client keys (none: no client auth, allowed on loopback only) and the admin API's key."""

    client_keys: list[dict] = field(default_factory=list, repr=False)
    admin_key: str | None = field(default=None, repr=False)

    clients: list[ClientKeyConfig] = field(init=False, repr=False)
    admin_digest: bytes | None = field(init=False, repr=False)

    def __post_init__(self) -> None:
        self.clients = []
        for i, entry in enumerate(self.client_keys):
            where = f"auth.client_keys[{i}]"
            if isinstance(entry, str):
                entry = {"key": entry}
            try:
                client = _build(ClientKeyConfig, entry, where)
            except ConfigError as err:
                message = str(err)
                raise ConfigError(
                    message if message.startswith(where) else f"{where}.{message}"
                ) from err
            client.name = client.name or f"client{i}"
            self.clients.append(client)
        names = [c.name for c in self.clients]
        if len(set(names)) != len(names):
            raise ConfigError("auth.client_keys: names must be unique")
        self.admin_digest = None
        if self.admin_key is not None:
            self.admin_digest = key_digest(self.admin_key, "auth.admin_key")

    def add_client_keys(self, keys: list[str], where: str) -> None:
        """Add router keys given outside the YAML (plain or ``sha256:``), each for every model.

        Args:
            keys: The keys.
            where: Where they come from, for errors (``ROUTER_CLIENT_KEYS``, ``--client-key``).

        Raises:
            ConfigError: A key is empty or a malformed digest (the message never quotes it).
        """
        for i, key in enumerate(keys):
            try:
                client = ClientKeyConfig(key=key, name=f"client{len(self.clients)}")
            except ConfigError as err:
                raise ConfigError(f"{where}[{i}]: {err}") from err
            self.clients.append(client)
        names = [c.name for c in self.clients]
        if len(set(names)) != len(names):
            raise ConfigError(f"{where}: a key's name client<N> is taken in auth.client_keys")


# Router keys from the environment, for containers without a YAML file: comma-separated, each
# plain or ``sha256:<hex>``, for every model; added to ``auth.client_keys``.
CLIENT_KEYS_VAR = "ROUTER_CLIENT_KEYS"


def client_keys_from_env() -> list[str]:
    """The router keys of ``ROUTER_CLIENT_KEYS`` (empty when it is unset)."""
    return [key.strip() for key in os.environ.get(CLIENT_KEYS_VAR, "").split(",") if key.strip()]


LOG_FORMATS = ("json", "text")


@dataclass
class LogConfig:
    format: str = "json"
    level: str = "INFO"

    def __post_init__(self) -> None:
        if self.format not in LOG_FORMATS:
            raise ConfigError(f"log.format: {self.format!r} is not one of json, text")
        self.level = self.level.upper()
        if self.level not in ("DEBUG", "INFO", "WARNING", "ERROR", "CRITICAL"):
            raise ConfigError(f"log.level: {self.level!r} is not a logging level")


@dataclass
class SharedStateConfig:
    """Key state shared by several router instances through Redis (see router/keys/redis_store.py):
    cooldowns, parking, disabled keys, in-flight counts and rpm/tpm budgets."""

    # redis://[:password@]host:port/db, rediss:// (TLS) or unix:///path?db=0; ${VAR} works.
    redis_url: str = field(repr=False)
    # Namespace of this router fleet's Redis keys and pub/sub channel.
    prefix: str = "smolvlm-router"
    # Each Redis call's connect and read timeout; past it the router serves on local state.
    timeout_s: float = 0.5
    # How often an instance says it is alive, and how long after its last word a dead
    # instance's in-flight requests stop counting against max_concurrent.
    heartbeat_s: float = 1.0
    instance_ttl_s: float = 5.0

    def __post_init__(self) -> None:
        # Imported here: only a config with shared state needs the Redis client.
        from redis.connection import parse_url

        # Messages never quote the URL: it may carry a password.
        try:
            parts = parse_url(self.redis_url)
        except ValueError as err:
            raise ConfigError(f"shared_state.redis_url: {err}") from err
        if not parts.get("host") and not parts.get("path"):
            raise ConfigError("shared_state.redis_url: names no host (or unix socket path)")
        url = urlsplit(self.redis_url)
        db = url.path.strip("/") if url.scheme != "unix" else ""
        if db and not db.isdigit():
            raise ConfigError(f"shared_state.redis_url: the database {db!r} is not a number")
        if not re.fullmatch(r"[A-Za-z0-9_.:-]+", self.prefix):
            raise ConfigError(
                f"shared_state.prefix: {self.prefix!r} must be letters, digits or _.:-"
            )
        for name in ("timeout_s", "heartbeat_s"):
            if getattr(self, name) <= 0:
                raise ConfigError(f"shared_state.{name}: must be > 0, got {getattr(self, name)}")
        if self.instance_ttl_s < 2 * self.heartbeat_s:
            raise ConfigError(
                f"shared_state.instance_ttl_s: must be at least twice heartbeat_s "
                f"({self.heartbeat_s}), got {self.instance_ttl_s}"
            )


@dataclass
class RequestLogConfig:
    """The request log (see router/request_log.py): metadata of every client request in SQLite,
    bodies only when ``bodies`` is true, every configured secret redacted."""

    # The SQLite file (WAL mode); ":memory:" keeps the log in this process only.
    path: str = ":memory:"
    bodies: bool = False
    # Retention: rows older than max_age_s go, then the oldest until the file is under max_bytes.
    max_age_s: float = 7 * 24 * 3600.0
    max_bytes: int = 256 * 1024 * 1024
    # Requests are buffered and written in batches this often, off the event loop.
    flush_s: float = 0.5

    def __post_init__(self) -> None:
        for name in ("max_age_s", "max_bytes", "flush_s"):
            if getattr(self, name) <= 0:
                raise ConfigError(f"request_log.{name}: must be > 0, got {getattr(self, name)}")


def hash_key(key: str) -> str:
    """The form of a router key stored in the config: ``sha256:<hex>``.

    Args:
        key: The plain key.
    """
    return "sha256:" + hashlib.sha256(key.encode()).hexdigest()


def key_digest(value: str, where: str) -> bytes:
    """The SHA-256 digest of a configured key: parsed from ``sha256:<hex>``, else of the plain
    key.

    Args:
        value: The configured string.
        where: The config key, for errors (which never quote the value).

    Raises:
        ConfigError: If the value is empty or a malformed ``sha256:`` digest.
    """
    if not value:
        raise ConfigError(f"{where}: must be a non-empty string")
    if value.startswith("sha256:"):
        digest = value.removeprefix("sha256:")
        if not re.fullmatch(r"[0-9a-fA-F]{64}", digest):
            raise ConfigError(f"{where}: a sha256: digest must be 64 hex digits")
        return bytes.fromhex(digest)
    return hashlib.sha256(value.encode()).digest()


# ---- routing rules, budgets and prices (router/rules.py, router/budgets.py) ------------------

# What a rule's ``media`` condition may ask for.
MEDIA_KINDS = ("image", "video", "audio")


@dataclass
class ConditionConfig:
    """A rule's ``when``: every key given must hold (none given: every request matches)."""

    # The request holds a medium of one of these kinds.
    media: list[str] | None = None
    # The prompt's estimated tokens exceed this number, or the context window of this
    # (local) provider.
    prompt_tokens_above: int | None = None
    exceeds_context_of: str | None = None
    # Tools given, JSON output asked for, streaming (true/false).
    tools: bool | None = None
    json_output: bool | None = None
    stream: bool | None = None
    # Request headers and their values (``"*"``: any value).
    headers: dict[str, str] = field(default_factory=dict)
    # The request carries the local-only header (`RoutingConfig.local_only_header`).
    local_only: bool | None = None
    # The client key's name or group, and the requested model (patterns: ``*``, ``gpt-*``).
    clients: list[str] | None = None
    groups: list[str] | None = None
    models: list[str] | None = None

    def matches_all(self) -> bool:
        """No key given (``stream: false`` or ``prompt_tokens_above: 0`` is a condition too)."""
        return all(value is None or value == {} for value in vars(self).values())


@dataclass
class SpilloverConfig:
    """Local first, cloud when the local provider is loaded: past any limit its targets go to
    the end of the rule's list, and they come back once the load is below ``resume_below`` of
    each limit (a fraction, so that the decision does not flap)."""

    provider: str
    # The router's requests in flight on the provider, its own queue (the local engine's
    # waiting requests) and the wait expected from them.
    max_in_flight: int | None = None
    max_queue: int | None = None
    max_wait_s: float | None = None
    resume_below: float = 0.5


@dataclass
class RuleConfig:
    """A routing rule: when its condition holds, its targets are tried in order, then its
    ``fallback`` targets (also used when the targets are over budget or their circuit open)."""

    name: str
    targets: list
    when: dict = field(default_factory=dict)
    fallback: list = field(default_factory=list)
    spillover: dict | None = None

    condition: ConditionConfig = field(init=False)
    target_list: list[Target] = field(init=False)
    fallback_list: list[Target] = field(init=False)
    spill: SpilloverConfig | None = field(init=False)


@dataclass
class BreakerConfig:
    """Per-provider circuit breaker: open after ``failures`` failures in a row (errors of the
    provider, not of a key or of the request), one probe after ``cooldown_s``."""

    failures: int = 5
    cooldown_s: float = 30.0

    def __post_init__(self) -> None:
        if self.failures < 1 or self.cooldown_s <= 0:
            raise ConfigError("routing.breaker: failures must be >= 1 and cooldown_s > 0")


@dataclass
class RoutingConfig:
    # The model name that only rules decide.
    auto_model: str = "auto"
    # A request with this header (any value but ``0``/``false``/``no``) is served only by
    # local providers (type mlx, or a base_url on loopback), whatever the rule.
    local_only_header: str = "x-local-only"
    rules: list[RuleConfig] = field(default_factory=list)
    breaker: BreakerConfig = field(default_factory=BreakerConfig)


@dataclass
class BudgetConfig:
    """A spend limit of one client key (by name), group of keys or provider, in tokens and/or
    USD per UTC day and month."""

    client: str | None = None
    group: str | None = None
    provider: str | None = None
    tokens_per_day: int | None = None
    tokens_per_month: int | None = None
    usd_per_day: float | None = None
    usd_per_month: float | None = None

    @property
    def scope(self) -> str:
        """``client:<name>``, ``group:<name>`` or ``provider:<name>``."""
        kind = "client" if self.client else "group" if self.group else "provider"
        return f"{kind}:{self.client or self.group or self.provider}"

    def limits(self) -> dict[str, float]:
        """The limits set, by ``{tokens|usd}_per_{day|month}``."""
        names = ("tokens_per_day", "tokens_per_month", "usd_per_day", "usd_per_month")
        return {n: getattr(self, n) for n in names if getattr(self, n) is not None}


@dataclass
class SpendConfig:
    """Where spend is kept: a SQLite file (without ``shared_state``), or Redis with it."""

    # Empty: ``$XDG_STATE_HOME/smolvlm-router/spend.sqlite3`` (``~/.local/state/...``).
    sqlite_path: str = ""

    def path(self) -> Path:
        """The SQLite file, its folder created."""
        if self.sqlite_path:
            path = Path(self.sqlite_path).expanduser()
        else:
            state = os.environ.get("XDG_STATE_HOME") or Path.home() / ".local" / "state"
            path = Path(state) / "smolvlm-router" / "spend.sqlite3"
        path.parent.mkdir(parents=True, exist_ok=True)
        return path


@dataclass
class PriceConfig:
    """USD per million input and output tokens."""

    input: float
    output: float

    def __post_init__(self) -> None:
        if self.input < 0 or self.output < 0:
            raise ConfigError("input and output must be >= 0 (USD per million tokens)")


def _routing_config(
    data: object,
    providers: dict[str, ProviderConfig],
    models: dict[str, list[Target]],
    auth: AuthConfig,
) -> RoutingConfig:
    """The ``routing`` section, each rule's targets and condition checked against the config."""
    data = data if data is not None else {}
    _require_mapping(data, "routing")
    data = dict(data)
    rules = data.pop("rules", [])
    if not isinstance(rules, list):
        raise ConfigError("routing.rules: expected a list of rules")
    breaker = _build(BreakerConfig, data.pop("breaker", None) or {}, "routing.breaker")
    routing = _build(RoutingConfig, data, "routing")
    routing.breaker = breaker
    if routing.auto_model in models:
        raise ConfigError(f"routing.auto_model: {routing.auto_model!r} is also a model alias")
    names: set[str] = set()
    for i, raw in enumerate(rules):
        where = f"routing.rules[{i}]"
        if routing.rules and routing.rules[-1].condition.matches_all():
            raise ConfigError(f"{where}: unreachable, rule {routing.rules[-1].name!r} matches all")
        rule = _rule_config(raw, where, providers, models, routing.auto_model, auth)
        if rule.name in names:
            raise ConfigError(f"{where}.name: {rule.name!r} is used by another rule")
        names.add(rule.name)
        routing.rules.append(rule)
    return routing


def is_local_provider(provider: ProviderConfig) -> bool:
    """Whether requests to a provider stay on this machine: its ``local`` setting, else the
    in-process model or a server on a loopback address.

    Args:
        provider: The provider's config.
    """
    if provider.local is not None:
        return provider.local
    return provider.type == "mlx" or _on_loopback(provider.base_url)


@lru_cache(maxsize=256)
def _on_loopback(url: str) -> bool:
    """Whether a URL's host is this machine (cached: every request's pricing asks)."""
    return is_loopback(urlsplit(url).hostname or "")


def is_loopback(host: str) -> bool:
    """Whether a host is this machine's loopback: ``localhost`` or a loopback address
    (``0.0.0.0``, ``::`` and other names are not).

    Args:
        host: A host name or address.
    """
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


def _rule_config(
    raw: object,
    where: str,
    providers: dict[str, ProviderConfig],
    models: dict[str, list[Target]],
    auto_model: str,
    auth: AuthConfig,
) -> RuleConfig:
    rule = _build(RuleConfig, raw, where)
    rule.condition = _build(ConditionConfig, rule.when, f"{where}.when")
    rule.target_list = _rule_targets(rule.targets, f"{where}.targets", providers, models)
    rule.fallback_list = _rule_targets(rule.fallback, f"{where}.fallback", providers, models)
    if not rule.target_list:
        raise ConfigError(f"{where}.targets: expected a non-empty list")
    _check_condition(rule.condition, f"{where}.when", providers, models, auto_model, auth)
    everything = rule.target_list + rule.fallback_list
    if rule.condition.local_only and not any(
        is_local_provider(providers[t.provider]) for t in everything
    ):
        raise ConfigError(f"{where}: local_only requests can never reach its cloud-only targets")
    rule.spill = None
    if rule.spillover is not None:
        rule.spill = _build(SpilloverConfig, rule.spillover, f"{where}.spillover")
        spill = rule.spill
        if spill.provider not in {t.provider for t in everything}:
            raise ConfigError(
                f"{where}.spillover.provider: {spill.provider!r} is not one of the rule's targets"
            )
        if spill.max_in_flight is None and spill.max_queue is None and spill.max_wait_s is None:
            raise ConfigError(
                f"{where}.spillover: set max_in_flight, max_queue or max_wait_s (or drop it)"
            )
        if not 0 < spill.resume_below <= 1:
            raise ConfigError(f"{where}.spillover.resume_below: must be within (0, 1]")
    return rule


def _rule_targets(
    entries: object, where: str, providers: dict[str, ProviderConfig], models: dict
) -> list[Target]:
    """A rule's targets: ``{provider, model}`` mappings, or model aliases (their whole list)."""
    if not isinstance(entries, list):
        raise ConfigError(f"{where}: expected a list of {{provider, model}} or model aliases")
    targets: list[Target] = []
    for i, entry in enumerate(entries):
        if isinstance(entry, str):
            if entry not in models:
                raise ConfigError(f"{where}[{i}]: unknown model alias {entry!r}")
            targets += models[entry]
            continue
        target = _build(Target, entry, f"{where}[{i}]")
        if target.provider not in providers:
            raise ConfigError(f"{where}[{i}].provider: unknown provider {target.provider!r}")
        targets.append(target)
    return targets


def _check_condition(
    when: ConditionConfig,
    where: str,
    providers: dict[str, ProviderConfig],
    models: dict,
    auto_model: str,
    auth: AuthConfig,
) -> None:
    """Refuse conditions that can never hold or name what the config does not have."""
    for name in ("media", "clients", "groups", "models"):
        if getattr(when, name) is not None and not getattr(when, name):
            raise ConfigError(f"{where}.{name}: an empty list never matches")
    unknown_media = sorted(set(when.media or ()) - set(MEDIA_KINDS))
    if unknown_media:
        raise ConfigError(
            f"{where}.media: unknown kind(s) {', '.join(map(str, unknown_media))}; "
            f"choose from {', '.join(MEDIA_KINDS)}"
        )
    if when.prompt_tokens_above is not None and when.prompt_tokens_above < 0:
        raise ConfigError(f"{where}.prompt_tokens_above: must be >= 0")
    if when.exceeds_context_of is not None:
        provider = providers.get(when.exceeds_context_of)
        if provider is None or provider.type != "mlx":
            raise ConfigError(
                f"{where}.exceeds_context_of: {when.exceeds_context_of!r} is not a provider "
                "of type mlx (the providers whose context window the router knows)"
            )
    for name, value in when.headers.items():
        if not isinstance(value, str):
            raise ConfigError(f'{where}.headers.{name}: expected a string value (or "*")')
    names = {c.name for c in auth.clients}
    for client in when.clients or ():
        if client not in names:
            raise ConfigError(f"{where}.clients: no client key is named {client!r}")
    groups = {c.group for c in auth.clients if c.group}
    for group in when.groups or ():
        if group not in groups:
            raise ConfigError(f"{where}.groups: no client key is in group {group!r}")
    for model in when.models or ():
        provider, sep, _ = str(model).partition("/")
        known = model == auto_model or model in models or (sep and provider in providers)
        if not known and not any(c in str(model) for c in "*?["):
            raise ConfigError(f"{where}.models: unknown model {model!r}")


def _budgets(data: object, providers: dict, auth: AuthConfig) -> list[BudgetConfig]:
    if not isinstance(data, list):
        raise ConfigError("budgets: expected a list of budgets")
    budgets = []
    names = {c.name for c in auth.clients}
    groups = {c.group for c in auth.clients if c.group}
    for i, raw in enumerate(data):
        where = f"budgets[{i}]"
        budget = _build(BudgetConfig, raw, where)
        owners = [n for n in ("client", "group", "provider") if getattr(budget, n) is not None]
        if len(owners) != 1:
            raise ConfigError(f"{where}: name exactly one of client, group or provider")
        known = {"client": names, "group": groups, "provider": set(providers)}[owners[0]]
        if getattr(budget, owners[0]) not in known:
            raise ConfigError(f"{where}.{owners[0]}: unknown {owners[0]} {budget.scope!r}")
        if not budget.limits():
            raise ConfigError(f"{where}: set tokens_per_day/month or usd_per_day/month")
        for name, value in budget.limits().items():
            if value <= 0:
                raise ConfigError(f"{where}.{name}: must be > 0, got {value}")
        budgets.append(budget)
    return budgets


def _prices(data: object) -> dict[str, PriceConfig]:
    _require_mapping(data, "pricing")
    prices = {}
    for model, raw in data.items():
        where = f"pricing.{model}"
        try:
            prices[str(model)] = _build(PriceConfig, raw, where)
        except ConfigError as err:
            message = str(err)
            raise ConfigError(
                message if message.startswith(where) else f"{where}: {message}"
            ) from err
    return prices


@dataclass
class Config:
    providers: dict[str, ProviderConfig]
    models: dict[str, list[Target]]
    listen: ListenConfig = field(default_factory=ListenConfig)
    limits: LimitsConfig = field(default_factory=LimitsConfig)
    media: MediaConfig = field(default_factory=MediaConfig)
    retry: RetryConfig = field(default_factory=RetryConfig)
    auth: AuthConfig = field(default_factory=AuthConfig)
    timeouts: TimeoutsConfig = field(default_factory=TimeoutsConfig)
    # On SIGTERM/SIGINT, in-flight requests get this long to finish.
    shutdown_grace_s: float = 30.0
    log: LogConfig = field(default_factory=LogConfig)
    # Redis-backed key state shared with other instances (None: this process's memory only).
    shared_state: SharedStateConfig | None = None
    request_log: RequestLogConfig = field(default_factory=RequestLogConfig)
    # Routing rules, budgets, where spend is kept and price overrides (router/rules.py,
    # router/budgets.py, router/pricing.py).
    routing: RoutingConfig = field(default_factory=RoutingConfig)
    budgets: list[BudgetConfig] = field(default_factory=list)
    spend: SpendConfig = field(default_factory=SpendConfig)
    pricing: dict[str, PriceConfig] = field(default_factory=dict)
    # Worker processes sharing the listening port (None: see `router.workers.worker_count`).
    workers: int | None = None

    @classmethod
    def from_dict(cls, data: dict) -> Config:
        """Build and validate a config from parsed YAML.

        Args:
            data: The mapping (``${VAR}`` already expanded).

        Raises:
            ConfigError: On a missing or unknown key, a wrong type, an unknown provider type
                or a model that names an undefined provider.
        """
        _require_mapping(data, "config")
        sections = {"listen", "providers", "models", "limits", "media", "retry", "auth"}
        sections |= {
            "timeouts",
            "shutdown_grace_s",
            "log",
            "shared_state",
            "request_log",
            "workers",
        }
        sections |= {"routing", "budgets", "spend", "pricing"}
        _reject_unknown(data, sections, "config")
        listen = _build(ListenConfig, data.get("listen") or {}, "listen")
        limits = _build(LimitsConfig, data.get("limits") or {}, "limits")
        media = _build(MediaConfig, data.get("media") or {}, "media")
        retry = _build(RetryConfig, data.get("retry") or {}, "retry")
        auth = _build(AuthConfig, data.get("auth") or {}, "auth")
        timeouts = _build(TimeoutsConfig, data.get("timeouts") or {}, "timeouts")
        log = _build(LogConfig, data.get("log") or {}, "log")
        request_log = _build(RequestLogConfig, data.get("request_log") or {}, "request_log")
        shared = data.get("shared_state")
        if shared is not None:
            shared = _build(SharedStateConfig, shared, "shared_state")
        workers = data.get("workers")
        if workers is not None and (type(workers) is not int or workers < 1):
            raise ConfigError(f"workers: must be an integer >= 1, got {workers!r}")
        grace = data.get("shutdown_grace_s", 30.0)
        _check_type(grace, "float", "shutdown_grace_s")
        if grace < 0:
            raise ConfigError(f"shutdown_grace_s: must be >= 0, got {grace}")
        raw_providers = data.get("providers")
        _require_mapping(raw_providers, "providers")
        providers = {}
        for name, raw in raw_providers.items():
            where = f"providers.{name}"
            _require_mapping(raw, where)
            if "type" not in raw:
                raise ConfigError(f"{where}: missing required key 'type'")
            raw = {**raw, "name": str(name)}
            mlx = raw.pop("mlx", None)
            raw.setdefault("connect_timeout_s", timeouts.connect_s)
            provider = _build(ProviderConfig, raw, where)
            if provider.type == "mlx":
                provider.mlx = _mlx_config(mlx or {}, f"{where}.mlx")
            elif mlx is not None:
                raise ConfigError(f"{where}.mlx: only providers of type 'mlx' take this key")
            if importlib.util.find_spec(f"router.providers.{provider.type}") is None:
                raise ConfigError(f"{where}.type: unknown provider type {provider.type!r}")
            providers[str(name)] = provider
        raw_models = data.get("models")
        _require_mapping(raw_models, "models")
        models = {}
        for alias, targets in raw_models.items():
            where = f"models.{alias}"
            if not isinstance(targets, list) or not targets:
                raise ConfigError(f"{where}: expected a non-empty list of {{provider, model}}")
            built = [_build(Target, t, f"{where}[{i}]") for i, t in enumerate(targets)]
            for i, target in enumerate(built):
                if target.provider not in providers:
                    raise ConfigError(
                        f"{where}[{i}].provider: unknown provider {target.provider!r}"
                    )
            models[str(alias)] = built
        routing = _routing_config(data.get("routing"), providers, models, auth)
        budgets = _budgets(data.get("budgets") or [], providers, auth)
        spend = _build(SpendConfig, data.get("spend") or {}, "spend")
        pricing = _prices(data.get("pricing") or {})
        return cls(
            providers=providers,
            models=models,
            listen=listen,
            limits=limits,
            media=media,
            retry=retry,
            auth=auth,
            timeouts=timeouts,
            shutdown_grace_s=float(grace),
            log=log,
            shared_state=shared,
            request_log=request_log,
            routing=routing,
            budgets=budgets,
            spend=spend,
            pricing=pricing,
            workers=workers,
        )


def default_config() -> Config:
    """The configuration of ``smolvlm-router`` without ``--config``.

    The local model ``smolvlm2-256m`` is SmolVLM2-256M-Video-Instruct when it is in the
    Hugging Face cache, else a random-weight checkpoint of its architecture. Each cloud provider
    whose API key variable is set (``OPENAI_API_KEY``, ``ANTHROPIC_API_KEY``, ``GEMINI_API_KEY``)
    is added too; clients reach its models as ``provider/model`` (``openai/gpt-4o-mini``).
    """
    providers: dict = {
        "local": {
            "type": "mlx",
            "mlx": {"model": LOCAL_MODEL, "random_weights_fallback": True, "dtype": "float32"},
        }
    }
    for kind, var in CLOUD_KEY_VARS.items():
        if os.environ.get(var):
            providers[kind] = {"type": kind, "keys": [os.environ[var]]}
    models = {LOCAL_MODEL_ALIAS: [{"provider": "local", "model": LOCAL_MODEL_ALIAS}]}
    return Config.from_dict({"providers": providers, "models": models})


def expand_env(value: object, where: str = "config") -> object:
    """Replace ``${VAR}`` in every string of a parsed YAML tree.

    Args:
        value: A parsed YAML value.
        where: Dotted location, for error messages.

    Raises:
        ConfigError: If a referenced variable is not set.
    """
    if isinstance(value, dict):
        return {k: expand_env(v, f"{where}.{k}") for k, v in value.items()}
    if isinstance(value, list):
        return [expand_env(v, f"{where}[{i}]") for i, v in enumerate(value)]
    if isinstance(value, str):

        def lookup(match: re.Match) -> str:
            name = match.group(1)
            if name not in os.environ:
                raise ConfigError(f"{where}: environment variable {name} is not set")
            return os.environ[name]

        return _VAR.sub(lookup, value)
    return value


def load_config(path: str | Path) -> Config:
    """Read a YAML config file.

    Args:
        path: The YAML file.

    Raises:
        ConfigError: If the file is missing, is not valid YAML, or fails validation.
    """
    path = Path(path)
    try:
        data = yaml.safe_load(path.read_text())
    except OSError as err:
        raise ConfigError(f"{path}: cannot read config: {err}") from err
    except yaml.YAMLError as err:
        raise ConfigError(f"{path}: invalid YAML: {err}") from err
    try:
        return Config.from_dict(expand_env(data))
    except ConfigError as err:
        raise ConfigError(f"{path}: {err}") from err


def _require_mapping(value: object, where: str) -> None:
    if not isinstance(value, dict):
        raise ConfigError(f"{where}: expected a mapping, got {type(value).__name__}")


def _reject_unknown(data: dict, allowed: set[str], where: str) -> None:
    unknown = sorted(set(map(str, data)) - allowed)
    if unknown:
        raise ConfigError(f"{where}: unknown key(s) {', '.join(unknown)}")


_TYPES = {"int": int, "float": (int, float), "str": str, "bool": bool}


def _build(cls: type, data: object, where: str) -> object:
    """Instantiate a config dataclass strictly: unknown keys, missing keys, wrong types fail."""
    _require_mapping(data, where)
    fields = {f.name: f for f in dataclasses.fields(cls) if f.init}
    _reject_unknown(data, set(fields), where)
    for name, f in fields.items():
        required = f.default is dataclasses.MISSING and f.default_factory is dataclasses.MISSING
        if required and name not in data:
            raise ConfigError(f"{where}: missing required key {name!r}")
        if name in data:
            _check_type(data[name], str(f.type), f"{where}.{name}")
    return cls(**data)


def _mlx_config(data: object, where: str) -> MLXConfig:
    """The ``mlx`` mapping: the provider's own keys and, beside them, the engine's."""
    from mlx_smolvlm.engine import EngineConfig  # only now: see `_default_engine_config`

    _require_mapping(data, where)
    engine_keys = {f.name for f in dataclasses.fields(EngineConfig)}
    own_keys = {f.name for f in dataclasses.fields(MLXConfig)} - {"engine"}
    _reject_unknown(data, own_keys | engine_keys, where)
    own = {key: value for key, value in data.items() if key in own_keys}
    engine = {key: value for key, value in data.items() if key in engine_keys}
    try:
        engine_config = _build(EngineConfig, engine, where)
    except ConfigError:
        raise  # a missing key or a wrong type, named already
    except ValueError as err:  # a value out of range, as `EngineConfig` checks it
        raise ConfigError(f"{where}: {err}") from err
    config = _build(MLXConfig, own, where)
    config.engine = engine_config
    return config


def _key_config(entry: object, where: str) -> KeyConfig:
    """One entry of a provider's ``keys``: a string, or a mapping with ``key`` and limits."""
    if isinstance(entry, str):
        entry = {"key": entry}
    try:
        return _build(KeyConfig, entry, where)
    except ConfigError as err:
        message = str(err)
        raise ConfigError(message if message.startswith(where) else f"{where}.{message}") from err


def _check_type(value: object, annotation: str, where: str) -> None:
    base = annotation.replace(" | None", "")
    if value is None and "None" in annotation:
        return
    if base.startswith("list"):
        ok = isinstance(value, list)
    elif base.startswith("dict"):
        ok = isinstance(value, dict)
    else:
        expected = _TYPES[base]
        ok = isinstance(value, expected) and not (isinstance(value, bool) and base != "bool")
    if not ok:
        raise ConfigError(f"{where}: expected {base}, got {type(value).__name__}")
