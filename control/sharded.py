"""The control process's device: the library's :class:`~shardvu.device.Device`
with every ring handed to a worker process.

State is split by owner.  The Device owns the configuration and every
transition of it (memory table, ring sizes/addresses, the base the
front-end set, kick/call/err fds, features, log and inflight buffers); each
worker owns its ring's progress.  After each request,
:meth:`ShardedDevice.handle` sends every queue whose configuration the
request changed (``Outcome.changed``) a fresh
:class:`~shardvu.snapshot.QueueSnapshot`, starts the rings the Device
started, and only then returns the outcome: every state change is a
barrier.  When the Device stops a started ring (GET_VRING_BASE, a new kick
fd, SET_STATUS(0), a reset) it first asks the worker for its progress
(:meth:`ShardedDevice.collect_progress`), so GET_VRING_BASE reports the
worker's own index.  No worker-side code repeats a transition.

The control process never touches guest memory: its region table is kept
unmapped, and ring addresses are checked against it by arithmetic.

Workers that died are replaced by fresh ones when the device is reset or
closed, and before the first request of a new connection
(:meth:`ShardedDevice.bootstrap` brings a worker to the current state; it
is the path a respawn takes).
"""
from __future__ import annotations

import logging
from typing import Dict, Iterable, List, Optional, Sequence, Tuple

from shardvu import protocol as P
from shardvu.device import Device, DeviceIface, Outcome, Unwatch, Watch
from shardvu.protocol import Message, ProtocolFeature as PF
from shardvu.snapshot import PortPart
from shardvu.virtqueue import VirtQueue

from .pool import WorkerError, WorkerHandle, WorkerPool

log = logging.getLogger("shardvu.control")

#: Protocol features that need the back-end channel from the data path, which
#: lives in the workers here: not offered.
_NOT_SHARDED = P.bit(PF.INBAND_NOTIFICATIONS) | P.bit(PF.HOST_NOTIFIER)


class ShardedDevice(Device):
    """A Device whose virtqueues are served by ``pool``'s workers."""

    def __init__(self, pool: WorkerPool, iface: Optional[DeviceIface] = None, **device_args):
        super().__init__(pool.num_queues, iface, map_memory=False, **device_args)
        self.pool = pool
        # Per worker: has it applied the device's current snapshot (False:
        # a fresh worker, or its last apply failed), is its ring started.
        self._applied: List[bool] = [False] * pool.num_queues
        self._running: List[bool] = [False] * pool.num_queues
        self._failures: List[str] = []     # worker failures during the current request
        self._pristine = True              # nothing negotiated since the last close
        #: Replace dead workers at a reset, a close and a new connection's
        #: first request.  A supervisor that respawns workers itself (issue
        #: 12) sets this False.
        self.replaces_dead_workers = True
        #: The connection's socket fd while a front-end is connected (-1:
        #: none; the caller owns it).  Every snapshot carries it to the
        #: workers, which hold it until :meth:`close`
        #: (``WorkerHandle.apply_message``).
        self.session_fd = -1

    def offered_protocol_features(self) -> int:
        return super().offered_protocol_features() & ~_NOT_SHARDED

    # -- requests --------------------------------------------------------------------
    def handle(self, msg: Message) -> Outcome:
        """The Device's outcome, once the changed queues' workers applied
        it; a request the Device applied but a worker did not fails."""
        if self._pristine:
            self._pristine = False
            self._replace_dead()
        outcome = super().handle(msg)
        failures = self.sync(outcome.changed)
        if failures and outcome.ok:
            outcome = self.refuse(msg, outcome, "workers did not apply it: " + "; ".join(failures))
        elif failures:
            log.error("%s: workers: %s", msg.name, "; ".join(failures))
        # Kick fds are the workers' business.
        outcome.actions = [a for a in outcome.actions if not isinstance(a, (Watch, Unwatch))]
        return outcome

    def sync(self, queues: Iterable[int]) -> List[str]:
        """Send ``queues`` the current snapshot, then start the rings the
        Device has started (and stop any it has not).  Returns the failures
        that concern ``queues`` (also those of progress collected during the
        request), each naming its worker.  Live workers left behind by an
        earlier failure are brought up to date too, but their failures are
        only logged: one stuck queue does not fail requests for the others."""
        wanted = set(queues)
        failures, self._failures = self._failures, []

        def failed(q: int, exc: Exception) -> None:
            if q in wanted:
                failures.append(str(exc))
            else:
                log.warning("queue %d: still not up to date: %s", q, exc)
        stale = {q for q, ok in enumerate(self._applied)
                 if not ok and self.pool[q].exitcode is None}
        for q in sorted(wanted | stale):
            self._applied[q] = False
            try:
                self.pool[q].apply(self.queue_snapshot(q), self.session_fd)
            except WorkerError as exc:
                failed(q, exc)
                continue
            self._applied[q] = True
        for q, vq in enumerate(self.vqs):
            if vq.started == self._running[q] or not self._applied[q]:
                continue
            if q not in wanted and self.pool[q].exitcode is not None:
                continue
            try:
                if vq.started:
                    self.pool[q].start()
                else:
                    self.pool[q].stop()
                self._running[q] = vq.started
            except WorkerError as exc:
                failed(q, exc)
        return failures

    def collect_progress(self, vq: VirtQueue) -> None:
        """The worker's progress, before the Device stops ``vq``: the worker
        stops the ring and reports its last avail and used indices."""
        q = vq.index
        try:
            vq.last_avail_idx, vq.used_idx = self.pool[q].stop()
        except WorkerError as exc:
            log.error("queue %d: progress unknown, the worker did not stop: %s", q, exc)
            self._failures.append(str(exc))
        self._running[q] = False

    def port_part(self, qidx: int) -> Tuple[Optional[PortPart], Sequence[int]]:
        """The pool's port part of ``qidx``'s pair (fds owned by the pool)."""
        return self.pool.port_part(qidx // 2)

    # -- teardown and replacement ----------------------------------------------------
    def reset(self, keep_protocol: bool = True) -> List[object]:
        """The Device's reset; then dead workers are replaced by fresh ones
        (their snapshot follows with the request's barrier)."""
        out = super().reset(keep_protocol)
        self._failures.clear()      # a reset discards the progress it could not collect
        self._replace_dead()
        return out

    def close(self) -> List[object]:
        out = super().close()
        self.session_fd = -1        # the workers drop their copies of the connection
        failures = self.sync(range(self.max_queues))    # every worker releases the session
        if failures:
            log.error("workers did not release the session: %s", "; ".join(failures))
        self._pristine = True
        return out

    def _replace_dead(self) -> None:
        if not self.replaces_dead_workers:
            return
        for q in self.pool.dead():
            try:
                self.pool.replace(q)
            except (OSError, RuntimeError, ValueError) as exc:
                log.error("worker %d: cannot start a replacement: %s", q, exc)
                continue
            self._applied[q] = self._running[q] = False

    def bootstrap_many(self, indices: Sequence[int]) -> Dict[int, Optional[WorkerError]]:
        """:meth:`bootstrap` for several workers at once (a pair that died
        together): each step goes to all of them before any answer is
        awaited, so their start-ups overlap.  Returns each index's failure
        (None: applied, and started if the ring is)."""
        out: Dict[int, Optional[WorkerError]] = {}
        for i in indices:
            self._applied[i] = self._running[i] = False
            try:
                self.pool[i].post(*WorkerHandle.apply_message(self.queue_snapshot(i), self.session_fd))
                out[i] = None
            except WorkerError as exc:
                out[i] = exc
        for step in ("apply", "start"):
            waiting = [i for i in indices if out[i] is None
                       and (step == "apply" or self._applied[i] and self.vqs[i].started)]
            if step == "start":
                for i in waiting:
                    try:
                        self.pool[i].post({"cmd": "start"})
                    except WorkerError as exc:
                        out[i] = exc
            for i in waiting:
                if out[i] is not None:
                    continue
                try:
                    self.pool[i].answer(step)
                except WorkerError as exc:
                    out[i] = exc
                    continue
                if step == "apply":
                    self._applied[i] = True
                else:
                    self._running[i] = True
        return out

    def bootstrap(self, index: int) -> None:
        """Start worker ``index`` from the current snapshot: apply it, then
        start the ring if the Device has it started.  This is the respawn
        path: a worker started after negotiation (``pool.replace(index)``)
        sets the snapshot's base and, since the workers complete buffers in
        order, mapping the rings resumes at ``used->idx`` (what was not yet
        used is fetched again; with an inflight buffer, its region says
        what to resubmit).  Raises WorkerError."""
        self._applied[index] = self._running[index] = False
        w = self.pool[index]
        w.apply(self.queue_snapshot(index), self.session_fd)
        self._applied[index] = True
        if self.vqs[index].started:
            w.start()
            self._running[index] = True
