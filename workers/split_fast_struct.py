"""The split-ring hot loops, PyPy style: precompiled ``struct.Struct``
methods on the ring memory, frames copied with cffi's ``memmove``.

Same contract and shape as :mod:`.split_fast` (the CPython loop): one
``avail->idx`` load, descriptors after it, used elements, one
``used->idx`` store, at most one notification; only single-descriptor
buffers, the rest goes to the general path.  PyPy's JIT turns these struct
calls into plain loads and stores, 3–5× faster than CPython on the same
loop, while ``memoryview.cast`` indexing is slow there — and a cast store
can even tear on PyPy (seen here), while its struct store does not.  It
addresses the raw ``mmap`` objects (``VirtQueue.raw``, ``RegionCache.mm``)
rather than memoryviews, and copies frames with ``ffi.memmove`` between
``ffi.from_buffer`` pointers into the mappings (cffi is built into PyPy):
no intermediate object, 10 ns for 76 bytes against 16 for an mmap slice
assignment from bytes, 37 for mmap to mmap and 49 through memoryviews.

:class:`RegionCache` takes one pointer per region it caches.  On PyPy a
pointer does not keep the mapping alive (it would dangle after an
unmap); on CPython (where only tests and bench/ringloop.py run these
loops) it holds a buffer export, which makes closing the mapping fail.
Either way the rule is the one the views already impose: the worker drops
its cache before any region is unmapped.
"""
from __future__ import annotations

import struct
from typing import Callable, List, Optional, Sequence, Tuple

import cffi

from shardvu.protocol import VIRTIO_RING_F_EVENT_IDX
from shardvu.reasons import BrokenReason, DropReason
from shardvu.ringrules import MAX_FRAME
from shardvu.virtqueue import VirtQueue

from shardvu.framestats import BIN as _BIN
from .spsc import DATA_OFF, HEADER_SIZE as SLOT0, SpscRing
from .split_fast import _SLOW_FLAGS, _WRITE, batch_size, eligible, rx_header, translate
from .split_fast import RegionCache as _ViewCache

__all__ = ["tx_pass", "rx_pass", "tx_to_ring", "rx_from_ring", "eligible", "RegionCache", "rx_header"]

_H = struct.Struct("H")
_U32 = struct.Struct("I")
# The descriptor's address is read as a *signed* 64-bit field: on PyPy a
# "Q" field comes back as a big integer, and every address computation of
# the loop then ran big-integer arithmetic and allocated for each frame.
# A (hostile) address >= 2**63 reads as negative, which no region covers:
# it is refused exactly as an out-of-range one (see translate()).
_DESC = struct.Struct("qIHH")
_ELEM = struct.Struct("II")
# A TX used element is (id, 0): one 8-byte store of the id (little-endian:
# the length half is zero); "q", not "Q", for PyPy's small-int path.
_TX_ELEM = struct.Struct("q")
_OUT_OF_RANGE = BrokenReason.INDEX_OUT_OF_RANGE
_B = struct.Struct("B")
_MAC = struct.Struct("IH")
_ALL_ONES = (0xFFFFFFFF, 0xFFFF)
_ffi = cffi.FFI()
_memmove = _ffi.memmove
_pointer = _ffi.from_buffer
# Parsed here, at import (a spare worker imports this before it is taken):
# cffi parses a C type string with pycparser, whose tables it builds on the
# first parse in a process, ~250 ms on PyPy; a replacement worker's first
# pass paid that before it served a frame.
_U8_P = _ffi.typeof("uint8_t *")


def _u8(ptr):
    """``ptr`` as ``uint8_t *``: indexing it is one byte load in the JIT."""
    return _ffi.cast(_U8_P, ptr)


def _cast(counts, mm, at: int, flen: int) -> None:
    """Count one frame's cast (``flen`` bytes at ``mm[at]``)."""
    if flen >= 6 and _B.unpack_from(mm, at)[0] & 1:
        if _MAC.unpack_from(mm, at) == _ALL_ONES:
            counts.broadcast_packets += 1
        else:
            counts.multicast_packets += 1


def _sizes_tx(counts, avail, aoff: int, desc, doff: int, last: int, mask: int, n: int,
              lo_len: int, hi_len: int, hdr_len: int) -> None:
    """Size bins of the ``n`` TX chains from avail slot ``last`` on whose
    length is in ``[lo_len, hi_len]`` (the frames taken; the others were
    dropped), re-read from the ring before their buffers go back: the
    loops' path for a batch of mixed lengths."""
    sizes = counts.sizes
    for i in range(n):
        head = _H.unpack_from(avail, aoff + 4 + 2 * ((last + i) & mask))[0]
        if head > mask:         # the guest rewrote the entry meanwhile: not ours to read
            continue
        length = _DESC.unpack_from(desc, doff + (head << 4))[1]
        if lo_len <= length <= hi_len:
            fl = length - hdr_len
            sizes[_BIN[fl] if fl < 1523 else 6] += 1


def _sizes_same(counts, n: int, flen: int) -> None:
    counts.sizes[_BIN[flen] if flen < 1523 else 6] += n


def _first_length(avail, aoff: int, desc, doff: int, last: int, mask: int, num: int) -> int:
    """The length of the batch's first descriptor (-1: its head is out of
    range): the loops compare every frame's against it."""
    head = _H.unpack_from(avail, aoff + 4 + 2 * (last & mask))[0]
    return _DESC.unpack_from(desc, doff + (head << 4))[1] if head < num else -1


class RegionCache(_ViewCache):
    """:class:`shardvu.workers.split_fast.RegionCache` plus ``ptr``, a
    cffi pointer to the start of the cached region's mapping (``ptr +
    base + gpa - lo`` addresses guest byte ``gpa``)."""

    __slots__ = ("ptr",)

    def __init__(self, mem) -> None:
        super().__init__(mem)
        self.ptr = None

    def lookup(self, addr: int, length: int) -> Optional[memoryview]:
        view = super().lookup(addr, length)
        if view is not None:
            self.ptr = _pointer(self.mm)
        return view


def _publish(vq: VirtQueue, used, uoff: int, num: int, old: int, count: int, last_avail: int) -> None:
    new = (old + count) & 0xFFFF
    _H.pack_into(used, uoff + 2, new)
    vq.used_idx = new
    vq.last_avail_idx = last_avail
    if vq.signalled_used_valid and ((new - vq.signalled_used) & 0xFFFF) < count:
        vq.signalled_used_valid = False
    if vq.notification and vq.features >> VIRTIO_RING_F_EVENT_IDX & 1:
        _H.pack_into(used, uoff + 4 + 8 * num, last_avail)
    vq.notify()


def tx_pass(vq: VirtQueue, hdr_len: int, budget: int, cache: RegionCache,
            on_frames: Optional[Callable[[List[memoryview]], None]] = None, drops=None,
            max_frame: int = MAX_FRAME, counts=None) -> Tuple[int, int, bool]:
    """See :func:`shardvu.workers.split_fast.tx_pass`."""
    num = vq.num
    mask = num - 1
    (desc, doff), (avail, aoff), (used, uoff) = vq.raw
    h_from = _H.unpack_from
    d_from = _DESC.unpack_from
    e_into = _TX_ELEM.pack_into
    last = vq.last_avail_idx
    navail = batch_size(vq, h_from(avail, aoff + 2)[0], budget)
    if not navail:
        return 0, 0, False
    used_idx = vq.used_idx
    out: Optional[List[memoryview]] = [] if on_frames is not None else None
    lo, hi, view = cache.lo, cache.hi, cache.view
    maxlen = hdr_len + max_frame
    himax = hi - maxlen       # addr <= himax: any length up to maxlen stays inside
    nbytes = n = 0
    more = False
    # size bins: each taken frame's length xor-ed against the first's; 0 at
    # the end = one length for the batch (O(1)), else _sizes_tx re-reads them
    first = _first_length(avail, aoff, desc, doff, last, mask, num)
    diff = 0
    while n < navail:
        head = h_from(avail, aoff + 4 + 2 * ((last + n) & mask))[0]
        if head >= num:
            vq.mark_broken(f"head index {head} >= queue size {num}", _OUT_OF_RANGE)
            break
        addr, length, flags, _next = d_from(desc, doff + (head << 4))
        if flags & (_SLOW_FLAGS | _WRITE):
            more = True
            break
        if lo <= addr <= himax and hdr_len <= length <= maxlen:
            if out is not None:             # the common case: one chained test
                off = addr - lo
                out.append(view[off + hdr_len:off + length])
                if counts is not None:      # (a sink's count-only pass reads no frame byte)
                    _cast(counts, cache.mm, cache.base + addr - lo + hdr_len, length - hdr_len)
            diff |= length ^ first
            nbytes += length                # headers taken off once, at the end
        else:
            if not (lo <= addr and addr + length <= hi):
                view = translate(vq, cache, head, addr, length)
                if view is None:
                    more = not vq.broken
                    break
                lo, hi = cache.lo, cache.hi
                himax = hi - maxlen
            flen = length - hdr_len
            if 0 <= flen <= max_frame:
                if out is not None:
                    off = addr - lo
                    out.append(view[off + hdr_len:off + length])
                if counts is not None and out is not None:
                    _cast(counts, cache.mm, cache.base + addr - lo + hdr_len, flen)
                nbytes += length
            else:
                diff = -1                   # (not counted: _sizes_tx skips it by its length)
                nbytes += hdr_len           # no payload: cancels its share below
                if drops is not None:
                    drops.drop(DropReason.SHORT_FRAME if flen < 0 else DropReason.OVERSIZE_FRAME)
        e_into(used, uoff + 4 + (((used_idx + n) & mask) << 3), head)
        n += 1
    if n:
        nbytes -= n * hdr_len
        if counts is not None:
            if diff == 0:
                _sizes_same(counts, n, first - hdr_len)
            else:
                _sizes_tx(counts, avail, aoff, desc, doff, last, mask, n, hdr_len, maxlen, hdr_len)
        if out:
            on_frames(out)
            out = None
        _publish(vq, used, uoff, num, used_idx, n, (last + n) & 0xFFFF)
    return n, nbytes, more


def rx_pass(vq: VirtQueue, frames: Sequence, hdr: bytes,
            cache: RegionCache, max_len: int = 12 + MAX_FRAME) -> Tuple[int, int, bool]:
    """See :func:`shardvu.workers.split_fast.rx_pass`."""
    num = vq.num
    mask = num - 1
    (desc, doff), (avail, aoff), (used, uoff) = vq.raw
    h_from = _H.unpack_from
    d_from = _DESC.unpack_from
    e_into = _ELEM.pack_into
    last = vq.last_avail_idx
    navail = batch_size(vq, h_from(avail, aoff + 2)[0], len(frames))
    if not navail:
        return 0, 0, False
    used_idx = vq.used_idx
    hlen = len(hdr)
    lo, hi, ptr, base = cache.lo, cache.hi, cache.ptr, cache.base
    nbytes = n = 0
    more = False
    while n < navail:
        head = h_from(avail, aoff + 4 + 2 * ((last + n) & mask))[0]
        if head >= num:
            vq.mark_broken(f"head index {head} >= queue size {num}", _OUT_OF_RANGE)
            break
        addr, length, flags, _next = d_from(desc, doff + (head << 4))
        frame = frames[n]
        flen = len(frame)
        if flags & _SLOW_FLAGS or not flags & _WRITE or length < hlen + flen or hlen + flen > max_len:
            more = True
            break
        if not (lo <= addr and addr + length <= hi):
            if translate(vq, cache, head, addr, length) is None:
                more = not vq.broken
                break
            lo, hi, ptr, base = cache.lo, cache.hi, cache.ptr, cache.base
        dst = ptr + (base + addr - lo)
        if hlen:
            _memmove(dst, hdr, hlen)
        _memmove(dst + hlen, frame, flen)       # bytes or a view alike
        nbytes += flen
        e_into(used, uoff + 4 + (((used_idx + n) & mask) << 3), head, hlen + flen)
        n += 1
    if n:
        _publish(vq, used, uoff, num, used_idx, n, (last + n) & 0xFFFF)
    return n, nbytes, more


def tx_to_ring(vq: VirtQueue, hdr_len: int, budget: int, cache: RegionCache,
               ring: SpscRing, drops=None, counts=None) -> Tuple[int, int, int, bool]:
    """See :func:`shardvu.workers.split_fast.tx_to_ring`."""
    num = vq.num
    mask = num - 1
    (desc, doff), (avail, aoff), (used, uoff) = vq.raw
    h_from = _H.unpack_from
    d_from = _DESC.unpack_from
    e_into = _ELEM.pack_into
    len_into = _U32.pack_into
    last = vq.last_avail_idx
    navail = batch_size(vq, h_from(avail, aoff + 2)[0], budget)
    if not navail:
        return 0, 0, 0, False
    used_idx = vq.used_idx
    lo, hi, ptr, base = cache.lo, cache.hi, cache.ptr, cache.base
    prod, room = ring.produce_window()
    smm, smask, ssize, maxf = ring.mm, ring.mask, ring.slot_size, ring.max_frame
    sptr = _pointer(smm)
    nbytes = n = dropped = 0
    more = False
    first = _first_length(avail, aoff, desc, doff, last, mask, num)
    diff = group = bc = 0   # size bins as in tx_pass; group bits, broadcasts (of the copies)
    su8 = _u8(sptr)
    while n < navail:
        head = h_from(avail, aoff + 4 + 2 * ((last + n) & mask))[0]
        if head >= num:
            vq.mark_broken(f"head index {head} >= queue size {num}", _OUT_OF_RANGE)
            break
        addr, length, flags, _next = d_from(desc, doff + (head << 4))
        if flags & (_SLOW_FLAGS | _WRITE):
            more = True
            break
        if not (lo <= addr and addr + length <= hi):
            if translate(vq, cache, head, addr, length) is None:
                more = not vq.broken
                break
            lo, hi, ptr, base = cache.lo, cache.hi, cache.ptr, cache.base
        flen = length - hdr_len
        if room and 0 <= flen <= maxf:
            slot = SLOT0 + (prod & smask) * ssize
            len_into(smm, slot, flen)
            _memmove(sptr + (slot + DATA_OFF), ptr + (base + addr - lo + hdr_len), flen)
            diff |= length ^ first
            if flen >= 6:           # the copy's first byte, just written
                b = su8[slot + DATA_OFF]
                group += b & 1
                if b == 255:
                    bc += _MAC.unpack_from(smm, slot + DATA_OFF) == _ALL_ONES
            prod += 1
            room -= 1
            nbytes += flen
        else:
            diff = -1
            if counts is not None and 0 <= flen <= maxf:     # taken, then port_full
                _cast(counts, cache.mm, base + addr - lo + hdr_len, flen)
            dropped += 1
            if drops is not None:
                drops.drop(DropReason.SHORT_FRAME if flen < 0 else
                           DropReason.OVERSIZE_FRAME if flen > maxf else DropReason.PORT_FULL)
        e_into(used, uoff + 4 + (((used_idx + n) & mask) << 3), head, 0)
        n += 1
    if n:
        if counts is not None:
            if diff == 0:
                _sizes_same(counts, n, first - hdr_len)
            else:
                _sizes_tx(counts, avail, aoff, desc, doff, last, mask, n, hdr_len, hdr_len + maxf, hdr_len)
            counts.broadcast_packets += bc
            counts.multicast_packets += group - bc
        ring.publish(prod)
        _publish(vq, used, uoff, num, used_idx, n, (last + n) & 0xFFFF)
    return n, nbytes, dropped, more


def rx_from_ring(vq: VirtQueue, ring: SpscRing, hdr_len: int, budget: int,
                 cache: RegionCache, counts=None, skip: int = 0) -> Tuple[int, int, bool]:
    """See :func:`shardvu.workers.split_fast.rx_from_ring`."""
    cons, ready = ring.consume_window(budget)
    if not ready:
        return 0, 0, False
    num = vq.num
    mask = num - 1
    (desc, doff), (avail, aoff), (used, uoff) = vq.raw
    h_from = _H.unpack_from
    d_from = _DESC.unpack_from
    e_into = _ELEM.pack_into
    len_from = _U32.unpack_from
    last = vq.last_avail_idx
    navail = batch_size(vq, h_from(avail, aoff + 2)[0], ready)
    if not navail:
        return 0, 0, False
    used_idx = vq.used_idx
    lo, hi, ptr, base = cache.lo, cache.hi, cache.ptr, cache.base
    smm, smask, ssize, maxf = ring.mm, ring.mask, ring.slot_size, ring.max_frame
    sptr = _pointer(smm)
    start = DATA_OFF - hdr_len
    nbytes = n = 0
    more = False
    first = len_from(smm, SLOT0 + (cons & smask) * ssize)[0]
    diff = group = bc = 0   # slot lengths xor-ed against the first's (see tx_pass); casts
    su8 = _u8(sptr)
    at = DATA_OFF + skip    # a frame's first byte in its slot (read for any length:
    while n < navail:       # a batch with a runt is recounted slot by slot below)
        head = h_from(avail, aoff + 4 + 2 * ((last + n) & mask))[0]
        if head >= num:
            vq.mark_broken(f"head index {head} >= queue size {num}", _OUT_OF_RANGE)
            break
        slot = SLOT0 + ((cons + n) & smask) * ssize
        flen = len_from(smm, slot)[0]
        if flen > maxf:
            raise RuntimeError(f"spsc: corrupt slot length {flen}")
        total = hdr_len + flen
        addr, length, flags, _next = d_from(desc, doff + (head << 4))
        if flags & _SLOW_FLAGS or not flags & _WRITE or length < total:
            more = True
            break
        if not (lo <= addr and addr + length <= hi):
            if translate(vq, cache, head, addr, length) is None:
                more = not vq.broken
                break
            lo, hi, ptr, base = cache.lo, cache.hi, cache.ptr, cache.base
        _memmove(ptr + (base + addr - lo), sptr + (slot + start), total)
        diff |= flen ^ first
        b = su8[slot + at]
        group += b & 1
        if b == 255:
            bc += _MAC.unpack_from(smm, slot + at) == _ALL_ONES
        nbytes += flen
        e_into(used, uoff + 4 + (((used_idx + n) & mask) << 3), head, total)
        n += 1
    if n:
        if counts is not None:      # before the slots are released
            if diff == 0 and first - skip >= 6:
                _sizes_same(counts, n, first - skip)
                counts.broadcast_packets += bc
                counts.multicast_packets += group - bc
            else:               # mixed lengths or runts: slot by slot
                sizes = counts.sizes
                for i in range(n):
                    slot = SLOT0 + ((cons + i) & smask) * ssize
                    fl = len_from(smm, slot)[0] - skip
                    sizes[_BIN[fl] if 0 <= fl < 1523 else (6 if fl > 0 else 0)] += 1
                    _cast(counts, smm, slot + at, fl)
        _publish(vq, used, uoff, num, used_idx, n, (last + n) & 0xFFFF)
        ring.consumed(cons + n)         # after the used store (workers/progress.py)
    return n, nbytes, more
