"""The split virtqueue, back-end side: libvhost-user's ``VuVirtq`` and the
``vu_queue_*`` API.

Ring layout (virtio 1.x split ring, little-endian)::

    desc[num]  16 bytes each: u64 addr | u32 len | u16 flags | u16 next
    avail      u16 flags | u16 idx | u16 ring[num] | u16 used_event
    used       u16 flags | u16 idx | {u32 id, u32 len}[num] | u16 avail_event

Everything the driver wrote is untrusted.  A chain walk copies each
descriptor out of shared memory once and checks it before use; anything a
well-behaved driver cannot produce marks the queue broken
(:meth:`VirtQueue.mark_broken`) instead of raising, and the queue then
yields nothing until :meth:`VirtQueue.reset`.

Memory ordering.  The protocol needs the back-end to load ``avail->idx``
before the descriptors that idx publishes, to store used elements before
the ``used->idx`` store that publishes them, and a full barrier between that
store and reading ``used_event``/``avail->flags`` in :meth:`VirtQueue.notify`
(likewise after re-enabling notifications).  Here every ring access is a
separate ``struct`` call on a memoryview of a ``MAP_SHARED`` mapping, which
CPython executes in program order (the GIL gives one thread at a time, and
the interpreter does not reorder memory accesses across bytecodes).  On
x86-64 (TSO) the hardware keeps load->load and store->store order, so
program order gives the first two.  Index and flag fields must be read and
written in one access, never torn: reads use *native* struct formats
("H", not "<H"), which CPython serves with a single ``memcpy`` of the field
(one 16-bit load), while the standard-size "<H" codec goes byte by byte --
a torn ``avail->idx`` read looks like a jump of thousands of entries.
Stores to the fields the driver reads (``used->idx``, ``used->flags``,
``avail_event``) must not use ``struct.pack_into`` at all, in any format:
CPython's ``s_pack_internal`` first ``memset``s the target to zero and then
writes the value, so the driver can observe a transient 0 -- a ``used->idx``
of 0 makes it consume tens of thousands of "used" entries that do not exist
(DPDK virtio-user then corrupts its descriptor free list and crashes, or
refills its RX ring past the queue size).  They are stored through a
``memoryview.cast("H")`` of the used ring instead, whose item assignment is
a single 2-byte ``memcpy`` (one 16-bit store).  PyPy is the other way
round: its JIT compiles ``struct`` calls on the mapping into plain raw loads
and stores of the field's width (never pre-zeroed; no torn value seen in
10^8 reads), while its ``memoryview`` item store can tear (seen here), so
on PyPy these stores go through ``struct``.  PyPy's JIT does not reorder
raw memory accesses to possibly aliasing addresses, so program order again
reaches the hardware, and TSO does the rest.  (Used *elements* may still
be packed with struct, or stored in bulk -- the workers' CPython loops
write a TX batch's elements with one slice assignment, a ``memcpy`` --
because the driver does not read them before the idx store that publishes
them; likewise those loops load a batch's avail entries with one slice
copy, after the ``avail->idx`` load that published them, and the driver
does not touch a published entry again.)  Native order equals the ring's little-endian order
on every host shardvu supports (checked at import).  The only reordering
TSO allows -- a later load passing an earlier store -- is the notify case;
:func:`_smp_mb` closes it with an uncontended lock acquire/release, which is
a locked read-modify-write and therefore a full fence on x86-64.  On a weakly ordered
CPU (aarch64, POWER) this is not enough: the code would need a load-acquire
(``dmb ishld``) after reading ``avail->idx``, a store-release (``dmb
ishst``) before writing ``used->idx`` and a full ``dmb ish`` before the
notification checks, which pure Python cannot express (a small C helper
would be required).
"""
from __future__ import annotations

import logging
import struct
import sys
import threading
from typing import Callable, Dict, List, Optional, Tuple

from . import eventfd
from .dirtylog import DirtyLog
from .inflight import InflightQueue
from .memory import GuestMemory
from .reasons import BrokenReason
from .protocol import (VHOST_F_LOG_ALL, VHOST_VRING_F_LOG, VIRTIO_F_NOTIFY_ON_EMPTY,
                       VIRTIO_RING_F_EVENT_IDX, VIRTIO_RING_F_INDIRECT_DESC,
                       VIRTQUEUE_MAX_SIZE, VringAddr)

__all__ = ["RingError", "VirtqElement", "VirtQueue", "vring_need_event",
           "VRING_DESC_F_NEXT", "VRING_DESC_F_WRITE", "VRING_DESC_F_INDIRECT",
           "VRING_AVAIL_F_NO_INTERRUPT", "VRING_USED_F_NO_NOTIFY",
           "DESC_SIZE", "desc_table_size", "avail_ring_size", "used_ring_size"]

VRING_DESC_F_NEXT = 1
VRING_DESC_F_WRITE = 2
VRING_DESC_F_INDIRECT = 4
VRING_AVAIL_F_NO_INTERRUPT = 1
VRING_USED_F_NO_NOTIFY = 1

DESC_SIZE = 16
MAX_CHAIN_LEN = 0xFFFFFFFF

assert sys.byteorder == "little", "rings are little-endian; native structs assume it"
_PYPY = sys.implementation.name == "pypy"
_DESC = struct.Struct("QIHH")
_U16 = struct.Struct("H")
_USED_ELEM = struct.Struct("II")


B = BrokenReason
_FENCE = threading.Lock()


def _smp_mb() -> None:
    """Full memory barrier on x86-64: a lock acquire is a locked RMW."""
    with _FENCE:
        pass


def desc_table_size(num: int) -> int:
    return DESC_SIZE * num


def avail_ring_size(num: int) -> int:
    return 6 + 2 * num


def used_ring_size(num: int) -> int:
    return 6 + 8 * num


def vring_need_event(event_idx: int, new_idx: int, old_idx: int) -> bool:
    """True when moving an index from ``old_idx`` to ``new_idx`` crosses
    ``event_idx`` (all modulo 2**16), i.e. the other side asked to be told."""
    return ((new_idx - event_idx - 1) & 0xFFFF) < ((new_idx - old_idx) & 0xFFFF)


class RingError(Exception):
    """The ring cannot be used (unset, or not inside guest memory); the
    reason is in ``str()``."""


class _Hostile(Exception):
    """Internal: the driver wrote something invalid; becomes mark_broken()
    with ``kind`` (a :class:`BrokenReason`)."""

    def __init__(self, kind: BrokenReason, detail: str):
        super().__init__(detail)
        self.kind = kind


class VirtqElement:
    """One popped request (``VuVirtqElement``).

    ``index`` is the head descriptor index, to be handed back through
    :meth:`VirtQueue.fill`/:meth:`VirtQueue.push`.  ``out_sg`` are the
    device-readable buffers (read-only memoryviews), ``in_sg`` the
    device-writable ones, each in chain order; a buffer that spans two
    guest memory regions appears as several consecutive views.
    ``in_addr``/``out_addr`` give the guest-physical ``(gpa, len)`` of each
    view; ``in_len``/``out_len`` their totals; ``in_descs``/``out_descs``
    are non-zero exactly when the chain has a descriptor of that direction
    (its views plus its zero-length descriptors, which get none): what the
    direction rules look at.  The views alias
    guest memory: they stay valid only while the memory table is unchanged.
    """

    __slots__ = ("index", "out_sg", "in_sg", "in_addr", "out_addr", "_resubmit",
                 "in_descs", "out_descs", "in_len", "out_len")

    def __init__(self, index: int, out_sg: List[memoryview], in_sg: List[memoryview],
                 in_addr: List[Tuple[int, int]], out_addr: List[Tuple[int, int]],
                 in_descs: int, out_descs: int, in_len: int, out_len: int):
        self.index = index
        self.out_sg = out_sg
        self.in_sg = in_sg
        self.in_addr = in_addr
        self.out_addr = out_addr
        self._resubmit: Optional[Tuple[int, int]] = None
        self.in_descs = in_descs
        self.out_descs = out_descs
        self.in_len = in_len
        self.out_len = out_len

    @property
    def out_num(self) -> int:
        return len(self.out_sg)

    @property
    def in_num(self) -> int:
        return len(self.in_sg)

    def read_out(self) -> bytes:
        """A copy of all device-readable bytes, in order."""
        return b"".join(self.out_sg)

    def write_in(self, data: bytes, offset: int = 0) -> int:
        """Scatter ``data`` into the writable buffers starting ``offset``
        bytes in; returns the number of bytes copied (truncated to fit)."""
        data = memoryview(data).cast("B")
        pos = 0
        for view in self.in_sg:
            n = len(view)
            if offset >= n:
                offset -= n
                continue
            take = min(n - offset, len(data) - pos)
            view[offset:offset + take] = data[pos:pos + take]
            pos += take
            offset = 0
            if pos == len(data):
                break
        return pos

    def __repr__(self) -> str:
        return f"VirtqElement(index={self.index}, out={self.out_addr}, in={self.in_addr})"


class SplitRings:
    """Typed views of a mapped split ring, for data-path loops that index
    the ring directly (``workers/split_fast.py``).  Each item access is one
    load or store of the field's width (never torn, never pre-zeroed).

    ``desc64[2*i]`` is descriptor *i*'s addr, ``desc32[4*i+2]`` its len,
    ``desc16[8*i+6]`` its flags and ``desc16[8*i+7]`` its next;
    ``avail16[1]`` is avail->idx, ``avail16[2+k]`` ring[k],
    ``avail16[2+num]`` used_event; ``used16[1]`` is used->idx,
    ``used32[1+2*k]``/``used32[2+2*k]`` ring[k].id/len, ``used64[k]``
    ring[k] as one item ``id | len << 32`` (one store per element; the view
    starts 4 bytes into the ring, so its items are 8-byte aligned only when
    ``used`` is 4 mod 8: x86-64 takes the unaligned store, and an element
    need not be stored atomically, the used->idx store after it publishes it),
    ``used16[2+4*num]`` avail_event.  Valid until the queue's rings are
    unmapped."""

    __slots__ = ("num", "desc64", "desc32", "desc16", "avail16", "used16", "used32", "used64")

    def __init__(self, num: int, desc: memoryview, avail: memoryview, used: memoryview):
        self.num = num
        self.desc64 = desc.cast("Q")
        self.desc32 = desc.cast("I")
        self.desc16 = desc.cast("H")
        self.avail16 = avail.cast("H")
        self.used16 = used.cast("H")
        self.used32 = used[:4 + 8 * num].cast("I")
        self.used64 = used[4:4 + 8 * num].cast("Q")

    def release(self) -> None:
        for name in self.__slots__[1:]:
            getattr(self, name).release()


class VirtQueue:
    """One split virtqueue (``VuVirtq``).

    The control code (a Device or a worker) sets ``num``, ``addr``,
    ``features``, ``mem``, ``log``, ``inflight``, the fds and the in-band
    callbacks, calls :meth:`map_rings` and sets ``started``; the device
    implementation then uses the ``vu_queue_*`` methods.  The queue never
    closes fds; they belong to the caller.

    ``processed_in_order`` is the answer of libvhost-user's
    ``queue_is_processed_in_order`` callback: when true, :meth:`map_rings`
    resumes at ``used->idx`` if ``last_avail_idx`` disagrees (everything not
    yet used is fetched again).

    Not thread-safe: one thread (or process) drives a queue.
    """

    def __init__(self, index: int, logger: Optional[logging.Logger] = None):
        self.index = index
        self.logger = logger or logging.getLogger("shardvu.virtqueue")
        self.features = 0
        self.mem: Optional[GuestMemory] = None
        self.log: Optional[DirtyLog] = None
        self.inflight: Optional[InflightQueue] = None
        self.kick_fd = -1
        self.call_fd = -1
        self.err_fd = -1
        self.inband_call: Optional[Callable[[], None]] = None
        #: notify_sync's in-band call, which must wait for the front-end's
        #: ack; falls back to ``inband_call`` when unset.
        self.inband_call_sync: Optional[Callable[[], None]] = None
        self.inband_err: Optional[Callable[[], None]] = None
        self.processed_in_order = False
        self.calls_sent = 0
        self.notifications_suppressed = 0
        #: kicks received (counted by the control code that reads the kick fd)
        self.kicks = 0
        self.rings: Optional[SplitRings] = None
        self.raw = None
        self._raw_parts: list = []
        self._desc: Optional[memoryview] = None
        self._avail: Optional[memoryview] = None
        self._used: Optional[memoryview] = None
        #: ``_used`` cast to u16 items: single-store writes of driver-visible fields
        self._used16: Optional[memoryview] = None
        self._reset_state()

    def _reset_state(self) -> None:
        self.unmap_rings()
        self.num = 0
        self.addr: Optional[VringAddr] = None
        self.last_avail_idx = 0
        self.shadow_avail_idx = 0
        self.used_idx = 0
        self.signalled_used = 0
        self.signalled_used_valid = False
        self.notification = True
        self.inuse = 0
        self.enable = False
        self.started = False
        #: the ring has been enabled since it last started (or was enabled
        #: when it started): a disabled ring then discards its TX buffers,
        #: as the spec asks of a ring the driver disabled.  Before that
        #: first enable a started ring is left alone: front-ends enable
        #: rings after SET_VRING_KICK (QEMU, DPDK's virtio-user, which does
        #: not wait for the back-end to take the enable before it
        #: transmits), and what the driver queued in between is traffic.
        self.discard_disabled = False
        self.broken = False
        self.broken_reason = ""
        #: why, as one of the bounded set of reasons (None while not broken)
        self.broken_kind: Optional[BrokenReason] = None
        #: Inflight counter (order in which heads were fetched).
        self.counter = 0
        # (counter, head) awaiting resubmission, highest counter first.
        self._resubmit: List[Tuple[int, int]] = []
        # used-ring offset (fill's idx) -> head, filled but not flushed yet.
        self._pending: Dict[int, int] = {}

    def reset(self) -> None:
        """Back to the initial ring state: stopped, disabled, not broken, no
        size, no addresses, indices zero, rings unmapped.  Keeps the wiring
        the caller owns: fds, ``mem``, ``log``, ``inflight``, ``features``,
        callbacks, ``processed_in_order`` and the counters."""
        self._reset_state()

    def __repr__(self) -> str:
        state = "broken" if self.broken else ("started" if self.started else "stopped")
        return (f"VirtQueue({self.index}, num={self.num}, {state}, avail={self.last_avail_idx}, "
                f"used={self.used_idx}, inuse={self.inuse})")

    # -- feature helpers ------------------------------------------------------
    def has_feature(self, bit: int) -> bool:
        return bool(self.features >> bit & 1)

    @property
    def enabled(self) -> bool:
        """SET_VRING_ENABLE state (``vu_queue_enabled``)."""
        return bool(self.enable)

    def ready(self) -> bool:
        """Rings mapped and the queue not broken."""
        return self._used is not None and not self.broken

    # -- mapping ----------------------------------------------------------------
    def _map_part(self, name: str, uva: int, size: int) -> memoryview:
        assert self.mem is not None
        found = self.mem.uva_range(uva, size)
        if found is None:
            raise RingError(f"queue {self.index}: {name} at {uva:#x}+{size:#x} "
                            "is not inside one memory region")
        region, off = found
        self._raw_parts.append((region.mm, region.mmap_offset + off))
        return region.view[off:off + size]

    def map_rings(self) -> None:
        """Translate ``addr`` (front-end virtual addresses) for ``num``
        entries and map the three ring parts.

        Raises RingError (and leaves the rings unmapped) if ``num`` is unset,
        not a power of two or above 1024, ``addr``/``mem`` are unset, or a
        ring part is not wholly inside one region.  Sets ``used_idx`` from
        ``used->idx``; if ``processed_in_order`` and nothing is in use, a
        ``last_avail_idx`` different from it is replaced by it (resume).
        Callable again after the memory table changed."""
        self.unmap_rings()
        num = self.num
        if num == 0:
            raise RingError(f"queue {self.index}: size not set")
        if num > VIRTQUEUE_MAX_SIZE or num & (num - 1):
            raise RingError(f"queue {self.index}: size {num} is not a power of two "
                            f"<= {VIRTQUEUE_MAX_SIZE}")
        if self.addr is None:
            raise RingError(f"queue {self.index}: ring addresses not set")
        if self.mem is None:
            raise RingError(f"queue {self.index}: no guest memory")
        self._raw_parts = []
        desc = self._map_part("descriptor table", self.addr.desc, desc_table_size(num))
        avail = self._map_part("avail ring", self.addr.avail, avail_ring_size(num))
        used = self._map_part("used ring", self.addr.used, used_ring_size(num))
        self._desc, self._avail, self._used = desc, avail, used
        self._used16 = used.cast("H")
        self.rings = SplitRings(num, desc, avail, used)
        #: ((mmap, offset) of the descriptor table, avail ring, used ring):
        #: for data paths that address the raw mapping (PyPy's)
        self.raw = tuple(self._raw_parts)
        self.used_idx = _U16.unpack_from(used, 2)[0]
        if self.last_avail_idx != self.used_idx:
            resume = self.processed_in_order and self.inuse == 0 and not self._resubmit
            self.logger.debug("queue %d: last avail idx %d != used idx %d%s", self.index,
                              self.last_avail_idx, self.used_idx, ", resuming" if resume else "")
            if resume:
                self.last_avail_idx = self.shadow_avail_idx = self.used_idx

    def unmap_rings(self) -> None:
        """Drop every view of the rings (so the regions can be unmapped)."""
        if getattr(self, "rings", None) is not None:
            self.rings.release()
        self.rings = None
        self.raw = None
        for view in (self._used16, self._desc, self._avail, self._used):
            if view is not None:
                view.release()
        self._desc = self._avail = self._used = self._used16 = None

    @property
    def mapped(self) -> bool:
        return self._used is not None

    def set_base(self, idx: int) -> None:
        """SET_VRING_BASE: the next avail index to pop."""
        self.last_avail_idx = self.shadow_avail_idx = idx & 0xFFFF

    # -- breaking -----------------------------------------------------------------
    def mark_broken(self, reason: str, kind: Optional[BrokenReason] = None) -> None:
        """Stop using the queue: sets ``broken``, ``broken_reason`` (the
        text) and ``broken_kind`` (``kind``; None means the caller's own
        code failed: :attr:`BrokenReason.PORT_FAILED`), logs ``queue N
        broken: reason (kind)`` at ERROR and signals ``err_fd`` (or calls
        ``inband_err``).  Only the first reason is kept.  Never raises."""
        if self.broken:
            return
        self.broken = True
        self.broken_reason = reason
        self.broken_kind = kind = kind if kind is not None else B.PORT_FAILED
        try:
            self.logger.error("queue %d broken: %s (%s)", self.index, reason, kind.value)
        except Exception:  # pragma: no cover - a broken handler must not break us
            pass
        if self.err_fd >= 0:
            try:
                eventfd.signal(self.err_fd)
            except OSError:
                pass
        elif self.inband_err is not None:
            try:
                self.inband_err()
            except Exception as exc:
                self.logger.warning("queue %d: in-band error notification failed: %s",
                                    self.index, exc)

    # -- ring field access ------------------------------------------------------
    def _avail_idx(self) -> int:
        return _U16.unpack_from(self._avail, 2)[0]

    def _avail_flags(self) -> int:
        return _U16.unpack_from(self._avail, 0)[0]

    def _used_event(self) -> int:
        return _U16.unpack_from(self._avail, 4 + 2 * self.num)[0]

    def _logging(self) -> bool:
        return self.log is not None and bool(self.features >> VHOST_F_LOG_ALL & 1)

    def _log_used(self, offset: int, length: int) -> bool:
        """Mark used-ring bytes dirty if this ring is logged; True if marked."""
        addr = self.addr
        if (self._logging() and addr is not None
                and addr.flags >> VHOST_VRING_F_LOG & 1):
            self.log.mark(addr.log + offset, length)  # type: ignore[union-attr]
            return True
        return False

    def _write_used16(self, offset: int, value: int) -> None:
        # One 16-bit store.  CPython: through the cast (struct.pack_into
        # zeroes the field first).  PyPy: through struct, whose JIT-compiled
        # store is one access (its memoryview item store can tear).
        if _PYPY:
            _U16.pack_into(self._used, offset, value & 0xFFFF)
        else:
            self._used16[offset >> 1] = value & 0xFFFF  # type: ignore[index]
        if self._log_used(offset, 2):
            self.log.kick()  # type: ignore[union-attr]

    def _set_avail_event(self, value: int) -> None:
        self._write_used16(4 + 8 * self.num, value)

    # -- descriptor chains ------------------------------------------------------
    def _num_heads(self) -> int:
        """Entries available past last_avail_idx; loads avail->idx only when
        the shadow copy is used up.  Marks the queue broken on a jump."""
        if self.shadow_avail_idx == self.last_avail_idx:
            self.shadow_avail_idx = self._avail_idx()
        n = (self.shadow_avail_idx - self.last_avail_idx) & 0xFFFF
        if n > self.num:
            self.mark_broken(f"avail idx moved by {n} > queue size {self.num}", B.AVAIL_IDX_JUMP)
            return 0
        return n

    def _head_at(self, avail_idx: int) -> int:
        head = _U16.unpack_from(self._avail, 4 + 2 * (avail_idx % self.num))[0]
        if head >= self.num:
            raise _Hostile(B.INDEX_OUT_OF_RANGE, f"head index {head} >= queue size {self.num}")
        return head

    def _check_mapped(self, gpa: int, length: int) -> None:
        mem = self.mem
        end = gpa + length
        while gpa < end:
            r = mem.find_gpa(gpa)  # type: ignore[union-attr]
            if r is None:
                raise _Hostile(B.OUTSIDE_MEMORY, f"indirect table {gpa:#x}+{length:#x} is outside guest memory")
            gpa = r.gpa_end

    def _walk(self, head: int, build: bool):
        """Follow the chain at ``head``.  With ``build`` returns a
        VirtqElement, else ``(in_bytes, out_bytes)``.  Raises _Hostile."""
        mem = self.mem
        table: Optional[memoryview] = self._desc
        table_gpa = 0                 # indirect table spanning regions: read by gpa
        table_len = self.num
        indirect = False
        can_indirect = self.has_feature(VIRTIO_RING_F_INDIRECT_DESC)
        out_sg: List[memoryview] = []
        in_sg: List[memoryview] = []
        in_addr: List[Tuple[int, int]] = []
        out_addr: List[Tuple[int, int]] = []
        total = in_bytes = out_bytes = 0
        z_in = z_out = 0            # zero-length descriptors (they get no view)
        seen_write = False
        i = head
        count = 0
        while True:
            if i >= table_len:
                where = "indirect table" if indirect else "queue"
                raise _Hostile(B.INDEX_OUT_OF_RANGE, f"next index {i} >= {where} size {table_len}")
            count += 1
            if count > table_len:
                raise _Hostile(B.CHAIN_LOOP, f"descriptor loop: chain longer than {table_len} entries"
                               + (" in indirect table" if indirect else ""))
            if count > VIRTQUEUE_MAX_SIZE:
                raise _Hostile(B.CHAIN_LOOP, f"indirect chain longer than {VIRTQUEUE_MAX_SIZE} descriptors")
            if table is not None:
                addr, length, flags, nxt = _DESC.unpack_from(table, DESC_SIZE * i)
            else:
                try:
                    raw = mem.read(table_gpa + DESC_SIZE * i, DESC_SIZE)  # type: ignore[union-attr]
                except ValueError:
                    raise _Hostile(B.OUTSIDE_MEMORY, "indirect table is no longer inside guest memory") from None
                addr, length, flags, nxt = _DESC.unpack(raw)

            if flags & VRING_DESC_F_INDIRECT:
                if not can_indirect:
                    raise _Hostile(B.INDIRECT_MISUSE, "indirect descriptor but VIRTIO_RING_F_INDIRECT_DESC "
                                   "not negotiated")
                if indirect:
                    raise _Hostile(B.INDIRECT_MISUSE, "nested indirect descriptor")
                if flags & VRING_DESC_F_NEXT:
                    raise _Hostile(B.INDIRECT_MISUSE, "indirect descriptor with VRING_DESC_F_NEXT")
                if length == 0 or length % DESC_SIZE:
                    raise _Hostile(B.INDIRECT_MISUSE, f"indirect table length {length} is not a non-zero "
                                   f"multiple of {DESC_SIZE}")
                self._check_mapped(addr, length)
                found = mem.gpa_range(addr, length)  # type: ignore[union-attr]
                if found is not None:
                    region, off = found
                    table = region.view[off:off + length]
                else:
                    table = None
                    table_gpa = addr
                table_len = length // DESC_SIZE
                indirect = True
                i = 0
                count = 0
                continue

            total += length
            if total > MAX_CHAIN_LEN:
                raise _Hostile(B.CHAIN_LOOP, f"chain length overflow: {total} bytes > 2**32-1")
            if not length:
                if flags & VRING_DESC_F_WRITE:
                    z_in += 1
                else:
                    z_out += 1
            if flags & VRING_DESC_F_WRITE:
                seen_write = True
                in_bytes += length
            else:
                if seen_write:
                    raise _Hostile(B.WRONG_DIRECTION, f"device-readable descriptor {i} after a device-writable one")
                out_bytes += length
            a, left = addr, length
            while left:
                r = mem.find_gpa(a)  # type: ignore[union-attr]
                if r is None:
                    raise _Hostile(B.OUTSIDE_MEMORY, f"descriptor {i} buffer {addr:#x}+{length:#x} "
                                   "is outside guest memory")
                off = a - r.gpa
                n = min(left, r.size - off)
                if build:
                    view = r.view[off:off + n]
                    if flags & VRING_DESC_F_WRITE:
                        in_sg.append(view)
                        in_addr.append((a, n))
                    else:
                        out_sg.append(view.toreadonly())
                        out_addr.append((a, n))
                a += n
                left -= n
            if not flags & VRING_DESC_F_NEXT:
                break
            i = nxt
        if build:
            return VirtqElement(head, out_sg, in_sg, in_addr, out_addr,
                                len(in_sg) + z_in, len(out_sg) + z_out, in_bytes, out_bytes)
        return in_bytes, out_bytes

    def _map_head(self, head: int) -> Optional[VirtqElement]:
        try:
            return self._walk(head, True)
        except _Hostile as exc:
            self.mark_broken(str(exc), exc.kind)
            return None

    # -- the vu_queue_* API -------------------------------------------------------
    def empty(self) -> bool:
        """``vu_queue_empty``: True if nothing is available or the queue is
        not ready (unmapped or broken).  Pending resubmissions count as
        available."""
        if not self.ready():
            return True
        if self._resubmit:
            return False
        if self.shadow_avail_idx != self.last_avail_idx:
            return False
        self.shadow_avail_idx = self._avail_idx()
        return self.shadow_avail_idx == self.last_avail_idx

    def pop(self) -> Optional[VirtqElement]:
        """``vu_queue_pop``: the next available element, or None if the queue
        is empty, not started, unmapped or broken.  Elements awaiting
        resubmission after :meth:`check_inflight` come first, oldest first.
        Hostile ring contents mark the queue broken and return None without
        consuming the chain (``last_avail_idx`` stays on it)."""
        if self.broken or not self.started or self._used is None:
            return None
        if self._resubmit:
            counter, head = self._resubmit.pop()
            elem = self._map_head(head)
            if elem is not None:
                elem._resubmit = (counter, head)
            return elem
        if self._num_heads() == 0:
            return None
        if self.inuse >= self.num:
            self.mark_broken(f"virtqueue size exceeded: {self.inuse} elements in use",
                             B.AVAIL_IDX_JUMP)
            return None
        try:
            head = self._head_at(self.last_avail_idx)
        except _Hostile as exc:
            self.mark_broken(str(exc), exc.kind)
            return None
        elem = self._map_head(head)
        if elem is None:
            return None         # the hostile chain is not consumed (batch rule)
        self.last_avail_idx = (self.last_avail_idx + 1) & 0xFFFF
        if self.notification and self.has_feature(VIRTIO_RING_F_EVENT_IDX):
            self._set_avail_event(self.last_avail_idx)
        self.inuse += 1
        inf = self.inflight
        if inf is not None and head < inf.capacity:
            inf.set_counter(head, self.counter)
            self.counter += 1
            inf.set_inflight(head, True)
        return elem

    def unpop(self, elem: VirtqElement, length: int = 0) -> None:
        """``vu_queue_unpop``: pretend the most recently popped ``elem`` was
        not popped; the next :meth:`pop` returns it again.  ``length`` is
        accepted for API parity and unused."""
        if elem._resubmit is not None:
            self._resubmit.append(elem._resubmit)
            elem._resubmit = None
            return
        self.last_avail_idx = (self.last_avail_idx - 1) & 0xFFFF
        self.inuse = max(0, self.inuse - 1)

    def rewind(self, num: int) -> bool:
        """``vu_queue_rewind``: pretend the last ``num`` popped elements were
        not popped; the next pop returns the oldest of them.  Returns False
        (and changes nothing) if ``num`` exceeds the elements in use."""
        if num > self.inuse or num < 0:
            return False
        self.last_avail_idx = (self.last_avail_idx - num) & 0xFFFF
        self.inuse -= num
        return True

    def fill(self, elem: VirtqElement, length: int, idx: int) -> None:
        """``vu_queue_fill``: write a used element (``elem.index``,
        ``length``) at ``used_idx + idx`` without publishing it.

        When dirty logging is on, marks the pages of the first ``length``
        bytes of ``elem.in_sg`` and, if the ring is logged
        (``VHOST_VRING_F_LOG``), the used element, then kicks the log.
        No-op on an unmapped queue.  On a broken queue it still completes
        elements popped before the break (the batch rule of
        :mod:`shardvu.ringrules`).  ``length`` must fit in 32 bits
        (ValueError otherwise: a caller bug)."""
        if self._used is None:
            return
        if not 0 <= length <= 0xFFFFFFFF:
            raise ValueError(f"used length {length} does not fit in 32 bits")
        logged = False
        if self._logging() and length:
            left = length
            for gpa, n in elem.in_addr:
                take = min(n, left)
                self.log.mark(gpa, take)  # type: ignore[union-attr]
                left -= take
                if not left:
                    break
            logged = True
        slot = (self.used_idx + idx) % self.num
        off = 4 + 8 * slot
        _USED_ELEM.pack_into(self._used, off, elem.index, length)
        logged = self._log_used(off, 8) or logged
        self._pending[idx] = elem.index
        if elem._resubmit is not None:
            elem._resubmit = None
        if logged:
            self.log.kick()  # type: ignore[union-attr]

    def flush(self, count: int) -> None:
        """``vu_queue_flush``: publish ``count`` filled elements (``used->idx
        += count``), after the elements themselves were written.

        Inflight bookkeeping follows the spec: the batch is linked through
        ``next``/``last_batch_head`` before the idx store, its ``inflight``
        flags are cleared and ``used_idx`` recorded after it.  Logs the
        idx write when the ring is logged.  No-op on an unmapped queue;
        publishes on a broken one too (elements popped before the break,
        see :meth:`fill`)."""
        if self._used is None or count <= 0:
            return
        old = self.used_idx
        new = (old + count) & 0xFFFF
        batch = [self._pending.pop(i) for i in range(count) if i in self._pending]
        if self._pending:
            self._pending = {i - count: h for i, h in self._pending.items() if i >= count}
        inf = self.inflight
        if inf is not None:
            for head in batch:
                if head < inf.capacity:
                    inf.set_next(head, inf.last_batch_head)
                    inf.last_batch_head = head
        self._write_used16(2, new)
        if inf is not None:
            for head in batch:
                if head < inf.capacity:
                    inf.set_inflight(head, False)
            inf.used_idx = new
        self.used_idx = new
        self.inuse = max(0, self.inuse - count)
        # Like libvhost-user: if new wrapped past signalled_used, forget it.
        if _s16(new - self.signalled_used) < ((new - old) & 0xFFFF):
            self.signalled_used_valid = False

    def push(self, elem: VirtqElement, length: int) -> None:
        """``vu_queue_push``: :meth:`fill` at offset 0 then :meth:`flush` (1)."""
        self.fill(elem, length, 0)
        self.flush(1)

    def _should_notify(self) -> bool:
        _smp_mb()       # used idx store before the used_event / flags loads
        if self.has_feature(VIRTIO_F_NOTIFY_ON_EMPTY) and self.inuse == 0 and self.empty():
            return True
        if not self.has_feature(VIRTIO_RING_F_EVENT_IDX):
            return not self._avail_flags() & VRING_AVAIL_F_NO_INTERRUPT
        valid = self.signalled_used_valid
        self.signalled_used_valid = True
        old = self.signalled_used
        new = self.signalled_used = self.used_idx
        return not valid or vring_need_event(self._used_event(), new, old)

    def _send_call(self, sync: bool) -> None:
        fn: Optional[Callable[[], None]] = None
        if self.call_fd >= 0:
            try:
                eventfd.signal(self.call_fd)
            except OSError as exc:
                self.logger.warning("queue %d: signalling call fd failed: %s", self.index, exc)
                return
            self.calls_sent += 1
            return
        fn = (self.inband_call_sync or self.inband_call) if sync else self.inband_call
        if fn is None:
            return
        try:
            fn()
        except Exception as exc:
            self.logger.warning("queue %d: in-band call failed: %s", self.index, exc)
            return
        self.calls_sent += 1

    def notify(self) -> None:
        """``vu_queue_notify``: signal the driver that used buffers are
        available, unless it asked not to be: with EVENT_IDX when the used
        idx has not crossed ``used_event`` since the last signal, otherwise
        when ``VRING_AVAIL_F_NO_INTERRUPT`` is set -- except that with
        NOTIFY_ON_EMPTY an empty, idle queue is always signalled.  Uses
        ``call_fd``, or ``inband_call`` when there is no call fd.
        Suppressed calls count in ``notifications_suppressed``, sent ones in
        ``calls_sent``.  No-op on a broken or unmapped queue; never raises."""
        if self.broken or self._used is None:
            return
        if not self._should_notify():
            self.notifications_suppressed += 1
            return
        self._send_call(False)

    def notify_sync(self) -> None:
        """``vu_queue_notify_sync``: the same decision as :meth:`notify`;
        without a call fd the in-band call used is ``inband_call_sync``
        (which waits for the front-end's ack) when set."""
        if self.broken or self._used is None:
            return
        if not self._should_notify():
            self.notifications_suppressed += 1
            return
        self._send_call(True)

    def set_notification(self, enable: bool) -> None:
        """``vu_queue_set_notification``: ask the driver to kick (or not).

        Without EVENT_IDX this sets/clears ``VRING_USED_F_NO_NOTIFY``.  With
        EVENT_IDX, enabling writes the current ``avail->idx`` to
        ``avail_event``; disabling stops :meth:`pop` from advancing
        ``avail_event`` (the driver then kicks at most once more).  After
        enabling, check :meth:`empty` again: buffers added meanwhile will
        not be kicked."""
        self.notification = bool(enable)
        if self._used is None or self.broken:
            return
        if self.has_feature(VIRTIO_RING_F_EVENT_IDX):
            if enable:
                self._set_avail_event(self._avail_idx())
        else:
            flags = _U16.unpack_from(self._used, 0)[0]
            flags = flags & ~VRING_USED_F_NO_NOTIFY if enable else flags | VRING_USED_F_NO_NOTIFY
            self._write_used16(0, flags)
        if enable:
            _smp_mb()   # publish avail_event / flags before the caller re-checks avail idx

    def get_avail_bytes(self, max_in: int, max_out: int) -> Tuple[int, int]:
        """``vu_queue_get_avail_bytes``: ``(in_bytes, out_bytes)`` summed over
        the available (not yet popped) chains, in order, stopping after the
        chain that makes both totals reach ``max_in``/``max_out`` (so a total
        may exceed its maximum).  ``(0, 0)`` if not ready; a hostile chain
        marks the queue broken and gives ``(0, 0)``."""
        if not self.ready():
            return 0, 0
        n = self._num_heads()
        in_total = out_total = 0
        idx = self.last_avail_idx
        try:
            for k in range(n):
                i, o = self._walk(self._head_at(idx + k), False)
                in_total += i
                out_total += o
                if in_total >= max_in and out_total >= max_out:
                    break
        except _Hostile as exc:
            self.mark_broken(str(exc), exc.kind)
            return 0, 0
        return in_total, out_total

    def avail_bytes(self, in_bytes: int, out_bytes: int) -> bool:
        """``vu_queue_avail_bytes``: True if the available chains hold at
        least ``in_bytes`` writable and ``out_bytes`` readable bytes."""
        in_total, out_total = self.get_avail_bytes(in_bytes, out_bytes)
        return in_bytes <= in_total and out_bytes <= out_total

    # -- inflight -----------------------------------------------------------------
    def check_inflight(self) -> None:
        """After SET_INFLIGHT_FD and :meth:`map_rings`, before processing:
        the spec's "when reconnecting" steps.

        A version-0 region is initialised (nothing in flight).  Otherwise, if
        the region's ``used_idx`` lags ``used->idx``, the last batch (walked
        from ``last_batch_head``, bounded by the queue size) is cleared and
        ``used_idx`` caught up; every remaining inflight head below ``num``
        is queued for resubmission in counter order, ``inuse`` becomes their
        number and ``last_avail_idx`` = ``used->idx + inuse``.  No-op
        without ``inflight``; RingError if the rings are unmapped or ``num``
        exceeds the region's capacity."""
        self._resubmit = []
        inf = self.inflight
        if inf is None:
            return
        if self._used is None:
            raise RingError(f"queue {self.index}: rings not mapped")
        if self.num > inf.capacity:
            raise RingError(f"queue {self.index}: size {self.num} exceeds inflight "
                            f"region of {inf.capacity} descriptors")
        self.used_idx = _U16.unpack_from(self._used, 2)[0]
        self.counter = 0
        if inf.version == 0:
            inf.initialize(self.num)
            inf.used_idx = self.used_idx
            return
        if inf.used_idx != self.used_idx:
            batch = (self.used_idx - inf.used_idx) & 0xFFFF
            head = inf.last_batch_head
            for _ in range(min(batch, self.num)):
                if head >= self.num:
                    break
                inf.set_inflight(head, False)
                head = inf.get_next(head)
            inf.used_idx = self.used_idx
        heads = inf.inflight_heads(self.num)
        self.inuse = len(heads)
        if heads:
            self.counter = heads[-1][0] + 1
        heads.reverse()
        self._resubmit = heads
        self.last_avail_idx = self.shadow_avail_idx = (self.used_idx + self.inuse) & 0xFFFF

    @property
    def resubmit_pending(self) -> int:
        """Heads still waiting to be returned by :meth:`pop` after a reconnect."""
        return len(self._resubmit)


def _s16(v: int) -> int:
    v &= 0xFFFF
    return v - 0x10000 if v & 0x8000 else v
