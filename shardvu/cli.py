"""The ``shardvu`` command line: ``run``, ``stats``, ``bench`` and ``echo``."""
from __future__ import annotations

import argparse
import json
import logging
import sys
from typing import List, Optional

from . import __version__


def _cpu_list(text: str) -> List[int]:
    """``"0,2-4"`` → ``[0, 2, 3, 4]``."""
    cpus: List[int] = []
    for part in text.split(","):
        if "-" in part:
            lo, hi = part.split("-", 1)
            cpus.extend(range(int(lo), int(hi) + 1))
        elif part:
            cpus.append(int(part))
    if not cpus:
        raise argparse.ArgumentTypeError(f"empty CPU list {text!r}")
    return cpus


def _add_run(sub) -> None:
    p = sub.add_parser("run", help="the sharded runtime: control process + one worker per virtqueue")
    where = p.add_mutually_exclusive_group()
    where.add_argument("--socket", "--socket-path", dest="socket", help="vhost-user socket path")
    where.add_argument("--fd", type=int, help="an inherited, listening vhost-user socket")
    p.add_argument("--queues", type=int, default=1, help="queue pairs (default 1)")
    p.add_argument("--port", default="sink",
                   help="sink, loopback, generator, or module:function (default sink)")
    p.add_argument("--client", action="store_true", help="connect to a listening front-end")
    p.add_argument("--cpus", type=_cpu_list, help="pin workers to these CPUs, e.g. 0,2-3")
    p.add_argument("--mac", help="MAC address in config space (default 52:54:00:00:00:01)")
    p.add_argument("--mtu", type=int, default=0, help="MTU offered with VIRTIO_NET_F_MTU")
    p.add_argument("--frame-size", type=int, default=64, help="generator frame size (default 64)")
    p.add_argument("--log-level", default="INFO")
    p.add_argument("--worker-python", metavar="PATH",
                   help="interpreter for the workers, e.g. a PyPy venv's python (see README)")
    p.add_argument("--print-capabilities", action="store_true",
                   help="print the back-end capabilities (JSON) and exit")
    p.set_defaults(func=_run)


def _run(args) -> int:
    if args.print_capabilities:
        print(json.dumps({"type": "net"}))
        return 0
    if args.socket is None and args.fd is None:
        print("shardvu run: --socket PATH or --fd N is required", file=sys.stderr)
        return 2
    if args.client and args.socket is None:
        print("shardvu run: --client needs --socket", file=sys.stderr)
        return 2
    if not 1 <= args.queues <= 128:
        print("shardvu run: --queues must be 1..128", file=sys.stderr)
        return 2
    logging.basicConfig(level=args.log_level.upper(),
                        format="%(asctime)s %(name)s %(levelname)s %(message)s")
    from .net import parse_mac
    from .control.server import ControlServer
    from .workers.ports import resolve
    try:
        resolve(args.port)
        mac = parse_mac(args.mac) if args.mac else None
    except ValueError as exc:
        print(f"shardvu run: {exc}", file=sys.stderr)
        return 2
    server = ControlServer(args.socket, args.queues, args.port, client=args.client,
                           listen_fd=args.fd, cpus=args.cpus, mac=mac, mtu=args.mtu,
                           frame_size=args.frame_size, log_level=args.log_level,
                           worker_python=args.worker_python)
    return server.run()


def main(argv: Optional[List[str]] = None) -> int:
    ap = argparse.ArgumentParser(prog="shardvu", description="A vhost-user back-end in Python.")
    ap.add_argument("--version", action="version", version=f"shardvu {__version__}")
    # The spec's back-end convention: --print-capabilities works on its own.
    if argv is None:
        argv = sys.argv[1:]
    if "--print-capabilities" in argv and (not argv or argv[0] != "run"):
        argv = ["run", "--print-capabilities"]
    sub = ap.add_subparsers(dest="cmd", required=True)
    _add_run(sub)

    from . import bench, statscli
    p = sub.add_parser("stats", help="per-queue statistics of a running `shardvu run`")
    statscli.add_arguments(p)
    p.set_defaults(func=statscli.command)

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
