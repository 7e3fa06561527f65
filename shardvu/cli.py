"""The command line: ``shardvu`` (``run``, ``stats``, ``top``, ``bench``,
``echo``, ``install-descriptor``) and ``shardvu-net``, the back-end program
of QEMU's vhost-user conventions (``--socket-path``, ``--fd`` and
``--print-capabilities`` at the top level, with every ``run`` option).

Every error found before serving -- a bad option, a missing directory, an
fd that is no socket, a port or metrics address that cannot be opened --
is printed as one line on stderr and ends the program with a non-zero
status (2 for a usage error, 1 otherwise); no traceback.
"""
from __future__ import annotations

import argparse
import json
import os
import shutil
import sys
import sysconfig
from typing import List, NoReturn, Optional

from . import __version__, logsetup

#: The file name ``install-descriptor`` writes (QEMU reads the directory's
#: files in name order; 50 leaves room on both sides).
DESCRIPTOR_NAME = "50-shardvu-net.json"
#: What ``--print-capabilities`` prints: a vhost-user net back-end has no
#: type-specific features in QEMU's schema.
CAPABILITIES = {"type": "net"}


class Parser(argparse.ArgumentParser):
    """An ArgumentParser whose usage errors are one line."""

    def error(self, message: str) -> NoReturn:
        self.exit(2, f"{self.prog}: error: {message} (see --help)\n")


def _cpu_list(text: str) -> List[int]:
    """``"0,2-4"`` → ``[0, 2, 3, 4]``."""
    cpus: List[int] = []
    try:
        for part in text.split(","):
            if "-" in part:
                lo, hi = part.split("-", 1)
                cpus.extend(range(int(lo), int(hi) + 1))
            elif part:
                cpus.append(int(part))
    except ValueError:
        raise argparse.ArgumentTypeError(f"bad CPU list {text!r} (e.g. 0,2-3)") from None
    if not cpus:
        raise argparse.ArgumentTypeError(f"empty CPU list {text!r}")
    return cpus


def _checked(fn):
    """An argparse type from a function raising ValueError with a message."""
    def convert(text: str):
        try:
            return fn(text)
        except ValueError as exc:
            raise argparse.ArgumentTypeError(str(exc)) from None
    convert.__name__ = fn.__name__
    return convert


def _positive(text: str) -> int:
    try:
        n = int(text)
    except ValueError:
        raise ValueError(f"{text!r} is not a number") from None
    if n < 1:
        raise ValueError(f"{n} is not positive")
    return n


def add_run_arguments(p: argparse.ArgumentParser) -> None:
    """The options of ``shardvu run``, shared with ``shardvu-net``."""
    from .control.server import parse_mode
    from .statsapi import check_name
    where = p.add_mutually_exclusive_group()
    where.add_argument("--socket-path", "--socket", dest="socket", metavar="PATH",
                       help="vhost-user socket path to listen on (or, with --client, connect to)")
    where.add_argument("--fd", type=int, metavar="N",
                       help="an inherited vhost-user socket: listening (served like a path) or "
                            "connected (one session; shardvu exits when it ends)")
    p.add_argument("--print-capabilities", action="store_true",
                   help="print the back-end capabilities (JSON) and exit")
    p.add_argument("--client", action="store_true", help="connect to a listening front-end")
    p.add_argument("--queues", type=_checked(_positive), default=1, help="queue pairs (default 1)")
    p.add_argument("--queue-size", type=_checked(_positive), metavar="N",
                   help="largest ring the front-end may set up (power of two, default 1024)")
    p.add_argument("--port", default="sink",
                   help="sink, loopback, generator, tap:IFNAME, module:function or "
                        "module:Class (a two-way Port; default sink)")
    p.add_argument("--cpus", type=_cpu_list, help="pin workers to these CPUs, e.g. 0,2-3")
    p.add_argument("--mac", help="MAC address in config space (default 52:54:00:00:00:01)")
    p.add_argument("--mtu", type=int, default=0, help="MTU offered with VIRTIO_NET_F_MTU")
    p.add_argument("--frame-size", type=int, default=64, help="generator frame size (default 64)")
    p.add_argument("--pcap", metavar="FILE",
                   help="capture every frame, both directions of every queue pair, to a pcapng "
                        "FILE (any port): interface = queue pair, direction = inbound/outbound")
    p.add_argument("--pcap-limit", type=int, default=0, metavar="BYTES",
                   help="stop capturing before FILE exceeds BYTES (default: no limit)")
    p.add_argument("--name", type=_checked(check_name),
                   help="instance name for stats, top and metrics (default: from the socket path)")
    p.add_argument("--socket-mode", type=_checked(parse_mode), default=0o600, metavar="MODE",
                   help="permissions of the listening socket, octal (default 0600)")
    p.add_argument("--socket-group", metavar="GROUP",
                   help="group of the listening socket (name or number)")
    p.add_argument("--metrics", metavar="[HOST:]PORT",
                   help="serve Prometheus metrics at http://HOST:PORT/metrics (host default 127.0.0.1)")
    p.add_argument("--log-level", type=_checked(logsetup.parse_level), default="INFO",
                   help=f"{', '.join(logsetup.LEVELS)} (default INFO)")
    p.add_argument("--log-format", type=_checked(logsetup.parse_format), default="text",
                   help="text or json (one object per line)")
    p.add_argument("--worker-python", metavar="PATH",
                   help="interpreter for the workers, e.g. a PyPy venv's python (see README)")


def _fail(prog: str, message: str, status: int = 1) -> int:
    print(f"{prog}: {message}", file=sys.stderr)
    return status


def run_command(args, prog: str = "shardvu run") -> int:
    """Start the sharded runtime as ``args`` say; returns the exit status."""
    if args.print_capabilities:
        print(json.dumps(CAPABILITIES))
        return 0
    from .control.server import ControlServer, StartupError, activation_fd, resolve_group
    from .metrics import parse_address
    from .net import parse_mac
    from .workers.ports import resolve
    listen_fd = args.fd
    try:
        if args.socket is None and listen_fd is None:
            listen_fd = activation_fd()
            if listen_fd is None:
                return _fail(prog, "--socket-path PATH or --fd N is required "
                                   "(or start it by systemd socket activation)", 2)
        if args.client and args.socket is None:
            return _fail(prog, "--client needs --socket-path", 2)
        if args.queues > 128:
            return _fail(prog, "--queues must be 1..128", 2)
        if args.queue_size is not None and (args.queue_size & (args.queue_size - 1)
                                            or args.queue_size > 1024):
            return _fail(prog, "--queue-size must be a power of two up to 1024", 2)
        if args.cpus and not set(args.cpus) <= os.sched_getaffinity(0):
            return _fail(prog, f"--cpus {','.join(map(str, args.cpus))}: not all of them are "
                               f"available to this process", 2)
        if args.worker_python and not os.access(args.worker_python, os.X_OK):
            return _fail(prog, f"--worker-python {args.worker_python}: not an executable file", 2)
        if args.metrics:
            parse_address(args.metrics)
        gid = resolve_group(args.socket_group) if args.socket_group else None
        resolve(args.port)          # an unknown port: one-line error before anything starts
        mac = parse_mac(args.mac) if args.mac else None
        logsetup.setup(args.log_level, args.log_format, role="control")
        server = ControlServer(args.socket, args.queues, args.port, client=args.client,
                               listen_fd=listen_fd, cpus=args.cpus, mac=mac, mtu=args.mtu,
                               frame_size=args.frame_size, log_level=args.log_level,
                               worker_python=args.worker_python, name=args.name,
                               socket_mode=args.socket_mode, socket_group=gid,
                               queue_size=args.queue_size, metrics=args.metrics)
        capture = None
        if args.pcap:
            from .control.capture import Capture, CaptureError
            try:
                capture = Capture.start(args.pcap, 2 * args.queues, args.pcap_limit,
                                        args.log_level)
            except CaptureError as exc:
                return _fail(prog, str(exc))
        try:
            return server.run()
        finally:
            if capture is not None:
                capture.stop()
    except (StartupError, ValueError) as exc:
        return _fail(prog, str(exc))


# -- install-descriptor -------------------------------------------------------

def net_binary() -> Optional[str]:
    """The absolute path of the installed ``shardvu-net``: beside this
    interpreter's scripts (the environment shardvu is installed in), else
    on PATH; None if neither has it."""
    for path in (sysconfig.get_path("scripts"), os.path.dirname(os.path.abspath(sys.argv[0])), None):
        found = shutil.which("shardvu-net", path=path)
        if found:
            return os.path.abspath(found)
    return None


def descriptor_dir(system: bool) -> str:
    """Where QEMU's discovery looks: ``/etc/qemu/vhost-user`` (system) or
    ``$XDG_CONFIG_HOME/qemu/vhost-user`` (user; ``~/.config`` by default)."""
    if system:
        return "/etc/qemu/vhost-user"
    base = os.environ.get("XDG_CONFIG_HOME") or os.path.join(os.path.expanduser("~"), ".config")
    return os.path.join(base, "qemu", "vhost-user")


def descriptor(binary: str) -> dict:
    """The descriptor QEMU's ``docs/interop/vhost-user.json`` schema describes."""
    return {"description": f"shardvu {__version__}: vhost-user net back-end in Python",
            "type": "net", "binary": binary}


def install_descriptor(args) -> int:
    """``shardvu install-descriptor``: write the descriptor, print its path."""
    prog = "shardvu install-descriptor"
    binary = net_binary()
    if binary is None:
        return _fail(prog, "shardvu-net is not installed (pip install shardvu puts it beside "
                           "the interpreter's scripts)")
    directory = descriptor_dir(args.system)
    path = os.path.join(directory, DESCRIPTOR_NAME)
    try:
        os.makedirs(directory, exist_ok=True)
        tmp = path + ".tmp"
        with open(tmp, "w") as f:
            json.dump(descriptor(binary), f, indent=2)
            f.write("\n")
        os.replace(tmp, path)
    except OSError as exc:
        return _fail(prog, f"cannot write {path}: {exc.strerror}")
    print(path)
    return 0


# -- entry points --------------------------------------------------------------

def reload_command(args) -> int:
    """``shardvu reload``: find the instance's control process through its
    stats endpoint and send it SIGHUP (the replacement runs there; its
    outcome is in the log and in ``shardvu stats``' restarts)."""
    import signal
    from . import statscli
    from .statsapi import NoAnswer, query
    try:
        endpoint = statscli.target_endpoint(args)
        pid = int(query(endpoint, args.timeout)["control_pid"])
    except (ValueError, NoAnswer, KeyError, TypeError) as exc:
        print(f"shardvu reload: no control process to reload: {exc or type(exc).__name__}",
              file=sys.stderr)
        return 1
    os.kill(pid, signal.SIGHUP)
    print(f"shardvu reload: asked control process {pid} to replace its workers")
    return 0


def main(argv: Optional[List[str]] = None) -> int:
    """``shardvu``."""
    ap = Parser(prog="shardvu", description="A vhost-user back-end in Python.")
    ap.add_argument("--version", action="version", version=f"shardvu {__version__}")
    if argv is None:
        argv = sys.argv[1:]
    # The back-end convention: --print-capabilities works on its own.
    if "--print-capabilities" in argv and (not argv or argv[0] != "run"):
        argv = ["run", "--print-capabilities"]
    sub = ap.add_subparsers(dest="cmd", required=True, metavar="COMMAND")
    p = sub.add_parser("run", help="the sharded runtime: control process + one worker per virtqueue")
    add_run_arguments(p)
    p.set_defaults(func=run_command)

    from . import bench, statscli, top
    p = sub.add_parser("stats", help="per-queue statistics of a running shardvu")
    statscli.add_arguments(p)
    p.set_defaults(func=statscli.command)

    p = sub.add_parser("reload", help="live upgrade: replace every worker of a running shardvu, "
                                      "one at a time, with the code installed now (= SIGHUP)")
    statscli.add_target_arguments(p)
    p.set_defaults(func=reload_command)

    p = sub.add_parser("top", help="live full-screen per-queue view of a running shardvu")
    top.add_arguments(p)
    p.set_defaults(func=top.command)

    p = sub.add_parser("bench", help="self-contained traffic benchmark (needs nothing but Python)")
    bench.add_arguments(p)
    p.set_defaults(func=bench.command)

    p = sub.add_parser("install-descriptor",
                       help="write QEMU's vhost-user descriptor for shardvu-net and print its path")
    scope = p.add_mutually_exclusive_group()
    scope.add_argument("--user", action="store_false", dest="system",
                       help="$XDG_CONFIG_HOME/qemu/vhost-user/ (default)")
    scope.add_argument("--system", action="store_true", dest="system",
                       help="/etc/qemu/vhost-user/")
    p.set_defaults(func=install_descriptor, system=False)

    p = sub.add_parser("echo", help="serve the example echo back-end (single process)")
    p.add_argument("--socket-path", "--socket", dest="socket", required=True)
    p.add_argument("--queue-pairs", type=int, default=1)
    p.add_argument("--log-level", type=_checked(logsetup.parse_level), default="INFO")
    p.add_argument("--log-format", type=_checked(logsetup.parse_format), default="text")
    p.set_defaults(func=_echo)

    args = ap.parse_args(argv)
    try:
        return args.func(args)
    except KeyboardInterrupt:           # Ctrl-C before a command installed its own handling
        return 130


def net_main(argv: Optional[List[str]] = None) -> int:
    """``shardvu-net``: QEMU's back-end program conventions."""
    ap = Parser(prog="shardvu-net",
                description="shardvu's vhost-user net back-end (QEMU's back-end program conventions).")
    ap.add_argument("--version", action="version", version=f"shardvu {__version__}")
    add_run_arguments(ap)
    try:
        return run_command(ap.parse_args(argv), prog="shardvu-net")
    except KeyboardInterrupt:
        return 130


def _echo(args) -> int:
    from . import echo
    return echo.main(["--socket", args.socket, "--queue-pairs", str(args.queue_pairs),
                      "--log-level", args.log_level, "--log-format", args.log_format])


if __name__ == "__main__":
    sys.exit(main())
