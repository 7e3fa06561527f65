"""Inflight I/O tracking buffer (GET_INFLIGHT_FD / SET_INFLIGHT_FD), split layout.

The buffer holds one region per queue, each ``queue_region_size(queue_size)``
bytes: a 16-byte header then ``queue_size`` 16-byte descriptor states::

    header  u64 features | u16 version | u16 desc_num | u16 last_batch_head | u16 used_idx
    desc[i] u8 inflight | u8 pad[5] | u16 next | u64 counter

All fields are little-endian.  The buffer is shared with the front-end,
which keeps it across a back-end restart; its content is therefore
untrusted input on SET_INFLIGHT_FD, and :class:`InflightQueue` bounds every
index by the layout's ``queue_size``, never by the header's ``desc_num``.
"""
from __future__ import annotations

import fcntl
import mmap
import os
import struct
from typing import Dict, Optional

from .protocol import VIRTQUEUE_MAX_SIZE, InflightDesc
from .transport import check_mappable

__all__ = ["queue_region_size", "InflightBuffer", "InflightQueue",
           "INFLIGHT_VERSION", "INFLIGHT_ALIGNMENT"]

INFLIGHT_VERSION = 1
INFLIGHT_ALIGNMENT = 64
HEADER_SIZE = 16
DESC_SIZE = 16
#: Largest queue count accepted from SET_INFLIGHT_FD.
MAX_QUEUES = 1024

_U8 = struct.Struct("B")
_U16 = struct.Struct("H")
_U64 = struct.Struct("Q")
_OFF_FEATURES, _OFF_VERSION, _OFF_DESC_NUM, _OFF_LAST_BATCH, _OFF_USED_IDX = 0, 8, 10, 12, 14
_D_INFLIGHT, _D_NEXT, _D_COUNTER = 0, 6, 8
# Linux's values where fcntl lacks the names (PyPy 3.9)
_F_ADD_SEALS = getattr(fcntl, "F_ADD_SEALS", 1033)
_F_SEAL_SEAL = getattr(fcntl, "F_SEAL_SEAL", 0x1)
_F_SEAL_SHRINK = getattr(fcntl, "F_SEAL_SHRINK", 0x2)
_F_SEAL_GROW = getattr(fcntl, "F_SEAL_GROW", 0x4)


def queue_region_size(queue_size: int) -> int:
    """Bytes of one queue's region: header plus ``queue_size`` descriptor
    states, rounded up to 64."""
    raw = HEADER_SIZE + DESC_SIZE * queue_size
    return (raw + INFLIGHT_ALIGNMENT - 1) // INFLIGHT_ALIGNMENT * INFLIGHT_ALIGNMENT


def _check_geometry(num_queues: int, queue_size: int) -> None:
    if not 1 <= num_queues <= MAX_QUEUES:
        raise ValueError(f"inflight num_queues {num_queues} not in 1..{MAX_QUEUES}")
    if not 1 <= queue_size <= VIRTQUEUE_MAX_SIZE or queue_size & (queue_size - 1):
        raise ValueError(f"inflight queue_size {queue_size} is not a power of two "
                         f"<= {VIRTQUEUE_MAX_SIZE}")


class InflightQueue:
    """One queue's region.  ``capacity`` (the layout's queue size) bounds
    every descriptor index; an out-of-range index raises IndexError."""

    __slots__ = ("view", "capacity", "_v16", "_v64")

    def __init__(self, view: memoryview, capacity: int):
        if len(view) < HEADER_SIZE + DESC_SIZE * capacity:
            raise ValueError("inflight queue region too small")
        self.view = view
        self.capacity = capacity
        # Stores go through casts: one 2- or 8-byte store per field.
        # struct.pack_into zeroes a field before writing it, and a crash in
        # between would leave that zero for the next back-end to trust.
        n = len(view) & ~7
        self._v16 = view[:n].cast("H")
        self._v64 = view[:n].cast("Q")

    # -- header -----------------------------------------------------------
    def _get16(self, off: int) -> int:
        return _U16.unpack_from(self.view, off)[0]

    def _set16(self, off: int, value: int) -> None:
        self._v16[off >> 1] = value & 0xFFFF

    @property
    def features(self) -> int:
        return _U64.unpack_from(self.view, _OFF_FEATURES)[0]

    @features.setter
    def features(self, value: int) -> None:
        self._v64[_OFF_FEATURES >> 3] = value

    @property
    def version(self) -> int:
        return self._get16(_OFF_VERSION)

    @version.setter
    def version(self, value: int) -> None:
        self._set16(_OFF_VERSION, value)

    @property
    def desc_num(self) -> int:
        return self._get16(_OFF_DESC_NUM)

    @desc_num.setter
    def desc_num(self, value: int) -> None:
        self._set16(_OFF_DESC_NUM, value)

    @property
    def last_batch_head(self) -> int:
        return self._get16(_OFF_LAST_BATCH)

    @last_batch_head.setter
    def last_batch_head(self, value: int) -> None:
        self._set16(_OFF_LAST_BATCH, value)

    @property
    def used_idx(self) -> int:
        return self._get16(_OFF_USED_IDX)

    @used_idx.setter
    def used_idx(self, value: int) -> None:
        self._set16(_OFF_USED_IDX, value)

    # -- descriptor states -------------------------------------------------
    def _desc_off(self, i: int) -> int:
        if not 0 <= i < self.capacity:
            raise IndexError(f"inflight descriptor {i} out of range 0..{self.capacity - 1}")
        return HEADER_SIZE + DESC_SIZE * i

    def is_inflight(self, i: int) -> bool:
        return self.view[self._desc_off(i) + _D_INFLIGHT] != 0

    def set_inflight(self, i: int, flag: bool) -> None:
        self.view[self._desc_off(i) + _D_INFLIGHT] = 1 if flag else 0

    def get_next(self, i: int) -> int:
        return _U16.unpack_from(self.view, self._desc_off(i) + _D_NEXT)[0]

    def set_next(self, i: int, value: int) -> None:
        self._set16(self._desc_off(i) + _D_NEXT, value)

    def get_counter(self, i: int) -> int:
        return _U64.unpack_from(self.view, self._desc_off(i) + _D_COUNTER)[0]

    def set_counter(self, i: int, value: int) -> None:
        self._v64[(self._desc_off(i) + _D_COUNTER) >> 3] = value & 0xFFFFFFFFFFFFFFFF

    def initialize(self, desc_num: int) -> None:
        """Zero the region and write version 1 and ``desc_num`` (a fresh or
        reset buffer)."""
        if not 0 <= desc_num <= self.capacity:
            raise ValueError(f"desc_num {desc_num} exceeds capacity {self.capacity}")
        end = HEADER_SIZE + DESC_SIZE * self.capacity
        self.view[:end] = bytes(end)
        self.version = INFLIGHT_VERSION
        self.desc_num = desc_num

    def inflight_heads(self, limit: Optional[int] = None) -> list:
        """``(counter, index)`` of every entry below ``limit`` (default the
        capacity) whose inflight flag is set, sorted by counter then index."""
        n = self.capacity if limit is None else min(limit, self.capacity)
        view = self.view
        out = []
        for i in range(n):
            off = HEADER_SIZE + DESC_SIZE * i
            if view[off]:
                out.append((_U64.unpack_from(view, off + _D_COUNTER)[0], i))
        out.sort()
        return out


class InflightBuffer:
    """The whole inflight buffer: ``num_queues`` regions in one shared fd.

    Owns ``fd`` and its mapping; :meth:`close` releases both.  Build it with
    :meth:`create` (GET_INFLIGHT_FD: the back-end allocates) or :meth:`map`
    (SET_INFLIGHT_FD: the front-end hands a buffer back).
    """

    def __init__(self, fd: int, mm: mmap.mmap, mmap_size: int, mmap_offset: int,
                 num_queues: int, queue_size: int):
        self.fd = fd
        self.mmap_size = mmap_size
        self.mmap_offset = mmap_offset
        self.num_queues = num_queues
        self.queue_size = queue_size
        self.region_size = queue_region_size(queue_size)
        self._mm = mm
        self._view: Optional[memoryview] = memoryview(mm)[mmap_offset:mmap_offset + mmap_size]
        self._queues: Dict[int, InflightQueue] = {}

    @classmethod
    def create(cls, num_queues: int, queue_size: int) -> "InflightBuffer":
        """A new zeroed memfd buffer for ``num_queues`` queues of
        ``queue_size`` descriptors, every region initialised (version 1,
        ``desc_num`` = ``queue_size``), sealed against shrinking and
        growing.  Raises ValueError on a bad geometry."""
        _check_geometry(num_queues, queue_size)
        size = num_queues * queue_region_size(queue_size)
        fd = os.memfd_create("shardvu-inflight", os.MFD_CLOEXEC | os.MFD_ALLOW_SEALING)
        try:
            os.ftruncate(fd, size)
            # The front-end gets this fd: sealed, it cannot shrink the file
            # under our mapping (SIGBUS), as libvhost-user seals its own.
            fcntl.fcntl(fd, _F_ADD_SEALS, _F_SEAL_SHRINK | _F_SEAL_GROW | _F_SEAL_SEAL)
            mm = mmap.mmap(fd, size, flags=mmap.MAP_SHARED,
                           prot=mmap.PROT_READ | mmap.PROT_WRITE)
        except BaseException:
            os.close(fd)
            raise
        buf = cls(fd, mm, size, 0, num_queues, queue_size)
        for i in range(num_queues):
            buf.queue(i).initialize(queue_size)
        return buf

    @classmethod
    def map(cls, fd: int, mmap_size: int, mmap_offset: int, num_queues: int,
            queue_size: int) -> "InflightBuffer":
        """Map a buffer the front-end sent with SET_INFLIGHT_FD.

        Takes ownership of ``fd`` (closed on failure too).  Raises
        ValueError unless ``num_queues`` is 1..1024, ``queue_size`` a power
        of two up to 1024, ``mmap_size`` at least ``num_queues`` regions and
        the file large enough to back ``mmap_offset + mmap_size`` bytes.
        Region contents are not checked here (see
        :meth:`shardvu.virtqueue.VirtQueue.check_inflight`)."""
        try:
            _check_geometry(num_queues, queue_size)
            need = num_queues * queue_region_size(queue_size)
            if mmap_size < need:
                raise ValueError(f"inflight mmap_size {mmap_size} < {need} needed for "
                                 f"{num_queues} queues of {queue_size}")
            if mmap_offset < 0 or mmap_offset + mmap_size > 1 << 63:
                raise ValueError(f"bad inflight mmap_offset {mmap_offset}")
            check_mappable(fd, mmap_offset, mmap_size, "inflight")
            try:
                mm = mmap.mmap(fd, mmap_offset + mmap_size, flags=mmap.MAP_SHARED,
                               prot=mmap.PROT_READ | mmap.PROT_WRITE)
            except (OSError, OverflowError) as exc:
                raise ValueError(f"cannot map inflight fd: {exc}") from None
        except BaseException:
            os.close(fd)
            raise
        return cls(fd, mm, mmap_size, mmap_offset, num_queues, queue_size)

    def describe(self) -> InflightDesc:
        """The GET_INFLIGHT_FD reply payload for this buffer."""
        return InflightDesc(self.mmap_size, self.mmap_offset, self.num_queues, self.queue_size)

    def queue(self, i: int) -> InflightQueue:
        """Region of queue ``i`` (IndexError beyond ``num_queues``)."""
        if self._view is None:
            raise ValueError("inflight buffer is closed")
        if not 0 <= i < self.num_queues:
            raise IndexError(f"inflight queue {i} out of range 0..{self.num_queues - 1}")
        q = self._queues.get(i)
        if q is None:
            start = i * self.region_size
            q = InflightQueue(self._view[start:start + self.region_size], self.queue_size)
            self._queues[i] = q
        return q

    def close(self) -> None:
        """Unmap and close the fd.  Idempotent.  Queues handed out become
        unusable (their views are released)."""
        if self._view is None:
            return
        for q in self._queues.values():
            q.view.release()
        self._queues.clear()
        self._view.release()
        self._view = None
        try:
            self._mm.close()
        except BufferError:
            pass
        if self.fd >= 0:
            os.close(self.fd)
            self.fd = -1

    @property
    def closed(self) -> bool:
        return self._view is None
