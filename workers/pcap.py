"""The workers' side of ``--pcap FILE``: each worker copies the frames it
moves into a capture ring of its own, which the capture process
(:mod:`shardvu.control.capture`) drains into the pcapng file.

One ring per queue, a file ``q<INDEX>`` in the capture directory (a private
directory under /dev/shm named by the environment variable
``SHARDVU_PCAP_DIR``, which workers inherit).  The file has the layout of
:class:`shardvu.workers.spsc.SpscRing`; the worker is its only producer,
the capture process its only consumer, and nobody rings the doorbell: the
capture process polls.  Each slot holds one record::

    0   timestamp, ns since the epoch   u64
    8   the frame's length on the wire  u32
    12  the frame's first bytes (up to the slot's room: SNAPLEN)

The producer also keeps, at byte 72 of the ring (its own cache line, next
to the producer index), the number of frames it could not record because
the ring was full: capture never waits for the writer, it drops and counts.

What is captured, on every port: each queue's frames at the port's edge,
without the virtio-net header.

* Outbound (TX queue ``2i+1``): every frame the guest sent that the ring
  rules accepted (short and oversize frames are dropped before any port
  sees them), as the worker hands it on: to :meth:`Port.send` (two-way
  ports), to the pair's loopback ring or port function, or to the sink.
  So records = the queue's ``packets`` + the drops its port made (a full
  loopback ring).  A disabled TX ring's frames, drained and dropped, are
  not captured.
* Inbound (RX queue ``2i``): every frame handed to the guest's RX ring:
  as :meth:`Port.receive` returns it (two-way ports), or as the RX worker
  consumes it from the pair's loopback ring or the generator (delivered,
  or dropped by the RX policy).  So records = ``packets`` + RX policy drops.

How, without slowing the ring loops when capture is off: :func:`install`
runs once in each worker at start and does nothing unless
``SHARDVU_PCAP_DIR`` is set.  When it is, it gives that one worker
capture-aware batch functions (instance attributes over the class's
``_tx_batch`` / ``pass_once``) that take frames as views
(:func:`split_fast.tx_pass` with a callback, the loopback ring's
:meth:`~SpscRing.peek`), record them, then move them on as usual; the
zero-view loops (``tx_to_ring``, ``rx_from_ring``) are not used then.
Two-way ports are captured by :func:`wrap` around their send/receive.

Runs on CPython >= 3.9 and PyPy 3.9 (worker code): standard library only.
"""
from __future__ import annotations

import ctypes
import logging
import mmap
import os
import struct
import time
from typing import Dict, Optional, Sequence, Tuple

from shardvu import eventfd as _efd
from shardvu.ringrules import MAX_FRAME

from .spsc import DATA_OFF, HEADER_SIZE, MAGIC, VERSION, SpscRing

__all__ = ["ENV", "SLOTS", "SLOT_SIZE", "SNAPLEN", "REC", "DROPPED_OFF", "create_ring",
           "ring_path", "CaptureRing", "wrap", "install"]

log = logging.getLogger("shardvu.worker")

ENV = "SHARDVU_PCAP_DIR"
SLOTS = 2048
SLOT_SIZE = 2048
REC = struct.Struct("=QI")
#: a slot's length (u32 at the slot's start, as SpscRing lays it), its
#: unused headroom, then the record's header at DATA_OFF: one pack_into
_SLOT_HEAD = struct.Struct(f"=I{DATA_OFF - 4}x" + REC.format.lstrip("="))
#: bytes of each frame recorded (the rest is cut: caplen < len)
SNAPLEN = SLOT_SIZE - 16 - REC.size
#: the producer's count of frames dropped for a full ring (u64)
DROPPED_OFF = 72


def ring_path(directory: str, index: int) -> str:
    return os.path.join(directory, f"q{index}")


def create_ring(path: str, slots: int = SLOTS, slot_size: int = SLOT_SIZE) -> None:
    """Make an empty capture ring file at ``path`` (mode 0600)."""
    fd = os.open(path, os.O_RDWR | os.O_CREAT | os.O_EXCL | os.O_CLOEXEC, 0o600)
    try:
        size = HEADER_SIZE + slots * slot_size
        os.ftruncate(fd, size)
        with mmap.mmap(fd, size) as mm:
            struct.pack_into("=8sIII", mm, 0, MAGIC, VERSION, slots, slot_size)
    finally:
        os.close(fd)


def open_ring(path: str) -> SpscRing:
    """Map the capture ring at ``path`` (either side); ValueError/OSError
    if it is not one."""
    fd = os.open(path, os.O_RDWR | os.O_CLOEXEC)
    bell = _efd.eventfd()           # unused: the consumer polls
    try:
        return SpscRing.attach(fd, bell)
    except BaseException:
        os.close(fd)
        os.close(bell)
        raise


class CaptureRing:
    """A worker's producer end of its capture ring.

    Contract: :meth:`record` copies at most SNAPLEN bytes of each frame
    (after ``hdr_len`` header bytes) into the ring and never waits; frames
    that do not fit are counted in :attr:`dropped` (and in the ring).  The
    free slots are looked up first: a full ring costs one index read, not
    one record per frame."""

    def __init__(self, ring: SpscRing):
        self.ring = ring
        self._cell = ctypes.c_int64.from_buffer(ring.mm, DROPPED_OFF)
        self.dropped = self._cell.value

    def record(self, frames: Sequence, hdr_len: int) -> None:
        ring = self.ring
        prod, room = ring.produce_window()
        k = len(frames)
        if room < k:
            self.dropped += k - room
            self._cell.value = self.dropped
            k = room
            if not k:
                return
        ts = time.time_ns()
        buf, ssize, mask = ring.buf, ring.slot_size, ring.mask
        pack_into = _SLOT_HEAD.pack_into
        rec = DATA_OFF + REC.size           # the frame's bytes in the slot
        end = hdr_len + SNAPLEN
        for i in range(k):
            f = frames[i]
            if isinstance(f, (list, tuple)):
                f = b"".join(f)
            cut = f[hdr_len:end]
            n = len(cut)
            off = HEADER_SIZE + ((prod + i) & mask) * ssize
            pack_into(buf, off, REC.size + n, ts, len(f) - hdr_len)
            buf[off + rec:off + rec + n] = cut
        ring.publish(prod + k)

    def close(self) -> None:
        self._cell = None
        self.ring.close()


_rings: Dict[int, Optional[CaptureRing]] = {}


def _ring_for(index: int) -> Optional[CaptureRing]:
    if index in _rings:
        return _rings[index]
    directory = os.environ.get(ENV)
    ring = None
    if directory:
        try:
            ring = CaptureRing(open_ring(ring_path(directory, index)))
        except (OSError, ValueError) as exc:
            log.error("queue %d: no capture ring (%s): this queue is not captured", index, exc)
    _rings[index] = ring
    return ring


def wrap(port, index: int) -> None:
    """When capture is on (``SHARDVU_PCAP_DIR`` set), make ``port`` (a
    two-way port object of queue ``index``) record its frames: the TX
    worker's :meth:`send` batches, the RX worker's :meth:`receive` results."""
    if not os.environ.get(ENV):
        return
    cap = _ring_for(index)
    if cap is None:
        return
    if port.tx:
        send = port.send

        def captured_send(frames):
            cap.record(frames, port.hdr_len)
            return send(frames)
        port.send = captured_send
    else:
        receive = port.receive

        def captured_receive(budget):
            out = receive(budget)
            if out:
                cap.record(out, port.hdr_len)
            return out
        port.receive = captured_receive


def install(worker) -> None:
    """When capture is on (``SHARDVU_PCAP_DIR`` set), route ``worker``'s
    batches through capture-aware paths (see the module docstring); when it
    is off, or the worker's port is two-way (:func:`wrap` captures those),
    nothing changes.  Called once, when the worker is made."""
    if not os.environ.get(ENV) or worker.port.two_way is not None:
        return
    if not worker.is_tx and worker.port.rx_mode not in ("spsc", "generator"):
        return                              # an idle RX queue moves nothing
    cap = _ring_for(worker.index)
    if cap is None:
        return
    paths = _Paths(worker, cap)
    if worker.is_tx:
        worker._tx_batch = paths.tx_batch
    else:
        worker.pass_once = paths.rx_pass_once


class _Paths:
    """One worker's capture-aware batch functions.  They keep the
    contracts of the worker's own (``Worker._tx_batch``,
    ``Worker.pass_once``) and its counting."""

    def __init__(self, worker, cap: CaptureRing):
        from . import worker as _wmod
        self.w = worker
        self.cap = cap
        self.fast = _wmod.split_fast        # the loops this interpreter's worker uses
        self.loop = _wmod.split_loop
        self.deliver = _wmod.deliver
        self.base_tx = worker._tx_batch     # the class's, bound: disabled rings
        self.base_pass = worker.pass_once

    # -- TX -------------------------------------------------------------------------
    def _record(self, frames) -> None:
        self.cap.record(frames, 0)

    def _record_forward(self, frames) -> None:
        self.cap.record(frames, 0)
        self.w._forward(frames)

    def _record_offload(self, frames) -> None:
        w = self.w
        self.cap.record(frames, w.hdr_len)  # header + frame: the header is not recorded
        w._loop_offload(frames)

    def tx_batch(self, forward: bool) -> Tuple[int, int]:
        """``Worker._tx_batch`` recording every frame taken: views of the
        fast loop's frames (or the general path's copies) are recorded, then
        forwarded (``forward``) or dropped (a sink)."""
        w = self.w
        vq = w.vq
        if not vq.enabled:              # drained and dropped: not traffic
            return self.base_tx(forward)
        spsc = w.spsc
        loopback = forward and w.port.identity and spsc is not None
        if loopback and w.offload_loop:
            return w._tx_two_way(self._record_offload, spsc.max_frame)
        on_frames = self._record_forward if forward else self._record
        max_frame = spsc.max_frame if loopback else MAX_FRAME
        h, c, budget = w.hdr_len, w.counters, w.batch
        n = nbytes = 0
        if self.fast.eligible(vq):
            n, nbytes, more = self.fast.tx_pass(vq, h, budget, w.cache, on_frames, c, max_frame)
            if not more:
                return n, nbytes
        n2, b2, frames = self.loop.tx_pass(vq, h, budget - n, True, c, max_frame)
        if frames:
            on_frames(frames)
        return n + n2, nbytes + b2

    # -- RX -------------------------------------------------------------------------
    def rx_pass_once(self) -> int:
        """``Worker.pass_once`` for a generator or loopback (ring) RX queue,
        recording each frame it consumes; what moves nothing (a disabled
        ring, no ring yet) is the worker's own."""
        w = self.w
        vq, c = w.vq, w.counters
        if not vq.enabled or (w.port.rx_mode == "spsc" and w.spsc is None):
            return self.base_pass()
        d0 = c.drops
        if w.port.rx_mode == "generator":
            n, nbytes = w._rx_batch(w.frames, w.gen_frames)
            if n:
                self.cap.record(w.frames[:n], 0)
        else:
            n, nbytes = self._rx_from_ring()
        if n:
            c.batches += 1
            c.packets += n - (c.drops - d0)
            c.bytes += nbytes
        return n

    def _rx_from_ring(self) -> Tuple[int, int]:
        """The loopback ring's frames, as views, into the guest's RX ring:
        those consumed are recorded before their slots are released."""
        w = self.w
        spsc = w.spsc
        views = spsc.peek(w.batch)
        if not views:
            return 0, 0
        if w.offload_loop:              # header + frame in each slot
            frames = [bytes(v) for v in views]
            n, _, nbytes = self.deliver(w.vq, frames, w.hdr_len, w.mergeable, w._drop)
            h = w.hdr_len
        else:
            frames = views
            n, nbytes = w._rx_batch(views)
            h = 0
        if n:
            self.cap.record(frames[:n], h)
        del views, frames
        spsc.release(n)
        spsc.unpeek()                   # undelivered frames wait for RX buffers
        return n, nbytes
