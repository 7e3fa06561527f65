"""Control side of the stats channel: collect worker snapshots, answer queries.

Workers publish JSON snapshots (``shardvu.workers.stats.StatsPublisher``) to
a SUB socket the control process binds; ``shardvu stats`` asks a REP socket
for the aggregate.  Both addresses derive from the vhost-user socket path
(:func:`endpoints`), so every party agrees on them without configuration.

Two ways to drive a :class:`StatsCollector` — pick one, never both:

* from the control loop: call ``poll(0)`` periodically, or register
  ``sockets()`` in a ``zmq.Poller`` (or watch their ``zmq.FD``, which is
  edge-triggered: after it fires, ``poll(0)`` drains everything);
* in a background thread: ``start()`` / ``stop()``.

``set_workers``, ``mark_dead`` and ``snapshot`` may be called from any
thread at any time (a lock guards the shared state; the zmq sockets are
only touched by whoever polls).
"""
from __future__ import annotations

import json
import os
import threading
import time
from typing import Any, Dict, List, Optional, Tuple

import psutil
import zmq

from shardvu.reasons import DropReason
from shardvu.statsapi import _IPC, endpoints  # noqa: F401  (endpoints re-exported)
from shardvu.workers.stats import COUNTER_FIELDS

def direction_of(index: int) -> str:
    """The guest's view of queue ``index``: even = "rx", odd = "tx"."""
    return "rx" if index % 2 == 0 else "tx"


#: Reasons a drop can be counted under: the bounded set every snapshot and
#: metric carries, zeros included.
DROP_REASONS = tuple(r.value for r in DropReason)


def _drops_by_reason(msg: Dict[str, Any]) -> Dict[str, int]:
    """The message's per-reason drop counts (top level, or inside
    ``counters``), restricted to :data:`DROP_REASONS`; {} if it has none."""
    raw = msg.get("drops_by_reason")
    if not isinstance(raw, dict):
        raw = msg["counters"].get("drops_by_reason")
    if not isinstance(raw, dict):
        return {}
    return {str(k): int(v) for k, v in raw.items()
            if str(k) in DROP_REASONS and isinstance(v, int) and v >= 0}


#: The keys of :meth:`StatsCollector.set_supervision` a row takes over.
_SUPERVISION_KEYS = ("last_exit_code", "last_exit_signal", "last_recovery_s", "state",
                     "broken_reason")



def _unique_bytes(pid: int) -> Optional[int]:
    """Private_Clean + Private_Dirty of ``/proc/PID/smaps_rollup`` (pages
    this process alone maps), in bytes; None if it cannot be read."""
    try:
        with open(f"/proc/{pid}/smaps_rollup", "rb") as f:
            text = f.read()
    except OSError:
        return None
    total = 0
    found = False
    for line in text.splitlines():
        if line.startswith(b"Private_Clean:") or line.startswith(b"Private_Dirty:"):
            total += int(line.split()[1]) * 1024
            found = True
    return total if found else None

class _Queue:
    """What the collector knows about one queue.

    ``base`` (and ``base_reasons``, ``base_cpu``) hold what earlier workers
    of the queue, or the current one before it reset a counter, had
    counted: a reported counter is base + the latest message's value, so
    it never goes down across respawns and reconnections.
    """

    __slots__ = ("pid", "msg", "heard", "named", "exitcode", "base", "base_reasons",
                 "base_cpu", "cpu_last", "restarts", "supervision")

    def __init__(self, now: float) -> None:
        self.pid: Optional[int] = None        # worker pid from set_workers / messages
        self.msg: Optional[Dict[str, Any]] = None   # latest message from that pid
        self.heard: Optional[float] = None    # monotonic receipt time of msg
        self.named = now                      # monotonic time we started expecting it
        self.exitcode: Optional[int] = None   # set by mark_dead
        self.base: Dict[str, int] = dict.fromkeys(COUNTER_FIELDS, 0)
        self.base_reasons: Dict[str, int] = dict.fromkeys(DROP_REASONS, 0)
        self.base_cpu = 0.0                   # CPU seconds of earlier workers
        self.cpu_last = 0.0                   # CPU seconds of pid, as last read
        self.restarts = 0                     # pid changes after the first pid
        self.supervision: Dict[str, Any] = {}  # from set_supervision

    def fold(self) -> None:
        """Add the latest message's counters to the base (the worker is
        replaced, or has reset its counters) and forget the message."""
        if self.msg is not None:
            counters = self.msg["counters"]
            for f in COUNTER_FIELDS:
                v = counters.get(f, 0)
                self.base[f] += v if isinstance(v, int) else 0
            for r, v in _drops_by_reason(self.msg).items():
                self.base_reasons[r] += v
        self.msg = None

    def advance(self, msg: Dict[str, Any]) -> None:
        """Take ``msg`` (from the same worker) as the latest.  A counter that
        went down was reset by the worker (a counter may reset on its own,
        e.g. the calls of a ring the front-end set up anew): its previous
        value joins the base, field by field."""
        if self.msg is not None:
            old, new = self.msg["counters"], msg["counters"]
            for f in COUNTER_FIELDS:
                a, b = old.get(f), new.get(f)
                if isinstance(a, int) and isinstance(b, int) and b < a:
                    self.base[f] += a
            before, after = _drops_by_reason(self.msg), _drops_by_reason(msg)
            for r, a in before.items():
                if after.get(r, 0) < a:
                    self.base_reasons[r] += a
        self.msg = msg


class StatsCollector:
    """Binds a SUB socket at ``pub_endpoint`` and a REP socket at
    ``query_endpoint``; keeps the latest snapshot per queue index.

    ``socket_path`` (optional) is echoed in :meth:`snapshot` as ``"socket"``,
    ``name`` (optional, the instance's ``--name``) as ``"name"``.
    ``context`` (optional) is a zmq Context to use; by default the collector
    makes its own and terminates it on :meth:`close`.
    """

    def __init__(self, pub_endpoint: str, query_endpoint: str,
                 socket_path: Optional[str] = None,
                 context: Optional[zmq.Context] = None, name: Optional[str] = None) -> None:
        self.pub_endpoint = pub_endpoint
        self.query_endpoint = query_endpoint
        self.socket_path = socket_path or ""
        self.name = name or ""
        self.bad_messages = 0                 # unparseable / malformed messages seen
        self.queries = 0                      # REP requests answered
        self._lock = threading.Lock()
        self._queues: Dict[int, _Queue] = {}
        self._procs: Dict[int, psutil.Process] = {}
        self._thread: Optional[threading.Thread] = None
        self._stopping = threading.Event()
        self._own_ctx = context is None
        self._ctx: Optional[zmq.Context] = context if context is not None else zmq.Context()
        self._sub = self._ctx.socket(zmq.SUB)
        self._rep = self._ctx.socket(zmq.REP)
        try:
            for s in (self._sub, self._rep):
                s.setsockopt(zmq.LINGER, 0)
            self._sub.setsockopt(zmq.SUBSCRIBE, b"")
            self._sub.bind(pub_endpoint)
            self._rep.bind(query_endpoint)
        except BaseException:
            self._close_sockets()
            raise
        self._poller = zmq.Poller()
        self._poller.register(self._sub, zmq.POLLIN)
        self._poller.register(self._rep, zmq.POLLIN)

    # -- driving -------------------------------------------------------------

    def sockets(self) -> Tuple[zmq.Socket, zmq.Socket]:
        """``(sub, rep)``, for registering in the caller's own poller."""
        return self._sub, self._rep

    def poll(self, timeout_ms: int = 0) -> int:
        """Wait up to ``timeout_ms`` (0 = don't wait, None/-1 = forever) for
        activity, then drain every pending SUB message and answer every
        pending query.  Returns the number of messages + queries handled."""
        if timeout_ms is not None and timeout_ms < 0:
            timeout_ms = None
        if not self._poller.poll(timeout_ms):
            return 0
        n = 0
        while True:
            try:
                raw = self._sub.recv(zmq.NOBLOCK)
            except zmq.Again:
                break
            self._ingest(raw)
            n += 1
        while True:
            try:
                self._rep.recv(zmq.NOBLOCK)   # content is ignored
            except zmq.Again:
                break
            try:
                self._rep.send(json.dumps(self.snapshot()).encode(), zmq.NOBLOCK)
            except zmq.Again:   # requester vanished; REP state resets on its own
                pass
            self.queries += 1
            n += 1
        return n

    def start(self) -> None:
        """Run :meth:`poll` in a daemon thread until :meth:`stop`."""
        if self._thread is not None:
            raise RuntimeError("collector thread already running")
        self._stopping.clear()
        self._thread = threading.Thread(target=self._run, name="shardvu-stats", daemon=True)
        self._thread.start()

    def _run(self) -> None:
        while not self._stopping.is_set():
            try:
                self.poll(50)
            except zmq.ZMQError:
                if self._stopping.is_set():
                    break
                raise

    def stop(self) -> None:
        """Stop the background thread (no-op if none); sockets stay open."""
        t, self._thread = self._thread, None
        if t is not None:
            self._stopping.set()
            t.join()

    def close(self) -> None:
        """Stop, close the sockets, terminate our context, remove the ipc
        files.  Idempotent."""
        self.stop()
        self._close_sockets()

    def _close_sockets(self) -> None:
        for s in (self._sub, self._rep):
            if not s.closed:
                s.close(linger=0)
        if self._own_ctx and self._ctx is not None:
            self._ctx.term()
        self._ctx = None
        for ep in (self.pub_endpoint, self.query_endpoint):
            if ep.startswith(_IPC):
                try:
                    os.unlink(ep[len(_IPC):])
                except OSError:
                    pass

    def __enter__(self) -> "StatsCollector":
        return self

    def __exit__(self, *exc: Any) -> None:
        self.close()

    # -- state ---------------------------------------------------------------

    def _ingest(self, raw: bytes) -> None:
        try:
            msg = json.loads(raw)
            index = int(msg["index"])
            pid = int(msg["pid"])
            if not isinstance(msg.get("counters"), dict):
                raise ValueError("no counters")
        except (ValueError, KeyError, TypeError):
            self.bad_messages += 1
            return
        now = time.monotonic()
        with self._lock:
            q = self._queues.get(index)
            if q is None:
                q = self._queues[index] = _Queue(now)
            if q.pid is None:
                q.pid = pid
            elif q.pid != pid:
                return      # a late message from a replaced worker
            q.advance(msg)
            q.heard = now

    def set_workers(self, mapping: Dict[int, int], carried: bool = False) -> None:
        """Declare queue index -> worker pid.  Named queues appear in
        :meth:`snapshot` at once (zeros, state "starting") until their
        worker reports.  A queue whose pid changes (a restarted worker)
        keeps the old worker's counters and CPU time in its base, counts a
        restart and forgets the dead mark.  With ``carried`` the new
        workers go on from their predecessors' counters (a respawn from the
        queue's progress page): nothing is folded, the last message stands
        until the new worker's first (a counter the new worker does not
        carry joins the base when it reports lower).  Queues not in
        ``mapping`` are kept (use a full mapping to keep them accurate)."""
        now = time.monotonic()
        with self._lock:
            for index, pid in mapping.items():
                q = self._queues.get(index)
                if q is None:
                    q = self._queues[index] = _Queue(now)
                if q.pid != pid:
                    if q.pid is not None:
                        q.restarts += 1
                        if not carried:
                            q.fold()
                        q.base_cpu += q.cpu_last
                    q.cpu_last = 0.0
                    if not carried:
                        q.msg, q.heard = None, None
                    q.pid, q.exitcode, q.named = pid, None, now

    def set_supervision(self, index: int, info: Dict[str, Any]) -> None:
        """What the supervisor (:mod:`shardvu.control.supervisor`) knows of
        queue ``index``'s respawns: ``restarts``, ``last_exit_code``,
        ``last_exit_signal``, ``last_recovery_s`` and, for a queue given up
        after a crash loop, ``state`` and ``broken_reason``.  Shown in the
        queue's snapshot row over the collector's own view; ``restarts``
        never goes below the pid changes the collector counted itself."""
        with self._lock:
            q = self._queues.get(index)
            if q is None:
                q = self._queues[index] = _Queue(time.monotonic())
            q.supervision = dict(info)

    def mark_dead(self, index: int, exitcode: Optional[int]) -> None:
        """Record that queue ``index``'s worker exited with ``exitcode``;
        it shows as state "dead" (last counters kept) until ``set_workers``
        names a new pid for it."""
        with self._lock:
            q = self._queues.get(index)
            if q is None:
                q = self._queues[index] = _Queue(time.monotonic())
            q.exitcode = exitcode

    def _proc_usage(self, pid: int) -> Tuple[float, int, int, Optional[float]]:
        """(cpu_percent since the previous snapshot, rss bytes, private
        bytes, CPU seconds user + system) of ``pid``; zeros and None if it
        is gone.  Private = the pages mapped by this process alone (its
        unique set size, from ``/proc/PID/smaps_rollup``): not the guest
        memory it shares with the front-end, nor the pages it still shares
        copy-on-write with the zygote it was forked from (resident less
        psutil's ``shared`` counted those as private: 20 MiB for an idle
        CPython worker whose own pages are 11 MiB).  Where smaps_rollup
        cannot be read, resident less shared.  Process objects are cached
        so the cpu deltas work."""
        p = self._procs.get(pid)
        try:
            if p is None:
                p = self._procs[pid] = psutil.Process(pid)
            with p.oneshot():
                mem = p.memory_info()
                t = p.cpu_times()
                private = _unique_bytes(pid)
                if private is None:
                    private = mem.rss - getattr(mem, "shared", 0)
                return (float(p.cpu_percent(None)), int(mem.rss), int(min(private, mem.rss)),
                        float(t.user + t.system))
        except (psutil.NoSuchProcess, psutil.AccessDenied):
            self._procs.pop(pid, None)
            return 0.0, 0, 0, None

    def snapshot(self) -> Dict[str, Any]:
        """The aggregate, as served on the query socket::

            {"queues": [{"index", "direction", <COUNTER_FIELDS>, "drops_by_reason",
                         "state", "broken_reason", "exitcode", "worker_pid",
                         "restarts", "last_exit_code", "last_exit_signal",
                         "last_recovery_s", "cpu_seconds", "cpu_percent", "rss_bytes",
                         "private_bytes", "age_s"}, ...],
             "totals": {<COUNTER_FIELDS>, "drops_by_reason", "restarts", "cpu_seconds",
                        "cpu_percent", "rss_bytes", "private_bytes"},
                        # cpu/memory summed over distinct live worker pids
             "time": <unix time>, "socket": <vhost socket path or "">,
             "name": <instance name or "">, "control_pid": <this process>}

        Queues are sorted by index.  The counters, ``drops_by_reason``
        (every :class:`~shardvu.reasons.DropReason` value, zeros included),
        ``restarts`` and ``cpu_seconds`` never decrease: what a replaced
        worker counted, or a worker before it reset its counters, stays in
        (see :class:`_Queue`).  ``state`` is the worker's own
        ("idle"/"running"/"stopped"/"broken"), "starting" before its first
        message, or "dead" after :meth:`mark_dead` (``exitcode`` is None
        otherwise).  ``age_s`` is seconds since the last message was
        received, or since the queue was named if none has been.
        ``private_bytes`` is ``rss_bytes`` less shared pages (see
        :meth:`_proc_usage`): what the worker itself holds.
        """
        now = time.monotonic()
        with self._lock:
            rows: List[Dict[str, Any]] = []
            usage: Dict[int, Tuple[float, int, int, Optional[float]]] = {}   # live pid, once each
            for index in sorted(self._queues):
                q = self._queues[index]
                counters = q.msg["counters"] if q.msg is not None else {}
                dead = q.exitcode is not None
                if dead:
                    state = "dead"
                elif q.msg is not None:
                    state = str(q.msg.get("state", "unknown"))
                else:
                    state = "starting"
                if q.pid is None or dead:
                    cpu, rss, private, cpu_s = 0.0, 0, 0, None
                else:
                    if q.pid not in usage:
                        usage[q.pid] = self._proc_usage(q.pid)
                    cpu, rss, private, cpu_s = usage[q.pid]
                if cpu_s is not None:
                    q.cpu_last = max(q.cpu_last, cpu_s)
                row: Dict[str, Any] = {"index": index, "direction": direction_of(index)}
                for f in COUNTER_FIELDS:
                    v = counters.get(f, 0)
                    row[f] = q.base[f] + (v if isinstance(v, int) else 0)
                reasons = dict(q.base_reasons)
                if q.msg is not None:
                    for r, v in _drops_by_reason(q.msg).items():
                        reasons[r] += v
                row.update(
                    drops_by_reason=reasons,
                    state=state,
                    broken_reason=q.msg.get("broken_reason") if q.msg is not None else None,
                    exitcode=q.exitcode,
                    worker_pid=q.pid,
                    restarts=q.restarts,
                    cpu_seconds=round(q.base_cpu + q.cpu_last, 3),
                    cpu_percent=cpu,
                    rss_bytes=rss,
                    private_bytes=private,
                    age_s=round(now - (q.heard if q.heard is not None else q.named), 3),
                    last_exit_code=None,
                    last_exit_signal=None,
                    last_recovery_s=None,
                )
                for key in _SUPERVISION_KEYS:
                    if key in q.supervision:
                        row[key] = q.supervision[key]
                row["restarts"] = max(q.restarts, int(q.supervision.get("restarts") or 0))
                rows.append(row)
            for pid in [p for p in self._procs if p not in usage]:
                del self._procs[pid]
        totals: Dict[str, Any] = {f: sum(r[f] for r in rows) for f in COUNTER_FIELDS}
        totals["drops_by_reason"] = {r: sum(row["drops_by_reason"][r] for row in rows)
                                     for r in DROP_REASONS}
        totals["restarts"] = sum(r["restarts"] for r in rows)
        # Per process, not per row: queues sharing a pid are counted once.
        totals["cpu_seconds"] = round(sum(r["cpu_seconds"] for r in rows), 3)
        totals["cpu_percent"] = round(sum(u[0] for u in usage.values()), 1)
        totals["rss_bytes"] = sum(u[1] for u in usage.values())
        totals["private_bytes"] = sum(u[2] for u in usage.values())
        return {"queues": rows, "totals": totals, "time": time.time(),
                "socket": self.socket_path, "name": self.name, "control_pid": os.getpid()}
