"""Command line: ``smolvlm-router [--config router.yaml]`` or ``python -m router``.

Without ``--config`` the router runs `default_config`: the local SmolVLM2-256M model (random
weights, said loudly, when the real one is not on this machine) plus every cloud provider
whose API key variable is set.
"""

from __future__ import annotations

import argparse
import logging
import sys

from aiohttp import web

from .app import create_app
from .config import Config, ConfigError, default_config, load_config

logger = logging.getLogger("router")


def main(argv: list[str] | None = None) -> int:
    """Run the router until interrupted.

    Args:
        argv: Command-line arguments (defaults to ``sys.argv[1:]``).

    Returns:
        The process exit status (2 for a bad config).
    """
    parser = argparse.ArgumentParser(prog="smolvlm-router", description=__doc__)
    parser.add_argument(
        "--config",
        help="path to router.yaml (default: the local model, plus cloud providers "
        "whose API key variables are set)",
    )
    parser.add_argument("--host", help="override listen.host")
    parser.add_argument("--port", type=int, help="override listen.port")
    parser.add_argument("--log-level", default="INFO", help="logging level (default INFO)")
    args = parser.parse_args(argv)
    logging.basicConfig(
        level=args.log_level.upper(),
        format="%(asctime)s %(levelname)s %(name)s %(message)s",
    )
    try:
        cfg = load_config(args.config) if args.config else default_config()
    except ConfigError as err:
        logger.error("%s", err)
        return 2
    return run_server(cfg, args.host, args.port)


def run_server(cfg: Config, host: str | None = None, port: int | None = None) -> int:
    """Serve ``cfg`` until interrupted.

    Args:
        cfg: The router configuration.
        host: Overrides ``cfg.listen.host``.
        port: Overrides ``cfg.listen.port``.

    Returns:
        The process exit status (1 when a backend fails to start).
    """
    host = host or cfg.listen.host
    port = port or cfg.listen.port
    logger.info("serving %s on http://%s:%d", ", ".join(cfg.models), host, port)
    try:
        # handler_cancellation: a client that disconnects cancels its upstream call.
        web.run_app(
            create_app(cfg),
            host=host,
            port=port,
            handler_cancellation=True,
            print=None,
            access_log=logging.getLogger("router.access"),
        )
    except (ValueError, OSError) as err:  # a backend that cannot start (e.g. a bad model)
        logger.error("%s", err)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
