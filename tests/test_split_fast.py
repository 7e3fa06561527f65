"""The workers' hot loops (CPython cast style and PyPy struct style): same
results as the general VirtQueue path, and hostile rings break the queue."""
from __future__ import annotations

import os

import pytest

from shardvu import protocol as P
from shardvu.driver import DriverQueue
from shardvu.memory import GuestMemory
from shardvu.protocol import MemoryRegion, VringAddr
from shardvu.virtqueue import VirtQueue
from shardvu.workers import split_fast, split_fast_struct

UVA = 0x7F00_0000_0000
STYLES = [split_fast, split_fast_struct]


@pytest.fixture
def ring():
    fd = os.memfd_create("fast")
    os.ftruncate(fd, 4 << 20)
    mem = GuestMemory()
    mem.add(MemoryRegion(0, 4 << 20, UVA, 0), fd)
    drv = DriverQueue(mem, 0x1000, 64, used_align=4096)
    vq = VirtQueue(1)
    vq.mem = mem
    vq.num = 64
    vq.features = P.bit(P.VIRTIO_F_VERSION_1) | P.bit(P.VIRTIO_RING_F_EVENT_IDX)
    vq.addr = VringAddr(1, 0, UVA + drv.desc_gpa, UVA + drv.used_gpa, UVA + drv.avail_gpa, 0)
    vq.map_rings()
    vq.started = vq.enable = True
    yield mem, drv, vq
    vq.unmap_rings()
    drv.close()
    mem.close()


@pytest.mark.parametrize("style", STYLES)
def test_tx_frames_come_out_and_buffers_go_back(ring, style):
    mem, drv, vq = ring
    frames = [bytes([i]) * (60 + i) for i in range(10)]
    bufs = []
    for i, f in enumerate(frames):
        gpa = 0x100000 + i * 2048
        mem.write(gpa, bytes(12) + f)
        bufs.append(drv.add([(gpa, 12 + len(f))]))
    drv.publish()
    got = []
    cache = split_fast.RegionCache(mem)
    n, nbytes, more = style.tx_pass(vq, 12, 64, cache, lambda views: got.extend(bytes(v) for v in views))
    assert (n, more) == (10, False) and got == frames and nbytes == sum(map(len, frames))
    assert sorted(h for h, _ in drv.get_used()) == sorted(bufs)
    assert vq.last_avail_idx == vq.used_idx == 10
    assert drv.avail_event == 10              # EVENT_IDX: asks for the next kick


@pytest.mark.parametrize("style", STYLES)
def test_rx_fill_writes_header_and_frame(ring, style):
    mem, drv, vq = ring
    heads = [drv.add([], [(0x200000 + i * 2048, 2048)]) for i in range(4)]
    drv.publish()
    frames = [b"abc" * 30, b"xyz" * 20]
    cache = split_fast.RegionCache(mem)
    n, nbytes, more = style.rx_pass(vq, frames, split_fast.rx_header(12), cache)
    assert (n, nbytes, more) == (2, 150, False)
    used = drv.get_used()
    assert [h for h, _ in used] == heads[:2] and [ln for _, ln in used] == [102, 72]
    assert mem.read(0x200000, 102) == bytes(10) + b"\x01\x00" + frames[0]


@pytest.mark.parametrize("style", STYLES)
def test_chains_are_left_to_the_general_path(ring, style):
    mem, drv, vq = ring
    drv.add([(0x100000, 12), (0x100100, 60)])        # two descriptors
    drv.publish()
    n, _, more = style.tx_pass(vq, 12, 64, split_fast.RegionCache(mem))
    assert (n, more) == (0, True) and not vq.broken


@pytest.mark.parametrize("style", STYLES)
@pytest.mark.parametrize("case", ["head", "address", "jump"])
def test_hostile_rings_break_the_queue(ring, style, case):
    mem, drv, vq = ring
    if case == "head":
        drv.push_avail(200)
        drv.write_avail_idx(1)
    elif case == "address":
        drv.write_desc(0, 1 << 40, 64, 0, 0)
        drv.push_avail(0)
        drv.write_avail_idx(1)
    else:
        drv.write_avail_idx(500)
    seen = []
    n, _, _ = style.tx_pass(vq, 12, 64, split_fast.RegionCache(mem), seen.extend)
    assert n == 0 and vq.broken and not seen
    assert {"head": "head index", "address": "outside guest memory", "jump": "moved by"}[case] in vq.broken_reason


@pytest.mark.parametrize("style", STYLES)
def test_rx_fill_takes_memoryview_frames_too(ring, style):
    mem, drv, vq = ring
    drv.add([], [(0x200000, 2048)])
    drv.publish()
    src = memoryview(bytearray(b"loop" * 20))
    n, _, _ = style.rx_pass(vq, [src], split_fast.rx_header(12), split_fast.RegionCache(mem))
    assert n == 1 and mem.read(0x200000 + 12, 80) == b"loop" * 20
