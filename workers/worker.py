"""A worker process: owns one virtqueue's data path.

State is split by owner.  The control process's Device owns the queue's
*configuration* and every transition of it; it sends it here, over the
worker's command channel (:mod:`shardvu.workers.ctl`), as one
:class:`~shardvu.snapshot.QueueSnapshot`: the guest memory fds (mapped
here), ring size, addresses and base, features, the kick, call and err
eventfds, the dirty log, the inflight buffer and the pair's port part.  The
worker owns the *progress* (last avail index, used index, EVENT_IDX state),
recovered from the rings themselves when they are mapped (``used->idx``;
the inflight region where negotiated).  The whole command set is
:attr:`Worker.COMMANDS`: apply, start, stop, stats, exit.  The worker runs
the ring loop; the control process never touches guest memory.

Every command is answered once it has been applied (the barrier the control
process waits for before replying to the front-end).  The worker exits when
its channel closes, on an ``exit`` command, or when the control process dies
(PR_SET_PDEATHSIG).

Loop: adaptive polling.  While frames flow the worker keeps notifications
off and polls the ring.  When a pass finds nothing it spins for up to
``SPIN_S`` (``SHARDVU_SPIN_US``, default 200 µs): it yields the CPU
(``sched_yield``: the worker sharing it may be the one about to produce its
next frames) and probes the ring cheaply, because an eventfd wake-up costs
~70 µs here and a probe ~1 µs.  Only then does it re-enable notifications,
re-check the ring (so a buffer added in between is not missed) and sleep in
``poll()`` on the kick fd, its command channel and (loopback RX) the pair's
doorbell.  Whatever it does, it looks at the command channel at least every
``CHECK_EVERY`` passes or 16 probes, so that it always answers.
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
from typing import Any, Dict, List, Optional

from shardvu import logsetup
from shardvu import protocol as P
from shardvu.dirtylog import DirtyLog, FileLock
from shardvu.eventfd import drain
from shardvu.transport import close_fds_except
from shardvu.inflight import InflightBuffer
from shardvu.memory import GuestMemory, MemoryMapError
from shardvu.net import net_hdr_len
from shardvu.reasons import BrokenReason, DropReason
from shardvu.ringrules import MAX_FRAME
from shardvu.snapshot import PortPart, QueueSnapshot, fd_identity
from shardvu.virtqueue import RingError, VirtQueue

from . import ctl
from .ports import Port, PortRx, PortSpec, deliver, loop_offload, make_frame, resolve
from . import progress as _progress
from . import split_loop
# One hot loop per interpreter style (see bench/ringloop.py for the numbers).
if sys.implementation.name == "pypy":
    from . import split_fast_struct as split_fast
else:
    from . import split_fast
from shardvu.framestats import add_batch, add_frames, add_same
from .stats import Counters, StatsPublisher

log = logging.getLogger("shardvu.worker")

BATCH = 64
IDLE_POLL_MS = 500
#: busy passes between looks at the command channel and the stats clock
CHECK_EVERY = 16
#: how long a worker keeps polling an idle ring before it sleeps on the kick fd
SPIN_S = float(os.environ.get("SHARDVU_SPIN_US", "200")) / 1e6
_PR_SET_PDEATHSIG = 1


def _die_with_parent() -> None:
    try:
        libc = ctypes.CDLL(None, use_errno=True)
        libc.prctl(_PR_SET_PDEATHSIG, signal.SIGKILL, 0, 0, 0)
    except (OSError, AttributeError):  # pragma: no cover - not Linux
        pass


class Worker:
    """One virtqueue's data path, driven by commands from the control process."""

    #: loopback with CSUM negotiated: frames cross the pair's ring with
    #: their virtio-net header (ports.loop_offload decides what may pass)
    offload_loop = False

    def __init__(self, index: int, chan: socket.socket, port: PortSpec, frame_size: int,
                 stats_endpoint: Optional[str], batch: int = BATCH,
                 progress: Optional[_progress.ProgressPage] = None):
        self.index = index
        #: the queue's progress page (workers/progress.py): recorded after
        #: every pass that moved frames, read back by a replacement
        self.progress = progress
        self.resumed = False
        self.chan = chan
        self.port = port
        self.is_tx = bool(index & 1)
        self.batch = batch
        self.mem = GuestMemory()
        self.vq = VirtQueue(index, log)
        self.vq.mem = self.mem
        self.dlog: Optional[DirtyLog] = None
        self.inflight: Optional[InflightBuffer] = None
        self.spsc = None
        self.counters = Counters()
        self.frame = make_frame(frame_size)
        self.frames = [self.frame] * batch
        self.stats = StatsPublisher(stats_endpoint, index, "tx" if self.is_tx else "rx") \
            if stats_endpoint else None
        self.hdr_len = 12
        self.rx_hdr = split_fast.rx_header(12)
        self.gen_frames = [self.rx_hdr + self.frame] * batch    # header included
        self.mergeable = False
        self.cache = split_fast.RegionCache(self.mem)
        self._poller = select.poll()
        self._poller.register(chan.fileno(), select.POLLIN)
        self._watched: set = set()
        self._log_call_fd = -1       # SET_LOG_FD's eventfd (DirtyLog does not own it)
        self.session_fd = -1         # a copy of the front-end's connection (_hold_session)
        #: the port part's fds and detail (kinds other than "spsc"), owned here
        self.port_fds: List[int] = []
        self.port_meta: Dict[str, Any] = {}
        self.port_kind: Optional[str] = None
        #: a two-way port's object in this worker, and (RX) its delivery side
        self.twoway: Optional[Port] = None
        self.port_rx: Optional[PortRx] = None
        # What the applied snapshot was made of (see apply()); None: nothing yet.
        self._generation: Optional[int] = None
        self._base_serial: Optional[int] = None
        self._geometry: Optional[tuple] = None
        self._mem_ident: Optional[list] = None
        self._log_ident: Optional[tuple] = None
        self._inflight_ident: Optional[tuple] = None
        self._spsc_ident: Optional[tuple] = None
        self._port_part: Optional[PortPart] = None
        self._unreadable_kick = -1       # a kick fd read() refused (see _drain_kick)
        self.running = True
        from .pcap import install as _capture
        _capture(self)      # --pcap: capture-aware batch paths; nothing when capture is off

    # -- commands -----------------------------------------------------------------
    #: The whole command set.  ``apply`` takes a QueueSnapshot (the queue's
    #: configuration, owned by the control process's Device); ``start``
    #: runs the ring; ``stop`` stops it and answers the progress
    #: (``last_avail_idx``, ``used_idx``); ``stats`` answers the counters;
    #: ``exit`` ends the worker.  No command changes configuration by itself.
    COMMANDS = ("apply", "start", "stop", "stats", "exit")

    def handle(self, obj: Dict[str, Any], fds: List[int]) -> Dict[str, Any]:
        """Run one command; every fd received with it is kept or closed."""
        cmd = obj.get("cmd", "")
        try:
            if cmd not in self.COMMANDS:
                raise ValueError(f"unknown command {cmd!r}")
            reply = getattr(self, "_cmd_" + cmd)(obj, fds) or {}
            reply["ok"] = True
            return reply
        except (ValueError, OSError, MemoryMapError, RingError) as exc:
            return {"ok": False, "error": f"{cmd}: {exc}"}
        except Exception as exc:    # a bug here must cost the request, not the queue
            log.exception("queue %d: %s failed", self.index, cmd)
            return {"ok": False, "error": f"{cmd}: {type(exc).__name__}: {exc}"}
        finally:
            for fd in fds:          # whatever a command did not keep
                os.close(fd)
            fds.clear()
            self._update_watch()

    def _cmd_apply(self, obj, fds):
        # The front-end connection rides last, outside the snapshot (it is
        # the control process's, not the Device's): see _hold_session.
        self._hold_session(fds.pop() if obj.get("session") and fds else -1)
        snap = QueueSnapshot.decode(obj.get("snapshot"), fds)
        if snap.index != self.index:
            raise ValueError(f"snapshot of queue {snap.index} sent to worker {self.index}")
        pending = set(fds)      # received copies not yet kept; handle() closes them
        fds.clear()
        try:
            self.apply(snap, pending)
        finally:
            fds.extend(pending)

    def _discard_pair_ring(self) -> None:
        """At a ring reset (a new session, RESET_DEVICE), the loopback RX
        worker drops the frames its pair's ring still holds: they belong to
        the guest before the reset and must not reach the next one.  Counted
        as ``ring_disabled`` drops.  (A worker's first snapshot is not a
        reset: a replacement delivers what its predecessor left.)"""
        if self.is_tx or self.spsc is None:
            return
        while True:
            n = len(self.spsc.peek(self.spsc.slots))
            if not n:
                break
            self.spsc.release(n)
            self.counters.drop(DropReason.RING_DISABLED, n)
        self.spsc.unpeek()

    def _hold_session(self, fd: int) -> None:
        """Hold a copy of the front-end's connection while it lasts (-1: it
        ended).  The front-end sees the connection close only once every
        process holding it is gone, so when the control process dies it
        learns of it after the workers, which exit when their command
        channel closes, have stopped writing to its rings.  (QEMU reads
        ``used->idx`` at the disconnect and serves the TX ring itself from
        there while the link is down: a worker still completing buffers
        after that would complete them twice.)  When the control process
        ends a session, its last snapshot (without the connection) makes
        every worker drop its copy before the control closes its own."""
        if fd >= 0 and self.session_fd >= 0 and fd_identity(fd) == fd_identity(self.session_fd):
            os.close(fd)            # the same connection, re-sent with the next snapshot
            return
        if self.session_fd >= 0:
            os.close(self.session_fd)
        self.session_fd = fd

    def apply(self, snap: QueueSnapshot, pending: set) -> None:
        """Make the queue's configuration ``snap``'s.  Idempotent: applying
        the same snapshot again changes nothing (memory, log and inflight
        are remapped only when their files or geometry changed; the base
        only when ``base_serial`` did).  ``pending`` holds the snapshot's
        fds this worker received: each one kept is removed from it (the
        caller closes the rest); the copies it replaces are closed."""
        vq = self.vq
        if vq.enable and not snap.enabled:
            self._drain_tx()       # frames queued while enabled are still traffic
        if snap.generation != self._generation:
            # A ring reset: progress and broken state go with it.
            if self._generation is not None:
                self._discard_pair_ring()
            vq.reset()
            self._generation = snap.generation
            self._base_serial = None
            self._geometry = None
            self.counters.state = "idle"
            self.counters.broken_reason = None
        self._set_features(snap.features)
        remapped = self._apply_memory(snap, pending)
        self._apply_log(snap, pending)
        self._apply_inflight(snap, pending)
        for name in ("kick_fd", "call_fd", "err_fd"):
            self._replace_fd(name, getattr(snap, name), pending)
        self._apply_port(snap, pending)
        if snap.base_serial != self._base_serial:
            vq.set_base(snap.base)
            self._base_serial = snap.base_serial
        geometry = (snap.num, snap.addr, snap.in_order)
        if remapped or geometry != self._geometry or not vq.mapped:
            self._geometry = geometry
            vq.num = snap.num
            vq.addr = P.VringAddr(*snap.addr) if snap.addr is not None else None
            vq.processed_in_order = snap.in_order
            self._remap()
        vq.enable = snap.enabled
        vq.discard_disabled = snap.discard_disabled

    def _remap(self) -> None:
        vq = self.vq
        vq.unmap_rings()
        if vq.num and vq.addr is not None and len(self.mem):
            try:
                vq.map_rings()
            except RingError as exc:
                log.warning("queue %d: %s", self.index, exc)

    def _apply_memory(self, snap: QueueSnapshot, pending: set) -> bool:
        ident = [(r.gpa, r.size, r.uva, r.mmap_offset) + fd_identity(fd)
                 for r, fd in zip(snap.regions, snap.region_fds)]
        if ident == self._mem_ident:
            return False
        self.cache = split_fast.RegionCache(self.mem)     # drop views of old regions
        self.vq.unmap_rings()
        self.mem.clear()
        self._mem_ident = []
        for r, fd in zip(snap.regions, snap.region_fds):
            pending.discard(fd)             # add() owns it, failing or not
            self.mem.add(P.MemoryRegion(r.gpa, r.size, r.uva, r.mmap_offset), fd)
        self._mem_ident = ident
        return True

    def _apply_log(self, snap: QueueSnapshot, pending: set) -> None:
        ident = None
        if snap.log is not None:
            ident = (snap.log.size, snap.log.offset) + fd_identity(snap.log_fd)
        if ident != self._log_ident:
            if self.dlog is not None:
                self.dlog.close()
                self.dlog = None
            self._log_ident = None
            if snap.log is not None:
                pending.discard(snap.log_fd)        # DirtyLog owns it, failing or not
                self.dlog = DirtyLog(snap.log_fd, snap.log.size, snap.log.offset)
                # every worker marks the same log: serialise on the log file itself
                self.dlog.lock = FileLock(self.dlog.fd)
                self._log_ident = ident
            self.vq.log = self.dlog
        self._replace_fd("_log_call_fd", snap.log_call_fd, pending, on=self)
        if self.dlog is not None:
            self.dlog.call_fd = self._log_call_fd

    def _apply_inflight(self, snap: QueueSnapshot, pending: set) -> None:
        inf = snap.inflight
        ident = None
        if inf is not None:
            ident = (inf.mmap_size, inf.mmap_offset, inf.num_queues, inf.queue_size) \
                + fd_identity(snap.inflight_fd)
        if ident == self._inflight_ident:
            return
        if self.inflight is not None:
            self.vq.inflight = None
            self.inflight.close()
            self.inflight = None
        self._inflight_ident = None
        if inf is not None:
            pending.discard(snap.inflight_fd)       # map() owns it, failing or not
            self.inflight = InflightBuffer.map(snap.inflight_fd, inf.mmap_size, inf.mmap_offset,
                                               inf.num_queues, inf.queue_size)
            self._inflight_ident = ident
            if self.index < self.inflight.num_queues:
                self.vq.inflight = self.inflight.queue(self.index)

    def _apply_port(self, snap: QueueSnapshot, pending: set) -> None:
        """The pair's port part.  "spsc": the loopback ring (memfd,
        doorbell), attached once per ring file.  Any other kind (a tap
        queue fd, ...): its fds are kept in ``port_fds`` (replacing the
        previous ones) and ``port_meta``, for the port code."""
        port = snap.port
        if port is not None and port.kind == "spsc":
            ring_fd, bell_fd = snap.port_fds
            ident = fd_identity(ring_fd)
            if ident != self._spsc_ident:
                from .spsc import SpscRing
                if self.spsc is not None:
                    self._close_spsc()
                self.spsc = SpscRing.attach(ring_fd, bell_fd)
                pending.discard(ring_fd)
                pending.discard(bell_fd)
                self._spsc_ident = ident
                self._set_headroom()
            return
        if self.spsc is not None:
            self._close_spsc()
        if port == self._port_part and len(snap.port_fds) == len(self.port_fds):
            return                  # the same part again: keep the copies held
        for fd in self.port_fds:
            os.close(fd)
        self.port_fds = list(snap.port_fds)
        pending.difference_update(self.port_fds)
        self._port_part = port
        self.port_meta = dict(port.meta) if port is not None else {}
        self.port_kind = port.kind if port is not None else None
        self._port_changed()

    def _port_changed(self) -> None:
        """(Re)build the two-way port object from the port part's fds
        (frames already read for the guest stay pending)."""
        pending = self.port_rx.pending if self.port_rx is not None else []
        if self.twoway is not None:
            self.twoway.close()
            self.twoway = self.port_rx = None
        cls = self.port.two_way
        if cls is None or not self.port_fds:
            return
        self.twoway = cls(self.index // 2, self.is_tx, self.port_fds, self.port_meta)
        self.twoway.drop = self._drop
        self.twoway.configure(self.vq.features, self.hdr_len)
        from .pcap import wrap as capture       # --pcap: record the port's frames
        capture(self.twoway, self.index)
        if not self.is_tx:
            self.port_rx = PortRx(self.twoway, self._drop)
            self.port_rx.counts = self.counters
            self.port_rx.pending = pending

    def _drop(self, reason, n: int) -> None:
        """Count ``n`` frames dropped for ``reason`` (a DropReason)."""
        c = self.counters
        if hasattr(c, "drop"):
            c.drop(reason, n)
        else:
            c.drops += n

    def _close_spsc(self) -> None:
        spsc, self.spsc = self.spsc, None
        self._spsc_ident = None
        if spsc is not None:
            spsc.close()

    def _replace_fd(self, name: str, fd: int, pending: set, on: Any = None) -> None:
        """Keep received ``fd`` (-1: none) as attribute ``name`` of ``on``
        (default: the queue), closing the copy it replaces."""
        target = self.vq if on is None else on
        old = getattr(target, name)
        if old >= 0:
            os.close(old)
        setattr(target, name, fd)
        pending.discard(fd)
        if target is self.vq and name == "kick_fd":
            self._unreadable_kick = -1

    def _set_features(self, features: int) -> None:
        self.vq.features = features
        self.hdr_len = net_hdr_len(features)
        self.rx_hdr = split_fast.rx_header(self.hdr_len)
        self.gen_frames = [self.rx_hdr + self.frame] * self.batch
        self.mergeable = bool(features >> P.VIRTIO_NET_F_MRG_RXBUF & 1)
        self.offload_loop = bool(self.port.identity and features & 1)
        self._set_headroom()
        if self.twoway is not None:
            self.twoway.configure(features, self.hdr_len)

    def _set_headroom(self) -> None:
        # the loopback RX worker copies header + frame out of a slot at once
        if self.is_tx and self.spsc is not None:
            self.spsc.set_headroom(self.rx_hdr)

    def _drain_tx(self) -> None:
        """Before a TX ring is disabled or stopped, consume what the guest
        already queued (bounded by the ring size), so nothing it counted as
        sent is silently left behind."""
        if self.is_tx and self.active():
            for _ in range(self.vq.num // self.batch + 2):
                if not self.pass_once():
                    break
                if self.progress is not None:
                    _progress.note(self)

    def _cmd_start(self, obj, fds):
        vq = self.vq
        vq.started = True
        # Setup is done: move what exists now out of the collector's way,
        # so the ring loop's rare collections scan only new objects.  (PyPy's
        # gc has no freeze: a full collection there would only cost a
        # replacement worker ~50 ms before its first pass.)
        if hasattr(gc, "freeze"):       # CPython 3.7+
            gc.collect()
            gc.freeze()
        if vq.inflight is not None and vq.ready():
            vq.check_inflight()
        if self.progress is not None:
            _progress.resume(self)      # finish what a killed predecessor was doing
        self.counters.state = "running"

    def _cmd_stop(self, obj, fds):
        vq = self.vq
        self._drain_tx()
        vq.started = False
        if self.counters.state != "broken":
            self.counters.state = "stopped"
        return {"last_avail_idx": vq.last_avail_idx, "used_idx": vq.used_idx}

    def _cmd_stats(self, obj, fds):
        self._sync_counters()
        c = self.counters
        return {"counters": c.as_dict(), "state": c.state, "broken_reason": c.broken_reason}

    def _cmd_exit(self, obj, fds):
        self.running = False

    def release(self) -> None:
        """Close every fd and mapping the worker holds (an empty snapshot
        of a new generation, applied)."""
        generation = self._generation if self._generation is not None else 0
        self.apply(QueueSnapshot(self.index, generation=generation), set())

    # -- the loop --------------------------------------------------------------------
    def _update_watch(self) -> None:
        want = set()
        if self.vq.kick_fd >= 0 and self.vq.kick_fd != self._unreadable_kick:
            want.add(self.vq.kick_fd)
        if self.spsc is not None and not self.is_tx:
            want.add(self.spsc.doorbell_fd)
        if self.port_rx is not None and self.port_rx.want_fd() and self.active():
            want.add(self.twoway.fileno())
        for fd in self._watched - want:
            try:
                self._poller.unregister(fd)
            except KeyError:
                pass
        for fd in want - self._watched:
            self._poller.register(fd, select.POLLIN)
        self._watched = want

    def active(self) -> bool:
        vq = self.vq
        return vq.started and vq.ready()

    def _tx_batch(self, forward: bool):
        """Fast loop first; a buffer it does not take ends its part of the
        batch and the general path finishes the batch.  With ``forward``,
        frames go through the port function to the pair's RX worker.
        Returns ``(chains taken, payload bytes)``; frames dropped by the
        ring rules (short, oversize) or by the port are counted by reason
        in the counters as they happen."""
        vq = self.vq
        c = self.counters
        on_frames = self._forward if forward else None
        if forward and self.twoway is not None:
            return self._tx_two_way()
        loopback = forward and self.port.identity and self.spsc is not None
        if loopback and self.offload_loop:
            return self._tx_two_way(self._loop_offload, self.spsc.max_frame)
        max_frame = self.spsc.max_frame if loopback else MAX_FRAME
        n = nbytes = 0
        if split_fast.eligible(vq):
            if loopback:
                # loopback: straight into the pair's ring, no port call
                n, nbytes, dropped, more = split_fast.tx_to_ring(
                    vq, self.hdr_len, self.batch, self.cache, self.spsc, c, c)
                if n > dropped:
                    self.spsc.producer_notify()
            else:
                n, nbytes, more = split_fast.tx_pass(vq, self.hdr_len, self.batch, self.cache,
                                                     on_frames, c, max_frame, c)
            if not more:
                return n, nbytes
        n2, b2, frames = split_loop.tx_pass(vq, self.hdr_len, self.batch - n, forward, c, max_frame, c)
        if frames:
            self._forward(frames)
        return n + n2, nbytes + b2

    def _tx_two_way(self, send=None, max_frame: int = MAX_FRAME):
        """TX to a two-way port (or ``send``): frames keep their virtio-net
        header; ``max_frame`` bounds the frame after it.  The frames are
        counted (size bin, cast) as they are handed to ``send``."""
        vq, c, h = self.vq, self.counters, self.hdr_len
        port_send = send or self._send_two_way

        def send(frames) -> None:
            add_frames(c, frames, h)
            port_send(frames)
        n = nbytes = 0
        if split_fast.eligible(vq):
            n, nbytes, more = split_fast.tx_pass(vq, 0, self.batch, self.cache, send, c,
                                                 max_frame + h)
            nbytes -= n * h
            if not more:
                return n, nbytes
        n2, b2, frames = split_loop.tx_pass(vq, 0, self.batch - n, True, c, max_frame + h)
        if frames:
            send(frames)
        return n + n2, nbytes + b2 - n2 * h

    def _loop_offload(self, frames) -> None:
        """Loopback with offloads: what may pass goes to the pair's ring,
        header and all."""
        out = loop_offload(frames, self.vq.features, self.hdr_len, self._drop)
        if out:
            pushed = self.spsc.push_batch(out)
            if pushed < len(out):
                self._drop(DropReason.PORT_FULL, len(out) - pushed)
            if pushed:
                self.spsc.producer_notify()

    def _send_two_way(self, frames) -> None:
        try:
            self.twoway.send(frames)
        except Exception as exc:   # a user's port must not kill the queue
            log.exception("queue %d: port send failed", self.index)
            self.vq.mark_broken(f"port send raised {type(exc).__name__}: {exc}",
                                BrokenReason.PORT_FAILED)

    def _forward(self, frames) -> None:
        """Run the port function on a batch (views or bytes) and hand its
        result to the pair's RX worker; what does not fit is dropped and
        counted (PORT_FULL; OVERSIZE_FRAME for a frame longer than a slot)."""
        port = self.port
        try:
            out = frames if port.identity else port.tx_fn([bytes(f) for f in frames])
        except Exception as exc:   # a user's port must not kill the queue
            log.exception("queue %d: port function failed", self.index)
            self.vq.mark_broken(f"port function raised {type(exc).__name__}: {exc}",
                                BrokenReason.PORT_FAILED)
            return
        spsc = self.spsc
        if out and spsc is not None:
            oversize = spsc.oversize
            pushed = spsc.push_batch(out)
            c = self.counters
            if spsc.oversize != oversize:
                c.drop(DropReason.OVERSIZE_FRAME, spsc.oversize - oversize)
            if pushed < len(out):
                c.drop(DropReason.PORT_FULL, len(out) - pushed)
            if pushed:
                spsc.producer_notify()

    def _rx_batch(self, frames, with_hdr=None) -> tuple:
        """Deliver ``frames``; ``with_hdr``, if given, is the same frames
        with the virtio-net header already in front (the fast loop then
        copies each once).  Returns ``(frames consumed, payload bytes)``:
        consumed frames (a prefix) were delivered, or dropped and counted
        by reason (RX buffer too small, oversize)."""
        vq, c = self.vq, self.counters
        n = nbytes = 0
        if split_fast.eligible(vq):
            if with_hdr is not None:
                n, nbytes, more = split_fast.rx_pass(vq, with_hdr, b"", self.cache)
                nbytes -= n * len(self.rx_hdr)
            else:
                n, nbytes, more = split_fast.rx_pass(vq, frames, self.rx_hdr, self.cache)
            if n:       # the fast loop delivers every frame it consumes
                if frames is self.frames:       # the generator's: one frame, repeated
                    add_same(c, self.frame, 0, n)
                else:
                    add_batch(c, frames, n)
            if not more:
                return n, nbytes
            frames = frames[n:]
        n2, b2 = split_loop.rx_pass(vq, frames, self.hdr_len, self.mergeable, c, MAX_FRAME, c)
        return n + n2, nbytes + b2

    def pass_once(self) -> int:
        """One batch; returns how many frames it moved or dropped.  Frames
        dropped count in ``drops`` by reason, the others in ``packets``."""
        vq = self.vq
        c = self.counters
        d0 = c.drops
        if self.is_tx:
            if not vq.enabled and not vq.discard_disabled:
                return 0              # not enabled yet since it started: left alone
            forward = (self.port.tx_fn is not None or self.twoway is not None) and vq.enabled
            n, nbytes = self._tx_batch(forward)
            if not n:
                return 0
            c.batches += 1
            if not vq.enabled:        # a disabled TX ring is drained and dropped
                c.drop(DropReason.RING_DISABLED, n - (c.drops - d0))
                return n
            c.packets += n - (c.drops - d0)
            c.bytes += nbytes
            return n
        mode = self.port.rx_mode
        counted = 0           # frames counted (and recorded) before the end of the pass
        if mode == "generator":
            if not vq.enabled:
                return 0
            n, nbytes = self._rx_batch(self.frames, self.gen_frames)
        elif mode == "spsc" and self.spsc is not None:
            if not vq.enabled:        # must not supply RX frames: drop them
                if not vq.discard_disabled:
                    return 0          # (or, not enabled yet since it started, leave them)
                dropped = len(self.spsc.peek(self.batch))
                self.spsc.release(dropped)
                if dropped:
                    c.drop(DropReason.RING_DISABLED, dropped)
                return dropped
            n = nbytes = 0
            more = True
            if split_fast.eligible(vq):
                # offload_loop: the slots hold the header too
                h = 0 if self.offload_loop else self.hdr_len
                n, nbytes, more = split_fast.rx_from_ring(vq, self.spsc, h, self.batch, self.cache,
                                                          c, self.hdr_len - h)
                nbytes -= (self.hdr_len - h) * n
            if more:          # a chained or short RX buffer: the general path
                if n and self.progress is not None:
                    # The fast loop has released its frames' slots, the
                    # general path releases its own: a record in between,
                    # so that no record spans two releases (progress.resume)
                    c.packets += n
                    c.bytes += nbytes
                    _progress.note(self)
                    counted, nbytes = n, 0
                n2, b2 = self._rx_from_peek(self.batch - n)
                n += n2
                nbytes += b2
        elif self.port_rx is not None:
            try:
                n, _, nbytes = self.port_rx.pass_once(vq, self.batch, self.cache, split_fast,
                                                      self.mergeable)
            except Exception as exc:   # a user's port must not kill the queue
                log.exception("queue %d: port receive failed", self.index)
                vq.mark_broken(f"port receive raised {type(exc).__name__}: {exc}",
                               BrokenReason.PORT_FAILED)
                return 0
        else:
            return 0
        if n:
            c.batches += 1
            c.packets += n - counted - (c.drops - d0)
            c.bytes += nbytes
        return n

    def _rx_from_peek(self, budget: int) -> tuple:
        """The loopback RX worker's general path: views of the ring's
        frames through :meth:`_rx_batch`; the frames it consumed (delivered
        or dropped) are released."""
        if budget <= 0:
            return 0, 0
        views = self.spsc.peek(budget)
        if not views:
            return 0, 0
        if self.offload_loop:           # header + frame in each slot
            frames = [bytes(v) for v in views]
            n, _, nbytes = deliver(self.vq, frames, self.hdr_len, self.mergeable, self._drop,
                                   self.counters)
        else:
            n, nbytes = self._rx_batch(views)
        del views
        self.spsc.release(n)
        self.spsc.unpeek()          # undelivered frames wait for RX buffers
        return n, nbytes

    def has_work(self) -> bool:
        """Checked after re-enabling notifications, before sleeping."""
        vq = self.vq
        if self.is_tx:
            return (vq.enabled or vq.discard_disabled) and not vq.empty()
        mode = self.port.rx_mode
        if mode == "generator":
            return vq.enabled and not vq.empty()
        if mode == "spsc" and self.spsc is not None:
            if not self.spsc.consumer_prepare_sleep():
                return not vq.empty() or (not vq.enabled and vq.discard_disabled)
            return False
        if self.port_rx is not None:
            self._update_watch()     # the port fd only while nothing waits for buffers
            return bool(self.port_rx.pending) and not vq.empty()
        return False

    def _drain_kick(self) -> None:
        try:
            os.read(self.vq.kick_fd, 8)
            self.counters.kicks += 1
        except (BlockingIOError, InterruptedError):
            pass
        except OSError as exc:     # not an eventfd after all: poll the ring instead
            log.error("queue %d: kick fd unreadable (%s); no longer watched", self.index, exc)
            self._unreadable_kick = self.vq.kick_fd
            self._update_watch()

    #: drops total at the last drop log line (see _sync_counters)
    _drops_logged = 0

    def _sync_counters(self) -> None:
        """Copy the queue's counters and broken state into the published
        counters (a reset queue clears ``broken_reason``), and log the
        drops since the last call, by reason."""
        c, vq = self.counters, self.vq
        c.calls = vq.calls_sent
        c.suppressed = vq.notifications_suppressed
        if vq.broken:
            if c.broken_reason is None:
                c.ring_errors += 1
            c.state = "broken"
            kind = vq.broken_kind
            c.broken_reason = kind.value if kind is not None else BrokenReason.PORT_FAILED.value
            c.broken_detail = vq.broken_reason
        elif c.broken_reason is not None:
            c.broken_reason = c.broken_detail = None
            if c.state == "broken":
                c.state = "idle"
        if c.drops != self._drops_logged:
            self._drops_logged = c.drops
            seen = self.__dict__.setdefault("_drops_seen", {})
            new = {r: n for r, n in c.drops_by_reason.items() if n != seen.get(r, 0)}
            log.info("queue %d: frames dropped: %s", self.index,
                     ", ".join(f"{r.value} +{n - seen.get(r, 0)}" for r, n in new.items()))
            seen.update(new)

    def probe(self) -> bool:
        """Cheap check, while spinning, that a pass would find work: the
        queue runs, the guest made buffers available and (RX) frames wait
        in the loopback ring.  A wrong answer costs only time: the spin
        deadline in :meth:`run` holds across passes that move nothing."""
        vq = self.vq
        if not vq.started or (not vq.enabled and (not self.is_tx or not vq.discard_disabled)):
            return False
        if self.spsc is not None and not self.is_tx and not self.spsc.ready():
            return False
        if self.port_rx is not None and not self.port_rx.ready():
            return False
        return not vq.empty()

    def _spin(self, deadline: float) -> bool:
        """After an empty pass while busy: give the CPU away (a worker
        sharing it may be the one about to produce our next frames) and
        probe, until :meth:`probe` says there is work (True), or the
        monotonic ``deadline`` passes or a command or kick arrives (False).
        A probe that says yes after the deadline counts as no: work a pass
        cannot move (a frame waiting for more RX buffers) must not spin."""
        probe = self.probe
        sched_yield = os.sched_yield
        poll = self._poller.poll
        monotonic = time.monotonic
        i = 0
        while True:
            sched_yield()
            if probe():
                return monotonic() < deadline
            i += 1
            if not i & 15 and (monotonic() >= deadline or poll(0)):
                return False

    def run(self) -> None:
        """Adaptive polling (see the module docstring).  While busy, the
        command channel and the stats clock are looked at every
        ``CHECK_EVERY`` passes, not every pass."""
        chan_fd = self.chan.fileno()
        poll = self._poller.poll
        spin = SPIN_S
        busy = False
        passes = 0
        deadline = 0.0       # end of the current spin; 0: frames moved since
        rechecked = False    # has_work() said yes and no pass has moved frames since
        while self.running:
            if self.active() and self.pass_once():
                if self.progress is not None:
                    _progress.note(self)
                if not busy:
                    busy = True
                    self.vq.set_notification(False)
                deadline = 0.0
                rechecked = False
                passes += 1
                if passes & (CHECK_EVERY - 1):
                    continue
                events = poll(0)
            else:
                if busy and spin:
                    if not deadline:
                        deadline = time.monotonic() + spin
                    if self._spin(deadline):
                        continue
                deadline = 0.0
                if busy:
                    busy = False
                    self.vq.set_notification(True)
                # Re-check once; work that a pass then cannot move (e.g.
                # a frame waiting for more RX buffers) waits for a kick.
                if not rechecked and self.active() and self.has_work():
                    rechecked = True
                    continue
                rechecked = False
                events = poll(IDLE_POLL_MS)
                if self.spsc is not None and not self.is_tx:
                    self.spsc.consumer_woke()
            for fd, ev in events:
                if fd == chan_fd:
                    try:
                        obj, fds = ctl.recv(self.chan)
                    except ctl.ChannelClosed:
                        self.running = False
                        break
                    ctl.send(self.chan, self.handle(obj, fds))
                elif fd == self.vq.kick_fd:
                    self._drain_kick()
                elif self.spsc is not None and fd == self.spsc.doorbell_fd:
                    drain(fd)
            if self.stats is not None:
                self._sync_counters()
                self.stats.maybe_publish(self.counters, time.monotonic())
        if self.stats is not None:
            self._sync_counters()
            self.counters.state = "exited"
            self.stats.publish(self.counters)


def worker_main(index: int, chan, port_name: str, frame_size: int,
                stats_endpoint: Optional[str], log_level: str = "WARNING",
                forked: bool = True, progress_fd: int = -1, die_with_parent: bool = True) -> None:
    """Entry point of a worker process (the ``multiprocess`` target).
    ``chan`` is the worker's end of its command channel (a socket, or its
    fd number).  A ``forked`` worker first closes every fd it inherited
    from the control process; a spawned one started clean."""
    if die_with_parent:     # else: a zygote's child, which exits when its channel closes
        _die_with_parent()
    chan_fd = chan if isinstance(chan, int) else chan.fileno()
    if forked:
        close_fds_except({chan_fd})
    signal.signal(signal.SIGINT, signal.SIG_IGN)       # the control process decides
    signal.signal(signal.SIGTERM, signal.SIG_DFL)
    logsetup.setup(log_level, role=f"worker{index}")   # format inherited (SHARDVU_LOG_FORMAT)
    if isinstance(chan, int):
        chan = socket.socket(fileno=chan_fd)
    page = _progress.ProgressPage(progress_fd) if progress_fd >= 0 else None
    worker = Worker(index, chan, resolve(port_name), frame_size, stats_endpoint, progress=page)
    if page is not None:
        _progress.carry(worker)     # before anything is published: counters never go down
    try:
        worker.run()
    finally:
        if worker.stats is not None:
            worker.stats.close(flush_ms=200)
