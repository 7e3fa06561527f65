"""``shardvu top``: a live, full-screen view of a running instance, per queue.

Every ``--interval`` seconds it asks the control process for a stats
snapshot (as ``shardvu stats`` does) and redraws, with rich's ``Live`` on
the terminal's alternate screen: per queue its state, the packet, byte,
drop, kick and call rates since the previous refresh, the worker's CPU
and memory, and its restarts; the totals in the header; below the table,
each queue's drops by reason and why a broken queue broke.  Ctrl-C quits.
While the control process does not answer, the last view stays, marked
as stale.  Exit status: 0 on Ctrl-C or after ``--count`` refreshes, 1 if
the first query gets no answer.
"""
from __future__ import annotations

import argparse
import time
from typing import Any, Dict, Optional

__all__ = ["add_arguments", "command", "render"]


def add_arguments(ap: argparse.ArgumentParser) -> None:
    from .statscli import add_target_arguments
    add_target_arguments(ap)
    ap.add_argument("--interval", type=float, default=1.0,
                    help="refresh interval, seconds (default 1)")
    ap.add_argument("--count", type=int, default=0,
                    help="exit after this many refreshes (default: until Ctrl-C)")


def render(snap: Dict[str, Any], prev: Optional[Dict[str, Any]] = None,
           stale: Optional[str] = None):
    """The screen for ``snap`` (rates against ``prev``, if given) as a rich
    renderable; ``stale`` is a note shown when the snapshot is old."""
    from rich import box
    from rich.console import Group
    from rich.table import Table
    from rich.text import Text
    from .statscli import human_bytes, last_exit, recovery

    dt = snap["time"] - prev["time"] if prev else 0.0
    before = {q["index"]: q for q in prev["queues"]} if prev else {}

    def rate(row: Dict[str, Any], old: Optional[Dict[str, Any]], field: str) -> Optional[float]:
        if old is None or dt <= 0 or row.get(field, 0) < old.get(field, 0):
            return None
        return (row.get(field, 0) - old.get(field, 0)) / dt

    def fmt(r: Optional[float], scale: str = "") -> str:
        if r is None:
            return "-"
        if scale == "bytes":
            return human_bytes(r) + "/s"
        for unit, div in (("M", 1e6), ("k", 1e3)):
            if r >= div:
                return f"{r / div:.2f}{unit}"
        return f"{r:.0f}"

    t = snap["totals"]
    who = snap.get("name") or snap.get("socket") or "?"
    head = Text.assemble(
        ("shardvu top ", "bold"), (who, "bold cyan"),
        f"  {time.strftime('%H:%M:%S', time.localtime(snap['time']))}  ",
        f"{len(snap['queues'])} queues  ",
        f"packets {t['packets']}  bytes {human_bytes(t['bytes'])}  drops {t['drops']}  ",
        f"pps {fmt(rate(t, prev['totals'] if prev else None, 'packets'))}  ",
        f"cpu {t['cpu_percent']:.1f}%  private {human_bytes(t.get('private_bytes', 0))}  ",
        f"restarts {t.get('restarts', 0)}")
    if stale:
        head.append(f"  [{stale}]", style="bold red")
    table = Table(box=box.SIMPLE_HEAD, expand=True)
    for name in ("queue", "dir", "state", "pkt/s", "bytes/s", "drops/s", "kicks/s", "calls/s",
                 "suppr/s", "packets", "drops", "cpu%", "private", "rss", "restarts",
                 "last exit", "recovery", "pid"):
        table.add_column(name, justify="left" if name in ("dir", "state") else "right",
                         no_wrap=True)
    styles = {"running": "green", "idle": "", "broken": "bold red", "dead": "bold red",
              "starting": "yellow", "stopped": "yellow"}
    for q in snap["queues"]:
        old = before.get(q["index"])
        state = q["state"]
        if state == "dead" and q.get("exitcode") is not None:
            state = f"dead({q['exitcode']})"
        table.add_row(
            str(q["index"]), q["direction"], Text(state, style=styles.get(q["state"], "")),
            fmt(rate(q, old, "packets")), fmt(rate(q, old, "bytes"), "bytes"),
            fmt(rate(q, old, "drops")), fmt(rate(q, old, "kicks")), fmt(rate(q, old, "calls")),
            fmt(rate(q, old, "suppressed")), str(q["packets"]), str(q["drops"]),
            f"{q['cpu_percent']:.1f}", human_bytes(q.get("private_bytes", 0)),
            human_bytes(q["rss_bytes"]), str(q.get("restarts", 0)), last_exit(q), recovery(q),
            str(q["worker_pid"] or "-"))
    parts = [head, table]
    for q in snap["queues"]:
        if q.get("broken_reason"):
            parts.append(Text(f"queue {q['index']}: broken: {q['broken_reason']}", style="red"))
        reasons = {r: n for r, n in (q.get("drops_by_reason") or {}).items() if n}
        if reasons:
            parts.append(Text(f"queue {q['index']} drops: " + ", ".join(
                f"{r} {n}" for r, n in sorted(reasons.items(), key=lambda kv: -kv[1])), style="yellow"))
    parts.append(Text("Ctrl-C quits", style="dim"))
    return Group(*parts)


def command(args) -> int:
    """Run ``shardvu top`` with parsed ``args``; returns the exit status."""
    import sys

    import zmq
    from rich.console import Console
    from rich.live import Live

    from .statsapi import NoAnswer, query
    from .statscli import target_endpoint

    try:
        endpoint = target_endpoint(args)
    except ValueError as e:
        print(f"shardvu top: {e}", file=sys.stderr)
        return 1
    ctx = zmq.Context()
    try:
        try:
            snap = query(endpoint, args.timeout, ctx)
        except NoAnswer:
            print(f"shardvu top: no control process answered at {endpoint} "
                  f"within {args.timeout:g} s", file=sys.stderr)
            return 1
        prev: Optional[Dict[str, Any]] = None
        refreshes = 0
        console = Console()
        with Live(render(snap), console=console, screen=True, auto_refresh=False) as live:
            while True:
                refreshes += 1
                if args.count and refreshes >= args.count:
                    break
                time.sleep(max(0.05, args.interval))
                try:
                    new = query(endpoint, args.timeout, ctx)
                except NoAnswer:
                    live.update(render(snap, prev, stale="no answer"), refresh=True)
                    continue
                prev, snap = snap, new
                live.update(render(snap, prev), refresh=True)
        return 0
    except KeyboardInterrupt:
        return 0
    finally:
        ctx.destroy(linger=0)
