"""The worker processes of the sharded runtime: one per virtqueue.

Workers are started through ``multiprocess`` (fork; or spawn with another
interpreter, ``worker_python``, e.g. PyPy), each with its own
``SOCK_SEQPACKET`` command channel.  :meth:`WorkerHandle.command` sends one
command and waits for the worker's answer: that wait is the barrier that
makes a state change take effect in the worker before the control process
replies to the front-end.

Contract: :meth:`WorkerPool.stop` leaves no worker process behind (exit
command, then SIGTERM, then SIGKILL) and closes every channel.  A worker
that dies is noticed by :meth:`WorkerPool.reap`, logged and reported to the
stats collector; commands to it fail fast with :class:`WorkerError`.
"""
from __future__ import annotations

import logging
import os
import select
import socket
from typing import Any, Dict, List, Optional, Sequence

import multiprocess

from shardvu.workers import ctl
from shardvu.workers.ports import resolve
from shardvu.workers.worker import worker_main

log = logging.getLogger("shardvu.control")

COMMAND_TIMEOUT = 5.0


class WorkerError(Exception):
    """A worker refused a command, did not answer in time, or is gone."""


class WorkerHandle:
    """The control side of one worker."""

    def __init__(self, index: int, process, chan: socket.socket):
        self.index = index
        self.process = process
        self.chan = chan
        self.pid: int = process.pid
        self.exitcode: Optional[int] = None

    @property
    def alive(self) -> bool:
        return self.exitcode is None and self.process.is_alive()

    def command(self, obj: Dict[str, Any], fds: Sequence[int] = (),
                timeout: float = COMMAND_TIMEOUT) -> Dict[str, Any]:
        """Send ``obj`` (with ``fds``, duplicated into the worker) and return
        the worker's answer.  Raises WorkerError if it refused, timed out or
        is dead."""
        if self.exitcode is not None:
            raise WorkerError(f"worker {self.index} is dead (exit code {self.exitcode})")
        try:
            ctl.send(self.chan, obj, fds)
            ready, _, _ = select.select([self.chan], [], [], timeout)
            if not ready:
                raise WorkerError(f"worker {self.index}: no answer to {obj.get('cmd')} in {timeout} s")
            reply, extra = ctl.recv(self.chan)
        except (ctl.ChannelClosed, OSError) as exc:
            raise WorkerError(f"worker {self.index}: channel failed: {exc}") from None
        for fd in extra:
            os.close(fd)
        if not reply.get("ok"):
            raise WorkerError(f"worker {self.index}: {reply.get('error')}")
        return reply


def _foreign_spawn_preparation() -> None:
    """A worker spawned under another interpreter (PyPy) must use its own
    ``sys.path`` and not re-import the control process's ``__main__``:
    multiprocess would hand it both, and the child would then import this
    interpreter's compiled packages.  Strip them from the preparation data."""
    import multiprocess.spawn as mp_spawn
    if getattr(mp_spawn.get_preparation_data, "_shardvu", False):
        return
    original = mp_spawn.get_preparation_data

    def preparation(name):
        data = original(name)
        for key in ("sys_path", "init_main_from_path", "init_main_from_name"):
            data.pop(key, None)
        return data
    preparation._shardvu = True
    mp_spawn.get_preparation_data = preparation


class WorkerPool:
    """``num_queues`` workers running port ``port_name``."""

    def __init__(self, num_queues: int, port_name: str, frame_size: int = 64,
                 stats_endpoint: Optional[str] = None, log_level: str = "WARNING",
                 cpus: Optional[List[int]] = None, worker_python: Optional[str] = None):
        self.num_queues = num_queues
        self.port = resolve(port_name)
        self.port_name = port_name
        self.frame_size = frame_size
        self.stats_endpoint = stats_endpoint
        self.log_level = log_level
        self.cpus = cpus
        # Workers fork from the control process, or, with another
        # interpreter (PyPy), are spawned by it: same target, same channel.
        self.worker_python = worker_python
        if worker_python:
            self.ctx = multiprocess.get_context("spawn")
            self.ctx.set_executable(worker_python)
        else:
            self.ctx = multiprocess.get_context("fork")
        self.workers: List[WorkerHandle] = []
        self._spsc: list = []

    def start(self) -> None:
        """Start every worker (and each pair's shared ring when the port needs one)."""
        for i in range(self.num_queues):
            self.workers.append(self._spawn(i))
        if self.port.needs_spsc:
            from shardvu.workers.spsc import SpscRing
            for pair in range(self.num_queues // 2):
                ring = SpscRing.create()
                try:
                    for q in (2 * pair, 2 * pair + 1):
                        self.workers[q].command({"cmd": "spsc"}, [ring.fd, ring.doorbell_fd])
                finally:
                    ring.close()          # the workers hold their own copies
        self.pin()
        log.info("started %d workers (port %s): pids %s", self.num_queues, self.port_name,
                 [w.pid for w in self.workers])

    def _spawn(self, index: int) -> WorkerHandle:
        if self.worker_python:
            _foreign_spawn_preparation()
        mine, theirs = ctl.socketpair()
        forked = not self.worker_python
        proc = self.ctx.Process(
            target=worker_main, name=f"shardvu-worker{index}", daemon=True,
            args=(index, theirs.fileno() if forked else theirs, self.port_name, self.frame_size,
                  self.stats_endpoint, self.log_level, forked))
        proc.start()
        theirs.close()
        return WorkerHandle(index, proc, mine)

    def pin(self) -> None:
        """Pin worker *i* to ``cpus[i % len(cpus)]`` (psutil)."""
        if not self.cpus:
            return
        import psutil
        for w in self.workers:
            cpu = self.cpus[w.index % len(self.cpus)]
            try:
                psutil.Process(w.pid).cpu_affinity([cpu])
            except (psutil.Error, ValueError) as exc:
                log.warning("cannot pin worker %d to CPU %d: %s", w.index, cpu, exc)

    def __getitem__(self, index: int) -> WorkerHandle:
        return self.workers[index]

    def command_all(self, obj: Dict[str, Any], fds: Sequence[int] = ()) -> None:
        """Send ``obj`` to every live worker and wait for all answers; raises
        WorkerError naming every worker that failed (the others applied it)."""
        failures = []
        for w in self.workers:
            if w.exitcode is not None:
                continue
            try:
                w.command(obj, fds)
            except WorkerError as exc:
                failures.append(str(exc))
        if failures:
            raise WorkerError("; ".join(failures))

    def pids(self) -> Dict[int, int]:
        return {w.index: w.pid for w in self.workers}

    def reap(self) -> List[WorkerHandle]:
        """Workers that died since the last call (logged once each)."""
        dead = []
        for w in self.workers:
            if w.exitcode is None and not w.process.is_alive():
                w.exitcode = w.process.exitcode
                log.error("worker %d (pid %d) died with exit code %s", w.index, w.pid, w.exitcode)
                dead.append(w)
        return dead

    def stop(self, timeout: float = 3.0) -> None:
        """Stop every worker: exit command, then SIGTERM, then SIGKILL."""
        for w in self.workers:
            if w.exitcode is None:
                try:
                    ctl.send(w.chan, {"cmd": "exit"})
                except (ctl.ChannelClosed, OSError):
                    pass
        for w in self.workers:
            w.process.join(timeout)
            if w.process.is_alive():
                w.process.terminate()
                w.process.join(1.0)
            if w.process.is_alive():
                w.process.kill()
                w.process.join(1.0)
            w.exitcode = w.process.exitcode
            w.chan.close()
        self.workers = []
