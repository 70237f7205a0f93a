"""The processes under test, started on loopback: the fake provider, our router and the
LiteLLM proxy (installed in its own virtual environment on first use), each with the same
upstream keys, plus CPU pinning and readiness checks."""

from __future__ import annotations

import asyncio
import logging
import os
import shutil
import socket
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path

import aiohttp
import yaml

from benchmarks.fake_provider import FakeConfig
from benchmarks.loadgen import ANSWER, CLIENT_KEY, send
from benchmarks.procfs import tree_rss

logger = logging.getLogger(__name__)

# Where the gateways and the fake run (``python -m router`` needs the project on its path).
REPO_ROOT = Path(__file__).resolve().parent.parent
LITELLM_VERSION = "1.106.2"
LITELLM_VENV = Path.home() / ".cache" / "mlx_smolvlm" / "litellm-venv"
# The keys both gateways send to the fake (which checks none).
API_KEYS = ("bench-key-a", "bench-key-b")
PLAIN_MODEL, STREAM_MODEL = "bench-openai", "bench-anthropic"
# LiteLLM's production settings (docs.litellm.ai/docs/proxy/prod), no database: what the
# router does not do is off.
LITELLM_SETTINGS = {
    "litellm_settings": {"set_verbose": False, "json_logs": True, "request_timeout": 600},
    "general_settings": {
        "disable_spend_logs": True,
        "disable_error_logs": True,
        "allow_requests_on_db_unavailable": True,
        # LiteLLM refuses to start without one; the router gets the same client key.
        "master_key": CLIENT_KEY,
    },
    "router_settings": {"routing_strategy": "simple-shuffle"},
}
LITELLM_ENV = {"LITELLM_LOG": "ERROR", "LITELLM_MODE": "PRODUCTION"}
# LiteLLM with several workers takes minutes to start on a busy 2-CPU machine.
START_TIMEOUT_S = 300.0


class PeerUnavailable(RuntimeError):
    """A system could not be installed or started, or died; the message says why.

    Args:
        message: Why.
        rows: What was measured before it died.
    """

    def __init__(self, message: str, rows: list[dict] | None = None) -> None:
        super().__init__(message)
        self.rows = rows or []


def free_port() -> int:
    """A TCP port on loopback that is free right now."""
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


# The CPUs this process may use before the benchmark pins itself to the load generator's.
MACHINE_CPUS = os.sched_getaffinity(0)


def _affinity(cpus: set[int] | None) -> Callable[[], None]:
    # A child inherits its parent's affinity: "any CPU" must be set explicitly, or a gateway
    # with several workers would share the load generator's CPUs only.
    return lambda: os.sched_setaffinity(0, cpus or MACHINE_CPUS)


@dataclass
class Server:
    """A server process under test.

    Args:
        name: The system's name.
        proc: The process.
        url: Its root URL.
        spawned: ``time.monotonic()`` at spawn.
        log: Where its output goes.
    """

    name: str
    proc: subprocess.Popen
    url: str
    spawned: float
    log: Path
    cold_start_s: float | None = None
    rss_peak_bytes: int = 0
    rss_samples: list[tuple[float, int]] = field(default_factory=list)

    def stop(self) -> None:
        """Terminate the process (and kill it if it lingers)."""
        if self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(10)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()


async def sample_rss(server: Server, interval_s: float = 0.1) -> None:
    """Record ``server``'s RSS every ``interval_s`` until cancelled.

    Args:
        server: The server (its peak and samples are updated).
        interval_s: Sampling period.
    """
    while server.proc.poll() is None:
        rss = tree_rss(server.proc.pid)
        server.rss_samples.append((time.monotonic(), rss))
        server.rss_peak_bytes = max(server.rss_peak_bytes, rss)
        await asyncio.sleep(interval_s)


def start_fake(config: FakeConfig, cpus: set[int] | None, workdir: Path) -> Server:
    """Start `benchmarks.fake_provider` in its own process.

    Args:
        config: What it answers and which faults it injects.
        cpus: CPUs to run on (None: any).
        workdir: Where its log goes.

    Raises:
        PeerUnavailable: If it does not report its port.
    """
    log = workdir / "fake.log"
    args = [sys.executable, "-m", "benchmarks.fake_provider", "--port", "0"]
    args += ["--chunks", str(config.chunks), "--chunk-interval", str(config.chunk_interval_s)]
    args += ["--fault-rate", str(config.fault_rate), "--faults", ",".join(config.faults)]
    args += ["--seed", str(config.seed), "--slow", str(config.slow_s)]
    args += ["--retry-after-ms", str(config.retry_after_ms)]
    with log.open("w") as err:
        proc = subprocess.Popen(
            args,
            stdout=subprocess.PIPE,
            stderr=err,
            text=True,
            cwd=REPO_ROOT,
            preexec_fn=_affinity(cpus),
        )
    line = proc.stdout.readline()
    if not line.startswith("listening on "):
        proc.kill()
        raise PeerUnavailable(f"fake provider did not start: {log.read_text()[-2000:]}")
    port = int(line.rsplit(":", 1)[1])
    return Server("fake", proc, f"http://127.0.0.1:{port}", time.monotonic(), log)


def router_config(fake_url: str, port: int, soak: bool = False) -> dict:
    """The router's config: one provider per upstream format, both at the fake.

    For the soak each model also falls back to a second provider at the fake, each provider
    has four keys, and the first byte must come within 0.5 s.

    Args:
        fake_url: The fake's root URL.
        port: The router's port.
        soak: Make faults survivable (fallback targets, more keys, a short first-byte limit).
    """
    keys = [f"{k}-{i}" for k in API_KEYS for i in range(2)] if soak else list(API_KEYS)
    providers, models = {}, {}
    for model, kind, base, upstream in (
        (PLAIN_MODEL, "openai", f"{fake_url}/v1", "fake-model"),
        (STREAM_MODEL, "anthropic", fake_url, "claude-fake"),
    ):
        names = [f"fake-{kind}", f"fake-{kind}-fallback"] if soak else [f"fake-{kind}"]
        for name in names:
            providers[name] = {"type": kind, "base_url": base, "keys": keys}
        models[model] = [{"provider": name, "model": upstream} for name in names]
    config = {"listen": {"host": "127.0.0.1", "port": port}, "providers": providers}
    config["auth"] = {"client_keys": [{"key": CLIENT_KEY, "name": "bench"}]}
    config["models"] = models
    if soak:
        config["timeouts"] = {"first_byte_s": 0.5}
    return config


def litellm_config(fake_url: str) -> dict:
    """LiteLLM's config: two deployments (one per key) of each model, at the fake.

    Args:
        fake_url: The fake's root URL.
    """
    model_list = []
    for key in API_KEYS:
        params = {"model": "openai/fake-model", "api_base": f"{fake_url}/v1", "api_key": key}
        model_list.append({"model_name": PLAIN_MODEL, "litellm_params": params})
        params = {"model": "anthropic/claude-fake", "api_base": fake_url, "api_key": key}
        model_list.append({"model_name": STREAM_MODEL, "litellm_params": params})
    return {"model_list": model_list, **LITELLM_SETTINGS}


def litellm_executable(explicit: str | None) -> str:
    """The ``litellm`` command: ``explicit``, else the benchmark's own virtual environment
    (created with ``litellm[proxy]=={LITELLM_VERSION}`` on first use).

    Args:
        explicit: A path given with ``--litellm``.

    Raises:
        PeerUnavailable: If it is missing or cannot be installed.
    """
    if explicit:
        if not os.access(explicit, os.X_OK):
            raise PeerUnavailable(f"--litellm {explicit}: not an executable file")
        return explicit
    exe = LITELLM_VENV / "bin" / "litellm"
    if exe.exists():
        return str(exe)
    logger.info("installing litellm[proxy]==%s into %s (once)", LITELLM_VERSION, LITELLM_VENV)
    python = shutil.which("python3") or sys.executable
    steps = [
        [python, "-m", "venv", str(LITELLM_VENV)],
        [str(LITELLM_VENV / "bin" / "pip"), "install", "-q", f"litellm[proxy]=={LITELLM_VERSION}"],
    ]
    for step in steps:
        done = subprocess.run(step, capture_output=True, text=True, check=False)
        if done.returncode != 0:
            shutil.rmtree(LITELLM_VENV, ignore_errors=True)
            raise PeerUnavailable(
                f"cannot install LiteLLM ({' '.join(step[:4])} failed): {done.stderr[-1500:]}"
            )
    return str(exe)


def _spawn(
    name: str,
    args: list[str],
    url: str,
    workdir: Path,
    cpus: set[int] | None,
    env: dict[str, str] | None = None,
) -> Server:
    log = workdir / f"{name}.log"
    with log.open("w") as out:
        proc = subprocess.Popen(
            args,
            stdout=out,
            stderr=subprocess.STDOUT,
            cwd=REPO_ROOT,
            env={**os.environ, **(env or {})},
            preexec_fn=_affinity(cpus),
        )
    return Server(name, proc, url, time.monotonic(), log)


def start_router(
    fake_url: str, workdir: Path, cpus: set[int] | None, soak: bool = False, workers: int = 1
) -> Server:
    """Start ``python -m router`` with `router_config`.

    Args:
        fake_url: The fake's root URL.
        workdir: Where its config and log go.
        cpus: CPUs to run on (None: any).
        soak: Use the soak config.
        workers: Its worker processes (``--workers``).
    """
    port = free_port()
    path = workdir / ("router-soak.yaml" if soak else "router.yaml")
    path.write_text(yaml.safe_dump(router_config(fake_url, port, soak)))
    args = [sys.executable, "-m", "router", "--config", str(path), "--workers", str(workers)]
    return _spawn("router", args, f"http://127.0.0.1:{port}", workdir, cpus)


def start_floor(fake_url: str, workdir: Path, cpus: set[int] | None) -> Server:
    """Start `benchmarks.floor_proxy` (one process) in front of the fake.

    Args:
        fake_url: The fake's root URL.
        workdir: Where its log goes.
        cpus: CPUs to run on (None: any).
    """
    port = free_port()
    args = [sys.executable, "-m", "benchmarks.floor_proxy", fake_url, str(port)]
    return _spawn("floor", args, f"http://127.0.0.1:{port}", workdir, cpus)


def start_litellm(
    exe: str, fake_url: str, workdir: Path, cpus: set[int] | None, workers: int = 1
) -> Server:
    """Start the LiteLLM proxy with `litellm_config`.

    Args:
        exe: The ``litellm`` executable.
        fake_url: The fake's root URL.
        workdir: Where its config and log go.
        cpus: CPUs to run on (None: any).
        workers: Its ``--num_workers``.
    """
    port = free_port()
    path = workdir / "litellm.yaml"
    path.write_text(yaml.safe_dump(litellm_config(fake_url)))
    args = [exe, "--config", str(path), "--host", "127.0.0.1", "--port", str(port)]
    args += ["--num_workers", str(workers)]
    return _spawn("litellm", args, f"http://127.0.0.1:{port}", workdir, cpus, LITELLM_ENV)


async def wait_ready(server: Server, session: aiohttp.ClientSession, pieces: int) -> None:
    """Send a real request every 20 ms until one is answered; sets ``cold_start_s``.

    Args:
        server: The server (spawned moments ago).
        session: A client session.
        pieces: Text pieces of a complete answer.

    Raises:
        PeerUnavailable: If the process exits or nothing answers within START_TIMEOUT_S.
    """
    while time.monotonic() - server.spawned < START_TIMEOUT_S:
        if server.proc.poll() is not None:
            raise PeerUnavailable(
                f"{server.name} exited with status {server.proc.returncode}: "
                f"{server.log.read_text()[-2000:]}"
            )
        sample = await send(session, server.url, "openai", PLAIN_MODEL, False, "ready", pieces, 5.0)
        if sample.outcome == ANSWER:
            server.cold_start_s = time.monotonic() - server.spawned
            return
        await asyncio.sleep(0.02)
    raise PeerUnavailable(f"{server.name} did not answer within {START_TIMEOUT_S:g} s")


@contextmanager
def temporary_workdir() -> Iterator[Path]:
    """A temporary folder for the configs and logs of one run."""
    with tempfile.TemporaryDirectory(prefix="router-overhead-") as tmp:
        yield Path(tmp)


def cpu_plan(pin: bool) -> tuple[set[int] | None, set[int] | None]:
    """CPUs for the gateway, and for the fake plus the load generator (None: unpinned).

    Args:
        pin: Whether to pin at all (needs two or more CPUs).
    """
    cpus = sorted(os.sched_getaffinity(0))
    if not pin or len(cpus) < 2:
        return None, None
    return {cpus[-1]}, set(cpus[:-1])
