from __future__ import annotations

import logging
import os

import pytest

from shardvu.protocol import (MemoryRegion, VIRTIO_F_NOTIFY_ON_EMPTY, VIRTIO_RING_F_EVENT_IDX,
                              VIRTIO_RING_F_INDIRECT_DESC, VringAddr)
from shardvu.virtqueue import (RingError, VirtQueue, VirtqElement, vring_need_event,
                               VRING_USED_F_NO_NOTIFY, VRING_AVAIL_F_NO_INTERRUPT)

from ringutil import (INDIRECT, NEXT, WRITE, DriverRing, Harness, bit, make_memory, pattern,
                      region_uva, read_used)

EVENT_IDX = bit(VIRTIO_RING_F_EVENT_IDX)
INDIRECT_DESC = bit(VIRTIO_RING_F_INDIRECT_DESC)
BUF = 0x4000          # buffers in region 0 from here
BOUNDARY = 0x10000    # region 0 / region 1 boundary (adjacent, different fds)


@pytest.fixture
def mem():
    m, files = make_memory()
    yield m
    for fd, _, _ in files:
        os.close(fd)
    m.close()


def make(mem, num=8, features=0, **kw):
    ring = DriverRing(mem, num)
    return ring, Harness(mem, ring, features, **kw)


@pytest.fixture
def h(mem):
    ring, hh = make(mem)
    yield hh
    hh.close()


# -- basic pop / push --------------------------------------------------------

def test_pop_push_round_trip(h):
    ring, vq, mem = h.ring, h.vq, h.mem
    mem.write(BUF, b"request!")
    head = ring.chain([(BUF, 8, False), (BUF + 0x100, 32, True)])
    ring.publish(head)
    assert not vq.empty()
    elem = vq.pop()
    assert isinstance(elem, VirtqElement)
    assert elem.index == head and elem.out_num == 1 and elem.in_num == 1
    assert bytes(elem.out_sg[0]) == b"request!"
    assert elem.out_sg[0].readonly
    assert elem.in_addr == [(BUF + 0x100, 32)]
    assert elem.write_in(b"reply") == 5
    assert vq.inuse == 1
    assert vq.pop() is None and vq.empty()
    assert ring.used_idx() == 0
    vq.push(elem, 5)
    assert ring.used_idx() == 1 and ring.used_elem(0) == (head, 5)
    assert mem.read(BUF + 0x100, 5) == b"reply"
    assert vq.inuse == 0 and vq.used_idx == 1


def test_pop_needs_started_and_mapped(mem):
    ring, h = make(mem, start=False)
    ring.publish(ring.chain([(BUF, 4, False)]))
    assert h.vq.pop() is None
    h.vq.started = True
    h.vq.unmap_rings()
    assert not h.vq.ready() and h.vq.empty() and h.vq.pop() is None
    h.vq.map_rings()
    assert h.vq.pop() is not None
    h.close()


def test_chain_order_and_totals(h):
    ring, vq = h.ring, h.vq
    head = ring.chain([(BUF, 10, False), (BUF + 0x10, 20, False),
                       (BUF + 0x100, 30, True), (BUF + 0x200, 40, True)])
    ring.publish(head)
    e = vq.pop()
    assert [len(v) for v in e.out_sg] == [10, 20]
    assert [len(v) for v in e.in_sg] == [30, 40]
    assert e.out_addr == [(BUF, 10), (BUF + 0x10, 20)]
    assert e.in_addr == [(BUF + 0x100, 30), (BUF + 0x200, 40)]
    assert (e.out_len, e.in_len) == (30, 70)


def test_zero_length_descriptor_is_skipped(h):
    h.ring.publish(h.ring.chain([(BUF, 0, False), (BUF, 4, True)]))
    e = h.vq.pop()
    assert e.out_num == 0 and e.in_num == 1


def test_many_elements_and_index_wrap(mem):
    ring, h = make(mem, num=4)
    ring.set_avail_idx(0xFFFE)
    h.vq.set_base(0xFFFE)
    ring.set_used_idx(0xFFFE)
    h.vq.map_rings()
    assert h.vq.used_idx == 0xFFFE
    for rnd in range(5):
        heads = []
        for k in range(3):
            ring._next_free = k
            heads.append(ring.chain([(BUF + 0x100 * k, 8, True)]))
        ring.publish(*heads)
        got = [h.vq.pop() for _ in range(3)]
        assert [e.index for e in got] == heads
        assert h.vq.pop() is None
        for e in got:
            h.vq.push(e, 8)
    assert h.vq.used_idx == (0xFFFE + 15) & 0xFFFF == ring.used_idx()
    assert not h.vq.broken
    h.close()


def test_cross_region_buffer_split(h):
    ring, vq, mem = h.ring, h.vq, h.mem
    data = pattern(0x300)
    mem.write(BOUNDARY - 0x100, data)
    ring.publish(ring.chain([(BOUNDARY - 0x100, 0x300, False),
                             (BOUNDARY - 0x10, 0x20, True)]))
    e = vq.pop()
    assert e.out_addr == [(BOUNDARY - 0x100, 0x100), (BOUNDARY, 0x200)]
    assert b"".join(e.out_sg) == data
    assert e.in_addr == [(BOUNDARY - 0x10, 0x10), (BOUNDARY, 0x10)]
    assert e.write_in(b"A" * 0x20) == 0x20
    assert mem.read(BOUNDARY - 0x10, 0x20) == b"A" * 0x20


def test_write_in_offset_and_truncation(h):
    h.ring.publish(h.ring.chain([(BUF, 4, True), (BUF + 0x10, 4, True)]))
    e = h.vq.pop()
    assert e.write_in(b"xyz", offset=3) == 3
    assert h.mem.read(BUF + 3, 1) == b"x" and h.mem.read(BUF + 0x10, 2) == b"yz"
    assert e.write_in(b"0123456789") == 8


# -- indirect ------------------------------------------------------------------

def test_indirect_table(mem):
    ring, h = make(mem, features=INDIRECT_DESC)
    table = 0x8000
    mem.write(BUF, b"hdr!")
    ring.write_table(table, [(BUF, 4, NEXT, 1), (BUF + 0x100, 16, NEXT | WRITE, 2),
                             (BUF + 0x200, 8, WRITE, 0)])
    ring.set_desc(0, table, 48, INDIRECT)
    ring.publish(0)
    e = h.vq.pop()
    assert e.index == 0 and bytes(e.out_sg[0]) == b"hdr!"
    assert e.in_addr == [(BUF + 0x100, 16), (BUF + 0x200, 8)]
    h.close()


def test_direct_chain_then_indirect_tail(mem):
    ring, h = make(mem, features=INDIRECT_DESC)
    ring.write_table(0x8000, [(BUF + 0x100, 16, WRITE, 0)])
    ring.set_desc(3, BUF, 4, NEXT, 5)
    ring.set_desc(5, 0x8000, 16, INDIRECT | WRITE)   # WRITE on it is ignored
    ring.publish(3)
    e = h.vq.pop()
    assert e.out_addr == [(BUF, 4)] and e.in_addr == [(BUF + 0x100, 16)]
    h.close()


def test_indirect_table_spanning_regions(mem):
    ring, h = make(mem, features=INDIRECT_DESC)
    table = BOUNDARY - 16
    ring.write_table(table, [(BUF, 4, NEXT, 1), (BUF + 0x100, 4, WRITE, 0)])
    ring.set_desc(0, table, 32, INDIRECT)
    ring.publish(0)
    e = h.vq.pop()
    assert e.out_addr == [(BUF, 4)] and e.in_addr == [(BUF + 0x100, 4)]
    h.close()


# -- unpop / rewind / batching ---------------------------------------------------

def test_unpop_and_rewind(h):
    ring, vq = h.ring, h.vq
    heads = [ring.chain([(BUF + 0x10 * k, 4, True)]) for k in range(3)]
    ring.publish(*heads)
    a = vq.pop()
    vq.unpop(a)
    assert vq.inuse == 0
    assert vq.pop().index == heads[0]
    b, c = vq.pop(), vq.pop()
    assert [b.index, c.index] == heads[1:]
    assert not vq.rewind(4)
    assert vq.rewind(2) and vq.inuse == 1
    assert [vq.pop().index, vq.pop().index] == heads[1:]
    assert vq.pop() is None


def test_fill_flush_batching(h):
    ring, vq = h.ring, h.vq
    heads = [ring.chain([(BUF + 0x10 * k, 4, True)]) for k in range(3)]
    ring.publish(*heads)
    elems = [vq.pop() for _ in range(3)]
    # complete out of order: third, first, second
    for slot, e in enumerate([elems[2], elems[0], elems[1]]):
        vq.fill(e, slot + 1, slot)
    assert ring.used_idx() == 0 and vq.inuse == 3
    vq.flush(2)
    assert ring.used_idx() == 2 and vq.inuse == 1
    vq.flush(1)
    assert ring.used_idx() == 3 and vq.inuse == 0
    assert read_used(ring, 0, 3) == [(heads[2], 1), (heads[0], 2), (heads[1], 3)]


def test_fill_rejects_oversized_length(h):
    h.ring.publish(h.ring.chain([(BUF, 4, True)]))
    e = h.vq.pop()
    with pytest.raises(ValueError):
        h.vq.fill(e, 1 << 32, 0)


# -- avail bytes -------------------------------------------------------------------

def test_get_avail_bytes(h):
    ring, vq = h.ring, h.vq
    assert vq.get_avail_bytes(100, 100) == (0, 0)
    ring.publish(ring.chain([(BUF, 10, False), (BUF + 0x100, 100, True)]))
    ring.publish(ring.chain([(BUF, 20, False), (BUF + 0x200, 200, True)]))
    assert vq.get_avail_bytes(1000, 1000) == (300, 30)
    assert vq.get_avail_bytes(50, 5) == (100, 10)     # stops after the first chain
    assert vq.avail_bytes(300, 30)
    assert not vq.avail_bytes(301, 0)
    assert not vq.avail_bytes(0, 31)
    assert vq.inuse == 0 and vq.pop() is not None    # nothing was consumed


# -- notifications -----------------------------------------------------------------

def _complete(h, n=1):
    for _ in range(n):
        h.ring.publish(h.ring.chain([(BUF, 4, True)]))
        h.vq.push(h.vq.pop(), 4)


def test_notify_plain_and_no_interrupt(h):
    _complete(h)
    h.vq.notify()
    assert h.calls() == 1 and h.vq.calls_sent == 1
    h.ring.set_avail_flags(VRING_AVAIL_F_NO_INTERRUPT)
    _complete(h)
    h.vq.notify()
    assert h.calls() == 0 and h.vq.notifications_suppressed == 1


def test_notify_on_empty_overrides_no_interrupt(mem):
    ring, h = make(mem, features=bit(VIRTIO_F_NOTIFY_ON_EMPTY))
    ring.set_avail_flags(VRING_AVAIL_F_NO_INTERRUPT)
    ring.publish(ring.chain([(BUF, 4, True)]), ring.chain([(BUF, 4, True)]))
    e = h.vq.pop()
    h.vq.push(e, 4)
    h.vq.notify()                 # one still available: suppressed
    assert h.calls() == 0
    h.vq.push(h.vq.pop(), 4)
    h.vq.notify()                 # empty and idle: always notified
    assert h.calls() == 1
    h.close()


def test_event_idx_suppression(mem):
    ring, h = make(mem, features=EVENT_IDX)
    vq = h.vq
    ring.set_used_event(0)
    _complete(h)                   # used idx 0 -> 1 crosses used_event 0
    vq.notify()
    assert h.calls() == 1
    _complete(h)                   # 1 -> 2, used_event still 0: suppressed
    vq.notify()
    assert h.calls() == 0 and vq.notifications_suppressed == 1
    ring.set_used_event(3)         # driver wants a call once used idx passes 3
    _complete(h)                   # -> 3
    vq.notify()
    assert h.calls() == 0
    _complete(h)                   # -> 4 crosses 3
    vq.notify()
    assert h.calls() == 1
    # batch: several completions, one notify when the event is inside the batch
    ring.set_used_event(6)
    _complete(h, 3)                # 4 -> 7
    vq.notify()
    assert h.calls() == 1
    vq.notify()                    # nothing new since last signal
    assert h.calls() == 0
    assert vq.calls_sent == 3 and vq.notifications_suppressed == 3
    h.close()


def test_event_idx_first_notify_always_signals(mem):
    ring, h = make(mem, features=EVENT_IDX)
    ring.set_used_event(100)
    _complete(h)
    h.vq.notify()                  # signalled_used not valid yet
    assert h.calls() == 1
    _complete(h)
    h.vq.notify()
    assert h.calls() == 0
    h.close()


def test_vring_need_event():
    assert vring_need_event(0, 1, 0)
    assert not vring_need_event(1, 1, 0)
    assert vring_need_event(0xFFFF, 1, 0xFFFE)
    assert not vring_need_event(5, 4, 2)


def test_set_notification_flag_mode(h):
    h.vq.set_notification(False)
    assert h.ring.used_flags() & VRING_USED_F_NO_NOTIFY
    h.vq.set_notification(True)
    assert h.ring.used_flags() == 0 and h.vq.notification


def test_set_notification_event_idx_mode(mem):
    ring, h = make(mem, features=EVENT_IDX)
    ring.publish(ring.chain([(BUF, 4, True)]), ring.chain([(BUF, 4, True)]))
    h.vq.set_notification(True)
    assert ring.avail_event() == 2 and ring.used_flags() == 0
    h.vq.pop()
    assert ring.avail_event() == 1             # pop publishes last_avail_idx
    h.vq.set_notification(False)
    h.vq.pop()
    assert ring.avail_event() == 1             # not advanced while disabled
    assert ring.used_flags() == 0
    ring.publish(ring.chain([(BUF, 4, True)]))
    h.vq.set_notification(True)
    assert ring.avail_event() == 3
    h.vq.pop()
    assert ring.avail_event() == 3
    h.close()


def test_pop_advances_avail_event(mem):
    ring, h = make(mem, features=EVENT_IDX)
    ring.publish(*[ring.chain([(BUF, 4, True)]) for _ in range(3)])
    for k in range(3):
        h.vq.pop()
        assert ring.avail_event() == k + 1
    h.close()


def test_inband_call_and_sync(mem):
    ring, h = make(mem)
    calls = []
    vq = h.vq
    vq.call_fd = -1
    vq.inband_call = lambda: calls.append("async")
    _complete(h)
    vq.notify()
    vq.notify_sync()               # no sync callable: falls back
    vq.inband_call_sync = lambda: calls.append("sync")
    vq.notify_sync()
    assert calls == ["async", "async", "sync"] and vq.calls_sent == 3
    vq.call_fd = h.call_fd         # a call fd takes precedence
    vq.notify_sync()
    assert h.calls() == 1 and len(calls) == 3
    h.close()


# -- map_rings --------------------------------------------------------------------

def test_map_rings_errors(mem):
    vq = VirtQueue(0)
    with pytest.raises(RingError, match="size not set"):
        vq.map_rings()
    vq.num = 12
    with pytest.raises(RingError, match="power of two"):
        vq.map_rings()
    vq.num = 8
    with pytest.raises(RingError, match="addresses"):
        vq.map_rings()
    ring = DriverRing(mem, 8)
    vq.addr = ring.vring_addr()
    with pytest.raises(RingError, match="memory"):
        vq.map_rings()
    vq.mem = mem
    vq.map_rings()
    assert vq.ready()
    # used ring straddling the region 0/1 boundary: uvas are not contiguous
    vq.addr = vq.addr._replace(used=region_uva(0, BOUNDARY - 16))
    with pytest.raises(RingError, match="used ring"):
        vq.map_rings()
    assert not vq.ready()
    vq.addr = vq.addr._replace(used=region_uva(0, 0x3000), desc=0x1234)
    with pytest.raises(RingError, match="descriptor table"):
        vq.map_rings()


def test_remap_after_memory_table_change():
    mem, files = make_memory([(0, 0x10000)])
    ring = DriverRing(mem, 8)
    h = Harness(mem, ring)
    ring.publish(ring.chain([(BUF, 4, False)]), ring.chain([(BUF, 4, False)]))
    e = h.vq.pop()
    # front-end re-maps the same guest memory at a different uva
    h.vq.unmap_rings()
    del e
    region = mem.regions[0]
    fd = os.dup(files[0][0])
    mem.remove(region.describe())
    mem.add(MemoryRegion(0, 0x10000, 0x5550000, 0), fd)
    h.vq.addr = VringAddr(0, 0, 0x5550000 + 0x1000, 0x5550000 + 0x3000, 0x5550000 + 0x2000, 0)
    h.vq.map_rings()
    assert h.vq.inuse == 1 and h.vq.last_avail_idx == 1      # not rewound: one in use
    assert h.vq.pop().index == 1
    h.close()
    os.close(files[0][0])
    mem.close()


def test_processed_in_order_resume(mem):
    ring = DriverRing(mem, 8)
    ring.set_used_idx(3)
    vq = VirtQueue(0)
    vq.num, vq.mem, vq.addr = 8, mem, ring.vring_addr()
    vq.set_base(5)
    vq.map_rings()
    assert vq.used_idx == 3 and vq.last_avail_idx == 5
    vq.processed_in_order = True
    vq.map_rings()
    assert vq.last_avail_idx == 3 and vq.shadow_avail_idx == 3


def test_reset(h):
    h.vq.set_base(4)
    h.vq.mark_broken("test")
    h.vq.reset()
    assert not h.vq.broken and not h.vq.started and not h.vq.enabled
    assert h.vq.num == 0 and h.vq.addr is None and not h.vq.ready()
    assert h.vq.last_avail_idx == 0 and h.vq.call_fd == h.call_fd


# -- hostile rings -------------------------------------------------------------------

def _hostile_loop(ring, mem):
    ring.set_desc(0, BUF, 4, NEXT, 1)
    ring.set_desc(1, BUF, 4, NEXT, 0)
    ring.publish(0)


def _hostile_head(ring, mem):
    ring.publish(8)


def _hostile_next(ring, mem):
    ring.set_desc(0, BUF, 4, NEXT, 9)
    ring.publish(0)


def _hostile_addr(ring, mem):
    ring.set_desc(0, 0x100000, 4, 0)      # between region 1 and region 2
    ring.publish(0)


def _hostile_addr_len(ring, mem):
    ring.set_desc(0, 0x1F000, 0x2000, WRITE)   # runs off the end of region 1
    ring.publish(0)


def _hostile_addr_wrap(ring, mem):
    ring.set_desc(0, (1 << 64) - 4, 16, 0)
    ring.publish(0)


def _hostile_nested(ring, mem):
    ring.write_table(0x8000, [(0x9000, 16, INDIRECT, 0)])
    ring.set_desc(0, 0x8000, 16, INDIRECT)
    ring.publish(0)


def _hostile_indirect_next(ring, mem):
    ring.write_table(0x8000, [(BUF, 4, 0, 0)])
    ring.set_desc(0, 0x8000, 16, INDIRECT | NEXT, 1)
    ring.publish(0)


def _hostile_indirect_len(ring, mem):
    ring.set_desc(0, 0x8000, 24, INDIRECT)
    ring.publish(0)


def _hostile_indirect_zero(ring, mem):
    ring.set_desc(0, 0x8000, 0, INDIRECT)
    ring.publish(0)


def _hostile_indirect_outside(ring, mem):
    ring.set_desc(0, 0x1FFF0, 64, INDIRECT)
    ring.publish(0)


def _hostile_indirect_loop(ring, mem):
    ring.write_table(0x8000, [(BUF, 4, NEXT, 1), (BUF, 4, NEXT, 0)])
    ring.set_desc(0, 0x8000, 32, INDIRECT)
    ring.publish(0)


def _hostile_indirect_next_oob(ring, mem):
    ring.write_table(0x8000, [(BUF, 4, NEXT, 2), (BUF, 4, 0, 0)])
    ring.set_desc(0, 0x8000, 32, INDIRECT)
    ring.publish(0)


def _hostile_read_after_write(ring, mem):
    ring.set_desc(0, BUF, 4, WRITE | NEXT, 1)
    ring.set_desc(1, BUF, 4, 0)
    ring.publish(0)


def _hostile_avail_jump(ring, mem):
    ring.set_desc(0, BUF, 4, 0)
    ring.publish(0)
    ring.set_avail_idx(9)


HOSTILE = [
    (_hostile_loop, "descriptor loop", INDIRECT_DESC),
    (_hostile_head, "head index 8 >= queue size 8", 0),
    (_hostile_next, "next index 9 >= queue size 8", 0),
    (_hostile_addr, "outside guest memory", 0),
    (_hostile_addr_len, "outside guest memory", 0),
    (_hostile_addr_wrap, "outside guest memory", 0),
    (_hostile_nested, "nested indirect", INDIRECT_DESC),
    (_hostile_nested, "not negotiated", 0),
    (_hostile_indirect_next, "VRING_DESC_F_NEXT", INDIRECT_DESC),
    (_hostile_indirect_len, "multiple of 16", INDIRECT_DESC),
    (_hostile_indirect_zero, "multiple of 16", INDIRECT_DESC),
    (_hostile_indirect_outside, "indirect table", INDIRECT_DESC),
    (_hostile_indirect_loop, "descriptor loop", INDIRECT_DESC),
    (_hostile_indirect_next_oob, "next index 2 >= indirect table size 2", INDIRECT_DESC),
    (_hostile_read_after_write, "device-readable descriptor 1 after a device-writable",
     0),
    (_hostile_avail_jump, "avail idx moved by 9 > queue size 8", 0),
]


@pytest.mark.parametrize("setup,reason,features", HOSTILE,
                         ids=[f"{s.__name__[9:]}-{f}" for s, _, f in HOSTILE])
@pytest.mark.parametrize("via", ["pop", "avail_bytes"])
def test_hostile_ring_breaks_only_that_queue(mem, caplog, setup, reason, features, via):
    ring, h = make(mem, features=features, index=3)
    # a second, healthy queue on the same memory
    other_ring = DriverRing(mem, 8, desc=0xA000, avail=0xB000, used=0xC000)
    other = Harness(mem, other_ring, index=4)
    setup(ring, mem)
    with caplog.at_level(logging.ERROR, logger="shardvu.virtqueue"):
        if via == "pop":
            assert h.vq.pop() is None
        else:
            assert h.vq.get_avail_bytes(1, 1) == (0, 0)
    assert h.vq.broken and reason in h.vq.broken_reason
    assert h.errors() == 1
    assert "queue 3 broken: " in caplog.text and reason in caplog.text
    # stays broken; nothing else happens
    assert h.vq.pop() is None and h.vq.empty() and not h.vq.ready()
    h.vq.notify()
    assert h.calls() == 0 and h.errors() == 0
    # the other queue is unaffected
    other_ring.publish(other_ring.chain([(BUF, 4, True)]))
    e = other.vq.pop()
    assert e is not None and not other.vq.broken
    other.vq.push(e, 4)
    other.vq.notify()
    assert other.calls() == 1 and other.errors() == 0
    # reset() clears it
    h.vq.reset()
    assert not h.vq.broken and h.vq.broken_reason == ""
    other.close()
    h.close()


def test_chain_length_overflow():
    # 17 valid descriptors of 256 MiB each (a sparse memfd) exceed 2**32-1 bytes
    big = 0x1000_0000
    mem, files = make_memory([(0, big)])
    ring = DriverRing(mem, 32)
    h = Harness(mem, ring)
    for k in range(17):
        ring.set_desc(k, 0, big, NEXT if k < 16 else 0, k + 1)
    ring.publish(0)
    assert h.vq.get_avail_bytes(0, 0) == (0, 0)
    assert h.vq.broken and "chain length overflow" in h.vq.broken_reason
    assert h.errors() == 1
    h.close()
    os.close(files[0][0])
    mem.close()


def test_chain_just_below_overflow_is_fine():
    big = 0x1000_0000
    mem, files = make_memory([(0, big)])
    ring = DriverRing(mem, 16)
    h = Harness(mem, ring)
    for k in range(16):
        ring.set_desc(k, 0, big if k < 15 else big - 1, NEXT if k < 15 else 0, k + 1)
    ring.publish(0)
    e = h.vq.pop()
    assert e is not None and e.out_len == 0xFFFFFFFF
    del e
    h.close()
    os.close(files[0][0])
    mem.close()


def test_virtqueue_size_exceeded(mem):
    ring, h = make(mem, num=2)
    ring.set_desc(0, BUF, 4, 0)
    ring.publish(0, 0)
    h.vq.pop(), h.vq.pop()
    ring.publish(0)              # two in use: a third head would exceed the ring
    assert h.vq.pop() is None and "size exceeded" in h.vq.broken_reason
    h.close()


def test_long_indirect_chain_capped(mem):
    ring, h = make(mem, features=INDIRECT_DESC)
    n = 1100
    table = 0x10000
    ring.write_table(table, [(BUF, 0, NEXT, k + 1) for k in range(n - 1)] + [(BUF, 0, 0, 0)])
    ring.set_desc(0, table, 16 * n, INDIRECT)
    ring.publish(0)
    assert h.vq.pop() is None and "longer than 1024" in h.vq.broken_reason
    h.close()


def test_inband_err_when_no_err_fd(mem):
    ring, h = make(mem)
    seen = []
    h.vq.err_fd = -1
    h.vq.inband_err = lambda: seen.append(1)
    ring.publish(8)
    assert h.vq.pop() is None and seen == [1]
    h.vq.mark_broken("again")          # idempotent: first reason kept, no second signal
    assert seen == [1] and "head index" in h.vq.broken_reason
    h.close()


def test_mark_broken_never_raises(mem):
    ring, h = make(mem)
    h.vq.err_fd = 10 ** 6                # not an fd
    h.vq.mark_broken("x")
    vq2 = VirtQueue(1)
    vq2.inband_err = lambda: 1 / 0
    vq2.mark_broken("y")
    assert vq2.broken
    h.close()
