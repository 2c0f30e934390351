"""`python -m lab_workload_api serve --config FILE`.

Exit codes: 0 after a clean stop (SIGTERM/SIGINT), 2 for a bad command line or config
(one line naming the key), 1 when startup fails for another reason (a socket path taken).
"""

from __future__ import annotations

import argparse
import asyncio
import logging
import sys
from collections.abc import Sequence
from pathlib import Path

from lab_workload_api.config import load_config
from lab_workload_api.server import ServeError, serve
from tfcrypt.errors import ConfigError

PROG = "lab_workload_api"


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog=f"python -m {PROG}",
        description="Lab stand-in for spire-agent: the SPIFFE Workload API over Unix sockets.")
    commands = parser.add_subparsers(dest="command", required=True)
    serve_cmd = commands.add_parser("serve", help="serve the configured sockets until SIGTERM")
    serve_cmd.add_argument("--config", required=True, type=Path, help="JSON config file")
    args = parser.parse_args(argv)

    logging.basicConfig(stream=sys.stderr, level=logging.INFO,
                        format="%(asctime)s " + PROG + " %(levelname)s %(message)s")
    try:
        config = load_config(args.config)
    except ConfigError as e:
        print(f"{PROG}: config error: {e}", file=sys.stderr)
        return 2
    try:
        asyncio.run(serve(config))
    except ServeError as e:
        print(f"{PROG}: cannot start: {e}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
