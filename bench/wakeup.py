"""Wake-up latency and idle cost of a worker.

    python3 bench/wakeup.py [--samples 200] [--idle-ms 20] [--worker-python PATH]

Starts ``shardvu run --port sink`` and shardvu's Python front-end.  For each
sample the ring is left idle for ``--idle-ms`` (the worker goes back to
sleep on its kick fd), then one frame is queued and kicked, and the
front-end busy-polls ``used->idx`` until the worker has returned the
buffer: that interval is the first-frame latency after idle (it includes
the eventfd wake-up and one ring pass).  Reports min/median/p90/max, and
the TX worker's CPU % over ``--idle-window`` idle seconds (psutil).

Placement matters: the front-end busy-polls, so it gets a CPU of its own
(``--frontend-cpu``, default 1) and the worker another (``--worker-cpu``,
default 0), as a guest's vCPU and a back-end would be placed.  Put both
on one CPU and the woken worker waits behind the spinning front-end for
the scheduler tick (~3.9 ms median at HZ=250 on the VM this was measured
on): that measures the scheduler, not the worker.
"""
from __future__ import annotations

import argparse
import os
import statistics
import sys
import tempfile
import time

import psutil

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from shardvu.testing.runtime import Runtime  # noqa: E402
from shardvu.testing.frontend import Frontend  # noqa: E402


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--samples", type=int, default=200)
    ap.add_argument("--idle-ms", type=float, default=20.0)
    ap.add_argument("--idle-window", type=float, default=5.0,
                    help="seconds over which the idle worker's CPU is measured (default 5: "
                         "CPU times come in 10 ms ticks, 0.2 %% of 5 s)")
    ap.add_argument("--worker-python")
    ap.add_argument("--worker-cpu", type=int, default=0,
                    help="CPU for the worker (shardvu run --cpus; default 0)")
    ap.add_argument("--frontend-cpu", type=int, default=1,
                    help="CPU for this process, the busy-polling front-end (default 1)")
    args = ap.parse_args()
    os.sched_setaffinity(0, {args.frontend_cpu})
    tmp = tempfile.mkdtemp(prefix="shardvu-wakeup-")
    sock = os.path.join(tmp, "vhost.sock")
    extra = ["--worker-python", args.worker_python] if args.worker_python else []
    extra += ["--cpus", str(args.worker_cpu)]
    rt = Runtime(sock, 1, "sink", *extra, log_path=os.path.join(tmp, "log"))
    try:
        with Frontend(sock) as fe:
            fe.negotiate()
            txq = fe.queues[1]
            lat = []
            for i in range(args.samples):
                time.sleep(args.idle_ms / 1e3)
                target = (txq.used_idx + 1) & 0xFFFF
                t0 = time.perf_counter()
                fe.send(0, [bytes(64)])
                while txq.used_idx != target:
                    pass
                lat.append((time.perf_counter() - t0) * 1e6)
                fe.reclaim_tx(0)
            pid = rt.queue_stats()[1]["worker_pid"]
            proc = psutil.Process(pid)
            time.sleep(0.5)                 # past the last sample's spin
            proc.cpu_percent(None)
            time.sleep(args.idle_window)
            idle_cpu = proc.cpu_percent(None)
    finally:
        rt.stop()
        for name in os.listdir(tmp):
            os.unlink(os.path.join(tmp, name))
        os.rmdir(tmp)
    lat.sort()
    interp = "PyPy" if args.worker_python else "CPython"
    print(f"{interp} worker on CPU {args.worker_cpu}, front-end on CPU {args.frontend_cpu}, "
          f"{args.samples} samples after {args.idle_ms:g} ms idle:")
    print(f"  first-frame latency  min {lat[0]:.0f} us  median {statistics.median(lat):.0f} us  "
          f"p90 {lat[int(len(lat) * 0.9)]:.0f} us  max {lat[-1]:.0f} us")
    print(f"  idle worker CPU      {idle_cpu:.1f} %")


if __name__ == "__main__":
    main()
