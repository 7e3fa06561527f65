"""The workers' hot loops (CPython cast style and PyPy struct style): same
results as the general VirtQueue path, and hostile rings break the queue."""
from __future__ import annotations

import os

import pytest

from shardvu import protocol as P
from shardvu.testing.driver import VRING_DESC_F_WRITE, DriverQueue
from shardvu.memory import GuestMemory
from shardvu.protocol import MemoryRegion, VringAddr
from shardvu.virtqueue import VirtQueue
from shardvu.workers import split_fast, split_fast_struct
from shardvu.workers import spsc
from shardvu.workers.spsc import SpscRing

UVA = 0x7F00_0000_0000
STYLES = [split_fast, split_fast_struct]


def _memory(size: int) -> GuestMemory:
    fd = os.memfd_create("fast")
    os.ftruncate(fd, size)
    mem = GuestMemory()
    mem.add(MemoryRegion(0, size, UVA, 0), fd)
    return mem


def _queue(mem, index: int, gpa: int, features: int):
    """A started 64-entry queue at ``gpa``: (driver side, back-end side)."""
    drv = DriverQueue(mem, gpa, 64, used_align=4096)
    vq = VirtQueue(index)
    vq.mem = mem
    vq.num = 64
    vq.features = features
    vq.addr = VringAddr(index, 0, UVA + drv.desc_gpa, UVA + drv.used_gpa, UVA + drv.avail_gpa, 0)
    vq.map_rings()
    vq.started = vq.enable = True
    return drv, vq


@pytest.fixture
def ring():
    mem = _memory(4 << 20)
    drv, vq = _queue(mem, 1, 0x1000, P.bit(P.VIRTIO_F_VERSION_1) | P.bit(P.VIRTIO_RING_F_EVENT_IDX))
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
    cache = style.RegionCache(mem)
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
    cache = style.RegionCache(mem)
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
    n, _, more = style.tx_pass(vq, 12, 64, style.RegionCache(mem))
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
    n, _, _ = style.tx_pass(vq, 12, 64, style.RegionCache(mem), seen.extend)
    assert n == 0 and vq.broken and not seen
    assert {"head": "head index", "address": "outside guest memory", "jump": "moved by"}[case] in vq.broken_reason


@pytest.mark.parametrize("style", STYLES)
def test_rx_fill_takes_memoryview_frames_too(ring, style):
    mem, drv, vq = ring
    drv.add([], [(0x200000, 2048)])
    drv.publish()
    src = memoryview(bytearray(b"loop" * 20))
    n, _, _ = style.rx_pass(vq, [src], split_fast.rx_header(12), style.RegionCache(mem))
    assert n == 1 and mem.read(0x200000 + 12, 80) == b"loop" * 20


# -- loopback hops: guest TX ring -> SPSC ring -> guest RX ring -----------------

@pytest.fixture
def pair():
    """A TX and an RX queue in one guest memory, like a loopback pair."""
    mem = _memory(8 << 20)
    queues = [*_queue(mem, 1, 0x1000, P.bit(P.VIRTIO_F_VERSION_1)),
              *_queue(mem, 0, 0x10000, P.bit(P.VIRTIO_F_VERSION_1))]
    ring = SpscRing.create(16, 128)
    yield mem, queues, ring
    ring.close()
    for drv, vq in (queues[:2], queues[2:]):
        vq.unmap_rings()
        drv.close()
    mem.close()


def _send(mem, drv, frames, hdr_len=12, base=0x100000):
    for f in frames:
        gpa = base + (drv.avail_idx % 64) * 2048
        mem.write(gpa, bytes([0xEE]) * hdr_len + f)       # a TX header the RX side must not see
        drv.add([(gpa, hdr_len + len(f))])
    drv.publish()


def _post_rx(drv, count, size=2048, base=0x400000):
    """Post ``count`` RX buffers; returns {head: gpa}."""
    where = {}
    for _ in range(count):
        gpa = base + (drv.avail_idx % 64) * 2048
        where[drv.add([], [(gpa, size)])] = gpa
    drv.publish()
    return where


@pytest.mark.parametrize("style", STYLES)
@pytest.mark.parametrize("hdr_len", [12, 10])
@pytest.mark.parametrize("start", [0, (1 << 64) - 100])
def test_loopback_hops_byte_exact_across_wraps(pair, style, hdr_len, start):
    """Many rounds (the guest rings and the 16-slot ring wrap many times,
    and from ``start`` the ring's 64-bit indices pass 2**64): each frame
    arrives once, in order, after the RX header laid down in the slot
    headroom, never after the guest's TX header."""
    mem, (tdrv, tvq, rdrv, rvq), _ = pair
    with SpscRing.create(16, 128, initial_index=start) as ring:
        _loopback_rounds(mem, tdrv, tvq, rdrv, rvq, ring, style, hdr_len)


def _loopback_rounds(mem, tdrv, tvq, rdrv, rvq, ring, style, hdr_len):
    hdr = split_fast.rx_header(hdr_len)
    ring.set_headroom(hdr)
    tcache, rcache = style.RegionCache(mem), style.RegionCache(mem)
    seq = 0
    for rnd in range(40):
        k = rnd % 13 + 1
        frames = [s.to_bytes(4, "little") + bytes([rnd]) * (rnd % 50) for s in range(seq, seq + k)]
        seq += k
        _send(mem, tdrv, frames, hdr_len)
        n, nbytes, dropped, more = style.tx_to_ring(tvq, hdr_len, 64, tcache, ring)
        assert (n, nbytes, dropped, more) == (k, sum(map(len, frames)), 0, False)
        assert len(tdrv.get_used()) == k
        where = _post_rx(rdrv, k)
        n, nbytes, more = style.rx_from_ring(rvq, ring, hdr_len, 64, rcache)
        assert (n, nbytes, more) == (k, sum(map(len, frames)), False)
        used = rdrv.get_used()
        assert [ln for _, ln in used] == [hdr_len + len(f) for f in frames]
        assert [mem.read(where[h], ln) for h, ln in used] == [hdr + f for f in frames]
        assert ring.pending() == 0
    assert not tvq.broken and not rvq.broken


@pytest.mark.parametrize("style", STYLES)
def test_loopback_tx_drops_what_the_ring_cannot_take(pair, style):
    """Ring full, a frame longer than a slot, a buffer shorter than the
    header: consumed from the guest (its buffers come back) and dropped."""
    mem, (tdrv, tvq, rdrv, rvq), ring = pair
    cache = style.RegionCache(mem)
    long_frame = b"L" * (ring.max_frame + 1)
    _send(mem, tdrv, [b"a" * 60, long_frame, b"b" * 60])
    gpa = 0x300000
    tdrv.add([(gpa, 8)])                                   # shorter than the 12-byte header
    tdrv.publish()
    n, nbytes, dropped, more = style.tx_to_ring(tvq, 12, 64, cache, ring)
    assert (n, nbytes, dropped, more) == (4, 120, 2, False)
    assert len(tdrv.get_used()) == 4 and ring.pending() == 2
    _send(mem, tdrv, [bytes([i]) * 20 for i in range(20)])  # 14 slots left
    n, nbytes, dropped, more = style.tx_to_ring(tvq, 12, 64, cache, ring)
    assert (n, dropped) == (20, 6) and ring.pending() == 16
    assert [bytes(f) for f in ring.pop_batch(16)][2:] == [bytes([i]) * 20 for i in range(14)]
    assert not tvq.broken


@pytest.mark.parametrize("style", STYLES)
def test_loopback_rx_leaves_frames_for_buffers_it_does_not_take(pair, style):
    """A chained or too-small RX buffer ends the fused batch (``more``) and
    the frames stay in the ring; no RX buffers: nothing is consumed."""
    mem, (tdrv, tvq, rdrv, rvq), ring = pair
    ring.set_headroom(split_fast.rx_header(12))
    cache = style.RegionCache(mem)
    ring.push_batch([b"x" * 100, b"y" * 100, b"z" * 100])
    assert style.rx_from_ring(rvq, ring, 12, 64, cache) == (0, 0, False)    # no buffers yet
    _post_rx(rdrv, 1)
    rdrv.add([], [(0x500000, 60)])                         # too small for 12 + 100
    rdrv.publish()
    n, nbytes, more = style.rx_from_ring(rvq, ring, 12, 64, cache)
    assert (n, nbytes, more) == (1, 100, True) and ring.pending() == 2
    assert len(rdrv.get_used()) == 1 and not rvq.broken


@pytest.mark.parametrize("style", STYLES)
@pytest.mark.parametrize("case", ["tx_address", "tx_head", "rx_address", "rx_head"])
def test_loopback_hostile_rings_break_only_their_queue(pair, style, case):
    mem, (tdrv, tvq, rdrv, rvq), ring = pair
    cache = style.RegionCache(mem)
    ring.push_batch([b"q" * 64])
    drv, vq = (tdrv, tvq) if case.startswith("tx") else (rdrv, rvq)
    if case.endswith("address"):
        drv.write_desc(0, 1 << 40, 76, 0 if drv is tdrv else 2, 0)
        drv.push_avail(0)
    else:
        drv.push_avail(200)
    drv.write_avail_idx(1)
    if drv is tdrv:
        n, _, _, _ = style.tx_to_ring(tvq, 12, 64, cache, ring)
        assert ring.pending() == 1                         # nothing published
    else:
        n, _, _ = style.rx_from_ring(rvq, ring, 12, 64, cache)
        assert ring.pending() == 1                         # nothing consumed
    assert n == 0 and vq.broken
    assert ("outside guest memory" if case.endswith("address") else "head index") in vq.broken_reason
    other = rvq if vq is tvq else tvq
    assert not other.broken


@pytest.mark.parametrize("style", STYLES)
def test_loopback_rx_rejects_a_corrupt_slot_length(pair, style):
    mem, (tdrv, tvq, rdrv, rvq), ring = pair
    ring.push_batch([b"x" * 10])
    ring.len32[spsc.HEADER_SIZE >> 2] = ring.max_frame + 1
    _post_rx(rdrv, 1)
    with pytest.raises(RuntimeError, match="corrupt slot length"):
        style.rx_from_ring(rvq, ring, 12, 64, style.RegionCache(mem))


@pytest.mark.parametrize("style", STYLES)
def test_zero_length_buffer_at_address_zero_before_any_lookup(ring, style):
    """A fresh region cache must not match [0, 0): the first buffer always
    goes through the region lookup (once it matched and then had no view)."""
    mem, drv, vq = ring
    drv.write_desc(0, 0, 0, 0, 0)
    drv.push_avail(0)
    drv.write_avail_idx(1)
    seen = []
    # header length 0: the empty frame is a frame (with 12 it is a short one)
    n, nbytes, more = style.tx_pass(vq, 0, 64, style.RegionCache(mem), seen.extend)
    assert n == 1 and [bytes(v) for v in seen] == [b""] and not vq.broken


@pytest.mark.parametrize("style", STYLES)
@pytest.mark.parametrize("loop", ["tx_pass", "rx_pass", "tx_to_ring", "rx_from_ring"])
def test_descriptor_address_above_2_63_is_refused(pair, style, loop):
    """The PyPy loops read a descriptor's address as a signed field (a "Q"
    field is a big integer there): an address >= 2**63 reads as negative
    and must be refused like any other address outside guest memory, and
    reported unsigned."""
    mem, (tdrv, tvq, rdrv, rvq), ring = pair
    cache = style.RegionCache(mem)
    top = (1 << 64) - 64
    tx = loop.startswith("tx")
    drv, vq = (tdrv, tvq) if tx else (rdrv, rvq)
    drv.write_desc(0, top, 76, 0 if tx else VRING_DESC_F_WRITE, 0)
    drv.push_avail(0)
    drv.write_avail_idx(1)
    if loop == "tx_pass":
        n, _, _ = style.tx_pass(vq, 12, 64, cache, [].extend)
    elif loop == "rx_pass":
        n, _, _ = style.rx_pass(vq, [b"f" * 64], split_fast.rx_header(12), cache)
    elif loop == "tx_to_ring":
        n, _, _, _ = style.tx_to_ring(vq, 12, 64, cache, ring)
    else:
        ring.push_batch([b"f" * 64])
        n, _, _ = style.rx_from_ring(vq, ring, 12, 64, cache)
    assert n == 0 and vq.broken
    assert f"{top:#x}" in vq.broken_reason and "outside guest memory" in vq.broken_reason


# -- RX: the consecutive-heads batch (checked with slices, not per buffer) ------

def _rx_batch(mem, drv, count=8, size=2048, base=0x200000):
    heads = [drv.add([], [(base + i * 2048, size)]) for i in range(count)]
    drv.publish()
    return heads


@pytest.mark.parametrize("style", STYLES)
@pytest.mark.parametrize("hdr_len", [12, 0])
def test_rx_consecutive_batch_matches_the_per_buffer_loop(ring, style, hdr_len, monkeypatch):
    """Frames of several lengths into 8 consecutive buffers: the used
    lengths, the bytes and the payload count are the per-buffer loop's
    (the CPython loop takes its slice-checked path here)."""
    mem, drv, vq = ring
    taken = []
    real = split_fast._rx_consecutive
    monkeypatch.setattr(split_fast, "_rx_consecutive", lambda *a: taken.append(real(*a)) or taken[-1])
    heads = _rx_batch(mem, drv)
    assert heads == list(range(heads[0], heads[0] + 8))
    hdr = split_fast.rx_header(hdr_len) if hdr_len else b""
    frames = [bytes([i]) * (60 + 7 * i) for i in range(8)]
    cache = style.RegionCache(mem)
    cache.lookup(0x200000, 2048)            # as after a worker's first pass
    n, nbytes, more = style.rx_pass(vq, frames, hdr, cache)
    assert (n, nbytes, more) == (8, sum(map(len, frames)), False)
    used = drv.get_used()
    assert [h for h, _ in used] == heads
    assert [ln for _, ln in used] == [len(hdr) + len(f) for f in frames]
    assert [mem.read(0x200000 + i * 2048, len(hdr) + len(f)) for i, f in enumerate(frames)] == \
        [hdr + f for f in frames]
    if style is split_fast:
        assert len(taken) == 1 and taken[0] is not None


@pytest.mark.parametrize("style", STYLES)
@pytest.mark.parametrize("case", ["address", "chained", "short", "readonly"])
def test_rx_consecutive_batch_with_one_bad_buffer(ring, style, case):
    """One buffer in the middle of consecutive heads spoils the slice check:
    the per-buffer loop then delivers the three before it and stops there,
    breaking the queue for a hostile address, leaving the rest to the
    general path (``more``) for a chain, a short or a read-only buffer."""
    mem, drv, vq = ring
    heads = _rx_batch(mem, drv)
    bad = heads[3]
    if case == "address":
        drv.write_desc(bad, 1 << 40, 2048, VRING_DESC_F_WRITE, 0)
    elif case == "chained":
        drv.write_desc(bad, 0x200000 + 3 * 2048, 2048, VRING_DESC_F_WRITE | 1, heads[4])
    elif case == "short":
        drv.write_desc(bad, 0x200000 + 3 * 2048, 40, VRING_DESC_F_WRITE, 0)
    else:
        drv.write_desc(bad, 0x200000 + 3 * 2048, 2048, 0, 0)
    frame = b"\xab" * 64
    cache = style.RegionCache(mem)
    cache.lookup(0x200000, 2048)            # warm: the slice check itself must refuse
    n, _, more = style.rx_pass(vq, [frame] * 8, b"", cache)
    assert n == 3 and [h for h, _ in drv.get_used()] == heads[:3]
    assert mem.read(0x200000 + 2 * 2048, 64) == frame and mem.read(0x200000 + 3 * 2048, 64) != frame
    if case == "address":
        assert vq.broken and "outside guest memory" in vq.broken_reason and not more
    else:
        assert more and not vq.broken


@pytest.mark.parametrize("style", STYLES)
def test_rx_batch_out_of_order_heads(ring, style):
    """Heads not consecutive (a front-end that reuses buffers out of order):
    the per-buffer loop, same results."""
    mem, drv, vq = ring
    gpas = {}
    for i in range(6):
        gpas[drv.add([], [(0x200000 + i * 2048, 2048)])] = 0x200000 + i * 2048
    drv.publish()
    cache = style.RegionCache(mem)
    assert style.rx_pass(vq, [b"a" * 64] * 6, b"", cache)[0] == 6
    drv.get_used()
    # give back heads 4, 1, 5 in that order: the avail ring now holds them
    for h in (4, 1, 5):
        drv.push_avail(h)
    drv.write_avail_idx(drv.avail_idx)
    frames = [b"x" * 70, b"y" * 71, b"z" * 72]
    n, nbytes, more = style.rx_pass(vq, frames, b"", cache)
    assert (n, nbytes, more) == (3, 213, False)
    assert drv.get_used() == [(4, 70), (1, 71), (5, 72)]
    assert [mem.read(gpas[h], 70 + i) for i, h in enumerate((4, 1, 5))] == frames


def test_loopback_hops_take_the_batch_path(pair, monkeypatch):
    """Consecutive buffers, warm caches, a ring with room: both CPython hops
    check the batch with slices (:func:`split_fast._columns`), and the bytes,
    used lengths and counts are exact."""
    mem, (tdrv, tvq, rdrv, rvq), ring = pair
    ring.set_headroom(split_fast.rx_header(12))
    seen = []
    real = split_fast._columns
    monkeypatch.setattr(split_fast, "_columns", lambda *a: seen.append(real(*a)) or seen[-1])
    tcache, rcache = split_fast.RegionCache(mem), split_fast.RegionCache(mem)
    tcache.lookup(0x100000, 2048)
    rcache.lookup(0x400000, 2048)
    frames = [bytes([i]) * (60 + i) for i in range(6)]
    _send(mem, tdrv, frames)
    assert split_fast.tx_to_ring(tvq, 12, 64, tcache, ring) == (6, sum(map(len, frames)), 0, False)
    where = _post_rx(rdrv, 6)
    assert split_fast.rx_from_ring(rvq, ring, 12, 64, rcache) == (6, sum(map(len, frames)), False)
    assert len(seen) == 2 and None not in seen
    used = rdrv.get_used()
    assert [ln for _, ln in used] == [12 + len(f) for f in frames]
    assert [mem.read(where[h], ln) for h, ln in used] == [split_fast.rx_header(12) + f for f in frames]
    assert ring.pending() == 0 and not tvq.broken and not rvq.broken


@pytest.mark.parametrize("hop", ["tx", "rx"])
def test_loopback_batch_with_a_hostile_buffer_in_the_middle(pair, hop):
    """A buffer outside guest memory among consecutive ones: the batch check
    refuses, the per-buffer loop moves the two before it and breaks the
    queue there."""
    mem, (tdrv, tvq, rdrv, rvq), ring = pair
    cache = split_fast.RegionCache(mem)
    cache.lookup(0x100000, 2048)
    frames = [b"m" * 64] * 5
    _send(mem, tdrv, frames)
    if hop == "tx":
        tdrv.write_desc(2, 1 << 40, 76, 0, 0)
        n, _, _, _ = split_fast.tx_to_ring(tvq, 12, 64, cache, ring)
        assert n == 2 and tvq.broken and ring.pending() == 2
    else:
        assert split_fast.tx_to_ring(tvq, 12, 64, cache, ring)[0] == 5
        _post_rx(rdrv, 5)
        rdrv.write_desc(2, 1 << 40, 2048, VRING_DESC_F_WRITE, 0)
        n, _, _ = split_fast.rx_from_ring(rvq, ring, 12, 64, cache)
        assert n == 2 and rvq.broken and ring.pending() == 3
    assert "outside guest memory" in (tvq.broken_reason or rvq.broken_reason)
