"""Command line: ``smolvlm-router --config router.yaml`` or ``python -m router``."""

from __future__ import annotations

import argparse
import logging
import sys

from aiohttp import web

from .app import create_app
from .config import ConfigError, load_config

logger = logging.getLogger("router")


def main(argv: list[str] | None = None) -> int:
    """Run the router until interrupted.

    Args:
        argv: Command-line arguments (defaults to ``sys.argv[1:]``).

    Returns:
        The process exit status (2 for a bad config).
    """
    parser = argparse.ArgumentParser(prog="smolvlm-router", description=__doc__)
    parser.add_argument("--config", required=True, help="path to router.yaml")
    parser.add_argument("--host", help="override listen.host")
    parser.add_argument("--port", type=int, help="override listen.port")
    parser.add_argument("--log-level", default="INFO", help="logging level (default INFO)")
    args = parser.parse_args(argv)
    logging.basicConfig(
        level=args.log_level.upper(),
        format="%(asctime)s %(levelname)s %(name)s %(message)s",
    )
    try:
        cfg = load_config(args.config)
    except ConfigError as err:
        logger.error("%s", err)
        return 2
    host = args.host or cfg.listen.host
    port = args.port or cfg.listen.port
    # handler_cancellation: a client that disconnects cancels its upstream call.
    web.run_app(
        create_app(cfg),
        host=host,
        port=port,
        handler_cancellation=True,
        print=None,
        access_log=logging.getLogger("router.access"),
    )
    return 0


if __name__ == "__main__":
    sys.exit(main())
