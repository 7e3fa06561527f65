#!/usr/bin/env python3
"""shardvu beside DPDK's vhost PMD, serving a real QEMU guest.

    python3 bench/qemu_compare.py [--queues 1,2,4] [--rounds 3] [--seconds 10]
        [--warmup 2] [--size 64] [--out bench/out] [--wait-idle S]

The same guest — shardvu's test guest (:mod:`shardvu.testing.guest`) in QEMU under
TCG (:mod:`shardvu.testing.qemu`: ``-smp`` = queues, multiqueue virtio-net-pci
with ``vectors=0``, memory from a shared memfd) — runs the kernel's pktgen
on every vCPU, each on its own TX queue, 64-byte frames, no count limit
(``shardvu.mode=pktgen shardvu.count=0``), served in turn by two
vhost-user back-ends on the same socket:

* ``shardvu``: ``shardvu run --port sink --queues N --cpus FWD`` (a
  control process, one worker process per virtqueue, workers on one CPU);
* ``dpdk``: ``dpdk-testpmd --no-huge -m 1024 --vdev
  net_vhost0,iface=SOCK,queues=N ... --forward-mode=rxonly``, its
  forwarding lcore on the same CPU (``-l 0,1 --main-lcore MAIN``).

The rate is the **back-end's received packets per second** over a steady
window: for shardvu the sum of its TX-queue workers' ``packets`` rates
(``Runtime.stats()``), for DPDK vhost its port's RX packets (DPDK's
telemetry socket, ``/ethdev/stats,0``) — both sampled and time-stamped by
bench/compare.py's samplers, imported from there.  The window opens
``--warmup`` s after the guest says ``SHARDVU pktgen_setup`` (pktgen
starts right after) and lasts ``--seconds``.  Then the host takes the link
down (QMP ``set_link n0 off``): QEMU stops the vhost-user rings, pktgen
stops on the carrier loss, and the guest reports what it sent
(``SHARDVU pktgen cpu=C sent=N pps=P``: per vCPU, pktgen's own average over
its whole run) and its ``tx_packets``; the back-end's final total is
checked against that.

Under TCG the guest is the bottleneck: its pktgen made 130–200 kpps in
all on the 2-CPU VM this was written on (every frame is thousands of
emulated instructions, and QEMU's main thread injects the interrupts of
the MSI-X-less device), far below what either back-end takes (see
bench/compare.py: millions of packets per second with DPDK's virtio-user
as the front-end).  So the ratio is expected near 1: this shows that
shardvu keeps up with a real QEMU guest, not which back-end is faster.
What can still differ: the CPU each back-end takes from the guest (DPDK's
forwarding lcore busy-polls a whole CPU; shardvu's workers spin a while
between frames with notifications off, yielding the CPU, and sleep on
the kick eventfds when idle), which matters when the vCPUs and the
back-end share CPUs (``--qemu-cpus`` keeps them apart).

Runs alternate A B, B A … per round (fresh processes and a fresh guest
each time); reported per system: median [min–max] of the rounds, the ratio
of the medians and the range of the per-round paired ratios, the guest's
pktgen rate, CPU % of QEMU (and its vCPU threads), of the back-end, and of
everything else on the machine (*others*).

Outputs (``--out``, default bench/out): ``qemu-compare-<timestamp>.json``
(every run: rates, raw samples, guest results, CPU, errors and log tails
of failed runs) and ``qemu-compare-<timestamp>.md`` (the table).
"""
from __future__ import annotations

import argparse
import os
import shutil
import sys
import tempfile
import time
from typing import Dict, List, Optional, Tuple

import psutil

BENCH = os.path.dirname(os.path.abspath(__file__))
REPO = os.path.dirname(BENCH)
sys.path.insert(0, BENCH)

# the A/B rounds, summary and table machinery of both benches
import abrun  # noqa: E402
from abrun import LABELS, SHARDVU, machine_busy, med  # noqa: E402
# bench/compare.py's samplers and CPU accounting (one method for both benches)
from compare import (POLL_S, backend_pids, ShardvuSampler, TelemetrySampler, cpu_percent,  # noqa: E402
                     cpu_snapshot, others_percent, shardvu_tx_rate, window_rate)

from shardvu.testing.qemu import Guest, have_qemu, leftover_qemus  # noqa: E402
from shardvu.testing.testpmd import TestPmd, have_testpmd, leftover_testpmds  # noqa: E402


# -- one measurement -------------------------------------------------------------

class Measurement:
    def __init__(self, args, system: str, queues: int, kernel: str, initramfs: str):
        self.args, self.system, self.queues = args, system, queues
        self.kernel, self.initramfs = kernel, initramfs

    def run(self) -> Dict:
        a, q = self.args, self.queues
        tmp = tempfile.mkdtemp(prefix="svqc-", dir="/tmp")          # short: Unix socket path
        sock = os.path.join(tmp, "vu.sock")
        res: Dict = {"system": self.system, "queues": q, "size": a.size, "start": time.time()}
        rt = be = g = None
        be_tel: Optional[TelemetrySampler] = None
        try:
            # back-end first: QEMU (the socket client) connects at start-up
            if self.system in SHARDVU:
                from shardvu.testing.runtime import Runtime
                extra = ["--worker-python", a.worker_python] if self.system == "shardvu-pypy" else []
                rt = Runtime(sock, q, "sink", "--cpus", a.shardvu_cpus, "--log-level", "WARNING",
                             *extra, log_path=os.path.join(tmp, "shardvu.log"))
                sampler = ShardvuSampler(rt)
            else:
                be = TestPmd.vhost(sock, q, mode="rxonly", cores=a.be_lcores,
                                   extra_eal=["--main-lcore", a.be_main], mem_mb=1024,
                                   total_mbufs=32768, stats_period=0,
                                   log_path=os.path.join(tmp, "be.log"))
                be.start()
                be.wait_started(a.start_timeout)
                be_tel = sampler = TelemetrySampler(be.file_prefix)
            t_boot = time.time()
            g = Guest(sock, q, "pktgen",
                      f"shardvu.count=0 shardvu.size={a.size} shardvu.settle=0.3",
                      kernel=self.kernel, initramfs=self.initramfs,
                      serial_log=os.path.join(tmp, "serial.log"),
                      # thread names (vCPU threads: "CPU n/TCG") for the CPU columns
                      extra_args=("-name", "shardvu-guest,debug-threads=on"))
            g.start()
            if a.qemu_cpus:
                _pin_all_threads(g.proc.pid, a.qemu_cpus)
            g.wait_for(r"SHARDVU pktgen_setup", a.boot_timeout)
            t_fwd = time.time()
            res["boot_s"] = round(t_fwd - t_boot, 2)
            ready = g.result("ready")
            res["guest_ready"] = ready
            if ready.get("txq") != q or ready.get("cpus") != q:
                raise RuntimeError(f"guest has {ready.get('cpus')} vCPUs / {ready.get('txq')} TX queues, "
                                   f"wanted {q}")
            if a.qemu_cpus:                       # threads QEMU made since start-up
                _pin_all_threads(g.proc.pid, a.qemu_cpus)
            t0, t1 = t_fwd + a.warmup, t_fwd + a.warmup + a.seconds
            cpu_a = cpu_b = None
            pids: Dict[str, int] = {}
            while True:
                now = time.time()
                if now >= t0 and cpu_a is None:
                    pids = self._pids(rt, be, g)
                    cpu_a = cpu_snapshot(pids)
                    busy_a = machine_busy()
                    t0 = time.time()
                    if be_tel is not None:
                        be_tel.sample()
                elif now >= t1:
                    cpu_b = cpu_snapshot(pids)
                    busy_b = machine_busy()
                    if be_tel is not None:
                        be_tel.sample()
                        t1 = max(time.time(), be_tel.samples[-1][0])
                    else:
                        t1 = time.time()
                    break
                sampler.poll()
                if not g.running():
                    raise RuntimeError(f"qemu exited ({g.proc.returncode}) during the run:\n"
                                       f"{g.stderr()[-1000:]}\n{g.serial()[-1500:]}")
                if (be is not None and not be.running()) or (rt is not None and rt.proc.poll() is not None):
                    raise RuntimeError("the back-end exited during the run")
                time.sleep(POLL_S)
            res["window"] = {"t_pktgen_setup": t_fwd, "t0": t0, "t1": t1}
            # the rate
            if be is not None:
                r = window_rate(sampler.series("ipackets"), t0, t1)
                res["counted_by"] = "DPDK vhost port 0 ipackets (DPDK telemetry)"
                res["series"] = {"ipackets": [[round(t - t_fwd, 3), n] for t, n in sampler.series("ipackets")]}
                qs = [f.get("q_ipackets") for _, f in sampler.samples if f.get("q_ipackets")]
                if len(qs) >= 2:
                    res["per_queue_packets_total"] = qs[-1][:q]
            else:
                r = shardvu_tx_rate(sampler, q, t0, t1)
                res["counted_by"] = "shardvu TX-queue workers' packets (sum of per-queue rates)"
                res["series"] = {f"q{k}": [[round(t - t_fwd, 3), n] for t, n in v]
                                 for k, v in sampler.series.items() if k % 2 == 1}
            if r is None:
                raise RuntimeError("not enough counter samples inside the window")
            res["pps"] = r.pop("pps")
            res["kpps"] = round(res["pps"] / 1e3, 2)
            res["rate_detail"] = r
            res["cpu"] = cpu_percent(cpu_a or {}, cpu_b or {})
            res["others_cpu_percent"] = others_percent(busy_a, busy_b, res["cpu"])
            if rt is not None:
                abrun.raise_if_dead(sampler.last)
            if res["pps"] <= 0:
                raise RuntimeError("no packets counted in the window")
            # stop the guest's traffic: link down → pktgen stops → the guest reports
            self._guest_report(g, res)
            res["backend_total"] = self._backend_total(rt, be_tel, q)
            sent = res.get("guest", {}).get("tx_packets")
            if sent is not None and res["backend_total"] is not None:
                # frames the guest queued after QEMU stopped the vhost-user
                # rings are QEMU's to drop (link down): guest >= back-end
                res["guest_minus_backend"] = sent - res["backend_total"]
        except Exception as exc:                       # noqa: BLE001 — recorded, the run goes on
            abrun.record_failure(res, exc, "kpps")
            if g is not None:
                res["serial_tail"] = g.serial()[-2000:]
                res["qemu_stderr_tail"] = g.stderr()[-1500:]
            if be is not None:
                res["be_log_tail"] = be.log()[-2500:]
            if rt is not None:
                try:
                    res["shardvu_log_tail"] = rt.log()[-3000:]
                except OSError:
                    pass
        finally:
            if be_tel is not None:
                be_tel.close()
            res.update(self._stop(rt, be, g))
            if leftover_qemus(tmp):
                res["warning"] = "qemu left running"
            shutil.rmtree(tmp, ignore_errors=True)
        res["end"] = time.time()
        return res

    def _guest_report(self, g: Guest, res: Dict) -> None:
        """Link down, wait for ``SHARDVU done``; the guest's pktgen and
        interface counters go to ``res["guest"]``."""
        try:
            g.set_link(False)
            out = g.wait_done(timeout=self.args.boot_timeout)
        except Exception as exc:                   # noqa: BLE001 — the rate stands without it
            res["guest_error"] = f"{type(exc).__name__}: {str(exc).splitlines()[0] if str(exc) else ''}"
            out = g.results()
        pk = [p for p in out.get("pktgen", ())]
        st = (out.get("stats") or [{}])[-1]
        res["guest"] = {
            "pktgen": pk,
            "pktgen_pps": sum(p.get("pps", 0) for p in pk) if pk else None,
            "pktgen_sent": sum(p.get("sent", 0) for p in pk) if pk else None,
            "pktgen_errors": sum(p.get("errors", 0) for p in pk) if pk else None,
            "tx_packets": st.get("tx_packets"), "tx_dropped": st.get("tx_dropped"),
            "tx_errors": st.get("tx_errors"),
        }
        if "error" in out:
            res["guest_error"] = str(out["error"])

    def _backend_total(self, rt, be_tel: Optional[TelemetrySampler], q: int) -> Optional[int]:
        """What the back-end received in all, once the rings are stopped."""
        if be_tel is not None:
            try:
                return be_tel.sample()["ipackets"]
            except Exception:                   # noqa: BLE001
                return None
        deadline = time.monotonic() + 5
        last = None
        while time.monotonic() < deadline:       # workers publish every 0.5 s: wait for two equal reads
            try:
                snap = {x["index"]: x["packets"] for x in rt.stats(timeout=1.0)["queues"]}
                tot = sum(snap.get(2 * p + 1, 0) for p in range(q))
            except Exception:                   # noqa: BLE001
                tot = None
            if tot is not None and tot == last:
                return tot
            last = tot
            time.sleep(0.6)
        return last

    def _pids(self, rt, be, g) -> Dict[str, int]:
        return {"qemu": g.proc.pid, **backend_pids(rt, be)}

    def _stop(self, rt, be, g) -> Dict:
        out: Dict = {}
        if g is not None:
            out["qemu_returncode"] = g.stop()
        if be is not None:
            st = be.stop()
            out["be_final"] = {"returncode": be.returncode,
                               "rx_packets": (st or {}).get("rx_packets"),
                               "rx_dropped": (st or {}).get("rx_dropped")}
        if rt is not None:
            try:
                out["be_final"] = {"returncode": rt.stop()}
            except Exception as exc:           # noqa: BLE001
                out["stop_error"] = str(exc)[:500]
            try:
                errs = [line for line in rt.log().splitlines() if "ERROR" in line or "broken" in line]
                if errs:
                    out["shardvu_errors"] = errs[:20]
            except OSError:
                pass
        return out


def _pin_all_threads(pid: int, cpus: List[int]) -> None:
    try:
        for th in psutil.Process(pid).threads():
            try:
                os.sched_setaffinity(th.id, cpus)
            except OSError:
                pass
    except psutil.Error:
        pass


# -- summary and table -------------------------------------------------------------

def _qemu_cpu(s: Dict) -> Tuple[Optional[float], Optional[float]]:
    """(QEMU process CPU %, its vCPU threads' CPU % summed)."""
    c = s.get("cpu", {}).get("qemu")
    if not c:
        return None, None
    vcpu = sum(v for n, v in c["threads"].items() if n.startswith("CPU "))
    return c["percent"], vcpu


def _be_cpu(s: Dict) -> Optional[float]:
    cpu = s.get("cpu", {})
    if s["system"] == "dpdk":
        return cpu.get("be", {}).get("percent")
    ws = [v["percent"] for k, v in cpu.items() if k.startswith("w") or k == "control"]
    return sum(ws) if ws else None


def _per_system(system: str, ok: List[Dict], measured: List[Dict]) -> Dict:
    """A system's guest rate, CPU and checks over its successful rounds (medians)."""
    return {
        "guest_pktgen_kpps": med([(s.get("guest") or {}).get("pktgen_pps") and
                                  s["guest"]["pktgen_pps"] / 1e3 for s in ok]),
        "qemu_cpu": med([_qemu_cpu(s)[0] for s in ok]),
        "vcpu_cpu": med([_qemu_cpu(s)[1] for s in ok]),
        "be_cpu": med([_be_cpu(s) for s in ok]),
        "others_cpu": med([s.get("others_cpu_percent") for s in ok]),
        "guest_minus_backend": [s.get("guest_minus_backend") for s in ok],
        "boot_s": med([s.get("boot_s") for s in ok]),
    }


def summarize(samples: List[Dict], queues: List[int], systems: List[str]) -> List[Dict]:
    return abrun.summarize(samples, queues, systems, key="kpps", config_of=lambda s: s["queues"],
                           row_of=lambda q: {"queues": q}, per_system=_per_system)


def _slash(row: Dict, systems: List[str], key: str, fmt: str = "{:.0f}") -> str:
    return "/".join("—" if row[x].get(key) is None else fmt.format(row[x][key]) for x in systems)


def table(rows: List[Dict]) -> str:
    if not rows:
        return ""
    systems = rows[0]["systems"]
    names = "/".join(LABELS[x] for x in systems)
    head = ["queues (= vCPUs)"] + abrun.rate_heads(systems, "kpps")
    head += [f"guest pktgen kpps ({names})", f"QEMU CPU % (vCPUs) ({names})",
             f"back-end CPU % ({names})", f"others CPU % ({names})"]
    body = []
    for r in rows:
        cells = [str(r["queues"])] + abrun.rate_cells(r, systems, ".0f")
        cells.append(_slash(r, systems, "guest_pktgen_kpps"))
        cells.append("/".join("—" if r[x]["qemu_cpu"] is None else
                              f"{r[x]['qemu_cpu']:.0f} ({r[x]['vcpu_cpu']:.0f})" for x in systems))
        cells.append(_slash(r, systems, "be_cpu"))
        cells.append(_slash(r, systems, "others_cpu"))
        body.append(cells)
    return abrun.markdown(head, ("---:",), body)


# -- main ----------------------------------------------------------------------------------

def parse_args(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--queues", default="1,2,4", help="queue pairs = guest vCPUs (default 1,2,4)")
    ap.add_argument("--rounds", type=int, default=3, help="A/B rounds per queue count (default 3)")
    ap.add_argument("--seconds", type=float, default=10.0, help="measured window per run (default 10)")
    ap.add_argument("--warmup", type=float, default=2.0,
                    help="seconds of pktgen before the window opens (default 2)")
    ap.add_argument("--size", type=int, default=64,
                    help="frame size in bytes, without FCS (pktgen pkt_size; default 64)")
    ap.add_argument("--out", default=os.path.join(BENCH, "out"), help="output directory (default bench/out)")
    ap.add_argument("--systems", default="shardvu,dpdk",
                    help="back-ends, any of shardvu, shardvu-pypy, dpdk (default shardvu,dpdk)")
    ap.add_argument("--worker-python", metavar="PATH", default=os.path.join(REPO, ".venv-pypy", "bin", "python"),
                    help="the workers' interpreter for shardvu-pypy")
    ap.add_argument("--be-cpus", default="1,0",
                    help="MAIN,FWD: DPDK vhost's main and forwarding lcores (default 1,0: forwarding "
                         "on CPU 0); shardvu's workers go on FWD unless --shardvu-cpus says otherwise")
    ap.add_argument("--shardvu-cpus", metavar="LIST", help="shardvu run --cpus (default: the FWD cpu)")
    ap.add_argument("--qemu-cpus", metavar="LIST",
                    help="pin all of QEMU's threads to these CPUs, e.g. 1 or 1-3 (default: unpinned)")
    abrun.add_idle_options(ap, "before each A/B pair, wait up to S s for the rest of the machine to use "
                               "less than --idle-below %% of a CPU (default 0: don't)")
    ap.add_argument("--start-timeout", type=float, default=30.0, help="DPDK vhost start-up limit (s)")
    ap.add_argument("--boot-timeout", type=float, default=90.0,
                    help="limit (s) for the guest to boot and set up pktgen, and to report after link down")
    ap.add_argument("--summarize", metavar="JSON", help="run nothing: print the table of an earlier run")
    args = ap.parse_args(argv)
    args.queues = abrun.ints(args.queues)
    args.systems = abrun.parse_systems(ap, args.systems)
    be = args.be_cpus.split(",")
    if len(be) != 2:
        ap.error("--be-cpus takes MAIN,FWD")
    args.be_main, args.be_fwd = be
    args.be_lcores = ",".join(sorted(set(be), key=int))
    args.shardvu_cpus = args.shardvu_cpus or args.be_fwd
    if args.qemu_cpus:
        cpus = []
        for part in args.qemu_cpus.split(","):
            lo, _, hi = part.partition("-")
            cpus += list(range(int(lo), int(hi or lo) + 1))
        args.qemu_cpus = cpus
    if args.rounds < 1 or args.seconds <= 0 or args.size < 60:
        ap.error("--rounds >= 1, --seconds > 0, --size >= 60")
    return args


def _report(res: Dict) -> str:
    """The progress line of a measurement that has its rate."""
    qc, vc = _qemu_cpu(res)
    gd = res.get("guest", {})
    gp = gd.get("pktgen_pps")
    chk = res.get("guest_minus_backend")
    return (f"{res['kpps']:8.1f} kpps  guest pktgen {gp / 1e3 if gp else float('nan'):.1f} kpps"
            f"  boot {res.get('boot_s', 0):.1f} s  qemu {qc or 0:.0f}% (vCPUs {vc or 0:.0f}%)"
            f"  back-end {_be_cpu(res) or 0:.0f}%  others {res['others_cpu_percent']:.0f}%"
            f"  guest-sent minus back-end-total {chk if chk is not None else '?'}"
            + (f"  GUEST {res['guest_error']}" if "guest_error" in res else "")
            + (f"  WARNING {res['warning']}" if "warning" in res else ""))


def main(argv=None) -> int:
    args = parse_args(argv)
    if args.summarize:
        abrun.summarize_file(args.summarize, lambda a, samples: summarize(samples, a["queues"], a["systems"]),
                             table)
        return 0
    ok, why = have_qemu()
    if not ok:
        print(f"qemu_compare.py: {why}", file=sys.stderr)
        return 2
    if "dpdk" in args.systems and not have_testpmd():
        print("qemu_compare.py: dpdk-testpmd not found (apt-get install dpdk)", file=sys.stderr)
        return 2
    from shardvu.testing.guest import build_guest, have_guest_tools
    ok, why = have_guest_tools()
    if not ok:
        print(f"qemu_compare.py: {why}", file=sys.stderr)
        return 2
    kernel, initramfs = build_guest()
    base = abrun.out_base(args.out, "qemu-compare")
    plan = abrun.plan_rounds(args.queues, args.rounds, args.systems)
    per = 12 + args.warmup + args.seconds + args.wait_idle / len(args.systems)
    print(f"qemu_compare: queues {args.queues} x {args.rounds} rounds x {len(args.systems)} systems = "
          f"{len(plan)} runs, ~{len(plan) * per / 60:.0f} min; {args.size}-byte frames; back-end fwd CPU "
          f"{args.be_fwd} (shardvu workers on {args.shardvu_cpus}); QEMU "
          f"{'on CPUs ' + ','.join(map(str, args.qemu_cpus)) if args.qemu_cpus else 'unpinned'}", flush=True)
    meta = abrun.base_meta("bench/qemu_compare.py", argv)
    meta.update({"qemu": have_qemu()[1], "kernel": kernel, "args": dict(vars(args))})
    samples, _ = abrun.run_plan(
        args, plan, meta, base, key="kpps", config_of=lambda s: s["queues"],
        measure=lambda q, system: Measurement(args, system, q, kernel, initramfs).run(),
        describe=lambda q: f"q={q}", report=_report,
        summarize=lambda samples: summarize(samples, args.queues, args.systems),
        table=table, index_width=2)
    left = leftover_testpmds(f"shvu{os.getpid()}n") + leftover_qemus("svqc-")
    if left:
        print(f"WARNING: processes left behind: {left}", file=sys.stderr)
    return 0 if all("kpps" in s for s in samples) else 1


if __name__ == "__main__":
    sys.exit(main())
