"""Crash isolation: a worker that dies is replaced, its queue resumed from
the ring itself, and nothing else notices.

Origin: every worker, the pool's first ones too (:meth:`Supervisor.spawn`
is the pool's ``spawner``), is a warm spare from the zygote
(:mod:`shardvu.control.zygote`), told its index, CPU and the queue's
progress page (``workers/progress.py``, one per queue, kept here).

Detection: one pidfd per worker (the zygote's, passed over its channel; or
``os.pidfd_open`` for a worker the pool forked itself), registered in the
control loop's poll set (:attr:`Supervisor.fds`, handed to the Runner's
``aux_fds``).  A pidfd becomes readable the moment its process dies: no
polling of liveness, no SIGCHLD (which would race multiprocess's own
reaping).  Reaping: a worker the pool forked is reaped through its
``multiprocess`` object; a replacement is the zygote's child, which reaps it
(``waitid`` on its pidfd) and reports the status on its channel
(:meth:`Supervisor.on_zygote`).  No zombie outlives a death.

Replacement (:meth:`Supervisor.respawn`): a spare becomes the queue's
worker as above, then gets the device's current snapshot of the queue
(:meth:`ShardedDevice.bootstrap`: memory, ring geometry and addresses, the
kick/call/err fds, log and inflight fds, the pair's shared ring; then
start).  The control process holds all of these fds for the whole session.
The replacement resumes at the used index (workers complete buffers in the
order they took them; the inflight region refines this where negotiated),
finishes from its progress page the batch its predecessor died in (no frame
of the pair's shared ring lost or repeated, counters carried on:
``workers/progress.py``), scans its ring at once (its loop starts with a
pass, no kick needed), and the control signals the queue's call eventfd
once, so the guest does not wait on an interrupt the dead worker
swallowed.

Crash loops (:class:`CrashPolicy`, default 5 deaths in 10 s, back-off
0, 0, 0.1, 0.5, 1 s; ``SHARDVU_CRASH_POLICY`` overrides it): the k-th death
within ``window_s`` waits ``backoff_s[k-1]`` before its respawn; more than
``max_deaths`` deaths within ``window_s`` and the queue is given up: marked broken (its err
eventfd signalled, ``BrokenReason.CRASH_LOOP`` in stats and the log).  The
other queues are untouched.  A new front-end connection starts the queue
afresh (:meth:`Supervisor.revive_broken`).

Per queue the supervisor keeps ``restarts``, the last exit code or signal
and the last recovery time (death noticed -> replacement started), in
:meth:`Supervisor.queue_info` and in the stats snapshot.
"""
from __future__ import annotations

import collections
import logging
import os
import select
import signal
import time
from typing import Any, Callable, Deque, Dict, List, Optional, Sequence, Tuple

from shardvu import eventfd
from shardvu.reasons import BrokenReason
from shardvu.workers import ctl, progress

from .pool import WorkerError, WorkerHandle, WorkerPool
from .zygote import CPYTHON, Zygote, ZygoteError

log = logging.getLogger("shardvu.control")

#: How long the pool's start may wait for its workers' spares (a cold
#: PyPy start per worker, side by side, on a loaded machine).
START_TIMEOUT = 60.0


class CrashPolicy:
    """How often a queue's worker may die before the queue is given up.

    ``backoff_s[k]`` is the delay before the respawn after the (k+1)-th
    death within ``window_s`` (the last entry repeats); more than
    ``max_deaths`` deaths within ``window_s`` break the queue."""

    def __init__(self, max_deaths: int = 5, window_s: float = 10.0,
                 backoff_s: Sequence[float] = (0.0, 0.0, 0.1, 0.5, 1.0)):
        if max_deaths < 1 or window_s <= 0 or not backoff_s:
            raise ValueError("bad crash policy")
        self.max_deaths = max_deaths
        self.window_s = window_s
        self.backoff_s = tuple(backoff_s)

    def delay(self, deaths: int) -> float:
        return self.backoff_s[min(deaths, len(self.backoff_s)) - 1]

    @classmethod
    def from_env(cls, environ=os.environ) -> "CrashPolicy":
        """The default policy, or ``SHARDVU_CRASH_POLICY``:
        ``MAX_DEATHS/WINDOW_S[:BACKOFF_S,...]``, e.g. ``5/10:0,0,0.1,0.5,1``.
        ValueError if malformed."""
        text = environ.get("SHARDVU_CRASH_POLICY")
        if not text:
            return cls()
        try:
            limits, _, backoff = text.partition(":")
            deaths, window = limits.split("/")
            kw = {"backoff_s": [float(x) for x in backoff.split(",")]} if backoff else {}
            return cls(int(deaths), float(window), **kw)
        except ValueError:
            raise ValueError(f"SHARDVU_CRASH_POLICY={text!r}: want MAX_DEATHS/WINDOW_S[:BACKOFF,...]") from None


class PidfdProcess:
    """The process object of a zygote-born worker, with the parts of
    ``multiprocess.Process`` the pool uses (``pid``, ``exitcode``,
    ``is_alive``, ``join``, ``terminate``, ``kill``), all through its pidfd.
    ``exitcode`` follows multiprocess: the code, or -signal; it is set by the
    supervisor from the zygote's exit event."""

    def __init__(self, pid: int, pidfd: int):
        self.pid = pid
        self.pidfd = pidfd
        self.exitcode: Optional[int] = None

    def is_alive(self) -> bool:
        if self.pidfd < 0:
            return False
        ready, _, _ = select.select([self.pidfd], [], [], 0)
        return not ready

    def join(self, timeout: Optional[float] = None) -> None:
        if self.pidfd >= 0:
            select.select([self.pidfd], [], [], timeout)

    def _signal(self, sig: int) -> None:
        if self.pidfd >= 0:
            import signal
            try:
                signal.pidfd_send_signal(self.pidfd, sig)
            except OSError:
                pass

    def terminate(self) -> None:
        import signal
        self._signal(signal.SIGTERM)

    def kill(self) -> None:
        import signal
        self._signal(signal.SIGKILL)

    def close(self) -> None:
        if self.pidfd >= 0:
            os.close(self.pidfd)
            self.pidfd = -1


class _Record:
    """What the supervisor knows about one queue."""

    __slots__ = ("restarts", "exit_code", "exit_signal", "recovery_s", "deaths", "broken",
                 "due", "died_at", "pidfd", "pid", "dead_pid", "waiting")

    def __init__(self) -> None:
        self.restarts = 0
        self.exit_code: Optional[int] = None
        self.exit_signal: Optional[int] = None
        self.recovery_s: Optional[float] = None
        self.deaths: Deque[float] = collections.deque()
        self.broken = False
        self.due: Optional[float] = None        # monotonic time of a pending respawn
        self.died_at = 0.0
        self.pidfd = -1                         # the current worker's pidfd
        self.pid = 0
        self.dead_pid = 0                       # a dead worker whose status is awaited
        self.waiting = False                    # a respawn waits for a warm spare


class Supervisor:
    """Watches ``pool``'s workers and replaces the ones that die.

    ``device`` (a ShardedDevice, set with :meth:`attach`) supplies the
    queue's current state; ``collector`` (optional) gets each new pid and
    the per-queue facts.  :attr:`fds` maps each fd to poll for reading to
    the handler to call when it is readable; it changes as workers come and
    go (the Runner re-reads it every pass).  Use from the control loop's
    thread only.
    """

    def __init__(self, pool: WorkerPool, zygote: Optional[Zygote],
                 policy: Optional[CrashPolicy] = None, collector=None):
        self.pool = pool
        self.zygote = zygote
        self.policy = policy or CrashPolicy.from_env()
        self.collector = collector
        self.device = None
        self.kind = pool.worker_python or CPYTHON
        self.records: Dict[int, _Record] = {}
        self.fds: Dict[int, Callable[[], None]] = {}
        if zygote is not None and zygote.chan is not None:
            self.fds[zygote.fileno()] = self.on_zygote
        self._by_pid: Dict[int, int] = {}       # zygote-born pid -> queue index
        self.pages: Dict[int, int] = {}         # queue index -> progress page fd
        #: a spare taken ahead from the zygote: a respawn then costs no
        #: round trip to it (taken again after each respawn)
        self._next = None
        #: indices whose workers died together, while their deaths are noted
        self._batch: Optional[List[int]] = None
        #: set (e.g. by SIGHUP's handler) to run :meth:`reload` from the loop
        self.reload_requested = False
        self._old_zygotes: List[Zygote] = []     # replaced by a reload, stopped at close

    def attach(self, device) -> None:
        """Serve ``device``'s queues; dead workers are replaced here, at once,
        not by the device at its next session."""
        self.device = device
        if hasattr(device, "replaces_dead_workers"):
            device.replaces_dead_workers = False

    # -- watching --------------------------------------------------------------------
    def watch_all(self) -> None:
        """Open a pidfd for every worker of the pool not watched yet (call
        after its start), and hold a spare ready for the first respawn."""
        for w in self.pool.workers:
            rec = self.records.setdefault(w.index, _Record())
            if rec.pidfd < 0:
                self._watch(w.index, w.pid, os.pidfd_open(w.pid))
        self._take_ahead()

    def _watch(self, index: int, pid: int, pidfd: int) -> None:
        rec = self.records.setdefault(index, _Record())
        rec.pidfd, rec.pid = pidfd, pid
        self.fds[pidfd] = lambda: self._on_death(index)

    def _unwatch(self, rec: _Record) -> None:
        """Stop watching (and close) the queue's current pidfd: the
        supervisor owns every pidfd, a PidfdProcess only borrows its own."""
        if rec.pidfd >= 0:
            self.fds.pop(rec.pidfd, None)
            for w in self.pool.workers:
                if isinstance(w.process, PidfdProcess) and w.process.pidfd == rec.pidfd:
                    w.process.pidfd = -1
            os.close(rec.pidfd)
            rec.pidfd = -1

    # -- deaths ----------------------------------------------------------------------
    def _on_death(self, index: int) -> None:
        rec = self.records[index]
        if rec.pidfd >= 0 and _alive(rec.pidfd):
            return      # a stale dispatch: the poll saw a pidfd this batch already closed
        now = time.monotonic()
        w = self.pool.workers[index]
        self._unwatch(rec)
        logged = False
        if isinstance(w.process, PidfdProcess):
            rec.dead_pid = w.pid          # the zygote's exit event brings the status
            self._collect_events()        # (and logs the death, if it is in)
            logged = not rec.dead_pid
            code = w.process.exitcode
            if code is not None:          # the event came before the pidfd fired
                rec.dead_pid = 0
        else:
            w.process.join(0)             # dead: reaps it (multiprocess's waitpid)
            code = w.process.exitcode
        w.exitcode = code if code is not None else -1
        self._set_exit(rec, code)
        if rec.dead_pid:        # logged with its status once the zygote reports it
            log.info("worker %d (pid %d) died; exit status not reported yet", index, w.pid)
        elif not logged:
            log.error("worker %d (pid %d) died (%s)", index, w.pid, _describe(rec))
        w.chan.close()
        if self.collector is not None:
            self.collector.mark_dead(index, w.exitcode)
        rec.died_at = now
        rec.deaths.append(now)
        while rec.deaths and rec.deaths[0] < now - self.policy.window_s:
            rec.deaths.popleft()
        if len(rec.deaths) > self.policy.max_deaths:
            self._give_up(index, rec)
            return
        delay = self.policy.delay(len(rec.deaths))
        if delay > 0:
            log.warning("queue %d: death %d within %.0f s: respawn in %.2f s", index,
                        len(rec.deaths), self.policy.window_s, delay)
            rec.due = now + delay
        elif self._batch is not None:     # a sibling's death is being handled
            self._batch.append(index)
        else:
            # Workers that died together (a whole pair) start up together:
            # their replacements' start-ups overlap (Supervisor.respawn_many).
            self._batch = [index]
            try:
                for j, other in list(self.records.items()):
                    if j != index and other.pidfd >= 0 and not _alive(other.pidfd):
                        self._on_death(j)
            finally:
                batch, self._batch = self._batch, None
            self.respawn_many(batch)

    def _set_exit(self, rec: _Record, code: Optional[int]) -> None:
        if code is None:
            rec.exit_code = rec.exit_signal = None
        elif code < 0:
            rec.exit_code, rec.exit_signal = None, -code
        else:
            rec.exit_code, rec.exit_signal = code, None

    def on_zygote(self) -> None:
        """The zygote's channel is readable: exit events, or the zygote
        died.  Its workers live on (they end with their channel, not with
        the zygote); a fresh zygote is executed for the next respawns."""
        self._collect_events()
        z = self.zygote
        if z is None or z.alive():
            return
        log.error("the zygote (pid %s) died; starting another", z.pid)
        self.fds.pop(z.fileno(), None)
        for pid in list(self._by_pid):      # their exit statuses died with it
            index = self._by_pid.pop(pid)
            rec = self.records.get(index)
            if rec is not None and rec.dead_pid == pid:
                rec.dead_pid = 0
                log.error("worker %d (pid %d) died (exit status lost with the zygote)", index, pid)
        try:
            z.restart()
        except OSError as exc:
            log.error("cannot restart the zygote: %s", exc)
            return
        self.fds[z.fileno()] = self.on_zygote

    def _collect_events(self) -> None:
        if self.zygote is None:
            return
        for ev in self.zygote.poll_events():
            pid = int(ev.get("pid", 0))
            index = self._by_pid.pop(pid, None)
            if index is None:
                continue                      # a spare the zygote itself lost
            code, sig = ev.get("code"), ev.get("signal")
            exitcode = code if code is not None else -int(sig or 0)
            for w in self.pool.workers:
                if w.pid == pid and isinstance(w.process, PidfdProcess):
                    w.process.exitcode = exitcode
                    if w.exitcode is not None:
                        w.exitcode = exitcode
            rec = self.records.get(index)
            if rec is not None and rec.dead_pid == pid:           # its death was handled before the status came
                rec.dead_pid = 0
                self._set_exit(rec, exitcode)
                log.error("worker %d (pid %d) died (%s)", index, pid, _describe(rec))
                self._publish(index)

    def _give_up(self, index: int, rec: _Record) -> None:
        rec.broken = True
        rec.due = None
        reason = BrokenReason.CRASH_LOOP
        log.error("queue %d broken: %s (%d deaths within %.0f s)", index, reason.value,
                  len(rec.deaths), self.policy.window_s)
        vq = self.device.vqs[index] if self.device is not None else None
        if vq is not None and vq.err_fd >= 0:
            try:
                eventfd.signal(vq.err_fd)
            except OSError:
                pass
        self._publish(index)

    def on_tick(self) -> None:
        """Run the respawns whose back-off has passed; hold a spare ready;
        run a requested live upgrade."""
        if self.reload_requested:
            self.reload_requested = False
            self.reload()
        self._take_ahead()
        # exit events a command round trip with the zygote read ahead (its
        # channel is then no longer readable for on_zygote)
        self._collect_events()
        now = time.monotonic()
        for index, rec in self.records.items():
            if rec.due is not None and now >= rec.due:
                rec.due = None
                self.respawn(index)

    def revive_broken(self) -> None:
        """A new session: queues given up in the last one get a worker again."""
        for index, rec in self.records.items():
            if rec.broken or rec.due is not None:
                rec.broken = False
                rec.due = None
                rec.deaths.clear()
                self.respawn(index)

    # -- replacing ------------------------------------------------------------------
    def spawn(self, index: int, wait: bool = True) -> WorkerHandle:
        """A warm spare from the zygote, made worker ``index`` (pinned, with
        the queue's progress page) and watched: the pool's ``spawner``.
        Without ``wait`` it raises ZygoteError at once if no spare is warm
        (the control loop must not wait on a cold PyPy start).  Raises
        ZygoteError or WorkerError."""
        if self.zygote is None:
            raise ZygoteError("no zygote")
        taken, self._next = self._next, None
        if taken is None or not _alive(taken.pidfd):
            if taken is not None:
                os.close(taken.pidfd)
                taken.chan.close()
            taken = self.zygote.take(self.kind, timeout=START_TIMEOUT, wait=wait)
        handle = WorkerHandle(index, PidfdProcess(taken.pid, taken.pidfd), taken.chan)
        self._by_pid[taken.pid] = index
        rec = self.records.setdefault(index, _Record())
        if rec.pidfd >= 0 and rec.pidfd != taken.pidfd:
            self._unwatch(rec)
        self._watch(index, taken.pid, taken.pidfd)
        try:
            self._become(handle)
        except (WorkerError, ctl.ChannelClosed, OSError) as exc:
            handle.process.kill()       # its pidfd fires; the policy decides
            raise WorkerError(f"worker {index}: spare {taken.pid} did not become it: {exc}") from None
        return handle

    def page(self, index: int) -> int:
        """Queue ``index``'s progress page (made on first use, kept for the
        supervisor's life: every worker of the queue maps the same one)."""
        fd = self.pages.get(index)
        if fd is None:
            fd = self.pages[index] = progress.create()
        return fd

    def respawn(self, index: int) -> bool:
        """Replace queue ``index``'s dead worker and resume its ring.
        Returns False (and schedules a retry through the crash policy) if no
        replacement could be started."""
        return self.respawn_many([index])[index]

    def respawn_many(self, indices: Sequence[int]) -> Dict[int, bool]:
        """:meth:`respawn` for workers that died together: every replacement
        is taken first, then all resume at once (their apply and start
        overlap: ``ShardedDevice.bootstrap_many``)."""
        done: Dict[int, bool] = {}
        handles: Dict[int, Tuple[WorkerHandle, int, float, float]] = {}
        for index in indices:
            t0 = time.monotonic()
            old_pid = self.records.setdefault(index, _Record()).pid
            handle = self._replacement(index)
            if handle is None:
                done[index] = False
                continue
            self.pool.workers[index] = handle
            handles[index] = (handle, old_pid, t0, time.monotonic())
        failures = self._resume_many([h[0] for h in handles.values()])
        for index, (handle, old_pid, t0, t1) in handles.items():
            exc = failures.get(index)
            if exc is not None:
                log.error("queue %d: replacement %d failed to resume: %s", index, handle.pid, exc)
                handle.process.kill()       # its pidfd fires: the crash policy decides what next
                done[index] = False
                continue
            done[index] = self._respawned(index, handle, old_pid, t0, t1)
        return done

    def _replacement(self, index: int) -> Optional[WorkerHandle]:
        rec = self.records.setdefault(index, _Record())
        try:
            return self.spawn(index, wait=False)
        except (ZygoteError, WorkerError) as exc:
            if "ready" in str(exc):     # spares still warming up: try again soon
                if not rec.waiting:
                    log.warning("queue %d: no warm spare yet; retrying", index)
                rec.waiting = True
                rec.due = time.monotonic() + 0.02
                return None
            log.error("queue %d: no replacement worker: %s", index, exc)
            rec.due = time.monotonic() + self.policy.backoff_s[-1] + 0.5
            return None

    def _respawned(self, index: int, handle: WorkerHandle, old_pid: int, t0: float, t1: float) -> bool:
        rec = self.records[index]
        rec.restarts += 1
        rec.waiting = False
        rec.recovery_s = time.monotonic() - rec.died_at if rec.died_at else None
        log.info("queue %d: worker %d replaced by pid %d in %.1f ms (spare %.1f, resume %.1f)",
                 index, old_pid, handle.pid, (rec.recovery_s or 0) * 1e3, (t1 - t0) * 1e3,
                 (time.monotonic() - t1) * 1e3)
        if self.collector is not None:
            try:        # the replacement carries the queue's counters on (its progress page)
                self.collector.set_workers({index: handle.pid}, carried=True)
            except TypeError:
                self.collector.set_workers({index: handle.pid})
        self._publish(index)
        self._take_ahead()
        return True

    # -- live upgrade ---------------------------------------------------------------
    def reload(self) -> List[str]:
        """Replace every worker, one at a time, by a process running the
        code installed now: a fresh zygote is *executed* (its spares import
        today's files), then for each queue a new worker first applies the
        queue's snapshot while the old one still serves (a worker that
        cannot read this control's snapshot version refuses it: it is
        dropped and the old worker keeps the queue); then the old worker
        stops (draining TX), the new one starts from the ring and the
        progress page (nothing lost or repeated), and the old one exits.
        Returns the failures, one line per queue (also logged)."""
        failures: List[str] = []
        old_zygote = self.zygote
        if old_zygote is None or self.device is None:
            return ["no zygote or device"]
        fresh = Zygote(old_zygote.kinds, old_zygote.spares)
        try:
            fresh.restart()
        except OSError as exc:
            log.error("reload: cannot start a new zygote: %s", exc)
            return [f"zygote: {exc}"]
        if self._next is not None:          # held from the old code
            signal.pidfd_send_signal(self._next.pidfd, signal.SIGKILL)
            os.close(self._next.pidfd)
            self._next.chan.close()
            self._next = None
        self.zygote = fresh
        self.fds[fresh.fileno()] = self.on_zygote
        for index in range(len(self.pool.workers)):
            err = self._upgrade(index)
            if err:
                log.error("reload: queue %d keeps its worker: %s", index, err)
                failures.append(f"queue {index}: {err}")
        if len(failures) == len(self.pool.workers):
            # Nothing upgraded (e.g. the code installed now cannot read this
            # control's snapshots): the old zygote stays, so replacements
            # after a death are still workers that can read them.
            if self._next is not None:      # a spare of the refused code
                signal.pidfd_send_signal(self._next.pidfd, signal.SIGKILL)
                os.close(self._next.pidfd)
                self._next.chan.close()
                self._next = None
            self.fds.pop(fresh.fileno(), None)
            fresh.stop()
            self.zygote = old_zygote
            log.info("reload: 0 of %d workers replaced; the running code stays", len(failures))
            return failures
        # The old zygote goes with its spares; not while it has workers kept
        # (a refused upgrade): stopping it would kill them.
        self.fds.pop(old_zygote.fileno(), None)
        if failures:
            self._old_zygotes.append(old_zygote)
            fd = old_zygote.fileno()
            self.fds[fd] = lambda: self._drain_old(old_zygote, fd)
        else:
            old_zygote.stop()
        log.info("reload: %d of %d workers replaced", len(self.pool.workers) - len(failures),
                 len(self.pool.workers))
        return failures

    def _drain_old(self, z: Zygote, fd: int) -> None:
        z.poll_events()             # statuses of workers no longer watched
        if not z.alive():
            self.fds.pop(fd, None)

    def _upgrade(self, index: int) -> Optional[str]:
        dev = self.device
        old = self.pool.workers[index]
        if old.exitcode is not None:
            return "its worker is dead"
        rec = self.records.setdefault(index, _Record())
        old_pidfd, old_pid = rec.pidfd, rec.pid
        rec.pidfd = -1                      # spawn() must not close the old one's watch
        self.fds.pop(old_pidfd, None)
        try:
            new = self.spawn(index, wait=True)
            new.apply(dev.queue_snapshot(index), dev.session_fd)      # the version check
        except (ZygoteError, WorkerError, ValueError) as exc:
            if rec.pidfd >= 0:
                self.fds.pop(rec.pidfd, None)
                try:
                    signal.pidfd_send_signal(rec.pidfd, signal.SIGKILL)
                except OSError:
                    pass
                os.close(rec.pidfd)
            rec.pidfd, rec.pid = old_pidfd, old_pid
            if old_pidfd >= 0:
                self.fds[old_pidfd] = lambda: self._on_death(index)
            return str(exc)
        try:
            if dev.vqs[index].started:
                old.stop()                  # drains TX; its last record is in the page
        except WorkerError as exc:
            log.warning("reload: queue %d: old worker did not stop: %s", index, exc)
        self.pool.workers[index] = new
        try:
            dev.bootstrap(index)            # same snapshot (idempotent), then start
        except WorkerError as exc:
            log.error("reload: queue %d: new worker did not start: %s", index, exc)
        try:
            ctl.send(old.chan, {"cmd": "exit"})
        except (ctl.ChannelClosed, OSError):
            pass
        if old_pidfd >= 0:
            select.select([old_pidfd], [], [], 2.0)
            os.close(old_pidfd)
        if isinstance(old.process, PidfdProcess):
            old.process.pidfd = -1
        old.chan.close()
        if self.collector is not None:
            try:
                self.collector.set_workers({index: new.pid}, carried=True)
            except TypeError:
                self.collector.set_workers({index: new.pid})
        log.info("reload: queue %d: worker %d replaced by pid %d", index, old_pid, new.pid)
        return None

    def _take_ahead(self) -> None:
        """Hold a spare ready, if the zygote has a warm one (never waits:
        the control loop must not; on_tick tries again)."""
        if self._next is None and self.zygote is not None and self.zygote.chan is not None:
            try:
                self._next = self.zygote.take(self.kind, wait=False)
            except ZygoteError:
                pass

    def _become(self, w: WorkerHandle) -> None:
        pool = self.pool
        cpu = pool.cpus[w.index % len(pool.cpus)] if pool.cpus else None
        # No answer: the next command's is the barrier (one round trip less).
        ctl.send(w.chan, {"cmd": "become", "index": w.index, "port": pool.port_name,
                          "frame_size": pool.frame_size, "stats_endpoint": pool.stats_endpoint,
                          "log_level": pool.log_level, "cpu": cpu, "progress": True},
                 [self.page(w.index)])

    def _resume_many(self, handles: Sequence[WorkerHandle]) -> Dict[int, Optional[Exception]]:
        """:meth:`_resume` for several replacements, overlapped; each
        index's failure (None: resumed)."""
        dev = self.device
        if len(handles) == 1 or dev is None or not hasattr(dev, "bootstrap_many") \
                or not hasattr(self.pool, "port_part"):
            out: Dict[int, Optional[Exception]] = {}
            for w in handles:
                try:
                    self._resume(w)
                    out[w.index] = None
                except (WorkerError, ctl.ChannelClosed, OSError, ValueError) as exc:
                    out[w.index] = exc
            return out
        out = dict(dev.bootstrap_many([w.index for w in handles]))
        for w in handles:
            vq = dev.vqs[w.index]
            if out[w.index] is None and vq.started and vq.call_fd >= 0:
                eventfd.signal(vq.call_fd)
        return out

    def _resume(self, w: WorkerHandle) -> None:
        """The device's state for the queue (its snapshot, the pair's shared
        ring included), then one call signal."""
        if not hasattr(self.pool, "port_part"):       # before queue snapshots
            ring = self.pool.spsc_ring(w.index)
            if ring is not None:
                w.command({"cmd": "spsc"}, [ring.fd, ring.doorbell_fd])
        dev = self.device
        if dev is None:
            return
        dev.bootstrap(w.index)
        vq = dev.vqs[w.index]
        if vq.started and vq.call_fd >= 0:
            eventfd.signal(vq.call_fd)

    # -- facts -----------------------------------------------------------------------
    def queue_info(self, index: int) -> Dict[str, Any]:
        rec = self.records.get(index) or _Record()
        info: Dict[str, Any] = {
            "restarts": rec.restarts,
            "last_exit_code": rec.exit_code,
            "last_exit_signal": rec.exit_signal,
            "last_recovery_s": round(rec.recovery_s, 6) if rec.recovery_s is not None else None,
        }
        if rec.broken:
            info["state"] = "broken"
            info["broken_reason"] = BrokenReason.CRASH_LOOP.value
        return info

    def _publish(self, index: int) -> None:
        setter = getattr(self.collector, "set_supervision", None)
        if setter is not None:
            setter(index, self.queue_info(index))

    def close(self) -> None:
        """Close the pidfds this supervisor holds (after the pool stopped)."""
        for rec in self.records.values():
            self._unwatch(rec)
        self.fds.clear()
        for fd in self.pages.values():
            os.close(fd)
        self.pages.clear()
        if self._next is not None:
            signal.pidfd_send_signal(self._next.pidfd, signal.SIGKILL)
            os.close(self._next.pidfd)
            self._next.chan.close()
            self._next = None
        for z in self._old_zygotes + [self.zygote]:
            if z is not None:
                z.stop()
        self._old_zygotes = []


def _alive(pidfd: int) -> bool:
    return not select.select([pidfd], [], [], 0)[0]


def _describe(rec: _Record) -> str:
    if rec.exit_signal is not None:
        return f"signal {rec.exit_signal}"
    if rec.exit_code is not None:
        return f"exit code {rec.exit_code}"
    return "status not known yet"
