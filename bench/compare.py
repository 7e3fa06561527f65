#!/usr/bin/env python3
"""shardvu beside DPDK's vhost PMD, in one run.

    python3 bench/compare.py [--workloads tx,rx,loop] [--sizes 64,1518]
        [--queues 1,2,4,8] [--rounds 3] [--seconds 5] [--warmup 1]
        [--out bench/out] [--plot]

The same front-end — DPDK testpmd with a virtio-user port (``--no-huge -m
1024 --total-num-mbufs=32768``) — drives, in turn, two vhost-user
back-ends on the same socket:

* ``shardvu``: ``shardvu run --port sink|generator|loopback --cpus 0``
  (control process + one worker process per virtqueue, workers on CPU 0);
* ``dpdk``: ``dpdk-testpmd --vdev net_vhost0,iface=SOCK,queues=N`` in the
  matching forwarding mode, its forwarding lcore on CPU 0.

Workloads (front-end mode → back-end):

==========  ===========================  ================  ================
workload    virtio-user testpmd          shardvu --port    DPDK vhost mode
==========  ===========================  ================  ================
``tx``      ``txonly --txpkts=SIZE``     ``sink``          ``rxonly``
``rx``      ``rxonly``                   ``generator``     ``txonly --txpkts=SIZE``
``loop``    ``io --tx-first --txpkts``   ``loopback``      ``io``
==========  ===========================  ================  ================

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
The main lcores only wake once a second to print statistics.  shardvu's
workers all go on CPU 0 (``--cpus 0``), its control process is left
unpinned (idle after set-up, apart from answering stats queries).  With
more CPUs, ``--fe-cpus``/``--be-cpus`` move them.

Rates are counted by the *receiver* of the traffic: for ``tx`` the
back-end (shardvu: the sum of its TX-queue workers' ``packets``; DPDK
vhost: its port's RX-packets), for ``rx`` and ``loop`` the front-end (its
port's RX-packets).  Never the sender's counters: testpmd's txonly counts
what it *enqueued*, which says nothing about what the other side took.
Counters are sampled while traffic runs and time-stamped when they
arrive: testpmd's periodic ``--stats-period 1`` "NIC statistics" blocks
(its log is tailed every 20 ms), shardvu's per-queue stats (published by
each worker every 0.5 s; the sample time is the control process's receipt
time, ``time - age_s``).  The rate is Δcount/Δt between the first sample
after ``--warmup`` seconds of forwarding and the last sample inside the
following ``--seconds``: start-up and shut-down are excluded, and sums over
queues are made of per-queue rates over each queue's own samples.

Measurements alternate between the systems within each configuration:
shardvu, dpdk in odd rounds, dpdk, shardvu in even ones (A B B A …), so a
drift of the shared machine during a configuration weighs on both.  Each
measurement starts fresh processes (DPDK's own rate is bimodal per
process start).  Reported: per system the median of the rounds with min
and max; the ratio of the medians and the range of the per-round
(paired) ratios; CPU % per process over the same window (psutil
``cpu_times`` deltas; shardvu's workers found through
``Runtime.stats()``'s ``worker_pid``).  Absolute rates on a shared machine
are not worth much; the ratio measured in one run is the result.

Outputs (``--out``): ``compare-<timestamp>.json`` (every sample and the
summary), ``compare-<timestamp>.md`` (the table), and with ``--plot``
``compare-<timestamp>.png`` (Mpps against queues per system; needs
matplotlib: ``pip install -e '.[bench]'``).
"""
from __future__ import annotations

import argparse
import datetime as _dt
import json
import os
import platform
import re
import shutil
import statistics
import sys
import tempfile
import time
import traceback
from typing import Dict, List, Optional, Sequence, Tuple

import psutil

from shardvu.testpmd import TestPmd, _fields, have_testpmd, leftover_testpmds

SYSTEMS = ("shardvu", "dpdk")
WORKLOADS = {
    #         front-end mode, shardvu port, DPDK vhost mode, who counts
    "tx":   ("txonly", "sink", "rxonly", "backend"),
    "rx":   ("rxonly", "generator", "txonly", "frontend"),
    "loop": ("io", "loopback", "io", "frontend"),
}
POLL_S = 0.02               # testpmd log tail period
STATS_POLL_S = 0.25         # shardvu stats query period


# -- counter sampling ---------------------------------------------------------

_NIC = re.compile(r"#+ NIC statistics for port (\d+)\s*#+\n(.*?)\n\s*#{20,}", re.S)


class LogTail:
    """Follows a testpmd log, time-stamping each complete periodic "NIC
    statistics" block when it first shows up."""

    def __init__(self, path: str):
        self.path = path
        self.offset = 0
        self.buf = ""
        self.samples: List[Tuple[float, Dict[str, int]]] = []   # (unix time, port 0 fields)

    def poll(self) -> None:
        try:
            with open(self.path, "rb") as f:
                f.seek(self.offset)
                data = f.read()
        except FileNotFoundError:
            return
        if not data:
            return
        now = time.time()
        self.offset += len(data)
        self.buf += data.decode("utf-8", "replace")
        end = 0
        for m in _NIC.finditer(self.buf):
            end = m.end()
            if m.group(1) == "0":
                self.samples.append((now, _fields(m.group(2).split("Throughput", 1)[0])))
        if end:
            self.buf = self.buf[end:]
        elif len(self.buf) > 1 << 16:
            self.buf = self.buf[-(1 << 15):]

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
        try:
            # back-end
            if self.system == "shardvu":
                from shardvu.control.launcher import Runtime
                rt = Runtime(sock, self.queues, port, "--frame-size", str(self.size),
                             "--cpus", a.be_fwd, "--log-level", "WARNING",
                             log_path=os.path.join(tmp, "shardvu.log"))
                be_sampler = ShardvuSampler(rt)
            else:
                be = TestPmd.vhost(sock, self.queues, mode=be_mode, cores=a.be_lcores,
                                   extra_eal=["--main-lcore", a.be_main],
                                   txpkts=self.size if be_mode == "txonly" else None,
                                   mem_mb=1024, total_mbufs=32768, stats_period=1,
                                   log_path=os.path.join(tmp, "be.log"))
                be.start()
                be.wait_started(a.start_timeout)
                be_sampler = LogTail(be.log_path)
            # front-end
            fe = TestPmd.virtio_user(sock, self.queues, mode=fe_mode, cores=a.fe_lcores,
                                     extra_eal=["--main-lcore", a.fe_main],
                                     tx_first=fe_mode == "io",
                                     txpkts=self.size if fe_mode in ("txonly", "io") else None,
                                     mem_mb=1024, total_mbufs=32768, stats_period=1,
                                     log_path=os.path.join(tmp, "fe.log"))
            fe.start()
            fe.wait_started(a.start_timeout)
            t_fwd = time.time()
            fe_tail = LogTail(fe.log_path)
            t0, t1 = t_fwd + a.warmup, t_fwd + a.warmup + a.seconds
            # let the samplers see a sample just after t1 too (the window
            # takes the last one at or before t1)
            deadline = t1 + 1.2
            cpu_a = cpu_b = None
            pids = self._pids(rt, be, fe)
            while True:
                now = time.time()
                fe_tail.poll()
                be_sampler.poll()
                if cpu_a is None and now >= t0:
                    if rt is not None:
                        pids = self._pids(rt, be, fe)
                    cpu_a = cpu_snapshot(pids)
                if cpu_b is None and now >= t1:
                    cpu_b = cpu_snapshot(pids)
                if now >= deadline:
                    break
                if not fe.running() or (be is not None and not be.running()) or \
                        (rt is not None and rt.proc.poll() is not None):
                    raise RuntimeError("a process exited during the run")
                time.sleep(POLL_S)
            res["window"] = {"t_forwarding": t_fwd, "t0": t0, "t1": t1}
            # rate
            if counter == "frontend":
                r = window_rate(fe_tail.series("rx_packets"), t0, t1)
                res["counted_by"] = "front-end port 0 RX-packets"
            elif self.system == "dpdk":
                r = window_rate(be_sampler.series("rx_packets"), t0, t1)
                res["counted_by"] = "DPDK vhost port 0 RX-packets"
            else:
                per_q = {}
                for p in range(self.queues):
                    per_q[2 * p + 1] = window_rate(be_sampler.series.get(2 * p + 1, []), t0, t1)
                if all(v is not None for v in per_q.values()):
                    r = {"pps": sum(v["pps"] for v in per_q.values()),
                         "per_queue_pps": {str(q): round(v["pps"]) for q, v in per_q.items()},
                         "samples": min(v["samples"] for v in per_q.values()),
                         "span_s": min(v["span_s"] for v in per_q.values())}
                else:
                    r = None
                res["counted_by"] = "shardvu TX-queue workers' packets (sum of per-queue rates)"
            if r is None:
                raise RuntimeError("not enough counter samples inside the window")
            res["pps"] = r.pop("pps")
            res["mpps"] = round(res["pps"] / 1e6, 4)
            res["rate_detail"] = r
            # front-end's TX rate over the same window (what it enqueued) — a cross-check
            tx = window_rate(fe_tail.series("tx_packets"), t0, t1)
            res["fe_tx_mpps"] = round(tx["pps"] / 1e6, 4) if tx else None
            res["cpu"] = cpu_percent(cpu_a or {}, cpu_b or {})
        except Exception as exc:                       # noqa: BLE001 — recorded, run goes on
            res["error"] = f"{type(exc).__name__}: {str(exc).splitlines()[0] if str(exc) else ''}"
            res["traceback"] = traceback.format_exc()[-3000:]
            for name, pmd in (("fe_log_tail", fe), ("be_log_tail", be)):
                if pmd is not None:
                    res[name] = pmd.log()[-2000:]
        finally:
            res.update(self._stop(rt, be, fe))
            shutil.rmtree(tmp, ignore_errors=True)
        res["end"] = time.time()
        return res

    def _pids(self, rt, be, fe) -> Dict[str, int]:
        pids = {"fe": fe.pid}
        if be is not None:
            pids["be"] = be.pid
        if rt is not None:
            pids["control"] = rt.proc.pid
            try:
                for q in rt.stats(timeout=1.0)["queues"]:
                    if q.get("worker_pid"):
                        pids[f"w{q['index']}"] = q["worker_pid"]
            except Exception:
                pass
        return pids

    def _stop(self, rt, be, fe) -> Dict:
        out: Dict = {}
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
            log = ""
            try:
                rc = rt.stop()
                log = rt.log()
                out["be_final"] = dict(out.get("be_final", {}), returncode=rc)
            except Exception as exc:           # noqa: BLE001
                out["stop_error"] = str(exc)[:500]
            if "broken" in log:
                out["warning"] = "shardvu log mentions a broken queue: " + \
                    next(l for l in log.splitlines() if "broken" in l)[:300]
        return out


def _final(stats: Optional[Dict], rc: Optional[int]) -> Dict:
    if not stats:
        return {"returncode": rc}
    return {"returncode": rc, "rx_packets": stats.get("rx_packets"), "tx_packets": stats.get("tx_packets"),
            "tx_dropped": stats.get("tx_dropped"), "rx_dropped": stats.get("rx_dropped")}


# -- summary, table, plot ------------------------------------------------------

def _med(xs):
    return statistics.median(xs) if xs else None


def summarize(samples: List[Dict], configs) -> List[Dict]:
    rows = []
    for (wl, size, q) in configs:
        row: Dict = {"workload": wl, "size": size, "queues": q}
        by_round: Dict[str, Dict[int, Dict]] = {s: {} for s in SYSTEMS}
        for s in samples:
            if (s["workload"], s["size"], s["queues"]) == (wl, size, q):
                by_round[s["system"]][s["round"]] = s
        for system in SYSTEMS:
            ok = [s for s in by_round[system].values() if "mpps" in s]
            rates = [s["mpps"] for s in ok]
            row[system] = {
                "median": _med(rates), "min": min(rates) if rates else None,
                "max": max(rates) if rates else None, "n": len(rates),
                "failed": len(by_round[system]) - len(ok),
                "errors": sorted({s["error"] for s in by_round[system].values() if "error" in s}),
            }
            if system == "shardvu":
                workers: Dict[str, List[float]] = {}
                totals = []
                for s in ok:
                    ws = {k: v["percent"] for k, v in s.get("cpu", {}).items() if k.startswith("w")}
                    for k, v in ws.items():
                        workers.setdefault(k, []).append(v)
                    if ws:
                        totals.append(sum(ws.values()))
                row[system]["cpu_workers"] = {k: _med(v) for k, v in
                                              sorted(workers.items(), key=lambda kv: int(kv[0][1:]))}
                row[system]["cpu_total"] = _med(totals)
                row[system]["cpu_control"] = _med([s["cpu"]["control"]["percent"] for s in ok
                                                   if "control" in s.get("cpu", {})])
            else:
                row[system]["cpu_total"] = _med([s["cpu"]["be"]["percent"] for s in ok
                                                 if "be" in s.get("cpu", {})])
                row[system]["cpu_fwd_lcore"] = _med([v for s in ok for n, v in
                                                     s.get("cpu", {}).get("be", {}).get("threads", {}).items()
                                                     if n.startswith("rte-worker")])
        a, b = row["shardvu"]["median"], row["dpdk"]["median"]
        row["ratio"] = a / b if a and b else None
        paired = [by_round["shardvu"][r]["mpps"] / by_round["dpdk"][r]["mpps"]
                  for r in by_round["shardvu"] if r in by_round["dpdk"]
                  and "mpps" in by_round["shardvu"][r] and by_round["dpdk"][r].get("mpps")]
        row["paired_ratios"] = paired
        rows.append(row)
    return rows


def _fmt_rate(d: Dict) -> str:
    if d["median"] is None:
        return "failed" if d["failed"] else "—"
    txt = f"{d['median']:.3g} [{d['min']:.3g}–{d['max']:.3g}]"
    if d["failed"]:
        txt += f" ({d['failed']} failed)"
    return txt


def table(rows: List[Dict]) -> str:
    lines = ["| workload | frame B | queues | shardvu Mpps med [min–max] | DPDK vhost Mpps med [min–max] "
             "| shardvu/DPDK (per-round range) | shardvu workers CPU % (per worker) | DPDK vhost CPU % (fwd lcore) |",
             "|---|---:|---:|---|---|---|---|---|"]
    for r in rows:
        if r["ratio"] is not None:
            rng = r["paired_ratios"]
            ratio = f"{r['ratio']:.3f}" + (f" [{min(rng):.3f}–{max(rng):.3f}]" if rng else "")
        else:
            ratio = "—"
        sh = r["shardvu"]
        if sh["cpu_total"] is not None:
            per = "/".join(f"{v:.0f}" for v in sh["cpu_workers"].values())
            cpu_s = f"{sh['cpu_total']:.0f} ({per})"
        else:
            cpu_s = "—"
        dp = r["dpdk"]
        cpu_d = (f"{dp['cpu_total']:.0f} ({dp['cpu_fwd_lcore']:.0f})"
                 if dp["cpu_total"] is not None and dp["cpu_fwd_lcore"] is not None else "—")
        lines.append(f"| {r['workload']} | {r['size']} | {r['queues']} | {_fmt_rate(sh)} | {_fmt_rate(dp)} "
                     f"| {ratio} | {cpu_s} | {cpu_d} |")
    return "\n".join(lines)


def plot(rows: List[Dict], path: str) -> None:
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    panels = sorted({(r["workload"], r["size"]) for r in rows},
                    key=lambda p: (list(WORKLOADS).index(p[0]), p[1]))
    n = len(panels)
    cols = min(3, n)
    nrows = (n + cols - 1) // cols
    fig, axes = plt.subplots(nrows, cols, figsize=(4.5 * cols, 3.6 * nrows), squeeze=False)
    for ax, (wl, size) in zip(axes.flat, panels):
        sub = sorted((r for r in rows if (r["workload"], r["size"]) == (wl, size)), key=lambda r: r["queues"])
        for system, style in (("shardvu", "o-"), ("dpdk", "s--")):
            pts = [(r["queues"], r[system]) for r in sub if r[system]["median"]]
            if not pts:
                continue
            xs = [q for q, _ in pts]
            ys = [d["median"] for _, d in pts]
            lo = [d["median"] - d["min"] for _, d in pts]
            hi = [d["max"] - d["median"] for _, d in pts]
            ax.errorbar(xs, ys, yerr=[lo, hi], fmt=style, capsize=3,
                        label="shardvu" if system == "shardvu" else "DPDK vhost")
        ax.set_title(f"{wl}, {size} B")
        ax.set_xlabel("queue pairs")
        ax.set_ylabel("Mpps (median, min–max)")
        ax.set_yscale("log")
        ax.set_xticks(sorted({r["queues"] for r in sub}))
        ax.grid(True, which="both", alpha=0.3)
        ax.legend(fontsize=8)
    for ax in list(axes.flat)[n:]:
        ax.axis("off")
    fig.suptitle("virtio-user (DPDK testpmd) → vhost-user back-end; only the ratio counts")
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


# -- main ------------------------------------------------------------------------

def _ints(text: str) -> List[int]:
    return [int(x) for x in text.split(",") if x]


def parse_args(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--workloads", default="tx,rx,loop", help="tx, rx, loop (default all)")
    ap.add_argument("--sizes", default="64,1518", help="frame sizes in bytes (default 64,1518)")
    ap.add_argument("--queues", default="1,2,4,8", help="queue pairs (default 1,2,4,8)")
    ap.add_argument("--rounds", type=int, default=3, help="A/B rounds per configuration (default 3)")
    ap.add_argument("--seconds", type=float, default=5.0, help="measured window per run (default 5)")
    ap.add_argument("--warmup", type=float, default=1.0,
                    help="seconds of forwarding before the window opens (default 1)")
    ap.add_argument("--out", default=os.path.join(os.path.dirname(os.path.abspath(__file__)), "out"),
                    help="output directory (default bench/out)")
    ap.add_argument("--plot", action="store_true", help="also write a PNG (needs matplotlib)")
    ap.add_argument("--systems", default="shardvu,dpdk", help="which back-ends (default both)")
    ap.add_argument("--fe-cpus", default="0,1",
                    help="front-end testpmd: MAIN,FWD cpus (default 0,1: forwarding on CPU 1)")
    ap.add_argument("--be-cpus", default="1,0",
                    help="back-end: MAIN,FWD cpus for DPDK vhost (default 1,0: forwarding on CPU 0); "
                         "shardvu's workers go on FWD")
    ap.add_argument("--start-timeout", type=float, default=30.0)
    args = ap.parse_args(argv)
    args.workloads = [w for w in args.workloads.split(",") if w]
    for w in args.workloads:
        if w not in WORKLOADS:
            ap.error(f"unknown workload {w!r} (tx, rx, loop)")
    args.sizes = _ints(args.sizes)
    args.queues = _ints(args.queues)
    args.systems = [s for s in args.systems.split(",") if s]
    for s in args.systems:
        if s not in SYSTEMS:
            ap.error(f"unknown system {s!r}")
    fe = args.fe_cpus.split(",")
    be = args.be_cpus.split(",")
    if len(fe) != 2 or len(be) != 2:
        ap.error("--fe-cpus/--be-cpus take MAIN,FWD")
    args.fe_main, fe_fwd = fe
    args.be_main, be_fwd = be
    # -l lists both lcores of a testpmd; --main-lcore picks which is main.
    args.fe_lcores = ",".join(sorted({args.fe_main, fe_fwd}, key=int))
    args.be_lcores = ",".join(sorted({args.be_main, be_fwd}, key=int))
    args.be_fwd = be_fwd                           # shardvu --cpus
    if args.rounds < 1 or args.seconds <= 0:
        ap.error("--rounds >= 1 and --seconds > 0")
    return args


def main(argv=None) -> int:
    args = parse_args(argv)
    if not have_testpmd():
        print("compare.py: dpdk-testpmd not found (apt-get install dpdk)", file=sys.stderr)
        return 2
    if args.plot:
        try:
            import matplotlib  # noqa: F401
        except ImportError:
            print("compare.py: --plot needs matplotlib (pip install -e '.[bench]')", file=sys.stderr)
            return 2
    os.makedirs(args.out, exist_ok=True)
    stamp = _dt.datetime.now().strftime("%Y%m%d-%H%M%S")
    base = os.path.join(args.out, f"compare-{stamp}")
    configs = [(w, s, q) for w in args.workloads for s in args.sizes for q in args.queues]
    plan = []
    for cfg in configs:
        for r in range(args.rounds):
            order = list(args.systems) if r % 2 == 0 else list(reversed(args.systems))
            plan += [(cfg, r, system) for system in order]
    per = args.warmup + args.seconds + 4
    print(f"compare: {len(configs)} configurations x {args.rounds} rounds x {len(args.systems)} systems "
          f"= {len(plan)} runs, ~{len(plan) * per / 60:.0f} min; front-end fwd CPU {args.fe_cpus.split(',')[1]}, "
          f"back-end fwd CPU {args.be_fwd}", flush=True)
    meta = {
        "command": " ".join([os.path.basename(sys.executable), "bench/compare.py", *(argv or sys.argv[1:])]),
        "date": _dt.datetime.now().astimezone().isoformat(timespec="seconds"),
        "host": platform.node(), "cpus": os.cpu_count(), "loadavg_before": os.getloadavg(),
        "python": sys.version.split()[0], "testpmd": shutil.which("dpdk-testpmd"),
        "args": {k: v for k, v in vars(args).items()},
    }
    samples: List[Dict] = []
    out_json = base + ".json"

    def save():
        rows = summarize(samples, configs)
        with open(out_json, "w") as f:
            json.dump({"meta": meta, "summary": rows, "samples": samples}, f, indent=1, default=str)
        return rows

    t_start = time.monotonic()
    try:
        for i, ((wl, size, q), r, system) in enumerate(plan, 1):
            m = Measurement(args, system, wl, size, q)
            res = m.run()
            res["round"] = r
            res["loadavg"] = os.getloadavg()
            samples.append(res)
            head = f"[{i:3d}/{len(plan)}] {wl:4s} {size:4d}B q={q} round {r + 1}/{args.rounds} {system:7s}"
            if "mpps" in res:
                cpu = res.get("cpu", {})
                if system == "shardvu":
                    ws = [v["percent"] for k, v in cpu.items() if k.startswith("w")]
                    c = f"workers {sum(ws):.0f}% ({'/'.join(f'{v:.0f}' for v in ws)})"
                else:
                    c = f"vhost {cpu.get('be', {}).get('percent', float('nan')):.0f}%"
                warn = f"  WARNING {res['warning']}" if "warning" in res else ""
                print(f"{head} {res['mpps']:8.3f} Mpps  {c}  fe {cpu.get('fe', {}).get('percent', float('nan')):.0f}%"
                      f"  load {res['loadavg'][0]:.1f}{warn}", flush=True)
            else:
                print(f"{head}   FAILED  {res['error']}", flush=True)
            save()
    except KeyboardInterrupt:
        print("interrupted; summarising what was measured", flush=True)
    meta["loadavg_after"] = os.getloadavg()
    meta["elapsed_s"] = round(time.monotonic() - t_start, 1)
    rows = save()
    tab = table(rows)
    with open(base + ".md", "w") as f:
        f.write(f"Command: `{meta['command']}`  \n{meta['date']}, {meta['cpus']} CPUs, host {meta['host']}\n\n")
        f.write(tab + "\n")
    print()
    print(tab)
    print(f"\nsamples: {out_json}\ntable:   {base}.md")
    if args.plot and rows:
        plot(rows, base + ".png")
        print(f"plot:    {base}.png")
    left = leftover_testpmds()
    if left:
        print(f"WARNING: testpmd processes left behind: {left}", file=sys.stderr)
    return 0 if all("mpps" in s for s in samples) else 1


if __name__ == "__main__":
    sys.exit(main())
