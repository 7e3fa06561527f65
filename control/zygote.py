"""Where replacement workers come from: a small single-threaded process,
forked from the control process before it opens any thread (ZeroMQ, the
metrics server), that keeps warm spare workers.

Why: forking a threaded process risks deadlocks (a lock held by another
thread at the fork stays held forever in the child), and a cold PyPy start
takes about a second.  The zygote forks CPython spares from itself (it has
already imported the worker code) and starts spares for any other
interpreter (``worker_python``, e.g. PyPy) ahead of time with
``posix_spawn``; it keeps ``spares`` of each kind ready and refills after
each :meth:`Zygote.take`.

A spare is a process that has imported the worker code and waits on its
command channel for one message::

    {"cmd": "become", "index": N, "port": ..., "frame_size": ...,
     "stats_endpoint": ..., "log_level": ..., "cpu": C or null,
     "progress": true}           # with the queue's progress page fd

It then pins itself to ``cpu`` and runs ``worker_main`` on the same
channel, without an answer (the control process sends the snapshot right
behind it, and that command's answer is the barrier): from then on it is
worker N, driven by the control process like any other.

Contracts:

* Protocol (``shardvu.workers.ctl`` messages on a SOCK_SEQPACKET pair):
  ``{"cmd": "take", "interp": KIND, "wait": BOOL}`` is answered ``{"ok": true, "pid": P,
  "interp": KIND}`` with two fds, a pidfd of the spare and the control's end
  of its command channel (the caller owns both), or ``{"ok": false,
  "error": ...}``.  ``{"cmd": "exit"}`` ends the zygote, which kills and reaps
  every child left (stop taken workers first to let them exit cleanly).
  Unsolicited ``{"event": "exit", "pid": P, "code": C, "signal": S}``
  messages report each child's death (exactly one of ``code``/``signal`` is
  not None); the zygote reaps its children (``waitid`` on their pidfds): no
  zombie is left, and the control learns the status from these events.
* The zygote dies with the control process (PR_SET_PDEATHSIG), its children
  with it; it holds no fd but its channel, its spares' pidfds and channels.
* Interpreter kinds: ``"cpython"`` (forked from the zygote) or the path of
  another Python executable (spawned: ``PATH -m shardvu.control.zygote
  spare FD``).  A kind whose spares keep dying before they are ready is
  retried with a growing delay (at most once per ``_MAX_RETRY_S``).

The spare side (:func:`spare_main`) runs on Python 3.9 / PyPy 3.9 too.
"""
from __future__ import annotations

import ctypes
import gc
import logging
import os
import select
import signal
import socket
import sys
import time
from typing import Any, Dict, List, Optional, Sequence, Tuple

from shardvu.transport import close_fds_except
from shardvu.workers import ctl

log = logging.getLogger("shardvu.zygote")

CPYTHON = "cpython"
_PR_SET_NAME = 15
_PR_SET_PDEATHSIG = 1
_MAX_RETRY_S = 5.0
#: Nursery size for PyPy spares, unless the environment sets
#: ``PYPY_GC_NURSERY``.  PyPy's default is half the last-level cache; on a
#: server with a 300 MiB L3 that is a 150 MiB nursery, all of it resident
#: once allocation has swept it (idle workers held ~149 MiB private instead
#: of ~80).  8 MiB costs the ring loops nothing measurable (bench/ringloop.py).
PYPY_GC_NURSERY = "8M"

#: How long take() waits for a spare that is not warm yet (a cold PyPy start).
TAKE_TIMEOUT = 10.0


def _prctl(option: int, arg: Any) -> None:
    try:
        libc = ctypes.CDLL(None, use_errno=True)
        libc.prctl(option, arg, 0, 0, 0)
    except (OSError, AttributeError):  # pragma: no cover - not Linux
        pass


def set_name(name: str) -> None:
    """Set this process's comm (what ``ps -o comm`` and psutil's ``name()``
    show): at most 15 bytes."""
    _prctl(_PR_SET_NAME, ctypes.c_char_p(name.encode()[:15]))


def _die_with_parent() -> None:
    _prctl(_PR_SET_PDEATHSIG, signal.SIGKILL)


def exit_status(res: Any) -> Tuple[Optional[int], Optional[int]]:
    """``(code, signal)`` from an ``os.waitid`` result: one of them is None."""
    if res.si_code == os.CLD_EXITED:
        return res.si_status, None
    return None, res.si_status


def pin(cpu: int) -> None:
    """Pin this process to ``cpu`` (PyPy 3.9's ``os`` has no
    ``sched_setaffinity``: libc's, then)."""
    if hasattr(os, "sched_setaffinity"):
        try:
            os.sched_setaffinity(0, [cpu])
        except OSError as exc:
            log.warning("cannot pin to CPU %d: %s", cpu, exc)
        return
    mask = (ctypes.c_ulong * 16)()
    mask[cpu // 64] = 1 << (cpu % 64)
    libc = ctypes.CDLL(None, use_errno=True)
    if libc.sched_setaffinity(0, ctypes.sizeof(mask), ctypes.byref(mask)) != 0:
        log.warning("cannot pin to CPU %d: errno %d", cpu, ctypes.get_errno())


def _warm_zmq() -> None:
    """Make and drop a ZeroMQ context and socket once: the first costs a
    worker's stats publisher 5-15 ms more on PyPy (its cffi paths)."""
    try:
        import zmq
        ctx = zmq.Context(io_threads=1)
        sock = ctx.socket(zmq.PUB)
        sock.connect("inproc://shardvu-warm")
        sock.close(linger=0)
        ctx.term()
    except Exception:       # only an optimisation
        pass


# -- the spare --------------------------------------------------------------------------
def spare_main(chan_fd: int) -> None:
    """Body of a spare: import the worker code, say ready, wait for
    ``become``, then run as that worker.  Never returns normally."""
    _die_with_parent()
    signal.signal(signal.SIGINT, signal.SIG_IGN)      # the control process decides
    signal.signal(signal.SIGTERM, signal.SIG_DFL)
    chan = socket.socket(fileno=chan_fd)
    from shardvu.workers.worker import worker_main     # warm: imported before the call
    # Ports a worker builds once taken import their modules then; the tap's
    # cffi declarations (PyPy) take a cold process ~250 ms to parse.
    import shardvu.workers.tap  # noqa: F401
    _warm_zmq()
    # What exists now is the worker code: out of the collector's way before
    # the call, so the worker's start-up collection has little to scan.
    gc.collect()
    if hasattr(gc, "freeze"):       # CPython; PyPy's gc has none
        gc.freeze()
    set_name("shardvu-spare")       # warm from now on
    try:
        ctl.send(chan, {"ready": True})
        obj, fds = ctl.recv(chan)
    except (ctl.ChannelClosed, OSError):
        os._exit(0)
    if obj.get("cmd") != "become":
        os._exit(2)
    progress_fd = fds.pop(0) if fds and obj.get("progress") else -1
    for fd in fds:
        os.close(fd)
    cpu = obj.get("cpu")
    if cpu is not None:
        pin(int(cpu))
    index = int(obj["index"])
    set_name(f"shardvu-w{index}")
    # A worker outlives a dead zygote: it ends when the control process's
    # end of its channel closes (the control process's death included).
    _prctl(_PR_SET_PDEATHSIG, 0)
    chan.detach()
    code = 0
    try:
        worker_main(index, chan_fd, obj["port"], int(obj["frame_size"]), obj.get("stats_endpoint"),
                    obj.get("log_level", "WARNING"), forked=False, progress_fd=progress_fd,
                    die_with_parent=False)
    except SystemExit as exc:
        code = exc.code if isinstance(exc.code, int) else 1
    except BaseException:
        logging.getLogger("shardvu.worker").exception("worker %d failed", index)
        code = 1
    os._exit(code)


# -- the zygote process -----------------------------------------------------------------
class _Spare:
    __slots__ = ("pid", "pidfd", "chan", "ready", "kind", "born")

    def __init__(self, pid: int, pidfd: int, chan: socket.socket, kind: str):
        self.pid, self.pidfd, self.chan, self.kind = pid, pidfd, chan, kind
        self.ready = False
        self.born = time.monotonic()


class _ZygoteLoop:
    """The zygote's own state: spares per kind, and every child's pidfd."""

    def __init__(self, chan: socket.socket, kinds: Sequence[str], spares: int, initial: int = 0):
        self.chan = chan
        self.kinds = list(kinds)
        self.target = spares
        self.extra = initial          # spares for the first takes (the pool's start)
        self.spares: Dict[str, List[_Spare]] = {k: [] for k in self.kinds}
        self.children: Dict[int, Tuple[int, Optional[_Spare]]] = {}   # pidfd -> (pid, spare or None)
        self.retry_at: Dict[str, float] = {k: 0.0 for k in self.kinds}
        self.retry_s: Dict[str, float] = {k: 0.1 for k in self.kinds}
        self.running = True

    # spares
    def _make(self, kind: str) -> _Spare:
        mine, theirs = ctl.socketpair()
        if kind == CPYTHON:
            pid = os.fork()
            if pid == 0:                # the spare
                try:
                    fd = theirs.detach()
                    close_fds_except([fd])
                    spare_main(fd)
                finally:
                    os._exit(1)
        else:
            fd = theirs.fileno()
            os.set_inheritable(fd, True)
            env = dict(os.environ)
            env.pop("PYTHONPATH", None)   # the other interpreter's own sys.path
            env.setdefault("PYPY_GC_NURSERY", PYPY_GC_NURSERY)
            pid = os.posix_spawn(kind, [kind, "-m", "shardvu.control.zygote", "spare", str(fd)], env)
        theirs.close()
        pidfd = os.pidfd_open(pid)
        spare = _Spare(pid, pidfd, mine, kind)
        self.children[pidfd] = (pid, spare)
        return spare

    def refill(self) -> None:
        now = time.monotonic()
        for kind in self.kinds:
            while len(self.spares[kind]) < self.target + self.extra and now >= self.retry_at[kind]:
                try:
                    self.spares[kind].append(self._make(kind))
                except OSError as exc:
                    log.error("zygote: cannot start a %s spare: %s", kind, exc)
                    self._backoff(kind)
                    break

    def _backoff(self, kind: str) -> None:
        self.retry_at[kind] = time.monotonic() + self.retry_s[kind]
        self.retry_s[kind] = min(self.retry_s[kind] * 2, _MAX_RETRY_S)

    def _take(self, kind: str, timeout: float = TAKE_TIMEOUT) -> _Spare:
        if kind not in self.spares:
            raise ValueError(f"no spares of kind {kind!r}")
        deadline = time.monotonic() + timeout
        while True:
            ready = [s for s in self.spares[kind] if s.ready]
            if ready:
                spare = ready[0]
                self.spares[kind].remove(spare)
                return spare
            if not self.spares[kind]:
                self.spares[kind].append(self._make(kind))
            if time.monotonic() > deadline:
                raise ValueError(f"no {kind} spare ready in {timeout} s")
            self._wait(0.05, control=False)

    # events
    def _wait(self, timeout: Optional[float], control: bool = True) -> None:
        fds: List[int] = list(self.children)
        fds += [s.chan.fileno() for k in self.kinds for s in self.spares[k] if not s.ready]
        if control:
            fds.append(self.chan.fileno())
        ready, _, _ = select.select(fds, [], [], timeout)
        for fd in ready:
            if fd == self.chan.fileno():
                self._on_command()
            elif fd in self.children:
                self._on_exit(fd)
            else:
                self._on_ready(fd)

    def _on_ready(self, fd: int) -> None:
        for k in self.kinds:
            for s in self.spares[k]:
                if s.chan.fileno() == fd:
                    try:
                        obj, fds = ctl.recv(s.chan)
                        for extra in fds:
                            os.close(extra)
                        s.ready = bool(obj.get("ready"))
                    except (ctl.ChannelClosed, OSError, ValueError):
                        s.ready = False          # its exit event follows
                    if s.ready:
                        self.retry_s[k] = 0.1
                    return

    def _on_exit(self, pidfd: int) -> None:
        pid, spare = self.children.pop(pidfd)
        try:
            res = os.waitid(os.P_PIDFD, pidfd, os.WEXITED)
            code, sig = exit_status(res)
        except ChildProcessError:
            code, sig = None, None
        os.close(pidfd)
        if spare is not None and spare in self.spares.get(spare.kind, ()):
            self.spares[spare.kind].remove(spare)
            spare.chan.close()
            log.warning("zygote: %s spare %d died before use (code %s, signal %s)",
                        spare.kind, pid, code, sig)
            self._backoff(spare.kind)
        try:
            ctl.send(self.chan, {"event": "exit", "pid": pid, "code": code, "signal": sig})
        except (ctl.ChannelClosed, OSError):
            self.running = False

    def _on_command(self) -> None:
        try:
            obj, fds = ctl.recv(self.chan)
        except (ctl.ChannelClosed, OSError):
            self.running = False
            return
        for fd in fds:
            os.close(fd)
        cmd = obj.get("cmd")
        if cmd == "exit":
            self.running = False
            return
        if cmd != "take":
            ctl.send(self.chan, {"ok": False, "error": f"unknown command {cmd!r}"})
            return
        kind = obj.get("interp") or CPYTHON
        if not obj.get("wait", True) and not any(s.ready for s in self.spares.get(kind, ())):
            ctl.send(self.chan, {"ok": False, "error": f"no {kind} spare ready"})
            return
        try:
            spare = self._take(kind, float(obj.get("timeout", TAKE_TIMEOUT)))
        except (ValueError, OSError) as exc:
            ctl.send(self.chan, {"ok": False, "error": str(exc)})
            return
        self.extra = max(0, self.extra - 1)
        pidfd = spare.pidfd
        self.children[pidfd] = (spare.pid, None)     # the control's from now on
        try:
            ctl.send(self.chan, {"ok": True, "pid": spare.pid, "interp": kind},
                     [pidfd, spare.chan.fileno()])
        finally:
            spare.chan.close()

    def run(self) -> None:
        while self.running:
            self.refill()
            pending = any(len(self.spares[k]) < self.target + self.extra for k in self.kinds)
            self._wait(0.1 if pending else None)
        # Spares, and workers the control process did not stop first, end
        # with the zygote (as they would by PR_SET_PDEATHSIG): reap them all.
        for pidfd, (pid, spare) in list(self.children.items()):
            try:
                signal.pidfd_send_signal(pidfd, signal.SIGKILL)
            except OSError:
                pass
            try:
                os.waitid(os.P_PIDFD, pidfd, os.WEXITED)
            except ChildProcessError:
                pass
            os.close(pidfd)


def _zygote_main(chan: socket.socket, kinds: Sequence[str], spares: int, initial: int) -> None:
    _die_with_parent()
    set_name("shardvu-zygote")
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    signal.signal(signal.SIGTERM, signal.SIG_DFL)
    signal.signal(signal.SIGCHLD, signal.SIG_DFL)
    close_fds_except([chan.fileno()])
    import shardvu.workers.worker  # noqa: F401  (forked spares start warm)
    logging.basicConfig(level=logging.WARNING, format="%(asctime)s zygote %(levelname)s %(message)s")
    _ZygoteLoop(chan, kinds, spares, initial).run()


# -- the control side -------------------------------------------------------------------
class ZygoteError(Exception):
    """The zygote could not hand out a spare, or is gone."""


class Taken:
    """A spare handed to the control process: ``pid``, ``pidfd`` and the
    control's end of its command channel ``chan`` (the caller owns them)."""

    def __init__(self, pid: int, pidfd: int, chan: socket.socket, kind: str):
        self.pid, self.pidfd, self.chan, self.kind = pid, pidfd, chan, kind


class Zygote:
    """The control process's handle on its zygote.

    :meth:`start` must run before the control process starts any thread.
    ``kinds`` are the interpreter kinds to keep ``spares`` of (see the
    module docstring); ``initial`` more are started at once for the first
    takes (the pool's own workers: a cold PyPy start is about a second,
    and they start side by side).  :meth:`fileno` is readable when exit events
    arrived: call :meth:`poll_events` then.  Not thread-safe: use it from
    the control loop only.
    """

    def __init__(self, kinds: Sequence[str] = (CPYTHON,), spares: int = 2, initial: int = 0):
        self.kinds = list(kinds)
        self.spares = spares
        self.initial = initial
        self.pid: Optional[int] = None
        self.pidfd = -1
        self.chan: Optional[socket.socket] = None
        self._events: List[Dict[str, Any]] = []

    def start(self) -> None:
        """Fork the zygote (before any thread: see the module docstring)."""
        mine, theirs = ctl.socketpair()
        pid = os.fork()
        if pid == 0:
            try:
                mine.close()
                _zygote_main(theirs, self.kinds, self.spares, self.initial)
            finally:
                os._exit(0)
        theirs.close()
        self.pid = pid
        self.pidfd = os.pidfd_open(pid)
        self.chan = mine
        log.info("zygote %d started (%s spares of %s)", pid, self.spares, ", ".join(self.kinds))

    def restart(self) -> None:
        """A dead zygote's successor, *executed* afresh (``python -m
        shardvu.control.zygote zygote FD ...``): safe in a process that
        runs threads by now, unlike a fork.  The old one is reaped first."""
        self.stop(timeout=0)
        mine, theirs = ctl.socketpair()
        fd = theirs.fileno()
        args = [sys.executable, "-m", "shardvu.control.zygote", "zygote", str(fd), str(self.spares),
                *self.kinds]
        import subprocess
        proc = subprocess.Popen(args, pass_fds=[fd], close_fds=True)
        theirs.close()
        proc.returncode = 0         # reaped through the pidfd, not by Popen
        self.pid = proc.pid
        self.pidfd = os.pidfd_open(proc.pid)
        self.chan = mine
        self._events = []
        log.warning("zygote restarted: pid %d", proc.pid)

    def fileno(self) -> int:
        assert self.chan is not None
        return self.chan.fileno()

    def take(self, kind: str = CPYTHON, timeout: float = TAKE_TIMEOUT, wait: bool = True) -> Taken:
        """A warm spare of ``kind``; if none is warm yet, wait up to
        ``timeout`` for one, or without ``wait`` raise ZygoteError at once."""
        if self.chan is None:
            raise ZygoteError("zygote not started")
        try:
            ctl.send(self.chan, {"cmd": "take", "interp": kind, "wait": wait, "timeout": timeout})
            timeout += 2
            while True:
                ready, _, _ = select.select([self.chan], [], [], timeout)
                if not ready:
                    raise ZygoteError(f"zygote: no answer in {timeout} s")
                obj, fds = ctl.recv(self.chan)
                if "event" in obj:
                    self._events.append(obj)
                    continue
                break
        except (ctl.ChannelClosed, OSError) as exc:
            raise ZygoteError(f"zygote channel failed: {exc}") from None
        if not obj.get("ok") or len(fds) != 2:
            for fd in fds:
                os.close(fd)
            raise ZygoteError(f"zygote: {obj.get('error', 'bad answer')}")
        return Taken(int(obj["pid"]), fds[0], socket.socket(fileno=fds[1]), kind)

    def poll_events(self) -> List[Dict[str, Any]]:
        """Exit events received so far (and any waiting now), oldest first."""
        out, self._events = self._events, []
        if self.chan is None:
            return out
        while True:
            ready, _, _ = select.select([self.chan], [], [], 0)
            if not ready:
                return out
            try:
                obj, fds = ctl.recv(self.chan)
            except (ctl.ChannelClosed, OSError):
                return out
            for fd in fds:
                os.close(fd)
            if "event" in obj:
                out.append(obj)

    def alive(self) -> bool:
        if self.pidfd < 0:
            return False
        ready, _, _ = select.select([self.pidfd], [], [], 0)
        return not ready

    def stop(self, timeout: float = 3.0) -> None:
        """End the zygote (its spares with it) and reap it.  Idempotent."""
        if self.chan is not None:
            try:
                ctl.send(self.chan, {"cmd": "exit"})
            except (ctl.ChannelClosed, OSError):
                pass
        if self.pidfd >= 0:
            ready, _, _ = select.select([self.pidfd], [], [], timeout)
            if not ready:
                try:
                    signal.pidfd_send_signal(self.pidfd, signal.SIGKILL)
                except OSError:
                    pass
            try:
                os.waitid(os.P_PIDFD, self.pidfd, os.WEXITED)
            except ChildProcessError:
                pass
            os.close(self.pidfd)
            self.pidfd = -1
        if self.chan is not None:
            self.chan.close()
            self.chan = None


def main(argv: Optional[List[str]] = None) -> None:
    args = sys.argv[1:] if argv is None else argv
    if len(args) == 2 and args[0] == "spare":
        spare_main(int(args[1]))
    if len(args) >= 4 and args[0] == "zygote":
        try:
            _zygote_main(socket.socket(fileno=int(args[1])), args[3:], int(args[2]), 0)
        finally:
            os._exit(0)
    raise SystemExit("usage: python -m shardvu.control.zygote spare FD | zygote FD SPARES KIND...")


if __name__ == "__main__":
    main()
