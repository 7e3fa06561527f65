"""Unit tests of shardvu.testing.driver: the driver side of a split virtqueue."""
from __future__ import annotations

import os
import struct

import pytest

from shardvu.testing.driver import (DESC_SIZE, VRING_AVAIL_F_NO_INTERRUPT, VRING_DESC_F_INDIRECT,
                            VRING_DESC_F_NEXT, VRING_DESC_F_WRITE, VRING_USED_F_NO_NOTIFY,
                            DriverError, DriverQueue, QueueFull, need_event, ring_layout)
from shardvu.memory import GuestMemory
from shardvu.protocol import MemoryRegion

BASE = 0x10000
MEM_SIZE = 1 << 20


@pytest.fixture
def mem():
    m = GuestMemory()
    fd = os.memfd_create("test-driver", os.MFD_CLOEXEC)
    os.ftruncate(fd, MEM_SIZE)
    m.add(MemoryRegion(BASE, MEM_SIZE, 0x7F00_0000_0000, 0), fd)
    yield m
    m.close()


class Bump:
    """A bump allocator in the test memory, above the rings."""

    def __init__(self, start: int):
        self.next = start
        self.calls = 0

    def __call__(self, size: int, align: int) -> int:
        self.next = (self.next + align - 1) & ~(align - 1)
        gpa, self.next = self.next, self.next + size
        self.calls += 1
        return gpa


def make(mem, size=8, **kw) -> DriverQueue:
    kw.setdefault("alloc", Bump(BASE + 0x80000))
    return DriverQueue(mem, BASE, size, **kw)


def u16(mem, gpa):
    return struct.unpack("<H", mem.read(gpa, 2))[0]


def device_use(mem, vq: DriverQueue, entries):
    """Play the device: append (id, len) entries to the used ring, then bump idx."""
    idx = u16(mem, vq.used_gpa + 2)
    for head, length in entries:
        mem.write(vq.used_gpa + 4 + 8 * (idx % vq.size), struct.pack("<II", head, length))
        idx = (idx + 1) & 0xFFFF
    mem.write(vq.used_gpa + 2, struct.pack("<H", idx))


def device_pop(mem, vq: DriverQueue, last_avail: int):
    """Play the device: the heads published since ``last_avail``."""
    idx = u16(mem, vq.avail_gpa + 2)
    heads = []
    while last_avail != idx:
        heads.append(u16(mem, vq.avail_gpa + 4 + 2 * (last_avail % vq.size)))
        last_avail = (last_avail + 1) & 0xFFFF
    return heads, last_avail


# -- layout ------------------------------------------------------------------------------
def test_layout_sizes_and_alignment():
    lay = ring_layout(256)
    assert lay.desc == 0
    assert lay.avail == 16 * 256
    assert lay.used % 4 == 0 and lay.used >= lay.avail + 6 + 2 * 256
    assert lay.total == lay.used + 6 + 8 * 256
    legacy = ring_layout(256, used_align=4096)
    assert legacy.used == 8192  # 4096 + 518 rounded up to a page
    assert legacy.total == 8192 + 6 + 8 * 256
    assert ring_layout(1).used == 16 + 8  # 16 + 6 + 2 = 24, already 4-aligned


@pytest.mark.parametrize("size", [0, 3, 100, 65536])
def test_layout_rejects_bad_sizes(size):
    with pytest.raises(ValueError):
        ring_layout(size)


def test_ring_must_be_aligned_and_in_one_region(mem):
    with pytest.raises(ValueError):
        DriverQueue(mem, BASE + 8, 8)
    with pytest.raises(ValueError):
        DriverQueue(mem, BASE + MEM_SIZE - 64, 8)  # runs past the region's end
    with pytest.raises(ValueError):
        DriverQueue(mem, 0, 8)  # not in guest memory


def test_ring_addresses_and_zeroing(mem):
    mem.write(BASE, b"\xff" * 4096)
    vq = make(mem, 16)
    assert vq.desc_gpa == BASE
    assert vq.avail_gpa == BASE + 16 * 16
    assert vq.used_gpa % 4 == 0
    assert mem.read(BASE, vq.layout.total) == bytes(vq.layout.total)
    assert vq.num_free == 16 and vq.outstanding == 0


# -- adding and publishing ---------------------------------------------------------------
def test_add_writes_chain_but_publish_makes_it_visible(mem):
    vq = make(mem)
    head = vq.add([(0x20000, 100), (0x21000, 50)], [(0x22000, 2048)])
    assert vq.num_free == 5
    # entry written, idx not yet
    assert u16(mem, vq.avail_gpa + 4) == head
    assert u16(mem, vq.avail_gpa + 2) == 0
    addr, length, flags, nxt = vq.read_desc(head)
    assert (addr, length, flags) == (0x20000, 100, VRING_DESC_F_NEXT)
    a2, l2, f2, n2 = vq.read_desc(nxt)
    assert (a2, l2, f2) == (0x21000, 50, VRING_DESC_F_NEXT)
    a3, l3, f3, _ = vq.read_desc(n2)
    assert (a3, l3, f3) == (0x22000, 2048, VRING_DESC_F_WRITE)
    assert len({head, nxt, n2}) == 3
    assert vq.publish() == 1
    assert u16(mem, vq.avail_gpa + 2) == 1
    assert vq.publish() == 0


def test_descriptor_wire_format(mem):
    vq = make(mem)
    head = vq.add([(0x1122334455667788, 0xAABBCCDD)])
    raw = mem.read(vq.desc_gpa + DESC_SIZE * head, DESC_SIZE)
    assert raw == struct.pack("<QIHH", 0x1122334455667788, 0xAABBCCDD, 0, 0)


def test_empty_chain_rejected(mem):
    vq = make(mem)
    with pytest.raises(ValueError):
        vq.add([], [])


def test_free_list_exhaustion_and_recycling(mem):
    vq = make(mem, 4)
    h1 = vq.add([(0x20000, 1), (0x20001, 1)])
    h2 = vq.add([(0x20002, 1)], [(0x20003, 1)])
    assert vq.num_free == 0
    with pytest.raises(QueueFull):
        vq.add([(0x20004, 1)])
    with pytest.raises(QueueFull):
        vq.add([(0x20004, 1)], indirect=True)
    vq.publish()
    device_use(mem, vq, [(h2, 1)])
    assert vq.pending_used() == 1
    assert vq.get_used() == [(h2, 1)]
    assert vq.num_free == 2 and vq.outstanding == 1
    with pytest.raises(QueueFull):
        vq.add([(0, 1)] * 3)
    vq.add([(0, 1)] * 2)
    device_use(mem, vq, [(h1, 0)])
    assert vq.get_used() == [(h1, 0)]
    assert vq.get_used() == []


def test_tokens_and_detach(mem):
    vq = make(mem, 4)
    h = vq.add([(0x20000, 10)], token="frame-1")
    assert vq.token(h) == "frame-1"
    assert vq.detach(h) == "frame-1"
    assert vq.num_free == 4


def test_used_out_of_order(mem):
    vq = make(mem, 8)
    heads = [vq.add([], [(0x20000 + i * 0x100, 0x100)]) for i in range(4)]
    vq.publish()
    device_use(mem, vq, [(heads[2], 10), (heads[0], 20)])
    assert vq.get_used() == [(heads[2], 10), (heads[0], 20)]
    device_use(mem, vq, [(heads[3], 30), (heads[1], 40)])
    assert vq.get_used() == [(heads[3], 30), (heads[1], 40)]
    assert vq.num_free == 8


# -- 16-bit wraparound -------------------------------------------------------------------
def test_indexes_wrap_at_16_bits(mem):
    vq = make(mem, 4)
    last_avail = 0
    total = 0x10000 + 37
    done = 0
    while done < total:
        batch = min(3, total - done)
        for i in range(batch):
            vq.add([(0x20000 + i, 1 + (done + i) % 7)])
        vq.publish()
        heads, last_avail = device_pop(mem, vq, last_avail)
        assert len(heads) == batch
        device_use(mem, vq, [(h, 0) for h in heads])
        assert [h for h, _ in vq.get_used()] == heads
        done += batch
    assert vq.avail_idx == total & 0xFFFF == vq.published_idx
    assert vq.last_used_idx == total & 0xFFFF
    assert u16(mem, vq.avail_gpa + 2) == total & 0xFFFF
    assert u16(mem, vq.used_gpa + 2) == total & 0xFFFF
    assert vq.num_free == 4


def test_pending_used_across_wrap(mem):
    vq = make(mem, 8)
    vq.last_used_idx = 0xFFFE
    vq.add([(0x20000, 1)])
    vq.add([(0x20000, 1)])
    mem.write(vq.used_gpa + 2, struct.pack("<H", 0xFFFE))
    heads = list(vq._chains)
    device_use(mem, vq, [(heads[0], 0), (heads[1], 0)])
    assert vq.used_idx == 0
    assert vq.pending_used() == 2
    assert len(vq.get_used()) == 2
    assert vq.last_used_idx == 0


# -- indirect tables -----------------------------------------------------------------------
def test_indirect_table_layout(mem):
    alloc = Bump(BASE + 0x80000)
    vq = make(mem, 4, alloc=alloc)
    head = vq.add([(0x30000, 12), (0x31000, 1500)], [(0x32000, 64)], indirect=True)
    assert vq.num_free == 3
    table, length, flags, nxt = vq.read_desc(head)
    assert flags == VRING_DESC_F_INDIRECT and length == 3 * DESC_SIZE and nxt == 0
    assert table % 16 == 0
    entries = [struct.unpack("<QIHH", mem.read(table + i * DESC_SIZE, DESC_SIZE)) for i in range(3)]
    assert entries == [(0x30000, 12, VRING_DESC_F_NEXT, 1),
                       (0x31000, 1500, VRING_DESC_F_NEXT, 2),
                       (0x32000, 64, VRING_DESC_F_WRITE, 0)]
    vq.publish()
    device_use(mem, vq, [(head, 64)])
    assert vq.get_used() == [(head, 64)]
    assert vq.num_free == 4
    # the table is reused for a chain of the same capacity
    head2 = vq.add([(0x40000, 1)] * 4, indirect=True)
    assert vq.read_desc(head2)[0] == table
    assert alloc.calls == 1
    # a longer chain needs a bigger table
    vq.add([(0x40000, 1)] * 5, indirect=True)
    assert alloc.calls == 2


def test_indirect_without_alloc(mem):
    vq = DriverQueue(mem, BASE, 4)
    with pytest.raises(ValueError):
        vq.add([(0x30000, 1)], indirect=True)


# -- notification suppression -------------------------------------------------------------
def test_need_event():
    assert need_event(0, 1, 0)
    assert not need_event(1, 1, 0)
    assert need_event(5, 10, 3)
    assert not need_event(10, 10, 3)
    assert not need_event(2, 10, 3)
    # across the wrap
    assert need_event(0xFFFF, 2, 0xFFFE)
    assert need_event(1, 2, 0xFFFE)
    assert not need_event(2, 2, 0xFFFE)


def test_kick_needed_without_event_idx(mem):
    vq = make(mem)
    assert not vq.kick_needed()  # nothing published
    vq.add([(0x20000, 1)])
    vq.publish()
    assert vq.kick_needed()
    assert not vq.kick_needed()  # already told
    mem.write(vq.used_gpa, struct.pack("<H", VRING_USED_F_NO_NOTIFY))
    vq.add([(0x20000, 1)])
    vq.publish()
    assert not vq.kick_needed()
    mem.write(vq.used_gpa, struct.pack("<H", 0))
    vq.add([(0x20000, 1)])
    vq.publish()
    assert vq.kick_needed()


def test_kick_needed_with_event_idx(mem):
    vq = make(mem, 8, event_idx=True)
    avail_event_gpa = vq.used_gpa + 4 + 8 * 8
    # NO_NOTIFY is ignored with EVENT_IDX
    mem.write(vq.used_gpa, struct.pack("<H", VRING_USED_F_NO_NOTIFY))
    vq.add([(0x20000, 1)])
    vq.publish()          # idx 0 -> 1, avail_event 0 in window
    assert vq.kick_needed()
    mem.write(avail_event_gpa, struct.pack("<H", 3))
    for _ in range(2):
        vq.add([(0x20000, 1)])
    vq.publish()          # 1 -> 3: entry 3 not yet written
    assert not vq.kick_needed()
    vq.add([(0x20000, 1)])
    vq.publish()          # 3 -> 4: entry 3 written
    assert vq.avail_event == 3
    assert vq.kick_needed()


def test_interrupt_suppression_without_event_idx(mem):
    vq = make(mem)
    vq.disable_interrupts()
    assert vq.avail_flags == VRING_AVAIL_F_NO_INTERRUPT
    assert not vq.enable_interrupts()
    assert vq.avail_flags == 0
    h = vq.add([(0x20000, 1)])
    vq.publish()
    device_use(mem, vq, [(h, 0)])
    assert vq.enable_interrupts()  # pending: poll instead of sleeping


def test_interrupt_suppression_with_event_idx(mem):
    vq = make(mem, 8, event_idx=True)
    vq.set_used_event(0x1234)
    assert vq.used_event == 0x1234
    assert u16(mem, vq.avail_gpa + 4 + 2 * 8) == 0x1234
    vq.disable_interrupts()
    assert vq.avail_flags == 0  # flags must stay 0 with EVENT_IDX
    assert vq.used_event == 0xFFFF  # just behind last_used 0: far away
    h = vq.add([(0x20000, 1)])
    vq.publish()
    device_use(mem, vq, [(h, 0)])
    vq.get_used()
    assert not vq.enable_interrupts()
    assert vq.used_event == 1


# -- raw access for hostile rings ----------------------------------------------------------
def test_raw_descriptors_and_avail(mem):
    vq = make(mem, 8)
    vq.write_desc(5, 0xDEAD0000, 0xFFFFFFFF, VRING_DESC_F_NEXT, 5)  # a self loop
    assert vq.read_desc(5) == (0xDEAD0000, 0xFFFFFFFF, VRING_DESC_F_NEXT, 5)
    vq.push_avail(5)
    vq.push_avail(4000)  # out of range head
    assert vq.publish() == 2
    assert u16(mem, vq.avail_gpa + 4) == 5
    assert u16(mem, vq.avail_gpa + 6) == 4000
    assert vq.num_free == 8  # raw pushes do not use the free list
    device_use(mem, vq, [(5, 0)])
    assert vq.get_used() == [(5, 0)]
    assert vq.num_free == 8
    vq.write_avail_idx(0x8000)
    assert u16(mem, vq.avail_gpa + 2) == 0x8000 and vq.avail_idx == 0x8000
    with pytest.raises(IndexError):
        vq.write_desc(8, 0, 0, 0, 0)


def test_unknown_used_head_is_reported(mem):
    vq = make(mem, 8)
    h = vq.add([(0x20000, 1)])
    vq.publish()
    device_use(mem, vq, [(7, 0), (h, 0)])
    with pytest.raises(DriverError) as info:
        vq.get_used()
    assert info.value.used == [(7, 0), (h, 0)]
    assert vq.num_free == 8  # the good chain was still freed
    lax = DriverQueue(mem, BASE + 0x4000, 8, strict=False)
    device_use(mem, lax, [(3, 0)])
    assert lax.get_used() == [(3, 0)]


def test_used_length_beyond_writable_is_recorded(mem):
    vq = make(mem, 8)
    h = vq.add([(0x20000, 10)], [(0x21000, 100)])
    vq.publish()
    device_use(mem, vq, [(h, 101)])
    assert vq.get_used() == [(h, 101)]
    assert vq.len_violations == [(h, 101, 100)]


def test_close_releases_memory(mem):
    vq = make(mem)
    region = mem.regions[0]
    vq.close()
    vq.close()
    with pytest.raises(ValueError):
        vq.read_desc(0)
    mem.close()  # must not be blocked by the queue's view
    assert len(mem) == 0
    assert region._mm.closed
