"""Test helpers: memfd-backed guest memory and a hand-written driver side of
a split ring (descriptor table, avail ring, used ring readers)."""
from __future__ import annotations

import os
import struct
from typing import List, Sequence, Tuple

from shardvu import eventfd
from shardvu.memory import GuestMemory
from shardvu.protocol import MemoryRegion, VringAddr
from shardvu.virtqueue import (VRING_DESC_F_INDIRECT, VRING_DESC_F_NEXT, VRING_DESC_F_WRITE,
                               VirtQueue)

NEXT, WRITE, INDIRECT = VRING_DESC_F_NEXT, VRING_DESC_F_WRITE, VRING_DESC_F_INDIRECT
DESC = struct.Struct("<QIHH")
U16 = struct.Struct("<H")
USED_ELEM = struct.Struct("<II")

#: Front-end virtual addresses are gpa + this (per region, see make_memory).
UVA_BASE = 0x7F00_0000_0000

# Default layout: two adjacent 64 KiB regions, a third one far away.
REGION0 = (0x0, 0x10000)
REGION1 = (0x10000, 0x10000)
REGION2 = (0x200000, 0x8000)
DESC_GPA, AVAIL_GPA, USED_GPA = 0x1000, 0x2000, 0x3000


def make_memory(layout: Sequence[Tuple[int, int]] = (REGION0, REGION1, REGION2),
                guard: int = 0) -> Tuple[GuestMemory, List[Tuple[int, int, int]]]:
    """Guest memory with one memfd per ``(gpa, size)``.  Region ``k`` lives
    at uva ``UVA_BASE + k * 2**32 + gpa`` (so uvas are not contiguous across
    regions).  Each memfd has ``guard`` extra bytes before and after the
    region's bytes.  Returns the memory and, per region, ``(dup_fd, guard,
    size)`` for inspecting the file outside the region (caller closes)."""
    mem = GuestMemory()
    files = []
    for k, (gpa, size) in enumerate(layout):
        fd = os.memfd_create(f"guest{k}", os.MFD_CLOEXEC)
        os.ftruncate(fd, size + 2 * guard)
        files.append((os.dup(fd), guard, size))
        mem.add(MemoryRegion(gpa, size, region_uva(k, gpa), guard), fd)
    return mem, files


def region_uva(k: int, gpa: int) -> int:
    return UVA_BASE + (k << 32) + gpa


def guard_bytes(files: List[Tuple[int, int, int]]) -> List[bytes]:
    """The guard bytes of each memfd (before and after the region)."""
    out = []
    for fd, guard, size in files:
        out.append(os.pread(fd, guard, 0) + os.pread(fd, guard, guard + size))
    return out


class DriverRing:
    """The driver's view of one split ring in guest memory, written by hand."""

    def __init__(self, mem: GuestMemory, num: int, desc: int = DESC_GPA,
                 avail: int = AVAIL_GPA, used: int = USED_GPA):
        self.mem = mem
        self.num = num
        self.desc_gpa, self.avail_gpa, self.used_gpa = desc, avail, used
        self.avail_idx = 0
        self._next_free = 0

    # -- addresses -------------------------------------------------------
    def uva(self, gpa: int) -> int:
        r = self.mem.find_gpa(gpa)
        assert r is not None, hex(gpa)
        return r.uva + (gpa - r.gpa)

    def vring_addr(self, index: int = 0, flags: int = 0, log: int = 0) -> VringAddr:
        return VringAddr(index, flags, self.uva(self.desc_gpa), self.uva(self.used_gpa),
                         self.uva(self.avail_gpa), log)

    # -- descriptors -------------------------------------------------------
    def set_desc(self, i: int, addr: int, length: int, flags: int = 0, next: int = 0) -> None:
        self.mem.write(self.desc_gpa + 16 * i, DESC.pack(addr, length, flags, next))

    def write_table(self, gpa: int, descs: Sequence[Tuple[int, int, int, int]]) -> None:
        """Write an indirect table of (addr, len, flags, next) at ``gpa``."""
        self.mem.write(gpa, b"".join(DESC.pack(*d) for d in descs))

    def chain(self, bufs: Sequence[Tuple[int, int, bool]]) -> int:
        """Allocate descriptors for ``(gpa, len, writable)`` buffers, linked
        in order; returns the head index."""
        idx = [(self._next_free + k) % self.num for k in range(len(bufs))]
        self._next_free = (self._next_free + len(bufs)) % self.num
        for k, (gpa, length, writable) in enumerate(bufs):
            flags = WRITE if writable else 0
            nxt = 0
            if k + 1 < len(bufs):
                flags |= NEXT
                nxt = idx[k + 1]
            self.set_desc(idx[k], gpa, length, flags, nxt)
        return idx[0]

    # -- avail ring ----------------------------------------------------------
    def publish(self, *heads: int) -> None:
        """Put heads in the avail ring, then advance avail->idx."""
        for h in heads:
            self.mem.write(self.avail_gpa + 4 + 2 * (self.avail_idx % self.num), U16.pack(h))
            self.avail_idx = (self.avail_idx + 1) & 0xFFFF
        self.set_avail_idx(self.avail_idx)

    def set_avail_idx(self, idx: int) -> None:
        self.avail_idx = idx & 0xFFFF
        self.mem.write(self.avail_gpa + 2, U16.pack(self.avail_idx))

    def set_avail_flags(self, flags: int) -> None:
        self.mem.write(self.avail_gpa, U16.pack(flags))

    def set_used_event(self, v: int) -> None:
        self.mem.write(self.avail_gpa + 4 + 2 * self.num, U16.pack(v & 0xFFFF))

    # -- used ring -----------------------------------------------------------
    def used_idx(self) -> int:
        return U16.unpack(self.mem.read(self.used_gpa + 2, 2))[0]

    def set_used_idx(self, v: int) -> None:
        self.mem.write(self.used_gpa + 2, U16.pack(v & 0xFFFF))

    def used_flags(self) -> int:
        return U16.unpack(self.mem.read(self.used_gpa, 2))[0]

    def used_elem(self, slot: int) -> Tuple[int, int]:
        return USED_ELEM.unpack(self.mem.read(self.used_gpa + 4 + 8 * (slot % self.num), 8))

    def avail_event(self) -> int:
        return U16.unpack(self.mem.read(self.used_gpa + 4 + 8 * self.num, 2))[0]


class Harness:
    """A started VirtQueue on a DriverRing, with real call/err eventfds."""

    def __init__(self, mem: GuestMemory, ring: DriverRing, features: int = 0,
                 index: int = 0, start: bool = True, flags: int = 0, log_addr: int = 0):
        self.mem = mem
        self.ring = ring
        self.call_fd = eventfd.eventfd()
        self.err_fd = eventfd.eventfd()
        vq = VirtQueue(index)
        vq.num = ring.num
        vq.addr = ring.vring_addr(index, flags, log_addr)
        vq.mem = mem
        vq.features = features
        vq.call_fd = self.call_fd
        vq.err_fd = self.err_fd
        vq.map_rings()
        vq.started = start
        vq.enable = True
        self.vq = vq

    def calls(self) -> int:
        """Signals on the call eventfd since the last check (drains it)."""
        return eventfd.drain(self.call_fd)

    def errors(self) -> int:
        return eventfd.drain(self.err_fd)

    def close(self) -> None:
        self.vq.unmap_rings()
        for fd in (self.call_fd, self.err_fd):
            os.close(fd)


def bit(n: int) -> int:
    return 1 << n


def pattern(n: int, seed: int = 1) -> bytes:
    return bytes((seed + i * 7) & 0xFF for i in range(n))


def read_used(ring: DriverRing, start: int, count: int) -> List[Tuple[int, int]]:
    return [ring.used_elem(start + k) for k in range(count)]
