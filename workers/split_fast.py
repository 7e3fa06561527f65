"""The split-ring hot loops, CPython style: direct typed-view indexing.

One batch per call: one ``avail->idx`` load, the descriptors read after it,
the used elements written, then one ``used->idx`` store and at most one
notification.  Only the common shape takes this path — one descriptor per
buffer, no NEXT/INDIRECT, no dirty logging, no inflight tracking; any other
buffer ends the fast batch and the caller finishes with the general
:class:`~shardvu.virtqueue.VirtQueue` API (:mod:`.split_loop`), which
validates everything.

Rules: those of :mod:`shardvu.ringrules`, inlined (no helper call per
descriptor).  A head index is checked against the ring size before use;
every buffer, even one a sink only counts, must lie inside guest memory
(else the queue is broken); a buffer that lies inside guest memory but
not inside one region (it spans adjacent regions) is handed to the
general path, which translates it piecewise.  Short and oversize TX
frames are taken and dropped, counted through ``drops.drop(reason)``;
an RX buffer too small, or a frame too long, goes to the general path,
which applies the policy.  The batch rule (ringrules.BATCH_RULE): what
came before the first bad chain is published, the bad chain is not
consumed.

Why typed views: ``memoryview.cast("H")[i]`` costs ~25 ns on CPython and
is a single load/store of the field's width; ``struct`` costs 50–95 ns and
``pack_into`` zeroes a field before writing it (see shardvu.virtqueue).
"""
from __future__ import annotations

import sys
from array import array
from typing import Callable, List, Optional, Sequence, Tuple

from shardvu.protocol import VIRTIO_RING_F_EVENT_IDX
from shardvu.reasons import BrokenReason, DropReason
from shardvu.ringrules import MAX_FRAME, covered
from shardvu.virtqueue import VirtQueue

from shardvu.framestats import add_guest, add_lengths, add_one, add_slots
from .spsc import DATA_OFF, HEADER_SIZE as SLOT0, SpscRing

_SLOW_FLAGS = 1 | 4          # NEXT | INDIRECT
_WRITE = 2
_ANY_FLAGS = _SLOW_FLAGS | _WRITE
#: the TX batch check (strided slices) pays on CPython; on PyPy (where the
#: struct-style loops run) the per-buffer loop is faster
_TX_COLUMNS = sys.implementation.name != "pypy"


def eligible(vq: VirtQueue) -> bool:
    """True when the fast loops may drive ``vq`` at all."""
    return (vq.rings is not None and not vq.broken and vq.inflight is None
            and not vq._resubmit and not vq._logging())


class RegionCache:
    """Last region hit, so the common one-region guest costs two compares.
    ``view`` is the region's memoryview; ``mm``/``base`` address the same
    bytes in the raw mapping (``mm[base + gpa - lo]``)."""

    __slots__ = ("mem", "lo", "hi", "view", "mm", "base")

    def __init__(self, mem) -> None:
        self.mem = mem
        self.lo, self.hi, self.base = 1, 0, 0     # an empty range: misses until the first lookup
        self.view: Optional[memoryview] = None
        self.mm = None

    def lookup(self, addr: int, length: int) -> Optional[memoryview]:
        found = self.mem.gpa_range(addr, length)
        if found is None:
            return None
        region, _off = found
        self.lo, self.hi, self.view = region.gpa, region.gpa_end, region.view
        self.mm, self.base = region.mm, region.mmap_offset
        return self.view


def batch_size(vq: VirtQueue, avail_idx: int, limit: int) -> int:
    """How many entries to take this batch, given the ``avail->idx`` just
    loaded (recorded as the shadow index); 0 when none, or when the index
    jumped by more than the ring size (the queue is then broken)."""
    vq.shadow_avail_idx = avail_idx
    navail = (avail_idx - vq.last_avail_idx) & 0xFFFF
    if navail > vq.num:
        vq.mark_broken(f"avail idx moved by {navail} > queue size {vq.num}",
                       BrokenReason.AVAIL_IDX_JUMP)
        return 0
    return navail if navail < limit else limit


def translate(vq: VirtQueue, cache: RegionCache, head: int, addr: int, length: int) -> Optional[memoryview]:
    """The region view holding ``[addr, addr+length)`` (cache updated), or
    None: after marking the queue broken when the buffer is outside guest
    memory, without when it spans adjacent regions (the caller leaves it
    to the general path: ``more = not vq.broken``)."""
    view = cache.lookup(addr, length)
    # (a struct-style loop reads an address >= 2**63 as negative: no region
    # holds it, though a zero-length buffer there addresses no byte at all)
    if view is None and length and not (addr >= 0 and covered(cache.mem, addr, length)):
        vq.mark_broken(f"descriptor {head} buffer {addr & 0xFFFFFFFFFFFFFFFF:#x}+{length:#x} "
                       f"is outside guest memory", BrokenReason.OUTSIDE_MEMORY)
    return view


def _publish(vq: VirtQueue, rings, old: int, count: int, last_avail: int) -> None:
    """Store used->idx once for the batch and keep VirtQueue's bookkeeping
    (what ``flush`` would do), then notify at most once."""
    new = (old + count) & 0xFFFF
    rings.used16[1] = new
    vq.used_idx = new
    vq.last_avail_idx = last_avail
    if vq.signalled_used_valid and ((new - vq.signalled_used) & 0xFFFF) < count:
        vq.signalled_used_valid = False      # the signalled index wrapped past
    if vq.notification and vq.features >> VIRTIO_RING_F_EVENT_IDX & 1:
        rings.used16[2 + 4 * rings.num] = last_avail      # avail_event
    vq.notify()


def _heads(avail16, last: int, n: int, num: int) -> List[int]:
    """avail->ring entries ``last .. last+n-1`` (n <= num), loaded as one or
    two slices (a C loop each) rather than one index at a time."""
    s = last & (num - 1)
    e = s + n
    if e <= num:
        return avail16[2 + s:2 + e].tolist()
    return avail16[2 + s:2 + num].tolist() + avail16[2:2 + e - num].tolist()


def _valid_heads(vq: VirtQueue, avail16, last: int, n: int, num: int) -> Tuple[List[int], int]:
    """:func:`_heads`, cut before the first index out of range, and that
    index (-1: none); one ``max`` over the batch in the common case.  The
    caller breaks the queue (:func:`_bad_head`) only once it has taken
    every head before it: an earlier bad chain decides first."""
    heads = _heads(avail16, last, n, num)
    if max(heads) >= num:
        for i, head in enumerate(heads):
            if head >= num:
                return heads[:i], head
    return heads, -1


def _bad_head(vq: VirtQueue, head: int) -> None:
    vq.mark_broken(f"head index {head} >= queue size {vq.num}", BrokenReason.INDEX_OUT_OF_RANGE)


def _used_store(used64, start: int, elems: List[int], num: int) -> None:
    """Used elements from used slot ``start`` on, each ``id | len << 32``
    (a TX buffer's is just its head: length 0), as one or two slice
    stores."""
    s = start & (num - 1)
    e = s + len(elems)
    vals = array("Q", elems)
    if e <= num:
        used64[s:e] = vals
    else:
        k = num - s
        used64[s:num] = vals[:k]
        used64[0:e - num] = vals[k:]


def _give_back(vq: VirtQueue, rings, elems: List[int], last: int) -> None:
    """Store a batch's used elements (``id | len << 32``, or bare heads) and
    publish them: the avail entries from ``last`` on are consumed."""
    n = len(elems)
    _used_store(rings.used64, vq.used_idx, elems, rings.num)
    _publish(vq, rings, vq.used_idx, n, (last + n) & 0xFFFF)


def _publish_rx(vq: VirtQueue, rings, elems: List[int], last: int, hdr_len: int) -> Tuple[int, int]:
    """:func:`_give_back` for an RX batch whose payload bytes are not known
    yet; returns ``(buffers, payload bytes)``."""
    n = len(elems)
    _give_back(vq, rings, elems, last)
    nbytes = 0
    for e in elems:
        nbytes += e >> 32
    return n, nbytes - n * hdr_len


def tx_pass(vq: VirtQueue, hdr_len: int, budget: int, cache: RegionCache,
            on_frames: Optional[Callable[[List[memoryview]], None]] = None, drops=None,
            max_frame: int = MAX_FRAME, counts=None) -> Tuple[int, int, bool]:
    """Consume up to ``budget`` single-descriptor frames from the guest's TX
    ring.  With ``counts`` (:class:`.stats.Counters`), every frame taken
    (not the dropped ones) is counted in its size bin and cast
    (:mod:`.framestats`), before its buffer goes back.  With ``on_frames``, it is called once with views of the frames
    (without the virtio-net header) in guest memory, before the buffers go
    back to the guest: the views are valid only during that call.  A frame
    shorter than the header or longer than ``max_frame`` is taken and
    dropped (``drops.drop(reason)``).  Returns ``(chains taken, payload
    bytes, more)``; ``more`` means the batch stopped at a buffer this loop
    does not take (the caller runs the general path)."""
    rings = vq.rings
    num = rings.num
    last = vq.last_avail_idx
    navail = batch_size(vq, rings.avail16[1], budget)
    if not navail:
        return 0, 0, False
    heads, bad = _valid_heads(vq, rings.avail16, last, navail, num)
    lo, hi, view = cache.lo, cache.hi, cache.view
    cols = _columns(rings, heads) if _TX_COLUMNS else None
    if cols is not None:
        # the whole batch checked at once: device-readable single buffers,
        # no frame short or oversize, all inside the cached region
        flags, lens, addrs = cols
        k = len(heads)
        longest = max(lens)
        shortest = min(lens)
        if (flags.count(0) == k and shortest >= hdr_len and longest - hdr_len <= max_frame
                and min(addrs) >= lo and max(addrs) + longest <= hi):
            if counts is not None:
                if on_frames is None:       # count only: no frame byte is read
                    add_lengths(counts, lens, hdr_len, shortest, longest)
                else:
                    h0 = heads[0]
                    add_guest(counts, cache.mm, cache.base - lo + hdr_len, addrs, lens, hdr_len,
                              shortest, longest, rings.desc64[h0 << 1:(h0 + k) << 1:2])
            if on_frames is not None:
                d = hdr_len - lo
                on_frames([view[a + d:a - lo + ln] for a, ln in zip(addrs, lens)])
            if bad >= 0:
                _bad_head(vq, bad)
            _give_back(vq, rings, heads, last)
            return k, sum(lens) - k * hdr_len, False
    desc64, desc32, desc16 = rings.desc64, rings.desc32, rings.desc16
    out: Optional[List[memoryview]] = [] if on_frames is not None else None
    maxlen = hdr_len + max_frame
    himax = hi - maxlen       # addr <= himax: any length up to maxlen stays inside
    nbytes = n = 0
    more = False
    for head in heads:
        if desc16[(head << 3) + 6] & (_SLOW_FLAGS | _WRITE):
            more = True
            break
        length = desc32[(head << 2) + 2]
        addr = desc64[head << 1]
        if lo <= addr <= himax and hdr_len <= length <= maxlen:
            if out is not None:             # the common case: one chained test
                off = addr - lo
                out.append(view[off + hdr_len:off + length])
            if counts is not None:
                add_one(counts, cache.mm, cache.base + addr - lo + hdr_len, length - hdr_len,
                        out is not None)
            nbytes += length - hdr_len
            n += 1
            continue
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
            if counts is not None:
                add_one(counts, cache.mm, cache.base + addr - lo + hdr_len, flen, out is not None)
            nbytes += flen
        elif drops is not None:
            drops.drop(DropReason.SHORT_FRAME if flen < 0 else DropReason.OVERSIZE_FRAME)
        n += 1
    if bad >= 0 and n == len(heads) and not more:
        _bad_head(vq, bad)
    if n:
        _used_store(rings.used64, vq.used_idx, heads if n == navail else heads[:n], num)
        if out:
            on_frames(out)
            out = None
        _publish(vq, rings, vq.used_idx, n, (last + n) & 0xFFFF)
    return n, nbytes, more


def _columns(rings, heads: List[int]) -> Optional[Tuple[List[int], List[int], List[int]]]:
    """When the batch's heads are consecutive descriptors (an in-order
    front-end posts its buffers that way), their ``flags``, ``len`` and
    ``addr`` fields as three lists, each read with one strided slice (a C
    loop) instead of per descriptor; else None.  The fast loops then check
    a whole batch with ``count``/``min``/``max`` and fall back to their
    per-buffer loop (which decides every case, hostile ones included) when
    any check fails."""
    n = len(heads)
    if not n:
        return None
    h0 = heads[0]
    if heads[-1] - h0 != n - 1 or heads != list(range(h0, h0 + n)):
        return None
    return (rings.desc16[(h0 << 3) + 6:(h0 + n) << 3:8].tolist(),
            rings.desc32[(h0 << 2) + 2:(h0 + n) << 2:4].tolist(),
            rings.desc64[h0 << 1:(h0 + n) << 1:2].tolist())


def _top(values: List[int], low: int) -> int:
    """``max(values)`` given ``low = min(values)``: one ``count`` (6x faster
    than ``max`` on CPython) when they are all equal, as a driver's
    same-sized RX buffers are."""
    return low if values.count(low) == len(values) else max(values)


def _rx_elems(heads: List[int], lens: List[int], extra: int) -> List[int]:
    """Used elements ``id | (extra + len) << 32`` for consecutive ``heads``;
    one ``range`` when every length is the same (a generator's frame)."""
    if min(lens) == max(lens):
        first = heads[0] | (extra + lens[0]) << 32
        return list(range(first, first + len(heads)))
    return [h | (extra + ln) << 32 for h, ln in zip(heads, lens)]


def _rx_consecutive(rings, heads: List[int], frames: Sequence, hdr: bytes, lo: int, hi: int,
                    delta: int, mm, max_len: int) -> Optional[Tuple[List[int], int]]:
    """:func:`rx_pass`'s common case, checked per batch (:func:`_columns`):
    consecutive heads, each exactly device-writable (no NEXT or INDIRECT),
    each long enough for the longest frame with its header (at most
    ``max_len``), all inside the cached region ``[lo, hi)``.  Copies the frames and returns ``(used
    elements, payload bytes)``; else None, having written nothing."""
    n = len(heads)
    fl = frames[:n] if len(frames) > n else frames
    if len(fl) < n:
        return None
    cols = _columns(rings, heads)
    if cols is None:
        return None
    flags, dlens, addrs = cols
    lens = list(map(len, fl))
    hlen = len(hdr)
    need = hlen + max(lens)
    dmin = min(dlens)
    if (need > max_len or flags.count(_WRITE) != n or dmin < need or min(addrs) < lo
            or max(addrs) + _top(dlens, dmin) > hi):
        return None
    if hlen:
        for addr, frame in zip(addrs, fl):
            off = addr + delta
            mm[off:off + hlen] = hdr
            mm[off + hlen:off + hlen + len(frame)] = frame
    else:
        for addr, frame in zip(addrs, fl):
            off = addr + delta
            mm[off:off + len(frame)] = frame
    return _rx_elems(heads, lens, hlen), sum(lens)


def rx_pass(vq: VirtQueue, frames: Sequence, hdr: bytes,
            cache: RegionCache, max_len: int = 12 + MAX_FRAME) -> Tuple[int, int, bool]:
    """Write ``frames`` into single-descriptor RX buffers, each after the
    virtio-net header ``hdr`` (``num_buffers`` already 1 where present).
    ``hdr`` may be empty when the frames already start with it (a
    generator's constant frame: one copy per buffer instead of two).
    Returns ``(delivered, payload bytes, more)``; ``more`` means a buffer
    needs the general path (a chain, too small for the frame, spanning
    regions, read-only) or a frame does (header + frame longer than
    ``max_len``: the general path drops it)."""
    rings = vq.rings
    num = rings.num
    last = vq.last_avail_idx
    navail = batch_size(vq, rings.avail16[1], len(frames))
    if not navail:
        return 0, 0, False
    heads, bad = _valid_heads(vq, rings.avail16, last, navail, num)
    desc64, desc32, desc16 = rings.desc64, rings.desc32, rings.desc16
    hlen = len(hdr)
    lo, hi, mm = cache.lo, cache.hi, cache.mm
    delta = cache.base - lo                   # mm offset of guest address a = a + delta
    done = _rx_consecutive(rings, heads, frames, hdr, lo, hi, delta, mm, max_len)
    if done is not None:
        elems, nbytes = done
        if bad >= 0:
            _bad_head(vq, bad)
        _give_back(vq, rings, elems, last)
        return len(elems), nbytes, False
    elems: List[int] = []                     # used elements, id | len << 32
    put = elems.append
    more = False
    for head, frame in zip(heads, frames):
        total = hlen + len(frame)
        if (desc16[(head << 3) + 6] & _ANY_FLAGS != _WRITE or desc32[(head << 2) + 2] < total
                or total > max_len):
            more = True                       # chained, indirect, read-only, too small or long
            break
        addr = desc64[head << 1]
        length = desc32[(head << 2) + 2]
        if not (lo <= addr and addr + length <= hi):
            if translate(vq, cache, head, addr, length) is None:
                more = not vq.broken
                break
            lo, hi, mm = cache.lo, cache.hi, cache.mm
            delta = cache.base - lo
        off = addr + delta
        if hlen:
            mm[off:off + hlen] = hdr
        mm[off + hlen:off + total] = frame
        put(head | total << 32)
    if bad >= 0 and len(elems) == len(heads) and not more:
        _bad_head(vq, bad)
    if not elems:
        return 0, 0, more
    n, nbytes = _publish_rx(vq, rings, elems, last, hlen)
    return n, nbytes, more


def rx_header(hdr_len: int) -> bytes:
    """A zeroed virtio-net header; with the 12-byte layout num_buffers = 1."""
    return bytes(10) + b"\x01\x00" if hdr_len == 12 else bytes(hdr_len)


# -- loopback: guest TX ring -> SPSC slots -> guest RX ring, one copy per hop --

def tx_to_ring(vq: VirtQueue, hdr_len: int, budget: int, cache: RegionCache,
               ring: SpscRing, drops=None, counts=None) -> Tuple[int, int, int, bool]:
    """Move up to ``budget`` single-descriptor frames from the guest's TX
    ring straight into ``ring``'s slots (one copy each: no views, no list)
    and publish them with one producer-index store; the caller rings the
    doorbell.  A frame shorter than the header, longer than
    ``ring.max_frame`` or finding the ring full is consumed and dropped
    (``drops.drop(reason)``: SHORT_FRAME, OVERSIZE_FRAME, PORT_FULL); its
    buffer must still lie inside guest memory.  With ``counts``, every frame
    taken is counted in its size bin and cast, those finding the ring full
    too (see :func:`tx_pass`).
    Returns ``(frames taken, payload bytes forwarded, dropped, more)``."""
    rings = vq.rings
    num = rings.num
    last = vq.last_avail_idx
    navail = batch_size(vq, rings.avail16[1], budget)
    if not navail:
        return 0, 0, 0, False
    heads, bad = _valid_heads(vq, rings.avail16, last, navail, num)
    desc64, desc32, desc16 = rings.desc64, rings.desc32, rings.desc16
    lo, hi, mm = cache.lo, cache.hi, cache.mm
    delta = cache.base - lo + hdr_len          # mm offset of a frame = addr + delta
    prod, room = ring.produce_window()
    smm, len32, ssize, maxf = ring.mm, ring.len32, ring.slot_size, ring.max_frame
    data = SLOT0 + (prod & ring.mask) * ssize + DATA_OFF      # this slot's frame bytes
    end = SLOT0 + ring.slots * ssize + DATA_OFF
    nbytes = n = dropped = 0
    more = False
    rest = heads                         # what the per-buffer loop still has to do
    cols = _columns(rings, heads) if room >= len(heads) else None
    if cols is not None:
        # the whole batch checked at once: device-readable single buffers,
        # each frame fits a slot, all inside the cached region
        flags, lens, addrs = cols
        k = len(heads)
        longest = max(lens)
        shortest = min(lens)
        if (flags.count(0) == k and shortest >= hdr_len and longest - hdr_len <= maxf
                and min(addrs) >= lo and max(addrs) + longest <= hi):
            if counts is not None:
                h0 = heads[0]
                add_guest(counts, mm, delta, addrs, lens, hdr_len, shortest, longest,
                          rings.desc64[h0 << 1:(h0 + k) << 1:2])
            for addr, length in zip(addrs, lens):
                flen = length - hdr_len
                len32[(data - DATA_OFF) >> 2] = flen
                off = addr + delta
                smm[data:data + flen] = mm[off:off + flen]
                data += ssize
                if data == end:
                    data = SLOT0 + DATA_OFF
            n, nbytes = k, sum(lens) - k * hdr_len
            rest = ()
            if bad >= 0:
                _bad_head(vq, bad)
    for head in rest:
        if desc16[(head << 3) + 6] & (_SLOW_FLAGS | _WRITE):
            more = True
            break
        length = desc32[(head << 2) + 2]
        addr = desc64[head << 1]
        if not (lo <= addr and addr + length <= hi):
            if translate(vq, cache, head, addr, length) is None:
                more = not vq.broken
                break
            lo, hi, mm = cache.lo, cache.hi, cache.mm
            delta = cache.base - lo + hdr_len
        flen = length - hdr_len
        if counts is not None and 0 <= flen <= maxf:
            add_one(counts, mm, addr + delta, flen)
        if 0 <= flen <= maxf and room:
            off = addr + delta
            len32[(data - DATA_OFF) >> 2] = flen
            smm[data:data + flen] = mm[off:off + flen]
            data += ssize
            if data == end:
                data = SLOT0 + DATA_OFF
            room -= 1
            nbytes += flen
        else:
            dropped += 1
            if drops is not None:
                drops.drop(DropReason.SHORT_FRAME if flen < 0 else
                           DropReason.OVERSIZE_FRAME if flen > maxf else DropReason.PORT_FULL)
        n += 1
    if rest is heads and bad >= 0 and n == len(heads) and not more:
        _bad_head(vq, bad)
    if n:
        ring.publish(prod + n - dropped)
        _give_back(vq, rings, heads if n == navail else heads[:n], last)
    return n, nbytes, dropped, more


def rx_from_ring(vq: VirtQueue, ring: SpscRing, hdr_len: int, budget: int,
                 cache: RegionCache, counts=None, skip: int = 0) -> Tuple[int, int, bool]:
    """Deliver up to ``budget`` frames from ``ring`` into single-descriptor
    RX buffers, each with the ``hdr_len``-byte virtio-net header that the
    producer laid down in the slot's headroom (:meth:`SpscRing.set_headroom`):
    one copy of header + frame per buffer; their slots are released with one
    consumer-index store.  Returns ``(delivered, payload bytes, more)``;
    ``more`` means frames are left and the next RX buffer needs the general
    path (a chain, or too small).  With ``counts``, each frame delivered is
    counted in its size bin and cast; ``skip``: bytes in front of the frame
    in each slot (a virtio-net header the producer left there)."""
    cons, ready = ring.consume_window(budget)
    if not ready:
        return 0, 0, False
    rings = vq.rings
    num = rings.num
    last = vq.last_avail_idx
    navail = batch_size(vq, rings.avail16[1], ready)
    if not navail:
        return 0, 0, False
    heads, bad = _valid_heads(vq, rings.avail16, last, navail, num)
    desc64, desc32, desc16 = rings.desc64, rings.desc32, rings.desc16
    lo, hi, mm = cache.lo, cache.hi, cache.mm
    delta = cache.base - lo                   # mm offset of guest address a = a + delta
    smm, len32, ssize, maxf = ring.mm, ring.len32, ring.slot_size, ring.max_frame
    slot = SLOT0 + (cons & ring.mask) * ssize
    send = SLOT0 + ring.slots * ssize
    start = DATA_OFF - hdr_len
    k = len(heads)
    if k and slot + k * ssize <= send:
        # the whole batch checked at once (no slot wrap inside it): slot
        # lengths sane, consecutive device-writable single buffers long
        # enough for the longest frame, all inside the cached region
        cols = _columns(rings, heads)
        if cols is not None:
            flags, dlens, addrs = cols
            flens = len32[slot >> 2:(slot + k * ssize) >> 2:ssize >> 2].tolist()
            longest = max(flens)
            need = hdr_len + longest
            dmin = min(dlens)
            if (longest <= maxf and flags.count(_WRITE) == k and dmin >= need
                    and min(addrs) >= lo and max(addrs) + _top(dlens, dmin) <= hi):
                if counts is not None:
                    add_slots(counts, smm, slot + DATA_OFF, ssize, flens, skip,
                              longest if flens.count(longest) == k else min(flens), longest)
                for addr, flen in zip(addrs, flens):
                    off = addr + delta
                    mm[off:off + hdr_len + flen] = smm[slot + start:slot + DATA_OFF + flen]
                    slot += ssize
                if bad >= 0:
                    _bad_head(vq, bad)
                _give_back(vq, rings, _rx_elems(heads, flens, hdr_len), last)
                ring.consumed(cons + k)     # after the used store: see ProgressPage
                return k, sum(flens), False
    elems: List[int] = []                     # used elements, id | len << 32
    put = elems.append
    more = False
    for head in heads:
        flen = len32[slot >> 2]
        if flen > maxf:
            raise RuntimeError(f"spsc: corrupt slot length {flen}")
        total = hdr_len + flen
        if desc16[(head << 3) + 6] & _ANY_FLAGS != _WRITE or desc32[(head << 2) + 2] < total:
            more = True                       # chained, indirect, read-only or too small
            break
        addr = desc64[head << 1]
        length = desc32[(head << 2) + 2]
        if not (lo <= addr and addr + length <= hi):
            if translate(vq, cache, head, addr, length) is None:
                more = not vq.broken
                break
            lo, hi, mm = cache.lo, cache.hi, cache.mm
            delta = cache.base - lo
        off = addr + delta
        mm[off:off + total] = smm[slot + start:slot + DATA_OFF + flen]
        if counts is not None:
            add_one(counts, smm, slot + DATA_OFF + skip, flen - skip)
        put(head | total << 32)
        slot += ssize
        if slot == send:
            slot = SLOT0
    if bad >= 0 and len(elems) == len(heads) and not more:
        _bad_head(vq, bad)
    if not elems:
        return 0, 0, more
    n, nbytes = _publish_rx(vq, rings, elems, last, hdr_len)
    # Slots are released after the used store: a worker killed between the
    # two leaves frames delivered but not released, which its replacement
    # releases (workers/progress.py); the other order would lose them.
    ring.consumed(cons + len(elems))
    return n, nbytes, more
