#!/usr/bin/env python3
"""shardvu beside DPDK's vhost PMD, in one run.

    python3 bench/compare.py [--systems shardvu,shardvu-pypy,dpdk]
        [--workloads tx,rx,loop] [--sizes 64,1518] [--queues 1,2,4,8]
        [--rounds 3] [--seconds 5] [--warmup 1] [--out bench/out] [--plot]
        [--worker-python PATH] [--shardvu-cpus LIST] [--pcap]

The same front-end — DPDK testpmd with a virtio-user port (``--no-huge -m
1024 --total-num-mbufs=32768``) — drives, in turn, up to three vhost-user
back-ends on the same socket:

* ``shardvu``: ``shardvu run --port sink|generator|loopback --cpus 0``
  (control process + one worker process per virtqueue, workers on CPU 0,
  CPython: the interpreter running this script);
* ``shardvu-pypy``: the same with ``--worker-python PATH`` (default
  ``<repo>/.venv-pypy/bin/python``): the workers run under PyPy, the
  control process stays on this interpreter;
* ``dpdk``: ``dpdk-testpmd --vdev net_vhost0,iface=SOCK,queues=N`` in the
  matching forwarding mode, its forwarding lcore on CPU 0.

Workloads (front-end mode → back-end):

==========  ===========================  ================  ================
workload    virtio-user testpmd          shardvu --port    DPDK vhost mode
==========  ===========================  ================  ================
``tx``      ``txonly --txpkts=SIZE``     ``sink``          ``rxonly``
``rx``      ``rxonly``                   ``generator``     ``txonly --txpkts=SIZE``
``loop``    ``io --tx-first --txpkts``   ``loopback``      ``io``
``tap-tx``  ``txonly --txpkts=SIZE``     ``tap:IFNAME``    ``io``, net_tap
``tap-rx``  ``rxonly``                   ``tap:IFNAME``    ``io``, net_tap
``afp-tx``  ``txonly --txpkts=SIZE``     ``af_packet:VA``  ``io``, net_af_packet
``afp-rx``  ``rxonly``                   ``af_packet:VA``  ``io``, net_af_packet
==========  ===========================  ================  ================

The af_packet workloads do the same on a veth pair (VA, its peer VP) made
in that namespace: shardvu ``--port af_packet:VA`` against ``testpmd
--vdev net_vhost0,... --vdev net_af_packet0,iface=VA --forward-mode=io``
(the same kernel path on both sides); ``afp-tx`` is counted on VP's
``rx_packets``, ``afp-rx`` is fed by a ``net_af_packet`` txonly on VP and
counted by the front-end.

The tap workloads connect the guest to a Linux tap made inside a network
namespace this script creates (and removes): shardvu ``--port tap:IFNAME``
against DPDK doing the same job, ``testpmd --vdev net_vhost0,... --vdev
net_tap0,iface=IFNAME --forward-mode=io``.  ``tap-tx`` (guest → tap) is
counted on the tap interface itself (its ``rx_packets``, read with
rtnetlink: the kernel's count of what either back-end wrote into it);
``tap-rx`` (tap → guest) has a third testpmd, a ``net_af_packet`` vdev on
the tap's host side running ``txonly`` (``--txonly-multi-flow`` with
several pairs) on the front-end's CPUs, and is counted by the front-end
(rxonly).  On two CPUs that third busy poller oversubscribes the machine:
those cells are reported, not gated.

``loop`` uses DPDK's ``io`` mode, not ``macswap``: shardvu's loopback hands
the guest's frames back unmodified, and ``io`` is the DPDK mode that does
exactly that (dequeue copies out of the guest's TX buffers into mbufs,
enqueue copies them into its RX buffers; the frame bytes are not touched).
``macswap`` would add a header rewrite per packet that shardvu does not do.

CPU placement (the machine this was written on has two CPUs, 0 and 1):
testpmd needs a main lcore plus a forwarding lcore, so each testpmd gets
``-l 0,1`` and ``--main-lcore``: the front-end ``--main-lcore 0`` (its
forwarding lcore, ``rte-worker-1``, busy-polls CPU 1), DPDK's vhost
``--main-lcore 1`` (its forwarding lcore, ``rte-worker-0``, polls CPU 0).
The main lcores sleep (no ``--stats-period``; counters come from DPDK's
telemetry socket, below).  shardvu's
workers all go on CPU 0 (``--cpus 0``), its control process is left
unpinned (idle after set-up, apart from answering stats queries).  With
more CPUs, ``--fe-cpus``/``--be-cpus`` move them, and ``--shardvu-cpus``
gives shardvu's workers a CPU list of their own.  The forwarding part of
``--fe-cpus``/``--be-cpus`` may be a range (``0,2-9``): testpmd then gets
``--nb-cores`` forwarding lcores and spreads the queues over them, at
most one lcore per queue — to give the front-end enough CPU to feed 8
queues, or DPDK's vhost as many CPUs as shardvu's workers.  By default
every queue count gets the same one CPU on the back-end side (DPDK's one
forwarding lcore serves all N queues; all 2N shardvu workers share CPU
0), so a rate at N queues
against the rate at 1 queue measures what N× the processes cost.  Note
that ``shardvu run --cpus`` pins worker *i* to ``cpus[i % len(cpus)]``:
``--shardvu-cpus 0,1`` puts every RX worker on CPU 0 and every TX worker
on CPU 1, i.e. (``tx``) on the front-end's busy-polling forwarding CPU.

Rates are counted by the *receiver* of the traffic: for ``tx`` the
back-end (shardvu: the sum of its TX-queue workers' ``packets``; DPDK
vhost: its port's RX-packets), for ``rx`` and ``loop`` the front-end (its
port's RX-packets).  Never the sender's counters: testpmd's txonly counts
what it *enqueued*, which says nothing about what the other side took.
Counters are sampled while traffic runs and time-stamped
when read: testpmd's through DPDK's telemetry socket (``/ethdev/stats,0``,
every 0.25 s and exactly at the window's edges; testpmd's own
``--stats-period 1`` printed only every ~2 s on the VM this was written
on), shardvu's through ``Runtime.stats()`` (each worker publishes every
0.5 s; a sample's time is the control process's receipt time, ``time -
age_s``).  The rate is Δcount/Δt between the first sample after
``--warmup`` seconds of forwarding and the last sample inside the
following ``--seconds``: start-up and shut-down are excluded, and sums
over queues are made of per-queue rates over each queue's own samples.

Measurements alternate between the systems within each configuration,
the order rotating each round (A B C, B C A, C A B, …; with two systems
A B, B A), so a drift of the shared machine during a configuration weighs
on all of them.  Each measurement starts fresh processes (DPDK's own rate
is bimodal per process start).  Reported: per system the median of the
rounds with min and max; per shardvu variant its ratio to DPDK: the ratio
of the medians and the range of the per-round (paired) ratios; CPU % per
process over the same window (psutil ``cpu_times`` deltas; shardvu's
workers found through ``Runtime.stats()``'s ``worker_pid``).  Absolute
rates on a shared machine are not worth much; the ratios measured in one
run are the result.

``--pcap`` runs every shardvu cell with ``shardvu run --pcap FILE`` (FILE
in the cell's temporary directory, removed after it): the capture
overhead, measured by comparing a run with ``--pcap`` against one
without.  Each such result records ``pcap``: the frames the file holds
(counted block by block), the capture records dropped per queue because
a ring was full (the capture process's last log line) and the file's size.

Outputs (``--out``): ``compare-<timestamp>.json`` (every sample and the
summary), ``compare-<timestamp>.md`` (the table), and with ``--plot``
``compare-<timestamp>.png`` (Mpps against queues per system; needs
matplotlib: ``pip install -e '.[bench]'``).
"""
from __future__ import annotations

import argparse
import contextlib
import json
import os
import shutil
import signal
import socket
import sys
import tempfile
import time
from typing import Dict, List, Optional, Sequence, Tuple

import psutil

import abrun
from abrun import LABELS, SHARDVU, SYSTEMS, machine_busy, med
from shardvu.testing.testpmd import RUNTIME_DIR, TestPmd, have_testpmd, leftover_testpmds, vhost_vdev

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
WORKLOADS = {
    #         front-end mode, shardvu port, DPDK vhost mode, who counts
    "tx":   ("txonly", "sink", "rxonly", "backend"),
    "rx":   ("rxonly", "generator", "txonly", "frontend"),
    "loop": ("io", "loopback", "io", "frontend"),
    "tap-tx": ("txonly", "tap", "io", "tap"),
    "tap-rx": ("rxonly", "tap", "io", "frontend"),
    "afp-tx": ("txonly", "af_packet", "io", "tap"),
    "afp-rx": ("rxonly", "af_packet", "io", "frontend"),
}
_taps = iter(range(1 << 30))
POLL_S = 0.05               # sampling loop period
STATS_POLL_S = 0.25         # shardvu stats query period (each worker publishes every 0.5 s)


# -- counter sampling ---------------------------------------------------------

class TelemetrySampler:
    """(time, port 0 counters) series from a testpmd's DPDK telemetry socket
    (``/var/run/dpdk/<file-prefix>/dpdk_telemetry.v2``, command
    ``/ethdev/stats,0``): rte_eth_stats_get() on demand, answered by a
    control thread in well under a millisecond; the sample time is the
    midpoint of request and answer."""

    def __init__(self, file_prefix: str, period: float = 0.25, timeout: float = 10.0):
        self.path = os.path.join(RUNTIME_DIR, file_prefix, "dpdk_telemetry.v2")
        self.period = period
        self.next_due = 0.0
        self.samples: List[Tuple[float, Dict]] = []
        deadline = time.monotonic() + timeout
        while True:
            try:
                self.sock = socket.socket(socket.AF_UNIX, socket.SOCK_SEQPACKET)
                self.sock.settimeout(2.0)
                self.sock.connect(self.path)
                self.sock.recv(16384)                 # {"version", "pid", "max_output_len"}
                break
            except OSError:
                self.sock.close()
                if time.monotonic() > deadline:
                    raise RuntimeError(f"no DPDK telemetry socket at {self.path}") from None
                time.sleep(0.05)

    def sample(self) -> Dict:
        ta = time.time()
        self.sock.send(b"/ethdev/stats,0")
        reply = json.loads(self.sock.recv(1 << 16))["/ethdev/stats"]
        t = (ta + time.time()) / 2
        self.samples.append((t, reply))
        return reply

    def poll(self) -> None:
        now = time.monotonic()
        if now >= self.next_due:
            self.next_due = now + self.period
            try:
                self.sample()
            except (OSError, ValueError, KeyError):
                pass

    def series(self, key: str) -> List[Tuple[float, int]]:
        return [(t, f[key]) for t, f in self.samples if key in f]

    def close(self) -> None:
        self.sock.close()


class TapSampler:
    """(time, counter) series of a kernel interface (rtnetlink), e.g. a
    tap's ``rx_packets``: what the back-end under test wrote into it."""

    def __init__(self, ifname: str, period: float = 0.1):
        from shardvu.workers.tap import link_stats
        self.ifname, self.period, self._stats = ifname, period, link_stats
        self.next_due = 0.0
        self.samples: List[Tuple[float, Dict]] = []

    def sample(self) -> None:
        ta = time.time()
        st = self._stats(self.ifname)
        self.samples.append(((ta + time.time()) / 2, st))

    def poll(self) -> None:
        now = time.monotonic()
        if now >= self.next_due:
            self.next_due = now + self.period
            try:
                self.sample()
            except Exception:                   # noqa: BLE001 - the tap may be gone
                pass

    def series(self, key: str) -> List[Tuple[float, int]]:
        return [(t, f[key]) for t, f in self.samples if key in f]


class ShardvuSampler:
    """Per-queue (receipt time, packets) series from ``Runtime.stats()``."""

    def __init__(self, rt):
        self.rt = rt
        self.series: Dict[int, List[Tuple[float, int]]] = {}
        self.next_due = 0.0
        self.last: Optional[Dict] = None

    def poll(self) -> None:
        now = time.monotonic()
        if now < self.next_due:
            return
        self.next_due = now + STATS_POLL_S
        try:
            snap = self.rt.stats(timeout=1.0)
        except Exception:
            return
        self.last = snap
        for q in snap["queues"]:
            if q["state"] == "starting":
                continue
            t = snap["time"] - q["age_s"]
            s = self.series.setdefault(q["index"], [])
            if not s or q["packets"] != s[-1][1] or t - s[-1][0] > 0.25:
                if s and t <= s[-1][0]:
                    continue
                s.append((t, q["packets"]))


def window_rate(series: Sequence[Tuple[float, int]], t0: float, t1: float) -> Optional[Dict]:
    """Δcount/Δt between the first sample at or after ``t0`` and the last at
    or before ``t1``; None if fewer than two samples or they span less than
    half the window."""
    inside = [(t, n) for t, n in series if t0 - 1e-3 <= t <= t1 + 1e-3]
    if len(inside) < 2:
        return None
    (ta, na), (tb, nb) = inside[0], inside[-1]
    if tb - ta < 0.5 * (t1 - t0):
        return None
    return {"pps": (nb - na) / (tb - ta), "packets": nb - na, "span_s": round(tb - ta, 3),
            "samples": len(inside)}


def shardvu_tx_rate(sampler: ShardvuSampler, queues: int, t0: float, t1: float) -> Optional[Dict]:
    """shardvu's received rate: the sum of its TX-queue workers' (queues 1,
    3, 5, …) window rates, each over its own samples; None unless every
    queue has one."""
    per_q = {2 * p + 1: window_rate(sampler.series.get(2 * p + 1, []), t0, t1) for p in range(queues)}
    if not all(v is not None for v in per_q.values()):
        return None
    return {"pps": sum(v["pps"] for v in per_q.values()),
            "per_queue_pps": {str(q): round(v["pps"]) for q, v in per_q.items()},
            "samples": min(v["samples"] for v in per_q.values()),
            "span_s": min(v["span_s"] for v in per_q.values())}


# -- CPU ----------------------------------------------------------------------

def _thread_name(pid: int, tid: int) -> str:
    try:
        with open(f"/proc/{pid}/task/{tid}/comm") as f:
            return f.read().strip()
    except OSError:
        return str(tid)


def cpu_snapshot(pids: Dict[str, int]) -> Dict[str, Dict]:
    """{label: {"t", "cpu", "threads": {name: cpu}}} (cpu: user+system s)."""
    out = {}
    for label, pid in pids.items():
        try:
            p = psutil.Process(pid)
            ct = p.cpu_times()
            threads = {}
            for th in p.threads():
                name = _thread_name(pid, th.id)
                threads[name] = threads.get(name, 0.0) + th.user_time + th.system_time
            out[label] = {"t": time.monotonic(), "cpu": ct.user + ct.system, "threads": threads}
        except psutil.Error:
            pass
    return out


def others_percent(a: Tuple[float, float], b: Tuple[float, float], ours: Dict[str, Dict]) -> float:
    """CPU % (of one CPU) used by everything but the measured processes over
    the window: other users of this shared machine, plus this script."""
    dt = b[0] - a[0]
    total = 100 * (b[1] - a[1]) / dt if dt > 0 else 0.0
    return round(max(0.0, total - sum(v["percent"] for v in ours.values())), 1)


def cpu_percent(a: Dict[str, Dict], b: Dict[str, Dict]) -> Dict[str, Dict]:
    """Per label: {"percent", "threads": {name: percent} (those over 1 %)}."""
    out = {}
    for label, sb in b.items():
        sa = a.get(label)
        if not sa:
            continue
        dt = sb["t"] - sa["t"]
        if dt <= 0:
            continue
        threads = {n: round(100 * (v - sa["threads"].get(n, 0.0)) / dt, 1)
                   for n, v in sb["threads"].items()}
        out[label] = {"percent": round(100 * (sb["cpu"] - sa["cpu"]) / dt, 1),
                      "threads": {n: v for n, v in threads.items() if v >= 1.0}}
    return out


# -- one measurement -----------------------------------------------------------

def backend_pids(rt, be) -> Dict[str, int]:
    """Pids of the back-end under test: DPDK's testpmd (``be``), or shardvu's
    control process and its workers (``rt``, a Runtime)."""
    pids: Dict[str, int] = {}
    if be is not None:
        pids["be"] = be.pid
    if rt is not None:
        pids["control"] = rt.proc.pid
        try:
            for q in rt.stats(timeout=1.0)["queues"]:
                if q.get("worker_pid"):
                    pids[f"w{q['index']}"] = q["worker_pid"]
        except Exception:                   # noqa: BLE001 - stats may be gone already
            pass
        from shardvu.testing.runtime import _is_capture
        for p in rt._children():            # --pcap: the capture process writes the file
            if _is_capture(p):
                pids["capture"] = p.pid
    return pids


class Measurement:
    def __init__(self, args, system: str, workload: str, size: int, queues: int):
        self.args, self.system, self.workload, self.size, self.queues = args, system, workload, size, queues

    def run(self) -> Dict:
        a = self.args
        fe_mode, port, be_mode, counter = WORKLOADS[self.workload]
        tmp = tempfile.mkdtemp(prefix="shardvu-cmp-")
        sock = os.path.join(tmp, "vhost.sock")
        res: Dict = {"system": self.system, "workload": self.workload, "size": self.size,
                     "queues": self.queues, "start": time.time()}
        rt = be = fe = None
        pcap = None
        self.feeder = None
        sockets: List[TelemetrySampler] = []
        tap = f"shvb{next(_taps)}" if port in ("tap", "af_packet") else None
        peer = tap                  # the interface counted (tx) or fed (rx)
        kernel_vdev = f"net_tap0,iface={tap}"
        if port == "af_packet":
            from shardvu.testing.netns import sh
            peer = tap + "p"
            sh(f"ip link add {tap} type veth peer name {peer}")
            sh(f"ip link set {tap} up && ip link set {peer} up")
            kernel_vdev = f"net_af_packet0,iface={tap}"
            res["veth_peer"] = peer
        if tap:
            port = f"{port}:{tap}"
            res["tap"] = tap
        try:
            # back-end
            if self.system in SHARDVU:
                from shardvu.testing.runtime import Runtime
                extra = ["--worker-python", a.worker_python] if self.system == "shardvu-pypy" else []
                if a.pcap:
                    pcap = os.path.join(tmp, "cap.pcapng")
                    extra += ["--pcap", pcap]
                rt = Runtime(sock, self.queues, port, "--frame-size", str(self.size),
                             "--cpus", a.shardvu_cpus, "--log-level", "WARNING", *extra,
                             log_path=os.path.join(tmp, "shardvu.log"), wait=False)
                rt.wait_ready()             # rt is set: _stop() ends it even if it never gets ready
                be_sampler = ShardvuSampler(rt)
            elif tap:
                be = TestPmd([vhost_vdev(sock, self.queues), kernel_vdev],
                             queues=self.queues, mode=be_mode, cores=a.be_lcores,
                             extra_eal=["--main-lcore", a.be_main],
                             extra_app=["--disable-link-check", f"--nb-cores={a.be_nb_cores}"],
                             mem_mb=1024, total_mbufs=32768, stats_period=0,
                             log_path=os.path.join(tmp, "be.log"))
                be.start()
                be.wait_started(a.start_timeout)
                be_sampler = TelemetrySampler(be.file_prefix)
                sockets.append(be_sampler)
            else:
                be = TestPmd.vhost(sock, self.queues, mode=be_mode, cores=a.be_lcores,
                                   extra_eal=["--main-lcore", a.be_main],
                                   extra_app=[f"--nb-cores={a.be_nb_cores}"],
                                   txpkts=self.size if be_mode == "txonly" else None,
                                   mem_mb=1024, total_mbufs=32768, stats_period=0,
                                   log_path=os.path.join(tmp, "be.log"))
                be.start()
                be.wait_started(a.start_timeout)
                be_sampler = TelemetrySampler(be.file_prefix)
                sockets.append(be_sampler)
            # front-end
            fe = TestPmd.virtio_user(sock, self.queues, mode=fe_mode, cores=a.fe_lcores,
                                     extra_eal=["--main-lcore", a.fe_main],
                                     extra_app=[f"--nb-cores={a.fe_nb_cores}"],
                                     tx_first=fe_mode == "io",
                                     txpkts=self.size if fe_mode in ("txonly", "io") else None,
                                     mem_mb=1024, total_mbufs=32768, stats_period=0,
                                     log_path=os.path.join(tmp, "fe.log"))
            fe.start()
            fe.wait_started(a.start_timeout)
            tap_sampler = TapSampler(peer) if tap else None
            if tap and self.workload in ("tap-rx", "afp-rx"):
                # the tap's host side (the veth peer) feeds it: net_af_packet txonly
                self.feeder = TestPmd(f"net_af_packet0,iface={peer}", queues=1, mode="txonly",
                                      cores=a.fe_lcores, extra_eal=["--main-lcore", a.fe_main],
                                      txpkts=self.size, mem_mb=512, total_mbufs=16384,
                                      stats_period=0, extra_app=["--txonly-multi-flow"]
                                      if self.queues > 1 else [],
                                      log_path=os.path.join(tmp, "feeder.log"))
                self.feeder.start()
                self.feeder.wait_started(a.start_timeout)
            t_fwd = time.time()
            fe_sampler = TelemetrySampler(fe.file_prefix)
            sockets.append(fe_sampler)
            t0, t1 = t_fwd + a.warmup, t_fwd + a.warmup + a.seconds
            telemetry = [fe_sampler] + ([be_sampler] if be is not None else []) + \
                ([tap_sampler] if tap_sampler is not None else [])
            cpu_a = cpu_b = None
            pids = self._pids(rt, be, fe)
            while cpu_b is None:
                if time.time() >= t0 and cpu_a is None:
                    # window opens: pids (shardvu's workers), CPU times and
                    # a telemetry sample, all at once
                    pids = self._pids(rt, be, fe)
                    cpu_a = cpu_snapshot(pids)
                    busy_a = machine_busy()
                    t0 = time.time()
                    for ts in telemetry:
                        ts.sample()
                elif time.time() >= t1:
                    cpu_b = cpu_snapshot(pids)
                    busy_b = machine_busy()
                    for ts in telemetry:
                        ts.sample()
                    # the window closes with its last sample (shardvu's
                    # samples are all older than that)
                    t1 = max([time.time()] + [ts.samples[-1][0] for ts in telemetry])
                    break
                fe_sampler.poll()
                be_sampler.poll()
                if tap_sampler is not None:
                    tap_sampler.poll()
                if not fe.running() or (be is not None and not be.running()) or \
                        (rt is not None and rt.proc.poll() is not None):
                    raise RuntimeError("a process exited during the run")
                time.sleep(POLL_S)
            res["window"] = {"t_forwarding": t_fwd, "t0": t0, "t1": t1}
            # rate
            if counter == "tap":
                r = window_rate(tap_sampler.series("rx_packets"), t0, t1)
                res["counted_by"] = f"{peer} rx_packets (rtnetlink)"
            elif counter == "frontend":
                r = window_rate(fe_sampler.series("ipackets"), t0, t1)
                res["counted_by"] = "front-end port 0 ipackets (DPDK telemetry)"
            elif self.system == "dpdk":
                r = window_rate(be_sampler.series("ipackets"), t0, t1)
                res["counted_by"] = "DPDK vhost port 0 ipackets (DPDK telemetry)"
            else:
                r = shardvu_tx_rate(be_sampler, self.queues, t0, t1)
                res["counted_by"] = "shardvu TX-queue workers' packets (sum of per-queue rates)"
            res["series"] = self._series(counter, fe_sampler, be_sampler, t_fwd, tap_sampler)
            if tap_sampler is not None:
                first, last = tap_sampler.samples[0][1], tap_sampler.samples[-1][1]
                res["tap_counters"] = {k: last[k] - first[k] for k in
                                       ("rx_packets", "rx_dropped", "tx_packets", "tx_dropped")}
            if r is None:
                raise RuntimeError("not enough counter samples inside the window")
            res["pps"] = r.pop("pps")
            res["mpps"] = round(res["pps"] / 1e6, 4)
            res["rate_detail"] = r
            # front-end's TX rate over the same window (what it enqueued) — a cross-check
            tx = window_rate(fe_sampler.series("opackets"), t0, t1)
            res["fe_tx_mpps"] = round(tx["pps"] / 1e6, 4) if tx else None
            res["cpu"] = cpu_percent(cpu_a or {}, cpu_b or {})
            res["others_cpu_percent"] = others_percent(busy_a, busy_b, res["cpu"])
            if rt is not None:
                # each worker's resident and private memory as the control
                # process saw it (resident counts guest pages it touched)
                last_queues = (be_sampler.last or {}).get("queues", ())
                res["worker_rss_mib"] = {f"w{q['index']}": round(q["rss_bytes"] / 2**20, 1)
                                         for q in last_queues if q.get("rss_bytes")}
                res["worker_private_mib"] = {f"w{q['index']}": round(q["private_bytes"] / 2**20, 1)
                                             for q in last_queues if q.get("private_bytes")}
                abrun.raise_if_dead(be_sampler.last)
            if res["pps"] <= 0:
                raise RuntimeError("no packets counted in the window")
        except Exception as exc:                       # noqa: BLE001 — recorded, run goes on
            abrun.record_failure(res, exc, "mpps")
            for name, pmd in (("fe_log_tail", fe), ("be_log_tail", be)):
                if pmd is not None:
                    res[name] = pmd.log()[-2000:]
            if rt is not None:
                try:
                    res["shardvu_log_tail"] = rt.log()[-3000:]
                except OSError:
                    pass
        finally:
            for ts in sockets:
                ts.close()
            res.update(self._stop(rt, be, fe))
            if pcap is not None:
                res["pcap"] = pcap_summary(pcap, rt)
            if tap and peer != tap:
                from shardvu.testing.netns import sh
                sh(f"ip link del {tap}", check=False)
            shutil.rmtree(tmp, ignore_errors=True)
        res["end"] = time.time()
        return res

    def _series(self, counter, fe_sampler, be_sampler, t_fwd, tap_sampler=None) -> Dict[str, List]:
        """The receiver's raw samples, [seconds since forwarding began, count]."""
        if counter == "tap":
            raw = {"tap_rx_packets": tap_sampler.series("rx_packets")}
        elif counter == "frontend":
            raw = {"fe_ipackets": fe_sampler.series("ipackets")}
        elif self.system == "dpdk":
            raw = {"be_ipackets": be_sampler.series("ipackets")}
        else:
            raw = {f"q{q}": v for q, v in be_sampler.series.items() if q % 2 == 1}
        return {k: [[round(t - t_fwd, 3), n] for t, n in v] for k, v in raw.items()}

    def _pids(self, rt, be, fe) -> Dict[str, int]:
        return {"fe": fe.pid, **backend_pids(rt, be)}

    def _stop(self, rt, be, fe) -> Dict:
        out: Dict = {}
        if self.feeder is not None:
            st = self.feeder.stop()
            out["feeder_final"] = _final(st, self.feeder.returncode)
        if fe is not None:
            st = fe.stop()
            out["fe_final"] = _final(st, fe.returncode)
        if be is not None:
            st = be.stop()
            out["be_final"] = _final(st, be.returncode)
        if rt is not None:
            try:
                last = rt.stats(timeout=1.0)
                out["be_final"] = {"queues": {q["index"]: q["packets"] for q in last["queues"]},
                                   "states": sorted({q["state"] for q in last["queues"]})}
            except Exception:
                pass
            try:
                rc = rt.stop()
                out["be_final"] = dict(out.get("be_final", {}), returncode=rc)
            except Exception as exc:           # noqa: BLE001
                out["stop_error"] = str(exc)[:500]
            try:
                log = rt.log()
            except OSError:
                log = ""
            if "broken" in log:
                out["warning"] = "shardvu log mentions a broken queue: " + \
                    next(l for l in log.splitlines() if "broken" in l)[:300]
        return out


def pcap_summary(path: str, rt) -> Dict:
    """What a ``--pcap`` cell captured: Enhanced Packet Blocks in the file,
    its size, and the capture records dropped per queue (ring full), from
    the capture process's last log line (logged as a warning when any were
    dropped, so it shows at ``--log-level WARNING``; absent: none)."""
    import re
    import struct
    out: Dict = {"file_bytes": 0, "frames": 0, "dropped_by_queue": {}}
    try:
        with open(path, "rb") as f:
            raw = f.read()
    except OSError as exc:
        return dict(out, error=str(exc))
    out["file_bytes"] = len(raw)
    pos = frames = 0
    while pos + 8 <= len(raw):
        btype, blen = struct.unpack_from("<II", raw, pos)
        if blen < 12:
            break
        frames += btype == 6                        # Enhanced Packet Block
        pos += blen
    out["frames"] = frames
    try:
        log = rt.log()
    except OSError:
        log = ""
    m = re.search(r"pcap: (\d+) frames written.*dropped \(ring full\) by queue: (.*)", log)
    if m:
        out["dropped_by_queue"] = {q: int(n) for q, n in
                                   (x.split(":") for x in m.group(2).split(", ") if ":" in x)}
    out["dropped"] = sum(out["dropped_by_queue"].values())
    return out


def _final(stats: Optional[Dict], rc: Optional[int]) -> Dict:
    if not stats:
        return {"returncode": rc}
    return {"returncode": rc, "rx_packets": stats.get("rx_packets"), "tx_packets": stats.get("tx_packets"),
            "tx_dropped": stats.get("tx_dropped"), "rx_dropped": stats.get("rx_dropped")}


# -- summary, table, plot ------------------------------------------------------

def systems_in(samples: List[Dict]) -> List[str]:
    """The systems an earlier run measured, in SYSTEMS order (old files: shardvu, dpdk)."""
    seen = {s["system"] for s in samples}
    return [x for x in SYSTEMS if x in seen]


def _config(s: Dict) -> Tuple[str, int, int]:
    return s["workload"], s["size"], s["queues"]


def _cpu_summary(system: str, ok: List[Dict], measured: List[Dict]) -> Dict:
    """A system's CPU over its successful rounds (medians), *others* over all."""
    d: Dict = {}
    if system in SHARDVU:
        workers: Dict[str, List[float]] = {}
        rss: List[float] = []
        private: List[float] = []
        totals = []
        for s in ok:
            ws = {k: v["percent"] for k, v in s.get("cpu", {}).items() if k.startswith("w")}
            for k, v in ws.items():
                workers.setdefault(k, []).append(v)
            if ws:
                totals.append(sum(ws.values()))
            rss.extend(s.get("worker_rss_mib", {}).values())
            private.extend(s.get("worker_private_mib", {}).values())
        d["cpu_workers"] = {k: med(v) for k, v in sorted(workers.items(), key=lambda kv: int(kv[0][1:]))}
        d["cpu_total"] = med(totals)
        d["cpu_control"] = med([s["cpu"]["control"]["percent"] for s in ok if "control" in s.get("cpu", {})])
        d["rss_mib_max"] = max(rss, default=None)
        d["private_mib_max"] = max(private, default=None)
    else:
        d["cpu_total"] = med([s["cpu"]["be"]["percent"] for s in ok if "be" in s.get("cpu", {})])
        d["cpu_fwd_lcore"] = med([v for s in ok for n, v in
                                  s.get("cpu", {}).get("be", {}).get("threads", {}).items()
                                  if n.startswith("rte-worker")])
    d["others_cpu"] = med([s["others_cpu_percent"] for s in measured if "others_cpu_percent" in s])
    return d


def summarize(samples: List[Dict], configs, systems: Optional[Sequence[str]] = None) -> List[Dict]:
    """One row per configuration: per system the rate (median/min/max over
    the rounds) and CPU; per shardvu variant its ratio to DPDK (``ratios``:
    {variant: {"ratio": ratio of the medians, "paired": per-round ratios}})."""
    wanted = set(systems or systems_in(samples) or SYSTEMS)
    systems = [x for x in SYSTEMS if x in wanted]         # columns in a fixed order
    rows = abrun.summarize(samples, configs, systems, key="mpps", config_of=_config,
                           row_of=lambda c: {"workload": c[0], "size": c[1], "queues": c[2]},
                           per_system=_cpu_summary)
    for row in rows:
        # the pre-PyPy keys, kept for whoever reads the JSON summary
        if "shardvu" in row["ratios"]:
            row["ratio"] = row["ratios"]["shardvu"]["ratio"]
            row["paired_ratios"] = row["ratios"]["shardvu"]["paired"]
    return rows


def _fmt_workers_cpu(d: Dict) -> str:
    if d.get("cpu_total") is None:
        return "—"
    per = "/".join(f"{v:.0f}" for v in d["cpu_workers"].values())
    return f"{d['cpu_total']:.0f} ({per})"


def table(rows: List[Dict]) -> str:
    """Markdown: per system Mpps, per shardvu variant its ratio to DPDK,
    then CPU, then *others* (one figure per system, in column order)."""
    if not rows:
        return ""
    systems = rows[0].get("systems") or [x for x in SYSTEMS if x in rows[0]]
    variants = abrun.variants(systems)
    head = ["workload", "frame B", "queues"] + abrun.rate_heads(systems, "Mpps")
    head += [f"{LABELS[x]} workers CPU % (per worker)" for x in variants]
    if "dpdk" in systems:
        head += ["DPDK vhost CPU % (fwd lcore)"]
    head += [f"others CPU % ({'/'.join(LABELS[x] for x in systems)} runs)"]
    body = []
    for r in rows:
        cells = [r["workload"], str(r["size"]), str(r["queues"])] + abrun.rate_cells(r, systems, ".3g")
        cells += [_fmt_workers_cpu(r[x]) for x in variants]
        if "dpdk" in systems:
            dp = r["dpdk"]
            cells.append(f"{dp['cpu_total']:.0f} ({dp['cpu_fwd_lcore']:.0f})"
                         if dp["cpu_total"] is not None and dp["cpu_fwd_lcore"] is not None else "—")
        cells.append("/".join("—" if r[x].get("others_cpu") is None else f"{r[x]['others_cpu']:.0f}"
                              for x in systems))
        body.append(cells)
    return abrun.markdown(head, ("---", "---:", "---:"), body)


PLOT_STYLE = {"shardvu": ("o-", "C0"), "shardvu-pypy": ("^-", "C2"), "dpdk": ("s--", "C1")}


def plot(rows: List[Dict], path: str) -> None:
    """Mpps against queue pairs, one panel per (workload, size), one line
    per system; each shardvu variant's ratio of medians to DPDK is printed
    beside its points."""
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from matplotlib.ticker import FuncFormatter, LogLocator, NullFormatter
    systems = rows[0].get("systems") or [x for x in SYSTEMS if x in rows[0]]
    panels = sorted({(r["workload"], r["size"]) for r in rows},
                    key=lambda p: (list(WORKLOADS).index(p[0]), p[1]))
    n = len(panels)
    cols = min(3, n)
    nrows = (n + cols - 1) // cols
    fig, axes = plt.subplots(nrows, cols, figsize=(4.5 * cols, 3.6 * nrows), squeeze=False)
    for ax, (wl, size) in zip(axes.flat, panels):
        sub = sorted((r for r in rows if (r["workload"], r["size"]) == (wl, size)), key=lambda r: r["queues"])
        for system in systems:
            style, color = PLOT_STYLE[system]
            pts = [(r["queues"], r[system], r.get("ratios", {}).get(system)) for r in sub if r[system]["median"]]
            if not pts:
                continue
            xs = [q for q, _, _ in pts]
            ys = [d["median"] for _, d, _ in pts]
            lo = [d["median"] - d["min"] for _, d, _ in pts]
            hi = [d["max"] - d["median"] for _, d, _ in pts]
            ax.errorbar(xs, ys, yerr=[lo, hi], fmt=style, color=color, capsize=3, label=LABELS[system])
            for x, y, (_, _, rt) in zip(xs, ys, pts):
                if rt and rt["ratio"] is not None:
                    ax.annotate(f"{rt['ratio']:.2f}×", (x, y), textcoords="offset points",
                                xytext=(6, -3), fontsize=7, color=color)
        ax.set_title(f"{wl}, {size} B")
        ax.set_xlabel("queue pairs")
        ax.set_ylabel("Mpps (median, min–max)")
        ax.set_yscale("log")
        ax.yaxis.set_major_locator(LogLocator(subs=(1.0, 2.0, 5.0)))
        ax.yaxis.set_major_formatter(FuncFormatter(lambda v, _: f"{v:g}"))
        ax.yaxis.set_minor_formatter(NullFormatter())
        ax.set_xticks(sorted({r["queues"] for r in sub}))
        ax.grid(True, which="both", alpha=0.3)
        ax.legend(fontsize=8)
    for ax in list(axes.flat)[n:]:
        ax.axis("off")
    fig.suptitle("virtio-user (DPDK testpmd) → vhost-user back-end; only the ratio (×DPDK) counts")
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


# -- main ------------------------------------------------------------------------

def parse_args(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--workloads", default="tx,rx,loop",
                    help="tx, rx, loop, tap-tx, tap-rx, afp-tx, afp-rx (default tx,rx,loop)")
    ap.add_argument("--sizes", default="64,1518", help="frame sizes in bytes (default 64,1518)")
    ap.add_argument("--queues", default="1,2,4,8", help="queue pairs (default 1,2,4,8)")
    ap.add_argument("--rounds", type=int, default=3, help="rounds per configuration, each system once per round (default 3)")
    ap.add_argument("--seconds", type=float, default=5.0, help="measured window per run (default 5)")
    ap.add_argument("--warmup", type=float, default=1.0,
                    help="seconds of forwarding before the window opens (default 1)")
    ap.add_argument("--out", default=os.path.join(os.path.dirname(os.path.abspath(__file__)), "out"),
                    help="output directory (default bench/out)")
    ap.add_argument("--plot", action="store_true", help="also write a PNG (needs matplotlib)")
    ap.add_argument("--systems", default="shardvu,dpdk",
                    help="which back-ends, any of shardvu, shardvu-pypy, dpdk (default shardvu,dpdk)")
    ap.add_argument("--worker-python", metavar="PATH", default=os.path.join(REPO, ".venv-pypy", "bin", "python"),
                    help="the workers' interpreter for shardvu-pypy (default <repo>/.venv-pypy/bin/python)")
    ap.add_argument("--fe-cpus", default="0,1",
                    help="front-end testpmd: MAIN,FWD cpus (default 0,1: forwarding on CPU 1); "
                         "FWD may be a range, e.g. 0,2-9: testpmd then spreads the queues over "
                         "those forwarding lcores (machines with more CPUs)")
    ap.add_argument("--be-cpus", default="1,0",
                    help="back-end: MAIN,FWD cpus for DPDK vhost (default 1,0: forwarding on CPU 0; "
                         "FWD may be a range, as for --fe-cpus); "
                         "shardvu's workers go on FWD unless --shardvu-cpus says otherwise")
    ap.add_argument("--shardvu-cpus", metavar="LIST",
                    help="shardvu run --cpus for the workers, e.g. 0 or 2-5; worker i goes on "
                         "LIST[i %% len(LIST)], so 0,1 puts all TX workers on CPU 1 (default: the "
                         "back-end's FWD cpu, the single CPU DPDK vhost's forwarding lcore gets)")
    abrun.add_idle_options(
        ap, "before each round, wait up to S seconds for the rest of the machine to "
            "use less than --idle-below %% of a CPU (shared machines; default 0: don't)",
        "threshold for --wait-idle (default 25)")
    ap.add_argument("--pcap", action="store_true",
                    help="run the shardvu cells with --pcap FILE (the capture overhead: compare "
                         "with a run without); results record frames captured and dropped")
    ap.add_argument("--start-timeout", type=float, default=30.0,
                    help="seconds to wait for each testpmd to start forwarding")
    ap.add_argument("--summarize", metavar="JSON",
                    help="run nothing: print the table of an earlier run's JSON (and --plot it)")
    args = ap.parse_args(argv)
    args.workloads = [w for w in args.workloads.split(",") if w]
    for w in args.workloads:
        if w not in WORKLOADS:
            ap.error(f"unknown workload {w!r} (tx, rx, loop, tap-tx, tap-rx, afp-tx, afp-rx)")
    args.sizes = abrun.ints(args.sizes)
    args.queues = abrun.ints(args.queues)
    args.systems = abrun.parse_systems(ap, args.systems)
    args.fe_main, args.fe_nb_cores, args.fe_lcores, _ = _lcores(ap, "--fe-cpus", args.fe_cpus)
    args.be_main, args.be_nb_cores, args.be_lcores, be_fwd = _lcores(ap, "--be-cpus", args.be_cpus)
    args.be_fwd = be_fwd
    args.shardvu_cpus = args.shardvu_cpus or be_fwd    # shardvu run --cpus
    if "shardvu-pypy" in args.systems and not args.summarize and not os.access(args.worker_python, os.X_OK):
        ap.error(f"shardvu-pypy: no interpreter at {args.worker_python} (--worker-python PATH)")
    if args.rounds < 1 or args.seconds <= 0:
        ap.error("--rounds >= 1 and --seconds > 0")
    return args


def _lcores(ap, opt: str, spec: str) -> Tuple[str, int, str, str]:
    """``MAIN,FWD`` (FWD a CPU or a range ``LO-HI``) → (main lcore, number
    of forwarding lcores, testpmd's ``-l`` list, FWD).  With several
    forwarding lcores testpmd spreads the queues over them (``--nb-cores``;
    it uses at most one per queue)."""
    main, _, fwd_spec = spec.partition(",")
    lo, _, hi = fwd_spec.partition("-")
    try:
        fwd = list(range(int(lo), int(hi or lo) + 1))
        main_cpu = int(main)
    except ValueError:
        ap.error(f"{opt} takes MAIN,FWD (FWD a CPU or a range LO-HI), not {spec!r}")
    if not fwd or main_cpu in fwd:
        ap.error(f"{opt}: MAIN must not be among the forwarding CPUs")
    return main, len(fwd), ",".join(str(c) for c in sorted([main_cpu] + fwd)), fwd_spec


def _configs(a) -> List[Tuple[str, int, int]]:
    return [(w, s, q) for w in a["workloads"] for s in a["sizes"] for q in a["queues"]]


def _summarize_file(path: str, want_plot: bool) -> int:
    rows = abrun.summarize_file(path, lambda a, samples: summarize(samples, _configs(a), a.get("systems")),
                                table)
    if want_plot:
        png = os.path.splitext(path)[0] + ".png"
        plot(rows, png)
        print(f"\nplot: {png}")
    return 0


def _report(res: Dict) -> str:
    """The progress line of a measurement that has its rate."""
    cpu = res.get("cpu", {})
    if res["system"] in SHARDVU:
        ws = [v["percent"] for k, v in cpu.items() if k.startswith("w")]
        c = f"workers {sum(ws):.0f}% ({'/'.join(f'{v:.0f}' for v in ws)})"
    else:
        c = f"vhost {cpu.get('be', {}).get('percent', float('nan')):.0f}%"
    warn = f"  WARNING {res['warning']}" if "warning" in res else ""
    if "pcap" in res:
        warn += (f"  pcap {res['pcap']['frames']} frames ({res['pcap'].get('dropped', 0)} dropped), "
                 f"capture {cpu.get('capture', {}).get('percent', float('nan')):.0f}%")
    return (f"{res['mpps']:8.3f} Mpps  {c}  fe {cpu.get('fe', {}).get('percent', float('nan')):.0f}%"
            f"  others {res['others_cpu_percent']:.0f}%{warn}")


def main(argv=None) -> int:
    args = parse_args(argv)
    if args.summarize:
        return _summarize_file(args.summarize, args.plot)
    if not have_testpmd():
        print("compare.py: dpdk-testpmd not found (apt-get install dpdk)", file=sys.stderr)
        return 2
    if args.plot:
        try:
            import matplotlib  # noqa: F401  (checked before running anything)
        except ImportError:
            print("compare.py: --plot needs matplotlib (pip install -e '.[bench]')", file=sys.stderr)
            return 2
    base = abrun.out_base(args.out, "compare")
    configs = _configs(vars(args))
    plan = abrun.plan_rounds(configs, args.rounds, args.systems)
    per = args.warmup + args.seconds + 3 + args.wait_idle / len(args.systems)
    print(f"compare: {len(configs)} configurations x {args.rounds} rounds x {len(args.systems)} systems "
          f"= {len(plan)} runs, ~{len(plan) * per / 60:.0f} min; front-end fwd CPU {args.fe_cpus.split(',')[1]}, "
          f"back-end fwd CPU {args.be_fwd}, shardvu workers on CPU(s) {args.shardvu_cpus}", flush=True)
    meta = abrun.base_meta("bench/compare.py", argv)
    meta["args"] = {k: v for k, v in vars(args).items()}
    if "shardvu-pypy" in args.systems:
        import subprocess
        meta["worker_python"] = subprocess.run(
            [args.worker_python, "-c", "import sys; print(sys.version.replace(chr(10), ' '))"],
            capture_output=True, text=True, timeout=60).stdout.strip()
    # SIGTERM unwinds like an error: processes stopped, the namespace removed
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(1))
    with contextlib.ExitStack() as stack:
        if any(w.startswith(("tap", "afp")) for w in args.workloads):
            # the taps and their traffic stay inside a namespace of our own
            from shardvu.testing.netns import can_netns, netns, sh
            why = can_netns()
            if why:
                print(f"compare.py: tap workloads: {why}", file=sys.stderr)
                return 2
            stack.enter_context(netns("shvbench"))
            sh("sysctl -qw net.ipv6.conf.all.disable_ipv6=1 net.ipv6.conf.default.disable_ipv6=1")
        samples, rows = _run(args, plan, meta, base, configs)
    if args.plot and rows:
        plot(rows, base + ".png")
        print(f"plot:    {base}.png")
    left = leftover_testpmds(f"shvu{os.getpid()}n")   # ours only: others run tests here too
    if left:
        print(f"WARNING: testpmd processes left behind: {left}", file=sys.stderr)
    return 0 if all("mpps" in s for s in samples) else 1


def _run(args, plan, meta, base, configs):
    return abrun.run_plan(
        args, plan, meta, base, key="mpps", config_of=_config,
        measure=lambda cfg, system: Measurement(args, system, *cfg).run(),
        describe=lambda cfg: f"{cfg[0]:6s} {cfg[1]:4d}B q={cfg[2]}",
        report=_report, summarize=lambda samples: summarize(samples, configs, args.systems),
        table=table)


if __name__ == "__main__":
    sys.exit(main())
