"""Dirty-page log for live migration (SET_LOG_BASE / SET_LOG_FD).

The front-end shares a bitmap with one bit per ``VHOST_LOG_PAGE`` (4096)
bytes of guest-physical address space: page ``p`` is bit ``p % 8`` of byte
``p // 8``.  The back-end sets the bits of every page it writes while
``VHOST_F_LOG_ALL`` is negotiated; the front-end harvests and clears them.

Atomicity: the spec asks for atomic OR.  Python cannot issue a locked OR on
shared memory, so :meth:`DirtyLog.mark` does a plain read-modify-write of one
byte.  That is safe against the front-end, which only ever *clears* bits
(with an atomic exchange of whole words): a lost race can only leave a bit
set that the front-end had just harvested, i.e. over-report dirtiness, never
lose a dirty page, because the bit is set again after the data was written.
Two *back-end* processes setting bits in the same log byte could lose each
other's bits; such a deployment sets :attr:`DirtyLog.lock` to a lock shared
by those processes (the sharded runtime does, with one lock for all its
workers: :class:`FileLock` on the log fd), and every mark then runs under it.
"""
from __future__ import annotations

import fcntl
import mmap
import os

from . import eventfd
from .protocol import VHOST_LOG_PAGE
from .transport import check_mappable

__all__ = ["DirtyLog", "VHOST_LOG_PAGE"]

_PAGE_SHIFT = 12
assert 1 << _PAGE_SHIFT == VHOST_LOG_PAGE


class FileLock:
    """An inter-process lock on the log's own file (POSIX record lock,
    ``lockf``): it works between any processes holding the fd, whatever
    their interpreter, with no shared semaphore to hand around."""

    __slots__ = ("fd",)

    def __init__(self, fd: int):
        self.fd = fd

    def acquire(self) -> None:
        fcntl.lockf(self.fd, fcntl.LOCK_EX)

    def release(self) -> None:
        fcntl.lockf(self.fd, fcntl.LOCK_UN)


class DirtyLog:
    """A mapped dirty log.

    ``DirtyLog(fd, mmap_size, mmap_offset)`` maps ``mmap_size`` bytes that
    start ``mmap_offset`` bytes into ``fd`` (``MAP_SHARED``).  It takes
    ownership of ``fd``: :meth:`close` closes it, and so does a failing
    constructor, which raises :class:`ValueError` (zero size, an fd that is
    not a regular file, or a file too small to back the log, which would
    fault on access: :func:`~shardvu.transport.check_mappable`) or
    :class:`OSError` (``mmap`` refused it).

    ``call_fd`` is the SET_LOG_FD eventfd (``-1`` when none).  It is *not*
    owned by the log: the caller sets it and closes it.
    """

    __slots__ = ("fd", "size", "offset", "call_fd", "out_of_range", "marks", "lock", "_mm", "_view")

    def __init__(self, fd: int, mmap_size: int, mmap_offset: int):
        try:
            check_mappable(fd, mmap_offset, mmap_size, "dirty log")
            try:
                mm = mmap.mmap(fd, mmap_offset + mmap_size, flags=mmap.MAP_SHARED,
                               prot=mmap.PROT_READ | mmap.PROT_WRITE)
            except OverflowError as exc:
                raise ValueError(f"cannot map the dirty log: {exc}") from None
        except BaseException:
            os.close(fd)
            raise
        self.fd = fd
        self.size = mmap_size
        self.offset = mmap_offset
        self.call_fd = -1
        #: Pages that fell beyond the end of the log (not marked).
        self.out_of_range = 0
        #: Calls of :meth:`mark` with a non-zero length, for stats.
        self.marks = 0
        #: Optional inter-process lock (``acquire``/``release``) serialising
        #: marks of several back-end processes sharing this log.
        self.lock = None
        self._mm = mm
        self._view = memoryview(mm)[mmap_offset:mmap_offset + mmap_size]

    @property
    def pages(self) -> int:
        """Number of pages the log covers (from guest address 0)."""
        return self.size * 8

    def mark(self, gpa: int, length: int) -> None:
        """Set the bit of every page that ``[gpa, gpa+length)`` touches.

        Pages beyond the log are skipped and counted in :attr:`out_of_range`.
        A ``length`` of zero or less marks nothing.  Never raises for any
        address.
        """
        if length <= 0 or gpa < 0 or self.fd < 0:
            return
        lock = self.lock
        if lock is None:
            self._mark(gpa, length)
            return
        lock.acquire()
        try:
            self._mark(gpa, length)
        finally:
            lock.release()

    def _mark(self, gpa: int, length: int) -> None:
        self.marks += 1
        first = gpa >> _PAGE_SHIFT
        last = (gpa + length - 1) >> _PAGE_SHIFT
        limit = self.size * 8
        if last >= limit:
            self.out_of_range += last - max(first, limit) + 1
            if first >= limit:
                return
            last = limit - 1
        view = self._view
        b0, b1 = first >> 3, last >> 3
        lo = (0xFF << (first & 7)) & 0xFF
        hi = 0xFF >> (7 - (last & 7))
        if b0 == b1:
            view[b0] |= lo & hi
            return
        view[b0] |= lo
        if b1 > b0 + 1:
            view[b0 + 1:b1] = b"\xff" * (b1 - b0 - 1)
        view[b1] |= hi

    def is_dirty(self, gpa: int) -> bool:
        """Whether the page holding ``gpa`` is marked (False beyond the log)."""
        page = gpa >> _PAGE_SHIFT
        if page >= self.size * 8:
            return False
        return bool(self._view[page >> 3] & (1 << (page & 7)))

    def dirty_pages(self) -> list:
        """Sorted page numbers whose bit is set (for tests and debugging)."""
        out = []
        view = self._view
        for i in range(self.size):
            b = view[i]
            if b:
                out.extend(i * 8 + j for j in range(8) if b & (1 << j))
        return out

    def clear(self) -> None:
        """Zero every bit (what a front-end does after it has synced the log)."""
        self._view[:] = bytes(self.size)

    def kick(self) -> None:
        """Signal ``call_fd`` (if any) that the log changed.  Never raises."""
        if self.call_fd >= 0:
            try:
                eventfd.signal(self.call_fd)
            except OSError:
                pass

    def close(self) -> None:
        """Unmap the log and close its fd.  Idempotent.  ``call_fd`` is left
        alone (the caller owns it)."""
        if self.fd < 0:
            return
        self._view.release()
        try:
            self._mm.close()
        except BufferError:
            pass
        os.close(self.fd)
        self.fd = -1

    @property
    def closed(self) -> bool:
        return self.fd < 0
