"""``shardvu stats``: ask a running sharded back-end for its per-queue stats.

Sends one request to the control process's query endpoint (derived from
the instance's ``--name``, or from its vhost-user socket path: see
:mod:`shardvu.statsapi`) and prints a table (rich), or the raw snapshot
with ``--json``.  ``--watch`` repeats
every ``--interval`` seconds and adds a Mpps column (rate since the
previous refresh).  Exit status: 0 on success (and on Ctrl-C in --watch),
1 if no control process answers within ``--timeout`` seconds.
"""
from __future__ import annotations

import argparse
import io
import json
import os
import shutil
import sys
import time
from typing import Any, Dict, Optional, TextIO

import zmq

from .statsapi import (NoAnswer, endpoints, instance_names, name_endpoints,  # noqa: F401
                       query, run_dir)


def add_target_arguments(ap: argparse.ArgumentParser) -> None:
    """``--socket-path`` / ``--name``: which running instance to ask."""
    who = ap.add_mutually_exclusive_group()
    who.add_argument("--socket-path", "--socket", dest="socket", metavar="PATH",
                     help="the instance's vhost-user socket path (when it has no --name)")
    who.add_argument("--name", help="the instance's --name (default: the only named instance)")
    ap.add_argument("--timeout", type=float, default=2.0,
                    help="seconds to wait for the control process (default 2)")


def add_arguments(ap: argparse.ArgumentParser) -> None:
    add_target_arguments(ap)
    ap.add_argument("--watch", action="store_true",
                    help="refresh every --interval seconds until Ctrl-C")
    ap.add_argument("--interval", type=float, default=1.0,
                    help="refresh interval for --watch, seconds (default 1)")
    ap.add_argument("--json", action="store_true",
                    help="print one snapshot as JSON and exit")


def target_endpoint(args) -> str:
    """The query endpoint ``args`` name: by ``--socket-path``, by ``--name``,
    or the only named instance there is.  ValueError (with a message for
    the user) when that is ambiguous or invalid."""
    if args.socket:
        return endpoints(args.socket)[1]
    if args.name:
        return name_endpoints(args.name)[1]
    names = instance_names()
    if len(names) == 1:
        return name_endpoints(names[0])[1]
    if not names:
        raise ValueError(f"no named instance in {run_dir()}: give --socket-path or --name")
    raise ValueError(f"several instances ({', '.join(names)}): give --name")


def human_bytes(n: float) -> str:
    """``n`` bytes, e.g. ``"12.3 MB"`` (rich's decimal units)."""
    from rich import filesize
    return filesize.decimal(int(n))


def last_exit(q: Dict[str, Any]) -> str:
    """How the queue's previous worker ended: ``"sig 9"``, ``"exit 3"`` or "-"."""
    if q.get("last_exit_signal") is not None:
        return f"sig {q['last_exit_signal']}"
    if q.get("last_exit_code") is not None:
        return f"exit {q['last_exit_code']}"
    return "-"


def recovery(q: Dict[str, Any]) -> str:
    """The last respawn's recovery time, e.g. ``"12 ms"``, or "-"."""
    r = q.get("last_recovery_s")
    return "-" if r is None else f"{r * 1e3:.0f} ms"


def _rate(now: int, old: Optional[int], dt: float) -> Optional[float]:
    """Per-second rate, or None without a baseline."""
    if old is None or dt <= 0 or now < old:
        return None
    return (now - old) / dt


def build_table(snap: Dict[str, Any], prev: Optional[Dict[str, Any]] = None):
    """``snap`` as a rich Table; with ``prev`` (an earlier snapshot from the
    same instance) the Mpps column is the packet rate between the two,
    otherwise "-"."""
    from rich import box
    from rich.table import Table
    dt = snap["time"] - prev["time"] if prev else 0.0
    before = {q["index"]: q for q in prev["queues"]} if prev else {}
    title = " ".join(x for x in ("shardvu stats", snap.get("name") or snap.get("socket") or "",
                                 time.strftime("%H:%M:%S", time.localtime(snap["time"]))) if x)
    table = Table(title=title, box=box.SIMPLE_HEAD, show_footer=True, title_justify="left")
    right = dict(justify="right")
    for name, opts in (("idx", right), ("dir", {}), ("state", {}), ("packets", right),
                       ("Mpps", right), ("bytes", right), ("drops", right), ("kicks", right),
                       ("calls", right), ("restarts", right), ("last exit", right),
                       ("recovery", right), ("pid", right), ("cpu%", right),
                       ("rss", right), ("private", right)):
        table.add_column(name, **opts)

    def mpps(now: int, old: Optional[int]) -> str:
        r = _rate(now, old, dt)
        return "-" if r is None else f"{r / 1e6:.3f}"

    for q in snap["queues"]:
        old = before.get(q["index"])
        state = q["state"]
        if state == "dead" and q.get("exitcode") is not None:
            state = f"dead({q['exitcode']})"
        table.add_row(str(q["index"]), q["direction"], state, str(q["packets"]),
                      mpps(q["packets"], old["packets"] if old else None),
                      human_bytes(q["bytes"]), str(q["drops"]), str(q["kicks"]), str(q["calls"]),
                      str(q.get("restarts", 0)), last_exit(q), recovery(q),
                      str(q["worker_pid"] or "-"),
                      f"{q['cpu_percent']:.1f}", human_bytes(q["rss_bytes"]),
                      human_bytes(q.get("private_bytes", 0)))
    t = snap["totals"]
    footer = ["all", "", "", str(t["packets"]),
              mpps(t["packets"], prev["totals"]["packets"] if prev else None),
              human_bytes(t["bytes"]), str(t["drops"]), str(t["kicks"]), str(t["calls"]),
              str(t.get("restarts", 0)), "", "", "", f"{t['cpu_percent']:.1f}",
              human_bytes(t["rss_bytes"]), human_bytes(t.get("private_bytes", 0))]
    for column, text in zip(table.columns, footer):
        column.footer = text
    broken = [f"queue {q['index']}: broken: {q['broken_reason']}"
              for q in snap["queues"] if q.get("broken_reason")]
    if broken:
        table.caption = "\n".join(broken)
        table.caption_justify = "left"
    return table


def format_table(snap: Dict[str, Any], prev: Optional[Dict[str, Any]] = None,
                 width: int = 200) -> str:
    """:func:`build_table` rendered as plain text ``width`` columns wide."""
    from rich.console import Console
    console = Console(file=io.StringIO(), width=width, color_system=None, force_terminal=False)
    console.print(build_table(snap, prev))
    return "\n".join(line.rstrip() for line in console.file.getvalue().rstrip().splitlines())


def command(args, out: Optional[TextIO] = None, err: Optional[TextIO] = None) -> int:
    """Run ``shardvu stats`` with parsed ``args``; ``out``/``err`` default
    to sys.stdout/sys.stderr.  Returns the exit status."""
    out = out or sys.stdout
    err = err or sys.stderr
    try:
        endpoint = target_endpoint(args)
    except ValueError as e:
        print(f"shardvu stats: {e}", file=err)
        return 1
    ctx = zmq.Context()
    try:
        prev = None
        while True:
            try:
                snap = query(endpoint, args.timeout, ctx)
            except NoAnswer:
                hint = "" if os.path.exists(endpoint[len("ipc://"):]) else \
                    " (the endpoint does not exist: is shardvu running with this socket or name?)"
                print(f"shardvu stats: no control process answered at {endpoint} "
                      f"within {args.timeout:g} s{hint}", file=err)
                return 1
            if args.json:
                print(json.dumps(snap, indent=2), file=out)
                return 0
            width = shutil.get_terminal_size((200, 24)).columns if out.isatty() else 200
            if not args.watch:
                print(format_table(snap, width=width), file=out)
                return 0
            if out.isatty():
                from rich.console import Console
                Console(file=out).clear()
            print(format_table(snap, prev, width=width), file=out, flush=True)
            if not out.isatty():
                print(file=out)
            prev = snap
            time.sleep(max(0.05, args.interval))
    except KeyboardInterrupt:
        return 0
    finally:
        ctx.destroy(linger=0)
