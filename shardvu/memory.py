"""Guest memory: the regions a front-end shares, as a table and (where this
process serves rings) mapped into this process.

The counterpart of libvhost-user's ``VuDevRegion`` table and of
``vu_gpa_to_va``/``qva_to_va``.  Each region is mapped ``MAP_SHARED`` from
the fd the front-end sent, honouring ``mmap_offset`` (the mapping starts at
file offset 0 and the region's bytes start ``mmap_offset`` into it, as
libvhost-user does, so unaligned offsets work).

Contract: :class:`GuestMemory` owns the fds and mappings it holds.  Removing
a region, :meth:`GuestMemory.clear` and :meth:`GuestMemory.close` unmap it
and close its fd.  A mapping whose memoryviews are still referenced
elsewhere cannot be closed at once in Python; it is then released when the
last view goes (the fd is still closed immediately).

Every region's fd is checked with ``fstat`` before it is kept: it must be a
regular file (memfd, shm, hugetlbfs) whose size covers ``mmap_offset +
size``, so a mapping never starts out past the end of its file.  (A file
the front-end truncates *after* that is its own violation: an access then
faults with SIGBUS, which Python cannot catch.)  ``GuestMemory(map_regions=False)``
keeps the table and the fds without mapping anything: the sharded
runtime's control process, which checks ring addresses by arithmetic and
never touches guest memory.
"""
from __future__ import annotations

import mmap
import os
from typing import List, Optional, Tuple

from .protocol import MemoryRegion
from .transport import check_mappable

__all__ = ["Region", "MappedRegion", "GuestMemory", "MemoryMapError", "check_fd_covers"]


class MemoryMapError(Exception):
    """A region could not be mapped, or would overlap another."""


def check_fd_covers(fd: int, end: int, what: str = "memory region") -> None:
    """``fstat`` ``fd``: it must be a regular file of at least ``end`` bytes
    (:func:`shardvu.transport.check_mappable`).  Raises
    :class:`MemoryMapError` saying why not (the fd stays open)."""
    try:
        check_mappable(fd, 0, end, what)
    except ValueError as exc:
        raise MemoryMapError(str(exc)) from None


class Region:
    """One entry of the region table: the front-end's description and its
    fd (owned), not mapped.  ``view`` is None."""

    __slots__ = ("gpa", "size", "uva", "mmap_offset", "fd", "gpa_end", "uva_end", "refs",
                 "view", "_mm")

    def __init__(self, desc: MemoryRegion, fd: int):
        if desc.size == 0:
            raise MemoryMapError("region size is zero")
        if desc.gpa + desc.size > 1 << 64 or desc.uva + desc.size > 1 << 64:
            raise MemoryMapError("region wraps the address space")
        check_fd_covers(fd, desc.mmap_offset + desc.size)
        self.gpa = desc.gpa
        self.size = desc.size
        self.uva = desc.uva
        self.mmap_offset = desc.mmap_offset
        self.fd = fd
        self.gpa_end = desc.gpa + desc.size
        self.uva_end = desc.uva + desc.size
        #: times this exact region was added (see GuestMemory.add)
        self.refs = 1
        self.view: Optional[memoryview] = None
        self._mm: Optional[mmap.mmap] = None

    @property
    def mm(self):
        """The raw mapping; the region's byte ``i`` is ``mm[mmap_offset + i]``.
        (PyPy's data path copies through it: its mmap slice assignment is a
        plain memcpy, faster than through a memoryview.)  None if unmapped."""
        return self._mm

    def describe(self) -> MemoryRegion:
        return MemoryRegion(self.gpa, self.size, self.uva, self.mmap_offset)

    def matches(self, desc: MemoryRegion) -> bool:
        """REM_MEM_REG identity: guest address, user address and size."""
        return (self.gpa, self.uva, self.size) == (desc.gpa, desc.uva, desc.size)

    def close(self) -> None:
        """Unmap (as soon as no view is left) and close the fd.  Idempotent."""
        if self.fd < 0:
            return
        if self.view is not None:
            self.view.release()
        if self._mm is not None:
            try:
                self._mm.close()
            except BufferError:
                pass  # someone still holds a slice; the mapping goes with it
        os.close(self.fd)
        self.fd = -1

    def __repr__(self) -> str:
        return (f"{type(self).__name__}(gpa={self.gpa:#x}, size={self.size:#x}, "
                f"uva={self.uva:#x}, off={self.mmap_offset:#x})")


class MappedRegion(Region):
    """One mapped region.  ``view`` covers exactly the region's ``size``
    bytes; byte ``i`` of it is guest-physical ``gpa + i`` and front-end
    virtual ``uva + i``."""

    __slots__ = ()

    def __init__(self, desc: MemoryRegion, fd: int):
        super().__init__(desc, fd)
        try:
            mm = mmap.mmap(fd, desc.size + desc.mmap_offset, flags=mmap.MAP_SHARED,
                           prot=mmap.PROT_READ | mmap.PROT_WRITE)
        except (OSError, ValueError, OverflowError) as exc:
            raise MemoryMapError(f"mmap of fd {fd} failed: {exc}") from None
        self._mm = mm
        self.view = memoryview(mm)[desc.mmap_offset:desc.mmap_offset + desc.size]


class GuestMemory:
    """The region table of one device (at most ``max_slots``), mapped into
    this process unless ``map_regions`` is False (then only the table and the fds
    are kept, and the translation methods raise MemoryMapError)."""

    def __init__(self, max_slots: int = 509, map_regions: bool = True):
        self.max_slots = max_slots
        self.maps = map_regions
        self.regions: List[Region] = []

    # -- table changes ------------------------------------------------------
    def add(self, desc: MemoryRegion, fd: int) -> Region:
        """Map ``desc`` from ``fd``.  Takes ownership of ``fd``: on failure it
        is closed and :class:`MemoryMapError` says why.

        Adding a region identical to a mapped one (same gpa, size, user
        address and offset) maps nothing: ``fd`` is closed and the region's
        ``refs`` goes up.  QEMU 7.2 sends ADD_MEM_REG once per queue pair on
        a multiqueue device, and REM_MEM_REG as many times."""
        for r in self.regions:
            if r.describe() == desc:
                os.close(fd)
                r.refs += 1
                return r
        try:
            if len(self.regions) >= self.max_slots:
                raise MemoryMapError(f"all {self.max_slots} memory slots are in use")
            for r in self.regions:
                if desc.gpa < r.gpa_end and r.gpa < desc.gpa + desc.size:
                    raise MemoryMapError(f"guest range {desc.gpa:#x}+{desc.size:#x} overlaps {r}")
            region = MappedRegion(desc, fd) if self.maps else Region(desc, fd)
        except MemoryMapError:
            os.close(fd)
            raise
        self.regions.append(region)
        self.regions.sort(key=lambda r: r.gpa)
        return region

    def remove(self, desc: MemoryRegion) -> bool:
        """Drop one reference to the region matching ``desc`` (gpa, uva,
        size), unmapping it when none is left; False if there is none."""
        for i, r in enumerate(self.regions):
            if r.matches(desc):
                r.refs -= 1
                if r.refs <= 0:
                    del self.regions[i]
                    r.close()
                return True
        return False

    def clear(self) -> None:
        """Unmap every region and close its fd."""
        regions, self.regions = self.regions, []
        for r in regions:
            r.close()

    close = clear

    def __len__(self) -> int:
        return len(self.regions)

    # -- translation ----------------------------------------------------------
    def find_gpa(self, gpa: int) -> Optional[Region]:
        for r in self.regions:
            if r.gpa <= gpa < r.gpa_end:
                return r
        return None

    def gpa_to_va(self, gpa: int, plen: int) -> Tuple[Optional[memoryview], int]:
        """libvhost-user's ``vu_gpa_to_va``: a view starting at ``gpa`` and the
        length available there, ``min(plen, bytes to the region's end)``.
        Returns ``(None, 0)`` when ``gpa`` lies in no region.  A caller that
        needs more than the returned length must translate the rest itself."""
        r = self.find_gpa(gpa)
        if r is None:
            return None, 0
        if r.view is None:
            raise MemoryMapError("guest memory is not mapped in this process")
        off = gpa - r.gpa
        n = min(plen, r.size - off)
        return r.view[off:off + n], n

    def gpa_range(self, gpa: int, length: int) -> Optional[Tuple[Region, int]]:
        """The region holding all of ``[gpa, gpa+length)`` and the offset of
        ``gpa`` in it, or None when the range is not inside one region."""
        for r in self.regions:
            if r.gpa <= gpa and gpa + length <= r.gpa_end:
                return r, gpa - r.gpa
        return None

    def uva_range(self, uva: int, length: int) -> Optional[Tuple[Region, int]]:
        """As :meth:`gpa_range`, for a front-end virtual address (``qva_to_va``)."""
        for r in self.regions:
            if r.uva <= uva and uva + length <= r.uva_end:
                return r, uva - r.uva
        return None

    def uva_to_gpa(self, uva: int) -> Optional[int]:
        for r in self.regions:
            if r.uva <= uva < r.uva_end:
                return r.gpa + (uva - r.uva)
        return None

    def read(self, gpa: int, length: int) -> bytes:
        """Copy ``length`` bytes from guest memory, across regions.  Raises
        ValueError if any byte lies outside guest memory."""
        out = bytearray()
        while length:
            view, n = self.gpa_to_va(gpa, length)
            if view is None:
                raise ValueError(f"guest address {gpa:#x} is not mapped")
            out += view
            gpa += n
            length -= n
        return bytes(out)

    def write(self, gpa: int, data: bytes) -> None:
        """Copy ``data`` into guest memory, across regions (ValueError if unmapped)."""
        pos = 0
        while pos < len(data):
            view, n = self.gpa_to_va(gpa + pos, len(data) - pos)
            if view is None:
                raise ValueError(f"guest address {gpa + pos:#x} is not mapped")
            view[:] = data[pos:pos + n]
            pos += n
