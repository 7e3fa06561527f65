#!/usr/bin/env python3
"""The same QEMU guest served by shardvu's tap port and by QEMU's own tap
back-end, side by side.

    python3 bench/tap_qemu.py [--rounds 3] [--queues 4] [--mib 48] [--flows 4]
        [--pings 20] [--out bench/out]

Each round boots the test guest (:mod:`shardvu.testing.guest`, mode
``tcp``) twice, in turn (the order alternating per round): once with
``-netdev vhost-user`` on ``shardvu run --port tap:IFNAME``, once with
``-netdev tap,ifname=IFNAME,vhost=off`` (QEMU's userspace virtio-net
device writing the tap itself: the job shardvu does, in QEMU's process).
Both taps are multi-queue with vnet headers, in a network namespace this
script creates; the host side is 10.77.0.1, the guest 10.77.0.2.

Reported per system: the median ping RTT (``--pings`` echo requests from
the guest) and the TCP throughput each way (``--mib`` MiB over ``--flows``
busybox-nc connections; guest → host timed from the first connection to the
last byte read, host → guest from the first connection to the guest closing
the last one), and shardvu's ratios to QEMU.  Under TCG the guest is the
bottleneck, so the ratios say what the back-end costs the guest, not what
it can do.
"""
from __future__ import annotations

import argparse
import json
import os
import shutil
import signal
import socket
import statistics
import sys
import tempfile
import threading
import time
from typing import Dict, List

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
HOST_IP, GUEST_IP, IFNAME = "10.77.0.1", "10.77.0.2", "shvqc0"


def _guest_to_host(port: int, size: int, marks: Dict) -> threading.Thread:
    srv = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    srv.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    srv.bind((HOST_IP, port))
    srv.listen(1)
    srv.settimeout(600)

    def run():
        try:
            conn, _ = srv.accept()
            marks.setdefault("first", time.monotonic())
            n = 0
            while n < size:
                chunk = conn.recv(1 << 20)
                if not chunk:
                    break
                n += len(chunk)
            marks[port] = (time.monotonic(), n)
            conn.close()
        finally:
            srv.close()
    t = threading.Thread(target=run, daemon=True)
    t.start()
    return t


def _host_to_guest(port: int, data: bytes, marks: Dict) -> threading.Thread:
    def run():
        with socket.create_connection((GUEST_IP, port), timeout=120) as c:
            marks.setdefault("first", time.monotonic())
            c.sendall(data)
            c.shutdown(socket.SHUT_WR)
            while c.recv(4096):          # the guest's nc closes once it has all
                pass
        marks[port] = (time.monotonic(), len(data))
    t = threading.Thread(target=run, daemon=True)
    t.start()
    return t


def _rate(marks: Dict, ports: List[int]) -> float:
    """Mbit/s from the first connection to the last flow's end."""
    end = max(marks[p][0] for p in ports)
    total = sum(marks[p][1] for p in ports)
    return total * 8 / (end - marks["first"]) / 1e6


def one(system: str, a, tmp: str, kernel: str, initramfs: str) -> Dict:
    from shardvu.testing.netns import sh
    from shardvu.testing.qemu import Guest
    from shardvu.testing.runtime import Runtime
    sock = os.path.join(tmp, "vu.sock")
    per = (a.mib // a.flows) << 20
    rt = g = None
    res: Dict = {"system": system}
    try:
        if system == "shardvu":
            rt = Runtime(sock, a.queues, f"tap:{IFNAME}", log_path=os.path.join(tmp, "shardvu.log"))
        else:
            sh(f"ip tuntap add dev {IFNAME} mode tap multi_queue vnet_hdr")
            sh(f"ip link set {IFNAME} up")
        sh(f"ip addr add {HOST_IP}/24 dev {IFNAME}")
        out_marks: Dict = {}
        sinks = [_guest_to_host(5001 + i, per, out_marks) for i in range(a.flows)]
        g = Guest(sock, a.queues, "tcp", f"shardvu.ip={GUEST_IP}/24 shardvu.peer={HOST_IP} "
                  f"shardvu.count={a.pings} shardvu.mb={a.mib} shardvu.flows={a.flows}",
                  mem="1G", kernel=kernel, initramfs=initramfs,
                  serial_log=os.path.join(tmp, f"serial-{system}.log"),
                  tap=IFNAME if system == "qemu-tap" else None).start()
        g.wait_for(r"SHARDVU listening", timeout=900)
        for t in sinks:
            t.join(5)
        in_marks: Dict = {}
        data = os.urandom(per)
        senders = [_host_to_guest(5101 + i, data, in_marks) for i in range(a.flows)]
        for t in senders:
            t.join(600)
        done = g.wait_done(timeout=600)
        ping = done["ping"][0]
        rtts = [float(x) for x in str(ping["rtts_ms"])[1:].split(",") if x]
        res.update(ping_median_ms=statistics.median(rtts), ping_received=ping["received"],
                   pings=ping["transmitted"],
                   out_mbps=round(_rate(out_marks, [5001 + i for i in range(a.flows)]), 1),
                   in_mbps=round(_rate(in_marks, [5101 + i for i in range(a.flows)]), 1),
                   md5_in=done["sum"][1]["md5"])
    except Exception as exc:                    # noqa: BLE001 - recorded, the run goes on
        res["error"] = f"{type(exc).__name__}: {exc}"[:2000]
    finally:
        if g is not None:
            g.cleanup()
        if rt is not None:
            rt.stop()
        sh(f"ip link del {IFNAME}", check=False)
    return res


def table(rows: Dict[str, List[Dict]]) -> str:
    def med(system, key):
        vals = [r[key] for r in rows.get(system, []) if key in r]
        return statistics.median(vals) if vals else float("nan")
    out = ["| system | ping RTT median ms | guest→host Mbit/s | host→guest Mbit/s |",
           "|---|---:|---:|---:|"]
    for system in ("shardvu", "qemu-tap"):
        out.append(f"| {system} | {med(system, 'ping_median_ms'):.3f} | {med(system, 'out_mbps'):.0f} | "
                   f"{med(system, 'in_mbps'):.0f} |")
    out.append(f"| shardvu/qemu-tap | {med('shardvu', 'ping_median_ms') / med('qemu-tap', 'ping_median_ms'):.2f} | "
               f"{med('shardvu', 'out_mbps') / med('qemu-tap', 'out_mbps'):.2f} | "
               f"{med('shardvu', 'in_mbps') / med('qemu-tap', 'in_mbps'):.2f} |")
    return "\n".join(out)


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--queues", type=int, default=4)
    ap.add_argument("--mib", type=int, default=48)
    ap.add_argument("--flows", type=int, default=4)
    ap.add_argument("--pings", type=int, default=20)
    ap.add_argument("--out", default=os.path.join(REPO, "bench", "out"))
    a = ap.parse_args(argv)
    from shardvu.testing.guest import build_guest
    from shardvu.testing.netns import can_netns, netns, sh
    why = can_netns()
    if why:
        print(f"tap_qemu.py: {why}", file=sys.stderr)
        return 2
    kernel, initramfs = build_guest()
    rows: Dict[str, List[Dict]] = {}
    tmp = tempfile.mkdtemp(prefix="svtq-", dir="/tmp")
    # SIGTERM unwinds like an error: processes stopped, the namespace removed
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(1))
    with netns("shvtq"):
        sh("sysctl -qw net.ipv6.conf.all.disable_ipv6=1 net.ipv6.conf.default.disable_ipv6=1")
        for rnd in range(a.rounds):
            order = ("shardvu", "qemu-tap") if rnd % 2 == 0 else ("qemu-tap", "shardvu")
            for system in order:
                r = one(system, a, tmp, kernel, initramfs)
                rows.setdefault(system, []).append(r)
                print(f"round {rnd + 1} {system:9s} " + (r["error"] if "error" in r else
                      f"ping {r['ping_median_ms']:.3f} ms  out {r['out_mbps']:.0f} Mbit/s  "
                      f"in {r['in_mbps']:.0f} Mbit/s"), flush=True)
    shutil.rmtree(tmp, ignore_errors=True)
    text = table(rows)
    print(text)
    os.makedirs(a.out, exist_ok=True)
    stamp = time.strftime("%Y%m%d-%H%M%S")
    with open(os.path.join(a.out, f"tap-qemu-{stamp}.json"), "w") as f:
        json.dump({"args": vars(a), "rows": rows}, f, indent=1)
    with open(os.path.join(a.out, f"tap-qemu-{stamp}.md"), "w") as f:
        f.write(text + "\n")
    return 0 if all("error" not in r for rs in rows.values() for r in rs) else 1


if __name__ == "__main__":
    sys.path.insert(0, REPO)
    sys.exit(main())
