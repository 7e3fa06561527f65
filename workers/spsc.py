"""A single-producer / single-consumer ring of frames in shared memory.

Used by the "loopback" port: the TX worker of queue pair *i* pushes the
frames the guest sent, the RX worker of pair *i* pops them and writes them
into the guest's RX ring.  The control process makes the ring
(:meth:`SpscRing.create`) and hands both fds (memory, doorbell) to the two
workers, which each :meth:`SpscRing.attach`.

Layout (all integers native-endian, i.e. little-endian on x86-64)::

    0    header   magic "SHVUSPSC" (8), version u32, slots u32, slot_size u32
    64   producer index  u64   (written by the producer only)
    128  consumer index  u64   (written by the consumer only)
    192  sleeping flag   u32   (consumer sets 1, producer clears)
    256  slot[0] .. slot[slots-1], each slot_size bytes:
           0   length u32
           4   headroom (12 bytes): a prefix the producer may lay down once
               (set_headroom), for a consumer that wants it in front of
               every frame: the loopback port's RX virtio-net header
           16  data (up to slot_size - 16 bytes)

The indices are free-running u64 counters (wrapping at 2**64); frame *k*
lives in slot ``k & (slots - 1)``; ``pending = (prod - cons) mod 2**64``
and is never above ``slots``.  Each index and the flag sit on a cache line
of their own so that the two sides do not false-share.

Memory ordering
---------------
No explicit barrier is used on the data path; program order is enough on
x86-64 because:

* x86-64 is TSO: stores become visible to other cores in program order,
  loads are not reordered with other loads, and a load is not reordered
  with a *later* store.  The only reordering allowed is a later load
  passing an earlier store (the store buffer).
* The producer writes the slot contents (length + data), then stores the
  producer index, once per batch.  Store→store order means a consumer that
  sees the new index also sees every slot it covers.
* The consumer loads the producer index once, then loads the slots
  (load→load order), then stores the consumer index (load→store order):
  the producer cannot see a slot released before the consumer has read it.
* The interpreter does not reorder these accesses: in CPython each access
  is a separate opaque C call (``struct.pack_into``/``unpack_from``,
  memoryview item stores and slice assignment = ``memcpy``); PyPy's JIT
  does not cache or sink raw loads/stores to buffer memory across those
  operations, nor across the external call that cffi's ``memmove`` is (the
  loopback's fused loops in ``split_fast*.py`` copy frames that way and
  publish through :meth:`SpscRing.publish` / :meth:`SpscRing.consumed`
  like the methods here; the two-process tests also run under PyPy).
* Each index is loaded and stored with a single aligned 8-byte move
  (single-copy atomic on x86-64), through a ``ctypes.c_int64`` view of the
  mapping: CPython's ctypes copies the field with an 8-byte ``memcpy``
  (one ``mov``), PyPy's ``_rawffi`` does one typed raw load/store.  *Not*
  ``struct.pack_into``, in any format: CPython's ``s_pack_internal``
  zero-fills the target before writing the value, so the other side can
  load a transient 0 — a producer index of 0 reads as ~2**64 frames
  pending (seen: a PyPy consumer, fast enough to hit the window, popped
  slots one lap old about one run in two of the 200k-frame test; with
  ctypes, none in 60 runs; ``test_index_store_not_torn`` now catches it).
  Slot lengths may use ``pack_into``: they are written before the index
  that publishes them.  The sleeping flag uses it too; a transient 0 there
  is harmless (it only ever looks like "not sleeping" before the store of
  1 completes, and the fences below order that store against the index).

The doorbell is a Dekker-style handshake (consumer: store flag, load
producer index; producer: store producer index, load flag), which is
exactly the store→load pattern TSO does *not* order.  Both sides therefore
execute a full fence between their store and their load: acquiring and
releasing a private ``threading.Lock``, which on both interpreters is a
``lock``-prefixed atomic read-modify-write in libc (``sem_trywait`` /
``sem_post`` / pthread mutex) — a full barrier on x86-64.  It costs
~50-80 ns, paid once per batch by the producer and once per sleep by the
consumer.

Other architectures (AArch64, POWER, RISC-V) are weakly ordered: the
producer would need a release barrier (``dmb ish`` / ``stlr``) between the
slot stores and the index store, and the consumer an acquire barrier
(``ldar`` / ``dmb ishld``) between the index load and the slot loads, and a
release barrier before storing the consumer index.  Pure Python cannot emit
these; a port would use a tiny C helper (``__atomic_store_n`` with
``__ATOMIC_RELEASE``, ``__atomic_load_n`` with ``__ATOMIC_ACQUIRE``) or,
crudely, the same lock trick around each index access.  The module refuses
nothing at run time, but only x86-64 is supported.
"""
from __future__ import annotations

import ctypes
import errno
import mmap
import os
import select
import stat
import struct
import sys
import threading
from typing import List, Optional, Sequence, Union

from shardvu import eventfd as _efd

__all__ = ["SpscRing", "MAGIC", "VERSION", "HEADER_SIZE", "DATA_OFF", "HEADROOM"]

MAGIC = b"SHVUSPSC"
VERSION = 2
HEADER_SIZE = 256
DATA_OFF = 16                # a frame's offset in its slot
HEADROOM = DATA_OFF - 4      # bytes before it that set_headroom() may fill
_PROD_OFF = 64
_CONS_OFF = 128
_SLEEP_OFF = 192
_MAX_SLOTS = 1 << 20
_MAX_SLOT_SIZE = 1 << 20
_MASK64 = (1 << 64) - 1
_WRAP = 1 << 64


# Index arithmetic mod 2**64 that stays on machine-word ints.  ``x &
# _MASK64`` would make every result a big integer on PyPy (the mask does
# not fit in a word), and the fused loops then did big-integer arithmetic
# and allocated for every frame.
def _dist(a: int, b: int) -> int:
    """``(a - b) mod 2**64`` for indices a, b in [0, 2**64)."""
    d = a - b
    return d + _WRAP if d < 0 else d


def _u64(v: int) -> int:
    """A signed 64-bit load as the unsigned index it holds."""
    return v + _WRAP if v < 0 else v


def _s64(i: int) -> int:
    """An index in [0, 2**64) as the signed value to store."""
    return i - _WRAP if i >> 63 else i


def _wrap(i: int) -> int:
    """``i mod 2**64`` for an index advanced past 2**64 by less than 2**64."""
    return i - _WRAP if i >> 64 else i

_HDR = struct.Struct("=8sIII")        # magic, version, slots, slot_size
_U64 = struct.Struct("Q")             # header images / tests only: not atomic on PyPy
# The shared indices: one 8-byte load/store each.  Signed, because PyPy
# returns a c_uint64's value as a big integer; _u64/_s64 convert.
_C64 = ctypes.c_int64
_U32 = struct.Struct("I")

# memfd sealing (fcntl's names are missing on PyPy 3.9).
_F_ADD_SEALS = 1033
_F_SEAL_SEAL, _F_SEAL_SHRINK, _F_SEAL_GROW = 1, 2, 4
_MFD_CLOEXEC, _MFD_ALLOW_SEALING = 1, 2

_PYPY = sys.implementation.name == "pypy"

Frame = Union[bytes, bytearray, memoryview]


class SpscRing:
    """One end (or, in tests, both ends) of a shared-memory frame ring.

    Exactly one process may call the producer methods (:meth:`push_batch`,
    :meth:`free`, :meth:`producer_notify`) and exactly one the consumer
    methods (:meth:`pop_batch`, :meth:`peek`, :meth:`release`,
    :meth:`consumer_prepare_sleep`, :meth:`consumer_woke`, :meth:`wait`).
    An object is not thread-safe.  Each side caches its own index; it is
    (re)loaded from shared memory at attach, so a restarted worker resumes
    where its predecessor stopped.

    Attributes: ``fd`` (memfd), ``doorbell_fd`` (eventfd), ``slots``,
    ``slot_size``, ``max_frame`` (= slot_size - DATA_OFF), ``oversize``
    (frames dropped by a producer for being longer than ``max_frame``);
    ``mm``, ``buf`` (the mapping and a memoryview of it) and ``mask``
    (slots - 1) are for fused producer/consumer loops (see
    :meth:`produce_window`), which address slot *k* at ``HEADER_SIZE +
    (k & mask) * slot_size``.
    """

    def __init__(self, fd: int, doorbell_fd: int, mm: mmap.mmap, slots: int, slot_size: int):
        # Private: use create() / attach().
        self.fd = fd
        self.doorbell_fd = doorbell_fd
        self.slots = slots
        self.slot_size = slot_size
        self.max_frame = slot_size - DATA_OFF
        self.oversize = 0
        self.mask = self._mask = slots - 1
        self.mm = self._mm = mm
        self.buf = self._buf = memoryview(mm)
        # slot lengths as u32 items (slot offsets are multiples of 8): the
        # CPython fused loops' single-width stores; PyPy's use struct
        self.len32: Optional[memoryview] = self._buf.cast("I")
        # ctypes views of the two indices: .value is a single 8-byte access.
        self._pi = _C64.from_buffer(mm, _PROD_OFF)
        self._ci = _C64.from_buffer(mm, _CONS_OFF)
        self._prod = _u64(self._pi.value)
        self._cons = _u64(self._ci.value)
        self._peeked = 0
        self._fence_lock = threading.Lock()
        self._closed = False

    # -- construction -------------------------------------------------------

    @classmethod
    def create(cls, slots: int = 1024, slot_size: int = 2048, *, initial_index: int = 0) -> "SpscRing":
        """Make a new ring: a sealed-size memfd (``.fd``) and an eventfd
        doorbell (``.doorbell_fd``), both owned by the returned object and
        close-on-exec (pass them on explicitly: fork inheritance, SCM_RIGHTS
        or ``pass_fds``).  ``slots`` must be a power of two (1..2**20);
        ``slot_size`` a multiple of 8 in 32..2**20.  ``initial_index`` starts
        both counters elsewhere than 0 (tests of the u64 wrap-around)."""
        _check_geometry(slots, slot_size)
        if not 0 <= initial_index <= _MASK64:
            raise ValueError("initial_index must be a u64")
        size = HEADER_SIZE + slots * slot_size
        fd = os.memfd_create("shardvu-spsc", _MFD_CLOEXEC | _MFD_ALLOW_SEALING)
        bell = -1
        try:
            os.ftruncate(fd, size)
            try:   # a worker must not be able to shrink it under the other (SIGBUS)
                import fcntl
                fcntl.fcntl(fd, _F_ADD_SEALS, _F_SEAL_SHRINK | _F_SEAL_GROW | _F_SEAL_SEAL)
            except OSError:
                pass
            mm = mmap.mmap(fd, size)
            _HDR.pack_into(mm, 0, MAGIC, VERSION, slots, slot_size)
            _store64(mm, _PROD_OFF, initial_index)
            _store64(mm, _CONS_OFF, initial_index)
            bell = _efd.eventfd()
        except BaseException:
            os.close(fd)
            if bell >= 0:
                os.close(bell)
            raise
        return cls(fd, bell, mm, slots, slot_size)

    @classmethod
    def attach(cls, fd: int, doorbell_fd: int) -> "SpscRing":
        """Map a ring made by :meth:`create` in another process.

        On success the object owns ``fd`` and ``doorbell_fd`` and closes
        them in :meth:`close`.  Anything that is not a valid ring — wrong
        file type or size, bad magic/version/geometry, inconsistent indices,
        an invalid doorbell fd — raises ValueError; then nothing has been
        closed (ownership stays with the caller) and nothing is leaked."""
        try:
            st = os.fstat(fd)
            os.fstat(doorbell_fd)
        except OSError as exc:
            raise ValueError(f"spsc: bad fd: {exc}") from None
        if not stat.S_ISREG(st.st_mode):
            raise ValueError("spsc: fd is not a shared-memory file")
        if st.st_size < HEADER_SIZE:
            raise ValueError(f"spsc: file too small ({st.st_size} bytes)")
        try:
            mm = mmap.mmap(fd, st.st_size)
        except (OSError, ValueError) as exc:
            raise ValueError(f"spsc: cannot map: {exc}") from None
        try:
            magic, version, slots, slot_size = _HDR.unpack_from(mm, 0)
            if magic != MAGIC:
                raise ValueError(f"spsc: bad magic {magic!r}")
            if version != VERSION:
                raise ValueError(f"spsc: unsupported version {version}")
            _check_geometry(slots, slot_size)
            if st.st_size != HEADER_SIZE + slots * slot_size:
                raise ValueError(f"spsc: size {st.st_size} does not match {slots}x{slot_size}")
            prod = _load64(mm, _PROD_OFF)
            cons = _load64(mm, _CONS_OFF)
            if _dist(prod, cons) > slots:
                raise ValueError(f"spsc: corrupt indices prod={prod} cons={cons}")
        except BaseException:
            mm.close()
            raise
        return cls(fd, doorbell_fd, mm, slots, slot_size)

    def close(self) -> None:
        """Unmap and close both fds (idempotent).  Views returned by
        :meth:`peek` must have been dropped; if some are still alive the
        mapping is left to the garbage collector but the fds are closed."""
        if self._closed:
            return
        self._closed = True
        buf, mm, len32 = self._buf, self._mm, self.len32
        self._buf = self._mm = self.buf = self.mm = self.len32 = self._pi = self._ci = None     # drop the ctypes exports first
        if len32 is not None:
            len32.release()
        if buf is not None:
            buf.release()
        if mm is not None:
            try:
                mm.close()
            except BufferError:
                pass            # peeked views still exported: unmapped when they die
        for fd in (self.fd, self.doorbell_fd):
            try:
                os.close(fd)
            except OSError as exc:
                if exc.errno != errno.EBADF:
                    raise

    def __enter__(self) -> "SpscRing":
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    def __repr__(self) -> str:
        return f"<SpscRing slots={self.slots} slot_size={self.slot_size} fd={self.fd} bell={self.doorbell_fd}>"

    # -- shared --------------------------------------------------------------

    def pending(self) -> int:
        """Frames published and not yet released (either side may ask;
        exact for the consumer, a lower bound of the truth for the producer
        is ``slots - free()``)."""
        return _dist(_u64(self._pi.value), _u64(self._ci.value))

    def _fence(self) -> None:
        # Full barrier: a locked RMW in libc (see module docstring).
        lk = self._fence_lock
        lk.acquire()
        lk.release()

    # -- producer ------------------------------------------------------------

    def free(self) -> int:
        """Slots the producer may fill now."""
        return max(0, self.slots - _dist(self._prod, _u64(self._ci.value)))

    def push_batch(self, frames: Sequence[Frame]) -> int:
        """Copy frames from the front of ``frames`` into the ring, as many as
        fit, and publish them with a single producer-index store.

        Frames are bytes-like with 1-byte items.  A frame longer than
        ``max_frame`` is dropped (counted in ``oversize``) and counts as
        consumed.  Returns how many entries of ``frames`` were consumed
        (copied or dropped); the caller keeps ``frames[n:]`` for later.
        Call :meth:`producer_notify` afterwards."""
        buf = self._buf
        prod = self._prod
        room = self.slots - _dist(prod, _u64(self._ci.value))
        if room < 0:
            raise RuntimeError(f"spsc: corrupt consumer index (prod={prod})")
        mask, ssize, hdr, maxf = self._mask, self.slot_size, HEADER_SIZE, self.max_frame
        pack_len = _U32.pack_into
        taken = 0
        for fr in frames:
            n = len(fr)
            if n > maxf:
                self.oversize += 1
                taken += 1
                continue
            if room <= 0:
                break
            off = hdr + (prod & mask) * ssize
            pack_len(buf, off, n)
            buf[off + DATA_OFF:off + DATA_OFF + n] = fr
            prod += 1
            room -= 1
            taken += 1
        if prod != self._prod:
            self.publish(prod)                         # after every slot store
        return taken

    def set_headroom(self, prefix: bytes) -> None:
        """Producer: lay ``prefix`` (at most HEADROOM bytes) down right
        before the data of every slot, where no push touches it again, so a
        consumer reads prefix + frame as one run of bytes.  Slots still
        owned by the consumer are rewritten too: call it while the consumer
        is not delivering (the loopback port does it on SET_FEATURES,
        before the rings start), or accept that frames in flight carry
        either prefix."""
        n = len(prefix)
        if n > HEADROOM:
            raise ValueError(f"spsc: headroom prefix of {n} bytes > {HEADROOM}")
        buf = self._buf
        pad = bytes(HEADROOM - n) + bytes(prefix)
        for k in range(self.slots):
            off = HEADER_SIZE + k * self.slot_size + 4
            buf[off:off + HEADROOM] = pad

    def produce_window(self) -> tuple:
        """Producer, for a fused loop that fills slots itself: ``(prod,
        room)``, the next frame's index and how many slots are free.  Fill
        slot ``prod + i`` (length at 0, data at DATA_OFF) for i < count,
        then :meth:`publish` ``prod + count``."""
        prod = self._prod
        room = self.slots - _dist(prod, _u64(self._ci.value))
        if room < 0:
            raise RuntimeError(f"spsc: corrupt consumer index (prod={prod})")
        return prod, room

    def publish(self, prod: int) -> None:
        """Producer: make every slot before index ``prod`` visible (one
        index store, after the slot stores); then :meth:`producer_notify`."""
        prod = _wrap(prod)
        self._prod = prod
        self._pi.value = _s64(prod)

    def producer_notify(self) -> bool:
        """Ring the doorbell if the consumer is asleep (and clear its flag).
        Call after a :meth:`push_batch` that published something; returns
        True if it signalled."""
        self._fence()                                  # index store before flag load
        mm = self._mm
        if _U32.unpack_from(mm, _SLEEP_OFF)[0]:
            _U32.pack_into(mm, _SLEEP_OFF, 0)
            _efd.signal(self.doorbell_fd)
            return True
        return False

    # -- consumer ------------------------------------------------------------

    def ready(self) -> bool:
        """Consumer: True if frames beyond those peeked are published (one
        index load; for a spinning consumer)."""
        return _u64(self._pi.value) != _wrap(self._cons + self._peeked)

    def _ready(self, cons: int, max_n: int) -> int:
        """Frames published after consumer position ``cons`` (one producer
        index load), at most ``max_n``; RuntimeError on a corrupt index."""
        avail = _dist(_u64(self._pi.value), cons)
        if avail > self.slots:
            raise RuntimeError(f"spsc: corrupt producer index (cons={cons})")
        return avail if avail < max_n else max_n

    def consume_window(self, max_n: int) -> tuple:
        """Consumer, for a fused loop that reads slots itself: ``(cons,
        n)``, the oldest frame's index and how many (at most ``max_n``) are
        published.  Read slots ``cons .. cons+k-1``, then :meth:`consumed`
        ``cons + k``.  Not with peeked frames outstanding (RuntimeError)."""
        if self._peeked:
            raise RuntimeError("spsc: fused consumer with peeked frames outstanding")
        cons = self._cons
        return cons, self._ready(cons, max_n)

    def consumed(self, cons: int) -> None:
        """Consumer: give every slot before index ``cons`` back (one index
        store, after the slot loads)."""
        cons = _wrap(cons)
        self._cons = cons
        self._ci.value = _s64(cons)

    def pop_batch(self, max_n: int) -> List[bytes]:
        """Copy out up to ``max_n`` frames (oldest first) and release their
        slots with a single consumer-index store.  Not to be mixed with an
        outstanding :meth:`peek` (RuntimeError): release those first."""
        if self._peeked:
            raise RuntimeError("spsc: pop_batch with peeked frames outstanding")
        mm = self._mm
        cons = self._cons
        n = self._ready(cons, max_n)
        if n <= 0:
            return []
        mask, ssize, hdr = self._mask, self.slot_size, HEADER_SIZE
        unpack_len = _U32.unpack_from
        src = self._buf if _PYPY else mm       # faster slicing per interpreter
        out = []
        append = out.append
        limit = self.max_frame
        for _ in range(n):
            off = hdr + (cons & mask) * ssize
            ln = unpack_len(mm, off)[0]
            if ln > limit:
                raise RuntimeError(f"spsc: corrupt slot length {ln}")
            append(bytes(src[off + DATA_OFF:off + DATA_OFF + ln]))
            cons += 1
        self.consumed(cons)                             # after every slot load
        return out

    def peek(self, max_n: int) -> List[memoryview]:
        """Zero-copy: views of up to ``max_n`` unreleased frames, oldest
        first, continuing after frames already peeked.  The views stay valid
        until the matching :meth:`release`; copy from them (e.g. slice
        assignment into a guest buffer) and drop them before releasing."""
        mm, buf = self._mm, self._buf
        cons = _wrap(self._cons + self._peeked)
        n = self._ready(cons, max_n)
        if n <= 0:
            return []
        mask, ssize, hdr = self._mask, self.slot_size, HEADER_SIZE
        unpack_len = _U32.unpack_from
        limit = self.max_frame
        out = []
        for _ in range(n):
            off = hdr + (cons & mask) * ssize
            ln = unpack_len(mm, off)[0]
            if ln > limit:
                raise RuntimeError(f"spsc: corrupt slot length {ln}")
            out.append(buf[off + DATA_OFF:off + DATA_OFF + ln])
            cons += 1
        self._peeked += n
        return out

    def release(self, n: int) -> None:
        """Give the oldest ``n`` peeked frames' slots back to the producer
        (one consumer-index store).  ``n`` may be less than peeked: the
        rest stay peeked (their views stay valid)."""
        if n < 0 or n > self._peeked:
            raise ValueError(f"release({n}) with {self._peeked} peeked")
        if n == 0:
            return
        self._peeked -= n
        self.consumed(self._cons + n)

    def unpeek(self) -> None:
        """Forget frames peeked but not released: the next :meth:`peek`
        returns them again (a consumer that could deliver only some)."""
        self._peeked = 0

    def consumer_prepare_sleep(self) -> bool:
        """Announce that the consumer is about to sleep on ``doorbell_fd``.
        Returns True if it is safe to sleep (the ring was empty after the
        flag was set: any later publish will ring the doorbell); False if
        frames are pending (the flag is withdrawn; do not sleep).  After a
        True, wait for ``doorbell_fd`` to be readable, then call
        :meth:`consumer_woke` (also when waking for another reason)."""
        mm = self._mm
        _U32.pack_into(mm, _SLEEP_OFF, 1)
        self._fence()                                  # flag store before index load
        if _dist(_u64(self._pi.value), _wrap(self._cons + self._peeked)):
            _U32.pack_into(mm, _SLEEP_OFF, 0)
            return False
        return True

    def consumer_woke(self) -> None:
        """Drain the doorbell and withdraw the sleeping flag.  A spurious
        doorbell left over from a race is harmless (one extra wake-up)."""
        _U32.pack_into(self._mm, _SLEEP_OFF, 0)
        _efd.drain(self.doorbell_fd)

    def wait(self, timeout: Optional[float] = None) -> bool:
        """Convenience for a consumer with nothing else to wait on: sleep
        until frames are pending or ``timeout`` seconds (None: forever)
        pass.  Returns True if frames are pending."""
        if self.consumer_prepare_sleep():
            try:
                select.select([self.doorbell_fd], [], [], timeout)
            except InterruptedError:       # pragma: no cover (PEP 475 retries)
                pass
            self.consumer_woke()
        return _dist(_u64(self._pi.value), _wrap(self._cons + self._peeked)) > 0


def _load64(mm: mmap.mmap, off: int) -> int:
    """One 8-byte load (the temporary ctypes export dies at once on CPython)."""
    return _u64(_C64.from_buffer(mm, off).value)


def _store64(mm: mmap.mmap, off: int, value: int) -> None:
    _C64.from_buffer(mm, off).value = _s64(value)


def _check_geometry(slots: int, slot_size: int) -> None:
    if not (1 <= slots <= _MAX_SLOTS) or slots & (slots - 1):
        raise ValueError(f"spsc: slots must be a power of two in 1..{_MAX_SLOTS}, not {slots}")
    if not (2 * DATA_OFF <= slot_size <= _MAX_SLOT_SIZE) or slot_size % 8:
        raise ValueError(f"spsc: slot_size must be a multiple of 8 in {2 * DATA_OFF}..{_MAX_SLOT_SIZE}, "
                         f"not {slot_size}")
