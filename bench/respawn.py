"""The service gap of a killed worker: from kill -9 to the first frame its
queue serves again, under constant load.

``shardvu run --port loopback`` with one queue pair, fed by shardvu's Python
front-end (TX ring kept full, RX buffers re-posted as they come back).  Each
round kills the chosen worker(s) with SIGKILL and measures, on the front-end's
side of the ring (``used->idx`` in guest memory, read in a tight loop), the
time from the kill until the killed queue's used index moves again (for a
whole pair: until both have).  The used index is sampled after the kill
has been confirmed through a pidfd, so a publish by the dying worker cannot
count.  Prints p50/p90/p99/max per case, and a JSON line with every sample
when asked.

This is a benchmark, never a test: the figures depend on the machine.

    python3 bench/respawn.py                        # CPython workers, tx/rx/pair, 30 kills each
    python3 bench/respawn.py --worker-python .venv-pypy/bin/python --kills 50
    python3 bench/respawn.py --case pair --json out.json
"""
from __future__ import annotations

import argparse
import json
import os
import select
import signal
import statistics
import sys
import tempfile
import time
from typing import Dict, List, Sequence

import psutil

from shardvu.testing.frontend import Frontend
from shardvu.testing.runtime import Runtime

CASES: Dict[str, Sequence[int]] = {"tx": (1,), "rx": (0,), "pair": (0, 1)}


def _percentile(xs: List[float], p: float) -> float:
    s = sorted(xs)
    if not s:
        return float("nan")
    k = min(len(s) - 1, max(0, int(round(p / 100 * (len(s) - 1)))))
    return s[k]


class Load:
    """Constant load on pair 0: the TX ring refilled, RX buffers returned."""

    def __init__(self, fe: Frontend):
        self.fe = fe
        self.frame = bytes(64)
        self.received = 0
        fe.post_rx(0, 256)

    def step(self) -> None:
        fe = self.fe
        fe.reclaim_tx(0)
        fe.send(0, [self.frame] * 32)
        self.received += len(fe.receive(0, timeout=0, min_frames=1))


def _pid_of(rt: Runtime, q: int, old: int = 0, timeout: float = 30.0) -> int:
    """Queue ``q``'s worker pid, once it is not ``old``."""
    deadline = time.monotonic() + timeout
    while True:
        pid = rt.queue_stats()[q]["worker_pid"]
        if pid and pid != old:
            return pid
        if time.monotonic() > deadline:
            raise RuntimeError(f"queue {q}: no replacement for {old}:\n{rt.log()[-2000:]}")
        time.sleep(0.02)


def _spares_ready(rt: Runtime, want: int = 3) -> bool:
    """The zygote's spares and the one the control holds are all there."""
    n = 0
    for p in rt._children():
        try:
            n += p.name() == "shardvu-spare"
        except psutil.Error:
            pass
    return n >= want


def measure(rt: Runtime, fe: Frontend, victims: Sequence[int], kills: int, settle: float) -> List[float]:
    load = Load(fe)
    t_end = time.monotonic() + 1.0
    while time.monotonic() < t_end:     # warm up: traffic flows
        load.step()
    gaps: List[float] = []
    pids = {q: _pid_of(rt, q) for q in victims}
    for _ in range(kills):
        pidfds = {q: os.pidfd_open(pids[q]) for q in victims}
        t_kill = time.perf_counter()
        for q in victims:
            signal.pidfd_send_signal(pidfds[q], signal.SIGKILL)
        for q in victims:
            select.select([pidfds[q]], [], [], 10)
            os.close(pidfds[q])
        base = {q: fe.queues[q].used_idx for q in victims}
        back: Dict[int, float] = {}
        deadline = t_kill + 10
        while len(back) < len(victims):
            for q in victims:
                if q not in back and fe.queues[q].used_idx != base[q]:
                    back[q] = time.perf_counter()
            load.step()
            if time.perf_counter() > deadline:
                raise RuntimeError(f"queues {victims} not served 10 s after the kill:\n{rt.log()[-2000:]}")
        gaps.append(max(back.values()) - t_kill)
        for q in victims:
            pids[q] = _pid_of(rt, q, pids[q])
        # next kill once the zygote has its spares again (a cold PyPy spare
        # takes a second or more): the gap measured is a respawn's, not a
        # wait for a spare
        t_end = time.monotonic() + settle
        while time.monotonic() < t_end or not _spares_ready(rt):
            load.step()
    return gaps


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--case", choices=sorted(CASES), action="append",
                    help="which worker(s) to kill (repeatable; default all)")
    ap.add_argument("--kills", type=int, default=30, help="kills per case (default 30)")
    ap.add_argument("--settle", type=float, default=0.3,
                    help="seconds of load between kills (default 0.3)")
    ap.add_argument("--worker-python", help="interpreter for the workers (e.g. PyPy)")
    ap.add_argument("--json", help="write every sample here")
    args = ap.parse_args(argv)
    interp = "pypy" if args.worker_python and "pypy" in args.worker_python else "cpython"
    extra = ["--worker-python", args.worker_python] if args.worker_python else []
    # The crash-loop policy would back off (and give up): kills here are
    # deliberate, the gap to measure is the respawn path's own.
    os.environ["SHARDVU_CRASH_POLICY"] = "100000/1:0"
    results = {}
    for case in args.case or ["tx", "rx", "pair"]:
        d = tempfile.mkdtemp(prefix="shardvu-respawn-")
        rt = Runtime(os.path.join(d, "vhost.sock"), 1, "loopback", *extra)
        try:
            with Frontend(rt.sock) as fe:
                fe.negotiate()
                gaps = measure(rt, fe, CASES[case], args.kills, args.settle)
        finally:
            rt.stop()
        ms = [g * 1e3 for g in gaps]
        results[case] = ms
        print(f"{interp:8s} kill {case:4s}  n={len(ms):3d}  p50 {_percentile(ms, 50):6.1f} ms  "
              f"p90 {_percentile(ms, 90):6.1f} ms  p99 {_percentile(ms, 99):6.1f} ms  "
              f"max {max(ms):6.1f} ms  mean {statistics.mean(ms):6.1f} ms", flush=True)
    if args.json:
        with open(args.json, "w") as f:
            json.dump({"interpreter": interp, "kills": args.kills, "gaps_ms": results}, f, indent=1)
    return 0


if __name__ == "__main__":
    sys.exit(main())
