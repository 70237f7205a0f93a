"""Several worker processes behind one port: ``--workers N`` or ``workers:`` in the config.

The supervisor (the process the user started) starts N workers, each ``python -m router``
with the same arguments and its own event loop, app and listening socket, all bound to one
port with ``SO_REUSEPORT`` so that the kernel spreads connections among them. It:

- restarts a worker that dies (logged), unless it failed as it started (a port already in
  use, a backend that cannot start): then it stops them all with that status;
- forwards SIGHUP (each worker reloads the config file) and SIGTERM/SIGINT (each stops
  accepting and finishes its requests within ``shutdown_grace_s``) to every worker;
- runs the `KeyCoordinator` that shares the key state (cooldowns, disabled keys,
  ``max_concurrent``, ``rpm``/``tpm``) exactly among its workers when no Redis
  ``shared_state`` is configured (with one, the workers share it through Redis like separate
  instances do);
- gives the workers one Prometheus multiprocess directory, so that each worker's ``/metrics``
  shows the sum over all workers (a dead worker's gauges are dropped).

A worker learns its role from the environment the supervisor sets (`WORKER_VAR`,
`COORDINATOR_VAR` and prometheus_client's ``PROMETHEUS_MULTIPROC_DIR``).
"""

from __future__ import annotations

import asyncio
import gc
import logging
import os
import secrets
import shutil
import signal
import sys
import tempfile
import time
from collections.abc import Coroutine
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from .config import Config, ConfigError
from .console.session import SECRET_VAR
from .keys.local_store import KeyCoordinator
from .metrics import MULTIPROC_VAR
from .spend_store import SQLiteSpendStore

logger = logging.getLogger(__name__)

# Set in each worker's environment: its index, and the coordinator's socket ('' : none).
WORKER_VAR = "ROUTER_WORKER"
COORDINATOR_VAR = "ROUTER_KEY_COORDINATOR"
# A worker that exits within this long of its start failed to start: no restart.
START_S = 5.0
# Pause before a dead worker is started again (a crash loop stays slow).
RESTART_DELAY_S = 0.5
# How often a worker checks that its supervisor is alive.
PARENT_CHECK_S = 0.5
# Beyond shutdown_grace_s, how long stopping workers get before they are killed.
KILL_AFTER_S = 5.0


@dataclass(frozen=True)
class WorkerRole:
    """What a worker process was told by its supervisor.

    Args:
        index: Its number, from 0.
        coordinator: The key coordinator's Unix socket ('' : key state shared on Redis).
    """

    index: int
    coordinator: str


def worker_role() -> WorkerRole | None:
    """This process's role as a worker, or None when it is no worker of a supervisor."""
    index = os.environ.get(WORKER_VAR)
    if index is None:
        return None
    return WorkerRole(int(index), os.environ.get(COORDINATOR_VAR, ""))


async def watch_supervisor(stop: asyncio.Event) -> None:
    """In a worker: set ``stop`` once the supervisor is gone (killed: nothing would restart,
    signal or stop this worker any more), checked every `PARENT_CHECK_S`.

    Args:
        stop: The worker's stop event.
    """
    parent = os.getppid()
    while os.getppid() == parent:
        await asyncio.sleep(PARENT_CHECK_S)
    logger.error("the supervisor (pid %d) is gone: stopping this worker", parent)
    stop.set()


def usable_cpus() -> int:
    """The CPUs this process may run on (all of the machine's where that cannot be asked)."""
    if hasattr(os, "sched_getaffinity"):  # Linux
        return len(os.sched_getaffinity(0))
    return os.cpu_count() or 1


def worker_count(cfg: Config, requested: int | None) -> int:
    """How many workers serve ``cfg``: ``requested`` (``--workers``), else ``cfg.workers``,
    else the CPUs this process may use, or 1 when the local model is served in-process.

    Args:
        cfg: The config.
        requested: ``--workers`` (None: not given).

    Raises:
        ConfigError: More than one worker for a config with a local model (it owns the
            accelerator and its memory), or fewer than one.
    """
    local = any(p.type == "mlx" for p in cfg.providers.values())
    count = requested if requested is not None else cfg.workers
    if count is None:
        return 1 if local else usable_cpus()
    if count < 1:
        raise ConfigError(f"workers: must be >= 1, got {count}")
    if count > 1 and local:
        raise ConfigError(
            f"workers: {count} asked, but a config with a local model (type: mlx) runs in one "
            "process: the model owns the accelerator"
        )
    return count


# Python collects its youngest generation every 700 net allocations: under load the objects
# of the requests in flight keep it running (1,500 times in 10 s at concurrency 100), and its
# full passes also walk every object loaded at start, stalling the loop for ~30 ms each.
# Requests' reference cycles are still collected, this many allocations apart.
GC_YOUNG_THRESHOLD = 10_000


def tune_gc() -> None:
    """Exempt what is loaded so far (modules, config, app) from the garbage collector's
    passes, and collect the young generation less often (call once serving starts)."""
    gc.freeze()
    gc.set_threshold(GC_YOUNG_THRESHOLD, *gc.get_threshold()[1:])


def run_event_loop(main: Coroutine[Any, Any, None]) -> None:
    """Run ``main`` on uvloop where it is installed (Linux, macOS), else on asyncio's loop.

    Args:
        main: The coroutine to run to completion.
    """
    try:
        import uvloop
    except ImportError:
        asyncio.run(main)
        return
    uvloop.run(main)


def supervise(cfg: Config, argv: list[str], count: int) -> int:
    """Run ``count`` workers with ``argv`` until SIGTERM or SIGINT.

    Args:
        cfg: The config (its ``shared_state`` and ``shutdown_grace_s``).
        argv: The router's command-line arguments, given to each worker.
        count: How many workers.

    Returns:
        0, or the status of a worker that failed as it started.
    """
    workdir = Path(tempfile.mkdtemp(prefix="smolvlm-router-"))
    try:
        return asyncio.run(Supervisor(cfg, argv, count, workdir).run())
    finally:
        shutil.rmtree(workdir, ignore_errors=True)


class Supervisor:
    """Starts, restarts and signals the workers, and runs their key coordinator.

    Args:
        cfg: The config.
        argv: The workers' command-line arguments.
        count: How many workers.
        workdir: A private directory for the coordinator's socket and the metrics files.
    """

    def __init__(self, cfg: Config, argv: list[str], count: int, workdir: Path) -> None:
        self.argv = argv
        self.count = count
        self.grace = cfg.shutdown_grace_s
        self.metrics_dir = workdir / "metrics"
        self.metrics_dir.mkdir()
        self.socket = "" if cfg.shared_state is not None else str(workdir / "keys.sock")
        # The workers' shared spend file (Redis holds spend with shared_state).
        self.spend_path = str(cfg.spend.path()) if cfg.shared_state is None else None
        # One console session secret for all workers, or a login made on one bounces off the others.
        self.console_secret = os.environ.get(SECRET_VAR) or secrets.token_hex(32)
        self.procs: dict[int, asyncio.subprocess.Process] = {}
        self.stopping = asyncio.Event()
        self.status = 0

    async def run(self) -> int:
        """Serve until stopped; returns the exit status."""
        if self.spend_path is not None:
            await SQLiteSpendStore.prepare(self.spend_path)
        coordinator = KeyCoordinator(self.socket) if self.socket else None
        if coordinator is not None:
            await coordinator.start()
        loop = asyncio.get_running_loop()
        for sig in (signal.SIGTERM, signal.SIGINT):
            loop.add_signal_handler(sig, self.stopping.set)
        loop.add_signal_handler(signal.SIGHUP, self._forward, signal.SIGHUP)
        logger.info(
            "supervisor %d: %d workers, key state %s",
            os.getpid(),
            self.count,
            "on Redis" if coordinator is None else f"shared through {self.socket}",
        )
        watchers = [loop.create_task(self._keep(index)) for index in range(self.count)]
        try:
            await self.stopping.wait()
            self._forward(signal.SIGTERM)
            await asyncio.wait(watchers, timeout=self.grace + KILL_AFTER_S)
            for proc in self.procs.values():
                if proc.returncode is None:
                    logger.warning("worker %d did not stop in time: killed", proc.pid)
                    proc.kill()
            await asyncio.gather(*watchers, return_exceptions=True)
        finally:
            for sig in (signal.SIGTERM, signal.SIGINT, signal.SIGHUP):
                loop.remove_signal_handler(sig)
            if coordinator is not None:
                await coordinator.close()
        logger.info("supervisor: all workers stopped")
        return self.status

    async def _keep(self, index: int) -> None:
        """Run worker ``index``, starting it again whenever it dies, until stopping."""
        env = {**os.environ, WORKER_VAR: str(index), COORDINATOR_VAR: self.socket}
        env[MULTIPROC_VAR] = str(self.metrics_dir)
        env[SECRET_VAR] = self.console_secret
        while not self.stopping.is_set():
            started = time.monotonic()
            proc = await asyncio.create_subprocess_exec(
                sys.executable, "-m", "router", *self.argv, env=env
            )
            self.procs[index] = proc
            status = await proc.wait()
            _mark_dead(proc.pid, self.metrics_dir)
            if self.stopping.is_set():
                return
            if status > 0 and time.monotonic() - started < START_S:
                logger.error("worker %d failed as it started (status %d): stopping", index, status)
                self.status = status
                self.stopping.set()
                return
            logger.warning(
                "worker %d (pid %d) exited with status %d: starting it again",
                index,
                proc.pid,
                status,
            )
            await asyncio.sleep(RESTART_DELAY_S)

    def _forward(self, sig: signal.Signals) -> None:
        for proc in self.procs.values():
            if proc.returncode is None:
                proc.send_signal(sig)


def _mark_dead(pid: int, metrics_dir: Path) -> None:
    """Drop a dead worker's live gauges from the aggregated metrics (its counters stay)."""
    from prometheus_client import multiprocess

    multiprocess.mark_process_dead(pid, str(metrics_dir))
