#!/usr/bin/env python3
"""Worker memory, idle and under loopback traffic.

    python3 bench/memory.py [--queues 8] [--seconds 4] [--worker-python PATH]

Starts ``shardvu run --queues N --port loopback --cpus 0``, reads every
worker's resident and private memory from ``Runtime.stats()`` while idle,
then drives DPDK testpmd's virtio-user front-end in ``io`` mode on all N
queue pairs for ``--seconds`` and reads them again.  *Private* is RSS less
shared pages: a copying worker's RSS also counts every page of the
front-end's memfds it touched through its mapping, which is the front-end's
memory, not the worker's.  Needs ``dpdk-testpmd``.
"""
from __future__ import annotations

import argparse
import os
import shutil
import sys
import tempfile
import time

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from shardvu.testing.runtime import Runtime  # noqa: E402
from shardvu.testing.testpmd import TestPmd  # noqa: E402


def _mib(stats, key):
    vals = [q[key] / 2**20 for q in stats.values()]
    return f"{min(vals):.1f}–{max(vals):.1f}"


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--queues", type=int, default=8)
    ap.add_argument("--seconds", type=float, default=4.0)
    ap.add_argument("--worker-python")
    args = ap.parse_args()
    tmp = tempfile.mkdtemp(prefix="shardvu-memory-")
    sock = os.path.join(tmp, "vhost.sock")
    extra = ["--cpus", "0"] + (["--worker-python", args.worker_python] if args.worker_python else [])
    rt = Runtime(sock, args.queues, "loopback", *extra, log_path=os.path.join(tmp, "log"))
    try:
        time.sleep(1.0)
        idle = rt.queue_stats()
        with TestPmd.virtio_user(sock, args.queues, mode="io", tx_first=True, txpkts=64,
                                 stats_period=0, extra_eal=["--main-lcore", "0"]) as pmd:
            pmd.wait_started()
            time.sleep(args.seconds)
            busy = rt.queue_stats()
    finally:
        rt.stop()
        shutil.rmtree(tmp, ignore_errors=True)
    interp = "PyPy" if args.worker_python else "CPython"
    frames = sum(q["packets"] for q in busy.values())
    print(f"{interp} workers, {args.queues} queue pair(s) (MiB per worker, min–max):")
    print(f"  idle             RSS {_mib(idle, 'rss_bytes')}  private {_mib(idle, 'private_bytes')}")
    print(f"  under loopback   RSS {_mib(busy, 'rss_bytes')}  private {_mib(busy, 'private_bytes')}"
          f"  ({frames} frames counted)")


if __name__ == "__main__":
    main()
