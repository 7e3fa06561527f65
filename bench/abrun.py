"""A/B(/C) rounds of back-end measurements: what bench/compare.py and
bench/qemu_compare.py share.

Both scripts measure each configuration ``--rounds`` times per system, the
order of the systems rotating each round (A B C, B C A, C A B, …; with two
systems A B, B A), each measurement in fresh processes, and compare every
shardvu variant with DPDK vhost: ratio of the medians and the range of the
per-round (paired) ratios.  This module holds that machinery — the plan, the
measuring loop with its progress lines and per-round ratios, the JSON and
markdown outputs, the per-configuration rate summary and its table cells,
``--summarize`` and the options both take; each script says what one
measurement runs and measures, its unit (the samples' rate key: ``mpps``,
``kpps``) and its table columns.

Not a package: the scripts run as ``python3 bench/X.py`` and import this
from their own directory.
"""
from __future__ import annotations

import datetime as _dt
import json
import os
import platform
import shutil
import statistics
import sys
import time
import traceback
from typing import Callable, Dict, Hashable, List, Optional, Sequence, Tuple

import psutil

SYSTEMS = ("shardvu", "shardvu-pypy", "dpdk")
SHARDVU = ("shardvu", "shardvu-pypy")       # the variants compared against DPDK
LABELS = {"shardvu": "shardvu", "shardvu-pypy": "shardvu-pypy", "dpdk": "DPDK vhost"}


# -- arguments ---------------------------------------------------------------------

def ints(text: str) -> List[int]:
    return [int(x) for x in text.split(",") if x]


def add_idle_options(ap, wait_help: str, idle_help: Optional[str] = None) -> None:
    """--wait-idle S and --idle-below PCT (see :func:`wait_idle`)."""
    ap.add_argument("--wait-idle", type=float, default=0.0, metavar="S", help=wait_help)
    ap.add_argument("--idle-below", type=float, default=25.0, metavar="PCT", help=idle_help)


def parse_systems(ap, text: str) -> List[str]:
    """--systems: a comma list of SYSTEMS, in the order given."""
    systems = [s for s in text.split(",") if s]
    for s in systems:
        if s not in SYSTEMS:
            ap.error(f"unknown system {s!r}")
    return systems


# -- the machine -------------------------------------------------------------------

def machine_busy() -> Tuple[float, float]:
    """(monotonic time, CPU-seconds busy on the whole machine so far)."""
    ct = psutil.cpu_times()
    return time.monotonic(), sum(ct) - ct.idle - getattr(ct, "iowait", 0.0)


def wait_idle(limit_s: float, below: float) -> Tuple[float, float]:
    """Wait until the machine's busy CPU (nothing of ours runs now) over
    0.5 s is under ``below`` % of one CPU, at most ``limit_s`` seconds.
    Returns (seconds waited, last busy %)."""
    start = time.monotonic()
    while True:
        a = machine_busy()
        time.sleep(0.5)
        b = machine_busy()
        busy = 100 * (b[1] - a[1]) / (b[0] - a[0])
        waited = time.monotonic() - start
        if busy < below or waited >= limit_s:
            return round(waited, 1), round(busy, 1)


# -- the plan and the measuring loop ---------------------------------------------------

Plan = List[Tuple[Hashable, int, str]]          # (configuration, round, system)


def plan_rounds(configs: Sequence[Hashable], rounds: int, systems: Sequence[str]) -> Plan:
    """Every configuration ``rounds`` times per system, the order rotating
    each round (A B C, B C A, C A B …; with two systems A B, B A): every
    system takes every slot in turn."""
    plan: Plan = []
    for cfg in configs:
        for r in range(rounds):
            k = r % len(systems)
            plan += [(cfg, r, system) for system in list(systems[k:]) + list(systems[:k])]
    return plan


def out_base(out_dir: str, prefix: str) -> str:
    """``OUT/PREFIX-<timestamp>`` (the directory made): outputs add .json, .md, …"""
    os.makedirs(out_dir, exist_ok=True)
    stamp = _dt.datetime.now().strftime("%Y%m%d-%H%M%S")
    return os.path.join(out_dir, f"{prefix}-{stamp}")


def base_meta(script: str, argv: Optional[Sequence[str]]) -> Dict:
    """The run's command line, date, host and tools (the JSON's ``meta``;
    the caller adds its own and ``args``)."""
    return {
        "command": " ".join([os.path.basename(sys.executable), script, *(argv or sys.argv[1:])]),
        "date": _dt.datetime.now().astimezone().isoformat(timespec="seconds"),
        "host": platform.node(), "cpus": os.cpu_count(), "loadavg_before": os.getloadavg(),
        "python": sys.version.split()[0], "testpmd": shutil.which("dpdk-testpmd"),
    }


def run_plan(args, plan: Plan, meta: Dict, base: str, *, key: str,
             config_of: Callable[[Dict], Hashable],
             measure: Callable[[Hashable, str], Dict],
             describe: Callable[[Hashable], str],
             report: Callable[[Dict], str],
             summarize: Callable[[List[Dict]], List[Dict]],
             table: Callable[[List[Dict]], str],
             index_width: int = 3) -> Tuple[List[Dict], List[Dict]]:
    """Measure the plan: one progress line per measurement (``report(res)``
    where the sample has its rate ``key``, else FAILED and the error), the
    round's paired shardvu/DPDK ratios once a round is complete, the JSON
    (``BASE.json``: meta, summary, samples) rewritten after each measurement.
    Ctrl-C stops early.  Then the table: ``BASE.md`` and stdout.  Returns
    (samples, summary rows).

    ``measure(cfg, system)`` runs one measurement; ``config_of(sample)`` is
    the configuration a sample belongs to (as in the plan); ``describe(cfg)``
    names it on the progress line; ``--wait-idle`` waits before each round."""
    samples: List[Dict] = []
    out_json = base + ".json"

    def save():
        rows = summarize(samples)
        with open(out_json, "w") as f:
            json.dump({"meta": meta, "summary": rows, "samples": samples}, f, indent=1, default=str)
        return rows

    t_start = time.monotonic()
    try:
        idle = None
        for i, (cfg, r, system) in enumerate(plan, 1):
            first_of_round = i == 1 or plan[i - 2][:2] != (cfg, r)
            if args.wait_idle > 0 and first_of_round:
                idle = wait_idle(args.wait_idle, args.idle_below)
                if idle[1] >= args.idle_below:
                    print(f"  (machine still busy after {idle[0]:.0f} s: others at {idle[1]:.0f}% of a CPU;"
                          f" measuring anyway)", flush=True)
            res = measure(cfg, system)
            res["round"] = r
            if idle is not None:
                res["idle_wait"] = {"waited_s": idle[0], "busy_percent": idle[1]}
            res["loadavg"] = os.getloadavg()
            samples.append(res)
            head = f"[{i:{index_width}d}/{len(plan)}] {describe(cfg)} round {r + 1}/{args.rounds} {system:12s}"
            if key in res:
                print(f"{head} {report(res)}", flush=True)
            else:
                print(f"{head}   FAILED  {res['error']}", flush=True)
            rnd = [x for x in samples if (config_of(x), x["round"]) == (cfg, r)]
            if len(rnd) == len(args.systems):          # the round is complete: its paired ratios
                by = {x["system"]: x.get(key) for x in rnd}
                ratios = [f"{v}/dpdk {by[v] / by['dpdk']:.3f}" for v in args.systems
                          if v in SHARDVU and by.get(v) and by.get("dpdk")]
                if ratios:
                    print(f"{'':>{len(head)}}   round ratio {'  '.join(ratios)}", flush=True)
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
    return samples, rows


# -- summary --------------------------------------------------------------------------

def record_failure(res: Dict, exc: BaseException, rate_key: str) -> None:
    """Mark measurement ``res`` failed by ``exc`` (call inside the
    ``except``): its first line, the traceback's tail, no rate."""
    res["error"] = f"{type(exc).__name__}: {str(exc).splitlines()[0] if str(exc) else ''}"
    res["traceback"] = traceback.format_exc()[-3000:]
    res.pop(rate_key, None)


def raise_if_dead(snapshot: Optional[Dict]) -> None:
    """RuntimeError if a ``Runtime.stats()`` snapshot shows a dead or broken
    shardvu queue (the measurement is then not one of shardvu working)."""
    dead = [q["index"] for q in (snapshot or {}).get("queues", ())
            if q["state"] in ("dead", "broken")]
    if dead:
        raise RuntimeError(f"shardvu queue(s) {dead} dead or broken (see its log)")


def med(xs):
    """Median of the values that are not None; None if there are none."""
    xs = [x for x in xs if x is not None]
    return statistics.median(xs) if xs else None


def summarize(samples: List[Dict], configs: Sequence[Hashable], systems: Sequence[str], *, key: str,
              config_of: Callable[[Dict], Hashable], row_of: Callable[[Hashable], Dict],
              per_system: Callable[[str, List[Dict], List[Dict]], Dict]) -> List[Dict]:
    """One row per configuration (``row_of(cfg)``, then ``systems``): per
    system the rate ``key`` over the rounds (median, min, max, n, failed,
    errors) and ``per_system(system, ok samples, all samples)``; ``ratios``:
    per shardvu variant, where DPDK was measured, {"ratio": ratio of the
    medians, "paired": the per-round ratios}."""
    rows = []
    for cfg in configs:
        row: Dict = row_of(cfg)
        row["systems"] = systems
        by_round: Dict[str, Dict[int, Dict]] = {s: {} for s in systems}
        for s in samples:
            if config_of(s) == cfg and s["system"] in by_round:
                by_round[s["system"]][s["round"]] = s
        for system in systems:
            ok = [s for s in by_round[system].values() if key in s]
            rates = [s[key] for s in ok]
            row[system] = {
                "median": med(rates), "min": min(rates) if rates else None,
                "max": max(rates) if rates else None, "n": len(rates),
                "failed": len(by_round[system]) - len(ok),
                "errors": sorted({s["error"] for s in by_round[system].values() if "error" in s}),
            }
            row[system].update(per_system(system, ok, list(by_round[system].values())))
        row["ratios"] = {}
        if "dpdk" in systems:
            for variant in (x for x in systems if x in SHARDVU):
                a, b = row[variant]["median"], row["dpdk"]["median"]
                paired = [by_round[variant][r][key] / by_round["dpdk"][r][key]
                          for r in sorted(by_round[variant]) if r in by_round["dpdk"]
                          and key in by_round[variant][r] and by_round["dpdk"][r].get(key)]
                row["ratios"][variant] = {"ratio": a / b if a and b else None, "paired": paired}
        rows.append(row)
    return rows


def summarize_file(path: str, rows_of: Callable[[Dict, List[Dict]], List[Dict]],
                   table: Callable[[List[Dict]], str]) -> List[Dict]:
    """--summarize: an earlier run's JSON summarised again
    (``rows_of(meta args, samples)``) and its table printed."""
    with open(path) as f:
        data = json.load(f)
    rows = rows_of(data["meta"]["args"], data["samples"])
    print(f"Command: `{data['meta']['command']}`  ({data['meta']['date']}, {data['meta']['cpus']} CPUs)\n")
    print(table(rows))
    return rows


# -- table ----------------------------------------------------------------------------

def fmt_rate(d: Dict, fmt: str) -> str:
    """``median [min–max]`` (each with ``fmt``, e.g. ``.3g``), failures noted."""
    if d["median"] is None:
        return "failed" if d["failed"] else "—"
    txt = f"{d['median']:{fmt}} [{d['min']:{fmt}}–{d['max']:{fmt}}]"
    if d["failed"]:
        txt += f" ({d['failed']} failed)"
    return txt


def fmt_ratio(rt: Optional[Dict]) -> str:
    if not rt or rt["ratio"] is None:
        return "—"
    p = rt["paired"]
    return f"{rt['ratio']:.3f}" + (f" [{min(p):.3f}–{max(p):.3f}]" if p else "")


def variants(systems: Sequence[str]) -> List[str]:
    """The shardvu variants among ``systems``, in their order."""
    return [x for x in systems if x in SHARDVU]


def rate_heads(systems: Sequence[str], unit: str) -> List[str]:
    """Column heads: the rate per system, then (DPDK measured) each shardvu
    variant's ratio to DPDK."""
    head = [f"{LABELS[x]} {unit} med [min–max]" for x in systems]
    if "dpdk" in systems:
        head += [f"{LABELS[x]}/DPDK (per-round range)" for x in variants(systems)]
    return head


def rate_cells(row: Dict, systems: Sequence[str], fmt: str) -> List[str]:
    """The cells under :func:`rate_heads`."""
    cells = [fmt_rate(row[x], fmt) for x in systems]
    if "dpdk" in systems:
        cells += [fmt_ratio(row.get("ratios", {}).get(x)) for x in variants(systems)]
    return cells


def markdown(head: Sequence[str], align: Sequence[str], body: Sequence[Sequence[str]]) -> str:
    """A markdown table; ``align`` gives the first columns' rule (``---:``
    right-aligned), the others get ``---``."""
    lines = ["| " + " | ".join(head) + " |",
             "|" + "|".join(align) + "|" + "---|" * (len(head) - len(align))]
    lines += ["| " + " | ".join(cells) + " |" for cells in body]
    return "\n".join(lines)
