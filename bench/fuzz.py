"""Fuzz ``shardvu run`` on demand: a hostile front-end, then a hostile guest.

    python3 bench/fuzz.py --messages 1000000 --seed S
    python3 bench/fuzz.py --seed S --replay 384          # one connection again
    python3 bench/fuzz.py --seed S --replay 384 --guest  # one guest connection

Starts ``shardvu run --port loopback`` (``--queues`` pairs), runs
:func:`shardvu.testing.fuzz.run_campaign` against it and prints the seed
first and last, the findings (deduplicated by what happened; each with the
connection that replays it) and the coverage matrix (request code × fd kind
× connection phase).  A back-end process that dies is reported and a fresh
``shardvu run`` started, so a long run goes on.  Exit status 1 when
anything was found.  ``--json PATH`` writes the report.
"""
from __future__ import annotations

import argparse
import json
import os
import random
import shutil
import signal
import sys
import tempfile
from typing import Dict, List, Tuple

from rich.console import Console
from rich.table import Table

from shardvu.protocol import request_name
from shardvu.testing.fuzz import (NUM_CODES, FdKind, Finding, GuestFuzzer, Phase,
                                  ProtocolFuzzer, Report, Target, run_campaign)
from shardvu.testing.runtime import Runtime


def coverage_table(report: Report) -> Table:
    """Rows: request codes; one column per phase with the count per fd kind."""
    table = Table(title=f"coverage: {report.coverage.total} messages; min cell "
                        f"{report.coverage.minimum()}, empty cells {len(report.coverage.empty_cells())}")
    table.add_column("code", justify="right")
    table.add_column("request")
    kinds = "/".join(k.name[:2] for k in FdKind)
    for p in Phase:
        table.add_column(f"{p.name} ({kinds})", justify="right")
    for code in range(NUM_CODES):
        row = [str(code), request_name(code)]
        for p in Phase:
            row.append(" ".join(f"{report.coverage.count(code, k, p):>3}" for k in FdKind))
        table.add_row(*row)
    return table


def summary_table(report: Report) -> Table:
    """Phase x fd kind: the fewest and most messages of any request code
    in that cell column, and their total."""
    cov = report.coverage
    table = Table(title="per phase and fd kind: min-max over the 64 codes (total)")
    table.add_column("phase")
    for k in FdKind:
        table.add_column(k.name, justify="right")
    for p in Phase:
        cells = []
        for k in FdKind:
            counts = [cov.count(c, k, p) for c in range(NUM_CODES)]
            cells.append(f"{min(counts)}-{max(counts)} ({sum(counts)})")
        table.add_row(p.name, *cells)
    return table


def dedupe(findings: Tuple[Finding, ...]) -> List[Tuple[Finding, int]]:
    """One finding per (fuzzer, what, first line of the detail's last line),
    with how often it happened."""
    seen: Dict[Tuple[str, str, str], List] = {}
    for f in findings:
        key = (f.fuzzer, f.what, f.detail.strip().splitlines()[-1][:100] if f.detail else "")
        if key in seen:
            seen[key][1] += 1
        else:
            seen[key] = [f, 1]
    return [(f, n) for f, n in seen.values()]


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--messages", type=int, default=20000, help="mutated protocol messages")
    ap.add_argument("--guest-rounds", type=int, default=None,
                    help="hostile ring rounds (default: messages / 10)")
    ap.add_argument("--seed", type=int, default=None, help="default: a random one, printed")
    ap.add_argument("--queues", type=int, default=1, help="queue pairs of shardvu run")
    ap.add_argument("--max-messages", type=int, default=24,
                    help="random messages per connection beside the scheduled ones")
    ap.add_argument("--replay", type=int, default=None, help="run only this connection")
    ap.add_argument("--guest", action="store_true", help="--replay a guest-fuzzer connection")
    ap.add_argument("--worker-python", default=None, help="interpreter for the workers (PyPy)")
    ap.add_argument("--json", default=None, help="write the report here")
    ap.add_argument("--keep", action="store_true", help="keep shardvu's logs (the path is printed)")
    args = ap.parse_args(argv)
    seed = args.seed if args.seed is not None else random.SystemRandom().randrange(1 << 32)
    # SIGTERM unwinds like Ctrl-C, so the runtimes started below are stopped.
    signal.signal(signal.SIGTERM, lambda signum, frame: sys.exit(128 + signum))
    console = Console(width=max(Console().width, 150))
    console.print(f"seed {seed}")
    tmp = tempfile.mkdtemp(prefix="shardvu-fuzz-")
    extra = ["--worker-python", args.worker_python] if args.worker_python else []
    runtimes: List[Runtime] = []

    path = os.path.join(tmp, "vu.sock")

    def start() -> Target:
        rt = Runtime(path, args.queues, "loopback", *extra,
                     log_path=os.path.join(tmp, f"shardvu{len(runtimes)}.log"))
        runtimes.append(rt)
        return Target(rt.proc.pid, rt.log_path)

    try:
        target = start()
        if args.replay is not None:
            cls = GuestFuzzer if args.guest else ProtocolFuzzer
            fz = cls(path, seed, target)
            fz.run_connection(args.replay)
            for f in fz.findings:
                console.print(str(f), markup=False, soft_wrap=True)
            console.print(f"seed {seed} connection {args.replay}: {len(fz.findings)} findings")
            return 1 if fz.findings else 0

        def restart() -> Target:
            """A fresh ``shardvu run`` on the same socket (the old log kept)."""
            try:
                runtimes[-1].stop()
            except RuntimeError as exc:
                console.print(f"stopping the broken runtime: {exc}", markup=False)
            if os.path.exists(path):
                os.unlink(path)
            console.print("the control process died: restarting shardvu run", markup=False)
            return start()

        guest_rounds = args.guest_rounds if args.guest_rounds is not None else args.messages // 10
        report = run_campaign(path, target, seed, args.messages, guest_rounds,
                              max_messages=args.max_messages, restart=restart,
                              progress=lambda line: console.print(line, markup=False))
        console.print(coverage_table(report))
        console.print(summary_table(report))
        console.print("hostile ring rounds: " + ", ".join(f"{k} {v}" for k, v in sorted(report.guest_ops.items())),
                      markup=False, soft_wrap=True)
        for f, n in dedupe(report.findings):
            console.print(f"{n} x " + str(f), markup=False, soft_wrap=True)
        console.print(f"seed {seed}: {report.messages} mutated messages ({report.prefix_messages} in "
                      f"valid prefixes) over {report.connections} connections, "
                      f"{report.guest_rounds} hostile ring rounds over {report.guest_connections} "
                      f"connections, {report.seconds:.0f} s ({report.protocol_seconds:.0f} s of protocol "
                      f"fuzzing: {report.rate:.0f} messages/s); "
                      f"{len(report.findings)} findings, {report.restarts} restarts")
        if args.json:
            with open(args.json, "w") as f:
                json.dump({"seed": seed, "messages": report.messages,
                           "prefix_messages": report.prefix_messages,
                           "connections": report.connections, "guest_rounds": report.guest_rounds,
                           "seconds": report.seconds, "protocol_seconds": report.protocol_seconds,
                           "rate": report.rate, "guest_ops": report.guest_ops,
                           "coverage": report.coverage.to_json(),
                           "findings": [f._asdict() for f in report.findings]}, f, indent=1)
        return 1 if report.findings else 0
    finally:
        for rt in runtimes:
            if rt.proc.poll() is None:
                try:
                    rt.stop()
                except RuntimeError as exc:
                    console.print(str(exc), markup=False)
        if args.keep:
            console.print(f"logs kept in {tmp}", markup=False)
        else:
            shutil.rmtree(tmp, ignore_errors=True)


if __name__ == "__main__":
    sys.exit(main())
