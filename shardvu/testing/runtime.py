"""Start and stop a real ``shardvu run`` as a subprocess: used by
``shardvu bench``, bench/ and the tests."""
from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from typing import Dict, List, Optional

import psutil

from shardvu.statsapi import endpoints, query



class Runtime:
    """``shardvu run --socket SOCK --queues N --port PORT EXTRA...`` in a
    subprocess, its output in ``log_path``.  With ``wait`` the constructor
    returns once every worker runs and stats answer.  :meth:`stop` sends
    SIGTERM and raises RuntimeError if a worker outlives the control
    process."""

    def __init__(self, sock: str, queues: int = 1, port: str = "sink", *extra: str,
                 log_path: Optional[str] = None, wait: bool = True, pass_fds=()):
        self.sock = sock
        cmd = [sys.executable, "-m", "shardvu.cli", "run", "--queues", str(queues),
               "--port", port, "--log-level", "INFO", *extra]
        if "--fd" not in extra:
            cmd += ["--socket", sock]
        self.log_path = log_path or sock + ".log"
        self._log = open(self.log_path, "w")
        self.proc = subprocess.Popen(cmd, stdout=self._log, stderr=subprocess.STDOUT,
                                     pass_fds=pass_fds)
        self.ps = psutil.Process(self.proc.pid)
        self.num_workers = 2 * queues
        if wait:
            self.wait_ready()

    def wait_ready(self, timeout: float = 15.0) -> None:
        deadline = time.monotonic() + timeout
        while True:
            if self.proc.poll() is not None:
                raise RuntimeError(f"shardvu run exited {self.proc.returncode}:\n{self.log()}")
            if len(self.workers()) == self.num_workers and self.stats_ready():
                return
            if time.monotonic() > deadline:
                raise RuntimeError(f"shardvu run not ready:\n{self.log()}")
            time.sleep(0.05)

    def stats_ready(self) -> bool:
        try:
            self.stats(timeout=0.5)
            return True
        except Exception:
            return False

    def workers(self) -> List[psutil.Process]:
        """The worker processes (not multiprocess's resource tracker, which
        a spawning control process also starts, nor the zygote and its
        spare workers)."""
        return [p for p in self._children() if not _is_resource_tracker(p) and not _is_zygote(p)
                and not _is_capture(p)]

    def zombies(self) -> List[int]:
        """Pids of the control process's descendants that died and were
        not reaped (a supervisor must leave none)."""
        out = []
        for p in self._children():
            try:
                if p.status() == psutil.STATUS_ZOMBIE:
                    out.append(p.pid)
            except psutil.NoSuchProcess:
                pass
        return out

    def _children(self) -> List[psutil.Process]:
        try:
            return self.ps.children(recursive=True)
        except psutil.NoSuchProcess:
            return []

    def fds(self, settle: float = 0.3, timeout: float = 5.0) -> int:
        """The control process's open fds, once the count has held still for
        ``settle`` seconds (a stats query leaves a ZeroMQ connection open a
        moment)."""
        deadline = time.monotonic() + timeout
        last = -1
        while True:
            n = len(os.listdir(f"/proc/{self.proc.pid}/fd"))
            if n == last or time.monotonic() > deadline:
                return n
            last = n
            time.sleep(settle)

    def stats(self, timeout: float = 2.0) -> Dict:
        return query(endpoints(self.sock)[1], timeout)

    def queue_stats(self) -> Dict[int, Dict]:
        return {q["index"]: q for q in self.stats()["queues"]}

    def settled_stats(self, indices=None, timeout: float = 12.0) -> Dict[int, Dict]:
        """Per-queue stats once two reads 0.6 s apart agree on the packets,
        bytes and drops of every queue in ``indices`` (default all): the
        workers publish every 0.5 s.  After ``timeout`` seconds, the last
        read as it is (the caller's exact checks then say what moved)."""
        deadline = time.monotonic() + timeout
        last = None
        while True:
            snap = self.queue_stats()
            now = {i: (s["packets"], s["bytes"], s["drops"]) for i, s in snap.items()
                   if indices is None or i in indices}
            if now == last or time.monotonic() > deadline:
                return snap
            last = now
            time.sleep(0.6)

    def log(self) -> str:
        """Everything the runtime logged so far (undecodable bytes
        replaced); OSError if the log file is gone."""
        if not self._log.closed:
            self._log.flush()
        with open(self.log_path, errors="replace") as f:
            return f.read()

    def stop(self, sig: int = signal.SIGTERM, timeout: float = 10.0) -> int:
        """Signal the control process; returns its exit code.  Raises if it or
        any worker outlives ``timeout``."""
        children = self._children()
        if self.proc.poll() is None:
            self.proc.send_signal(sig)
        try:
            rc = self.proc.wait(timeout)
        finally:
            self._log.close()
        gone, alive = psutil.wait_procs(children, timeout=5)
        for p in alive:
            p.kill()
        if alive:
            raise RuntimeError(f"workers left behind: {[p.pid for p in alive]}")
        return rc


def _is_zygote(p: psutil.Process) -> bool:
    """The zygote or one of its spares (control/zygote.py names them)."""
    try:
        name = p.name()
        if name.startswith("shardvu-w"):          # a spare that became a worker
            return False
        return (name in ("shardvu-zygote", "shardvu-spare")
                or any("shardvu.control.zygote" in a for a in p.cmdline()))
    except psutil.Error:
        return False


def _is_capture(p: psutil.Process) -> bool:
    """The --pcap capture process (control/capture.py)."""
    try:
        return any("shardvu.control.capture" in a for a in p.cmdline())
    except psutil.Error:
        return False


def _is_resource_tracker(p: psutil.Process) -> bool:
    try:
        return any("resource_tracker" in a for a in p.cmdline())
    except psutil.Error:
        return False
