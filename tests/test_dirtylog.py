from __future__ import annotations

import os

import pytest

from shardvu import eventfd
from shardvu.dirtylog import DirtyLog
from shardvu.protocol import VHOST_F_LOG_ALL, VHOST_VRING_F_LOG

from ringutil import DriverRing, Harness, bit, make_memory
from util import fd_is_open, memfd

PAGE = 4096






@pytest.fixture
def log():
    lg = DirtyLog(memfd(64 + 16), 64, 16)      # 512 pages = 2 MiB of guest memory
    yield lg
    lg.close()


def raw(log: DirtyLog) -> bytes:
    return os.pread(log.fd, log.size, log.offset)


def test_single_page_bits(log):
    log.mark(0, 1)
    log.mark(3 * PAGE + 5, 10)
    log.mark(9 * PAGE, PAGE)             # exactly one page
    assert log.dirty_pages() == [0, 3, 9]
    data = raw(log)
    assert data[0] == 0b1001 and data[1] == 0b10 and data[2:] == bytes(62)


def test_range_crossing_pages_and_bytes(log):
    log.mark(6 * PAGE + PAGE - 1, 2)      # last byte of page 6, first of page 7
    assert log.dirty_pages() == [6, 7]
    log.mark(13 * PAGE + 1, 30 * PAGE)    # pages 13..43: partial, full bytes, partial
    assert log.dirty_pages() == [6, 7] + list(range(13, 44))
    data = raw(log)
    assert data[2] == 0xFF and data[3] == 0xFF and data[4] == 0xFF and data[5] == 0b1111
    assert data[1] == 0b11100000


def test_zero_length_and_bounds(log):
    log.mark(0, 0)
    log.mark(5 * PAGE, -3)
    assert log.dirty_pages() == [] and log.out_of_range == 0
    log.mark(510 * PAGE, 4 * PAGE)        # pages 510..513: two beyond the log
    assert log.dirty_pages() == [510, 511] and log.out_of_range == 2
    log.mark(1 << 60, 3 * PAGE)
    assert log.out_of_range == 5
    assert log.is_dirty(511 * PAGE) and not log.is_dirty(1 << 60)
    # bytes around the log area are untouched
    assert os.pread(log.fd, 16, 0) == bytes(16)


def test_kick(log):
    log.kick()                            # no call fd: nothing
    efd = eventfd.eventfd()
    log.call_fd = efd
    log.kick()
    log.kick()
    assert eventfd.drain(efd) == 2
    log.close()
    assert fd_is_open(efd)                # the caller owns call_fd
    os.close(efd)


def test_close_is_idempotent_and_closes_fd():
    fd = memfd(8)
    lg = DirtyLog(fd, 8, 0)
    lg.close()
    assert not fd_is_open(fd) and lg.closed
    lg.close()
    lg.mark(0, 10)                        # harmless after close


@pytest.mark.parametrize("size,offset,file_size", [(0, 0, 4096), (64, 0, 32), (64, 4096, 4096)])
def test_constructor_validation_closes_fd(size, offset, file_size):
    fd = memfd(file_size)
    with pytest.raises(ValueError):
        DirtyLog(fd, size, offset)
    assert not fd_is_open(fd)


# -- logging from the virtqueue ------------------------------------------------

LOG_ALL = bit(VHOST_F_LOG_ALL)
LOG_USED_AT = 0x40_0000       # log_guest_addr of the used ring: page 1024


def make_logged(flags: int, features: int = LOG_ALL):
    mem, files = make_memory()
    ring = DriverRing(mem, 8)
    h = Harness(mem, ring, features, flags=flags, log_addr=LOG_USED_AT)
    lg = DirtyLog(memfd(256), 256, 0)        # 2048 pages = 8 MiB
    lg.call_fd = eventfd.eventfd()
    h.vq.log = lg
    return mem, files, ring, h, lg


def cleanup(mem, files, h, lg):
    os.close(lg.call_fd)
    lg.close()
    h.close()
    for fd, _, _ in files:
        os.close(fd)
    mem.close()


def test_fill_logs_exactly_the_written_pages():
    mem, files, ring, h, lg = make_logged(0)
    # writable buffers: 0x5ff0+0x20 (pages 5,6), 0x9000+0x3000 (pages 9..11), cross-region 0xfff0+0x20
    head = ring.chain([(0x4000, 16, False), (0x5FF0, 0x20, True), (0x9000, 0x3000, True),
                       (0xFFF0, 0x20, True)])
    ring.publish(head)
    e = h.vq.pop()
    assert lg.dirty_pages() == []                 # popping writes nothing logged
    # 0x20 bytes to the first buffer and 0x1001 to the second: pages 5, 6, 9, 10
    h.vq.fill(e, 0x20 + 0x1001, 0)
    assert lg.dirty_pages() == [5, 6, 9, 10]
    assert eventfd.drain(lg.call_fd) == 1
    h.vq.flush(1)
    assert lg.dirty_pages() == [5, 6, 9, 10]      # used ring not logged without VHOST_VRING_F_LOG
    cleanup(mem, files, h, lg)


def test_fill_logs_across_regions_and_used_ring():
    mem, files, ring, h, lg = make_logged(bit(VHOST_VRING_F_LOG))
    ring.publish(ring.chain([(0xFFF0, 0x20, True)]))
    ring.publish(ring.chain([(0x4000, 0x10, True)]))
    e1 = h.vq.pop()
    h.vq.fill(e1, 0x20, 0)
    # page 15 (0xfff0) and page 16 (0x10000, region 1), the used elem at LOG_USED_AT + 4
    assert lg.dirty_pages() == [15, 16, 1024]
    h.vq.flush(1)
    assert eventfd.drain(lg.call_fd) == 2
    e2 = h.vq.pop()
    h.vq.fill(e2, 0, 1)                            # nothing written to the buffer
    assert lg.dirty_pages() == [15, 16, 1024]
    cleanup(mem, files, h, lg)


def test_used_ring_log_offsets_span_pages():
    # used ring logged at an address whose used idx / elems straddle a page
    mem, files = make_memory()
    ring = DriverRing(mem, 8)
    lg = DirtyLog(memfd(256), 256, 0)
    base = 0x10_0000 - 6             # idx at base+2 in page 255, elem 0 at base+4..+12 crosses
    h = Harness(mem, ring, LOG_ALL, flags=bit(VHOST_VRING_F_LOG), log_addr=base)
    h.vq.log = lg
    ring.publish(ring.chain([(0x4000, 0x10, True)]))
    e = h.vq.pop()
    h.vq.fill(e, 0, 0)
    assert lg.dirty_pages() == [255, 256]
    lg.close()
    lg = DirtyLog(memfd(256), 256, 0)
    h.vq.log = lg
    h.vq.flush(1)
    assert lg.dirty_pages() == [255]               # only the 2-byte idx at base+2
    lg.close()
    h.close()
    for fd, _, _ in files:
        os.close(fd)
    mem.close()


def test_no_logging_without_log_all():
    mem, files, ring, h, lg = make_logged(bit(VHOST_VRING_F_LOG), features=0)
    ring.publish(ring.chain([(0x4000, 0x10, True)]))
    h.vq.push(h.vq.pop(), 0x10)
    assert lg.dirty_pages() == [] and eventfd.drain(lg.call_fd) == 0
    cleanup(mem, files, h, lg)


def test_avail_event_and_flags_writes_are_logged():
    from shardvu.protocol import VIRTIO_RING_F_EVENT_IDX
    mem, files, ring, h, lg = make_logged(bit(VHOST_VRING_F_LOG))
    h.vq.set_notification(False)                     # used->flags at used+0
    assert lg.dirty_pages() == [1024]
    cleanup(mem, files, h, lg)
    mem, files, ring, h, lg = make_logged(bit(VHOST_VRING_F_LOG),
                                          LOG_ALL | bit(VIRTIO_RING_F_EVENT_IDX))
    h.vq.set_notification(True)                      # avail_event at used + 4 + 8*8
    assert lg.dirty_pages() == [1024]
    cleanup(mem, files, h, lg)


@pytest.mark.parametrize("make,reason", [
    (lambda: os.pipe(), "a pipe"),
    (lambda: (eventfd.eventfd(),), "anonymous inode"),
    (lambda: (os.open("/dev/null", os.O_RDWR),), "character device"),
])
def test_an_fd_that_is_no_file_is_refused_and_closed(make, reason):
    """fstat first: only a regular file (memfd, shm, hugetlbfs) can back a log."""
    fds = make()
    try:
        with pytest.raises(ValueError, match=reason):
            DirtyLog(fds[0], 4096, 0)
        assert not fd_is_open(fds[0])
    finally:
        for fd in fds[1:]:
            os.close(fd)
