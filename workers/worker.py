"""A worker process: owns one virtqueue's data path.

The control process forwards, over the worker's command channel
(:mod:`shardvu.workers.ctl`), everything the queue needs: the guest memory
fds (mapped here), ring size, addresses and base, features, the kick, call
and err eventfds, the dirty log and the inflight buffer.  The worker runs the
ring loop; the control process never touches ring memory on the data path.

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
from shardvu.inflight import InflightBuffer
from shardvu.memory import GuestMemory, MemoryMapError
from shardvu.net import net_hdr_len
from shardvu.virtqueue import RingError, VirtQueue

from . import ctl
from .ports import PortSpec, make_frame, resolve
from . import split_loop
# One hot loop per interpreter style (see bench/ringloop.py for the numbers).
if sys.implementation.name == "pypy":
    from . import split_fast_struct as split_fast
else:
    from . import split_fast
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


def _close_inherited(keep: set) -> None:
    """A forked worker inherits every fd of the control process; keep only
    what it needs, so that fds closed there are really closed."""
    for name in os.listdir("/proc/self/fd"):
        fd = int(name)
        if fd > 2 and fd not in keep:
            try:
                os.close(fd)
            except OSError:
                pass


class Worker:
    """One virtqueue's data path, driven by commands from the control process."""

    def __init__(self, index: int, chan: socket.socket, port: PortSpec, frame_size: int,
                 stats_endpoint: Optional[str], batch: int = BATCH):
        self.index = index
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
        self.running = True

    # -- commands -----------------------------------------------------------------
    def handle(self, obj: Dict[str, Any], fds: List[int]) -> Dict[str, Any]:
        cmd = obj.get("cmd", "")
        fn = getattr(self, "_cmd_" + cmd, None)
        try:
            if fn is None:
                raise ValueError(f"unknown command {cmd!r}")
            reply = fn(obj, fds) or {}      # a command clears the fds it keeps
            reply["ok"] = True
            return reply
        except (ValueError, OSError, MemoryMapError, RingError) as exc:
            return {"ok": False, "error": f"{cmd}: {exc}"}
        finally:
            for fd in fds:          # whatever a command did not keep
                os.close(fd)
            self._update_watch()

    def _remap(self) -> None:
        vq = self.vq
        if vq.num and vq.addr is not None and len(self.mem):
            try:
                vq.map_rings()
            except RingError as exc:
                log.warning("queue %d: %s", self.index, exc)

    def _cmd_mem_clear(self, obj, fds):
        self.cache = split_fast.RegionCache(self.mem)     # drop views of old regions
        self.vq.unmap_rings()
        self.mem.clear()

    def _cmd_mem_add(self, obj, fds):
        self.cache = split_fast.RegionCache(self.mem)     # drop views of old regions
        regions = obj["regions"]
        if len(regions) != len(fds):
            raise ValueError(f"{len(regions)} regions with {len(fds)} fds")
        self.vq.unmap_rings()
        taken = list(fds)
        fds.clear()
        for i, (r, fd) in enumerate(zip(regions, taken)):
            try:
                self.mem.add(P.MemoryRegion(*r), fd)
            except MemoryMapError:
                for rest in taken[i + 1:]:
                    os.close(rest)
                raise
        self._remap()

    def _cmd_mem_rem(self, obj, fds):
        self.cache = split_fast.RegionCache(self.mem)     # drop views of old regions
        self.vq.unmap_rings()
        self.mem.remove(P.MemoryRegion(*obj["region"]))
        self._remap()

    def _cmd_ring(self, obj, fds):
        vq = self.vq
        vq.num = obj["num"]
        vq.addr = P.VringAddr(*obj["addr"]) if obj.get("addr") else None
        if obj.get("base") is not None:
            vq.set_base(obj["base"])
        self._set_features(obj["features"])
        vq.enable = bool(obj["enable"])
        vq.processed_in_order = bool(obj.get("in_order", False))
        self._remap()

    def _set_features(self, features: int) -> None:
        self.vq.features = features
        self.hdr_len = net_hdr_len(features)
        self.rx_hdr = split_fast.rx_header(self.hdr_len)
        self.gen_frames = [self.rx_hdr + self.frame] * self.batch
        self.mergeable = bool(features >> P.VIRTIO_NET_F_MRG_RXBUF & 1)
        self._set_headroom()

    def _set_headroom(self) -> None:
        # the loopback RX worker copies header + frame out of a slot at once
        if self.is_tx and self.spsc is not None:
            self.spsc.set_headroom(self.rx_hdr)

    def _cmd_features(self, obj, fds):
        self._set_features(obj["features"])
        if obj.get("enable_all"):
            self.vq.enable = True

    def _cmd_enable(self, obj, fds):
        on = bool(obj["on"])
        if not on:
            self._drain_tx()       # frames queued while enabled are still traffic
        self.vq.enable = on

    def _drain_tx(self) -> None:
        """Before a TX ring is disabled or stopped, consume what the guest
        already queued (bounded by the ring size), so nothing it counted as
        sent is silently left behind."""
        if self.is_tx and self.active():
            for _ in range(self.vq.num // self.batch + 2):
                if not self.pass_once():
                    break

    def _cmd_fd(self, obj, fds):
        kind = obj["kind"]
        if kind not in ("kick", "call", "err"):
            raise ValueError(f"bad fd kind {kind!r}")
        if len(fds) > 1:
            raise ValueError(f"{len(fds)} fds for one {kind} fd")
        name = kind + "_fd"
        old = getattr(self.vq, name)
        if old >= 0:
            os.close(old)
        setattr(self.vq, name, fds[0] if fds else -1)
        fds.clear()

    def _cmd_start(self, obj, fds):
        vq = self.vq
        vq.started = True
        # Setup is done: move what exists now out of the collector's way,
        # so the ring loop's rare collections scan only new objects.
        gc.collect()
        if hasattr(gc, "freeze"):       # CPython 3.7+; PyPy's gc has none
            gc.freeze()
        if vq.inflight is not None and vq.ready():
            vq.check_inflight()
        self.counters.state = "running"

    def _cmd_stop(self, obj, fds):
        vq = self.vq
        self._drain_tx()
        vq.started = False
        for name in ("kick_fd", "call_fd"):
            fd = getattr(vq, name)
            if fd >= 0:
                os.close(fd)
                setattr(vq, name, -1)
        self.counters.state = "stopped"
        return {"base": vq.last_avail_idx}

    def _cmd_log(self, obj, fds):
        if self.dlog is not None:
            self.dlog.close()
            self.dlog = None
        if fds:
            (fd,) = fds
            fds.clear()
            self.dlog = DirtyLog(fd, obj["size"], obj["offset"])
            # every worker marks the same log: serialise on the log file itself
            self.dlog.lock = FileLock(self.dlog.fd)
        self.vq.log = self.dlog
        self._cmd_log_call(obj, [])

    def _cmd_log_call(self, obj, fds):
        if fds:
            if self._log_call_fd >= 0:
                os.close(self._log_call_fd)
            self._log_call_fd = fds[0]
            fds.clear()
        if self.dlog is not None:
            self.dlog.call_fd = self._log_call_fd

    def _cmd_inflight(self, obj, fds):
        if self.inflight is not None:
            self.inflight.close()
            self.inflight = None
            self.vq.inflight = None
        if fds:
            (fd,) = fds
            fds.clear()
            self.inflight = InflightBuffer.map(fd, obj["size"], obj["offset"],
                                               obj["num_queues"], obj["queue_size"])
            if self.index < self.inflight.num_queues:
                self.vq.inflight = self.inflight.queue(self.index)

    def _cmd_spsc(self, obj, fds):
        from .spsc import SpscRing
        ring_fd, bell_fd = fds
        fds.clear()
        self.spsc = SpscRing.attach(ring_fd, bell_fd)
        self._set_headroom()

    def _cmd_reset(self, obj, fds):
        vq = self.vq
        for name in ("kick_fd", "call_fd", "err_fd"):
            fd = getattr(vq, name)
            if fd >= 0:
                os.close(fd)
                setattr(vq, name, -1)
        vq.reset()
        vq.features = 0
        self.cache = split_fast.RegionCache(self.mem)
        self.mem.clear()
        self._cmd_log({}, [])
        if self._log_call_fd >= 0:
            os.close(self._log_call_fd)
            self._log_call_fd = -1
        self._cmd_inflight({}, [])
        self.counters.state = "idle"

    def _cmd_stats(self, obj, fds):
        return {"counters": self.counters.as_dict()}

    def _cmd_exit(self, obj, fds):
        self.running = False

    # -- the loop --------------------------------------------------------------------
    def _update_watch(self) -> None:
        want = set()
        if self.vq.kick_fd >= 0:
            want.add(self.vq.kick_fd)
        if self.spsc is not None and not self.is_tx:
            want.add(self.spsc.doorbell_fd)
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
        frames go through the port function to the pair's RX worker."""
        vq = self.vq
        on_frames = self._forward if forward else None
        n = nbytes = 0
        if split_fast.eligible(vq):
            if forward and self.port.identity and self.spsc is not None:
                # loopback: straight into the pair's ring, no port call
                n, nbytes, dropped, more = split_fast.tx_to_ring(
                    vq, self.hdr_len, self.batch, self.cache, self.spsc)
                self.counters.drops += dropped
                if n > dropped:
                    self.spsc.producer_notify()
            else:
                n, nbytes, more = split_fast.tx_pass(vq, self.hdr_len, self.batch, self.cache, on_frames)
            if not more:
                return n, nbytes
        n2, b2, frames = split_loop.tx_pass(vq, self.hdr_len, self.batch - n, forward)
        if frames:
            self._forward(frames)
        return n + n2, nbytes + b2

    def _forward(self, frames) -> None:
        """Run the port function on a batch (views or bytes) and hand its
        result to the pair's RX worker; what does not fit is dropped."""
        port = self.port
        try:
            out = frames if port.identity else port.tx_fn([bytes(f) for f in frames])
        except Exception as exc:   # a user's port must not kill the queue
            log.exception("queue %d: port function failed", self.index)
            self.vq.mark_broken(f"port function raised {type(exc).__name__}: {exc}")
            return
        if out and self.spsc is not None:
            pushed = self.spsc.push_batch(out)
            self.counters.drops += len(out) - pushed
            if pushed:
                self.spsc.producer_notify()

    def _rx_batch(self, frames, with_hdr=None) -> tuple:
        """Deliver ``frames``; ``with_hdr``, if given, is the same frames
        with the virtio-net header already in front (the fast loop then
        copies each once)."""
        vq = self.vq
        n = nbytes = 0
        if split_fast.eligible(vq):
            if with_hdr is not None:
                n, nbytes, more = split_fast.rx_pass(vq, with_hdr, b"", self.cache)
                nbytes -= n * len(self.rx_hdr)
            else:
                n, nbytes, more = split_fast.rx_pass(vq, frames, self.rx_hdr, self.cache)
            if not more:
                return n, nbytes
            frames = frames[n:]
        n2, b2 = split_loop.rx_pass(vq, frames, self.hdr_len, self.mergeable)
        return n + n2, nbytes + b2

    def pass_once(self) -> int:
        """One batch; returns how many frames it moved (or dropped)."""
        vq = self.vq
        c = self.counters
        if self.is_tx:
            forward = self.port.tx_fn is not None and vq.enabled
            n, nbytes = self._tx_batch(forward)
            if not n:
                return 0
            c.batches += 1
            if not vq.enabled:
                c.drops += n          # a disabled TX ring is drained and dropped
                return n
            c.packets += n
            c.bytes += nbytes
            return n
        mode = self.port.rx_mode
        if mode == "generator":
            if not vq.enabled:
                return 0
            n, nbytes = self._rx_batch(self.frames, self.gen_frames)
        elif mode == "spsc" and self.spsc is not None:
            if not vq.enabled:        # must not supply RX frames: drop them
                dropped = len(self.spsc.peek(self.batch))
                self.spsc.release(dropped)
                c.drops += dropped
                return dropped
            n = nbytes = 0
            more = True
            if split_fast.eligible(vq):
                n, nbytes, more = split_fast.rx_from_ring(vq, self.spsc, self.hdr_len,
                                                          self.batch, self.cache)
            if more:          # a chained or short RX buffer: the general path
                n2, b2 = self._rx_from_peek(self.batch - n)
                n += n2
                nbytes += b2
        else:
            return 0
        if n:
            c.batches += 1
            c.packets += n
            c.bytes += nbytes
        return n

    def _rx_from_peek(self, budget: int) -> tuple:
        """The loopback RX worker's general path: views of the ring's
        frames through :meth:`_rx_batch`."""
        if budget <= 0:
            return 0, 0
        views = self.spsc.peek(budget)
        if not views:
            return 0, 0
        n, nbytes = self._rx_batch(views)
        del views
        self.spsc.release(n)
        self.spsc.unpeek()          # undelivered frames wait for RX buffers
        return n, nbytes

    def has_work(self) -> bool:
        """Checked after re-enabling notifications, before sleeping."""
        vq = self.vq
        if self.is_tx:
            return not vq.empty()
        mode = self.port.rx_mode
        if mode == "generator":
            return vq.enabled and not vq.empty()
        if mode == "spsc" and self.spsc is not None:
            if not self.spsc.consumer_prepare_sleep():
                return not vq.empty() or not vq.enabled
            return False
        return False

    def _drain_kick(self) -> None:
        try:
            os.read(self.vq.kick_fd, 8)
            self.counters.kicks += 1
        except (BlockingIOError, InterruptedError):
            pass

    def _sync_counters(self) -> None:
        c, vq = self.counters, self.vq
        c.calls = vq.calls_sent
        c.suppressed = vq.notifications_suppressed
        if vq.broken:
            c.ring_errors = 1
            c.state = "broken"
            c.broken_reason = vq.broken_reason

    def probe(self) -> bool:
        """Cheap check, while spinning, that a pass would find work: the
        queue runs, the guest made buffers available and (RX) frames wait
        in the loopback ring.  A wrong answer costs only time: the spin
        deadline in :meth:`run` holds across passes that move nothing."""
        vq = self.vq
        if not vq.started or (not self.is_tx and not vq.enabled):
            return False
        if self.spsc is not None and not self.is_tx and not self.spsc.ready():
            return False
        return not vq.empty()

    def _spin(self, deadline: float) -> bool:
        """After an empty pass while busy: give the CPU away (a worker
        sharing it may be the one about to produce our next frames) and
        probe, until :meth:`probe` says there is work (True), or the
        monotonic ``deadline`` passes or a command or kick arrives (False)."""
        probe = self.probe
        sched_yield = os.sched_yield
        poll = self._poller.poll
        monotonic = time.monotonic
        i = 0
        while True:
            sched_yield()
            if probe():
                return True
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
                forked: bool = True) -> None:
    """Entry point of a worker process (the ``multiprocess`` target).
    ``chan`` is the worker's end of its command channel (a socket, or its
    fd number).  A ``forked`` worker first closes every fd it inherited
    from the control process; a spawned one started clean."""
    _die_with_parent()
    chan_fd = chan if isinstance(chan, int) else chan.fileno()
    if forked:
        _close_inherited({chan_fd})
    signal.signal(signal.SIGINT, signal.SIG_IGN)       # the control process decides
    signal.signal(signal.SIGTERM, signal.SIG_DFL)
    logsetup.setup(log_level, role=f"worker{index}")   # format inherited (SHARDVU_LOG_FORMAT)
    if isinstance(chan, int):
        chan = socket.socket(fileno=chan_fd)
    worker = Worker(index, chan, resolve(port_name), frame_size, stats_endpoint)
    try:
        worker.run()
    finally:
        if worker.stats is not None:
            worker.stats.close(flush_ms=200)
