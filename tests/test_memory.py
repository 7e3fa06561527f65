"""Guest memory mapping and translation."""
from __future__ import annotations

import os

import pytest

from shardvu.memory import GuestMemory, MemoryMapError
from shardvu.protocol import MemoryRegion
from util import fd_is_open as fd_open, memfd






def test_mmap_offset_is_honoured_and_translation_has_plen_semantics():
    mem = GuestMemory()
    fd = memfd(3 * 4096, b"x" * 100 + b"HELLO")
    mem.add(MemoryRegion(gpa=0x10000, size=8192, uva=0x7f0000, mmap_offset=100), fd)
    view, n = mem.gpa_to_va(0x10000, 5)
    assert bytes(view) == b"HELLO" and n == 5
    view, n = mem.gpa_to_va(0x10000 + 8190, 100)      # clipped at the region end
    assert n == 2 and len(view) == 2
    assert mem.gpa_to_va(0x10000 + 8192, 1) == (None, 0)
    assert mem.uva_range(0x7f0000, 8192)[1] == 0
    assert mem.uva_range(0x7f0000, 8193) is None
    assert mem.uva_to_gpa(0x7f0010) == 0x10010
    mem.clear()
    assert not fd_open(fd)


def test_read_write_span_regions():
    mem = GuestMemory()
    mem.add(MemoryRegion(0, 4096, 0x1000000, 0), memfd(4096))
    mem.add(MemoryRegion(4096, 4096, 0x2000000, 0), memfd(4096))
    mem.write(4090, b"0123456789ab")
    assert mem.read(4090, 12) == b"0123456789ab"
    with pytest.raises(ValueError):
        mem.read(8190, 4)
    mem.close()


def test_zero_size_unmappable_and_overlapping_regions_fail_and_close_the_fd():
    mem = GuestMemory()
    fd = memfd(4096)
    with pytest.raises(MemoryMapError, match="zero"):
        mem.add(MemoryRegion(0, 0, 0, 0), fd)
    assert not fd_open(fd)
    r, w = os.pipe()
    with pytest.raises(MemoryMapError, match="not a file that can be mapped"):
        mem.add(MemoryRegion(0, 4096, 0, 0), r)
    assert not fd_open(r)
    os.close(w)
    mem.add(MemoryRegion(0, 4096, 0, 0), memfd(4096))
    fd = memfd(4096)
    with pytest.raises(MemoryMapError, match="overlaps"):
        mem.add(MemoryRegion(2048, 4096, 0x9000, 0), fd)
    assert not fd_open(fd)
    mem.close()


def test_slots_limit_and_remove():
    mem = GuestMemory(max_slots=2)
    a = MemoryRegion(0, 4096, 0x10000, 0)
    fa = memfd(4096)
    mem.add(a, fa)
    mem.add(MemoryRegion(4096, 4096, 0x20000, 0), memfd(4096))
    fd = memfd(4096)
    with pytest.raises(MemoryMapError, match="slots"):
        mem.add(MemoryRegion(8192, 4096, 0x30000, 0), fd)
    assert mem.remove(a) and not fd_open(fa)
    assert not mem.remove(a)
    assert len(mem) == 1
    mem.close()


def test_509_slots():
    mem = GuestMemory()
    for i in range(509):
        mem.add(MemoryRegion(i * 4096, 4096, 0x100000 + i * 4096, 0), memfd(4096))
    assert mem.find_gpa(508 * 4096 + 5).gpa == 508 * 4096
    mem.close()


def test_a_region_with_live_views_still_closes_its_fd():
    mem = GuestMemory()
    fd = memfd(4096)
    mem.add(MemoryRegion(0, 4096, 0, 0), fd)
    held, _ = mem.gpa_to_va(0, 16)
    mem.clear()
    assert not fd_open(fd)
    held[0] = 1          # the mapping lives on while a view does


def test_an_identical_region_added_twice_is_mapped_once_and_refcounted():
    mem = GuestMemory()
    desc = MemoryRegion(0, 4096, 0x10000, 0)
    fd = memfd(4096)
    first = mem.add(desc, fd)
    dup = memfd(4096)
    assert mem.add(desc, dup) is first and first.refs == 2
    assert not fd_open(dup) and len(mem) == 1
    assert mem.remove(desc) and len(mem) == 1          # one reference left
    assert mem.remove(desc) and len(mem) == 0
    assert not fd_open(fd)


@pytest.mark.parametrize("map_regions", [True, False])
def test_a_region_its_file_does_not_cover_is_refused_before_mapping(map_regions):
    """fstat first: a file shorter than mmap_offset + size would fault (SIGBUS)
    on access, so the region is refused and its fd closed."""
    mem = GuestMemory(map_regions=map_regions)
    for desc, size in ((MemoryRegion(0, 8192, 0x10000, 0), 4096),
                       (MemoryRegion(0, 4096, 0x10000, 4096), 4096)):
        fd = memfd(size)
        with pytest.raises(MemoryMapError, match="needed"):
            mem.add(desc, fd)
        assert not fd_open(fd) and len(mem) == 0
    fd = memfd(8192)
    mem.add(MemoryRegion(0, 4096, 0x10000, 4096), fd)        # exactly covered
    assert len(mem) == 1
    mem.close()
    assert not fd_open(fd)


def test_an_unmapped_table_keeps_regions_and_fds_but_no_mapping():
    mem = GuestMemory(map_regions=False)
    fd = memfd(1 << 16)
    r = mem.add(MemoryRegion(0, 1 << 16, 0x10000, 0), fd)
    assert r.view is None and r.mm is None and r.fd == fd
    assert mem.uva_range(0x10000 + 100, 200) == (r, 100)       # arithmetic still works
    with pytest.raises(MemoryMapError, match="not mapped"):
        mem.gpa_to_va(0, 8)
    mem.clear()
    assert not fd_open(fd)
