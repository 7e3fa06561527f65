"""A queue's progress in shared memory, so that a kill -9 of its worker
loses neither frames nor counts.

The control process makes one page per queue (:func:`create`) and keeps
it for its whole life; each worker of the queue (the first, and every
replacement) maps it.  After every pass that moved frames the worker
records, with :meth:`ProgressPage.record`:

* ``generation``: the snapshot generation the ring state belongs to (a
  ring reset makes the rest meaningless for recovery);
* ``avail``: the ring's next avail index, which after a pass is also its
  used index (workers complete buffers in the order they took them);
* ``spsc``: the pair's shared-ring index this worker moves (TX: the
  producer index, RX: the consumer index), or 0;
* ``packets``, ``bytes``, ``drops``: the worker's cumulative counters.

A replacement reads the last record (:meth:`ProgressPage.last`) and, with
the ring's own ``used->idx`` and the shared ring's indices, finishes what
its predecessor was doing when it died (``Worker.recover``), then goes on
counting from the recorded counters: they never go down.

Torn records: a record is 7 int64 fields written into the slot not in use,
then one aligned 8-byte store of the slot number publishes it; a kill
before that store leaves the previous record in force.

Layout (native-endian int64): 0 magic, 8 current slot (0/1), 64 slot 0,
128 slot 1 (each: generation, avail, spsc, packets, bytes, drops, valid).

Runs on Python 3.9 and PyPy 3.9 (worker code).
"""
from __future__ import annotations

import mmap
import os
import stat
import struct
from typing import NamedTuple, Optional

__all__ = ["ProgressPage", "Progress", "create", "SIZE"]

SIZE = 4096
_MAGIC = 0x5348_5650_5247_0001          # "SHVPRG", layout 1
_Q = struct.Struct("q")                 # native: the slot number, one 8-byte store
_REC = struct.Struct("7q")              # generation, avail, spsc, packets, bytes, drops, valid
_CUR_OFF = 8
_SLOT_OFF = (64, 128)


class Progress(NamedTuple):
    generation: int
    avail: int
    spsc: int
    packets: int
    bytes: int
    drops: int


def create() -> int:
    """A fresh, zeroed page: a close-on-exec memfd (the caller owns it)."""
    fd = os.memfd_create("shardvu-progress", 1)      # MFD_CLOEXEC
    try:
        os.ftruncate(fd, SIZE)
        os.pwrite(fd, struct.pack("=q", _MAGIC), 0)
    except BaseException:
        os.close(fd)
        raise
    return fd


class ProgressPage:
    """One worker's mapping of its queue's page; owns ``fd`` once attached."""

    def __init__(self, fd: int):
        st = os.fstat(fd)
        if not stat.S_ISREG(st.st_mode) or st.st_size < SIZE:
            raise ValueError("progress: not a page made by progress.create()")
        self._mm = mmap.mmap(fd, SIZE)
        if _Q.unpack_from(self._mm, 0)[0] != _MAGIC:
            self._mm.close()
            raise ValueError("progress: bad magic")
        self.fd = fd
        #: the slot in force; only this page's worker writes the page, so
        #: the copy here is the page's (a replacement re-reads it)
        self._cur = _Q.unpack_from(self._mm, _CUR_OFF)[0] & 1

    def record(self, generation: int, avail: int, spsc: int, packets: int, nbytes: int,
               drops: int) -> None:
        """Publish a record: the 7 fields into the slot not in force, then
        the slot number (one aligned 8-byte store whose value differs from
        the old one in its lowest byte only, so a kill cannot tear it).
        One ``pack_into`` each: called after every pass that moved frames."""
        nxt = 1 - self._cur
        _REC.pack_into(self._mm, _SLOT_OFF[nxt], generation, avail,
                       spsc - (1 << 64) if spsc >> 63 else spsc, packets, nbytes, drops, 1)
        _Q.pack_into(self._mm, _CUR_OFF, nxt)
        self._cur = nxt

    def last(self) -> Optional[Progress]:
        """The record in force, or None if nothing was ever recorded."""
        cur = _Q.unpack_from(self._mm, _CUR_OFF)[0] & 1
        gen, avail, spsc, packets, nbytes, drops, valid = _REC.unpack_from(self._mm, _SLOT_OFF[cur])
        if valid != 1:
            return None
        return Progress(gen, avail, spsc + (1 << 64) if spsc < 0 else spsc, packets, nbytes, drops)

    def close(self) -> None:
        if self._mm is not None:
            self._mm.close()
            self._mm = None
            os.close(self.fd)


# -- the worker's side ------------------------------------------------------------------
# ``w`` is a workers.worker.Worker; these live here to keep the recovery
# rules in one place.

def note(w) -> None:
    """Record ``w``'s progress after a pass that moved frames."""
    c = w.counters
    spsc = w.spsc
    idx = 0 if spsc is None else (spsc._prod if w.is_tx else spsc._cons)
    w.progress.record(w._generation or 0, w.vq.last_avail_idx, idx, c.packets, c.bytes, c.drops)


def carry(w) -> None:
    """A new worker of the queue goes on from the recorded counters."""
    rec = w.progress.last()
    if rec is not None:
        c = w.counters
        c.packets, c.bytes, c.drops = rec.packets, rec.bytes, rec.drops


def resume(w) -> None:
    """At a worker's first start (after :func:`carry`): finish the batch a
    killed predecessor had under way, and count it.  Once per worker.

    The rings say what happened after the last record (``rec``), with
    ``U`` = ``used->idx`` (the replacement resumes there) and ``done`` =
    ``U - rec.avail``:

    * TX, ``done`` > 0: those chains were completed (and, on the loopback,
      handed to the pair's ring before their used store): counted here.
    * TX loopback, ``done`` = 0 but the producer index moved by ``k``: the
      fast loop handed ``k`` frames on and died before the used store.  The
      chains it took are completed now without handing them on again: the
      first ``m`` chains from ``rec.avail`` that hold the ``k`` frames
      (frames too short or too long for a slot were dropped by the same
      rule, and are counted as drops).
    * RX, ``done`` > 0: those frames were delivered (used store first);
      their slots not yet released (the consumer index may have moved part
      of the way) are released now.

    Exactly once for single-buffer frames (what the fast loops take); a
    chained TX frame (general path: used store, then hand-on) or an RX
    frame spanning MRG_RXBUF buffers may be lost or repeated once if the
    kill lands inside its batch.  Bytes of chains completed after the last
    record are re-read from their descriptors (the guest may already have
    reused them: best effort); packets and drops are exact."""
    if w.resumed:
        return
    w.resumed = True
    if w.vq.mapped:
        # The loop starts idle, with notifications on: a predecessor killed
        # while busy left them off (the driver would not kick, and the new
        # worker would sleep until its idle timeout).
        w.vq.set_notification(True)
    rec = w.progress.last()
    if rec is None:
        return
    c = w.counters
    vq = w.vq
    spsc = w.spsc
    if spsc is not None:
        # attached a while ago (a live upgrade's new worker applied its
        # snapshot while the old one still ran): the shared indices now
        spsc._prod = _u64(spsc._pi.value)
        spsc._cons = _u64(spsc._ci.value)
    if rec.generation != (w._generation or 0) or not vq.mapped or not vq.num:
        return
    if vq.processed_in_order and not vq.inuse and vq.inflight is None:
        # likewise the ring: resume at used->idx as it is now
        vq.used_idx = vq.rings.used16[1]
        vq.last_avail_idx = vq.shadow_avail_idx = vq.used_idx
    used = vq.used_idx
    done = (used - rec.avail) & 0xFFFF
    if done > vq.num:
        return            # not this ring's history (the front-end set a base)
    hdr = w.hdr_len
    if w.is_tx:
        if done:
            c.packets += done
            c.bytes += sum(max(0, n - hdr) for n in _tx_lengths(vq, rec.avail, done))
        elif spsc is not None:
            k = (spsc._prod - rec.spsc) % (1 << 64)
            if 0 < k <= vq.num:
                _complete_pushed(w, k)
    else:
        if done:
            elems = [_used_elem(vq, (rec.avail + i) & 0xFFFF) for i in range(done)]
            c.packets += done
            c.bytes += sum(max(0, n - hdr) for _head, n in elems)
            # One slot per delivered frame: release those not yet released.
            # A pass may release in two steps (the fast loop, then the
            # general path at a slot wrap), so the consumer index may have
            # moved part of the way.
            if spsc is not None and not w.mergeable:
                released = (spsc._cons - rec.spsc) % (1 << 64)
                if released < done:
                    spsc.consumed(rec.spsc + done)


def _u64(v: int) -> int:
    return v + (1 << 64) if v < 0 else v


def _tx_lengths(vq, start: int, n: int) -> list:
    desc32, avail16, num = vq.rings.desc32, vq.rings.avail16, vq.num
    out = []
    for i in range(n):
        head = avail16[2 + ((start + i) & (num - 1))]
        out.append(desc32[(head << 2) + 2] if head < num else 0)
    return out


def _used_elem(vq, idx: int) -> tuple:
    off = 4 + 8 * (idx & (vq.num - 1))
    return struct.unpack_from("=II", vq._used, off)


_F_NEXT, _F_WRITE, _F_INDIRECT = 1, 2, 4


def _complete_pushed(w, k: int) -> None:
    """The fast TX loop's rule, replayed: a single device-readable buffer
    of header + at most a slot's frame was handed on; any other simple
    buffer was dropped.  Complete chains until ``k`` handed-on ones."""
    vq, c, hdr = w.vq, w.counters, w.hdr_len
    rings, num = vq.rings, vq.num
    maxf = w.spsc.max_frame
    start = vq.last_avail_idx
    m = pushed = nbytes = 0
    while pushed < k and m < num:
        head = rings.avail16[2 + ((start + m) & (num - 1))]
        if head >= num or rings.desc16[(head << 3) + 6] & (_F_NEXT | _F_WRITE | _F_INDIRECT):
            break          # not the fast loop's: it would have stopped here
        flen = rings.desc32[(head << 2) + 2] - hdr
        if 0 <= flen <= maxf:
            pushed += 1
            nbytes += flen
        m += 1
    if pushed != k:
        return            # the ring does not tell this story: leave it to the walk
    for j in range(m):
        elem = vq.pop()
        if elem is None:
            return
        vq.fill(elem, 0, j)
    vq.flush(m)
    vq.notify()
    c.packets += m
    c.bytes += nbytes
    c.drops += m - k
