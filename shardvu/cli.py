"""The ``shardvu`` command line."""
from __future__ import annotations

import argparse
import sys
from typing import List, Optional

from . import __version__


def main(argv: Optional[List[str]] = None) -> int:
    ap = argparse.ArgumentParser(prog="shardvu", description="A vhost-user back-end in Python.")
    ap.add_argument("--version", action="version", version=f"shardvu {__version__}")
    sub = ap.add_subparsers(dest="cmd", required=True)

    from . import bench
    p = sub.add_parser("bench", help="self-contained traffic benchmark (needs nothing but Python)")
    bench.add_arguments(p)
    p.set_defaults(func=bench.command)

    p = sub.add_parser("echo", help="serve the example echo back-end (single process)")
    p.add_argument("--socket", "--socket-path", dest="socket", required=True)
    p.add_argument("--queue-pairs", type=int, default=1)
    p.add_argument("--log-level", default="INFO")
    p.set_defaults(func=_echo)

    args = ap.parse_args(argv)
    return args.func(args)


def _echo(args) -> int:
    from . import echo
    return echo.main(["--socket", args.socket, "--queue-pairs", str(args.queue_pairs),
                      "--log-level", args.log_level])


if __name__ == "__main__":
    sys.exit(main())
