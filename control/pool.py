"""The worker processes of the sharded runtime: one per virtqueue.

Workers are started through ``multiprocess`` (fork; or spawn with another
interpreter, ``worker_python``, e.g. PyPy), each with its own
``SOCK_SEQPACKET`` command channel.  The worker command set is small and
named (:class:`WorkerHandle`): :meth:`~WorkerHandle.apply` a
:class:`~shardvu.snapshot.QueueSnapshot`, :meth:`~WorkerHandle.start`,
:meth:`~WorkerHandle.stop` (answers the progress),
:meth:`~WorkerHandle.stats`, and exit (:meth:`WorkerPool.stop`).  Each waits
for the worker's answer: that wait is the barrier that makes a state change
take effect in the worker before the control process replies to the
front-end.

The pool owns each pair's *port part* (:meth:`WorkerPool.port_part`): fds
for the far side of the data path, which every snapshot of the pair's
queues carries, so that a replacement worker gets them too.  For the
loopback and custom-function ports it is the pair's shared ring ("spsc":
memfd and doorbell eventfd, kept open for the pool's life); other ports
register theirs with :meth:`WorkerPool.set_port` (e.g. a tap queue fd per
pair).

Contract: :meth:`WorkerPool.stop` leaves no worker process behind (exit
command, then SIGTERM, then SIGKILL) and closes every channel and port fd.
A worker that dies is noticed by :meth:`WorkerPool.reap`, logged and
reported to the stats collector; commands to it fail fast with
:class:`WorkerError`.  :meth:`WorkerPool.replace` starts a fresh worker in
a dead one's place (bare: the caller brings it to the device's state).
"""
from __future__ import annotations

import logging
import os
import select
import socket
from typing import Any, Callable, Dict, List, Optional, Sequence, Tuple

import multiprocess

from shardvu.snapshot import PortPart, QueueSnapshot
from shardvu.workers import ctl
from shardvu.workers.ports import resolve
from shardvu.workers.worker import worker_main

log = logging.getLogger("shardvu.control")

COMMAND_TIMEOUT = 5.0
#: how long a new worker may take to answer its first command (a spawned
#: interpreter imports everything first)
START_TIMEOUT = 60.0


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
        self.post(obj, fds)
        return self.answer(obj.get("cmd"), timeout)

    def post(self, obj: Dict[str, Any], fds: Sequence[int] = ()) -> None:
        """Send ``obj`` without waiting; :meth:`answer` collects the reply
        (one per post, in order), so commands to several workers overlap.
        Raises WorkerError if the worker is dead or its channel failed."""
        if self.exitcode is not None:
            raise WorkerError(f"worker {self.index} is dead (exit code {self.exitcode})")
        try:
            ctl.send(self.chan, obj, fds)
        except (ctl.ChannelClosed, OSError) as exc:
            raise WorkerError(f"worker {self.index}: channel failed: {exc}") from None

    def answer(self, cmd: Optional[str], timeout: float = COMMAND_TIMEOUT) -> Dict[str, Any]:
        """The reply to the oldest :meth:`post` not yet answered (``cmd``
        names it in errors).  Raises WorkerError if the worker refused,
        timed out or is dead."""
        try:
            ready, _, _ = select.select([self.chan], [], [], timeout)
            if not ready:
                raise WorkerError(f"worker {self.index}: no answer to {cmd} in {timeout} s")
            reply, extra = ctl.recv(self.chan)
        except (ctl.ChannelClosed, OSError) as exc:
            raise WorkerError(f"worker {self.index}: channel failed: {exc}") from None
        for fd in extra:
            os.close(fd)
        if not reply.get("ok"):
            raise WorkerError(f"worker {self.index}: {reply.get('error')}")
        return reply

    # -- the command set ----------------------------------------------------------
    @staticmethod
    def apply_message(snap: QueueSnapshot, session_fd: int = -1) -> Tuple[Dict[str, Any], List[int]]:
        """The ``apply`` command for ``snap`` and its fds.  ``session_fd``
        (the front-end's connection, -1 when none) goes with it: the worker
        holds a copy for as long as the session lasts, so that a front-end
        sees the control process's death only once its workers are gone
        (workers/worker.py ``_hold_session``)."""
        obj, fds = snap.encode()
        msg: Dict[str, Any] = {"cmd": "apply", "snapshot": obj}
        fds = list(fds)
        if session_fd >= 0:
            msg["session"] = True
            fds.append(session_fd)
        return msg, fds

    def apply(self, snap: QueueSnapshot, session_fd: int = -1) -> None:
        """Bring the worker's configuration to ``snap`` (its fds are sent as
        duplicates; the caller keeps its own), with the session's
        connection (see :meth:`apply_message`)."""
        self.command(*self.apply_message(snap, session_fd))

    def start(self) -> None:
        """Run the ring."""
        self.command({"cmd": "start"})

    def stop(self) -> Tuple[int, int]:
        """Stop the ring (TX: after draining what the guest queued);
        returns its progress ``(last_avail_idx, used_idx)``."""
        reply = self.command({"cmd": "stop"})
        return int(reply["last_avail_idx"]), int(reply["used_idx"])

    def stats(self) -> Dict[str, Any]:
        """``{"counters": {...}, "state": str, "broken_reason": str|None}``."""
        return self.command({"cmd": "stats"})


def _release(process) -> None:
    """Free what a finished process object holds (its sentinel pipe)."""
    close = getattr(process, "close", None)
    if close is not None:
        try:
            close()
        except ValueError:      # still running: nothing to release yet
            pass


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
        #: where workers come from, if not multiprocess: ``spawner(index)``
        #: returns a started WorkerHandle (control/supervisor.py)
        self.spawner: Optional[Callable[[int], WorkerHandle]] = None
        self._spsc: list = []
        # pair -> (PortPart, fds owned by the pool): ports other than spsc
        self._ports: Dict[int, Tuple[PortPart, List[int]]] = {}
        self._port_serial = 0

    def start(self) -> None:
        """Start every worker (and each pair's shared ring when the port
        needs one: the workers get it with their first snapshot)."""
        if self.port.needs_spsc:
            from shardvu.workers.spsc import SpscRing
            for pair in range(self.num_queues // 2):
                # kept for the session: a replacement worker attaches it again
                self._spsc.append(SpscRing.create())
        for i in range(self.num_queues):
            self.workers.append(self._spawn(i))
        for w in self.workers:
            self._wait_ready(w)
        self.pin()
        log.info("started %d workers (port %s): pids %s", self.num_queues, self.port_name,
                 [w.pid for w in self.workers])

    def _spawn(self, index: int) -> WorkerHandle:
        if self.spawner is not None:        # the supervisor's: workers from the zygote
            return self.spawner(index)
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

    @staticmethod
    def _wait_ready(w: WorkerHandle) -> None:
        """Wait until a new worker answers (it serves commands from then on);
        one that does not is logged and left to fail its first command."""
        try:
            w.command({"cmd": "stats"}, timeout=START_TIMEOUT)
        except WorkerError as exc:
            log.error("worker %d did not come up: %s", w.index, exc)

    def pin(self, workers: Optional[Sequence[WorkerHandle]] = None) -> None:
        """Pin worker *i* to ``cpus[i % len(cpus)]`` (psutil); all, or ``workers``."""
        if not self.cpus:
            return
        import psutil
        for w in self.workers if workers is None else workers:
            cpu = self.cpus[w.index % len(self.cpus)]
            try:
                psutil.Process(w.pid).cpu_affinity([cpu])
            except (psutil.Error, ValueError) as exc:
                log.warning("cannot pin worker %d to CPU %d: %s", w.index, cpu, exc)

    # -- port parts ---------------------------------------------------------------
    def set_port(self, pair: int, kind: str, fds: Sequence[int],
                 meta: Optional[Dict[str, Any]] = None) -> None:
        """Give pair ``pair``'s snapshots the port part ``kind``/``meta``
        with ``fds``; the pool takes ownership of ``fds`` (closed at
        :meth:`stop`, or when replaced here).  Workers get it with their
        next snapshot (``ShardedDevice.sync``)."""
        old = self._ports.pop(pair, None)
        if old is not None:
            for fd in old[1]:
                os.close(fd)
        self._port_serial += 1
        self._ports[pair] = (PortPart(kind, dict(meta or {}), self._port_serial), list(fds))

    def port_part(self, pair: int) -> Tuple[Optional[PortPart], List[int]]:
        """Pair ``pair``'s port part and its fds (still the pool's), or (None, [])."""
        if pair in self._ports:
            part, fds = self._ports[pair]
            return part, list(fds)
        if pair < len(self._spsc):
            ring = self._spsc[pair]
            return PortPart("spsc"), [ring.fd, ring.doorbell_fd]
        return None, []

    def port_fds(self, pair: int) -> List[int]:
        """The fds of pair ``pair``'s port part (the pool's own)."""
        return self.port_part(pair)[1]

    # -- replacing workers --------------------------------------------------------
    def replace(self, index: int) -> WorkerHandle:
        """Start a fresh worker ``index`` in place of the current one (killed
        here if still alive).  The new worker is bare: bring it to the
        device's state with ``ShardedDevice.bootstrap``."""
        old = self.workers[index]
        if old.exitcode is None:
            if old.process.is_alive():
                old.process.kill()
            old.process.join(5)
            old.exitcode = old.process.exitcode
        old.chan.close()
        _release(old.process)
        new = self.workers[index] = self._spawn(index)
        self._wait_ready(new)
        self.pin([new])
        log.info("worker %d replaced: pid %d (was %d, exit code %s)", index, new.pid, old.pid,
                 old.exitcode)
        return new

    def dead(self) -> List[int]:
        """Indices of the workers that are not alive (reaped here if need be)."""
        self.reap()
        return [w.index for w in self.workers if w.exitcode is not None]

    def __getitem__(self, index: int) -> WorkerHandle:
        return self.workers[index]

    def spsc_ring(self, index: int):
        """The shared ring of queue ``index``'s pair (None if the port has none)."""
        pair = index // 2
        return self._spsc[pair] if pair < len(self._spsc) else None

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
        for ring in self._spsc:
            ring.close()
        self._spsc = []
        for pair in list(self._ports):
            for fd in self._ports.pop(pair)[1]:
                os.close(fd)
