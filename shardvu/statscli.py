"""``shardvu stats``: ask a running sharded back-end for its per-queue stats.

Sends one request to the control process's query endpoint (derived from
the vhost-user socket path, see ``shardvu.control.stats.endpoints``) and
prints a table, or the raw snapshot with ``--json``.  ``--watch`` repeats
every ``--interval`` seconds and adds a Mpps column (rate since the
previous refresh).  Exit status: 0 on success (and on Ctrl-C in --watch),
1 if no control process answers within ``--timeout`` seconds.
"""
from __future__ import annotations

import argparse
import json
import os
import sys
import time
from typing import Any, Dict, Optional, TextIO

import zmq

from .statsapi import NoAnswer, endpoints, query  # noqa: F401  (re-exported)


def add_arguments(ap: argparse.ArgumentParser) -> None:
    ap.add_argument("--socket", "--socket-path", dest="socket", required=True,
                    help="the back-end's vhost-user socket path")
    ap.add_argument("--watch", action="store_true",
                    help="refresh every --interval seconds until Ctrl-C")
    ap.add_argument("--interval", type=float, default=1.0,
                    help="refresh interval for --watch, seconds (default 1)")
    ap.add_argument("--json", action="store_true",
                    help="print one snapshot as JSON and exit")
    ap.add_argument("--timeout", type=float, default=2.0,
                    help="seconds to wait for the control process (default 2)")


def _human_bytes(n: float) -> str:
    for unit in ("B", "KiB", "MiB", "GiB", "TiB"):
        if abs(n) < 1024 or unit == "TiB":
            return f"{n:.0f}{unit}" if unit == "B" else f"{n:.1f}{unit}"
        n /= 1024
    return str(n)  # unreachable


_COLS = ("idx", "dir", "state", "packets", "Mpps", "bytes", "drops", "kicks",
         "calls", "pid", "cpu%", "rssMiB", "privMiB")


def format_table(snap: Dict[str, Any], prev: Optional[Dict[str, Any]] = None) -> str:
    """Render ``snap`` as a text table.  With ``prev`` (an earlier snapshot
    from the same control process) the Mpps column is the packet rate
    between the two; otherwise it shows "-"."""
    dt = snap["time"] - prev["time"] if prev else 0.0
    before = {q["index"]: q for q in prev["queues"]} if prev else {}

    def rate(packets: int, old: Optional[int]) -> str:
        if old is None or dt <= 0 or packets < old:   # no baseline / worker restarted
            return "-"
        return f"{(packets - old) / dt / 1e6:.3f}"

    rows = []
    for q in snap["queues"]:
        old = before.get(q["index"])
        state = q["state"]
        if state == "dead" and q.get("exitcode") is not None:
            state = f"dead({q['exitcode']})"
        rows.append((str(q["index"]), q["direction"], state, str(q["packets"]),
                     rate(q["packets"], old["packets"] if old else None),
                     _human_bytes(q["bytes"]), str(q["drops"]), str(q["kicks"]),
                     str(q["calls"]), str(q["worker_pid"] or "-"),
                     f"{q['cpu_percent']:.1f}", f"{q['rss_bytes'] / 2**20:.1f}",
                     f"{q.get('private_bytes', 0) / 2**20:.1f}"))
    t = snap["totals"]
    old_total = prev["totals"]["packets"] if prev else None
    rows.append(("all", "", "", str(t["packets"]), rate(t["packets"], old_total),
                 _human_bytes(t["bytes"]), str(t["drops"]), str(t["kicks"]), str(t["calls"]),
                 "", f"{t['cpu_percent']:.1f}", f"{t['rss_bytes'] / 2**20:.1f}",
                 f"{t.get('private_bytes', 0) / 2**20:.1f}"))
    widths = [max(len(c), *(len(r[i]) for r in rows)) for i, c in enumerate(_COLS)]
    left = {1, 2}                     # text columns; the rest are right-aligned

    def line(cells) -> str:
        return "  ".join(c.ljust(w) if i in left else c.rjust(w)
                         for i, (c, w) in enumerate(zip(cells, widths))).rstrip()

    out = [f"shardvu stats  {snap.get('socket') or ''}  "
           f"{time.strftime('%H:%M:%S', time.localtime(snap['time']))}".rstrip(),
           line(_COLS)]
    out += [line(r) for r in rows[:-1]]
    out.append("-" * len(out[1]))
    out.append(line(rows[-1]))
    broken = [q for q in snap["queues"] if q.get("broken_reason")]
    out += [f"queue {q['index']}: broken: {q['broken_reason']}" for q in broken]
    return "\n".join(out)


def command(args, out: Optional[TextIO] = None, err: Optional[TextIO] = None) -> int:
    """Run ``shardvu stats`` with parsed ``args``; ``out``/``err`` default
    to sys.stdout/sys.stderr.  Returns the exit status."""
    out = out or sys.stdout
    err = err or sys.stderr
    try:
        _, endpoint = endpoints(args.socket)
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
                    " (the endpoint does not exist — is the sharded back-end running on this socket?)"
                print(f"shardvu stats: no control process answered at {endpoint} "
                      f"within {args.timeout:g} s{hint}", file=err)
                return 1
            if args.json:
                print(json.dumps(snap, indent=2), file=out)
                return 0
            if not args.watch:
                print(format_table(snap), file=out)
                return 0
            if out.isatty():
                out.write("\033[H\033[2J")
            print(format_table(snap, prev), file=out, flush=True)
            if not out.isatty():
                print(file=out)
            prev = snap
            time.sleep(max(0.05, args.interval))
    except KeyboardInterrupt:
        return 0
    finally:
        ctx.destroy(linger=0)
