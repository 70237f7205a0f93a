"""Command line: ``smolvlm-router [--config router.yaml]`` or ``python -m router``, and
``smolvlm-router hash-key`` to make the stored form of a router key.

Without ``--config`` the router runs `default_config`: the local SmolVLM2-256M model (random
weights, said loudly, when the real one cannot be had) plus every cloud provider whose API key
variable is set. ``--model PATH_OR_HUB_ID`` serves that one local model alone. Client keys
come from the config, ``ROUTER_CLIENT_KEYS`` and ``--client-key``.

Signals: SIGHUP reloads the config file (an invalid one is logged and the running config
kept); SIGTERM and SIGINT stop accepting connections and give in-flight requests up to
``shutdown_grace_s`` to finish.
"""

from __future__ import annotations

import argparse
import asyncio
import dataclasses
import getpass
import logging
import os
import signal
import sys
from collections.abc import Callable
from functools import partial
from pathlib import Path

from aiohttp import web

from .app import create_app
from .auth import check_bind
from .config import (
    CLIENT_KEYS_VAR,
    Config,
    ConfigError,
    LogConfig,
    client_keys_from_env,
    default_config,
    hash_key,
    load_config,
)
from .handlers import list_endpoints
from .keys.local_store import KEY_COORDINATOR
from .logs import configure_logging, secrets_of
from .reload import CONFIG_LOADER, RELOAD_HOOKS, RELOAD_OTHERS, reload_on_signal
from .workers import (
    run_event_loop,
    supervise,
    tune_gc,
    watch_supervisor,
    worker_count,
    worker_role,
)

logger = logging.getLogger("router")

# The engine's options that ``--model`` takes; those not given keep the engine's defaults.
ENGINE_OPTIONS = ("max_sequences", "max_queue", "max_context_tokens")

DESCRIPTION = """\
An LLM gateway: OpenAI, Anthropic and Gemini clients reach cloud providers and the local
SmolVLM2 model through one address.

Without --config it serves the local SmolVLM2-256M (downloaded from the Hugging Face Hub on
first use; offline and not cached, random weights, said loudly) plus each cloud provider whose
key variable is set (OPENAI_API_KEY, ANTHROPIC_API_KEY, GEMINI_API_KEY). GET / lists the
models and endpoints."""
EPILOG = f"""\
environment:
  {CLIENT_KEYS_VAR}  router keys for clients, comma-separated, plain or sha256:<hex>
  HF_HUB_OFFLINE=1    as --offline

signals: SIGHUP reloads --config; SIGTERM and SIGINT stop after in-flight requests
(up to shutdown_grace_s). With several workers the supervisor passes both to every worker.

smolvlm-router hash-key --help: making the sha256: form of a router key."""


def main(argv: list[str] | None = None) -> int:
    """Run the router until interrupted (or run ``hash-key``).

    Args:
        argv: Command-line arguments (defaults to ``sys.argv[1:]``).

    Returns:
        The process exit status (2 for a bad config or a refused listen address).
    """
    argv = sys.argv[1:] if argv is None else argv
    if argv[:1] == ["hash-key"]:
        return hash_key_command(argv[1:])
    parser = build_parser()
    args = parser.parse_args(argv)
    given = [name for name in ("name", "dtype", *ENGINE_OPTIONS) if vars(args)[name] is not None]
    if given and not args.model:
        parser.error(f"--{given[0].replace('_', '-')} needs --model")
    if args.offline:
        os.environ["HF_HUB_OFFLINE"] = "1"  # read when the local model is looked up
    # Until the config's own log settings are known.
    configure_logging(LogConfig(format="text", level=args.log_level or "INFO"), [])

    def load() -> Config:
        if args.config:
            cfg = load_config(args.config)
        elif args.model:
            cfg = model_config(args)
        else:
            cfg = default_config()
        cfg.auth.add_client_keys(client_keys_from_env(), CLIENT_KEYS_VAR)
        cfg.auth.add_client_keys(args.client_key, "--client-key")
        if args.log_level:
            cfg.log.level = args.log_level.upper()
        return cfg

    try:
        cfg = load()
        workers = 1 if worker_role() else worker_count(cfg, args.workers)
    except ConfigError as err:
        logger.error("%s", err)
        return 2
    if workers > 1:
        return run_supervisor(cfg, argv, workers, args.host, args.port)
    return run_server(cfg, args.host, args.port, load if args.config else None)


def build_parser() -> argparse.ArgumentParser:
    """The options of ``smolvlm-router`` (``hash-key`` has its own)."""
    parser = argparse.ArgumentParser(
        prog="smolvlm-router",
        description=DESCRIPTION,
        epilog=EPILOG,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    source = parser.add_mutually_exclusive_group()
    source.add_argument(
        "--config",
        metavar="FILE",
        help="a router.yaml (router.example.yaml shows every section; default: the local "
        "model plus the cloud providers whose key variables are set)",
    )
    source.add_argument(
        "--model",
        metavar="PATH_OR_HUB_ID",
        help="serve this local checkpoint or Hub id alone, to every client format",
    )
    parser.add_argument("--host", help="listen address (default: listen.host, else 127.0.0.1)")
    parser.add_argument("--port", type=int, help="listen port (default: listen.port, else 8080)")
    parser.add_argument(
        "--client-key",
        action="append",
        default=[],
        metavar="KEY",
        help="a router key clients must send, plain or sha256:<hex> (repeatable; needed "
        "with a --host beyond loopback; the environment variable keeps it out of ps)",
    )
    parser.add_argument(
        "--offline",
        action="store_true",
        help="never contact the Hugging Face Hub: the local model comes from its cache "
        "(sets HF_HUB_OFFLINE=1)",
    )
    parser.add_argument("--log-level", help="DEBUG, INFO, WARNING... (default: log.level, INFO)")
    parser.add_argument(
        "--workers",
        type=int,
        metavar="N",
        help="worker processes sharing the port (default: workers in the config, else the "
        "number of CPUs; 1 when the local model is served)",
    )
    local = parser.add_argument_group("the local model (with --model)")
    local.add_argument("--name", help="the model name clients ask for (default: from --model)")
    local.add_argument("--dtype", help="cast the weights, e.g. float32 (default: the checkpoint's)")
    local.add_argument(
        "--max-sequences", type=int, help="requests decoded together (default: the engine's, 8)"
    )
    local.add_argument(
        "--max-queue", type=int, help="requests waiting beyond them (default: the engine's, 32)"
    )
    local.add_argument(
        "--max-context-tokens",
        type=int,
        help="prompt plus answer per request (default: the model's context)",
    )
    # hash-key is a command of its own (see `main`); the usage line shows both forms.
    parser.usage = (
        parser.format_usage().removeprefix("usage: ").rstrip() + "\n       %(prog)s hash-key [KEY]"
    )
    return parser


def model_config(args: argparse.Namespace) -> Config:
    """The config of ``--model``: the local model alone, on ``--host``/``--port``.

    Args:
        args: From `build_parser`, with ``model`` set.

    Raises:
        ConfigError: An option is out of range.
    """
    name = args.name or Path(args.model.rstrip("/")).name.lower()
    options = {"model": args.model, "dtype": args.dtype}
    for option in ENGINE_OPTIONS:
        if vars(args)[option] is not None:
            options[option] = vars(args)[option]
    listen = {key: vars(args)[key] for key in ("host", "port") if vars(args)[key] is not None}
    return Config.from_dict(
        {
            "listen": listen,
            "providers": {"local": {"type": "mlx", "mlx": options}},
            "models": {name: [{"provider": "local", "model": name}]},
        }
    )


def hash_key_command(argv: list[str]) -> int:
    """``hash-key [KEY]``: print ``sha256:<hex>`` for ``auth.client_keys`` or
    ``auth.admin_key`` (the key is read from the terminal, or stdin, when not given).

    Args:
        argv: The arguments after ``hash-key``.

    Returns:
        0, or 2 for an empty key.
    """
    parser = argparse.ArgumentParser(
        prog="smolvlm-router hash-key",
        description="Print the stored form (sha256:<hex>) of a router key, for "
        f"auth.client_keys, auth.admin_key, {CLIENT_KEYS_VAR} or --client-key. Without KEY, "
        "it is read from the terminal (or one line of stdin).",
    )
    parser.add_argument(
        "key", nargs="?", metavar="KEY", help="the key (prefer the prompt: argv is visible)"
    )
    args = parser.parse_args(argv)
    if args.key is not None:
        key = args.key
    elif sys.stdin.isatty():
        key = getpass.getpass("router key: ")
    else:
        key = sys.stdin.readline().strip()
    if not key:
        sys.stderr.write("hash-key: the key is empty\n")
        return 2
    sys.stdout.write(hash_key(key) + "\n")
    return 0


def run_supervisor(
    cfg: Config, argv: list[str], workers: int, host: str | None, port: int | None
) -> int:
    """Check the listen address, then run ``workers`` worker processes (`router.workers`).

    Args:
        cfg: The router configuration.
        argv: The command-line arguments, which each worker gets.
        workers: How many.
        host: Overrides ``cfg.listen.host``.
        port: Overrides ``cfg.listen.port``.

    Returns:
        The process exit status (2 when the listen address needs client keys, or is port 0).
    """
    try:
        if not (port or cfg.listen.port):
            raise ConfigError("listen.port: several workers share one port, so it cannot be 0")
        check_bind(host or cfg.listen.host, cfg.auth)
    except ConfigError as err:
        logger.error("%s", err)
        return 2
    configure_logging(cfg.log, secrets_of(cfg))
    return supervise(cfg, argv, workers)


def run_server(
    cfg: Config,
    host: str | None = None,
    port: int | None = None,
    loader: Callable[[], Config] | None = None,
) -> int:
    """Serve ``cfg`` until SIGTERM or SIGINT.

    Args:
        cfg: The router configuration.
        host: Overrides ``cfg.listen.host``.
        port: Overrides ``cfg.listen.port``.
        loader: Re-reads the config on SIGHUP and ``POST /admin/reload`` (None: no reload).

    Returns:
        The process exit status (1 when a backend fails to start, 2 when the listen address
        needs client keys).
    """
    listen = dataclasses.replace(
        cfg.listen, host=host or cfg.listen.host, port=port or cfg.listen.port
    )
    cfg.listen = listen
    try:
        check_bind(listen.host, cfg.auth)
    except ConfigError as err:
        logger.error("%s", err)
        return 2
    configure_logging(cfg.log, secrets_of(cfg))

    def load() -> Config:
        new = loader()
        new.listen = listen
        return new

    try:
        run_event_loop(_serve(cfg, load if loader else None))
    except (ValueError, OSError) as err:  # a backend that cannot start (e.g. a bad model)
        logger.error("%s", err)
        return 1
    return 0


# Connections waiting to be accepted (the kernel caps it at net.core.somaxconn).
LISTEN_BACKLOG = 4096


async def _serve(cfg: Config, loader: Callable[[], Config] | None) -> None:
    grace = cfg.shutdown_grace_s
    app = create_app(cfg)
    role = worker_role()
    if role is not None and role.coordinator:
        app[KEY_COORDINATOR] = role.coordinator
    if role is not None:
        # The supervisor sends SIGHUP to every worker (this one reloads again, to no change).
        app[RELOAD_OTHERS] = partial(os.kill, os.getppid(), signal.SIGHUP)
    if loader is not None:
        app[CONFIG_LOADER] = loader
    app[RELOAD_HOOKS].append(lambda new: configure_logging(new.log, secrets_of(new)))
    # handler_cancellation: a client that disconnects cancels its upstream call. The grace
    # period is the one at start (a reload does not change it).
    runner = web.AppRunner(
        app,
        handle_signals=False,
        handler_cancellation=True,
        access_log=None,
        shutdown_timeout=grace,
    )
    await runner.setup()
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    watcher = None
    try:
        # A deep accept queue: with aiohttp's 128, a burst of new clients waits on SYN retries.
        # Workers share the port: the kernel spreads new connections among their sockets.
        site = web.TCPSite(
            runner,
            cfg.listen.host,
            cfg.listen.port,
            backlog=LISTEN_BACKLOG,
            reuse_port=role is not None,
        )
        await site.start()
        tune_gc()
        logger.info(
            "serving %s on http://%s:%d", ", ".join(cfg.models), cfg.listen.host, cfg.listen.port
        )
        logger.info("endpoints: %s", ", ".join(list_endpoints(app)))
        if (blas := sys.modules.get("mlx_smolvlm.blas")) is not None:  # a local model was loaded
            logger.info("local model %s", blas.active_blas().describe())
        for sig in (signal.SIGTERM, signal.SIGINT):
            loop.add_signal_handler(sig, stop.set)
        loop.add_signal_handler(signal.SIGHUP, reload_on_signal, app)
        if role is not None:
            watcher = loop.create_task(watch_supervisor(stop))
        await stop.wait()
        logger.info("shutting down: no new connections, in-flight requests get up to %g s", grace)
    finally:
        if watcher is not None:
            watcher.cancel()
        for sig in (signal.SIGTERM, signal.SIGINT, signal.SIGHUP):
            loop.remove_signal_handler(sig)
        await runner.cleanup()
    logger.info("stopped")


if __name__ == "__main__":
    sys.exit(main())
