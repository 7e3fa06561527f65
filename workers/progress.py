"""A queue's progress in shared memory, so that a kill -9 of its worker
loses neither frames nor counts.

The control process makes one page per queue (:func:`create`) and keeps
it for its whole life; each worker of the queue (the first, and every
replacement) maps it.  After every pass that moved frames the worker
records (an RX pass also between its fast loop's part and the general
path's, so that no record spans two releases of the pair's ring), with
:meth:`ProgressPage.record`:

* ``generation``: the snapshot generation the ring state belongs to (a
  ring reset makes the rest meaningless for recovery);
* ``avail``: the ring's next avail index, which after a pass is also its
  used index (workers complete buffers in the order they took them);
* ``spsc``: the pair's shared-ring index this worker moves (TX: the
  producer index, RX: the consumer index), or 0;
* ``packets``, ``bytes``, ``drops``: the worker's cumulative counters.

A replacement reads the last record (:meth:`ProgressPage.last`) and, with
the ring's own ``used->idx`` and the shared ring's indices, finishes what
its predecessor was doing when it died (:func:`resume`), then goes on
counting from the recorded counters: they never go down.

* every other counter (kicks, calls, suppressed, batches, ring_errors,
  the casts, the size bins; drops by reason), so that none is lost either.

Torn records: a record is written into the slot not in use, then one
aligned 8-byte store of the slot number publishes it; a kill before that
store leaves the previous record in force.  A slot's drops by reason are
rewritten only when the drops total differs from the one they were
written with (they change only with it), so a record costs one
``pack_into`` of fixed arity and the slot number's store.

Layout (native-endian int64): 0 magic, 8 current slot (0/1), 64 slot 0,
320 slot 1 (each: generation, avail, spsc, packets, bytes, drops, kicks,
calls, suppressed, batches, ring_errors, broadcast, multicast, the 7 size
bins, valid), 1024 slot 0's drops by reason, 1536 slot 1's (each: the
drops total they add up to, then one count per DropReason, in its order).

Runs on Python 3.9 and PyPy 3.9 (worker code).
"""
from __future__ import annotations

import mmap
import os
import stat
import struct
from typing import NamedTuple, Optional

from shardvu.framestats import add_lengths
from shardvu.reasons import DropReason

from .stats import SIZE_BINS

__all__ = ["ProgressPage", "Progress", "create", "SIZE"]

SIZE = 4096
_MAGIC = 0x5348_5650_5247_0002          # "SHVPRG", layout 2
_Q = struct.Struct("q")                 # native: the slot number, one 8-byte store
_REC = struct.Struct("21q")             # see the layout above; valid last
_CUR_OFF = 8
_SLOT_OFF = (64, 320)
_REASONS = tuple(DropReason)
_WHY = struct.Struct(f"{1 + len(_REASONS)}q")   # drops total, then per reason
_WHY_OFF = (1024, 1536)
assert len(SIZE_BINS) == 7                # the record's fixed arity


class Progress(NamedTuple):
    generation: int
    avail: int
    spsc: int
    packets: int
    bytes: int
    drops: int
    #: (kicks, calls, suppressed, batches, ring_errors, broadcast, multicast)
    scalars: tuple = ()
    sizes: tuple = ()
    #: {DropReason: n}, or None if the slot's were not written for its drops
    by_reason: Optional[dict] = None


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
        #: per slot, the drops total its drops by reason were written with
        self._why_drops: list = [None, None]

    def record(self, generation: int, avail: int, spsc: int, counters) -> None:
        """Publish a record of ``counters`` (a workers.stats.Counters) and
        the ring positions: the fields into the slot not in force, then the
        slot number (one aligned 8-byte store whose value differs from the
        old one in its lowest byte only, so a kill cannot tear it).  One
        ``pack_into`` per part: called after every pass that moved frames."""
        nxt = 1 - self._cur
        c = counters
        s = c.sizes
        mm = self._mm
        drops = c.drops
        if self._why_drops[nxt] != drops:
            by = c.drops_by_reason
            _WHY.pack_into(mm, _WHY_OFF[nxt], drops, *[by[r] for r in _REASONS])
            self._why_drops[nxt] = drops
        _REC.pack_into(mm, _SLOT_OFF[nxt], generation, avail,
                       spsc - (1 << 64) if spsc >> 63 else spsc, c.packets, c.bytes, drops,
                       c.kicks, c.calls, c.suppressed, c.batches, c.ring_errors,
                       c.broadcast_packets, c.multicast_packets,
                       s[0], s[1], s[2], s[3], s[4], s[5], s[6], 1)
        _Q.pack_into(mm, _CUR_OFF, nxt)
        self._cur = nxt

    def last(self) -> Optional[Progress]:
        """The record in force, or None if nothing was ever recorded."""
        cur = _Q.unpack_from(self._mm, _CUR_OFF)[0] & 1
        # A page mapped while the previous worker still recorded (a live
        # upgrade's new worker) learns the slot in force here, at its start
        # (resume), before its first record.
        self._cur = cur
        f = _REC.unpack_from(self._mm, _SLOT_OFF[cur])
        if f[20] != 1:
            return None
        why = _WHY.unpack_from(self._mm, _WHY_OFF[cur])
        spsc = f[2]
        return Progress(f[0], f[1], spsc + (1 << 64) if spsc < 0 else spsc, f[3], f[4], f[5],
                        f[6:13], f[13:20],
                        dict(zip(_REASONS, why[1:])) if why[0] == f[5] else None)

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
    w.progress.record(w._generation or 0, w.vq.last_avail_idx, idx, c)


def carry(w) -> None:
    """A new worker of the queue goes on from the recorded counters."""
    rec = w.progress.last()
    if rec is not None:
        c = w.counters
        c.packets, c.bytes, c.drops = rec.packets, rec.bytes, rec.drops
        (c.kicks, c.calls, c.suppressed, c.batches, c.ring_errors, c.broadcast_packets,
         c.multicast_packets) = rec.scalars
        c.sizes = list(rec.sizes)
        if rec.by_reason is not None:
            c.drops_by_reason.update(rec.by_reason)


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
    * RX, ``done`` > 0: those buffers were filled (used store first).  A
      record spans at most one release of the pair's ring's slots, which
      comes after the used stores of the frames it releases (the RX pass
      records between its fast loop's part and the general path's).  So
      if the consumer index moved since the record, every frame delivered
      since was released; if not, none was, and they are the oldest
      frames waiting in the ring: matched by length against the used
      elements (:func:`_delivered`: one buffer a frame, or several with
      MRG_RXBUF), then released now.

    Exactly once, also for RX frames spanning MRG_RXBUF buffers, except a
    chained TX frame (general path: used store, then hand-on), which may
    be lost or repeated once if the kill lands inside its batch, and an RX
    frame the dead worker dropped (no RX buffer it fits in), after which
    the frames of its batch are delivered again.  Bytes of TX chains
    completed after the last record are re-read from their descriptors
    (the guest may already have reused them: best effort), RX bytes come
    from the used elements; packets and drops are exact.

    The state a worker starts from is recorded at once (also the first
    worker's), so that a worker killed before its first pass's record
    leaves its own starting point behind."""
    if w.resumed:
        return
    w.resumed = True
    if w.vq.mapped:
        # The loop starts idle, with notifications on: a predecessor killed
        # while busy left them off (the driver would not kick, and the new
        # worker would sleep until its idle timeout).
        w.vq.set_notification(True)
    spsc = w.spsc
    if spsc is not None:
        # attached a while ago (a live upgrade's new worker applied its
        # snapshot while the old one still ran): the shared indices now
        spsc._prod = _u64(spsc._pi.value)
        spsc._cons = _u64(spsc._ci.value)
    rec = w.progress.last()
    if rec is not None:
        _finish(w, rec)
    vq = w.vq
    if vq.mapped and vq.num and vq.last_avail_idx == vq.used_idx:
        note(w)             # where this worker starts from (a kill before its first record)


def _finish(w, rec: Progress) -> None:
    """:func:`resume`'s work on the predecessor's last record ``rec``."""
    c = w.counters
    vq = w.vq
    spsc = w.spsc
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
            lens = [n for n in _tx_lengths(vq, rec.avail, done) if n >= hdr]
            c.packets += done
            c.bytes += sum(lens) - hdr * len(lens)
            if lens:
                add_lengths(c, lens, hdr, min(lens), max(lens))
        elif spsc is not None:
            k = (spsc._prod - rec.spsc) % (1 << 64)
            if 0 < k <= vq.num:
                _complete_pushed(w, k)
    else:
        if done:
            elems = [_used_elem(vq, (rec.avail + i) & 0xFFFF) for i in range(done)]
            frames = done           # one buffer a frame, unless told otherwise
            if spsc is not None:
                released = (spsc._cons - rec.spsc) % (1 << 64)
                if not released:
                    # Delivered, not released: those frames are the oldest
                    # waiting in the pair's ring.  Release them now.
                    frames, bufs = _delivered(w, elems)
                    spsc.release(frames)
                    spsc.unpeek()
                    frames += done - bufs       # buffers not matched: one frame each
                elif w.mergeable:
                    # released since the record: every frame delivered since
                    # (a record spans one release), each in one or more buffers
                    frames = min(done, released)
            c.packets += frames
            c.bytes += max(0, sum(n for _head, n in elems) - hdr * frames)
            if frames == done:      # one buffer a frame: their sizes are the used lengths
                lens = [n for _head, n in elems]
                add_lengths(c, lens, hdr, min(lens), max(lens))


def _delivered(w, elems: list) -> tuple:
    """How many of the frames waiting in the pair's ring, oldest first,
    the used elements ``elems`` (``(head, len)``, in order) hold:
    ``(frames, buffers)``.  A frame is in the buffers whose used lengths
    add up to its header + frame (one buffer without MRG_RXBUF); the first
    frame that does not match ends the count (it is delivered again rather
    than lost).  Leaves those frames peeked: the caller releases them."""
    extra = 0 if w.offload_loop else w.hdr_len      # offload: the slot holds the header
    views = w.spsc.peek(len(elems))
    lens = [len(v) + extra for v in views]
    del views
    frames = i = 0
    for want in lens:
        got, j = elems[i][1], i + 1
        while got < want and j < len(elems) and w.mergeable:
            got += elems[j][1]
            j += 1
        if got != want:
            break
        frames += 1
        i = j
        if i == len(elems):
            break
    return frames, i


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
    m = pushed = nbytes = short = 0
    while pushed < k and m < num:
        head = rings.avail16[2 + ((start + m) & (num - 1))]
        if head >= num or rings.desc16[(head << 3) + 6] & (_F_NEXT | _F_WRITE | _F_INDIRECT):
            break          # not the fast loop's: it would have stopped here
        flen = rings.desc32[(head << 2) + 2] - hdr
        if 0 <= flen <= maxf:
            pushed += 1
            nbytes += flen
        elif flen < 0:
            short += 1
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
    if short:
        c.drop(DropReason.SHORT_FRAME, short)
    if m - k - short:
        c.drop(DropReason.OVERSIZE_FRAME, m - k - short)
