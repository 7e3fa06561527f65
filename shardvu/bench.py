"""``shardvu bench``: a self-contained traffic run, needing nothing but Python.

It starts the sharded runtime (``shardvu run``: a control process and one
worker process per virtqueue) and drives it with shardvu's own Python
front-end on ``--queues`` queue pairs for ``--seconds``:

- ``--port sink``: the front-end sends frames on every TX ring;
- ``--port loopback``: it sends and takes every frame back from RX;
- ``--port generator``: it only posts RX buffers and takes frames.

Progress is printed each second; then per-queue and total rates, counted
by the workers and read from the runtime's stats.  The Python front-end in
one process is usually the bottleneck here: these figures are a smoke test
and a regression signal, not a comparison with other back-ends (bench/
compares against DPDK's vhost, driven by DPDK's virtio-user).
"""
from __future__ import annotations

import argparse
import os
import sys
import tempfile
import time
from typing import Dict, List, Optional

from .testing.frontend import Frontend


def run(queues: int = 2, seconds: float = 5.0, port: str = "loopback", frame_size: int = 64,
        batch: int = 32, out=sys.stdout, connect: Optional[str] = None,
        name: Optional[str] = None) -> Dict:
    """Run the benchmark and print a report to ``out``.  Returns ``{"port",
    "queues": [{"index", "direction", "packets", "pps"}...], "seconds",
    "total_pps", "frontend": {"sent", "received"}}``.

    By default it starts its own ``shardvu run``.  With ``connect`` (a
    vhost-user socket path) it drives an instance already running there
    instead, whose stats it reads by ``name`` (its ``--name``) or by the
    socket path; ``port`` must then say what that instance's port does with
    frames (``sink``: send only; ``loopback``: send and take back;
    ``generator``: take only)."""
    from .statsapi import endpoints, name_endpoints, query

    tmp = rt = None
    if connect is None:
        from .testing.runtime import Runtime
        tmp = tempfile.mkdtemp(prefix="shardvu-bench-")
        sock = os.path.join(tmp, "vhost.sock")
        rt = Runtime(sock, queues, port, "--frame-size", str(frame_size), "--log-level", "WARNING",
                     log_path=os.path.join(tmp, "shardvu.log"))
        stats = rt.stats
        who = f"{2 * queues} workers (control pid {rt.proc.pid})"
    else:
        sock = connect
        endpoint = name_endpoints(name)[1] if name else endpoints(connect)[1]
        stats = lambda: query(endpoint, 2.0)    # noqa: E731
        who = f"shardvu at {connect}"
    sent = received = 0
    try:
        frame = (bytes(range(256)) * (frame_size // 256 + 1))[:frame_size]
        frames = [frame] * batch
        with Frontend(sock, queue_pairs=queues, mem_size=max(64, 16 * queues) << 20) as fe:
            fe.negotiate()
            if port != "sink":
                for p in range(queues):
                    fe.post_rx(p, 256)
            base = _packets(stats)
            print(f"shardvu bench: {queues} queue pair(s), port {port}, {frame_size}-byte frames, "
                  f"{seconds:g} s; {who}", file=out, flush=True)
            start = last = time.monotonic()
            last_total = 0
            while True:
                now = time.monotonic()
                if now - start >= seconds:
                    break
                for p in range(queues):
                    if port != "generator":
                        sent += fe.send(p, frames)
                    if port != "sink":
                        received += len(fe.receive(p, timeout=0, min_frames=0))
                if now - last >= 1.0:
                    total = sum(_packets(stats).values()) - sum(base.values())
                    print(f"  {now - start:4.1f} s  {(total - last_total) / (now - last) / 1e3:9.1f} kpps"
                          f"  (all workers)", file=out, flush=True)
                    last, last_total = now, total
            elapsed = time.monotonic() - start
            time.sleep(0.6)                       # one more stats period
            final = _packets(stats)
    finally:
        if rt is not None:
            rt.stop()
            for entry in os.listdir(tmp):
                os.unlink(os.path.join(tmp, entry))
            os.rmdir(tmp)
    rows = []
    for q in sorted(final):
        n = final[q] - base.get(q, 0)
        rows.append({"index": q, "direction": "rx" if q % 2 == 0 else "tx", "packets": n,
                     "pps": n / elapsed})
    total = sum(r["pps"] for r in rows)
    print_report(rows, total, out)
    print(f"front-end: sent {sent}, received {received}", file=out)
    return {"port": port, "queues": rows, "seconds": elapsed, "total_pps": total,
            "frontend": {"sent": sent, "received": received}}


def print_report(rows: List[Dict], total_pps: float, out) -> None:
    """The per-queue result table (rich), plain text on ``out``."""
    from rich import box
    from rich.console import Console
    from rich.table import Table
    table = Table(box=box.SIMPLE_HEAD, show_footer=True)
    table.add_column("queue", "all", justify="right")
    table.add_column("dir")
    table.add_column("packets", str(sum(r["packets"] for r in rows)), justify="right")
    table.add_column("kpps", f"{total_pps / 1e3:.1f}", justify="right")
    for r in rows:
        table.add_row(str(r["index"]), r["direction"], str(r["packets"]), f"{r['pps'] / 1e3:.1f}")
    console = Console(file=out, width=80, color_system=None, force_terminal=False)
    console.print(table)


def _packets(stats) -> Dict[int, int]:
    return {q["index"]: q["packets"] for q in stats()["queues"]}


def add_arguments(ap: argparse.ArgumentParser) -> None:
    ap.add_argument("--queues", type=int, default=2, help="queue pairs (default 2)")
    ap.add_argument("--seconds", type=float, default=5.0)
    ap.add_argument("--port", default="loopback", choices=["sink", "loopback", "generator"])
    ap.add_argument("--frame-size", type=int, default=64)
    ap.add_argument("--connect", metavar="PATH",
                    help="drive a shardvu already running on this vhost-user socket "
                         "(its --port must match --port) instead of starting one")
    ap.add_argument("--name", help="with --connect: that instance's --name, to read its stats")


def command(args) -> int:
    from .statsapi import NoAnswer
    try:
        result = run(args.queues, args.seconds, args.port, args.frame_size,
                     connect=args.connect, name=args.name)
    except (OSError, ValueError, NoAnswer) as exc:    # nothing listening, bad name, no stats
        print(f"shardvu bench: {exc}", file=sys.stderr)
        return 1
    return 0 if result["total_pps"] > 0 else 1


def main(argv: Optional[List[str]] = None) -> int:
    ap = argparse.ArgumentParser(prog="shardvu bench", description=__doc__.splitlines()[0])
    add_arguments(ap)
    return command(ap.parse_args(argv))
