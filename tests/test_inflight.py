from __future__ import annotations

import os
import struct

import pytest

from shardvu.inflight import InflightBuffer, InflightQueue, queue_region_size
from shardvu.protocol import InflightDesc
from shardvu.virtqueue import VirtQueue

from ringutil import DriverRing, Harness, make_memory
from util import fd_is_open




def test_queue_region_size():
    assert queue_region_size(1) == 64
    assert queue_region_size(2) == 64          # 16 + 32 = 48
    assert queue_region_size(3) == 64
    assert queue_region_size(4) == 128         # 16 + 64 = 80
    assert queue_region_size(256) == 16 + 16 * 256 + 48
    assert queue_region_size(1024) == 16448


def test_create_layout():
    buf = InflightBuffer.create(3, 8)
    try:
        assert buf.mmap_size == 3 * 192 and buf.mmap_offset == 0
        assert os.fstat(buf.fd).st_size == buf.mmap_size
        assert buf.describe() == InflightDesc(576, 0, 3, 8)
        raw = os.pread(buf.fd, buf.mmap_size, 0)
        for q in range(3):
            hdr = raw[q * 192:q * 192 + 16]
            assert struct.unpack("<QHHHH", hdr) == (0, 1, 8, 0, 0)
            assert raw[q * 192 + 16:(q + 1) * 192] == bytes(176)
        q1 = buf.queue(1)
        assert q1.version == 1 and q1.desc_num == 8 and q1.capacity == 8
        q1.set_counter(7, 0x1122334455667788)
        q1.set_next(7, 5)
        q1.set_inflight(7, True)
        q1.last_batch_head = 7
        q1.used_idx = 0xABCD
        raw = os.pread(buf.fd, 192, 192)
        assert raw[12:16] == struct.pack("<HH", 7, 0xABCD)
        assert raw[16 + 7 * 16:16 + 8 * 16] == (b"\x01" + bytes(5) + struct.pack("<HQ", 5, 0x1122334455667788))
        with pytest.raises(IndexError):
            q1.set_inflight(8, True)
        with pytest.raises(IndexError):
            buf.queue(3)
    finally:
        buf.close()
    assert buf.closed
    buf.close()


@pytest.mark.parametrize("nq,qs", [(0, 8), (2, 0), (2, 12), (2, 2048), (2000, 8)])
def test_create_rejects_bad_geometry(nq, qs):
    with pytest.raises(ValueError):
        InflightBuffer.create(nq, qs)


def test_map_shares_the_created_buffer():
    a = InflightBuffer.create(2, 16)
    b = InflightBuffer.map(os.dup(a.fd), a.mmap_size, 0, 2, 16)
    try:
        a.queue(1).set_counter(3, 42)
        assert b.queue(1).get_counter(3) == 42
        assert b.queue(0).version == 1
    finally:
        b.close()
        a.close()


def test_map_with_offset():
    size = queue_region_size(8)
    fd = os.memfd_create("inf", os.MFD_CLOEXEC)
    os.ftruncate(fd, 100 + size)
    os.pwrite(fd, struct.pack("<QHH", 0, 1, 8), 100)
    b = InflightBuffer.map(fd, size, 100, 1, 8)
    assert b.queue(0).version == 1 and b.queue(0).desc_num == 8
    b.close()
    assert not fd_is_open(fd)


@pytest.mark.parametrize("size,offset,nq,qs,file_size", [
    (64, 0, 1, 8, 4096),           # too small for 1 queue of 8 (192 needed)
    (192, 0, 1, 12, 4096),          # not a power of two
    (192 * 4, 0, 1, 2048, 1 << 16),  # too big
    (192, 0, 0, 8, 4096),           # no queues
    (192, 4000, 1, 8, 4096),        # file too small for offset+size
    (192, 0, 1, 8, 100),            # file too small
])
def test_map_validation_closes_fd(size, offset, nq, qs, file_size):
    fd = os.memfd_create("inf", os.MFD_CLOEXEC)
    os.ftruncate(fd, file_size)
    with pytest.raises(ValueError):
        InflightBuffer.map(fd, size, offset, nq, qs)
    assert not fd_is_open(fd)


# -- tracking through the virtqueue ---------------------------------------------

BUF = 0x4000


class Setup:
    def __init__(self, num=8):
        self.mem, self.files = make_memory()
        self.ring = DriverRing(self.mem, num)
        self.buf = InflightBuffer.create(1, num)
        self.h = self.attach()

    def attach(self) -> Harness:
        h = Harness(self.mem, self.ring)
        h.vq.inflight = self.buf.queue(0)
        h.vq.check_inflight()
        return h

    def reconnect(self) -> VirtQueue:
        """A new back-end: fresh VirtQueue on the same memory and buffer
        (re-mapped from a dup of the fd, as SET_INFLIGHT_FD would)."""
        self.h.close()
        old = self.buf
        self.buf = InflightBuffer.map(os.dup(old.fd), old.mmap_size, 0, 1, old.queue_size)
        old.close()
        self.h = self.attach()
        return self.h.vq

    def close(self):
        self.h.close()
        self.buf.close()
        for fd, _, _ in self.files:
            os.close(fd)
        self.mem.close()


@pytest.fixture
def s():
    st = Setup()
    yield st
    st.close()


def heads(ring, n):
    out = []
    for k in range(n):
        out.append(ring.chain([(BUF + 0x10 * k, 8, True)]))
    return out


def test_pop_and_push_track_inflight(s):
    vq, inf = s.h.vq, s.buf.queue(0)
    hs = heads(s.ring, 3)
    s.ring.publish(*hs)
    elems = [vq.pop() for _ in range(3)]
    assert [inf.is_inflight(h) for h in hs] == [True] * 3
    assert [inf.get_counter(h) for h in hs] == [0, 1, 2]
    vq.fill(elems[2], 8, 0)
    vq.fill(elems[0], 8, 1)
    vq.flush(2)
    assert not inf.is_inflight(hs[2]) and not inf.is_inflight(hs[0]) and inf.is_inflight(hs[1])
    assert inf.used_idx == 2 == s.ring.used_idx()
    # batch list: last_batch_head -> hs[0] -> hs[2]
    assert inf.last_batch_head == hs[0] and inf.get_next(hs[0]) == hs[2]
    vq.push(elems[1], 8)
    assert inf.last_batch_head == hs[1] and inf.used_idx == 3
    assert inf.inflight_heads() == []


def test_resubmit_in_counter_order_after_reconnect(s):
    vq, ring = s.h.vq, s.ring
    # avail order 5, 2, 7, 0 (counters 0..3); complete 2 only, then crash
    for h in (5, 2, 7, 0):
        ring.set_desc(h, BUF + 0x100 * h, 8, 2)
    ring.publish(5, 2, 7, 0)
    elems = {e.index: e for e in (vq.pop() for _ in range(4))}
    vq.push(elems[2], 8)
    del elems
    vq = s.reconnect()
    assert vq.inuse == 3 and vq.resubmit_pending == 3
    assert vq.used_idx == 1 and vq.last_avail_idx == 4
    assert vq.counter == 4 and not vq.empty()
    got = [vq.pop().index for _ in range(3)]
    assert got == [5, 7, 0]
    assert vq.pop() is None and vq.empty()
    # new work continues after the resubmitted entries, counters keep growing
    ring.set_desc(3, BUF, 8, 2)
    ring.publish(3)
    e = vq.pop()
    assert e.index == 3 and s.buf.queue(0).get_counter(3) == 4
    assert vq.inuse == 4


def test_reconnect_repairs_interrupted_batch(s):
    vq, ring, inf = s.h.vq, s.ring, s.buf.queue(0)
    hs = heads(ring, 4)
    ring.publish(*hs)
    elems = [vq.pop() for _ in range(4)]
    vq.push(elems[0], 8)
    # simulate a crash inside flush of a 2-element batch (elems 1 and 3):
    # batch linked and used->idx published, inflight flags and used_idx not yet
    for slot, e in enumerate((elems[1], elems[3])):
        vq.fill(e, 8, slot)
    inf.set_next(hs[1], inf.last_batch_head)
    inf.last_batch_head = hs[1]
    inf.set_next(hs[3], inf.last_batch_head)
    inf.last_batch_head = hs[3]
    ring.set_used_idx(3)
    assert inf.used_idx == 1 and inf.is_inflight(hs[1]) and inf.is_inflight(hs[3])
    del elems
    vq = s.reconnect()
    inf = s.buf.queue(0)
    assert inf.used_idx == 3
    assert not inf.is_inflight(hs[1]) and not inf.is_inflight(hs[3])
    assert not inf.is_inflight(hs[0])       # already done before, must stay clear
    assert [vq.pop().index] == [hs[2]] and vq.pop() is None
    assert vq.last_avail_idx == 4


def test_version_zero_is_initialised(s):
    vq, ring, inf = s.h.vq, s.ring, s.buf.queue(0)
    hs = heads(ring, 2)
    ring.publish(*hs)
    vq.pop(), vq.pop()
    inf.version = 0                          # front-end says: VM reset
    vq = s.reconnect()
    inf = s.buf.queue(0)
    assert inf.version == 1 and inf.desc_num == 8 and inf.inflight_heads() == []
    assert vq.resubmit_pending == 0 and vq.inuse == 0


def test_unpop_resubmitted_element(s):
    vq, ring = s.h.vq, s.ring
    hs = heads(ring, 2)
    ring.publish(*hs)
    vq.pop(), vq.pop()
    vq = s.reconnect()
    a = vq.pop()
    vq.unpop(a)
    assert [vq.pop().index, vq.pop().index] == hs
    assert vq.pop() is None and vq.last_avail_idx == 2


def test_hostile_inflight_buffer(s):
    inf = s.buf.queue(0)
    # batch list pointing out of range and a huge used_idx lag: bounded, no exception
    inf.last_batch_head = 0xFFFF
    inf.used_idx = 0x8000
    for i in range(8):
        inf.set_inflight(i, True)
        inf.set_counter(i, 100 - i)
    vq = s.reconnect()
    assert vq.inuse == 8 and vq.resubmit_pending == 8
    # descriptors are garbage (zeroed: addr 0 len 0) -> still safe
    got = [vq.pop() for _ in range(8)]
    assert [e.index for e in got] == list(range(7, -1, -1))
    assert vq.pop() is None


def test_check_inflight_needs_capacity():
    mem, files = make_memory()
    ring = DriverRing(mem, 16)
    buf = InflightBuffer.create(1, 8)
    h = Harness(mem, ring)
    h.vq.inflight = buf.queue(0)
    from shardvu.virtqueue import RingError
    with pytest.raises(RingError):
        h.vq.check_inflight()
    h.vq.inflight = None
    h.vq.check_inflight()                    # no buffer: no-op
    h.close()
    buf.close()
    for fd, _, _ in files:
        os.close(fd)
    mem.close()


def test_inflight_queue_view_bounds():
    with pytest.raises(ValueError):
        InflightQueue(memoryview(bytearray(32)), 8)


def test_an_fd_that_is_no_file_is_refused_and_closed_once():
    """SET_INFLIGHT_FD with a pipe: ValueError, the fd closed by map() alone
    (the Device used to close it a second time: EBADF killed the control)."""
    r, w = os.pipe()
    try:
        with pytest.raises(ValueError, match="a pipe"):
            InflightBuffer.map(r, 4096, 0, 1, 64)
        assert not fd_is_open(r)
    finally:
        os.close(w)


def test_created_buffer_is_sealed_against_shrinking():
    """The front-end gets the GET_INFLIGHT_FD memfd: it cannot truncate it
    under the back-end's mapping (SIGBUS)."""
    buf = InflightBuffer.create(2, 64)
    try:
        with pytest.raises(PermissionError):
            os.ftruncate(buf.fd, 0)
        with pytest.raises(PermissionError):
            os.ftruncate(buf.fd, buf.mmap_size * 2)
    finally:
        buf.close()
