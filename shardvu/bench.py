"""``shardvu bench``: a self-contained traffic run, nothing needed but Python.

A back-end process (the echo example on the single-process runner) serves
a socket; this process plays the front-end with :class:`shardvu.frontend.
Frontend`, pushes 64-byte (``--frame-size``) frames on every queue pair's
TX ring and takes them back from RX, for ``--seconds``.  It prints progress
each second, then per-queue and total rates.

The rates measure the whole loop — a Python front-end included — on this
machine at this minute; they are for spotting regressions and sanity, not
for comparison with other back-ends (bench/ does that, against DPDK).
"""
from __future__ import annotations

import argparse
import os
import subprocess
import sys
import tempfile
import time
from typing import List, Optional

from .frontend import Frontend


def _wait_socket(path: str, proc: subprocess.Popen, timeout: float = 10.0) -> None:
    deadline = time.monotonic() + timeout
    while not os.path.exists(path):
        if proc.poll() is not None:
            raise RuntimeError(f"back-end exited with {proc.returncode}")
        if time.monotonic() > deadline:
            raise RuntimeError("back-end did not create its socket")
        time.sleep(0.02)


def run(queues: int = 2, seconds: float = 5.0, frame_size: int = 64, batch: int = 32,
        out=sys.stdout) -> dict:
    """Run the benchmark; returns ``{"queues": [{"pair", "tx", "rx"}...],
    "seconds", "tx_pps", "rx_pps"}`` and prints a report to ``out``."""
    tmp = tempfile.mkdtemp(prefix="shardvu-bench-")
    path = os.path.join(tmp, "vhost.sock")
    cmd = [sys.executable, "-m", "shardvu.echo", "--socket", path,
           "--queue-pairs", str(queues), "--log-level", "WARNING"]
    proc = subprocess.Popen(cmd)
    tx = [0] * queues
    rx = [0] * queues
    try:
        _wait_socket(path, proc)
        frame = bytes(range(256)) * (frame_size // 256 + 1)
        frames = [frame[:frame_size]] * batch
        with Frontend(path, queue_pairs=queues, queue_size=256,
                      mem_size=max(64, 16 * queues) << 20) as fe:
            fe.negotiate()
            for p in range(queues):
                fe.post_rx(p, 256)
            print(f"shardvu bench: {queues} queue pair(s), {frame_size}-byte frames, "
                  f"{seconds:g} s, echo back-end (pid {proc.pid})", file=out, flush=True)
            start = last = time.monotonic()
            end = start + seconds
            last_rx = 0
            while True:
                now = time.monotonic()
                if now >= end:
                    break
                for p in range(queues):
                    tx[p] += fe.send(p, frames)
                    rx[p] += len(fe.receive(p, timeout=0, min_frames=0))
                if now - last >= 1.0:
                    total = sum(rx)
                    print(f"  {now - start:5.1f} s  {(total - last_rx) / (now - last) / 1e3:8.1f} kpps",
                          file=out, flush=True)
                    last, last_rx = now, total
            # drain what is still in flight
            drain_end = time.monotonic() + 1.0
            while sum(rx) < sum(tx) and time.monotonic() < drain_end:
                for p in range(queues):
                    rx[p] += len(fe.receive(p, timeout=0.01, min_frames=0))
            elapsed = time.monotonic() - start
    finally:
        proc.terminate()
        proc.wait(5)
        try:
            os.rmdir(tmp)
        except OSError:
            pass
    result = {
        "queues": [{"pair": p, "tx": tx[p], "rx": rx[p]} for p in range(queues)],
        "seconds": elapsed, "tx_pps": sum(tx) / elapsed, "rx_pps": sum(rx) / elapsed,
    }
    print(f"\n{'pair':>4} {'tx frames':>10} {'rx frames':>10} {'rx kpps':>9}", file=out)
    for q in result["queues"]:
        print(f"{q['pair']:>4} {q['tx']:>10} {q['rx']:>10} {q['rx'] / elapsed / 1e3:>9.1f}", file=out)
    print(f"{'all':>4} {sum(tx):>10} {sum(rx):>10} {result['rx_pps'] / 1e3:>9.1f}", file=out)
    return result


def main(argv: Optional[List[str]] = None) -> int:
    ap = argparse.ArgumentParser(prog="shardvu bench", description=__doc__.splitlines()[0])
    add_arguments(ap)
    args = ap.parse_args(argv)
    return command(args)


def add_arguments(ap: argparse.ArgumentParser) -> None:
    ap.add_argument("--queues", type=int, default=2, help="queue pairs (default 2)")
    ap.add_argument("--seconds", type=float, default=5.0)
    ap.add_argument("--frame-size", type=int, default=64)


def command(args) -> int:
    result = run(args.queues, args.seconds, args.frame_size)
    return 0 if result["queues"] and all(q["rx"] for q in result["queues"]) else 1
