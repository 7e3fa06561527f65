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

What is captured: a two-way port's traffic (tap, af_packet, udp,
``module:Class``), as the port sees it: guest TX frames as the worker hands
them to :meth:`Port.send`, and frames for the guest as :meth:`Port.receive`
returns them (before delivery into the guest's RX ring).  The virtio-net
header is not recorded.

Runs on CPython >= 3.9 and PyPy 3.9 (worker code): standard library only.
"""
from __future__ import annotations

import ctypes
import logging
import mmap
import os
import struct
import time
from typing import Dict, Optional, Sequence

from shardvu import eventfd as _efd

from .spsc import HEADER_SIZE, MAGIC, VERSION, SpscRing

__all__ = ["ENV", "SLOTS", "SLOT_SIZE", "SNAPLEN", "REC", "DROPPED_OFF", "create_ring",
           "ring_path", "CaptureRing", "wrap"]

log = logging.getLogger("shardvu.worker")

ENV = "SHARDVU_PCAP_DIR"
SLOTS = 2048
SLOT_SIZE = 2048
REC = struct.Struct("=QI")
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
    that do not fit are counted in :attr:`dropped` (and in the ring)."""

    def __init__(self, ring: SpscRing):
        self.ring = ring
        self.dropped = 0
        self._cell = ctypes.c_int64.from_buffer(ring.mm, DROPPED_OFF)
        self.dropped = self._cell.value

    def record(self, frames: Sequence, hdr_len: int) -> None:
        ts = time.time_ns()
        pack = REC.pack
        end = hdr_len + SNAPLEN
        recs = []
        for f in frames:
            if isinstance(f, (list, tuple)):
                f = b"".join(f)
            recs.append(pack(ts, len(f) - hdr_len) + bytes(f[hdr_len:end]))
        taken = self.ring.push_batch(recs)
        if taken < len(recs):
            self.dropped += len(recs) - taken
            self._cell.value = self.dropped

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
