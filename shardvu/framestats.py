"""Per-frame classes of a queue's traffic: DPDK vhost xstats' size bins and
broadcast / multicast, counted by the ring loops (see :mod:`.stats` for
which frames count on a TX and on an RX queue).

Contracts:

* A frame's length is the Ethernet frame without the virtio-net header
  (DPDK's ``pkt_len``); its bin is the :data:`SIZE_BINS` entry whose range
  holds it (:data:`BIN` maps a length to the entry's index).
* A frame is broadcast when its destination MAC (its first 6 bytes) is
  ff:ff:ff:ff:ff:ff, multicast when the destination's group bit (first
  byte & 1) is set and it is not broadcast, as DPDK's
  ``rte_is_multicast_ether_addr`` / ``rte_is_broadcast_ether_addr``.  A
  frame shorter than 6 bytes has no destination and is neither.
* The helpers add to a counters object with ``sizes`` (a list, one int per
  bin), ``broadcast_packets`` and ``multicast_packets``
  (:class:`shardvu.workers.stats.Counters`).  The batch helpers cost O(1) Python steps
  for a batch whose lengths fall in one bin and whose destinations are
  unicast; C loops (``min``/``max``, slicing, ``bytes.translate``/
  ``count``) do the per-frame work.

Standard library only (imported by the hot loops, on CPython and PyPy).
"""
from __future__ import annotations

from array import array
from typing import Callable, Iterable, List, Optional, Sequence

#: Frame-size bins, named as DPDK's vhost PMD names its xstats:
#: ``(counter name, smallest length, largest length)``.  Frames shorter
#: than 64 bytes count in the first bin (DPDK counts them apart, in
#: ``undersize_packets``; shardvu exports the seven bins the issue names).
SIZE_BINS = (("size_64_packets", 0, 64), ("size_65_to_127_packets", 65, 127),
             ("size_128_to_255_packets", 128, 255), ("size_256_to_511_packets", 256, 511),
             ("size_512_to_1023_packets", 512, 1023), ("size_1024_to_1522_packets", 1024, 1522),
             ("size_1523_to_max_packets", 1523, 1 << 62))

#: Per-frame classes counted beside the size bins.
CAST_FIELDS = ("broadcast_packets", "multicast_packets")

#: ``BIN[length]`` = index in :data:`SIZE_BINS` for lengths 0..1523; use
#: :func:`bin_of` for any length.
BIN = bytes(i for i, (_n, lo, hi) in enumerate(SIZE_BINS) for _ in range(lo, min(hi, 1523) + 1))
_TOP = len(BIN) - 1                 # 1523: the last bin from here on
#: ``bytes.translate`` table: a destination's first byte -> its group bit
_GROUP = bytes(b & 1 for b in range(256))
_BCAST = b"\xff" * 6


def bin_of(length: int) -> int:
    """Index in :data:`SIZE_BINS` of a frame of ``length`` bytes."""
    return BIN[length] if length < _TOP else BIN[_TOP]


def add_lengths(c, lens: Sequence[int], off: int, low: int, high: int) -> None:
    """Count frames of lengths ``x - off`` for ``x`` in ``lens`` (``low``/
    ``high``: ``min``/``max`` of ``lens``, which the caller has already)."""
    sizes = c.sizes
    b = bin_of(low - off)
    if b == bin_of(high - off):
        sizes[b] += len(lens)
        return
    top = _TOP + off
    for x in lens:
        sizes[BIN[x - off] if x < top else 6] += 1


def add_firsts(c, firsts: bytes, broadcasts: Callable[[], int]) -> None:
    """Count casts from ``firsts``, the first destination byte of each
    frame (every frame at least 6 bytes long); ``broadcasts()`` returns how
    many of the frames are broadcast and is called only when some first
    byte is 0xff."""
    group = firsts.translate(_GROUP).count(1)
    if group:
        bc = broadcasts() if 255 in firsts else 0
        c.broadcast_packets += bc
        c.multicast_packets += group - bc


#: the last evenly stepped address run checked: (first, step, count) and
#: the addresses as an array (one C compare against the next batch's)
_RUN: list = [None, None]


def _even(addrs: List[int], col) -> Optional[int]:
    """The step (> 0) when ``addrs`` step evenly, else None.  ``col``: the
    same addresses as a typed memoryview (a strided slice of the descriptor
    table), compared in C against the cached run, without objects."""
    k = len(addrs)
    a0 = addrs[0]
    if k == 1:
        return 1
    step = addrs[1] - a0
    if step <= 0 or addrs[-1] - a0 != step * (k - 1):
        return None
    key = (a0, step, k)
    if _RUN[0] != key:
        _RUN[0], _RUN[1] = key, array("Q", range(a0, addrs[-1] + 1, step))
    ref = _RUN[1]
    return step if (col == ref if col is not None else addrs == ref.tolist()) else None


def add_guest(c, mm, delta: int, addrs: List[int], lens: List[int], off: int,
              low: int, high: int, col=None) -> None:
    """Count frames in a mapping: frame ``i`` starts at ``mm[addrs[i] +
    delta]`` and is ``lens[i] - off`` bytes long (``low``/``high``: min/max
    of ``lens``; ``col``: see :func:`_even`).  One strided slice reads the
    first bytes when the addresses step evenly (a driver's buffer pool),
    else one C-level gather."""
    add_lengths(c, lens, off, low, high)
    if low - off < 6:
        for a, x in zip(addrs, lens):
            if x - off >= 6:
                add_frame_cast(c, mm[a + delta:a + delta + 6])
        return
    step = _even(addrs, col)
    if step is not None:
        firsts = mm[addrs[0] + delta:addrs[-1] + delta + 1:step]
    else:
        firsts = bytes(map(mm.__getitem__, [a + delta for a in addrs]))
    add_firsts(c, firsts, lambda: sum(1 for a in addrs if mm[a + delta:a + delta + 6] == _BCAST))


def add_slots(c, smm, first: int, stride: int, lens: List[int], off: int,
              low: int, high: int) -> None:
    """Count ``len(lens)`` frames in consecutive slots of a ring mapping:
    slot ``i``'s bytes start at ``smm[first + i * stride]``, ``off`` bytes
    before the frame, ``lens[i]`` bytes in all (no wrap between them)."""
    add_lengths(c, lens, off, low, high)
    k = len(lens)
    first += off
    if low - off < 6:
        for i, x in enumerate(lens):
            if x - off >= 6:
                at = first + i * stride
                add_frame_cast(c, smm[at:at + 6])
        return
    add_firsts(c, smm[first:first + (k - 1) * stride + 1:stride],
               lambda: sum(1 for i in range(k)
                           if smm[first + i * stride:first + i * stride + 6] == _BCAST))


def add_frame_cast(c, dst) -> None:
    """Count one frame's cast from its destination (6 bytes, or fewer: then
    the frame is too short to have one)."""
    if len(dst) >= 6 and dst[0] & 1:
        if dst[:6] == _BCAST:
            c.broadcast_packets += 1
        else:
            c.multicast_packets += 1


def add_frames(c, frames: Iterable, off: int = 0) -> None:
    """Count each frame of ``frames`` (bytes-like, each ``off`` header bytes
    and then the Ethernet frame), one at a time."""
    sizes = c.sizes
    for f in frames:
        n = len(f) - off
        sizes[BIN[n] if n < _TOP else 6] += 1
        if n >= 6 and f[off] & 1:
            if bytes(f[off:off + 6]) == _BCAST:
                c.broadcast_packets += 1
            else:
                c.multicast_packets += 1


def add_batch(c, frames: Sequence, n: int, off: int = 0) -> None:
    """Count ``frames[:n]``: O(1) when they are one frame repeated (a
    generator's batch), else :func:`add_frames`."""
    first = frames[0]
    if first is frames[n - 1] and frames[:n].count(first) == n:
        add_same(c, first, off, n)
    else:
        add_frames(c, frames[:n], off)


def add_same(c, frame, off: int, n: int) -> None:
    """Count ``n`` copies of one frame (a generator's constant frame)."""
    if n:
        length = len(frame) - off
        c.sizes[bin_of(length)] += n
        if length >= 6 and frame[off] & 1:
            if bytes(frame[off:off + 6]) == _BCAST:
                c.broadcast_packets += n
            else:
                c.multicast_packets += n


def add_one(c, mm, at: int, length: int, cast: bool = True) -> None:
    """Count one frame of ``length`` bytes starting at ``mm[at]`` (its
    cast too, unless ``cast`` is false)."""
    c.sizes[BIN[length] if length < _TOP else 6] += 1
    if cast and length >= 6 and mm[at] & 1:
        if mm[at:at + 6] == _BCAST:
            c.broadcast_packets += 1
        else:
            c.multicast_packets += 1
