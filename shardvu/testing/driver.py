"""The DRIVER side of a split virtqueue: what a guest's virtio driver does.

A :class:`DriverQueue` lays out a descriptor table, an available ring and a
used ring inside guest memory (any object with ``read(gpa, n)``,
``write(gpa, data)`` and ``gpa_range(gpa, n)``, such as
:class:`shardvu.memory.GuestMemory`), hands out descriptors from a free
list, publishes buffers to the device and collects the used ones.

All addresses here are guest-physical.  A front-end that must tell a
back-end where the rings are adds the owning region's ``uva - gpa``.

Contracts:

* The ring lies in one memory region; its bytes are zeroed on creation.
* :meth:`DriverQueue.add` writes descriptors and the avail ring entry but
  does not make it visible: :meth:`DriverQueue.publish` stores the avail
  ``idx`` (after the entries, so a device never sees an idx ahead of its
  entries).
* :meth:`DriverQueue.get_used` reads the used ``idx`` before the elements
  and returns every chain the device has finished since the last call, in
  used-ring order, freeing the descriptors of chains made with
  :meth:`DriverQueue.add`.
* The raw accessors (:meth:`write_desc`, :meth:`push_avail`,
  :meth:`write_avail_idx`) bypass the bookkeeping so tests can build
  hostile rings; heads pushed raw are returned by :meth:`get_used` but free
  nothing.
* Indices are free-running 16-bit counters; all arithmetic wraps at 2**16.
"""
from __future__ import annotations

import struct
import sys
from collections import deque
from typing import Callable, Deque, Dict, List, NamedTuple, Optional, Sequence, Tuple

__all__ = [
    "DriverQueue", "DriverError", "QueueFull", "RingLayout", "ring_layout", "need_event",
    "VRING_DESC_F_NEXT", "VRING_DESC_F_WRITE", "VRING_DESC_F_INDIRECT",
    "VRING_USED_F_NO_NOTIFY", "VRING_AVAIL_F_NO_INTERRUPT", "DESC_SIZE",
]

VRING_DESC_F_NEXT = 1
VRING_DESC_F_WRITE = 2
VRING_DESC_F_INDIRECT = 4
VRING_USED_F_NO_NOTIFY = 1
VRING_AVAIL_F_NO_INTERRUPT = 1

DESC_SIZE = 16
USED_ELEM_SIZE = 8
MAX_QUEUE_SIZE = 32768

_DESC = struct.Struct("QIHH")
_U16 = struct.Struct("H")
_U32 = struct.Struct("I")
_ELEM = struct.Struct("II")
_MASK16 = 0xFFFF
_PYPY = sys.implementation.name == "pypy"

Buffers = Sequence[Tuple[int, int]]


class DriverError(Exception):
    """The device returned something a correct device never would (an
    unknown head in the used ring); ``used`` holds the entries read in the
    call that failed, already consumed."""

    def __init__(self, reason: str, used: Optional[List[Tuple[int, int]]] = None):
        super().__init__(reason)
        self.used = used or []


class QueueFull(Exception):
    """Not enough free descriptors for the requested chain."""


class RingLayout(NamedTuple):
    """Byte offsets of the three ring parts from the ring's base address."""
    desc: int
    avail: int
    used: int
    total: int


def _align(x: int, a: int) -> int:
    return (x + a - 1) & ~(a - 1)


def ring_layout(size: int, used_align: int = 4) -> RingLayout:
    """Layout of a split ring of ``size`` entries: descriptor table at 0
    (16-byte alignment holds if the base is 16-aligned), avail ring right
    after it (6 + 2*size bytes, used_event included), used ring at the next
    multiple of ``used_align`` (at least 4; 4096 gives the legacy layout).
    ``total`` counts the used ring's avail_event field."""
    if size < 1 or size > MAX_QUEUE_SIZE or size & (size - 1):
        raise ValueError(f"queue size {size} is not a power of 2 in 1..{MAX_QUEUE_SIZE}")
    if used_align < 4 or used_align & (used_align - 1):
        raise ValueError(f"used ring alignment {used_align} is not a power of 2 >= 4")
    avail = DESC_SIZE * size
    used = _align(avail + 6 + 2 * size, used_align)
    return RingLayout(0, avail, used, used + 6 + USED_ELEM_SIZE * size)


def need_event(event: int, new: int, old: int) -> bool:
    """The spec's event-index test: True when ``event`` lies in the window
    ``[old, new)`` of 16-bit free-running indices."""
    return ((new - event - 1) & _MASK16) < ((new - old) & _MASK16)


class _Chain:
    __slots__ = ("descs", "writable", "table", "token")

    def __init__(self, descs: List[int], writable: int, table: Optional[Tuple[int, int]], token: object):
        self.descs = descs
        self.writable = writable
        self.table = table
        self.token = token


class DriverQueue:
    """A split virtqueue as seen by the driver.

    ``mem`` is the guest memory (read/write/gpa_range by guest-physical
    address); ``gpa`` the ring base (16-aligned); ``size`` a power of 2.
    ``alloc(nbytes, align) -> gpa`` provides guest memory for indirect
    tables (only needed for ``add(..., indirect=True)``).  ``event_idx``
    selects VIRTIO_F_EVENT_IDX behaviour for kick and interrupt suppression;
    it may be changed after feature negotiation.
    """

    def __init__(self, mem, gpa: int, size: int, *, event_idx: bool = False,
                 used_align: int = 4, alloc: Optional[Callable[[int, int], int]] = None,
                 strict: bool = True):
        if gpa % 16:
            raise ValueError(f"ring base {gpa:#x} is not 16-byte aligned")
        self.layout = ring_layout(size, used_align)
        self.mem = mem
        self.size = size
        self.gpa = gpa
        self.desc_gpa = gpa + self.layout.desc
        self.avail_gpa = gpa + self.layout.avail
        self.used_gpa = gpa + self.layout.used
        self.event_idx = event_idx
        self.alloc = alloc
        self.strict = strict
        found = mem.gpa_range(gpa, self.layout.total)
        if found is None:
            raise ValueError(f"ring {gpa:#x}+{self.layout.total:#x} is not inside one memory region")
        region, off = found
        self._view: Optional[memoryview] = region.view[off:off + self.layout.total]
        self._view[:] = bytes(self.layout.total)
        # 16-bit fields (indices, flags, events) are stored through this cast:
        # one 2-byte store each.  struct.pack_into would zero the field
        # first, and a device polling avail->idx could see that 0.
        self._view16: Optional[memoryview] = self._view.cast("H")
        self._free: Deque[int] = deque(range(size))
        self._chains: Dict[int, _Chain] = {}
        self._raw_heads: Dict[int, int] = {}
        self._tables: Dict[int, List[int]] = {}
        self.avail_idx = 0          # shadow: next avail slot to fill
        self.published_idx = 0      # avail idx last stored in memory
        self._kick_old = 0          # avail idx at the last kick_needed()
        self.last_used_idx = 0      # next used entry to read
        self._avail_flags = 0
        #: used entries whose length exceeded the chain's writable bytes
        self.len_violations: List[Tuple[int, int, int]] = []

    # -- low level ring access -------------------------------------------------
    @property
    def view(self) -> memoryview:
        if self._view is None:
            raise ValueError("queue is closed")
        return self._view

    def _r16(self, off: int) -> int:
        return _U16.unpack_from(self.view, off)[0]

    def _w16(self, off: int, value: int) -> None:
        if self._view16 is None:
            raise ValueError("queue is closed")
        if _PYPY:       # PyPy's struct store is one access, its cast store may tear
            _U16.pack_into(self.view, off, value & _MASK16)
        else:
            self._view16[off >> 1] = value & _MASK16

    def write_desc(self, i: int, addr: int, length: int, flags: int, next: int) -> None:
        """Raw: write descriptor ``i`` of the table (no bookkeeping)."""
        if not 0 <= i < self.size:
            raise IndexError(f"descriptor {i} outside a table of {self.size}")
        _DESC.pack_into(self.view, self.layout.desc + i * DESC_SIZE,
                        addr & (2**64 - 1), length & 0xFFFFFFFF, flags & _MASK16, next & _MASK16)

    def read_desc(self, i: int) -> Tuple[int, int, int, int]:
        """Descriptor ``i`` as ``(addr, len, flags, next)``."""
        return _DESC.unpack_from(self.view, self.layout.desc + i * DESC_SIZE)

    def push_avail(self, head: int) -> None:
        """Raw: append ``head`` (any 16-bit value) to the avail ring without
        publishing it and without touching the free list.  Such heads come
        back from :meth:`get_used` without freeing anything."""
        self._w16(self.layout.avail + 4 + 2 * (self.avail_idx % self.size), head)
        self.avail_idx = (self.avail_idx + 1) & _MASK16
        self._raw_heads[head & _MASK16] = self._raw_heads.get(head & _MASK16, 0) + 1

    def write_avail_entry(self, slot: int, head: int) -> None:
        """Raw: overwrite avail ring entry ``slot % size`` with ``head``
        (even one already published: a hostile driver's rewrite)."""
        self._w16(self.layout.avail + 4 + 2 * (slot % self.size), head)

    def write_avail_idx(self, idx: int) -> None:
        """Raw: store ``idx`` as the avail ring's idx (shadow follows)."""
        self._w16(self.layout.avail + 2, idx)
        self.avail_idx = self.published_idx = idx & _MASK16

    def write_avail_flags(self, flags: int) -> None:
        """Raw: store the avail ring's flags."""
        self._avail_flags = flags & _MASK16
        self._w16(self.layout.avail, flags)

    # -- ring fields ----------------------------------------------------------------
    @property
    def avail_flags(self) -> int:
        return self._r16(self.layout.avail)

    @property
    def used_flags(self) -> int:
        return self._r16(self.layout.used)

    @property
    def used_idx(self) -> int:
        """The used ring's idx as the device last wrote it."""
        return self._r16(self.layout.used + 2)

    @property
    def used_event(self) -> int:
        return self._r16(self.layout.avail + 4 + 2 * self.size)

    @property
    def avail_event(self) -> int:
        """The device's avail_event (meaningful with EVENT_IDX only)."""
        return self._r16(self.layout.used + 4 + USED_ELEM_SIZE * self.size)

    def used_elem(self, slot: int) -> Tuple[int, int]:
        """Raw: used ring element ``slot % size`` as ``(id, len)``."""
        return _ELEM.unpack_from(self.view, self.layout.used + 4 + USED_ELEM_SIZE * (slot % self.size))

    def avail_entry(self, slot: int) -> int:
        """Raw: avail ring entry ``slot % size``."""
        return self._r16(self.layout.avail + 4 + 2 * (slot % self.size))

    @property
    def num_free(self) -> int:
        """Descriptors available to :meth:`add`."""
        return len(self._free)

    @property
    def outstanding(self) -> int:
        """Chains added and not yet returned by the device."""
        return len(self._chains)

    def pending_used(self) -> int:
        """Used entries the device has written that :meth:`get_used` has not read."""
        return (self.used_idx - self.last_used_idx) & _MASK16

    def token(self, head: int) -> object:
        """The ``token`` given to :meth:`add` for an outstanding ``head``."""
        return self._chains[head].token

    # -- adding buffers ----------------------------------------------------------
    def add(self, out_bufs: Buffers, in_bufs: Buffers = (), indirect: bool = False,
            token: object = None) -> int:
        """Chain ``out_bufs`` (device-readable) then ``in_bufs`` (device-
        writable), each ``(gpa, len)``, and put the head in the avail ring
        (unpublished).  Returns the head descriptor index.  With
        ``indirect`` the chain goes in an indirect table (from ``alloc``)
        and takes one ring descriptor.  Raises :class:`QueueFull` when too
        few descriptors are free and ValueError for an empty chain."""
        bufs = [(a, n, 0) for a, n in out_bufs] + [(a, n, VRING_DESC_F_WRITE) for a, n in in_bufs]
        if not bufs:
            raise ValueError("a descriptor chain needs at least one buffer")
        writable = sum(n for _a, n in in_bufs)
        if indirect:
            if not self._free:
                raise QueueFull("no free descriptor for an indirect table")
            cap, table = self._get_table(len(bufs))
            raw = bytearray(DESC_SIZE * len(bufs))
            for i, (a, n, f) in enumerate(bufs):
                last = i == len(bufs) - 1
                _DESC.pack_into(raw, i * DESC_SIZE, a, n, f | (0 if last else VRING_DESC_F_NEXT),
                                0 if last else i + 1)
            self.mem.write(table, bytes(raw))
            head = self._free.popleft()
            self.write_desc(head, table, len(raw), VRING_DESC_F_INDIRECT, 0)
            self._chains[head] = _Chain([head], writable, (cap, table), token)
        else:
            if len(bufs) > len(self._free):
                raise QueueFull(f"chain of {len(bufs)} needs more than {len(self._free)} free descriptors")
            descs = [self._free.popleft() for _ in bufs]
            for i, (a, n, f) in enumerate(bufs):
                last = i == len(bufs) - 1
                self.write_desc(descs[i], a, n, f | (0 if last else VRING_DESC_F_NEXT),
                                0 if last else descs[i + 1])
            head = descs[0]
            self._chains[head] = _Chain(descs, writable, None, token)
        self._w16(self.layout.avail + 4 + 2 * (self.avail_idx % self.size), head)
        self.avail_idx = (self.avail_idx + 1) & _MASK16
        return head

    def _get_table(self, n: int) -> Tuple[int, int]:
        cap = 1
        while cap < n:
            cap <<= 1
        free = self._tables.setdefault(cap, [])
        if free:
            return cap, free.pop()
        if self.alloc is None:
            raise ValueError("indirect descriptors need an alloc function")
        return cap, self.alloc(cap * DESC_SIZE, 16)

    def publish(self) -> int:
        """Store the shadow avail idx in the ring (after the entries, which
        :meth:`add` already wrote).  Returns how many entries became
        visible."""
        n = (self.avail_idx - self.published_idx) & _MASK16
        self._w16(self.layout.avail + 2, self.avail_idx)
        self.published_idx = self.avail_idx
        return n

    def kick_needed(self) -> bool:
        """Whether the device wants a notification for what was published
        since the previous call: with EVENT_IDX, if avail_event lies in that
        window; otherwise unless the device set VRING_USED_F_NO_NOTIFY.
        False when nothing new was published."""
        old, new = self._kick_old, self.published_idx
        self._kick_old = new
        if old == new:
            return False
        if self.event_idx:
            return need_event(self.avail_event, new, old)
        return not self.used_flags & VRING_USED_F_NO_NOTIFY

    # -- used buffers --------------------------------------------------------------
    def get_used(self) -> List[Tuple[int, int]]:
        """Read the used idx, then every new element; return ``(head,
        written_len)`` pairs in order and free the chains.  In ``strict``
        mode a head that is neither outstanding nor pushed raw raises
        :class:`DriverError` (after all entries were consumed)."""
        end = self.used_idx
        out: List[Tuple[int, int]] = []
        bad: List[int] = []
        while self.last_used_idx != end:
            head, length = self.used_elem(self.last_used_idx)
            self.last_used_idx = (self.last_used_idx + 1) & _MASK16
            out.append((head, length))
            chain = self._chains.pop(head, None)
            if chain is not None:
                if length > chain.writable:
                    self.len_violations.append((head, length, chain.writable))
                self._free.extend(chain.descs)
                if chain.table is not None:
                    self._tables[chain.table[0]].append(chain.table[1])
            elif self._raw_heads.get(head, 0):
                self._raw_heads[head] -= 1
                if not self._raw_heads[head]:
                    del self._raw_heads[head]
            else:
                bad.append(head)
        if bad and self.strict:
            raise DriverError(f"device used unknown heads {bad}", out)
        return out

    def detach(self, head: int) -> object:
        """Forget an outstanding chain without the device returning it
        (e.g. after a device reset); frees its descriptors, returns its token."""
        chain = self._chains.pop(head)
        self._free.extend(chain.descs)
        if chain.table is not None:
            self._tables[chain.table[0]].append(chain.table[1])
        return chain.token

    # -- notification suppression --------------------------------------------------
    def set_used_event(self, idx: int) -> None:
        """Store ``used_event``: ask for a notification once the device writes
        used entry ``idx`` (EVENT_IDX only)."""
        self._w16(self.layout.avail + 4 + 2 * self.size, idx)

    def disable_interrupts(self) -> None:
        """Ask the device not to notify: VRING_AVAIL_F_NO_INTERRUPT without
        EVENT_IDX, else a used_event just behind the last used index (the
        spec requires flags 0 with EVENT_IDX)."""
        if self.event_idx:
            self.set_used_event(self.last_used_idx - 1)
        else:
            self.write_avail_flags(self._avail_flags | VRING_AVAIL_F_NO_INTERRUPT)

    def enable_interrupts(self) -> bool:
        """Ask for a notification on the next used entry.  Returns True when
        used entries are already pending (the caller should poll again
        instead of waiting)."""
        if self.event_idx:
            if self._avail_flags:
                self.write_avail_flags(0)
            self.set_used_event(self.last_used_idx)
        else:
            self.write_avail_flags(self._avail_flags & ~VRING_AVAIL_F_NO_INTERRUPT)
        return self.pending_used() != 0

    def close(self) -> None:
        """Release the view on guest memory (so the mapping can be closed)."""
        if self._view16 is not None:
            self._view16.release()
            self._view16 = None
        if self._view is not None:
            self._view.release()
            self._view = None

    def __repr__(self) -> str:
        return (f"DriverQueue(gpa={self.gpa:#x}, size={self.size}, avail={self.avail_idx}, "
                f"used={self.last_used_idx}, free={self.num_free})")
